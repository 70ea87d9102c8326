"""What a build works on: the records its new rows touch, and the stores kept from build to build.

A build does not resolve, gate and link the whole of bronze again. It has two units of work:

* **Records** (``_record_id``) for resolving: every window of ``staging.resolve`` partitions by
  record id or finer, so the records of the ids that a build's new flattened rows carry (and of
  the inputs read again since) are resolved apart from the rest, from their flattened rows.
* **Positions** (``source_uri``, ``source_offset``: an input and a line, row or message in it)
  for everything after: the gate, linkage and the tables written (staged store, silver, held,
  quarantine) are replaced position by position. A record's new version changes the position
  of its old version too (its row there is now superseded), and every row at a position
  touched is gated and linked again: the rows of one position (a REDCap line's forms, a device
  message's template matches) are replaced together, so none is lost or written twice. (The
  input was the unit first: one new Patient version made the whole bulk export file of 52,000
  patients link again, and gold for every patient.)

The staged store (``staged/<table>``, restricted zone) keeps every resolved row of the latest
reads, current or superseded, with the gate's verdict (``_passed``; null for a superseded row),
so that counts, identity relations and the rows of positions touched again come from it, not
from a rescan of bronze.

A table is built whole instead (its store replaced) when its increment cannot be told: its
flattened rows were made again from the whole of bronze, or it has no store yet; and every table
is, when the build is (forced, the declarations changed, or the build before did not finish:
``BuildMark``). A table whose rows carry values of other rows (``StagedTable.across_rows``)
resolves every id of the same ``across_key`` together.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from patient_journey.engine import connect, spill_folder
from patient_journey.flattened import Refreshed, flattened
from patient_journey.identity import KeyMaker
from patient_journey.lake import Lake, TableRef, restricted, staged
from patient_journey.sources.records import BRONZE_SCHEMA
from patient_journey.staging import StagedTable, flatten, resolve

PASSED = "_passed"  # in the staged store: the gate's verdict on a current row; null when superseded
ROW = "_row"
RECORD_ID = "_record_id"
BUILD_MARK = restricted("ledger", "silver_build")


def from_latest_read(table: pa.Table, reads: pa.Table) -> pa.Table:
    """The rows of ``table`` that came from the latest read of their input. Rows of an input the
    ledgers do not list (a read that stopped before its ledger entry, a forgotten input not read
    again yet, a registry table) are all kept; staging collapses exact re-reads among them."""
    if table.num_rows == 0 or reads.num_rows == 0:
        return table
    keep = latest_read_mask(table, reads)
    if pc.all(keep).as_py():  # the common case (no input read twice): no copy of the table
        return table
    return table.filter(keep)


def latest_read_mask(table: pa.Table, reads: pa.Table) -> pa.Array:
    """For each row of ``table`` (with ``source_uri`` and ``run_id``): whether it came from the
    latest read of its input, or from an input the ledgers do not list. ``reads`` as
    ``pipeline.latest_reads`` gives them."""
    if table.num_rows == 0 or reads.num_rows == 0:
        return pa.array(np.ones(table.num_rows, dtype=bool))
    numbered = table.select(["source_uri", "run_id"]).append_column(
        "_n", pa.array(range(table.num_rows), pa.int64())
    )
    joined = numbered.join(reads, keys="source_uri", join_type="left outer")
    latest = joined.column("latest_run_id")
    keep = pc.or_kleene(pc.is_null(latest), pc.equal(joined.column("run_id"), latest))
    kept = joined.filter(keep).column("_n")
    return pc.is_in(numbered.column("_n"), value_set=kept.combine_chunks())


POSITION = ["source_uri", "source_offset"]  # where a record was read: an input, a line or message in it
POSITION_SCHEMA = pa.schema([("source_uri", pa.string()), ("source_offset", pa.int64())])


@dataclass(frozen=True)
class Batch:
    """One staged table's share of a build: the resolved rows (every flag, ``_row`` numbered
    over the batch) of the positions it replaces, or of every position."""

    spec: StagedTable
    rows: pa.Table
    positions: pa.Table | None  # (source_uri, source_offset); None: all (the table is built whole)
    stored: pa.Table | None = None  # those of ``positions`` the store has rows at

    @property
    def whole(self) -> bool:
        return self.positions is None


def positions_of(*tables: pa.Table) -> pa.Table:
    """The distinct positions of the rows of ``tables``."""
    parts = [table.select(POSITION).cast(POSITION_SCHEMA) for table in tables if table.num_rows]
    if not parts:
        return POSITION_SCHEMA.empty_table()
    return pa.concat_tables(parts).group_by(POSITION).aggregate([])


# Stands for a missing offset when positions are compared (a null matches a null, as it did when
# positions were compared as text); offsets are never negative.
_NO_OFFSET = -(2**63)


def _position_columns(table: pa.Table | pa.RecordBatch, uri: str) -> list[pa.Array | pa.ChunkedArray]:
    offsets = pc.fill_null(table.column("source_offset").cast(pa.int64()), _NO_OFFSET)
    return [pc.fill_null(table.column(uri).cast(pa.string()), ""), offsets]


def at_positions(table: pa.Table | pa.RecordBatch, positions: pa.Table, uri: str = "source_uri") -> pa.Array:
    """Which rows of ``table`` are at one of ``positions`` (its URI column named ``uri``): the rows
    of the positions' inputs first (a set lookup), then a hash semi-join on (URI, offset) of
    those alone (joining every row: 1.7 s in the 96 calls of a 1% rerun's silver at M; comparing
    the two as joined text cost a second for one 900,000-row store)."""
    if table.num_rows == 0 or positions.num_rows == 0:
        return pa.array(np.zeros(table.num_rows, dtype=bool))
    uris, offsets = _position_columns(table, uri)
    theirs = pa.table(_position_columns(positions, "source_uri"), names=["u", "o"])
    inputs = pc.unique(theirs.column("u").combine_chunks())
    near = pc.is_in(uris, value_set=inputs)
    if not pc.any(near).as_py():
        return pa.array(np.zeros(table.num_rows, dtype=bool))
    numbers = pa.array(np.arange(table.num_rows), pa.int64())
    mine = pa.table([uris, offsets, numbers], names=["u", "o", "_n"]).filter(near)
    hits = mine.join(theirs, keys=["u", "o"], join_type="left semi").column("_n")
    return pc.is_in(numbers, value_set=hits.combine_chunks())


def without(positions: pa.Table, others: pa.Table) -> pa.Table:
    return positions.filter(pc.invert(at_positions(positions, others)))


def declaration(files: Sequence[Path], parts: Sequence[object], keys: KeyMaker) -> str:
    """A fingerprint of everything besides its own rows that decides a record's outcome: the
    ``files`` (suites, device templates), the declarations (``parts``), the code that resolves,
    scores, gates and links, and the pseudonym key (as the pseudonym of a constant, which tells
    nothing of the key). A build whose fingerprint differs from the last one's is whole."""
    from patient_journey import linkage, prom, quality, scoring, staging
    from patient_journey.sources import device

    digest = hashlib.sha256()
    for path in sorted(files):  # by folder and name: the same files elsewhere fingerprint the same
        digest.update(f"{path.parent.name}/{path.name}".encode() + b"\0" + path.read_bytes())
    for module in (staging, prom, scoring, quality, linkage, device):
        try:
            digest.update(inspect.getsource(module).encode())
        except (OSError, TypeError):  # installed without sources: the release stands for the code
            digest.update(f"{module.__name__} {version('patient-journey')}".encode())
    digest.update(repr(parts).encode())
    digest.update(keys.key("declaration", "patient-journey").encode())
    return digest.hexdigest()[:32]


