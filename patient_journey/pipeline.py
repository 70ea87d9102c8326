"""The pipeline's steps as plain functions; the Prefect flow in ``flows/`` calls them in order.

    preflight -> ingest(source) for each source -> build_silver -> build_gold

Each step reads its inputs from and writes its outputs to the lake, and returns a small report,
so steps can run in separate processes (or on a Dask cluster) and be re-run alone.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeAlias

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from patient_journey.contracts import BUCKET
from patient_journey.engine import use_spill_folder
from patient_journey.errors import ConfigurationError
from patient_journey.flattened import Refreshed, flattened, refresh
from patient_journey.identity import KeyMaker
from patient_journey.increments import (
    PASSED,
    POSITION_SCHEMA,
    Batch,
    BuildMark,
    FlattenedParts,
    at_positions,
    changed_batch,
    declaration,
    from_latest_read,
    identity_change,
    positions_of,
    replace_positions,
    store_batch,
    stored_passed,
    whole_batch,
    without,
)
from patient_journey.journey import DEVICE_CLOCK_COLUMNS, build_journey, device_clock
from patient_journey.lake import (
    Lake,
    TableRef,
    bronze,
    extraction_rejects_table,
    gold,
    ledger_table,
    quarantine,
    restricted,
    silver,
    staged,
)
from patient_journey.linkage import HELD_SCHEMA, INPUT_KEY_LENGTH, Linker, identity_inputs
from patient_journey.prom import redcap_forms_not_loaded
from patient_journey.quality import (
    QUARANTINE_SCHEMA,
    ExpectationOutcome,
    GateResult,
    QualityGate,
    merge_outcomes,
    quarantine_rows,
)
from patient_journey.settings import JourneySettings
from patient_journey.sources import registry
from patient_journey.sources.plugins import (
    IDENTITY,
    JOURNEY_PARTS,
    LINKS,
    PLUGINS,
    STAGED_TABLES,
    source_named,
)
from patient_journey.sources.records import (
    BRONZE_SCHEMA,
    FORGOTTEN,
    LEDGER_KEYS,
    LEDGER_SCHEMA,
    REJECT_SCHEMA,
    Extraction,
    InputSelection,
    candidate_files,
)
from patient_journey.sources.source import ExtractJob, unknown_source_settings
from patient_journey.staging import FIELD_ERROR, SUPERSEDED
from patient_journey.storage import FileInfo, Storage, check_zones, listed_files

SOURCES = tuple(PLUGINS)
BRONZE_TABLES = {name: source.bronze_table for name, source in PLUGINS.items()}
GOLD_TABLES = ("surgical_episode", "journey_event", "device_clock")
PREFLIGHT_PREFIX = "_preflight"  # in the restricted zone: fingerprints of suite sets that built
SPILL_PREFIX = "_ingest"  # in the restricted zone: batches read, not yet committed (extract_batch)
BRONZE_APPEND_BYTES = 256 * 2**20  # put-aside bronze rows per Delta append, at most (commit_ingest)
ArrowRows: TypeAlias = pa.Table | pa.RecordBatchReader


BUILDS = restricted("ledger", "build")
QUARANTINE = quarantine("record")
HELD = restricted("held", "record")
CROSSWALK = restricted("identity", "crosswalk")
# The rows the gate quarantined, kept from build to build and replaced by staged table and input:
# QUARANTINE is these, the rejects at read and the gold tables' quarantined rows.
GATED_QUARANTINE = quarantine("gated")
# The gold tables' quarantined rows, with the patient each is of (``_key``), kept from build to build.
GOLD_QUARANTINE = quarantine("gold")
# Patients whose silver rows changed since the last gold build (``_gold_pending``).
GOLD_PENDING = restricted("ledger", "gold_pending")
FILE_SOURCES = tuple(name for name, source in PLUGINS.items() if source.lists_files)
# Entities read by an adapter -> the staged table they belong to.
ENTITY_TABLE = {spec.entity: spec.name for spec in STAGED_TABLES}


@dataclass
class IngestReport:
    source: str
    new_inputs: int = 0
    pending_inputs: int = 0
    changed_inputs: int = 0
    blank_rows: int = 0  # rows of a tabular input with nothing to load (REDCap)
    records: int = 0
    rejects: int = 0
    skipped: str | None = None
    seconds: float = 0.0  # wall time, from the first batch's start to the commit's end
    bronze_version: int | None = None
    started: float = 0.0  # epoch seconds
    # A batch read by extract_batch: its rows put aside until commit_ingest appends them.
    spilled: tuple[str, ...] = ()
    run_id: str = ""  # the run that read it

    @classmethod
    def combine(cls, source: str, parts: list[IngestReport], pending_inputs: int = 0) -> IngestReport:
        """One source's report from the reports of its batches (and the inputs its plan left)."""
        combined = cls(source, pending_inputs=pending_inputs)
        skipped = [p.skipped for p in parts if p.skipped]
        combined.skipped = skipped[0] if skipped and len(skipped) == len(parts) else None
        for part in parts:
            combined.new_inputs += part.new_inputs
            combined.pending_inputs += part.pending_inputs
            combined.blank_rows += part.blank_rows
            combined.changed_inputs += part.changed_inputs
            combined.records += part.records
            combined.rejects += part.rejects
            if part.bronze_version is not None:
                combined.bronze_version = max(combined.bronze_version or 0, part.bronze_version)
        return combined


@dataclass
class TableCounts:
    table: str
    read: int = 0
    loaded: int = 0
    quarantined: int = 0
    held: int = 0
    superseded: int = 0  # replaced by a later version, deleted, or the same record delivered again
    cells_rejected: int = 0  # REDCap cells rejected in rows that loaded: beside the rows, not among them

    @property
    def balanced(self) -> bool:
        return self.read == self.loaded + self.quarantined + self.held + self.superseded


@dataclass
class BuildReport:
    built: bool
    reason: str = ""
    tables: list[TableCounts] = field(default_factory=list)
    expectations: list[dict[str, object]] = field(default_factory=list)
    bronze_only: dict[str, int] = field(default_factory=dict)
    versions: dict[str, int] = field(default_factory=dict)
    device_clocks: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    # Wall seconds per step, in order (silver: stage, validate, link, load; gold: read, build,
    # validate, load), for the run summary and the benchmark (bench/).
    stage_seconds: dict[str, float] = field(default_factory=dict)
    # Staged tables whose flattened rows this build extended: "since" (bronze rows committed since
    # the last build) or "whole" (all of bronze; see patient_journey.flattened).
    flattened: dict[str, str] = field(default_factory=dict)
    # Staged tables and what this build made again of them: the number of positions (input and
    # line or message) whose records were resolved, checked and linked again, or "whole"
    # (patient_journey.increments).
    replaced: dict[str, int | str] = field(default_factory=dict)
    # Gold: the patients whose episodes and events this build made again ("all", or how many).
    patients: int | str = ""

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


class StepClock:
    """Contiguous wall-clock steps: each ``lap`` ends one step (adding to its total) and starts the next."""

    def __init__(self) -> None:
        self._last = time.perf_counter()
        self._seconds: dict[str, float] = {}

    def lap(self, step: str) -> None:
        now = time.perf_counter()
        self._seconds[step] = self._seconds.get(step, 0.0) + now - self._last
        self._last = now

    @property
    def seconds(self) -> dict[str, float]:
        return {step: round(value, 3) for step, value in self._seconds.items()}


