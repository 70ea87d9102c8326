"""The deployments of infra/prefect.yaml on a real Prefect server, run by a real worker: the
ingestion runs, their artifacts, the journey build their completion triggers, the alert."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    DeploymentFilter,
    DeploymentFilterName,
    FlowRunFilter,
)
from prefect.client.schemas.objects import FlowRun

from patient_journey.lake import Lake, gold
from tests.conftest import settings_for
from tests.journey_checks import truth
from tests.prefect_stack import DEPLOYMENTS, Served, artifacts_of, markdowns_of, wait_for

pytestmark = pytest.mark.prefect

SUMMARY = "patient-journey-summary"
PROGRESS = "patient-journey-ingest-progress"


def test_the_deployments_carry_schedules_triggers_and_typed_parameters(
    served_client: SyncPrefectClient, served_runs: dict[str, list[FlowRun]]
) -> None:
    by_name = {
        d.name: d
        for d in served_client.read_deployments(
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=list(DEPLOYMENTS)))
        )
    }
    device = by_name["ingest-device"].schedules[0].schedule
    assert getattr(device, "interval", None) is not None and device.interval.total_seconds() == 900
    assert getattr(by_name["ingest-ehr"].schedules[0].schedule, "cron", None) == "0 2 * * *"
    # each reads a kind of source, so a source added later is read without editing the deployments
    assert by_name["ingest-device"].parameters == {"kinds": ["device"]}
    assert by_name["ingest-ehr"].parameters == {"kinds": ["ehr"]}
    assert by_name["ingest-outcomes"].parameters == {"kinds": ["outcome"]}
    window = by_name["backfill"].parameter_openapi_schema["properties"]["window"]
    assert "allOf" in window or "$ref" in window
    definitions = by_name["backfill"].parameter_openapi_schema["definitions"]
    assert definitions["DateWindow"]["properties"]["start"]["format"] == "date"
    assert definitions["DateWindow"]["properties"]["start"]["description"]
    assert by_name["backfill"].parameter_openapi_schema["properties"]["reread"]["description"]
    automations = served_client.read_automations_by_name("patient-journey quarantine share exceeded")
    assert len(automations) == 1
    build = served_client.read_automations_by_name("patient-journey build after ingestion")
    assert len(build) == 1 and build[0].description.startswith(
        "Runs journey-build"
    )  # named, not automation_1


def test_every_ingestion_run_completes_with_its_artifacts(
    served: Served,
    served_client: SyncPrefectClient,
    served_runs: dict[str, list[FlowRun]],
) -> None:
    for run in served_runs["ingest"]:
        assert run.state is not None and run.state.type.value == "COMPLETED", run.state
        artifacts = artifacts_of(served_client, run)
        assert {SUMMARY, PROGRESS} <= set(artifacts), artifacts.keys()
        assert artifacts[PROGRESS].data == 100.0
        assert "## Sources" in artifacts[SUMMARY].data
        tasks = {
            t.name for t in served_client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [run.id]}))
        }
        assert any(name.startswith("ingest ") for name in tasks), tasks
    device = next(r for r in served_runs["ingest"] if r.parameters == {"kinds": ["device"]})
    names = {
        t.name for t in served_client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [device.id]}))
    }
    # a batch is named by its source, number and size, never by a file (a path can carry a name)
    assert any(re.fullmatch(r"ingest device 1/\d+: [\d,]+ files?", n) for n in names), names
    assert not any("/device/" in n or n.endswith((".avro", ".json")) for n in names), names


def test_the_journey_build_is_triggered_and_loads_the_ground_truth(
    served: Served,
    served_client: SyncPrefectClient,
    served_runs: dict[str, list[FlowRun]],
) -> None:
    builds = served_runs["build"]
    assert all(r.state is not None and r.state.type.value == "COMPLETED" for r in builds)
    assert {r.created_by.type for r in builds if r.created_by} <= {"AUTOMATION"}
    lake = Lake(settings_for(served.root, landing=served.generated.out / "landing"))
    episodes = lake.read(gold("surgical_episode"))
    assert episodes is not None and episodes.num_rows == served.generated.episodes
    summaries = {r.id: markdowns_of(served_client, r) for r in builds}
    built = [r for r in builds if any("## Tables" in text for text in summaries[r.id])]
    outcomes = [
        line for texts in summaries.values() for t in texts for line in t.splitlines() if "Warehouse" in line
    ]
    assert built, (
        f"no triggered build published a loaded warehouse's summary: {outcomes} ({len(builds)} builds)"
    )
    last = max(built, key=lambda r: r.expected_start_time or r.created)
    artifacts = artifacts_of(served_client, last)
    markdown = artifacts[SUMMARY].data
    assert f"| surgical_episode | {served.generated.episodes} | {served.generated.episodes} |" in markdown
    assert "quarantine: quarantine.record" in markdown and "Data Docs" in markdown
    assert artifacts["patient-journey-data-docs"].type == "markdown"  # a link artifact
    rows = artifacts["patient-journey-expectations"].data
    rows = json.loads(rows) if isinstance(rows, str) else rows
    assert rows and {"table", "rule", "outcome", "unexpected_count"} <= set(rows[0])
    assert any(r["outcome"] == "failed" for r in rows)  # planted bad records break row rules
    docs = markdown.split("Data Docs (counts only): [")[1].split("]")[0]
    index = Path(docs).read_text()
    assert "staged.observation" in index


def test_no_patient_value_reaches_an_artifact_and_the_alert_fires(
    served: Served,
    served_client: SyncPrefectClient,
    served_runs: dict[str, list[FlowRun]],
) -> None:
    runs = served_runs["ingest"] + served_runs["build"]
    texts = [
        str(a.data)
        for run in runs
        for a in served_client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id]))
        )
    ]
    rows = truth(served.generated, "episodes.csv")
    for row in rows:
        assert not any(row["mrn"] in text or row["case_id"] in text for text in texts)
    alert = wait_for(lambda: served.webhook.received, 120, "the quarantine alert's webhook call")
    assert "quarantine" in str(alert[0]).lower()
    assert not any(row["mrn"] in str(alert) for row in rows)
