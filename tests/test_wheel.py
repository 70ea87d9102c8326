"""The built wheel is the product: installed into a fresh virtual environment, outside the
checkout, it gives a working ``journey`` with its suites, catalogs and deployments as package data."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _clean_env() -> dict[str, str]:
    """This environment without our settings, Prefect's, or a PYTHONPATH that would show pip the
    checkout (whose build leaves an egg-info there) as an installed patient-journey."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("JOURNEY_", "PREFECT_", "PYTHONPATH"))}


def _run(command: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: int = 600) -> str:
    env = env if env is not None else _clean_env()
    done = subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, f"{command} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel alone; its dependencies come from this venv's site-packages
    (one path line, no .pth of this venv, so the checkout's editable install is not seen)."""
    work = tmp_path_factory.mktemp("wheel")
    _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(work / "dist"), str(ROOT)],
        cwd=work,
    )
    [wheel] = sorted((work / "dist").glob("patient_journey-*.whl"))
    _run([sys.executable, "-m", "venv", str(work / "venv")], cwd=work)
    python = work / "venv" / "bin" / "python"
    _run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", str(wheel)], cwd=work)
    site = _run([str(python), "-c", "import site; print(site.getsitepackages()[0])"], cwd=work).strip()
    (Path(site) / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return work / "venv"


def test_the_installed_wheel_runs_the_demo_outside_the_checkout(installed: Path, tmp_path: Path) -> None:
    python, journey = installed / "bin" / "python", installed / "bin" / "journey"
    env = _clean_env() | {
        "PATH": f"{installed / 'bin'}:{os.environ.get('PATH', '')}",
        "COLUMNS": "200",
        "PREFECT_HOME": str(tmp_path / "prefect"),
    }
    where = _run(
        [
            str(python),
            "-c",
            "import patient_journey.settings as s; print(s.shipped('expectations')); print(s.shipped('catalog', 'devices'))",
        ],
        cwd=tmp_path,
        env=env,
    )
    assert all(line.startswith(str(installed)) for line in where.split()), (
        where
    )  # the wheel's data, not the checkout's
    output = _run([str(journey), "demo", "--patients", "30"], cwd=tmp_path, env=env)
    assert "Warehouse:" in output
    answer = _run(
        [str(journey), "query", "select count(*) as n from surgical_episode", "-o", "csv"],
        cwd=tmp_path,
        env=env,
    )
    assert answer.splitlines()[0] == '"n"' and int(answer.splitlines()[1]) > 0
    assert "gold.surgical_episode" in _run([str(journey), "tables"], cwd=tmp_path, env=env)
