"""The outcomes registry, read with SQLAlchemy (SQLite embedded, PostgreSQL in production).

Incremental on each table's ``updated_at``, with a look-back: each run reads the rows with
``updated_at >= watermark - lookback`` (the watermark being the newest ``updated_at`` read so
far, kept in the ledger), so a row committed late with an older ``updated_at`` is still picked
up. Rows already read (the same table, primary key and content hash are in bronze) are skipped
and counted nowhere; a row whose content changed is a new record (a new version of that key).
A row whose ``updated_at`` is older than the look-back window when it appears is not read.

Each row read becomes one bronze record: entity = table name, record id = primary key,
payload = the row as JSON, source URI = the database URL (password hidden) + ``#table``,
offset = its primary key when that is an integer, else a stable 63-bit hash of it (the row's
place in its table, whichever read delivers it: not its ordinal in one read).

``updated_at`` may be a timestamp column (naive ones are taken as UTC) or ISO 8601 text in UTC
written as ``2024-03-04T08:12:00+00:00``: the lower bound is computed in Python and compared as
a timestamp or as text accordingly.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import sqlalchemy as sa

from patient_journey.azure import is_blob_url
from patient_journey.contracts import TableContract, silver_contract
from patient_journey.errors import ConfigurationError, SourceError
from patient_journey.journey import JourneyParts
from patient_journey.lake import Lake, bronze, ledger_table
from patient_journey.linkage import IdentityRelation, LinkSpec
from patient_journey.settings import JourneySettings
from patient_journey.sources.records import Extraction, content_hash
from patient_journey.sources.source import ExtractJob, Source
from patient_journey.staging import JsonText, StagedTable, Versions, declared, json_fields, timestamp
from patient_journey.storage import Storage


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
URL_SETTING = "JOURNEY_SOURCES__REGISTRY_URL"

# (entity, record_id, content_hash) of registry rows already in bronze.
ReadRows = Collection[tuple[str, str, str]]


def redacted(url: str) -> str:
    """The URL with its password hidden; a URL that does not parse is never echoed."""
    try:
        return sa.make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        raise ConfigurationError(
            f"{URL_SETTING} is not a SQLAlchemy database URL (e.g. sqlite:///path/registry.sqlite "
            "or postgresql+psycopg://user@host:5432/db)."
        ) from None


def _engine(url: str, safe_url: str) -> sa.Engine:
    try:
        return sa.create_engine(url)
    except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError, ImportError) as exc:
        raise ConfigurationError(
            f"Cannot open the registry at {safe_url} ({URL_SETTING}): {type(exc).__name__}; "
            "check the dialect and that its driver is installed."
        ) from None


def check(url: str) -> None:
    """Fail with a clear, masked message unless the registry answers: a URL that does not parse,
    a driver that is missing, a SQLite file that does not exist (it is not created), a server
    that refuses the connection."""
    safe_url = redacted(url)
    parsed = sa.make_url(url)
    database = parsed.database
    if (
        parsed.get_backend_name() == "sqlite"
        and database
        and database != ":memory:"
        and not Path(database).is_file()
    ):
        raise ConfigurationError(
            f"The registry at {safe_url} does not exist: no such SQLite file ({URL_SETTING})."
        )
    engine = _engine(url, safe_url)
    try:
        with engine.connect():
            pass
    except sa.exc.DBAPIError as exc:
        reason = _connect_reason(exc, str(parsed.password) if parsed.password else None)
        raise ConfigurationError(
            f"Cannot connect to the registry at {safe_url} ({URL_SETTING}): {reason}"
        ) from None
    finally:
        engine.dispose()


def extract(
    url: str,
    watermarks: dict[str, str],
    run_id: str,
    lookback_seconds: int = 0,
    already_read: ReadRows = frozenset(),
) -> Extraction:
    """Read the rows changed since each table's watermark (less ``lookback_seconds``) that are
    not in ``already_read``."""
    out = Extraction(SOURCE, run_id)
    safe_url = redacted(url)
    password = sa.make_url(url).password
    engine = _engine(url, safe_url)
    try:
        try:
            connection = engine.connect()
        except sa.exc.DBAPIError as exc:
            reason = _connect_reason(exc, str(password) if password else None)
            raise SourceError(f"Cannot connect to the registry at {safe_url}: {reason}") from None
        with connection:
            metadata = sa.MetaData()
            for spec in TABLES:
                table = _reflect(connection, metadata, spec, safe_url)
                try:
                    _read_table(
                        out, connection, table, spec, safe_url, watermarks, lookback_seconds, already_read
                    )
                except sa.exc.DBAPIError as exc:
                    raise SourceError(
                        f"Reading table {spec.name!r} of the registry at {safe_url} failed: {_reason(exc)}."
                    ) from None
    finally:
        engine.dispose()
    return out


def _reflect(
    connection: sa.Connection, metadata: sa.MetaData, spec: RegistryTable, safe_url: str
) -> sa.Table:
    expected = ", ".join(t.name for t in TABLES)
    try:
        table = sa.Table(spec.name, metadata, autoload_with=connection)
    except sa.exc.NoSuchTableError:
        raise SourceError(
            f"The registry at {safe_url} has no table {spec.name!r}; expected tables: {expected}."
        ) from None
    except sa.exc.DBAPIError as exc:
        raise SourceError(
            f"Cannot read the definition of table {spec.name!r} of the registry at {safe_url}: {_reason(exc)}."
        ) from None
    missing = [c for c in (spec.primary_key, spec.updated_at) if c not in table.c]
    if missing:
        raise SourceError(
            f"Table {spec.name!r} of the registry at {safe_url} has no column(s) {', '.join(missing)}."
        )
    return table


def row_position(key: object) -> int:
    """A registry row's lineage position: its primary key when that is an int64, else the first
    63 bits of the key's SHA-256 (the same row keeps its position in every read)."""
    if isinstance(key, int) and not isinstance(key, bool) and 0 <= key < 2**63:
        return key
    return int.from_bytes(hashlib.sha256(str(key).encode()).digest()[:8], "big") >> 1


