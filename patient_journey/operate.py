"""A local Prefect stack for operators: server, process work pool, worker, deployments.

``journey serve`` starts it and ``journey stop`` (or Ctrl-C) stops it. Everything runs as
subprocesses of the ``prefect`` CLI of this environment, so this module never imports Prefect.
The processes and their logs live in one folder (PREFECT_HOME, default ``journey-data/prefect``);
``serve.json`` there records what was started, so ``stop`` ends exactly those processes.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from patient_journey.errors import ConfigurationError
from patient_journey.settings import PROJECT_ROOT, shipped

PREFECT_FILE = shipped("infra", "prefect.yaml")
POOL = "patient-journey"
STATE_FILE = "serve.json"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _prefect() -> str:
    return str(Path(sys.executable).with_name("prefect"))


@dataclass
class LocalPrefect:
    """A Prefect server on 127.0.0.1, a process work pool with one worker, the deployments."""

    home: Path
    port: int = 4200
    pool: str = POOL
    poll_seconds: int = 5
    extra_env: dict[str, str] = field(default_factory=dict)
    server: subprocess.Popen[bytes] | None = None
    worker: subprocess.Popen[bytes] | None = None

    @property
    def ui_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_url(self) -> str:
        return f"{self.ui_url}/api"

    def environment(self) -> dict[str, str]:
        env = {**os.environ, **self.extra_env}
        env.update(
            {
                "PREFECT_HOME": str(self.home),
                "PREFECT_API_URL": self.api_url,
                "PREFECT_UI_API_URL": self.api_url,
                "DO_NOT_TRACK": "1",
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "PREFECT_WORKER_QUERY_SECONDS": str(self.poll_seconds),
                "PREFECT_RUNNER_POLL_FREQUENCY": str(self.poll_seconds),
                "PREFECT_WORKER_PREFETCH_SECONDS": str(self.poll_seconds),
            }
        )
        return env

    def _log(self, name: str) -> int:
        self.home.mkdir(parents=True, exist_ok=True)
        return os.open(self.home / f"{name}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def _run(self, *args: str) -> str:
        return self._command([_prefect(), *args], f"`prefect {' '.join(args)}`")

    def _command(self, command: list[str], what: str) -> str:
        done = subprocess.run(  # noqa: S603 - our own CLIs, fixed arguments
            command,
            cwd=PROJECT_ROOT,
            env=self.environment(),
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if done.returncode != 0:
            raise ConfigurationError(
                f"{what} failed (exit {done.returncode}): {done.stdout[-2000:]}{done.stderr[-2000:]}"
            )
        return done.stdout

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as answer:  # noqa: S310
                return bool(answer.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def _background(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        """``prefect ARGS`` in its own session, logging to ``<home>/<name>.log``."""
        log = self._log(name)
        try:
            return subprocess.Popen(  # noqa: S603 - our own CLI, fixed arguments
                [_prefect(), *args],
                cwd=PROJECT_ROOT,
                env=self.environment(),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            os.close(log)

    def start_server(self, timeout: float = 180) -> None:
        self.server = self._background(
            "server", "server", "start", "--host", "127.0.0.1", "--port", str(self.port)
        )
        self._save()
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if self.server.poll() is not None:
                raise ConfigurationError(
                    f"The Prefect server exited (code {self.server.returncode}); see {self.home / 'server.log'}."
                )
            if time.monotonic() > deadline:
                raise ConfigurationError(f"The Prefect server did not answer within {timeout:.0f} s.")
            time.sleep(0.5)

    def create_pool(self) -> None:
        self._run("work-pool", "create", self.pool, "--type", "process", "--overwrite")

    def deploy(self) -> str:
        """``prefect deploy --all`` from infra/prefect.yaml, as a data engineer would run it."""
        return self._run("--no-prompt", "deploy", "--all", "--prefect-file", str(PREFECT_FILE))

    def register_alerts(self) -> str:
        return self._command(
            [sys.executable, "-m", "flows.operations"], "Registering the alert automation"
        ).strip()

    def start_worker(self) -> None:
        self.worker = self._background("worker", "worker", "start", "--pool", self.pool, "--type", "process")
        self._save()

    def start(self) -> LocalPrefect:
        """Server, pool, deployments, alert automation (if a webhook is set), worker."""
        self.start_server()
        self.create_pool()
        self.deploy()
        self.register_alerts()
        self.start_worker()
        return self

    def _save(self) -> None:
        pids = {
            name: p.pid for name, p in (("server", self.server), ("worker", self.worker)) if p is not None
        }
        state = {"port": self.port, "pids": pids}
        (self.home / STATE_FILE).write_text(json.dumps(state))

    def stop(self, timeout: float = 30) -> None:
        """Stop the worker (SIGINT: it ignores SIGTERM), then the server."""
        for process in (self.worker, self.server):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGINT)
                try:
                    process.wait(timeout)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout)
        (self.home / STATE_FILE).unlink(missing_ok=True)


def stop_recorded(home: Path, timeout: float = 30) -> list[str]:
    """Stop the processes a ``journey serve`` recorded in ``home`` (for ``journey stop``)."""
    state_file = home / STATE_FILE
    if not state_file.exists():
        return []
    state = json.loads(state_file.read_text())
    stopped = []
    for name in ("worker", "server"):
        pid = state["pids"].get(name)
        if pid is None:
            continue
        try:
            os.kill(pid, signal.SIGINT)
        except ProcessLookupError:
            continue
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        else:
            os.kill(pid, signal.SIGKILL)
        stopped.append(f"{name} (pid {pid})")
    state_file.unlink(missing_ok=True)
    return stopped
