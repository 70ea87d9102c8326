"""Staging: bronze records -> typed tables, one per entity, still in the restricted zone.

Each staged table is declared once, by the source that feeds it (``Source.staged``, gathered in
``patient_journey.sources.plugins.STAGED_TABLES``), as the SQL that flattens its bronze payloads
(DuckDB's JSON functions, vectorised; ``declared`` and the helpers here). Staging is two steps:

* ``flatten``: bronze rows -> the table's columns, row by row, in record batches. The build keeps
  what it flattened (patient_journey.flattened) and flattens only the bronze rows committed since,
  so each payload is parsed once.
* ``resolve``: over all flattened rows of the table, which records are current. Every staged row
  keeps its lineage (source URI, offset, run id) and its bronze record id (``_record_id``) and
  gets two more columns: ``_row`` (the row's number in the table's order, which linkage keeps)
  and ``_first_of_id`` (false for a later record that repeats an earlier record's id, which the
  suites test). Every window partitions by record id (or finer), so the records of some ids can
  be resolved apart from the rest: a build resolves only the ids its new rows carry. Exact re-reads of the same
  physical record (same URI, offset and content, e.g. after a crash between bronze and ledger
  writes) are collapsed.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TypedDict

import pyarrow as pa
import pyarrow.compute as pc

from patient_journey.engine import connect
from patient_journey.prom import score_prom_tables

UNVERSIONED = "CAST(NULL AS TIMESTAMPTZ)"


@dataclass(frozen=True)
class StagedTable:
    """One staged table: its bronze source, which entity, and the flattening select list."""

    name: str
    bronze: str
    entity: str
    columns: str
    order_by: str = "source_uri, source_offset"  # only these two: the windows see no other columns
    # Versioned sources: the version of a record (later replaces earlier) and whether the record
    # is a deletion. Without a version, records of one id are all current.
    version: str = UNVERSIONED
    deleted: str = "false"
    # The JSON fields the columns read and the JSON kind each must have when present (see
    # FIELD_KINDS); a record with another kind there is quarantined under ``<source>_field_type``
    # instead of loading a NULL (or the wrong text) as if valid.
    fields: tuple[tuple[str, str], ...] = ()
    text_paths: tuple[str, ...] = ()  # what ``_at`` holds (see JsonText)
    # Columns whose value depends on other rows (a value one row of a record carries for all of
    # its rows): ``REPLACE`` items computed by ``resolve``, since ``columns`` must be computed row
    # by row (see ``flatten_sql``). Their windows partition by ``across_key`` (a column of the
    # table, one value for all rows of a record id), so that a build that resolves some record
    # ids resolves every id of the same key with them.
    across_rows: str = ""
    across_key: str = ""

    def __post_init__(self) -> None:
        if re.search(r"\bOVER\s*\(", self.columns, re.IGNORECASE):
            raise ValueError(
                f"Staged table {self.name}: a window (OVER) in its columns makes a row depend on "
                "others; declare it in across_rows, which is computed over the whole table."
            )
        if bool(self.across_rows) != bool(self.across_key):
            raise ValueError(
                f"Staged table {self.name}: across_rows and across_key go together (the windows of "
                "across_rows partition by across_key)."
            )


# JSON kinds as DuckDB's json_type names them.
FIELD_KINDS = {
    "string": ("VARCHAR",),
    "number": ("BIGINT", "UBIGINT", "DOUBLE"),
    "scalar": ("VARCHAR", "BIGINT", "UBIGINT", "DOUBLE"),
    "object": ("OBJECT",),
    "array": ("ARRAY",),
}
FIELD_ERROR = "_field_error"  # the first field of the wrong kind, as "path is X, expected Y"
_JSON_KIND = (
    "CASE _types[{n}] WHEN 'VARCHAR' THEN 'a string' WHEN 'OBJECT' THEN 'an object' "
    "WHEN 'ARRAY' THEN 'an array' WHEN 'BOOLEAN' THEN 'a boolean' ELSE 'a number' END"
)


def _field_error(fields: tuple[tuple[str, str], ...]) -> str:
    """SQL naming the first of ``fields`` whose kind is wrong, over ``_types`` (their json_type)."""
    if not fields:
        return "CAST(NULL AS VARCHAR)"
    cases = []
    for n, (path, kind) in enumerate(fields, start=1):
        allowed = ", ".join(f"'{name}'" for name in FIELD_KINDS[kind])
        article = "an" if kind[0] in "aeiou" else "a"
        cases.append(
            f"WHEN _types[{n}] IS NOT NULL AND _types[{n}] NOT IN ({allowed}) "
            f"THEN '{path} is ' || {_JSON_KIND.format(n=n)} || ', expected {article} {kind}'"
        )
    return f"CASE {' '.join(cases)} END"


def json_fields(*specs: str) -> tuple[tuple[str, str], ...]:
    """``"path:kind"`` items as (path, kind) pairs."""
    pairs = tuple(tuple(spec.rsplit(":", 1)) for spec in specs)
    assert all(len(pair) == 2 and pair[1] in FIELD_KINDS for pair in pairs), specs
    return pairs  # type: ignore[return-value]


class JsonText:
    """The JSON paths a staged table reads as text. Each is extracted once per record, by one
    ``json_extract_string(payload, [paths])`` (``_at``), and the table's SQL names it ``_at[n]``
    (DuckDB parses the JSON again for every ``->>``: Observation's nine columns at M, 580k rows,
    took 1.5 s one by one and 0.3 s parsed once)."""

    def __init__(self) -> None:
        self.paths: list[str] = []

    def __call__(self, path: str) -> str:
        if path not in self.paths:
            self.paths.append(path)
        return f"_at[{self.paths.index(path) + 1}]"


def declared(build: Callable[[JsonText], StagedTable]) -> StagedTable:
    """A staged table whose SQL reads payload text through ``at`` (a JsonText of its own)."""
    at = JsonText()
    table = build(at)
    return replace(table, text_paths=tuple(at.paths))


def timestamp(at: JsonText, path: str) -> str:
    return f"try_cast({at('$.' + path)} AS TIMESTAMPTZ)"


class Versions(TypedDict, total=False):
    """How a versioned source's records order (``version``) and which are deletions."""

    version: str
    deleted: str