class BuildMark:
    """Whether the last silver build finished, and under which declaration. A build marks itself
    started before it writes anything and finished at its end; the build after one that did not
    finish (a crash part way, its tables perhaps half replaced) is whole."""

    def __init__(self, lake: Lake) -> None:
        self.lake = lake

    def trusted(self, fingerprint: str) -> bool:
        mark = self.lake.read(BUILD_MARK)
        if mark is None or mark.num_rows != 1:
            return False
        row = mark.to_pylist()[0]
        return bool(row["state"] == "finished" and row["declaration"] == fingerprint)

    def set(self, run_id: str, state: str, fingerprint: str) -> None:
        self.lake.overwrite(
            BUILD_MARK, pa.table({"run_id": [run_id], "state": [state], "declaration": [fingerprint]})
        )


def _numbered(rows: pa.Table) -> pa.Table:
    """The rows in the table's order (input, position, record id), ``_row`` numbered from 1."""
    ordered = rows.sort_by(
        [("source_uri", "ascending"), ("source_offset", "ascending"), (RECORD_ID, "ascending")]
    )
    index = ordered.schema.get_field_index(ROW)
    return ordered.set_column(index, ROW, pa.array(np.arange(1, ordered.num_rows + 1), pa.int64()))


def _ids(table: pa.Table) -> pa.Array:
    return pc.unique(table.column(RECORD_ID).combine_chunks()).drop_null()


