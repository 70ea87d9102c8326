"""`journey demo` a second time: the same key and warehouse (patient keys do not change), nothing
read twice, the served stack's Prefect home untouched; other options need `--fresh`."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from journey_cli import app
from patient_journey.lake import Lake, gold
from patient_journey.settings import load_settings

pytestmark = pytest.mark.prefect


@pytest.fixture
def own_environment() -> Iterator[None]:
    """`journey demo` sets its settings in os.environ for its own run (a CLI process ends with
    them); in-process, they must not reach the tests after this one."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _patient_keys(data: Path) -> set[str]:
    settings = load_settings(
        storage={
            "landing_url": str(data / "landing"),
            "warehouse_url": str(data / "warehouse"),
            "restricted_url": str(data / "restricted"),
        },
        identity={"patient_key": "unused-here-0123456789abcdef0123456789abcdef"},
    )
    table = Lake(settings).read(gold("surgical_episode"), ["patient_key"])
    assert table is not None
    return set(table.column("patient_key").to_pylist())


def test_a_second_demo_keeps_its_key_and_warehouse_and_the_served_home(
    harness: None, own_environment: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("JOURNEY_IDENTITY__PATIENT_KEY", "JOURNEY_IDENTITY__PATIENT_KEY_FILE"):
        monkeypatch.delenv(name, raising=False)
    data = tmp_path / "journey-data"
    served_home = data / "prefect" / "server.log"
    served_home.parent.mkdir(parents=True)
    served_home.write_text("a running `journey serve` keeps its home here")
    runner = CliRunner()
    arguments = ["demo", "--patients", "12", "--data-dir", str(data)]
    first = runner.invoke(app, arguments, env={"COLUMNS": "200"})
    assert first.exit_code == 0, first.output
    assert str(data.resolve() / "warehouse") in first.output  # an absolute path
    keys = _patient_keys(data)
    second = runner.invoke(app, arguments, env={"COLUMNS": "200"})
    assert second.exit_code == 0, second.output
    assert (
        "Using the generated sources" in second.output
        and "Created a local demo patient key" not in second.output
    )
    assert _patient_keys(data) == keys and len(keys) == 12
    assert served_home.read_text().startswith("a running")
    other = runner.invoke(app, ["demo", "--patients", "13", "--data-dir", str(data)], env={"COLUMNS": "200"})
    assert other.exit_code == 2 and "--fresh" in other.output
    fresh = runner.invoke(app, [*arguments, "--fresh"], env={"COLUMNS": "200"})
    assert fresh.exit_code == 0, fresh.output
    assert _patient_keys(data).isdisjoint(keys)  # a new key
    assert served_home.exists()
