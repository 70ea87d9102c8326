"""The flattened records: each staged table's rows as ``staging.flatten`` makes them from bronze,
kept in the restricted zone (``flattened/<table>``) from build to build.

A build flattens only the bronze rows committed since the build before, read from the bronze
table's change data feed (``Lake.changes_since``), and appends them; ``staging.resolve`` then
works on the flattened rows (typed columns: no JSON is parsed again). Each append records in its
commit the bronze version it reaches and a fingerprint of the table's declaration, so the next
build knows where to start. A table is flattened again from the whole of bronze when it cannot
be extended: on its first build, when its declaration changed (a release that reads another
field), when bronze rows were deleted since (the clean-up of a crashed commit), or when the
bronze table's change feed does not reach back (a table from before it had one).

Bronze is read and flattened in record batches and appended as a stream: the flattening holds
one batch, never a table.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import duckdb
import pyarrow as pa
import pyarrow.dataset as ds

from patient_journey.lake import Lake, TableRef, bronze, restricted
from patient_journey.staging import StagedTable, flatten, flatten_sql

BRONZE_COLUMNS = [
    "entity",
    "record_id",
    "payload",
    "source_uri",
    "source_offset",
    "content_hash",
    "run_id",
    "ingested_at",
]


def flattened(name: str) -> TableRef:
    return restricted("flattened", name)


@dataclass(frozen=True)
class Refreshed:
    """What one build flattened for one staged table."""

    table: str
    bronze_version: int
    whole: bool  # flattened from the whole of bronze (else: the rows committed since, if any)
    # For a table extended (not whole): the flattened table's version before, and the rows appended.
    before: int | None = None
    rows: pa.Table | None = None


def _kept(reader: pa.RecordBatchReader, into: list[pa.RecordBatch]) -> pa.RecordBatchReader:
    """``reader``, keeping each batch it yields in ``into`` (an increment's rows, which the build
    resolves next: read back from the table, they would cost a scan of all of it)."""

    def batches() -> Iterator[pa.RecordBatch]:
        for batch in reader:
            into.append(batch)
            yield batch

    return pa.RecordBatchReader.from_batches(reader.schema, batches())


def declaration(spec: StagedTable) -> str:
    """A fingerprint of everything that decides how the table flattens: the SQL (the table's
    declaration and the code that makes it SQL) and the engine that runs it."""
    return hashlib.sha256(f"{duckdb.__version__}\n{flatten_sql(spec, 'bronze')}".encode()).hexdigest()[:16]


def refresh(lake: Lake, specs: Sequence[StagedTable]) -> list[Refreshed]:
    """Bring every staged table's flattened rows up to its bronze table's latest version (tables
    whose bronze table does not exist yet have none)."""
    refreshed = []
    for name in dict.fromkeys(spec.bronze for spec in specs):
        lake.enable_change_feed(bronze(name))  # a commit of its own: before the version is read
    for spec in specs:
        source = bronze(spec.bronze)
        version = lake.version(source)
        if version is None:
            continue
        target = flattened(spec.name)
        mark = lake.commit_metadata(target)
        metadata = {"bronze_version": str(version), "declaration": declaration(spec)}
        rows = None
        if mark.get("declaration") == metadata["declaration"] and "bronze_version" in mark:
            done = int(mark["bronze_version"])
            if done == version:
                continue
            entity = spec.entity.replace("'", "''")
            rows = lake.changes_since(source, done, version, BRONZE_COLUMNS, f"entity = '{entity}'")
        if rows is not None:
            before = lake.version(target)
            appended: list[pa.RecordBatch] = []
            reader = flatten(rows, spec)
            lake.append(target, _kept(reader, appended), metadata)
            new_rows = pa.Table.from_batches(appended, reader.schema)
            refreshed.append(Refreshed(spec.name, version, whole=False, before=before, rows=new_rows))
        else:
            whole = lake.scan(source, version, BRONZE_COLUMNS, ds.field("entity") == spec.entity)
            lake.overwrite(target, flatten(whole, spec), metadata)
            refreshed.append(Refreshed(spec.name, version, whole=True))
    return refreshed