# PROM tables: placeholders that patient_journey.prom fills from the items (see there).
PROM_SCORE_COLUMNS = (
    "CAST(NULL AS DOUBLE) AS score, CAST(NULL AS VARCHAR) AS scoring_status, "
    "CAST(NULL AS VARCHAR) AS score_name, CAST(NULL AS INTEGER) AS items_answered"
)

LINEAGE = "source_uri, source_offset, run_id"
# True for a record that is not current: a later version of its id, a deletion, or the same
# record delivered again (same id and content) replaces it. The pipeline counts and drops these.
SUPERSEDED = "_superseded"


def flatten_sql(spec: StagedTable, relation: str) -> str:
    """The SQL that flattens the bronze rows of ``relation`` that hold the table's entity: row by
    row (no row's result depends on another's), so bronze can be flattened in any split, batch by
    batch or build by build, and the rows put together give the same table."""
    parsed = (
        f"json_extract_string(payload, [{', '.join(repr(p) for p in spec.text_paths)}]) AS _at"
        if spec.text_paths
        else "NULL AS _at"
    )
    paths = ", ".join(f"'$.{path}'" for path, _ in spec.fields)
    types = f"json_type(payload, [{paths}]) AS _types" if spec.fields else "NULL AS _types"
    return f"""
        SELECT {spec.columns}, {_field_error(spec.fields)} AS {FIELD_ERROR},
               record_id AS _record_id, content_hash AS _hash,
               ingested_at AS _ingested, {spec.version} AS _version, {spec.deleted} AS _deleted,
               {LINEAGE}
        FROM (SELECT *, {parsed}, {types} FROM {relation} WHERE entity = '{spec.entity}')"""


FLATTEN_BATCH_ROWS = 100_000  # rows per flattened record batch (``flatten``)


def flatten(rows: pa.Table | pa.RecordBatchReader, spec: StagedTable) -> pa.RecordBatchReader:
    """The table's rows flattened from bronze ``rows``, streamed in record batches: a reader in
    is read once, batch by batch, never held whole."""
    connection = connect()
    connection.register("bronze_rows", rows)
    flattened = connection.sql(flatten_sql(spec, "bronze_rows")).fetch_record_batch(FLATTEN_BATCH_ROWS)

    def batches() -> Iterator[pa.RecordBatch]:
        try:
            yield from flattened
        finally:
            connection.close()

    return pa.RecordBatchReader.from_batches(flattened.schema, batches())