def _rows_where(
    lake: Lake,
    ref: TableRef,
    keep: Callable[[pa.RecordBatch], pa.Array],
    passed: bool = False,
    version: int | None = None,
) -> pa.Table:
    """The rows of a version of the table (the latest by default) that ``keep`` takes (and that
    passed the gate, if ``passed``), filtered batch by batch as they are read. (As an Arrow
    scanner predicate, a text column's ``isin`` fails on delta-rs' file statistics, no kernel for
    string and string_view; and statistics cannot prune random ids.)"""
    at = lake.version(ref) if version is None else version
    if at is None:
        raise ValueError(f"{ref.label} does not exist")
    batches = []
    reader = lake.scan(ref, at, None)
    for batch in reader:
        wanted = keep(batch)
        if passed:
            wanted = pc.and_(wanted, pc.fill_null(batch.column(PASSED), False))
        batches.append(batch.filter(wanted))
    return pa.Table.from_batches(batches, reader.schema)


def _resolved(rows: pa.Table, spec: StagedTable, reads: pa.Table) -> pa.Table:
    return resolve({spec.name: from_latest_read(rows, reads)}, [spec])[spec.name]


@functools.cache
def _nothing_resolved(spec: StagedTable) -> pa.Table:
    """The table's resolved rows when none is resolved: its columns, no row (built once)."""
    return _resolved(
        flatten(BRONZE_SCHEMA.empty_table(), spec).read_all(), spec, POSITION_SCHEMA.empty_table()
    )


def whole_batch(lake: Lake, spec: StagedTable, reads: pa.Table, rows: pa.Table | None = None) -> Batch:
    """Every record of the table, resolved from all its flattened rows; or from ``rows``, the
    flattened rows of a part of its records (``FlattenedParts``)."""
    if rows is None:
        rows = lake.read(flattened(spec.name)) or flatten(BRONZE_SCHEMA.empty_table(), spec).read_all()
    return Batch(spec, _resolved(rows, spec, reads), None)


