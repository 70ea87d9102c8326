"""Hermetic tests: no developer config, Prefect in its own home, data in tmp folders."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from prefect.testing.utilities import prefect_test_harness

from patient_journey.generate import GenerationResult, generate
from patient_journey.settings import JourneySettings, load_settings

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TEST_KEY = "test-patient-key-0123456789abcdef0123456789abcdef"


@pytest.fixture(scope="session", autouse=True)
def _isolated_environment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    for name in [n for n in os.environ if n.startswith("JOURNEY_")]:
        del os.environ[name]
    home = tmp_path_factory.mktemp("prefect-home")
    os.environ.update(
        {
            "PREFECT_HOME": str(home),
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
            "DO_NOT_TRACK": "1",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_LOGGING_LEVEL": "WARNING",
        }
    )
    yield


def settings_for(root: Path, landing: Path | None = None, key: str | None = TEST_KEY) -> JourneySettings:
    return load_settings(
        storage={
            "landing_url": str(landing or root / "landing"),
            "warehouse_url": str(root / "warehouse"),
            "restricted_url": str(root / "restricted"),
        },
        identity={"patient_key": key},
        sources={"settle_seconds": 0},  # generated files are complete: read them at once
    )


def use_settings_env(monkeypatch: pytest.MonkeyPatch, settings: JourneySettings) -> None:
    """The flow's tasks read settings from the environment, as in production."""
    for section in ("storage", "azure", "sources"):
        for name, value in getattr(settings, section).model_dump().items():
            if value is not None:
                text = value.get_secret_value() if hasattr(value, "get_secret_value") else str(value)
                monkeypatch.setenv(f"JOURNEY_{section.upper()}__{name.upper()}", text)
    monkeypatch.setenv("JOURNEY_IDENTITY__PATIENT_KEY", TEST_KEY)


from tests.prefect_stack import served, served_client, served_runs  # noqa: E402, F401 - a real served stack


@pytest.fixture(scope="session")
def harness() -> Iterator[None]:
    """One temporary Prefect server for every flow test of the session."""
    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="session")
def generated(tmp_path_factory: pytest.TempPathFactory) -> GenerationResult:
    """A small generated population with planted bad records (shared, read-only)."""
    return generate(tmp_path_factory.mktemp("generated"), patients=120, seed=20261123, bad_rate=0.03)


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"The public test files are missing: expected them at {SHARED_DATA} (../shared/data).")
    return SHARED_DATA
