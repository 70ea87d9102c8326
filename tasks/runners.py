"""The task runner of the flows, chosen by settings (JOURNEY_ORCHESTRATION__TASK_RUNNER)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, cast

from prefect.futures import PrefectFuture
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

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