def preflight(settings: JourneySettings) -> int:
    """Fail before any load: a missing key, a missing or broken suite, a storage zone that cannot
    be listed (landing: it must exist) or written (the others), a source that cannot be read (a
    file source with nothing under its prefix, a registry that does not answer). Returns the
    number of expectations."""
    settings.patient_hmac_key()
    unknown = unknown_source_settings(
        settings, [p.options for p in PLUGINS.values() if p.options is not None]
    )
    if unknown:
        raise ConfigurationError(f"Unknown source settings: {', '.join(unknown)}. No source declares them.")
    gate = QualityGate(settings.quality.expectations_dir)
    for plugin in PLUGINS.values():  # a source's own configuration and suites (device templates)
        plugin.require_suites(settings, gate)
    check_zones(settings)
    landing = Lake(settings).storage(settings.storage.landing_url)
    for plugin in PLUGINS.values():  # each source can be read: its prefix, its database
        plugin.check(settings, landing)
    gate.require("staged", [t.name for t in STAGED_TABLES])
    gate.require("gold", list(GOLD_TABLES))
    # Building the suites in GX costs its import (about 3 s), the biggest part of a run with
    # nothing new: suites that built before, unchanged, under the same GX version, are not built
    # again (a marker in the restricted zone holds their expectation count).
    store = Lake(settings).storage(settings.storage.restricted_url)
    marker = f"{PREFLIGHT_PREFIX}/suites-{gate.fingerprint()}.json"
    if store.exists(marker):
        return int(orjson.loads(store.read_bytes(store.url(marker)))["expectations"])
    count = gate.check_all_parse()
    store.write_bytes(marker, orjson.dumps({"expectations": count}))
    for earlier in store.list_files(PREFLIGHT_PREFIX):  # markers of suite sets no longer in use
        if earlier.url != store.url(marker):
            store.delete(store.relative(earlier.url))
    return count


def _seen(
    lake: Lake, landing: Storage, settings: JourneySettings, source: str, everything: bool = False
) -> tuple[InputSelection, dict[str, str]]:
    """The source's ledger as inputs already processed, with the inputs a file source lists this
    run (all of them with ``everything``), and a database source's watermark per table."""
    ledger = lake.read(ledger_table(source), columns=[*LEDGER_KEYS, "watermark", "processed_at"])
    settle_seconds = settings.sources.settle_seconds
    settle_before = datetime.now(UTC) - timedelta(seconds=settle_seconds) if settle_seconds else None
    own = PLUGINS[source].prefix(settings)
    others = tuple(
        landing.url(prefix) + "/"
        for other in FILE_SOURCES
        if other != source and (prefix := PLUGINS[other].prefix(settings)).startswith(own)
    )
    seen = InputSelection.from_ledger(ledger, settle_before, others)
    if PLUGINS[source].lists_files:
        seen = replace(seen, listed=PLUGINS[source].list_inputs(settings, landing, ledger, everything))
    watermarks: dict[str, str] = {}
    if ledger is not None:
        marked = ledger.filter(pc.is_valid(ledger.column("watermark")))  # the registry's tables
        for uri, mark in zip(
            marked.column("uri").to_pylist(), marked.column("watermark").to_pylist(), strict=True
        ):
            table = registry.table_of(uri)
            watermarks[table] = max(watermarks.get(table, mark), mark)
    return seen, watermarks


Window = tuple[datetime, datetime]  # [start, end), timezone-aware


@dataclass(frozen=True, eq=False)
class IngestBatch:
    """One unit of ingestion work: a batch of a file source's new inputs, or the registry as a
    whole (no files). Each batch writes its own bronze, rejects and ledger rows.

    What the plan listed and what the ledger knew of these inputs travel with the batch, so that
    a batch neither lists the source nor reads its ledger again (both grow with the source). They
    are an Arrow table and frozensets on purpose: Prefect walks every task parameter through
    lists, tuples, dicts and dataclasses looking for futures, in the flow and again in the worker
    (a tuple of 5,000 FileInfo objects took 0.14 s of the worker's CPU per batch), and it treats
    these as leaves."""

    source: str
    number: int
    of: int
    listing: pa.Table | None = None  # LISTING_SCHEMA: the batch's files in listing order
    ledger_versions: frozenset[tuple[str, str]] = frozenset()  # (uri, version)
    ledger_hashes: frozenset[tuple[str, str]] = frozenset()  # (uri, content hash)

    @property
    def files(self) -> tuple[FileInfo, ...]:
        return () if self.listing is None else tuple(listed_files(self.listing))

    @property
    def file_count(self) -> int:
        return 0 if self.listing is None else self.listing.num_rows

    def selection(self) -> InputSelection:
        return InputSelection(versions=self.ledger_versions, hashes=self.ledger_hashes, listed=self.listing)

    @property
    def inputs(self) -> tuple[str, ...]:
        return () if self.listing is None else tuple(self.listing.column("url").to_pylist())

    @property
    def label(self) -> str:
        """The batch for task names and logs: its source, number and size, never a file name (a
        landing path can carry a patient's name or MRN)."""
        if not self.file_count:
            return self.source
        files = "1 file" if self.file_count == 1 else f"{self.file_count:,} files"
        return f"{self.source} {self.number}/{self.of}: {files}"


@dataclass(frozen=True)
class IngestPlan:
    """What one source's ingestion will read: its batches, and inputs left for a later run."""

    source: str
    batches: tuple[IngestBatch, ...]
    pending_inputs: int = 0

    @property
    def inputs(self) -> int:
        return sum(b.file_count for b in self.batches)


def _selection(
    lake: Lake, landing: Storage, settings: JourneySettings, source: str, window: Window | None, reread: bool
) -> tuple[InputSelection, dict[str, str]]:
    """The source's ledger selection, narrowed to a backfill window and/or ignoring the ledger."""
    seen, watermarks = _seen(lake, landing, settings, source, everything=reread or window is not None)
    if reread:
        seen = InputSelection(
            settle_before=seen.settle_before, other_sources=seen.other_sources, listed=seen.listed
        )
        watermarks = {}
    if window is not None:
        seen = replace(seen, window=window)
        start = window[0].isoformat()
        for table, mark in list(watermarks.items()):
            try:
                if datetime.fromisoformat(mark) > window[0]:
                    watermarks[table] = start
            except (TypeError, ValueError):
                continue  # the registry adapter reports an unreadable watermark itself
    return seen, watermarks


def plan_ingest(
    settings: JourneySettings,
    source: str,
    batch_files: int,
    window: Window | None = None,
    reread: bool = False,
    batch_bytes: int | None = None,
) -> IngestPlan:
    """Split a source's new inputs into batches of at most ``batch_files`` files and
    ``batch_bytes`` bytes (listed sizes; a larger file is a batch of its own), by listing alone
    (nothing is read). The registry is one batch. With ``window``, only inputs modified in it
    (registry: rows updated since its start); with ``reread``, inputs already in the ledger too
    (staging collapses records read twice, so nothing loads twice)."""
    plugin = source_named(source)
    if not plugin.lists_files:  # a database: one batch, on its watermarks
        return IngestPlan(source, (IngestBatch(source, 1, 1),))
    lake = Lake(settings)
    landing = lake.storage(settings.storage.landing_url)
    seen, _ = _selection(lake, landing, settings, source, window, reread)
    listing, pending = candidate_files(landing, plugin.prefix(settings), plugin.suffixes, seen)
    chunks = list(_chunks(listing.column("size").to_pylist(), batch_files, batch_bytes))
    known = seen.narrowed(listing)  # the ledger facts of these files alone: the ledger is large
    versions, hashes = _by_uri(known.versions), _by_uri(known.hashes)
    batches = []
    for number, (start, count) in enumerate(chunks, start=1):
        # Taken, not sliced: a slice would pickle the whole listing's buffers with each batch.
        rows = listing.take(np.arange(start, start + count))
        urls = rows.column("url").to_pylist()
        batches.append(
            IngestBatch(
                source,
                number,
                len(chunks),
                rows,
                frozenset(v for url in urls for v in versions.get(url, ())),
                frozenset(h for url in urls for h in hashes.get(url, ())),
            )
        )
    return IngestPlan(source, tuple(batches), pending)


