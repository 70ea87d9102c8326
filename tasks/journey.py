"""Prefect tasks around the library's pipeline steps. Settings come from the environment in
each task (never as parameters: they may hold secrets), and tasks hand each other reports,
not data frames: the data lives in the lake."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_markdown_artifact

from patient_journey import pipeline
from patient_journey.pipeline import BuildReport, IngestReport
from patient_journey.report import RunSummary, render_markdown
from tasks.settings import journey_settings


@task(name="preflight")
def preflight() -> int:
    """Key configured, every suite present and parsable: fail before anything loads."""
    return pipeline.preflight(journey_settings())


@task(name="ingest", retries=2, retry_delay_seconds=[2, 10])
def ingest(source: str, run_id: str) -> IngestReport:
    return pipeline.ingest(journey_settings(), source, run_id)


@task(name="stage-validate-link")
def build_silver(run_id: str, rebuild: bool) -> BuildReport:
    return pipeline.build_silver(journey_settings(), run_id, force=rebuild)


@task(name="build-journey")
def build_gold(run_id: str) -> BuildReport:
    return pipeline.build_gold(journey_settings(), run_id)


@task(name="publish-summary")
def publish_summary(summary: RunSummary) -> str:
    markdown = render_markdown(summary)
    create_markdown_artifact(
        key="patient-journey-summary", markdown=markdown, description="Rows read, loaded, quarantined, held"
    )
    return markdown
