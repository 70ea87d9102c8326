"""The outcomes registry source on SQLite and PostgreSQL: incremental reads on ``updated_at`` with
a look-back, late and updated rows, reruns that append nothing, rows in = rows out, and errors
that name the database without its password.

PostgreSQL tests need a server on 127.0.0.1:5432 (trust auth, database ``test``; another URL with
``PATIENT_JOURNEY_TEST_POSTGRES_URL``). Without one they are skipped, saying so; with CI=true they
fail. Each test writes its tables into a schema of its own, dropped afterwards.
"""

from __future__ import annotations

import hashlib
import os
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
import sqlalchemy as sa
from pydantic import SecretStr

from patient_journey.errors import SourceError
from patient_journey.generate.model import build_cohort
from patient_journey.generate.registry_db import insert_rows, registry_metadata, table_rows, write_registry_db
from patient_journey.generate.writers import RegistryRows, registry_rows
from patient_journey.lake import Lake, bronze
from patient_journey.pipeline import forget_inputs, ingest, ledger_table
from patient_journey.settings import JourneySettings
from patient_journey.sources.registry import rows_read
from tests.conftest import settings_for

PATIENTS, SEED = 30, 11  # every registry table has rows with this seed
PG_PASSWORD = "registry-test-secret"  # ignored by a trust-auth server; must never show anywhere
PG_URL = os.environ.get(
    "PATIENT_JOURNEY_TEST_POSTGRES_URL", f"postgresql+psycopg://postgres:{PG_PASSWORD}@127.0.0.1:5432/test"
)
TABLES = ("registry_patient", "prom_response", "complication", "readmission")
Row = tuple[Any, ...]


def _require_postgres() -> None:
    url = sa.make_url(PG_URL)
    host, port = url.host or "127.0.0.1", url.port or 5432
    try:
        socket.create_connection((host, port), timeout=3).close()
    except OSError as exc:
        message = f"PostgreSQL on {host}:{port} is not reachable: {exc}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


@dataclass
class Registry:
    """A registry database written with the generator's rows, and the row versions written."""

    kind: str
    url: str
    metadata: sa.MetaData
    engine: sa.Engine
    written: set[tuple[str, str, str]] = field(default_factory=set)  # (table, pk, content hash)

    def load(self, rows: RegistryRows) -> None:
        write_registry_db(self.url, rows, text_timestamps=self.kind == "postgresql-text")
        for table, values in table_rows(rows).items():
            for row in values:
                self._remember(table, row)

    def upsert(self, table: str, row: Row) -> None:
        """Insert ``row`` (columns in order), replacing the row with its primary key."""
        target = self.metadata.tables[table]
        key = next(iter(target.primary_key.columns))
        with self.engine.begin() as connection:
            connection.execute(target.delete().where(key == row[0]))
            insert_rows(connection, target, [row])
        self._remember(table, row)

    def drop(self, table: str) -> None:
        with self.engine.begin() as connection:
            self.metadata.tables[table].drop(connection)

    def _remember(self, table: str, row: Row) -> None:
        names = [str(c.name) for c in self.metadata.tables[table].columns]
        payload = orjson.dumps(dict(zip(names, row, strict=True)))
        self.written.add((table, str(row[0]), hashlib.sha256(payload).hexdigest()))


def _open_registry(kind: str, tmp_path: Path) -> Iterator[Registry]:
    metadata = registry_metadata(text_timestamps=kind == "postgresql-text")
    if kind == "sqlite":
        url = f"sqlite:///{tmp_path / 'registry.sqlite'}"
        engine = sa.create_engine(url)
        try:
            yield Registry(kind, url, metadata, engine)
        finally:
            engine.dispose()
        return
    _require_postgres()
    schema = f"registry_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(PG_URL)
    with admin.begin() as connection:
        connection.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    # The schema comes first in the search path, so reflection and DDL happen there.
    url = f"{PG_URL}?options=-csearch_path%3D{schema}"
    engine = sa.create_engine(url)
    try:
        yield Registry(kind, url, metadata, engine)
    finally:
        engine.dispose()
        with admin.begin() as connection:
            connection.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql", "postgresql-text"])
