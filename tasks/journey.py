"""Prefect tasks around the library's pipeline steps. Settings come from the environment in
each task (never as parameters: they may hold secrets), and tasks hand each other URIs and
reports, not data frames: the data lives in the lake.

Retries: only an error the library marks as transient (``StorageError.transient``: a timeout, a
throttled or unavailable storage service) is retried, with backoff; a wrong key, a missing
container or a failed quality gate fails at once.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from prefect import Task, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import State, TaskRun
from prefect.events import emit_event

from patient_journey import pipeline
from patient_journey.data_docs import DataDocsRenderer
from patient_journey.errors import StorageError
from patient_journey.pipeline import BuildReport, IngestBatch, IngestPlan, IngestReport, Window
from patient_journey.report import (
    LINKAGE_EVENT,
    QUARANTINE_EVENT,
    RunSummary,
    linkage_warning,
    quarantine_locations,
    render_markdown,
    write_data_docs,
)
from tasks.settings import journey_settings

RETRY_DELAYS = [2, 10, 30]  # seconds: backoff between attempts


def is_transient(error: BaseException | None) -> bool:
    """A StorageError marked transient, itself or as the cause of the error raised."""
    while error is not None:
        if isinstance(error, StorageError):
            return error.transient
        error = error.__cause__
    return False


def retry_transient_only(_task: Task[..., Any], _task_run: TaskRun, state: State[Any]) -> bool:
    """``retry_condition_fn``: retry only transient storage errors."""
    try:
        error = state.result(raise_on_failure=False)
    except Exception as exc:  # the failure could not even be read back: do not retry blindly
        error = exc if isinstance(exc, StorageError) else None
    return isinstance(error, BaseException) and is_transient(error)


# Every task reads the lake's current state, so none may be answered from a cache (and hashing
# a batch's thousands of listed files for a cache key is work for nothing).
RETRYING: dict[str, Any] = {
    "cache_policy": NO_CACHE,
    "retries": len(RETRY_DELAYS),
    "retry_delay_seconds": RETRY_DELAYS,
    "retry_jitter_factor": 0.2,
    "retry_condition_fn": retry_transient_only,
}


@task(name="preflight", **RETRYING)
def preflight() -> int:
    """Key configured, every suite present and parsable, every zone reachable: fail before
    anything loads."""
    return pipeline.preflight(journey_settings())


@task(name="plan-ingest", task_run_name="plan {source}", **RETRYING)
def plan_ingest(source: str, window: Window | None = None, reread: bool = False) -> IngestPlan:
    """List a source's new inputs and split them into batches (nothing is read yet)."""
    settings = journey_settings()
    orchestration = settings.orchestration
    return pipeline.plan_ingest(
        settings,
        source,
        orchestration.ingest_batch_files,
        window=window,
        reread=reread,
        batch_bytes=orchestration.ingest_batch_mib * 2**20,
    )


@task(name="ingest", task_run_name="ingest {batch.label}", **RETRYING)
def ingest(
    batch: IngestBatch, run_id: str, window: Window | None = None, reread: bool = False
) -> IngestReport:
    """Read one batch of a source's inputs and put its rows aside for the source's commit."""
    return pipeline.extract_batch(journey_settings(), batch, run_id, window=window, reread=reread)


@task(name="commit-ingest", task_run_name="commit {source}", **RETRYING)
def commit_ingest(source: str, batches: list[IngestReport], pending_inputs: int = 0) -> IngestReport:
    """Append a source's batches to bronze, its rejects and its ledger, one commit each."""
    return pipeline.commit_ingest(journey_settings(), source, batches, pending_inputs)


@task(name="stage-validate-link", **RETRYING)
def build_silver(run_id: str, rebuild: bool) -> BuildReport:
    return pipeline.build_silver(journey_settings(), run_id, force=rebuild)


@task(name="build-journey", **RETRYING)
def build_gold(run_id: str) -> BuildReport:
    return pipeline.build_gold(journey_settings(), run_id)


# The Data Docs renderer of the flow run in this process (``start_data_docs``).
_renderer: DataDocsRenderer | None = None


def start_data_docs() -> None:
    """Start the Data Docs renderer's process (GX's imports, seconds) so that they overlap the
    rest of the run; ``publish_summary`` uses it. A flow starts it after the silver build: the
    process holds about 300 MB, which would add to silver's peak memory."""
    global _renderer
    if _renderer is None:
        _renderer = DataDocsRenderer()


@contextmanager
def data_docs_renderer() -> Iterator[None]:
    """Around a flow that builds: the renderer ``start_data_docs`` started and nothing used is
    stopped at the end (a run that failed before its summary)."""
    global _renderer
    try:
        yield
    finally:
        renderer, _renderer = _renderer, None
        if renderer is not None:
            renderer.close()