def _read_table(
    out: Extraction,
    connection: sa.Connection,
    table: sa.Table,
    spec: RegistryTable,
    safe_url: str,
    watermarks: dict[str, str],
    lookback_seconds: int,
    already_read: ReadRows,
) -> None:
    stamp_column = table.c[spec.updated_at]
    query = sa.select(table).order_by(stamp_column, table.c[spec.primary_key])
    since = watermarks.get(spec.name)
    since_instant = None
    if since is not None:
        since_instant = instant(since)
        if since_instant is None:
            raise SourceError(
                f"The ledger's watermark of registry table {spec.name!r} is not an ISO 8601 timestamp; "
                "forget the registry's inputs to read the table again."
            )
        lower = since_instant - timedelta(seconds=lookback_seconds)
        query = query.where(stamp_column >= _bound(lower, stamp_column.type))
    uri = f"{safe_url}#{spec.name}"  # table_of() reads the table back
    count = 0
    newest = since_instant
    for row in connection.execute(query).mappings():
        values = {str(key): _plain(value) for key, value in row.items()}
        updated = instant(row[spec.updated_at])
        if updated is not None and (newest is None or updated > newest):
            newest = updated
        raw = orjson.dumps(values)
        record_id = str(values[spec.primary_key])
        if (spec.name, record_id, content_hash(raw)) in already_read:
            continue
        count += 1
        out.add_record(spec.name, record_id, raw.decode(), uri, row_position(values[spec.primary_key]), raw)
    # A ledger entry when rows were read or the watermark moved (e.g. bronze was written but the
    # ledger was not, in a run that crashed between the two); none when nothing changed.
    if count or (newest is not None and newest != since_instant):
        watermark = _iso(newest) if newest is not None else since
        out.add_input(uri, watermark or "", count, "", count, 0, watermark=watermark)