def resolve(flattened: dict[str, pa.Table], tables: Sequence[StagedTable]) -> dict[str, pa.Table]:
    """Every one of ``tables`` present in ``flattened`` (their rows as ``flatten`` gives them),
    with the records that are no longer current flagged ``_superseded`` (kept so that the caller
    can count them), ``_first_of_id`` and ``_row``; PROM tables scored. Tables are taken out of
    ``flattened`` (the caller's dict) as they are resolved, so each is freed once it is."""
    connection = connect()
    present = [spec for spec in tables if spec.name in flattened]
    staged: dict[str, pa.Table] = {}
    for spec in present:
        connection.register("flat_rows", flattened.pop(spec.name))
        # Records of one id are all current in an unversioned source: no windows to find the latest.
        versioned = (
            "NULL::TIMESTAMPTZ AS _latest, NULL::TIMESTAMPTZ AS _deleted_at"
            if spec.version == UNVERSIONED and spec.deleted == "false"
            else """max(_version) OVER (PARTITION BY _record_id) AS _latest,
                    max(coalesce(_version, 'infinity'::TIMESTAMPTZ)) FILTER (WHERE _deleted)
                        OVER (PARTITION BY _record_id) AS _deleted_at"""
        )
        across = f" REPLACE ({spec.across_rows})" if spec.across_rows else ""
        # The windows that pick current records run over the keys alone (row number, ids, hash,
        # version, lineage), joined back to the flattened rows, which are put in `_row` order in
        # Arrow. Windows and an ORDER BY over whole rows added 2.9 GiB to the process while M's
        # device events were staged; this adds 1.6 GiB, in the same time.
        flat = connection.sql(
            f"""
            WITH flattened AS MATERIALIZED (
                SELECT *{across}, row_number() OVER () AS _n FROM flat_rows
            ), records AS (
                SELECT _n, _record_id, _hash, _ingested, _version, _deleted, source_uri, source_offset
                FROM flattened
                QUALIFY row_number() OVER (
                    PARTITION BY source_uri, source_offset, _hash ORDER BY _ingested) = 1
            ), versions AS (
                SELECT *,
                    row_number() OVER (
                        PARTITION BY _record_id, _hash ORDER BY _ingested, {spec.order_by}) > 1 AS _again,
                    {versioned}
                FROM records
            ), flags AS (
                SELECT _n, _record_id, _ingested, source_uri, source_offset,
                       _again OR _version IS DISTINCT FROM _latest
                       OR coalesce(_deleted_at >= coalesce(_version, '-infinity'::TIMESTAMPTZ), false)
                       AS {SUPERSEDED}
                FROM versions
            ), ordered AS (
                SELECT _n, {SUPERSEDED},
                       -- of two current records of one id (same version, other content), the one
                       -- that arrived first is the record; within one read, the earlier in the listing
                       row_number() OVER (
                           PARTITION BY _record_id, {SUPERSEDED} ORDER BY _ingested, {spec.order_by}
                       ) = 1 AS _first_of_id,
                       -- a total order: one line or message can hold several records (REDCap forms,
                       -- template matches), and ties would number them differently from run to run
                       row_number() OVER (ORDER BY {spec.order_by}, _record_id) AS _row
                FROM flags
            )
            SELECT f.* EXCLUDE (_n, _record_id, _hash, _ingested, _version, _deleted, {LINEAGE}),
                   o.{SUPERSEDED}, {", ".join(f"f.{c}" for c in LINEAGE.split(", "))}, o._first_of_id, o._row,
                   f._record_id
            FROM ordered o JOIN flattened f USING (_n)
            """
        ).to_arrow_table()
        connection.unregister("flat_rows")
        staged[spec.name] = flat.take(pc.sort_indices(flat.column("_row")))
    connection.close()
    return score_prom_tables(staged)


def stage(bronze_tables: dict[str, pa.Table], tables: Sequence[StagedTable]) -> dict[str, pa.Table]:
    """Flatten and resolve every one of ``tables`` whose bronze source is present in one step
    (the build keeps the flattened rows between builds instead: patient_journey.flattened).
    Returns the staged tables in the order of ``tables``."""
    flattened = {
        spec.name: flatten(bronze_tables[spec.bronze], spec).read_all()
        for spec in tables
        if spec.bronze in bronze_tables
    }
    return resolve(flattened, tables)
