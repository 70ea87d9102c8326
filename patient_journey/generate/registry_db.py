"""The outcomes registry's tables as SQLAlchemy Core definitions, and a writer for any database.

The generator writes the embedded SQLite file with it; tests write the same rows to PostgreSQL.
``updated_at`` is ISO 8601 text (``2024-03-04T08:12:00+00:00``) on SQLite and ``timestamptz`` on
PostgreSQL, as a production registry would keep it (``text_timestamps=True`` keeps it text there
too, to exercise both kinds of column).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

if TYPE_CHECKING:
    from patient_journey.generate.writers import RegistryRows

TABLE_NAMES = ("registry_patient", "prom_response", "complication", "readmission")


def registry_metadata(text_timestamps: bool = False) -> sa.MetaData:
    """The four registry tables, in the column order the generator's rows use."""
    stamp: sa.types.TypeEngine[Any] = (
        sa.Text() if text_timestamps else sa.Text().with_variant(sa.DateTime(timezone=True), "postgresql")
    )
    metadata = sa.MetaData()
    sa.Table(
        "registry_patient",
        metadata,
        sa.Column("registry_id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("mrn", sa.Text, nullable=False),
        sa.Column("birth_date", sa.Text),
        sa.Column("site", sa.Text),
        sa.Column("updated_at", stamp, nullable=False),
    )
    sa.Table(
        "prom_response",
        metadata,
        sa.Column("response_id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("registry_id", sa.Integer, nullable=False),
        sa.Column("instrument", sa.Text),
        sa.Column("timepoint", sa.Text),
        sa.Column("score", sa.Float),
        sa.Column("collected_on", sa.Text),
        sa.Column("updated_at", stamp, nullable=False),
    )
    sa.Table(
        "complication",
        metadata,
        sa.Column("complication_id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("registry_id", sa.Integer, nullable=False),
        sa.Column("occurred_on", sa.Text),
        sa.Column("description", sa.Text),
        sa.Column("code", sa.Text),  # SNOMED CT
        sa.Column("clavien_dindo_grade", sa.Integer),
        sa.Column("updated_at", stamp, nullable=False),
    )
    sa.Table(
        "readmission",
        metadata,
        sa.Column("readmission_id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("registry_id", sa.Integer, nullable=False),
        sa.Column("admitted_on", sa.Text),
        sa.Column("discharged_on", sa.Text),
        sa.Column("reason", sa.Text),
        sa.Column("updated_at", stamp, nullable=False),
    )
    return metadata


REGISTRY_METADATA = registry_metadata()


def table_rows(rows: RegistryRows) -> dict[str, list[tuple[Any, ...]]]:
    """The generator's rows per registry table."""
    return {
        "registry_patient": rows.patients,
        "prom_response": rows.proms,
        "complication": rows.complications,
        "readmission": rows.readmissions,
    }


def write_registry_db(url: str, rows: RegistryRows, *, text_timestamps: bool = False) -> None:
    """Drop and create the four registry tables at ``url`` and insert ``rows``, in one transaction
    where the database allows it."""
    metadata = REGISTRY_METADATA if not text_timestamps else registry_metadata(text_timestamps=True)
    engine = sa.create_engine(url)
    try:
        with engine.begin() as connection:
            metadata.drop_all(connection)
            metadata.create_all(connection)
            for name, values in table_rows(rows).items():
                insert_rows(connection, metadata.tables[name], values)
    finally:
        engine.dispose()


def insert_rows(connection: sa.Connection, table: sa.Table, values: Sequence[tuple[Any, ...]]) -> None:
    """Insert generator rows (tuples in column order) into ``table``; ISO text goes into
    timestamp columns as aware datetimes."""
    if not values:
        return
    names = [column.name for column in table.columns]
    stamps = {
        column.name
        for column in table.columns
        if isinstance(column.type.dialect_impl(connection.dialect), sa.DateTime)
    }
    connection.execute(
        table.insert(),
        [
            {
                name: datetime.fromisoformat(value) if name in stamps and isinstance(value, str) else value
                for name, value in zip(names, row, strict=True)
            }
            for row in values
        ],
    )