def _chunks(sizes: list[int], most_files: int, most_bytes: int | None) -> Iterator[tuple[int, int]]:
    """(start, count) of consecutive runs of files of these sizes, each within both bounds (or
    one file above the byte bound)."""
    start, count, total = 0, 0, 0
    for size in sizes:
        if count and (count >= most_files or (most_bytes is not None and total + size > most_bytes)):
            yield start, count
            start, count, total = start + count, 0, 0
        count += 1
        total += size
    if count:
        yield start, count


def _by_uri(pairs: frozenset[tuple[str, str]]) -> dict[str, list[tuple[str, str]]]:
    """Ledger facts ((uri, version) or (uri, content hash)) grouped by URI."""
    grouped: dict[str, list[tuple[str, str]]] = {}
    for pair in pairs:
        grouped.setdefault(pair[0], []).append(pair)
    return grouped


def _read_inputs(
    settings: JourneySettings,
    source: str,
    run_id: str,
    batch: IngestBatch | None,
    window: Window | None,
    reread: bool,
    out: Extraction | None = None,
) -> tuple[IngestReport, Extraction | None]:
    """Read one source's new inputs (or one planned batch of them): into memory, or into ``out``
    (whose sink takes the bronze rows as they are read)."""
    plugin = source_named(source)
    lake = Lake(settings)
    landing = lake.storage(settings.storage.landing_url)
    watermarks: dict[str, str] = {}
    if batch is not None and batch.listing is not None:
        seen = batch.selection()
    else:
        seen, watermarks = _selection(lake, landing, settings, source, window, reread)
    if plugin.reads_bronze:
        # Rows a crashed commit left are removed before the rows read are compared with bronze
        # (which would take them for read), so that they are read again.
        _remove_uncommitted(lake, source)
    extraction = plugin.extract(ExtractJob(settings, lake, landing, seen, run_id, watermarks, out))
    if isinstance(extraction, str):
        return IngestReport(source, skipped=extraction), None
    report = IngestReport(
        source,
        new_inputs=extraction.input_count,
        records=extraction.record_count,
        rejects=extraction.reject_count,
        pending_inputs=extraction.pending_inputs,
        blank_rows=extraction.blank_rows,
        changed_inputs=extraction.changed_inputs,
    )
    return report, extraction


def _append_ingested(
    lake: Lake, report: IngestReport, records: list[ArrowRows], rejects: ArrowRows, ledger: ArrowRows
) -> None:
    """Append what a source read: bronze, then rejects, then the ledger, whose entries are the
    commit point. A crash before the ledger write leaves bronze or reject rows of a run the ledger
    does not name; they are removed here before anything is appended, so the inputs that the next
    run reads again land in bronze exactly once."""
    _remove_uncommitted(lake, report.source)
    if report.records:
        for part in records:
            report.bronze_version = lake.append(bronze(BRONZE_TABLES[report.source]), part)
    if report.rejects:
        lake.append(extraction_rejects_table(report.source), rejects)
    if report.new_inputs:
        lake.append(ledger_table(report.source), ledger)


def _remove_uncommitted(lake: Lake, source: str) -> None:
    """Delete the bronze and reject rows of a source's runs that have no ledger entry (a commit
    that crashed before its ledger write). Their inputs are not in the ledger, so they are read
    again. The caller holds the source's ingest limit: no other commit of it is under way."""
    ledger = lake.read(ledger_table(source), columns=["run_id"])
    committed = set() if ledger is None else set(pc.unique(ledger.column("run_id")).to_pylist())
    for ref in (bronze(BRONZE_TABLES[source]), extraction_rejects_table(source)):
        rows = lake.read(ref, columns=["run_id"])
        if rows is None:
            continue
        orphans = set(pc.unique(rows.column("run_id")).drop_null().to_pylist()) - committed
        if orphans:
            lake.delete_keys(ref, "run_id", orphans)


def ingest(
    settings: JourneySettings,
    source: str,
    run_id: str,
    batch: IngestBatch | None = None,
    window: Window | None = None,
    reread: bool = False,
) -> IngestReport:
    """Read new inputs of one source (or one planned batch) into bronze, in one step.

    ``window`` and ``reread`` as in ``plan_ingest``. The flows read a source's batches in
    parallel with ``extract_batch`` and append them together with ``commit_ingest``."""
    started = time.time()
    report, extraction = _read_inputs(settings, source, run_id, batch, window, reread)
    if extraction is not None:
        _append_ingested(
            Lake(settings), report, [extraction.records()], extraction.rejects(), extraction.ledger()
        )
    report.started = started
    report.seconds = round(time.time() - started, 3)
    return report


def extract_batch(
    settings: JourneySettings,
    batch: IngestBatch,
    run_id: str,
    window: Window | None = None,
    reread: bool = False,
) -> IngestReport:
    """Read one planned batch and put its rows aside for ``commit_ingest``: Arrow IPC files in
    the restricted zone (``_ingest/<source>/<run id>/``; they hold record content). Batches of
    a source read in parallel (threads, processes or a Dask cluster) and write no Delta table,
    so none waits for another; the report carries the files' URLs."""
    started = time.time()
    store = Lake(settings).storage(settings.storage.restricted_url)
    folder = f"{SPILL_PREFIX}/{batch.source}/{run_id}/{batch.number:06d}"
    parts = 0

    def sink(table: pa.Table) -> str:  # bronze rows as they are read, in parts
        nonlocal parts
        parts += 1
        path = f"{folder}-{parts:04d}-bronze.arrow"
        store.write_bytes(path, _ipc_bytes(table))
        return store.url(path)

    out = Extraction(batch.source, run_id, sink=sink, discard=lambda url: store.delete(store.relative(url)))
    report, extraction = _read_inputs(settings, batch.source, run_id, batch, window, reread, out)
    if extraction is not None:
        extraction.flush()
        spilled = [url for url, _ in extraction.parts]
        for kind, table in (
            ("bronze", extraction.records()),
            ("rejects", extraction.rejects()),
            ("ledger", extraction.ledger()),
        ):
            if table.num_rows:
                path = f"{folder}-{kind}.arrow"
                store.write_bytes(path, _ipc_bytes(table))
                spilled.append(store.url(path))
        report.spilled = tuple(spilled)
    report.run_id = run_id
    report.started = started
    report.seconds = round(time.time() - started, 3)
    return report


