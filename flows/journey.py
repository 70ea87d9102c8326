"""The flows: ingest sources, build the journey, backfill a window, or all of it in one run.

    ingest          new inputs of the chosen sources -> bronze (deployments ingest-device,
                    ingest-ehr, ingest-outcomes); its completion triggers journey-build
    journey-build   stage, gate and link bronze -> silver, then gold
    backfill        inputs that landed in a date window, read again if asked, then a rebuild
    patient-journey ingest and build in one run (`journey run`, the demo)

They read like the README's architecture paragraph; all logic lives in the library. Each
source's inputs are split into batches of files (JOURNEY_ORCHESTRATION__INGEST_BATCH_FILES and
__INGEST_BATCH_MIB), one task each, so the same flow scales out on a Dask cluster
(JOURNEY_ORCHESTRATION__TASK_RUNNER).
"""

from __future__ import annotations

import time
import uuid
from datetime import UTC, date, datetime, timedelta
from datetime import time as clock
from enum import StrEnum
from uuid import UUID

from prefect import flow
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.futures import PrefectFuture, as_completed
from prefect.runtime import flow_run
from prefect.states import Completed
from pydantic import BaseModel, Field, model_validator

from patient_journey.pipeline import SOURCES, IngestBatch, IngestPlan, IngestReport, Window
from patient_journey.report import RunSummary
from patient_journey.settings import load_settings
from patient_journey.sources.plugins import PLUGINS
from patient_journey.sources.source import SourceKind
from tasks.journey import (
    build_gold,
    build_silver,
    check_linkage_floor,
    check_quarantine_share,
    commit_ingest,
    data_docs_renderer,
    plan_ingest,
    preflight,
    publish_summary,
    require_input,
    start_data_docs,
)
from tasks.journey import (
    ingest as ingest_batch,
)
from tasks.limits import WAREHOUSE_LIMIT, holding, ingest_limit
from tasks.runners import batch_runner, task_runner_for

# A source system: one member per registered plug-in (patient_journey.sources.plugins), so the
# deployments' parameter forms offer every source without a list to keep in step here.
Source = StrEnum("Source", {name: name for name in SOURCES})  # type: ignore[misc]


ALL_SOURCES = [Source(s) for s in SOURCES]


class DateWindow(BaseModel):
    """Days of landing (UTC), from ``start`` up to and including ``end``."""

    start: date = Field(description="First day (UTC) whose inputs are read, inclusive.")
    end: date = Field(description="Last day (UTC) whose inputs are read, inclusive.")

    @model_validator(mode="after")
    def _ordered(self) -> DateWindow:
        if self.end < self.start:
            raise ValueError("the window's end is before its start")
        return self

    def bounds(self) -> Window:
        start = datetime.combine(self.start, clock.min, tzinfo=UTC)
        return start, datetime.combine(self.end, clock.min, tzinfo=UTC) + timedelta(days=1)


ORCHESTRATION = load_settings().orchestration
TASK_RUNNER = task_runner_for(ORCHESTRATION)


def _run_id() -> str:
    return flow_run.get_id() or str(uuid.uuid4())


def _ingest(
    run_id: str, sources: list[Source], window: Window | None = None, reread: bool = False
) -> list[IngestReport]:
    """Plan each source, read its batches in parallel (worker processes with the default runner,
    see ``batch_runner``), then commit each source's batches to bronze at once."""
    chosen = [str(s) for s in dict.fromkeys(sources)]
    with holding([ingest_limit(s) for s in chosen]):
        plans = [plan_ingest.submit(s, window, reread) for s in chosen]
        planned = [p.result() for p in plans]
        total = sum(len(p.batches) for p in planned)
        progress = create_progress_artifact(  # sync in a sync flow
            progress=0.0,
            key="patient-journey-ingest-progress",
            description=f"Ingestion tasks finished, of {total} ({sum(p.inputs for p in planned)} input files)",
        )
        assert isinstance(progress, UUID)
        with batch_runner(ORCHESTRATION, max((len(p.batches) for p in planned), default=0)) as runner:

            def submit(batch: IngestBatch) -> PrefectFuture[IngestReport]:
                if runner is None:
                    return ingest_batch.submit(batch, run_id, window, reread)
                parameters = {"batch": batch, "run_id": run_id, "window": window, "reread": reread}
                return runner.submit(ingest_batch, parameters)

            futures = {submit(batch): batch for p in planned for batch in p.batches}
            return _commit_as_read(planned, futures, progress, total)