def registry(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Registry]:
    """SQLite (text updated_at), PostgreSQL with timestamptz and with text updated_at."""
    yield from _open_registry(request.param, tmp_path)


@pytest.fixture(params=["postgresql", "postgresql-text"])
def pg_registry(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Registry]:
    yield from _open_registry(request.param, tmp_path)


@pytest.fixture(scope="module")
def rows() -> RegistryRows:
    rows = registry_rows(build_cohort(PATIENTS, SEED))
    assert all(rows.counts().values()), rows.counts()
    return rows


def _settings(tmp_path: Path, registry: Registry) -> JourneySettings:
    settings = settings_for(tmp_path / "lake")
    settings.sources.registry_url = SecretStr(registry.url)
    return settings


def _bronze(settings: JourneySettings) -> list[dict[str, Any]]:
    table = Lake(settings).read(bronze("registry_row"))
    return [] if table is None else table.to_pylist()


def _versions(settings: JourneySettings) -> tuple[int | None, int | None]:
    lake = Lake(settings)
    return lake.version(bronze("registry_row")), lake.version(ledger_table("registry"))


def _watermarks(settings: JourneySettings) -> dict[str, str]:
    ledger = Lake(settings).read(ledger_table("registry"))
    marks: dict[str, str] = {}
    for entry in [] if ledger is None else ledger.to_pylist():
        table = entry["uri"].rsplit("#", 1)[-1]
        marks[table] = max(marks.get(table, entry["watermark"]), entry["watermark"])
    return marks


def _shift(stamp: str, **delta: float) -> str:
    return (datetime.fromisoformat(stamp) + timedelta(**delta)).astimezone(UTC).isoformat()


def _assert_rows_in_equal_rows_out(settings: JourneySettings, registry: Registry) -> None:
    records = _bronze(settings)
    keys = [(r["entity"], r["record_id"], r["content_hash"]) for r in records]
    assert len(keys) == len(set(keys)), "a row version was read twice"
    assert set(keys) == registry.written


def test_first_ingest_reads_every_row(tmp_path: Path, registry: Registry, rows: RegistryRows) -> None:
    registry.load(rows)
    settings = _settings(tmp_path, registry)

    report = ingest(settings, "registry", "run-1")

    records = _bronze(settings)
    counts = {t: sum(1 for r in records if r["entity"] == t) for t in TABLES}
    assert counts == rows.counts()
    assert report.records == sum(rows.counts().values()) and report.new_inputs == len(TABLES)
    newest = {t: max(row[-1] for row in values) for t, values in table_rows(rows).items()}
    assert _watermarks(settings) == newest
    assert all(r["source_uri"].endswith(f"#{r['entity']}") for r in records)
    assert not any(PG_PASSWORD in r["source_uri"] for r in records)
    complication = orjson.loads(next(r["payload"] for r in records if r["entity"] == "complication"))
    assert complication["code"].isdigit() and complication["updated_at"].endswith("+00:00")
    _assert_rows_in_equal_rows_out(settings, registry)


def test_rerun_without_change_appends_nothing(tmp_path: Path, registry: Registry, rows: RegistryRows) -> None:
    registry.load(rows)
    settings = _settings(tmp_path, registry)
    ingest(settings, "registry", "run-1")
    before = _versions(settings)

    report = ingest(settings, "registry", "run-2")

    assert (report.records, report.new_inputs) == (0, 0)
    assert _versions(settings) == before