def _bound(lower: datetime, column_type: sa.types.TypeEngine[object]) -> object:
    """The lower bound as the column compares: a datetime for timestamp columns (naive for
    columns without time zone, taken as UTC), ISO 8601 UTC text otherwise."""
    if isinstance(column_type, sa.DateTime):
        return lower if column_type.timezone else lower.astimezone(UTC).replace(tzinfo=None)
    return _iso(lower)


def table_of(uri: str) -> str:
    """The registry table a ledger entry's URI (``<database>#<table>``) names."""
    return uri.rsplit("#", 1)[-1]


def instant(value: object) -> datetime | None:
    """An ``updated_at`` value as an aware UTC datetime (naive ones taken as UTC), else None."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.strip())
        except ValueError:
            return None
    if not isinstance(value, datetime):
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _iso(instant: datetime) -> str:
    """ISO 8601 in UTC with a +00:00 offset, as the registry's text timestamps are written."""
    return instant.astimezone(UTC).isoformat()


def _plain(value: object) -> object:
    """A column value as JSON: timestamps as ISO 8601 (aware ones in UTC, so the content hash
    does not depend on the session's time zone), dates as YYYY-MM-DD, others as text."""
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, datetime):
        return _iso(value) if value.tzinfo is not None else value.isoformat()
    if isinstance(value, date):
        return value.isoformat()
    return str(value)


def _reason(exc: sa.exc.DBAPIError) -> str:
    """The driver's error class and SQLSTATE, never its message (which can quote row values)."""
    orig = exc.orig
    code = getattr(orig, "sqlstate", None) or getattr(orig, "sqlite_errorname", None)
    name = type(orig).__name__ if orig is not None else type(exc).__name__
    return f"{name} ({code})" if code else name


def _connect_reason(exc: sa.exc.DBAPIError, password: str | None) -> str:
    """Why a connection failed: the driver's message (server unreachable, database missing,
    authentication failed; no data is involved yet) on one line, with any password masked."""
    message = str(exc.orig) if exc.orig is not None else ""
    detail = " ".join(line.strip() for line in message.splitlines() if line.strip())
    if password:
        detail = detail.replace(password, "***")
    return f"{_reason(exc)}: {detail}" if detail else f"{_reason(exc)}."


def registry_url(settings: JourneySettings) -> str | None:
    if settings.sources.registry_url is not None:
        return settings.sources.registry_url.get_secret_value()
    if is_blob_url(settings.storage.landing_url):
        return None
    landing = Storage(settings.storage.landing_url)
    if landing.exists("outcomes", "registry.sqlite"):
        return f"sqlite:///{landing.url('outcomes', 'registry.sqlite')}"
    return None


def rows_read(lake: Lake, watermarks: dict[str, str], lookback_seconds: int) -> set[tuple[str, str, str]]:
    """(table, primary key, content hash) of the registry rows in bronze that this run's queries
    can select again, so that the adapter skips them.

    A table is read from its watermark less the lookback. A row updated since then was read by
    a run whose watermark for that table (the newest update it saw) is at least as late, so only
    the bronze rows of those runs are kept (one set of every row ever read grew with each run).
    All of a table's rows when it has no watermark (a first or forced read), and every row of a
    run that has no ledger entry."""
    rows = lake.read(bronze(BRONZE_TABLE), columns=["entity", "record_id", "content_hash", "run_id"])
    if rows is None:
        return set()
    ledger = lake.read(ledger_table(SOURCE), columns=["uri", "run_id", "watermark"])
    entries = ledger.filter(pc.is_valid(ledger.column("watermark"))).to_pylist() if ledger is not None else []
    # (table, run, watermark) of every ledger entry; rows of a run with none (it crashed between
    # its bronze and its ledger writes) are kept.
    marks = [(table_of(e["uri"]), e["run_id"], instant(e["watermark"])) for e in entries]
    keep = pc.invert(
        pc.is_in(rows.column("run_id"), value_set=pa.array(sorted({run for _, run, _ in marks}), pa.string()))
    )
    for table in rows.column("entity").unique().to_pylist():
        of_table = pc.equal(rows.column("entity"), table)
        since = instant(watermarks.get(table))
        if since is not None:
            lower = since - timedelta(seconds=lookback_seconds)
            # an unreadable watermark counts as reaching the window: its rows are kept
            runs = sorted(
                {run for name, run, mark in marks if name == table and (mark is None or mark >= lower)}
            )
            of_table = pc.and_(
                of_table, pc.is_in(rows.column("run_id"), value_set=pa.array(runs, pa.string()))
            )
        keep = pc.or_(keep, of_table)
    kept = rows.filter(keep)
    columns = (kept.column(name).to_pylist() for name in ("entity", "record_id", "content_hash"))
    return set(zip(*columns, strict=True))


