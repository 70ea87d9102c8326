"""Analyst access: DuckDB SQL over the warehouse's Delta tables, visible by name.

Gold tables are visible as ``surgical_episode``, ``journey_event``; silver tables by their
names too (``encounter``, ``prom_score``, ...), and both as ``gold.x`` / ``silver.x``.

The door opens onto the analysts' zone alone. Once the views exist, the connection's file access
is limited to the warehouse folder or container (DuckDB's ``allowed_directories`` with
``enable_external_access = false``), extensions can no longer be loaded and the configuration is
locked, so no ``delta_scan``, ``read_*``, ``glob`` or ``ATTACH`` of another path (the restricted
zone, the landing zone, any file of the machine) can run, and no statement can undo that. Only
read-only statements run (``SELECT``, ``WITH ... SELECT``, ``DESCRIBE``, ``SHOW``, ``EXPLAIN``).
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import duckdb
import pyarrow as pa

from patient_journey.azure import is_blob_url
from patient_journey.errors import ConfigurationError, JourneyError
from patient_journey.lake import Lake, Zone
from patient_journey.settings import JourneySettings


def _extension(name: str) -> Path:
    """DuckDB extensions ship as PyPI packages for duckdb 1.5.5 (no download at run time)."""
    package = importlib.import_module(f"duckdb_extension_{name}")
    folder = Path(str(package.__file__)).parent / "extensions" / f"v{duckdb.__version__}"
    return folder / f"{name}.duckdb_extension"


def open_warehouse(settings: JourneySettings) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with a view per silver and gold table."""
    lake = Lake(settings)
    connection = duckdb.connect()
    connection.execute("SET TimeZone = 'UTC'")
    connection.execute(f"LOAD '{_extension('delta')}'")
    access = lake.azure
    if access is not None and is_blob_url(lake.root(Zone.WAREHOUSE)):
        # delta_scan reads az:// through the azure extension's secret. Note: for the local
        # emulator it takes Azurite's standard port (10000) whatever the endpoint says.
        connection.execute(f"LOAD '{_extension('azure')}'")
        try:
            connection.execute(access.duckdb_secret_sql())
        except duckdb.Error:
            # The statement holds the secret: never let DuckDB's message repeat it.
            raise ConfigurationError("DuckDB's azure extension refused the Azure settings.") from None
    found = False
    for layer in ("silver", "gold"):
        connection.execute(f"CREATE SCHEMA IF NOT EXISTS {layer}")
        for ref in lake.tables(Zone.WAREHOUSE, layer):
            found = True
            scan = f"delta_scan('{lake.uri(ref)}')"
            connection.execute(f'CREATE VIEW {layer}."{ref.name}" AS SELECT * FROM {scan}')
            connection.execute(
                f'CREATE OR REPLACE VIEW main."{ref.name}" AS SELECT * FROM {layer}."{ref.name}"'
            )
    if not found:
        raise ConfigurationError(
            f"No warehouse tables under {lake.root(Zone.WAREHOUSE)} (JOURNEY_STORAGE__WAREHOUSE_URL). "
            "Run `journey run` (or `journey demo`) first."
        )
    _close_the_door(connection, lake.root(Zone.WAREHOUSE))
    return connection


def _close_the_door(connection: duckdb.DuckDBPyConnection, warehouse: str) -> None:
    """From here on the connection reads files under ``warehouse`` only, and cannot change that."""
    root = warehouse.rstrip("/") + "/"
    connection.execute("SET allowed_directories = $1", [[root]])
    connection.execute("SET enable_external_access = false")
    connection.execute("SET autoinstall_known_extensions = false")
    connection.execute("SET autoload_known_extensions = false")
    connection.execute("SET lock_configuration = true")


# Statement kinds that only read, and the way their text starts (DuckDB gives a PRAGMA that reads
# as its SELECT); what EXPLAIN explains must be read-only too, since EXPLAIN ANALYZE runs it.
READ_ONLY_KINDS = ("SELECT", "EXPLAIN")
READ_ONLY_STARTS = (
    "select",
    "with",
    "from",
    "describe",
    "show",
    "summarize",
    "pivot",
    "unpivot",
    "(",
    "values",
)
_EXPLAIN = re.compile(r"^explain\s+(analyze\s+)?", re.IGNORECASE)


def _is_read_only(kind: str, text: str) -> bool:
    explained = _EXPLAIN.match(text)
    if explained is not None:
        inner = text[explained.end() :]
        statements = duckdb.extract_statements(inner)
        return len(statements) == 1 and _is_read_only(statements[0].type.name, inner)
    return kind in READ_ONLY_KINDS and text.lower().startswith(READ_ONLY_STARTS)


def read_only_statements(sql: str) -> list[str]:
    """The statements of ``sql``, each a read-only query; anything else is refused by name."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise JourneyError(f"Query failed: {exc}") from exc
    if not statements:
        raise JourneyError(
            "Query failed: the statement is empty; give a query, e.g. `select * from surgical_episode`."
        )
    texts = []
    for statement in statements:
        text = statement.query.strip()
        if not _is_read_only(statement.type.name, text):
            raise JourneyError(
                "Query refused: only read-only queries run here (SELECT, WITH, FROM, DESCRIBE, SHOW, "
                f"SUMMARIZE, EXPLAIN); this is a {statement.type.name} statement."
            )
        texts.append(text)
    return texts


def run_query(settings: JourneySettings, sql: str) -> pa.Table:
    """The result of the last statement of ``sql`` (each must be a read-only query)."""
    return run_queries(settings, sql)[-1]


def run_queries(settings: JourneySettings, sql: str) -> list[pa.Table]:
    """The result of every statement of ``sql``, in order (each must be a read-only query)."""
    statements = read_only_statements(sql)
    connection = open_warehouse(settings)
    try:
        return [connection.sql(statement).to_arrow_table() for statement in statements]
    except duckdb.Error as exc:
        raise JourneyError(f"Query failed: {exc}") from exc
    finally:
        connection.close()


def patient_timeline(settings: JourneySettings, patient_key: str) -> pa.Table:
    connection = open_warehouse(settings)
    try:
        return connection.execute(
            """SELECT strftime(event_time, '%Y-%m-%d %H:%M') AS time, phase, source, event_type AS event,
                      code, detail, trim(concat(CAST(value AS VARCHAR), ' ', unit)) AS value
               FROM journey_event WHERE patient_key = ? ORDER BY event_time, source, event_type""",
            [patient_key],
        ).to_arrow_table()
    finally:
        connection.close()
