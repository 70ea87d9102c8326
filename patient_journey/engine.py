"""The build's SQL engine: DuckDB connections with a memory limit, spilling to a folder of the
restricted zone's kind (``use_spill_folder``), all on one in-process database."""

from __future__ import annotations

import atexit
import shutil
import tempfile
import threading
from pathlib import Path

import duckdb

# What the build's DuckDB database (and the linker's own) may hold in memory before it spills to
# the spill folder; a query that cannot spill fails with an out-of-memory error past it.
ENGINE_MEMORY_LIMIT = "1GB"
_spill: dict[str, Path] = {}


def use_spill_folder(folder: str | None) -> Path:
    """The local folder where the build's SQL engine writes what exceeds its memory limit, and
    where large tables are split in parts (``increments.FlattenedParts``): restricted data, kept
    only while used. ``folder`` from the settings (JOURNEY_STORAGE__SPILL_DIR); None: a private
    folder (mode 0700) under the system's temporary folder, made once per process and removed
    at its exit. (DuckDB's own default is ``.tmp`` in the working directory.)"""
    if folder:
        path = Path(folder)
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    elif "default" in _spill:
        path = _spill["default"]
    else:
        path = Path(tempfile.mkdtemp(prefix="patient-journey-spill-"))
        atexit.register(shutil.rmtree, path, ignore_errors=True)
        _spill["default"] = path
    _spill["current"] = path
    return path


def spill_folder() -> Path:
    return _spill.get("current") or use_spill_folder(None)


_database: dict[Path, duckdb.DuckDBPyConnection] = {}  # the shared database, by its spill folder
_database_lock = threading.Lock()


def _open(folder: Path) -> duckdb.DuckDBPyConnection:
    database = duckdb.connect()
    database.execute("SET GLOBAL TimeZone = 'UTC'")  # (SET alone: this connection's session only)
    database.execute(f"SET memory_limit = '{ENGINE_MEMORY_LIMIT}'")
    database.execute("SET temp_directory = $folder", {"folder": str(folder)})
    return database


def connect(private: bool = False) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection for the build: UTC, a memory limit, spilling to the spill folder.

    A connection to the process's one in-memory database (opening a database costs 12-23 ms, and
    an incremental build made about 70): temporary tables and views and registered Arrow tables
    are each connection's own; a function made with ``create_function`` is the database's, so a
    caller that makes one asks for a ``private`` database of its own. (A database's spill folder
    is set when it opens: another folder opens another database.)"""
    folder = spill_folder()
    if private:
        return _open(folder)
    with _database_lock:
        if folder not in _database:  # (an earlier one goes when its last connection closes)
            _database.clear()
            _database[folder] = _open(folder)
        return _database[folder].cursor()
