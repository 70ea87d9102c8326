"""Azurite, the Azure Storage emulator, for local development, the demo and the tests.

Azurite comes from npm (``package.json`` at the project root; ``make`` installs it). It is
started with the flags this stack needs (``--skipApiVersionCheck``: Azurite 3.37 rejects the
blob SDK's default API version) on its standard blob port 10000, because DuckDB's ``delta_scan``
always reaches the emulator there whatever endpoint it is given.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from patient_journey.errors import ConfigurationError
from patient_journey.settings import PROJECT_ROOT

ACCOUNT = "devstoreaccount1"
# The emulator's published well-known development key (Microsoft's Azurite documentation):
# not a secret, and accepted by no real storage account.
WELL_KNOWN_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
DEFAULT_PORT = 10000
CONTAINERS = ("landing", "restricted", "quarantine", "warehouse")


def azurite_binary() -> str:
    local = PROJECT_ROOT / "node_modules" / ".bin" / "azurite-blob"
    if local.exists():
        return str(local)
    found = shutil.which("azurite-blob")
    if found is None:
        raise ConfigurationError(
            "Azurite is not installed: run `npm ci` in the project folder (make does it), "
            "or `npm install -g azurite`."
        )
    return found


def port_is_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex((host, port)) == 0


@dataclass
class Azurite:
    """A running Azurite blob service; use as a context manager or call ``stop``."""

    location: Path
    port: int = DEFAULT_PORT
    process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}/{ACCOUNT}"

    @property
    def connection_string(self) -> str:
        return (
            f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={WELL_KNOWN_KEY};"
            f"BlobEndpoint={self.endpoint};"
        )

    def environment(self) -> dict[str, str]:
        """The JOURNEY_ settings that point every zone at this emulator's containers."""
        return {
            "JOURNEY_AZURE__CONNECTION_STRING": self.connection_string,
            "JOURNEY_STORAGE__LANDING_URL": "az://landing",
            "JOURNEY_STORAGE__RESTRICTED_URL": "az://restricted",
            "JOURNEY_STORAGE__QUARANTINE_URL": "az://quarantine",
            "JOURNEY_STORAGE__WAREHOUSE_URL": "az://warehouse",
        }

    def start(self, timeout: float = 30.0) -> Azurite:
        """Start the blob service and create the four zone containers (if not there yet)."""
        if port_is_open(self.port):
            raise ConfigurationError(
                f"Port {self.port} is already in use; stop the other Azurite (or service) first."
            )
        self.location.mkdir(parents=True, exist_ok=True)
        command = [
            azurite_binary(),
            "--skipApiVersionCheck",
            "--disableTelemetry",
            "--silent",
            "--location",
            str(self.location),
            "--blobHost",
            "127.0.0.1",
            "--blobPort",
            str(self.port),
        ]
        log = (self.location / "azurite.log").open("wb")
        # A fixed command line: our own Azurite binary and flags, no user input.
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)  # noqa: S603
        deadline = time.monotonic() + timeout
        while not port_is_open(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise ConfigurationError(f"Azurite did not start; see {self.location / 'azurite.log'}.")
            time.sleep(0.2)
        self.create_containers()
        return self

    def create_containers(self, names: tuple[str, ...] = CONTAINERS) -> None:
        from azure.core.exceptions import ResourceExistsError
        from azure.storage.blob import BlobServiceClient

        service = BlobServiceClient.from_connection_string(self.connection_string)
        for name in names:
            with contextlib.suppress(ResourceExistsError):
                service.create_container(name)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.process = None

    def __enter__(self) -> Azurite:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.stop()


def upload_folder(folder: Path, url: str, connection_string: str) -> int:
    """Copy every file under ``folder`` to the blob location ``url``; returns the file count."""
    from patient_journey.azure import AzureAccess
    from patient_journey.settings import AzureSettings
    from patient_journey.storage import Storage

    access = AzureAccess(AzureSettings.model_validate({"connection_string": connection_string}))
    target = Storage(url, access)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    with ThreadPoolExecutor(max_workers=8) as pool:  # uploads wait on I/O: overlap them
        list(pool.map(lambda p: target.write_bytes(p.relative_to(folder).as_posix(), p.read_bytes()), files))
    return len(files)