BRONZE_TABLE = "registry_row"


# --------------------------------------------------------------------------- staged tables and links


def registry_versions(at: JsonText) -> Versions:
    """A registry row's version is its updated_at."""
    return {"version": timestamp(at, "updated_at")}


STAGED: tuple[StagedTable, ...] = (
    declared(
        lambda at: StagedTable(
            "registry_patient",
            "registry_row",
            "registry_patient",
            f"""record_id AS registry_id, {at("$.mrn")} AS mrn,
           try_cast({at("$.birth_date")} AS DATE) AS birth_date, {at("$.site")} AS site,
           try_cast({at("$.updated_at")} AS TIMESTAMPTZ) AS updated_at""",
            **registry_versions(at),
            fields=json_fields("mrn:scalar", "birth_date:string", "site:scalar", "updated_at:string"),
        )
    ),
    declared(
        lambda at: StagedTable(
            "prom_response",
            "registry_row",
            "prom_response",
            f"""record_id AS response_id, {at("$.registry_id")} AS registry_id,
           lower(replace(trim({at("$.instrument")}), ' ', '_')) AS instrument,
           {at("$.timepoint")} AS timepoint,
           try_cast({at("$.score")} AS DOUBLE) AS score,
           try_cast({at("$.collected_on")} AS DATE) AS collected_on""",
            **registry_versions(at),
            fields=json_fields(
                "registry_id:scalar",
                "instrument:string",
                "timepoint:string",
                "score:number",
                "collected_on:string",
                "updated_at:string",
            ),
        )
    ),
    declared(
        lambda at: StagedTable(
            "complication",
            "registry_row",
            "complication",
            f"""record_id AS complication_id, {at("$.registry_id")} AS registry_id,
           try_cast({at("$.occurred_on")} AS DATE) AS occurred_on, {at("$.description")} AS description,
           {at("$.code")} AS code, try_cast({at("$.clavien_dindo_grade")} AS INTEGER) AS grade""",
            **registry_versions(at),
            fields=json_fields(
                "registry_id:scalar",
                "occurred_on:string",
                "code:scalar",
                "clavien_dindo_grade:number",
                "updated_at:string",
            ),
        )
    ),
    declared(
        lambda at: StagedTable(
            "readmission",
            "registry_row",
            "readmission",
            f"""record_id AS readmission_id, {at("$.registry_id")} AS registry_id,
           try_cast({at("$.admitted_on")} AS DATE) AS admitted_on,
           try_cast({at("$.discharged_on")} AS DATE) AS discharged_on, {at("$.reason")} AS reason""",
            **registry_versions(at),
            fields=json_fields(
                "registry_id:scalar", "admitted_on:string", "discharged_on:string", "updated_at:string"
            ),
        )
    ),
)