def test_late_row_is_read_once(tmp_path: Path, registry: Registry, rows: RegistryRows) -> None:
    registry.load(rows)
    settings = _settings(tmp_path, registry)
    ingest(settings, "registry", "run-1")
    marks = _watermarks(settings)
    late_pk = len(rows.proms) + 1
    late = (late_pk, *rows.proms[0][1:-1], _shift(marks["prom_response"], hours=-1))
    registry.upsert("prom_response", late)

    second = ingest(settings, "registry", "run-2")
    after_second = _versions(settings)
    third = ingest(settings, "registry", "run-3")

    assert second.records == 1
    read = [r for r in _bronze(settings) if r["run_id"] == "run-2"]
    assert [(r["entity"], r["record_id"]) for r in read] == [("prom_response", str(late_pk))]
    assert _watermarks(settings) == marks  # the late row is older than the watermark
    assert (third.records, third.new_inputs) == (0, 0)
    assert _versions(settings) == after_second
    _assert_rows_in_equal_rows_out(settings, registry)


def test_updated_row_is_one_new_record(tmp_path: Path, registry: Registry, rows: RegistryRows) -> None:
    registry.load(rows)
    settings = _settings(tmp_path, registry)
    ingest(settings, "registry", "run-1")
    marks = _watermarks(settings)
    original = rows.complications[0]
    stamp = _shift(marks["complication"], days=2)
    updated = (*original[:5], original[5] + 1, stamp)  # a higher Clavien-Dindo grade
    registry.upsert("complication", updated)

    report = ingest(settings, "registry", "run-2")

    assert report.records == 1
    versions = [r for r in _bronze(settings) if r["entity"] == "complication" and r["record_id"] == "1"]
    assert len(versions) == 2 and len({r["content_hash"] for r in versions}) == 2
    newest = next(r for r in versions if r["run_id"] == "run-2")
    assert orjson.loads(newest["payload"])["clavien_dindo_grade"] == original[5] + 1
    assert _watermarks(settings)["complication"] == stamp
    _assert_rows_in_equal_rows_out(settings, registry)


def test_row_older_than_lookback_is_not_read(tmp_path: Path, registry: Registry, rows: RegistryRows) -> None:
    """The documented limitation: a row that appears with an updated_at further back than the
    look-back window is missed, until the table is read again on purpose (reprocess)."""
    registry.load(rows)
    settings = _settings(tmp_path, registry)
    ingest(settings, "registry", "run-1")
    lookback = settings.sources.registry_lookback_seconds
    stale_pk = len(rows.readmissions) + 1
    stale_stamp = _shift(_watermarks(settings)["readmission"], seconds=-lookback - 3600)
    stale = (stale_pk, *rows.readmissions[0][1:-1], stale_stamp)
    registry.upsert("readmission", stale)

    missed = ingest(settings, "registry", "run-2")

    assert (missed.records, missed.new_inputs) == (0, 0)
    assert not any(
        r["record_id"] == str(stale_pk) and r["entity"] == "readmission" for r in _bronze(settings)
    )

    # The remedy: forget the table's watermark; the re-read skips every row already in bronze.
    assert forget_inputs(settings, "registry", "readmission") == 1
    reread = ingest(settings, "registry", "run-3")
    assert reread.records == 1
    _assert_rows_in_equal_rows_out(settings, registry)


def test_rows_in_equal_rows_out(tmp_path: Path, registry: Registry, rows: RegistryRows) -> None:
    """Late, updated and unchanged rows over several runs: every row version written is in
    bronze exactly once."""
    registry.load(rows)
    settings = _settings(tmp_path, registry)
    ingest(settings, "registry", "run-1")
    marks = _watermarks(settings)
    patient = rows.patients[3]
    registry.upsert(
        "registry_patient", (*patient[:3], "SITE-09", _shift(marks["registry_patient"], minutes=5))
    )
    late = (
        len(rows.complications) + 1,
        *rows.complications[0][1:-1],
        _shift(marks["complication"], hours=-3),
    )
    registry.upsert("complication", late)
    ingest(settings, "registry", "run-2")
    ingest(settings, "registry", "run-3")
    registry.upsert("registry_patient", (*patient[:3], "SITE-01", _shift(marks["registry_patient"], hours=1)))
    ingest(settings, "registry", "run-4")
    ingest(settings, "registry", "run-5")

    assert len(registry.written) == sum(rows.counts().values()) + 3
    _assert_rows_in_equal_rows_out(settings, registry)
    ledger = Lake(settings).read(ledger_table("registry"))
    assert ledger is not None and sum(ledger.column("records").to_pylist()) == len(registry.written)