class FlattenedParts:
    """A staged table's flattened rows split in ``count`` parts of its record ids (by hash), in
    one pass over the table, into Parquet files in the spill folder (removed by ``close``).

    Every window of ``staging.resolve`` partitions by record id or finer, so the parts resolved
    apart are the table resolved whole; a build resolves, gates and links a large table part by
    part and holds one part. A table whose rows carry values across records (``across_key``)
    is not split."""

    def __init__(self, lake: Lake, spec: StagedTable, count: int) -> None:
        if spec.across_key:
            raise ValueError(f"{spec.name} resolves values across records: it is not split in parts")
        self.spec, self.count = spec, count
        self.folder = Path(tempfile.mkdtemp(prefix=f"{spec.name}-", dir=spill_folder()))
        ref = flattened(spec.name)
        version = lake.version(ref)
        if version is None:
            raise ValueError(f"{ref.label} does not exist")
        # A database of its own: these settings are the database's, and insertion order must
        # hold for every other query of the build.
        connection = connect(private=True)
        try:
            # Rows buffered per part before they are written (DuckDB's default, 524,288 rows per
            # part, held the whole of M's device events at once).
            connection.execute("SET partitioned_write_flush_threshold = 50000")
            connection.execute("SET preserve_insertion_order = false")
            connection.register("flat_rows", lake.scan(ref, version, None))
            folder = str(self.folder).replace("'", "''")  # a path in SQL text: COPY takes no parameter
            connection.execute(
                f"""COPY (SELECT *, hash({RECORD_ID}) % {int(count)} AS _part FROM flat_rows)
                    TO '{folder}' (FORMAT parquet, PARTITION_BY (_part), OVERWRITE_OR_IGNORE)"""
            )
        finally:
            connection.close()

    def rows(self, number: int) -> pa.Table:
        """The flattened rows of part ``number`` (0 to count - 1)."""
        connection = connect()
        try:
            if not any(self.folder.glob(f"_part={number}/*.parquet")):
                return flatten(BRONZE_SCHEMA.empty_table(), self.spec).read_all()
            return connection.execute(
                "SELECT * EXCLUDE (_part) FROM read_parquet($files, hive_partitioning = true)",
                {"files": f"{self.folder}/_part={number}/*.parquet"},
            ).to_arrow_table()
        finally:
            connection.close()

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def changed_batch(lake: Lake, spec: StagedTable, refreshed: Refreshed | None, reads: pa.Table) -> Batch:
    """The records that the build's new flattened rows touch, and every row at their positions.

    Ids resolved again: those of the new rows, and those of stored rows whose input was read
    again since (its latest read replaces the earlier: ``from_latest_read``); their earlier
    flattened rows are read only when any of them had rows before. Positions replaced: those of
    the rows resolved (a new version supersedes a row elsewhere) and of the stale rows; the
    store's other rows at those positions are taken as they were (their ids did not change)."""
    new = refreshed.rows if refreshed is not None and refreshed.rows is not None else None
    parts = [new] if new is not None and new.num_rows else []
    nothing = Batch(
        spec, _nothing_resolved(spec), POSITION_SCHEMA.empty_table(), POSITION_SCHEMA.empty_table()
    )
    if not parts and reads.num_rows == 0:  # no new rows, and no stored row can be stale
        return nothing
    store = staged(spec.name)
    keys = lake.read(store, columns=[RECORD_ID, *POSITION, "run_id"])
    assert keys is not None, "a table without a store is built whole"
    stale = keys.filter(pc.invert(latest_read_mask(keys, reads)))
    if not parts and stale.num_rows == 0:
        return nothing
    ids = pc.unique(pa.concat_arrays([_ids(table) for table in (*parts, stale)]))
    if spec.across_key:  # with every id of the same key (a REDCap record's rows)
        grouped = lake.read(flattened(spec.name), columns=[RECORD_ID, spec.across_key])
        assert grouped is not None
        mine = grouped.filter(pc.is_in(grouped.column(RECORD_ID), value_set=ids)).column(spec.across_key)
        together = pc.is_in(grouped.column(spec.across_key), value_set=pc.unique(mine.combine_chunks()))
        ids = pc.unique(pa.concat_arrays([ids, _ids(grouped.filter(together))]))
    earlier_ids = ids.filter(pc.is_in(ids, value_set=_ids(keys)))
    if len(earlier_ids):
        # Their flattened rows as they were before this build's (which ``new`` holds).
        before = refreshed.before if refreshed is not None and parts else None
        parts.append(
            _rows_where(
                lake,
                flattened(spec.name),
                lambda batch: pc.is_in(batch.column(RECORD_ID), value_set=earlier_ids),
                version=before,
            )
        )
    resolved = _resolved(pa.concat_tables(parts), spec, reads)
    positions = positions_of(resolved, stale, *([new] if new is not None else []))
    stored = positions.filter(at_positions(positions, keys))
    rows = resolved
    if stored.num_rows:
        others = _rows_where(lake, store, lambda batch: at_positions(batch, stored))
        others = others.filter(pc.invert(pc.is_in(others.column(RECORD_ID), value_set=ids)))
        rows = pa.concat_tables([others.select(resolved.schema.names).cast(resolved.schema), resolved])
    return Batch(spec, _numbered(rows), positions, stored)