LINKS: tuple[LinkSpec, ...] = (
    LinkSpec(
        "registry_patient",
        None,
        "registry",
        "registry_id",
        "s LEFT JOIN registry_link k USING (registry_id)",
        "mrn_and_birth_date_link_to_patient",
        "k.patient_key",
    ),
    LinkSpec(
        "prom_response",
        "prom_score",
        "registry",
        "response_id",
        "s LEFT JOIN registry_link k USING (registry_id)",
        "registry_id_links_to_patient",
        "k.patient_key, s.instrument, s.timepoint, s.score, s.collected_on, 'registry' AS prom_source",
    ),
    LinkSpec(
        "complication",
        "complication",
        "registry",
        "complication_id",
        "s LEFT JOIN registry_link k USING (registry_id)",
        "registry_id_links_to_patient",
        "k.patient_key, s.occurred_on, s.code, s.grade",  # the description is free text: restricted
    ),
    LinkSpec(
        "readmission",
        "readmission",
        "registry",
        "readmission_id",
        "s LEFT JOIN registry_link k USING (registry_id)",
        "registry_id_links_to_patient",
        "k.patient_key, s.admitted_on, s.discharged_on",  # the reason is free text: restricted
    ),
)

IDENTITY = (
    IdentityRelation(
        "registry_link",
        """SELECT DISTINCT r.registry_id, k.patient_key
        FROM staged_registry_patient r JOIN ehr_patient k ON k.mrn = r.mrn AND k.birth_date = r.birth_date""",
        "SELECT 'registry-patient', registry_id, patient_key FROM registry_link",
    ),
)


# The silver tables it feeds, each declared once (patient_journey.contracts).
SILVER: tuple[TableContract, ...] = (
    silver_contract(
        "complication",
        "one row per registry complication (its description, free text, stays restricted)",
        (),
        """
patient_key string  the patient
occurred_on date  when it occurred
code string  SNOMED CT code (catalog/complications.csv)
grade int32  Clavien-Dindo grade
""",
    ),
    silver_contract(
        "readmission",
        "one row per registry readmission (its reason, free text, stays restricted)",
        (),
        """
patient_key string  the patient
admitted_on date  admission date
discharged_on date  discharge date
""",
    ),
)

# What the registry adds to the gold journey: its complications (with their Clavien-Dindo grade)
# and readmissions, as events and as the episode's complications and readmissions.
JOURNEY = JourneyParts(
    events=(
        "SELECT patient_key, CAST(occurred_on AS TIMESTAMPTZ), 'registry', 'complication', code, "
        "'clavien-dindo', grade, 'grade', input_key, source_offset FROM complication",
        "SELECT patient_key, CAST(admitted_on AS TIMESTAMPTZ), 'registry', 'readmission', NULL, NULL, NULL, "
        "NULL, input_key, source_offset FROM readmission",
    ),
    admissions=("SELECT patient_key, admitted_on, NULL FROM readmission",),
    complications=("SELECT patient_key, code, occurred_on, grade FROM complication",),
)


class RegistrySource(Source):
    """The outcomes registry, read with SQLAlchemy in one batch on a watermark per table."""

    staged = STAGED
    silver = SILVER
    journey = JOURNEY
    kind = "outcome"
    links = LINKS
    identity = IDENTITY
    name = SOURCE
    bronze_table = BRONZE_TABLE
    reads_bronze = True  # rows already in bronze are skipped

    def extract(self, job: ExtractJob) -> Extraction | str:
        url = registry_url(job.settings)
        if url is None:
            return "no registry configured (JOURNEY_SOURCES__REGISTRY_URL)"
        lookback = job.settings.sources.registry_lookback_seconds
        return extract(
            url, job.watermarks, job.run_id, lookback, rows_read(job.lake, job.watermarks, lookback)
        )

    def check(self, settings: JourneySettings, landing: Storage) -> None:
        """A configured registry must answer; without one (and no SQLite file landed), it is skipped."""
        url = registry_url(settings)
        if url is not None:
            check(url)

    def forget_bounds(self, settings: JourneySettings, landing: Storage, prefix: str) -> tuple[str, str]:
        return "", f"#{prefix}" if prefix else ""  # a table's entries (URI ``<database>#<table>``), or all
