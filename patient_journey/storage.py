"""One storage abstraction over URLs (fsspec), so that local folders and ``az://`` behave alike.

A location is a URL or a local path; local paths are made absolute so that Delta, DuckDB and
lineage columns all see the same string.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import IO

import fsspec
from fsspec.core import url_to_fs

from patient_journey.errors import SourceError


def normalise_url(location: str) -> str:
    """Local paths become absolute paths; URLs with a scheme are kept as they are."""
    if "://" in location:
        return location.rstrip("/")
    return str(Path(location).expanduser().resolve())


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts if p)])


@dataclass(frozen=True)
class FileInfo:
    """A file found in a location: its URL and size."""

    url: str
    size: int


class Storage:
    """Lists and opens files under one root URL."""

    def __init__(self, root: str) -> None:
        self.root = normalise_url(root)
        self._fs, self._root_path = url_to_fs(self.root)
        self._protocol = self.root.split("://", 1)[0] if "://" in self.root else None

    def url(self, *parts: str) -> str:
        return join(self.root, *parts)

    def _to_url(self, path: str) -> str:
        return f"{self._protocol}://{path}" if self._protocol else path

    def exists(self, *parts: str) -> bool:
        return bool(self._fs.exists(join(self._root_path, *parts)))

    def list_files(self, prefix: str = "", suffixes: tuple[str, ...] = ()) -> list[FileInfo]:
        """All files under ``prefix`` (recursively), sorted by URL; optionally by suffix."""
        base = join(self._root_path, prefix)
        if not self._fs.exists(base):
            return []
        found = self._fs.find(base, detail=True)
        files = [
            FileInfo(url=self._to_url(path), size=int(info.get("size") or 0))
            for path, info in found.items()
            if info.get("type") == "file" and (not suffixes or path.endswith(suffixes))
        ]
        return sorted(files, key=lambda f: f.url)

    def list_dirs(self, prefix: str = "") -> list[str]:
        """Names of the folders directly under ``prefix``, sorted."""
        base = join(self._root_path, prefix)
        if not self._fs.exists(base):
            return []
        entries = self._fs.ls(base, detail=True)
        return sorted(
            e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "directory"
        )

    @staticmethod
    def open(url: str, mode: str = "rb") -> IO[bytes]:
        try:
            handle: IO[bytes] = fsspec.open(url, mode).open()
        except FileNotFoundError as exc:
            raise SourceError(f"Cannot open {url}: no such file.") from exc
        return handle

    @staticmethod
    def read_bytes(url: str) -> bytes:
        with Storage.open(url) as handle:
            return handle.read()
