"""The task runner of the flows, chosen by settings (JOURNEY_ORCHESTRATION__TASK_RUNNER)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

from prefect.client.orchestration import get_client
from prefect.futures import PrefectFuture
from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner, ThreadPoolTaskRunner

from patient_journey.settings import OrchestrationSettings

Runner = TaskRunner[PrefectFuture[Any]]


def task_runner_for(settings: OrchestrationSettings) -> Runner:
    """``default``: Prefect's thread pool in the flow-run process (``threads`` at once). ``dask``: prefect-dask's
    DaskTaskRunner on the cluster at ``dask_address``, or on a LocalCluster of
    ``dask_workers`` processes started for the run (dashboard on a free port, scratch in
    ``dask_local_directory``). Tasks pass URIs and reports, so either gives the same warehouse."""
    if settings.task_runner == "default":
        return cast(Runner, ThreadPoolTaskRunner(max_workers=settings.threads))
    from prefect_dask.task_runners import DaskTaskRunner

    if settings.dask_address:
        return cast(Runner, DaskTaskRunner(address=settings.dask_address))
    scratch = settings.dask_local_directory or Path(tempfile.gettempdir()) / "patient-journey-dask"
    runner = DaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs={
            "n_workers": settings.dask_workers,
            "threads_per_worker": settings.dask_threads_per_worker,
            "processes": True,
            "dashboard_address": ":0",
            "local_directory": str(scratch),
        },
    )
    return cast(Runner, runner)


@contextmanager
def batch_runner(settings: OrchestrationSettings, batches: int) -> Iterator[Runner | None]:
    """Where ingestion batches run. With the default runner and a source of ``batches`` > 1
    batches: a pool of ``ingest_processes`` processes (Prefect's ProcessPoolTaskRunner), since
    reading is Python work and threads share one core (at 5,200 patients, four threads read the device blobs in
    28.6 s, one in 15.5 s, two processes in 10.2 s). Otherwise None: the flow's own runner.

    The workers report to the flow's Prefect API; on a temporary server (no PREFECT_API_URL,
    e.g. `journey run`) they are given its address, so they do not each start their own."""
    processes = min(settings.ingest_processes or os.cpu_count() or 1, batches)
    if settings.task_runner != "default" or processes < 2:
        yield None
        return
    with get_client(sync_client=True) as client:
        api_url = str(client.api_url)
    runner = ProcessPoolTaskRunner(max_workers=processes, initializer=_report_to, initargs=(api_url,))
    with runner:
        yield cast(Runner, runner)


def _report_to(api_url: str) -> None:
    """In a worker process, before any task: use the flow's Prefect API."""
    os.environ["PREFECT_API_URL"] = api_url