def store_batch(lake: Lake, batch: Batch, passed: pa.Array, after_part: bool = False) -> int:
    """Replace the batch's positions in the table's staged store with its rows, each with the gate's
    verdict (``passed``: the ``_row`` of every row that passed); a part of a whole batch after
    the first (``after_part``) is added to the store. Returns the store's version."""
    current = pc.invert(batch.rows.column("_superseded"))
    verdict = pc.if_else(
        current, pc.is_in(batch.rows.column(ROW), value_set=passed), pa.scalar(None, pa.bool_())
    )
    rows = batch.rows.append_column(PASSED, verdict)
    store = staged(batch.spec.name)
    if batch.positions is None:
        return lake.append(store, rows) if after_part else lake.overwrite(store, rows)
    if batch.stored is not None and batch.stored.num_rows:
        lake.delete_matching(store, batch.stored)
    if rows.num_rows:
        return lake.append(store, rows)
    version = lake.version(store)
    assert version is not None
    return version


def stored_passed(lake: Lake, name: str, positions: pa.Table | None = None) -> pa.Table:
    """The rows of the table's staged store that passed the gate, at ``positions`` or all."""
    store = staged(name)
    if positions is not None:
        return _rows_where(
            lake, store, lambda batch: at_positions(batch, positions), passed=True
        ).drop_columns([PASSED])
    rows = lake.read(store)
    if rows is None:
        raise ValueError(f"{store.label} does not exist")
    return rows.filter(pc.fill_null(rows.column(PASSED), False)).drop_columns([PASSED])


def replace_positions(old: pa.Table | None, new: pa.Table, replaced: dict[str, pa.Table | None]) -> pa.Table:
    """Rows of a table of every staged table's records (``table_name`` and the position), with
    each staged table's rows at its replaced positions (None: all) taken from ``new``."""
    if old is None or old.num_rows == 0:
        return new
    drop = pa.array(np.zeros(old.num_rows, dtype=bool))
    for name, positions in replaced.items():
        mine = pc.equal(old.column("table_name"), name)
        if positions is not None:
            mine = pc.and_(mine, at_positions(old, positions))
        drop = pc.or_(drop, pc.fill_null(mine, False))
    return pa.concat_tables([old.filter(pc.invert(drop)).cast(new.schema), new])


def identity_change(before: pa.Table | None, after: pa.Table) -> str:
    """How the crosswalk (identifier -> patient key) changed since the last build: ``same``;
    ``grown`` (identifiers it did not have, nothing else: only held records can link now); or
    ``changed`` (an identifier lost or now maps to other keys: every linked row may link
    otherwise). Each identity relation's rows follow from its crosswalk rows (IdentityRelation)."""
    if before is None:
        return "changed"
    connection = connect()
    try:
        connection.register("before", before)
        connection.register("after", after)
        lost = connection.sql(
            "SELECT count(*) FROM (SELECT * FROM before EXCEPT SELECT * FROM after)"
        ).fetchone()
        gained = connection.sql(
            """SELECT count(*), count(*) FILTER (WHERE EXISTS (
                       SELECT 1 FROM before b WHERE b.identifier_type IS NOT DISTINCT FROM g.identifier_type
                       AND b.identifier IS NOT DISTINCT FROM g.identifier))
               FROM (SELECT * FROM after EXCEPT SELECT * FROM before) g"""
        ).fetchone()
    finally:
        connection.close()
    assert lost is not None and gained is not None
    if lost[0] or gained[1]:
        return "changed"
    return "grown" if gained[0] else "same"