def commit_ingest(
    settings: JourneySettings, source: str, parts: list[IngestReport], pending_inputs: int = 0
) -> IngestReport:
    """Append every batch that ``extract_batch`` put aside for one source: bronze (in appends of
    at most BRONZE_APPEND_BYTES), then the rejects and the ledger in one commit each, streamed
    file by file; the ledger append is the commit point (see ``_append_ingested``). Then remove the
    source's spill files, those a crashed run left too (the caller holds the source's ingest
    limit, so no other run is between extract and commit). Returns the source's report.

    Safe to retry: once the ledger holds the batches' run, the rows are not appended again and
    only the clean-up is finished."""
    combined = IngestReport.combine(source, parts, pending_inputs)
    lake = Lake(settings)
    store = lake.storage(settings.storage.restricted_url)
    spilled = [url for part in parts for url in part.spilled]

    def rows(urls: list[str], schema: pa.Schema) -> pa.RecordBatchReader:
        def batches() -> Iterator[pa.RecordBatch]:
            for url in urls:
                with pa.ipc.open_stream(store.read_bytes(url)) as reader:
                    yield from reader

        return pa.RecordBatchReader.from_batches(schema, batches())

    def of_kind(kind: str) -> list[str]:
        return [url for url in spilled if url.endswith(f"-{kind}.arrow")]

    # delta-rs holds all of an append's rows before it writes them: bronze goes in appends of at
    # most BRONZE_APPEND_BYTES of put-aside parts (a part holds about FLUSH_BYTES of records at
    # most), not one append for a batch of several GB. The ledger append after them stays the
    # commit point.
    bronze_parts = of_kind("bronze")
    listed = store.list_table(f"{SPILL_PREFIX}/{source}")
    size_of = dict(zip(listed.column("url").to_pylist(), listed.column("size").to_pylist(), strict=True))
    bronze_groups = [
        rows(bronze_parts[start : start + count], BRONZE_SCHEMA)
        for start, count in _chunks(
            [size_of.get(url, 0) for url in bronze_parts], len(bronze_parts), BRONZE_APPEND_BYTES
        )
    ]

    if _committed(lake, source, {part.run_id for part in parts if part.run_id}):
        # A retry after the clean-up below failed part way: the rows are in, some of the files
        # already gone. Only the clean-up is left to do.
        combined.bronze_version = lake.version(bronze(BRONZE_TABLES[source])) if combined.records else None
    else:
        _append_ingested(
            lake,
            combined,
            bronze_groups,
            rows(of_kind("rejects"), REJECT_SCHEMA),
            rows(of_kind("ledger"), LEDGER_SCHEMA),
        )
    for leftover in store.list_files(f"{SPILL_PREFIX}/{source}"):
        store.delete(store.relative(leftover.url))
    combined.started = min((p.started for p in parts), default=time.time())
    combined.seconds = round(time.time() - combined.started, 3)
    return combined


def _committed(lake: Lake, source: str, run_ids: set[str]) -> bool:
    """Whether the source's ledger has entries of these runs: the ledger is appended last, so
    their commit is complete."""
    if not run_ids:
        return False
    ledger = lake.read(ledger_table(source), columns=["run_id"])
    if ledger is None:
        return False
    return bool(pc.any(pc.is_in(ledger.column("run_id"), value_set=pa.array(sorted(run_ids)))).as_py())


def _ipc_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue().to_pybytes())


def forget_inputs(settings: JourneySettings, source: str, prefix: str = "") -> int:
    """Invalidate ledger entries so that the next run reads those inputs again, on purpose.

    The entries stay, their version, content hash and watermark cleared: the runs they name
    remain committed (bronze rows of a run with no ledger entry are taken for a crashed commit's
    and removed), and an input that is no longer in the landing zone keeps what it loaded.

    File sources: inputs under ``prefix`` in the landing zone (all with an empty prefix). The
    registry: one table's watermark (``prefix`` = table name), or all. Re-read records equal to
    ones already in bronze (same input, offset and content) are collapsed by staging, so nothing
    loads twice. Returns the number of ledger entries invalidated.
    """
    plugin = source_named(source)
    lake = Lake(settings)
    start, end = plugin.forget_bounds(settings, lake.storage(settings.storage.landing_url), prefix)
    quoted_start, quoted_end = start.replace("'", "''"), end.replace("'", "''")
    return lake.update(
        ledger_table(source),
        f"starts_with(uri, '{quoted_start}') AND ends_with(uri, '{quoted_end}') AND version <> '{FORGOTTEN}'",
        {"version": f"'{FORGOTTEN}'", "content_hash": "NULL", "watermark": "NULL"},
    )


def find_input(settings: JourneySettings, key: str) -> list[tuple[str, str]]:
    """(source, URI) of the inputs whose ``input_key`` (the lineage the analysts' zone carries)
    is ``key`` or starts with it, from the ledgers and bronze of the restricted zone."""
    lake = Lake(settings)
    keys = KeyMaker(settings.patient_hmac_key())
    found: set[tuple[str, str]] = set()
    for source in SOURCES:
        uris: set[str] = set()
        for ref, column in ((ledger_table(source), "uri"), (bronze(BRONZE_TABLES[source]), "source_uri")):
            table = lake.read(ref, columns=[column])
            if table is not None:
                uris.update(pc.unique(table.column(column)).drop_null().to_pylist())
        found.update((source, uri) for uri in uris if keys.input_key(uri).startswith(key))
    return sorted(found)


def require_input(settings: JourneySettings, reports: list[IngestReport]) -> None:
    """Fail a first run that found no input at all (nothing in bronze, nothing read, nothing
    waiting): it used to succeed with an empty warehouse, and a mistyped landing path looked like
    a quiet night. JOURNEY_SOURCES__ALLOW_EMPTY lets it succeed."""
    if settings.sources.allow_empty or any(r.new_inputs or r.records or r.pending_inputs for r in reports):
        return
    if _bronze_versions(Lake(settings)):
        return  # not a first run: a night with nothing new is normal
    landing = Lake(settings).storage(settings.storage.landing_url)
    raise ConfigurationError(
        f"No input found under {landing.root} for any source on this first run: nothing was loaded. "
        "Check JOURNEY_STORAGE__LANDING_URL and the source prefixes, or set JOURNEY_SOURCES__ALLOW_EMPTY=true "
        "if an empty start is expected."
    )


def _bronze_versions(lake: Lake) -> dict[str, int]:
    versions = {}
    for name in BRONZE_TABLES.values():
        version = lake.version(bronze(name))
        if version is not None:
            versions[name] = version
    return versions


def _last_build(lake: Lake) -> dict[str, int] | None:
    """The bronze versions the latest build used. A Delta read has no row order, so the latest is
    the build with the newest versions: a bronze table's version only grows, so each build's
    versions are at least its predecessor's."""
    builds = lake.read(BUILDS)
    if builds is None or builds.num_rows == 0:
        return None
    recorded = [
        {k: int(v) for k, v in (item.split("=") for item in text.split(",") if item)}
        for text in builds.column("bronze_versions").to_pylist()
    ]
    return max(recorded, key=lambda versions: (sum(versions.values()), sorted(versions.items())))


def latest_reads(lake: Lake) -> pa.Table:
    """(source_uri, run_id) of the latest read of every input of the file sources read more than
    once, from their ledgers. An input read again (``journey reprocess``, or new content under the
    same name) replaces what its earlier reads produced: records and rejects alike. (The rows of
    an input read once are all of its latest read: it is not listed, which spares every build a
    join of all its rows with all inputs.)"""
    parts = [
        ledger
        for source in FILE_SOURCES
        if (ledger := lake.read(ledger_table(source), columns=["uri", "run_id", "processed_at"])) is not None
    ]
    if not parts:
        return pa.table({"source_uri": pa.array([], pa.string()), "latest_run_id": pa.array([], pa.string())})
    reads = pa.concat_tables(parts)
    latest = (
        reads.group_by("uri")
        .aggregate([("processed_at", "max"), ("processed_at", "count")])
        .rename_columns(["uri", "processed_at", "reads"])
    )
    latest = latest.filter(pc.greater(latest.column("reads"), 1)).drop_columns(["reads"])
    latest = latest.join(reads, keys=["uri", "processed_at"])
    return pa.table({"source_uri": latest.column("uri"), "latest_run_id": latest.column("run_id")})


