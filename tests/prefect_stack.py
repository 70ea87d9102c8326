"""A real local Prefect stack for the deployment and UI tests: `prefect server start`, a process
work pool and worker, `prefect deploy` from infra/prefect.yaml (what `journey serve` runs), and
a webhook that the sample quarantine alert posts to."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    DeploymentFilter,
    DeploymentFilterName,
    FlowRunFilter,
    FlowRunFilterDeploymentId,
)
from prefect.client.schemas.objects import FlowRun
from prefect.settings import PREFECT_API_URL, temporary_settings

from patient_journey.generate import GenerationResult, generate
from patient_journey.operate import LocalPrefect, free_port

INGESTION = ("ingest-device", "ingest-ehr", "ingest-outcomes")
DEPLOYMENTS = {*INGESTION, "journey-build", "backfill", "patient-journey"}
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def require_or_skip(ok: bool, message: str) -> None:
    """Under CI a missing prerequisite fails with a clear message; elsewhere the test skips."""
    if ok:
        return
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message)
    pytest.skip(message)


@dataclass
class Webhook:
    port: int
    received: list[dict[str, object]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/alert"


def start_webhook() -> tuple[Webhook, ThreadingHTTPServer]:
    hook = Webhook(free_port())

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            hook.received.append(json.loads(body or b"{}"))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", hook.port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return hook, server


@dataclass
class Served:
    stack: LocalPrefect
    generated: GenerationResult
    root: Path
    webhook: Webhook


@pytest.fixture(scope="session")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """The stack, serving a small generated population (with planted bad records)."""
    from tests.conftest import TEST_KEY

    root = tmp_path_factory.mktemp("served")
    generated = generate(root / "generated", patients=30, seed=7, bad_rate=0.05)
    hook, hook_server = start_webhook()
    env = {
        "JOURNEY_STORAGE__LANDING_URL": str(generated.out / "landing"),
        "JOURNEY_STORAGE__WAREHOUSE_URL": str(root / "warehouse"),
        "JOURNEY_STORAGE__RESTRICTED_URL": str(root / "restricted"),
        "JOURNEY_IDENTITY__PATIENT_KEY": TEST_KEY,
        "JOURNEY_SOURCES__SETTLE_SECONDS": "0",
        "JOURNEY_ORCHESTRATION__INGEST_BATCH_FILES": "200",
        "JOURNEY_ORCHESTRATION__QUARANTINE_SHARE_THRESHOLD": "0.001",
        "JOURNEY_ORCHESTRATION__ALERT_WEBHOOK_URL": hook.url,
        "PREFECT_LOGGING_LEVEL": "INFO",
    }
    stack = LocalPrefect(home=root / "prefect-home", port=free_port(), poll_seconds=2, extra_env=env)
    try:
        stack.start()
        yield Served(stack, generated, root, hook)
    finally:
        stack.stop()
        hook_server.shutdown()


@pytest.fixture(scope="session")
def served_client(served: Served) -> Iterator[SyncPrefectClient]:
    """A client of the served stack. The setting is only in force while the client is made: kept
    for the session, it sent every later flow test's runs (the harness's) to the served server."""
    with temporary_settings({PREFECT_API_URL: served.stack.api_url}):
        client = get_client(sync_client=True)
    with client as c:
        yield c


def wait_for(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def runs_of(client: SyncPrefectClient, deployment_id: UUID) -> list[FlowRun]:
    return client.read_flow_runs(
        flow_run_filter=FlowRunFilter(deployment_id=FlowRunFilterDeploymentId(any_=[deployment_id]))
    )


def artifacts_of(client: SyncPrefectClient, run: FlowRun) -> dict[str, Any]:
    """A run's artifacts by key. Not by type: Prefect stores a link artifact as markdown, so a
    run has two markdown artifacts and which one a by-type map kept depended on their order."""
    found = client.read_artifacts(
        artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id]))
    )
    return {a.key: a for a in found if a.key}


def markdowns_of(client: SyncPrefectClient, run: FlowRun) -> list[str]:
    """Every markdown artifact of a run (a retried task may publish more than one)."""
    found = client.read_artifacts(
        artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id]))
    )
    return [str(a.data) for a in found if a.type == "markdown"]


@pytest.fixture(scope="session")
def served_runs(served: Served, served_client: SyncPrefectClient) -> dict[str, list[FlowRun]]:
    """Run the three ingestion deployments through the worker and wait for the builds they trigger."""
    deployments = {
        d.name: d
        for d in served_client.read_deployments(
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=list(DEPLOYMENTS)))
        )
    }
    assert set(deployments) == DEPLOYMENTS
    for deployment in deployments.values():  # no scheduled run may interfere with the test's own
        for schedule in deployment.schedules:
            served_client.update_deployment_schedule(deployment.id, schedule.id, active=False)
    started = [served_client.create_flow_run_from_deployment(deployments[name].id) for name in INGESTION]

    def ingestion_done() -> bool:
        states = [served_client.read_flow_run(run.id).state for run in started]
        return all(s is not None and s.type.value in TERMINAL for s in states)

    wait_for(ingestion_done, 420, "the ingestion runs")
    build = deployments["journey-build"]

    def builds_done() -> list[FlowRun] | None:
        runs = runs_of(served_client, build.id)
        if len(runs) >= len(INGESTION) and all(r.state and r.state.type.value in TERMINAL for r in runs):
            return runs
        return None

    builds = wait_for(builds_done, 420, "the journey builds triggered by the ingestion runs")
    return {"ingest": [served_client.read_flow_run(run.id) for run in started], "build": builds}