def test_missing_table_names_table_and_database(
    tmp_path: Path, registry: Registry, rows: RegistryRows
) -> None:
    registry.load(rows)
    registry.drop("readmission")
    settings = _settings(tmp_path, registry)

    with pytest.raises(SourceError) as caught:
        ingest(settings, "registry", "run-1")

    message = str(caught.value)
    assert "'readmission'" in message
    assert sa.make_url(registry.url).render_as_string(hide_password=True) in message
    assert PG_PASSWORD not in message and caught.value.__cause__ is None
    assert Lake(settings).version(bronze("registry_row")) is None  # nothing half-read


def test_rerun_in_another_session_time_zone_appends_nothing(
    tmp_path: Path, pg_registry: Registry, rows: RegistryRows, monkeypatch: pytest.MonkeyPatch
) -> None:
    """timestamptz values come back in the session's time zone; payloads and watermarks are
    written in UTC so the content hash does not depend on it."""
    pg_registry.load(rows)
    settings = _settings(tmp_path, pg_registry)
    monkeypatch.setenv("PGTZ", "UTC")
    ingest(settings, "registry", "run-1")
    before = _versions(settings)

    monkeypatch.setenv("PGTZ", "America/New_York")
    report = ingest(settings, "registry", "run-2")

    assert (report.records, report.new_inputs) == (0, 0)
    assert _versions(settings) == before


def test_wrong_password_hides_it(tmp_path: Path) -> None:
    _require_postgres()
    settings = settings_for(tmp_path / "lake")
    settings.sources.registry_url = SecretStr(
        "postgresql+psycopg://postgres:wrong@127.0.0.1:5432/nonexistent_db"
    )

    with pytest.raises(SourceError) as caught:
        ingest(settings, "registry", "run-1")

    message = str(caught.value)
    assert "wrong" not in message
    assert "postgres:***@127.0.0.1:5432/nonexistent_db" in message
    assert caught.value.__cause__ is None


def test_a_run_skips_only_rows_of_runs_its_windows_reach(
    tmp_path: Path, registry: Registry, rows: RegistryRows
) -> None:
    """Rows already in bronze are skipped by (table, key, content); only the rows of runs whose
    watermark reaches a table's window (watermark less the look-back) are gathered for that."""
    registry.load(rows)
    settings = _settings(tmp_path, registry)
    ingest(settings, "registry", "run-1")
    lookback = settings.sources.registry_lookback_seconds
    original = rows.complications[0]
    stamp = _shift(_watermarks(settings)["complication"], seconds=lookback + 3600)
    registry.upsert("complication", (*original[:5], original[5] + 1, stamp))
    assert ingest(settings, "registry", "run-2").records == 1

    gathered = rows_read(Lake(settings), _watermarks(settings), lookback)
    # run-1 read every complication before the window now starts: only run-2's version is left.
    assert {(t, key) for t, key, _ in gathered if t == "complication"} == {("complication", str(original[0]))}
    others = {t: sum(1 for g in gathered if g[0] == t) for t in TABLES if t != "complication"}
    assert others == {t: n for t, n in rows.counts().items() if t != "complication"}  # unmoved watermarks

    third = ingest(settings, "registry", "run-3")
    assert (third.records, third.new_inputs) == (0, 0)
    _assert_rows_in_equal_rows_out(settings, registry)