def _rejects_as_quarantine(lake: Lake, reads: pa.Table) -> pa.Table:
    """Every record rejected at the latest read of its input, as quarantine rows of the staged
    table it belongs to."""
    rejects = pa.concat_tables(
        [lake.read(extraction_rejects_table(source)) or REJECT_SCHEMA.empty_table() for source in SOURCES]
    )
    rejects = from_latest_read(rejects, reads)
    tables = pa.array([ENTITY_TABLE.get(e, e) for e in rejects.column("entity").to_pylist()], pa.string())
    return (
        rejects.drop_columns(["entity"]).append_column("table_name", tables).select(QUARANTINE_SCHEMA.names)
    )


def _cell_rejects(rejects: pa.Table, staged_tables: dict[str, pa.Table]) -> pa.Array:
    """Which rejects at read are of one cell of a REDCap row that loaded all the same (its line
    has a staged record): they are counted beside the rows, not as rows read."""
    redcap = [name for name in staged_tables if name.startswith("redcap")]
    if not redcap or rejects.num_rows == 0:
        return pa.array([False] * rejects.num_rows, pa.bool_())
    loaded = (
        pa.concat_tables(
            [
                staged_tables[name]
                .select(["source_uri", "source_offset"])
                .append_column("table_name", pa.array([name] * staged_tables[name].num_rows, pa.string()))
                for name in redcap
            ]
        )
        .group_by(["table_name", "source_uri", "source_offset"])
        .aggregate([])
    )
    numbered = rejects.select(["table_name", "source_uri", "source_offset"]).append_column(
        "_n", pa.array(range(rejects.num_rows), pa.int64())
    )
    found = numbered.join(loaded, ["table_name", "source_uri", "source_offset"], join_type="inner")
    return pc.is_in(numbered.column("_n"), value_set=found.column("_n").combine_chunks())


def field_type_rejects(table: pa.Table, name: str, source: str, run_id: str) -> tuple[pa.Table, pa.Table]:
    """The staged rows whose fields have the kinds their table reads (without the check's column),
    and the others as quarantine rows (``<source>_field_type``, naming the field, never its value)."""
    error = table.column(FIELD_ERROR)
    wrong = pc.is_valid(error)
    table = table.drop_columns([FIELD_ERROR])
    if not pc.any(wrong).as_py():
        return table, QUARANTINE_SCHEMA.empty_table()
    quarantined = quarantine_rows(
        table.filter(wrong), name, source, f"{source}_field_type", error.filter(wrong), run_id
    )
    return table.filter(pc.invert(wrong)), quarantined


def _bronze_only(lake: Lake, reads: pa.Table) -> dict[str, int]:
    """Bronze entities that no staged table models yet (FHIR resource types, REDCap forms):
    kept in bronze, reported, not loaded."""
    modelled = {spec.entity for spec in STAGED_TABLES}
    fhir = lake.read(bronze("fhir_resource"), columns=["entity", "source_uri", "run_id"])
    counts = {}
    if fhir is not None:
        counts = {
            item["values"]: item["counts"]
            for item in pc.value_counts(from_latest_read(fhir, reads).column("entity")).to_pylist()
            if item["values"] not in modelled
        }
    redcap = lake.read(bronze("redcap_record"), columns=["entity", "payload", "source_uri", "run_id"])
    if redcap is not None:
        counts.update(redcap_forms_not_loaded(from_latest_read(redcap, reads)))
    return counts


def _declared_files(settings: JourneySettings) -> list[Path]:
    """The files besides the code that decide records' outcomes: suites and device templates."""
    folders = (Path(settings.quality.expectations_dir), Path(settings.sources.device_templates_dir))
    return [path for folder in folders for path in sorted(folder.rglob("*.json")) if path.is_file()]


def _silver_groups() -> dict[str, list[str]]:
    """Each silver table and the staged tables that feed it (a table that only feeds the
    crosswalk is a group of its own, with no silver table)."""
    groups: dict[str, list[str]] = {}
    for spec in LINKS:
        groups.setdefault(spec.silver or f"_{spec.staged}", []).append(spec.staged)
    return groups


def build_silver(settings: JourneySettings, run_id: str, force: bool = False) -> BuildReport:
    """Stage, gate and link what changed since the last build; write staged/silver/quarantine/held.

    Only the records that the new bronze rows touch are resolved again, and only the inputs they
    are in are gated, linked and replaced in the tables written (patient_journey.increments);
    held records are linked again when the identities grew. A build is whole (every table
    replaced) when forced, when the suites, templates, declarations or code changed, or when the
    build before did not finish.

    One silver table at a time: the tables the identity relations read are staged and gated
    first (their rows are kept for the linker); then each silver table's staged tables are
    staged, gated, linked and written, and their rows let go before the next table's are read,
    so the build holds one table's rows at a time besides the identity tables."""
    started = time.perf_counter()
    clock = StepClock()
    lake = Lake(settings)
    versions = _bronze_versions(lake)
    last = _last_build(lake)
    if not force and last == versions and lake.version(gold("surgical_episode")) is not None:
        return BuildReport(built=False, reason="no new input since the last build")
    keys = KeyMaker(settings.patient_hmac_key())
    gate = QualityGate(settings.quality.expectations_dir)
    use_spill_folder(settings.storage.spill_dir)
    # The warehouse's layout is part of it: another bucket count partitions every table anew.
    layout = f"patient_buckets={settings.storage.patient_buckets}"
    fingerprint = declaration(_declared_files(settings), (STAGED_TABLES, LINKS, IDENTITY, layout), keys)
    mark = BuildMark(lake)
    whole_build = force or not mark.trusted(fingerprint)
    mark.set(run_id, "started", fingerprint)

    reads = latest_reads(lake)
    report = BuildReport(built=True)
    refreshed = {r.table: r for r in refresh(lake, STAGED_TABLES)}
    report.flattened = {name: ("whole" if r.whole else "since") for name, r in refreshed.items()}
    report.bronze_only = _bronze_only(lake, reads)
    rejected_at_read = _rejects_as_quarantine(lake, reads)
    clock.lap("stage")
    with _Staging(settings, lake, gate, run_id, reads, refreshed, whole_build, clock, report) as staging:
        loaded = _link_and_load(lake, keys, staging, run_id, whole_build, report, clock)
    gated_quarantine = replace_positions(
        lake.read(GATED_QUARANTINE), pa.concat_tables(staging.gated_parts), staging.positions
    )
    lake.overwrite(GATED_QUARANTINE, gated_quarantine)
    _gold_pending(lake, loaded.patients)
    report.versions["held"] = lake.overwrite(HELD, loaded.held)
    report.versions["quarantine"] = lake.overwrite(
        QUARANTINE, pa.concat_tables([rejected_at_read, gated_quarantine.cast(QUARANTINE_SCHEMA)])
    )
    report.versions["crosswalk"] = lake.overwrite(CROSSWALK, loaded.crosswalk)
    report.tables = _table_counts(lake, [spec.name for spec in STAGED_TABLES], rejected_at_read, loaded.held)
    report.expectations = [asdict(o) for o in merge_outcomes(staging.outcomes)]
    mark.set(run_id, "finished", fingerprint)
    clock.lap("load")
    report.stage_seconds = clock.seconds
    report.seconds = round(time.perf_counter() - started, 3)
    return report


@dataclass(frozen=True)
class _Loaded:
    crosswalk: pa.Table
    held: pa.Table  # every held record, after this build
    patients: set[str | None] | None  # whose silver rows changed (None: all)