def _commit_as_read(
    planned: list[IngestPlan],
    futures: dict[PrefectFuture[IngestReport], IngestBatch],
    progress: UUID,
    total: int,
) -> list[IngestReport]:
    """Move the progress artifact as batches finish; commit each source once its batches are read.
    Reports are kept by (source, batch number): a batch itself hashes all its listed files."""
    reports: dict[str, dict[int, IngestReport]] = {p.source: {} for p in planned}
    commits: dict[str, PrefectFuture[IngestReport]] = {}

    def commit_when_read(plan: IngestPlan) -> None:
        read = reports[plan.source]
        if plan.source not in commits and len(read) == len(plan.batches):
            parts = [read[number] for number in sorted(read)]
            commits[plan.source] = commit_ingest.submit(plan.source, parts, plan.pending_inputs)

    for plan in planned:
        commit_when_read(plan)  # a source with nothing new commits (nothing) at once
    by_source = {p.source: p for p in planned}
    for done, future in enumerate(as_completed(list(futures)), start=1):
        batch = futures[future]
        reports[batch.source][batch.number] = future.result()
        update_progress_artifact(progress, 100.0 * done / total if total else 100.0)
        commit_when_read(by_source[batch.source])
    if total == 0:
        update_progress_artifact(progress, 100.0)
    return [commits[p.source].result() for p in planned]


def _build(summary: RunSummary, rebuild: bool) -> None:
    """Stage, gate and link; then the journey. Holds the warehouse and every source's limit."""
    with holding([WAREHOUSE_LIMIT, *(ingest_limit(s) for s in SOURCES)]):
        summary.silver = build_silver(summary.run_id, rebuild)
        if summary.silver.built:
            start_data_docs()  # the Data Docs renderer's imports overlap gold
            summary.gold = build_gold(summary.run_id)


def _finish(summary: RunSummary, started: float) -> RunSummary:
    summary.seconds = round(time.perf_counter() - started, 2)
    check_quarantine_share(summary)
    publish_summary(summary)
    warning = check_linkage_floor(summary)
    if warning is None:
        return summary
    # A returned state is the run's final state (shown in the UI with its message); whoever
    # calls the flow still gets the summary, its data.
    return Completed(name="Completed with warnings", message=warning, data=summary)  # type: ignore[return-value]


@flow(name="ingest", task_runner=TASK_RUNNER, log_prints=False)
def ingest(sources: list[Source] = ALL_SOURCES, kinds: list[SourceKind] | None = None) -> RunSummary:
    """Read new inputs of the chosen sources into bronze (nothing is read twice).

    Args:
        sources: Sources to read (the form lists every registered source; docs/sources.md
            describes each).
        kinds: Read only the sources of these kinds (ehr, device, outcome) among them: a
            deployment that reads a kind reads a source added later without being edited.
    """
    started, summary = time.perf_counter(), RunSummary(run_id=_run_id(), flow="ingest")
    preflight()
    if kinds is not None:
        sources = [s for s in sources if PLUGINS[str(s)].kind in kinds]
    summary.ingests = _ingest(summary.run_id, sources)
    require_input(summary.ingests)
    return _finish(summary, started)


@flow(name="journey-build", task_runner=TASK_RUNNER, log_prints=False)
def journey_build(rebuild: bool = False) -> RunSummary:
    """Stage, validate and link bronze into silver, then build the gold journey tables.

    Args:
        rebuild: Rebuild silver and gold whole (every record resolved, gated and linked again), even
            when no new input arrived since the last build.
    """
    started, summary = time.perf_counter(), RunSummary(run_id=_run_id(), flow="journey-build")
    preflight()
    with data_docs_renderer():
        _build(summary, rebuild)
        return _finish(summary, started)


@flow(name="backfill", task_runner=TASK_RUNNER, log_prints=False)
def backfill(window: DateWindow, sources: list[Source] = ALL_SOURCES, reread: bool = False) -> RunSummary:
    """Read the inputs that landed in a date window, then rebuild the warehouse.

    Args:
        window: Landing days (UTC) to read: files modified on those days; registry rows
            updated since the window's start.
        sources: Sources to backfill.
        reread: Read inputs of the window again even if already read (nothing loads twice:
            records read again are collapsed by staging).
    """
    started, summary = time.perf_counter(), RunSummary(run_id=_run_id(), flow="backfill")
    preflight()
    with data_docs_renderer():
        summary.ingests = _ingest(summary.run_id, sources, window.bounds(), reread)
        _build(summary, rebuild=True)
        return _finish(summary, started)


@flow(name="patient-journey", task_runner=TASK_RUNNER, log_prints=False)
def patient_journey(sources: list[Source] | None = None, rebuild: bool = False) -> RunSummary:
    """Load new device, EHR and outcome inputs and rebuild the patient-journey warehouse.

    Args:
        sources: Sources to read (default: every registered source).
        rebuild: Rebuild silver and gold even when no new input arrived.
    """
    started, summary = time.perf_counter(), RunSummary(run_id=_run_id())
    preflight()
    with data_docs_renderer():
        summary.ingests = _ingest(summary.run_id, sources or ALL_SOURCES)
        require_input(summary.ingests)
        _build(summary, rebuild)
        return _finish(summary, started)