@task(name="publish-summary", **RETRYING)
def publish_summary(summary: RunSummary) -> str:
    """The run's artifacts: the markdown summary, every expectation as a table, the Data Docs
    (counts only) and where the quarantine is. Counts, rule and table names, paths: no values."""
    global _renderer
    settings = journey_settings()
    summary.links.update(quarantine_locations(settings))
    renderer, _renderer = _renderer, None  # used once: a retry renders here
    try:
        docs = write_data_docs(settings, summary, renderer)
    except StorageError:
        raise
    except Exception as exc:  # the Data Docs are a view: their failure must not fail a loaded run
        get_run_logger().warning(
            "Data Docs not rendered (%s); the expectations table has every result.", type(exc).__name__
        )
        docs = None
    if docs is not None:
        summary.links["Great Expectations Data Docs (counts only)"] = docs
        create_link_artifact(
            link=docs if "://" in docs else f"file://{docs}",
            link_text="Data Docs of this run",
            key="patient-journey-data-docs",
            description="Great Expectations Data Docs rendered from counts (no values)",
        )
    rows = summary.expectation_rows()
    if rows:
        create_table_artifact(
            table=rows,
            key="patient-journey-expectations",
            description="Every expectation evaluated by this run: outcome and counts",
        )
    markdown = render_markdown(summary)
    create_markdown_artifact(
        key="patient-journey-summary",
        markdown=markdown,
        description="Rows read, loaded, quarantined, held; linkage; durations; versions",
    )
    return markdown


@task(name="check-quarantine-share", cache_policy=NO_CACHE)
def check_quarantine_share(summary: RunSummary) -> float | None:
    """Emit ``patient-journey.quarantine.threshold-exceeded`` when the run's quarantine share
    exceeds the configured threshold (JOURNEY_ORCHESTRATION__QUARANTINE_SHARE_THRESHOLD)."""
    threshold = journey_settings().orchestration.quarantine_share_threshold
    share = summary.quarantine_share()
    if share is not None and share > threshold:
        _emit_for_run(
            QUARANTINE_EVENT,
            summary,
            {
                "quarantine_share": round(share, 6),
                "threshold": threshold,
                "tables": {t.table: t.quarantined for t in summary.tables if t.quarantined},
                "rejected_at_read": {i.source: i.rejects for i in summary.ingests if i.rejects},
                # the same, for people: the alert's text reads these
                "share_text": f"{100 * share:.1f}%",
                "threshold_text": f"{100 * threshold:.1f}%",
                "tables_text": _counts_text(
                    {t.table: t.quarantined for t in summary.tables if t.quarantined}
                ),
                "rejected_text": _counts_text({i.source: i.rejects for i in summary.ingests if i.rejects}),
            },
        )
    return share


def _counts_text(counts: dict[str, int]) -> str:
    """``{"encounter": 12, "observation": 4}`` as ``encounter 12, observation 4`` (``none`` if empty)."""
    return ", ".join(f"{name} {count:,}" for name, count in sorted(counts.items())) or "none"


def _emit_for_run(event: str, summary: RunSummary, payload: dict[str, Any]) -> None:
    """An event on the run's resource (``patient-journey.run.<run id>``), counts only."""
    emit_event(
        event=event,
        resource={
            "prefect.resource.id": f"patient-journey.run.{summary.run_id}",
            "prefect.resource.name": summary.flow,
        },
        payload={"flow": summary.flow, **payload},
    )


@task(name="require-input", cache_policy=NO_CACHE)
def require_input(reports: list[IngestReport]) -> None:
    """Fail a first run that found no input at all (JOURNEY_SOURCES__ALLOW_EMPTY to allow it)."""
    pipeline.require_input(journey_settings(), reports)


@task(name="check-linkage-floor", cache_policy=NO_CACHE)
def check_linkage_floor(summary: RunSummary) -> str | None:
    """When a table linked fewer of its rows than JOURNEY_QUALITY__MIN_LINKAGE_RATE: emit
    ``patient-journey.linkage.below-floor`` and return the one-line warning the run ends with
    (its state "Completed with warnings"): a run whose records mostly wait for a patient must not
    look like a plain Completed. Everything it read is loaded or held all the same."""
    quality = journey_settings().quality
    below = summary.below_linkage_floor(quality.min_linkage_rate, quality.min_linkage_rows)
    if not below:
        return None
    _emit_for_run(
        LINKAGE_EVENT,
        summary,
        {
            "floor": quality.min_linkage_rate,
            "tables": {table: {"loaded": loaded, "held": held} for table, loaded, held in below},
        },
    )
    return linkage_warning(below, quality.min_linkage_rate)
