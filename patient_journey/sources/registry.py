"""The outcomes registry, read with SQLAlchemy (SQLite embedded, PostgreSQL in production).

Incremental on each table's ``updated_at``: only rows newer than the watermark kept in the
ledger are read. Each row becomes one bronze record whose offset is its ordinal in this read.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson
import sqlalchemy as sa

from patient_journey.errors import SourceError
from patient_journey.sources.records import Extraction


@dataclass(frozen=True)
class RegistryTable:
    name: str
    primary_key: str
    updated_at: str = "updated_at"


SOURCE = "registry"
TABLES = (
    RegistryTable("registry_patient", "registry_id"),
    RegistryTable("prom_response", "response_id"),
    RegistryTable("complication", "complication_id"),
    RegistryTable("readmission", "readmission_id"),
)


def redacted(url: str) -> str:
    return sa.make_url(url).render_as_string(hide_password=True)


def extract(url: str, watermarks: dict[str, str], run_id: str) -> Extraction:
    """Read rows changed since each table's watermark."""
    out = Extraction(SOURCE, run_id)
    safe_url = redacted(url)
    engine = sa.create_engine(url)
    try:
        with engine.connect() as connection:
            metadata = sa.MetaData()
            for spec in TABLES:
                try:
                    table = sa.Table(spec.name, metadata, autoload_with=connection)
                except sa.exc.NoSuchTableError as exc:
                    raise SourceError(
                        f"The registry at {safe_url} has no table {spec.name!r}; expected tables: "
                        f"{', '.join(t.name for t in TABLES)}."
                    ) from exc
                since = watermarks.get(spec.name)
                query = sa.select(table).order_by(table.c[spec.updated_at], table.c[spec.primary_key])
                if since is not None:
                    query = query.where(table.c[spec.updated_at] > since)
                uri = f"{safe_url}#{spec.name}"
                count = 0
                newest = since
                for ordinal, row in enumerate(connection.execute(query).mappings(), start=1):
                    values = {str(key): _plain(value) for key, value in row.items()}
                    raw = orjson.dumps(values)
                    out.add_record(spec.name, str(values[spec.primary_key]), raw.decode(), uri, ordinal, raw)
                    count += 1
                    stamp = str(values[spec.updated_at])
                    newest = stamp if newest is None or stamp > newest else newest
                if count:
                    out.add_input(uri, newest or "", count, "", count, 0, watermark=newest)
    except sa.exc.OperationalError as exc:
        raise SourceError(f"Cannot read the registry at {safe_url}: {type(exc.orig).__name__}.") from exc
    finally:
        engine.dispose()
    return out


def _plain(value: object) -> object:
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)
