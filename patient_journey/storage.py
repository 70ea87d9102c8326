"""One file-storage abstraction over local folders and Azure Blob Storage containers.

A location is a local path (made absolute, so Delta, DuckDB and lineage columns all see the
same string) or a blob URL (``az://container/prefix``, ``abfss://container@account.dfs...``).
Listing returns each file's version (the blob's etag; size and mtime for a local file) and its
last-modified time, which the input ledgers use to read each input once.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import pyarrow as pa
import pyarrow.compute as pc

from patient_journey.azure import AzureAccess, BlobLocation, is_blob_url, parse_blob_url, storage_failure
from patient_journey.errors import ConfigurationError, SourceError, StorageError

if TYPE_CHECKING:
    from patient_journey.settings import JourneySettings

PROBE_NAME = "_journey_access_probe"


class InputChangedError(StorageError):
    """A file changed between listing and reading: it is left for the next run."""


class InputGoneError(InputChangedError, SourceError):
    """A file or blob removed since it was listed: read as changed (left for a later run, which
    will not list it), and as missing where a file is optional."""


def normalise_url(location: str) -> str:
    """Local paths become absolute paths; URLs with a scheme are kept as they are."""
    if "://" in location:
        return location.rstrip("/")
    return str(Path(location).expanduser().resolve())


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts if p)])


@dataclass(frozen=True)
class FileInfo:
    """A file found in a location: URL, size, version (etag or mtime+size), last modified."""

    url: str
    size: int
    version: str
    modified: datetime


# A listing as a table: one row per file, the fields of FileInfo. The ledgers are compared with
# listings in Arrow, so that only the files to read become FileInfo objects (an IoT Hub landing
# zone lists hundreds of thousands of blobs, nearly all of them read before).
LISTING_SCHEMA = pa.schema(
    [
        ("url", pa.string()),
        ("size", pa.int64()),
        ("version", pa.string()),
        ("modified", pa.timestamp("us", tz="UTC")),
    ]
)


def _listing_table(files: Sequence[FileInfo]) -> pa.Table:
    columns = (
        [f.url for f in files],
        [f.size for f in files],
        [f.version for f in files],
        [f.modified for f in files],
    )
    return pa.table(dict(zip(LISTING_SCHEMA.names, columns, strict=True)), schema=LISTING_SCHEMA)


def listed_files(listing: pa.Table) -> list[FileInfo]:
    columns = (listing.column(name).to_pylist() for name in LISTING_SCHEMA.names)
    return [FileInfo(*row) for row in zip(*columns, strict=True)]


def azure_access(settings: JourneySettings) -> AzureAccess | None:
    """The Azure access of these settings, or None when no zone lives in blob storage."""
    if not any(is_blob_url(url) for url in settings.storage.zone_urls().values()):
        return None
    return AzureAccess(settings.azure)


class _Backend(Protocol):
    def exists(self, path: str) -> bool: ...
    def list_table(self, path: str) -> pa.Table: ...
    def list_dirs(self, path: str) -> list[str]: ...
    def read(self, url: str, version: str | None) -> bytes: ...
    def read_chunks(self, url: str, version: str | None, chunk_bytes: int) -> Iterator[bytes]: ...
    def write(self, path: str, data: bytes) -> None: ...
    def delete(self, path: str) -> None: ...


class _LocalBackend:
    def __init__(self, root: str) -> None:
        self.root = Path(root)

    @staticmethod
    def _version(stat: os.stat_result) -> str:
        """``<mtime ns>-<size>``; ``list_table`` builds the same strings as a column."""
        return f"{stat.st_mtime_ns}-{stat.st_size}"

    def exists(self, path: str) -> bool:
        return (self.root / path).exists()

    def list_table(self, path: str) -> pa.Table:
        base = self.root / path
        urls: list[str] = []
        sizes: list[int] = []
        times: list[int] = []  # st_mtime_ns

        def add(url: str, stat: os.stat_result) -> None:
            urls.append(url)
            sizes.append(stat.st_size)
            times.append(stat.st_mtime_ns)

        if base.is_file():
            add(str(base), base.stat())
        # os.scandir, not Path.rglob: the entry types come with the listing, so only files are
        # stat'ed (a landing zone holds hundreds of thousands of small IoT Hub blobs). Like
        # rglob, it does not descend into symlinked folders. Plain values are collected and
        # made columns: no object per file.
        folders = [str(base)] if base.is_dir() else []
        while folders:
            with os.scandir(folders.pop()) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        folders.append(entry.path)
                    elif entry.is_file():
                        add(entry.path, entry.stat())
        size = pa.array(sizes, pa.int64())
        mtime = pa.array(times, pa.int64())
        # As _version, which read() checks against it.
        version = pc.binary_join_element_wise(pc.cast(mtime, pa.string()), pc.cast(size, pa.string()), "-")
        modified = pc.divide(mtime, 1000).cast(pa.timestamp("us", tz="UTC"))  # whole microseconds
        return pa.table([pa.array(urls, pa.string()), size, version, modified], schema=LISTING_SCHEMA)

    def list_dirs(self, path: str) -> list[str]:
        base = self.root / path
        return [p.name for p in base.iterdir() if p.is_dir()] if base.is_dir() else []

    def read(self, url: str, version: str | None) -> bytes:
        # open() and os.stat on the URL, not Path: a batch reads thousands of small blobs, and
        # two Path objects per read were a quarter of the reading.
        try:
            with open(url, "rb") as file:
                data = file.read()
        except FileNotFoundError:
            raise InputGoneError(f"Cannot read {url}: no such file.") from None
        if version is not None and self._version(os.stat(url)) != version:
            raise InputChangedError(f"{url} changed while it was being read; it is left for the next run.")
        return data

    def read_chunks(self, url: str, version: str | None, chunk_bytes: int) -> Iterator[bytes]:
        try:
            file = open(url, "rb")  # noqa: SIM115 - closed in the finally of this generator
        except FileNotFoundError:
            raise InputGoneError(f"Cannot read {url}: no such file.") from None
        try:
            if version is not None and self._version(os.fstat(file.fileno())) != version:
                raise InputChangedError(f"{url} changed since it was listed; it is left for the next run.")
            while chunk := file.read(chunk_bytes):
                yield chunk
            if version is not None and self._version(os.stat(url)) != version:
                raise InputChangedError(
                    f"{url} changed while it was being read; it is left for the next run."
                )
        finally:
            file.close()

    def write(self, path: str, data: bytes) -> None:
        target = self.root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)

    def delete(self, path: str) -> None:
        """Delete a file, and the folders it leaves empty (blob storage has no empty folders)."""
        target = self.root / path
        target.unlink(missing_ok=True)
        for folder in target.parents:
            if folder == self.root or self.root not in folder.parents:
                break
            try:
                folder.rmdir()
            except OSError:  # not empty (or gone): stop here
                break


class _BlobBackend:
    def __init__(self, location: BlobLocation, azure: AzureAccess) -> None:
        self.location = location
        self.client = azure.container(location.container)

    def _name(self, path: str) -> str:
        return "/".join(p for p in (self.location.prefix, path.strip("/")) if p)

    def _fail(self, exc: Exception, operation: str, path: str) -> StorageError:
        return storage_failure(exc, operation, self.location.url(self._name(path)))

    def exists(self, path: str) -> bool:
        name = self._name(path)
        try:
            for blob in self.client.list_blobs(name_starts_with=name, results_per_page=5):
                if blob.name == name or blob.name.startswith(name + "/"):
                    return True
        except Exception as exc:
            raise self._fail(exc, "list", path) from None
        return False

    def list_table(self, path: str) -> pa.Table:
        name = self._name(path)
        start = f"{name}/" if name else None
        try:
            return _listing_table(
                [
                    FileInfo(
                        self.location.url(blob.name),
                        int(blob.size),
                        str(blob.etag).strip('"'),
                        blob.last_modified,
                    )
                    for blob in self.client.list_blobs(name_starts_with=start)
                    if not blob.name.endswith("/")
                ]
            )
        except Exception as exc:
            raise self._fail(exc, "list", path) from None

    def list_dirs(self, path: str) -> list[str]:
        name = self._name(path)
        try:
            items = self.client.walk_blobs(name_starts_with=f"{name}/" if name else None, delimiter="/")
            return [item.name.rstrip("/").rsplit("/", 1)[-1] for item in items if item.name.endswith("/")]
        except Exception as exc:
            raise self._fail(exc, "list", path) from None

    def _download(
        self, url: str, version: str | None, offset: int | None = None, length: int | None = None
    ) -> bytes | None:
        """A blob (or a range of it), only while it is the listed version; None for a range past its end."""
        from azure.core import MatchConditions
        from azure.core.exceptions import ResourceModifiedError, ResourceNotFoundError

        name = parse_blob_url(url).prefix
        try:
            if version is None:  # the SDK refuses an etag or match condition of None
                return self.client.download_blob(name, offset=offset, length=length).readall()
            return self.client.download_blob(
                name,
                offset=offset,
                length=length,
                etag=f'"{version}"',
                match_condition=MatchConditions.IfNotModified,
            ).readall()
        except ResourceModifiedError:
            raise InputChangedError(
                f"{url} changed while it was being read; it is left for the next run."
            ) from None
        except Exception as exc:
            if isinstance(exc, ResourceNotFoundError) and getattr(exc, "error_code", None) == "BlobNotFound":
                raise InputGoneError(f"Cannot read {url}: no such blob.") from None
            if offset is not None and (
                getattr(exc, "error_code", None) == "InvalidRange" or getattr(exc, "status_code", None) == 416
            ):
                return None  # past the end (a blob whose size is a multiple of the chunk)
            raise storage_failure(exc, "read", url) from None

    def read(self, url: str, version: str | None) -> bytes:
        data = self._download(url, version)
        assert data is not None  # only a range can fall past the end
        return data

    def read_chunks(self, url: str, version: str | None, chunk_bytes: int) -> Iterator[bytes]:
        """Ranged reads of at most ``chunk_bytes``, each conditional on the listed etag."""
        offset = 0
        while chunk := self._download(url, version, offset, chunk_bytes):
            yield chunk
            offset += len(chunk)
            if len(chunk) < chunk_bytes:
                return

    def write(self, path: str, data: bytes) -> None:
        try:
            self.client.upload_blob(self._name(path), data, overwrite=True)
        except Exception as exc:
            raise self._fail(exc, "write", path) from None

    def delete(self, path: str) -> None:
        try:
            self.client.delete_blob(self._name(path))
        except Exception as exc:
            raise self._fail(exc, "delete", path) from None


class Storage:
    """Lists, reads and writes files under one root (a local folder or a blob container/prefix)."""

    def __init__(self, root: str, azure: AzureAccess | None = None) -> None:
        self.root = normalise_url(root)
        self.is_blob = is_blob_url(self.root)
        self._backend: _Backend
        if self.is_blob:
            if azure is None:
                raise ConfigurationError(
                    f"{self.root} is in Azure Blob Storage but no Azure access is configured."
                )
            self._backend = _BlobBackend(parse_blob_url(self.root), azure)
        elif "://" in self.root:
            raise ConfigurationError(
                f"Unsupported storage URL {self.root!r}: use a local path, az://container/prefix "
                "or abfss://container@account.dfs.core.windows.net/prefix."
            )
        else:
            self._backend = _LocalBackend(self.root)

    @property
    def container(self) -> str:
        return parse_blob_url(self.root).container if self.is_blob else self.root

    def url(self, *parts: str) -> str:
        return join(self.root, *parts)

    def relative(self, url: str) -> str:
        """The path under this root of a URL it listed (what ``write_bytes`` and ``delete`` take)."""
        return url.removeprefix(self.url("").rstrip("/") + "/")

    def exists(self, *parts: str) -> bool:
        return self._backend.exists("/".join(p.strip("/") for p in parts if p))

    def list_table(self, prefix: str = "", suffixes: tuple[str, ...] = ()) -> pa.Table:
        """All files under ``prefix`` (recursively) as a table (``LISTING_SCHEMA``), sorted by URL;
        optionally by suffix."""
        listing = self._backend.list_table(prefix.strip("/"))
        urls = listing.column("url")
        keep = pc.invert(pc.ends_with(urls, PROBE_NAME))
        if suffixes:
            wanted = [pc.ends_with(urls, suffix) for suffix in suffixes]
            keep = pc.and_(keep, functools.reduce(pc.or_, wanted))
        return listing.filter(keep).sort_by("url")

    def list_files(self, prefix: str = "", suffixes: tuple[str, ...] = ()) -> list[FileInfo]:
        """All files under ``prefix`` (recursively), sorted by URL; optionally by suffix."""
        return listed_files(self.list_table(prefix, suffixes))

    def list_dirs(self, prefix: str = "") -> list[str]:
        """Names of the folders directly under ``prefix``, sorted."""
        return sorted(self._backend.list_dirs(prefix.strip("/")))

    def read_bytes(self, url: str, version: str | None = None) -> bytes:
        """The file's content; with ``version``, only if it is still that version."""
        return self._backend.read(url, version)

    def read_chunks(
        self, url: str, version: str | None = None, chunk_bytes: int = 64 * 2**20
    ) -> Iterator[bytes]:
        """The file's content in chunks of at most ``chunk_bytes`` (ranged reads from blob storage),
        so that a file of several GB is never held whole; with ``version``, only while it is
        still that version (``InputChangedError`` otherwise, possibly after some chunks)."""
        return self._backend.read_chunks(url, version, chunk_bytes)

    def write_bytes(self, path: str, data: bytes) -> None:
        self._backend.write(path, data)

    def delete(self, path: str) -> None:
        self._backend.delete(path)

    def check(self, writable: bool) -> None:
        """Fail fast, naming the container and operation, if this location cannot be used; a
        local location to read from must exist (listing a missing folder finds nothing, which
        looked like an empty landing zone)."""
        if not writable and not self.is_blob and not Path(self.root).is_dir():
            raise ConfigurationError(
                f"{self.root} does not exist or is not a folder (JOURNEY_STORAGE__LANDING_URL): point it at "
                "where the sources land."
            )
        self.list_dirs()
        if writable:
            name = f"{PROBE_NAME}-{os.getpid()}"
            self.write_bytes(name, b"")
            self.delete(name)


def check_zones(settings: JourneySettings) -> dict[str, str]:
    """Probe every zone: landing must be listable, the others writable. Returns zone -> root."""
    access = azure_access(settings)
    checked = {}
    for zone, url in settings.storage.zone_urls().items():
        storage = Storage(url, access)
        writable = zone != "landing"
        if writable and not storage.is_blob:
            Path(storage.root).mkdir(parents=True, exist_ok=True)
        storage.check(writable)
        checked[zone] = storage.root
    return checked