def _link_and_load(
    lake: Lake,
    keys: KeyMaker,
    staging: _Staging,
    run_id: str,
    whole_build: bool,
    report: BuildReport,
    clock: StepClock,
) -> _Loaded:
    """Link each silver table's staged rows (those that changed, or whose link could have) and
    replace them in silver, one silver table (or part of one) at a time."""
    identity = {name: staging.passed_rows(name, None) for name in identity_inputs(IDENTITY)}
    linker = Linker(keys, IDENTITY, identity)
    del identity
    crosswalk = linker.crosswalk()
    change = "changed" if whole_build else identity_change(lake.read(CROSSWALK), crosswalk)
    held_before = lake.read(HELD)
    clock.lap("link")
    relinked: dict[str, pa.Table | None] = {}
    held_parts = [HELD_SCHEMA.empty_table()]
    patients: set[str | None] | None = set()
    for group, names in _silver_groups().items():
        parts = staging.parts(names)
        for number in range(parts):  # a large table built whole: part by part of its records
            batches = [staging.batch(name, (number, parts)) for name in names]
            positions: pa.Table | None = None
            if change != "changed" and not any(batch.whole for batch in batches):
                wanted = [batch.positions or POSITION_SCHEMA.empty_table() for batch in batches]
                if change == "grown" and held_before is not None:  # held records whose key may have come
                    mine = pc.is_in(held_before.column("table_name"), value_set=pa.array(names, pa.string()))
                    wanted.append(held_before.filter(mine))
                positions = positions_of(*wanted)
            relinked.update({name: positions for name in names})
            linked = linker.link(
                {name: staging.passed_rows(name, positions) for name in names},
                run_id,
                [spec for spec in LINKS if spec.staged in names],
            )
            staging.release(names)
            held_parts.append(linked.held)
            clock.lap("link")
            rows = linked.silver.get(group)
            del linked
            if rows is not None and number == 0:
                version, touched = _replace_silver(lake, keys, group, rows, positions)
                report.versions[f"silver.{group}"] = version
                patients = None if patients is None or touched is None else patients | touched
            elif rows is not None and rows.num_rows:  # a later part of a table built whole
                report.versions[f"silver.{group}"] = lake.append(silver(group), rows)
            clock.lap("load")
    linker.close()
    held = replace_positions(held_before, pa.concat_tables(held_parts), relinked)
    return _Loaded(crosswalk, held, patients)


# Flattened rows per part of a large staged table built whole (``_Staging.parts``): a part's
# resolve, gate and link hold about this many rows (at M, device events: about 0.6 GiB each).
STAGE_PART_ROWS = 250_000


class _Staging:
    """The staged tables of one silver build, each resolved, gated and stored when first asked
    for (``batch``), its passed rows kept until ``release``: a build holds the rows of the table
    (or the part of a large table) it links, and of the identity tables, not of every table."""

    def __init__(
        self,
        settings: JourneySettings,
        lake: Lake,
        gate: QualityGate,
        run_id: str,
        reads: pa.Table,
        refreshed: dict[str, Refreshed],
        whole_build: bool,
        clock: StepClock,
        report: BuildReport,
    ) -> None:
        self.settings, self.lake, self.gate, self.run_id = settings, lake, gate, run_id
        self.reads, self.refreshed, self.whole_build = reads, refreshed, whole_build
        self.clock, self.report = clock, report
        self.specs = {spec.name: spec for spec in STAGED_TABLES}
        self.source_of = {spec.staged: spec.source for spec in LINKS}
        self.batches: dict[str, tuple[tuple[int, int], Batch]] = {}  # the part staged last
        self.passed: dict[str, pa.Table] = {}
        self.positions: dict[str, pa.Table | None] = {}  # every table staged: the positions replaced
        self.gated_parts = [QUARANTINE_SCHEMA.empty_table()]
        self.outcomes: list[ExpectationOutcome] = []
        self.split: dict[str, FlattenedParts] = {}

    def whole(self, name: str) -> bool:
        """Whether the table is built whole (its store replaced), not by its changed records."""
        earlier = self.refreshed.get(name)
        return (
            self.whole_build
            or (earlier is not None and earlier.whole)
            or self.lake.version(staged(name)) is None
        )

    def parts(self, names: list[str]) -> int:
        """In how many parts of its records a silver table's one staged table is built: more than
        one only for a large table built whole that no identity relation reads whole, that
        keeps no values across records, and whose suite checks rows one by one (a rule over
        all rows, such as a unique column, sees the whole table)."""
        if len(names) != 1:
            return 1
        name = names[0]
        if (
            name in identity_inputs(IDENTITY)
            or self.specs[name].across_key
            or self.gate.across_rows("staged", name) != []
            or not self.whole(name)
        ):
            return 1
        return max(1, math.ceil((self.lake.row_count(flattened(name)) or 0) / STAGE_PART_ROWS))

    def batch(self, name: str, part: tuple[int, int] = (0, 1)) -> Batch:
        """The table's batch (of one ``part`` of its records), staged, gated and stored the first
        time it is asked for."""
        if name in self.batches and self.batches[name][0] == part:
            return self.batches[name][1]
        lake, spec = self.lake, self.specs[name]
        number, count = part
        if count > 1:  # split once, at the first part; the parts' files removed after the last
            if number == 0:
                self.split[name] = FlattenedParts(lake, spec, count)
            batch = whole_batch(lake, spec, self.reads, self.split[name].rows(number))
            if number == count - 1:
                self.split.pop(name).close()
        elif self.whole(name):
            batch = whole_batch(lake, spec, self.reads)
        else:
            batch = changed_batch(lake, spec, self.refreshed.get(name), self.reads)
        self.clock.lap("stage")
        rows = batch.rows
        current = rows.filter(pc.invert(rows.column(SUPERSEDED))).drop_columns([SUPERSEDED])
        table, mistyped = field_type_rejects(current, name, self.source_of[name], self.run_id)
        del current
        result = self.gate.check("staged", name, table, self.source_of[name], self.run_id)
        del table
        self.gated_parts.extend([mistyped, result.quarantined])
        self.outcomes.extend(result.outcomes)
        passed = {name: result.passed}
        for plugin in PLUGINS.values():  # a source's own gate after staging (device types)
            gated = plugin.gate_staged(self.settings, self.gate, passed, self.run_id)
            if gated is not None:
                self.gated_parts.append(gated.quarantined)
                self.outcomes.extend(gated.outcomes)
        self.clock.lap("validate")
        self.report.versions[f"staged.{name}"] = store_batch(
            lake, batch, passed[name].column("_row"), after_part=part[0] > 0
        )
        self.report.replaced[name] = "whole" if batch.positions is None else batch.positions.num_rows
        self.positions[name] = batch.positions
        # Only what linking needs is kept: the rows were stored, the positions are enough (an
        # empty table, not a slice: a slice keeps the buffers).
        self.batches[name] = (part, replace(batch, rows=rows.schema.empty_table(), stored=None))
        self.passed[name] = passed[name]
        self.clock.lap("load")
        return self.batches[name][1]

    def passed_rows(self, name: str, positions: pa.Table | None) -> pa.Table:
        """The passed rows at a table's ``positions`` (None: all): this build's, then the store's."""
        # The part staged last (asking for the default part would stage the table again).
        batch = self.batches[name][1] if name in self.batches else self.batch(name)
        mine = self.passed[name]
        if batch.positions is None:
            return mine
        if positions is None:
            return stored_passed(self.lake, name).select(mine.schema.names).cast(mine.schema)
        others = without(positions, batch.positions)
        if not others.num_rows:
            return mine
        stored = stored_passed(self.lake, name, others).select(mine.schema.names).cast(mine.schema)
        return pa.concat_tables([mine, stored])

    def release(self, names: list[str]) -> None:
        """Let go of the tables' rows once they are linked."""
        for name in names:
            self.passed[name] = self.passed[name].schema.empty_table()

    def __enter__(self) -> _Staging:
        return self

    def __exit__(self, *_: object) -> None:  # a build that failed between parts: their files
        for parts in self.split.values():
            parts.close()
        self.split.clear()


