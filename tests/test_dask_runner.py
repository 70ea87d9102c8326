"""The flow on a Dask LocalCluster of two worker processes loads the same warehouse as on
Prefect's default task runner."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from flows.journey import patient_journey
from patient_journey.generate import GenerationResult, generate
from patient_journey.lake import Lake, Zone
from patient_journey.report import RunSummary
from patient_journey.settings import load_settings
from tasks.runners import task_runner_for
from tests.conftest import settings_for, use_settings_env

pytestmark = pytest.mark.prefect
RUN_COLUMNS = {"run_id", "ingested_at", "processed_at"}  # differ between any two runs


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> GenerationResult:
    return generate(tmp_path_factory.mktemp("dask-generated"), patients=25, seed=11, bad_rate=0.04)


def run(root: Path, small: GenerationResult, runner: str, scratch: Path) -> RunSummary:
    settings = settings_for(root, landing=small.out / "landing")
    with pytest.MonkeyPatch.context() as monkeypatch:
        use_settings_env(monkeypatch, settings)
        monkeypatch.setenv("JOURNEY_ORCHESTRATION__INGEST_BATCH_FILES", "40")
        monkeypatch.setenv("JOURNEY_ORCHESTRATION__TASK_RUNNER", runner)
        monkeypatch.setenv("JOURNEY_ORCHESTRATION__DASK_WORKERS", "2")
        monkeypatch.setenv("JOURNEY_ORCHESTRATION__DASK_LOCAL_DIRECTORY", str(scratch))
        task_runner = task_runner_for(load_settings().orchestration)
        assert type(task_runner).__name__ == (
            "DaskTaskRunner" if runner == "dask" else "ThreadPoolTaskRunner"
        )
        return patient_journey.with_options(task_runner=task_runner)()


def canonical(table: pa.Table) -> list[str]:
    """The table's rows without the run columns, as sorted JSON texts (order-free comparison)."""
    table = table.drop_columns([c for c in table.column_names if c in RUN_COLUMNS])
    return sorted(json.dumps(row, sort_keys=True, default=str) for row in table.to_pylist())


def test_dask_and_the_default_runner_load_identical_warehouses(
    harness: None, small: GenerationResult, tmp_path: Path
) -> None:
    default = run(tmp_path / "default", small, "default", tmp_path / "scratch")
    on_dask = run(tmp_path / "dask", small, "dask", tmp_path / "scratch")
    device = next(i for i in on_dask.ingests if i.source == "device")
    assert device.new_inputs > 40  # several batches of files, spread over the two workers
    assert [(i.source, i.records, i.rejects) for i in on_dask.ingests] == [
        (i.source, i.records, i.rejects) for i in default.ingests
    ]
    lakes = {name: Lake(settings_for(tmp_path / name)) for name in ("default", "dask")}
    compared = 0
    for layer in ("silver", "gold"):
        names = {
            name: sorted(t.name for t in lake.tables(Zone.WAREHOUSE, layer)) for name, lake in lakes.items()
        }
        assert names["default"] == names["dask"] and names["default"], layer
        for ref in lakes["default"].tables(Zone.WAREHOUSE, layer):
            expected, actual = (lakes[name].read(ref) for name in ("default", "dask"))
            assert expected is not None and actual is not None
            assert expected.num_rows > 0 or layer == "silver", ref.label
            assert canonical(actual) == canonical(expected), ref.label
            compared += 1
    assert compared >= 10
