"""Analyst access: DuckDB SQL over the warehouse's Delta tables, visible by name.

Gold tables are visible as ``surgical_episode``, ``journey_event``; silver tables by their
names too (``encounter``, ``prom_score``, ...), and both as ``gold.x`` / ``silver.x``. Only the
analysts' zone is exposed: the restricted zone is never attached here.
"""

from __future__ import annotations

import importlib
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
    return connection


def run_query(settings: JourneySettings, sql: str) -> pa.Table:
    connection = open_warehouse(settings)
    try:
        return connection.sql(sql).to_arrow_table()
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