def _replace_silver(
    lake: Lake, keys: KeyMaker, name: str, rows: pa.Table, positions: pa.Table | None
) -> tuple[int, set[str | None] | None]:
    """Replace a silver table's rows at ``positions`` (None: all) with ``rows``: its rows carry
    their input's key (``input_key``), not its URI. Returns the table's version and the patients
    whose rows were replaced (None: every patient)."""
    ref = silver(name)
    if positions is None or lake.version(ref) is None:
        return lake.overwrite(ref, rows), None
    if positions.num_rows == 0 and rows.num_rows == 0:  # nothing of this table changed
        version = lake.version(ref)
        assert version is not None
        return version, set()
    present = lake.read(ref, columns=["input_key", "source_offset", "patient_key"])
    assert present is not None
    input_keys = pc.utf8_slice_codeunits(
        keys.keys("input", positions.column("source_uri")), 0, INPUT_KEY_LENGTH
    )
    wanted = pa.table({"source_uri": input_keys, "source_offset": positions.column("source_offset")})
    gone = present.filter(at_positions(present, wanted, uri="input_key"))
    touched = set(pc.unique(gone.column("patient_key")).to_pylist())
    touched.update(pc.unique(rows.column("patient_key")).to_pylist())
    if gone.num_rows:  # by bucket too: the merge reads only the buckets of the rows it deletes
        where = gone.select(["input_key", "source_offset"]).append_column(
            BUCKET, lake.buckets_of(gone.column("patient_key"))
        )
        lake.delete_matching(ref, where.group_by(where.column_names).aggregate([]))
    version = lake.version(ref)
    assert version is not None
    if rows.num_rows:  # nothing at these positions links now: no empty commit
        version = lake.append(ref, rows)
    return version, touched


def _table_counts(
    lake: Lake, names: list[str], rejected_at_read: pa.Table, held: pa.Table
) -> list[TableCounts]:
    """Every staged table's counts over all its records (not only this build's), from the staged
    stores, the held records and the rejects at read: rows in = loaded + quarantined + held +
    superseded."""
    counts = {name: TableCounts(name) for name in names}
    lineage = {
        name: table
        for name in names
        if name.startswith("redcap")
        and (table := lake.read(staged(name), columns=["source_uri", "source_offset"])) is not None
    }
    cells = _cell_rejects(rejected_at_read, lineage)
    for item in pc.value_counts(rejected_at_read.filter(pc.invert(cells)).column("table_name")).to_pylist():
        table = counts.setdefault(item["values"], TableCounts(item["values"]))
        table.read += item["counts"]
        table.quarantined += item["counts"]
    for item in pc.value_counts(rejected_at_read.filter(cells).column("table_name")).to_pylist():
        counts[item["values"]].cells_rejected += item["counts"]
    held_by_table = {i["values"]: i["counts"] for i in pc.value_counts(held.column("table_name")).to_pylist()}
    for name in names:
        flags = lake.read(staged(name), columns=[SUPERSEDED, PASSED])
        assert flags is not None
        superseded = int(pc.sum(flags.column(SUPERSEDED)).as_py() or 0)
        failed = int(pc.sum(pc.invert(pc.fill_null(flags.column(PASSED), True))).as_py() or 0)
        table = counts[name]
        table.read += flags.num_rows
        table.superseded += superseded
        table.quarantined += failed
        table.held += held_by_table.get(name, 0)
        table.loaded += flags.num_rows - superseded - failed - table.held
    return sorted(counts.values(), key=lambda c: c.table)


def device_clock_metrics(clock: pa.Table, tolerance: int) -> dict[str, int]:
    """The device clock skew seen in this build, as counts for the run summary."""
    skews = [abs(int(v)) for v in clock.column("median_skew_seconds").to_pylist() if v is not None]
    return {
        "devices": clock.num_rows,
        "max_median_skew_seconds": max(skews, default=0),
        "beyond_tolerance": sum(bool(v) for v in clock.column("beyond_tolerance").to_pylist()),
        "tolerance_seconds": tolerance,
    }


def _gold_pending(lake: Lake, patients: set[str | None] | None) -> None:
    """Note for the next gold build the patients whose silver rows changed (None: all). Notes add
    up until a gold build has taken them (a gold build that failed leaves them for the next)."""
    if patients is None:
        rows = pa.table({"whole": [True], "patient_key": pa.array([None], pa.string())})
    else:
        rows = pa.table(
            {
                "whole": [False] * len(patients),
                "patient_key": pa.array(sorted(patients, key=str), pa.string()),
            }
        )
    lake.append(GOLD_PENDING, rows)


def _patients_pending(lake: Lake) -> set[str | None] | None:
    """The patients whose gold rows are to be built again (None: every patient)."""
    pending = lake.read(GOLD_PENDING)
    if pending is None or pc.any(pending.column("whole")).as_py():
        return None
    if any(lake.version(gold(name)) is None for name in GOLD_TABLES) or lake.version(GOLD_QUARANTINE) is None:
        return None
    return set(pc.unique(pending.column("patient_key")).to_pylist())


def _of_patients(table: pa.Table, patients: set[str | None], column: str = "patient_key") -> pa.Array:
    """Which rows of ``table`` are of these patients (a null key among them: rows without one)."""
    named = pa.array(sorted(p for p in patients if p), pa.string())
    mine = pc.is_in(table.column(column), value_set=named)
    if None in patients:
        mine = pc.or_(mine, pc.is_null(table.column(column)))
    return pc.fill_null(mine, False)


def _keyed_quarantine(result: GateResult, table: pa.Table) -> pa.Table:
    """A gold table's quarantined rows with the patient each is of (``_key``; null for a table
    without patients)."""
    if "patient_key" in table.column_names:
        patient = table.column("patient_key").filter(result.failed)
    else:
        patient = pa.nulls(result.quarantined.num_rows, pa.string())
    return result.quarantined.append_column("_key", patient)


def _repeats(lake: Lake, ref: TableRef, keys: list[tuple[str, ...]]) -> bool:
    """Whether any set of ``keys`` columns holds a value twice in the table (nulls aside)."""
    for columns in keys:
        table = lake.read(ref, columns=list(columns))
        assert table is not None
        valid = [pc.is_valid(table.column(c)) for c in columns]
        present = table.filter(functools.reduce(pc.and_, valid))
        if present.group_by(list(columns)).aggregate([]).num_rows != present.num_rows:
            return True
    return False


