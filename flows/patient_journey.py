"""The ``patient-journey`` flow: ingest each source, gate and link, build the journey, report.

Reads like the README's architecture paragraph; all logic lives in the library.
"""

from __future__ import annotations

import time
import uuid

from prefect import flow
from prefect.runtime import flow_run

from patient_journey.pipeline import SOURCES
from patient_journey.report import RunSummary
from tasks.journey import build_gold, build_silver, ingest, preflight, publish_summary


@flow(name="patient-journey", log_prints=False)
def patient_journey(sources: list[str] | None = None, rebuild: bool = False) -> RunSummary:
    """Load new device, EHR and outcome inputs and rebuild the patient-journey warehouse.

    Args:
        sources: which sources to read (default: all of fhir, device, registry, redcap).
        rebuild: rebuild silver and gold even when no new input arrived.
    """
    started = time.perf_counter()
    run_id = flow_run.get_id() or str(uuid.uuid4())
    preflight()
    chosen = list(sources or SOURCES)
    futures = [ingest.with_options(name=f"ingest-{source}").submit(source, run_id) for source in chosen]
    summary = RunSummary(run_id=run_id, ingests=[future.result() for future in futures])
    summary.silver = build_silver(run_id, rebuild)
    if summary.silver.built:
        summary.gold = build_gold(run_id)
    summary.seconds = round(time.perf_counter() - started, 2)
    publish_summary(summary)
    return summary