def build_gold(settings: JourneySettings, run_id: str) -> BuildReport:
    """Build, gate and write the gold tables from silver, for the patients whose silver rows
    changed since the last gold build (or every patient); records the bronze versions it used.

    A patient's episode and events depend on that patient's rows alone, so they are built again
    for the patients noted by the silver builds since (``_gold_pending``) and replace theirs; a
    build of every patient goes a few patient buckets at a time (``_bucket_units``), so it holds
    one unit's rows, not the warehouse's. device_clock (one row per device, over all its
    patients' events) is built whole from a few columns. A rule over all rows (a unique key) is
    checked again over the whole table; if it fails there, gold is built whole in one unit (its
    gate then sees every row at once)."""
    started = time.perf_counter()
    clock = StepClock()
    lake = Lake(settings)
    gate = QualityGate(settings.quality.expectations_dir)
    use_spill_folder(settings.storage.spill_dir)
    tolerance = settings.sources.device_skew_tolerance_seconds
    patients = _patients_pending(lake)
    in_parts = all(gate.across_rows("gold", name) is not None for name in GOLD_TABLES)
    units: list[set[int] | None] = (
        _bucket_units(lake, settings.storage.patient_buckets) if in_parts else [None]
    )
    report = _build_gold(lake, gate, run_id, tolerance, patients, units, clock)
    if report is None:  # a unique key repeated across the units (or patients) built apart
        report = _build_gold(lake, gate, run_id, tolerance, None, [None], clock)
    assert report is not None
    lake.overwrite(
        GOLD_PENDING, pa.table({"whole": pa.array([], pa.bool_()), "patient_key": pa.array([], pa.string())})
    )
    versions = ",".join(f"{k}={v}" for k, v in sorted(_bronze_versions(lake).items()))
    lake.append(BUILDS, pa.table({"run_id": [run_id], "bronze_versions": [versions]}))
    clock.lap("load")
    report.stage_seconds = clock.seconds
    report.seconds = round(time.perf_counter() - started, 3)
    return report


# Silver rows per unit of a gold build of every patient (``_bucket_units``): its memory is about
# that of this many silver rows and the gold rows made of them.
GOLD_UNIT_ROWS = 500_000


def _bucket_units(lake: Lake, buckets: int) -> list[set[int] | None]:
    """The patient buckets a gold build of every patient builds together, a few at a time: as
    many as hold about ``GOLD_UNIT_ROWS`` silver rows (the rows without a patient go with the
    first). One unit of every bucket (None) when silver is small."""
    total = sum(lake.row_count(silver(name)) or 0 for name in {s.silver for s in LINKS if s.silver})
    per_unit = max(1, math.ceil(buckets * GOLD_UNIT_ROWS / max(total, 1)))
    if per_unit >= buckets:
        return [None]
    units: list[set[int] | None] = [
        set(range(start, min(start + per_unit, buckets))) for start in range(0, buckets, per_unit)
    ]
    first = units[0]
    assert first is not None
    first.add(-1)
    return units


def _build_gold(
    lake: Lake,
    gate: QualityGate,
    run_id: str,
    tolerance: int,
    patients: set[str | None] | None,
    units: list[set[int] | None],
    clock: StepClock,
) -> BuildReport | None:
    """Gold for ``patients`` (None: all, unit by unit of ``units``: patient buckets, None for
    every bucket); None when a rule over all rows fails for the whole table after a build in
    parts (the caller builds whole in one unit)."""
    if patients is not None:  # only the buckets of these patients (a null key: rows without one)
        units = [set(lake.buckets_of(pa.array(list(patients), pa.string())).to_pylist())]
    report = BuildReport(built=True, patients="all" if patients is None else len(patients))
    old_quarantine = None if patients is None else lake.read(GOLD_QUARANTINE)
    quarantine_parts: list[tuple[str, pa.Table, bool]] = []
    outcomes: list[ExpectationOutcome] = []
    by_patient = [name for name in GOLD_TABLES if name != "device_clock"]  # device_clock: after the units
    for number, unit in enumerate(units):
        silver_tables = {}
        for spec in LINKS:
            if spec.silver is not None and spec.silver not in silver_tables:
                table = lake.read(silver(spec.silver), buckets=unit)
                if table is None:
                    raise ConfigurationError(
                        f"silver.{spec.silver} does not exist yet: run build_silver first."
                    )
                silver_tables[spec.silver] = (
                    table if patients is None else table.filter(_of_patients(table, patients))
                )
        clock.lap("read")
        journey_tables = build_journey(silver_tables, JOURNEY_PARTS, tolerance, with_device_clock=False)
        del silver_tables
        clock.lap("build")
        for name, table in journey_tables.items():
            result = gate.check("gold", name, table, "journey", run_id)
            clock.lap("validate")
            outcomes.extend(result.outcomes)
            quarantine_parts.append((name, _keyed_quarantine(result, table), patients is not None))
            if patients is not None:
                lake.delete_keys(gold(name), "patient_key", patients)
                report.versions[f"gold.{name}"] = lake.append(gold(name), result.passed)
            elif number == 0:
                report.versions[f"gold.{name}"] = lake.overwrite(gold(name), result.passed)
            else:
                report.versions[f"gold.{name}"] = lake.append(gold(name), result.passed)
            clock.lap("load")
    if patients is not None or len(units) > 1:  # each unit's rules held apart: do they hold whole?
        for name in by_patient:
            rules = gate.across_rows("gold", name)
            if rules is None or _repeats(lake, gold(name), rules):
                return None
    # One row per device over all its events: whole, from its columns.
    events = lake.read(silver("device_event"), columns=DEVICE_CLOCK_COLUMNS)
    assert events is not None
    clocks = device_clock(events, tolerance)
    result = gate.check("gold", "device_clock", clocks, "journey", run_id)
    outcomes.extend(result.outcomes)
    quarantine_parts.append(("device_clock", _keyed_quarantine(result, clocks), False))
    report.versions["gold.device_clock"] = lake.overwrite(gold("device_clock"), result.passed)
    report.device_clocks = device_clock_metrics(result.passed, tolerance)
    report.expectations.extend(asdict(o) for o in merge_outcomes(outcomes))
    clock.lap("load")
    gold_quarantine = _merge_gold_quarantine(old_quarantine, quarantine_parts, patients)
    lake.overwrite(GOLD_QUARANTINE, gold_quarantine)
    # Replaced, not appended: a gold build run again (a retry) does not list its rows twice.
    earlier = lake.read(QUARANTINE)
    if earlier is not None:
        earlier = earlier.filter(pc.invert(pc.is_in(earlier.column("table_name"), pa.array(GOLD_TABLES))))
    rows = gold_quarantine.select(QUARANTINE_SCHEMA.names).cast(QUARANTINE_SCHEMA)
    lake.overwrite(
        QUARANTINE, rows if earlier is None else pa.concat_tables([earlier.cast(QUARANTINE_SCHEMA), rows])
    )
    quarantined = {
        i["values"]: i["counts"] for i in pc.value_counts(gold_quarantine.column("table_name")).to_pylist()
    }
    for name in GOLD_TABLES:
        count = lake.row_count(gold(name))
        assert count is not None
        bad = quarantined.get(name, 0)
        report.tables.append(TableCounts(name, count + bad, count, bad, 0))
    clock.lap("load")
    return report


def _merge_gold_quarantine(
    old: pa.Table | None,
    parts: list[tuple[str, pa.Table, bool]],
    patients: set[str | None] | None,
) -> pa.Table:
    """The gold tables' quarantined rows: this build's, and the earlier ones of the patients
    (tables) it did not build again."""
    schema = QUARANTINE_SCHEMA.append(pa.field("_key", pa.string()))
    kept = []
    if old is not None and patients is not None:
        for name, _, by_patient in parts:
            mine = pc.equal(old.column("table_name"), name)
            if by_patient:
                kept.append(old.filter(pc.and_(mine, pc.invert(_of_patients(old, patients, "_key")))))
    new = [keyed.cast(schema) for _, keyed, _ in parts]
    return pa.concat_tables([*[k.cast(schema) for k in kept], *new]) if kept or new else schema.empty_table()
