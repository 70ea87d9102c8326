"""The one configuration entry point: a tree of pydantic-settings models.

Every field can be set from the environment with the ``JOURNEY_`` prefix and ``__`` between
levels, e.g. ``JOURNEY_STORAGE__WAREHOUSE_URL`` or ``JOURNEY_IDENTITY__PATIENT_KEY``, or from a
``.env`` file in the working directory. Nothing else in the package reads the environment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from patient_journey.errors import ConfigurationError

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = Path("journey-data")


def shipped(*parts: str) -> Path:
    """A file or folder the project ships (``expectations``, ``catalog``, ``infra``), as package
    data under ``patient_journey/data``: in a checkout, links to the top-level folders; in an
    installed wheel, their copies."""
    return Path(__file__).resolve().parent.joinpath("data", *parts).resolve()


class StorageSettings(BaseModel):
    """Where each zone lives: local paths (the embedded default) or Azure Blob Storage URLs
    (``az://container/prefix`` or ``abfss://container@account.dfs.core.windows.net/prefix``).

    Keep raw PHI (landing, restricted), rejected records (quarantine) and the analysts' warehouse
    in separate containers in production; docs/deployment.md shows the recommended layout.
    """

    landing_url: str = Field(
        default=str(DEFAULT_DATA_DIR / "landing"),
        description="Where sources land as received (restricted: raw PHI).",
    )
    warehouse_url: str = Field(
        default=str(DEFAULT_DATA_DIR / "warehouse"),
        description="The analysts' zone: silver and gold Delta tables, pseudonymous only.",
    )
    restricted_url: str = Field(
        default=str(DEFAULT_DATA_DIR / "restricted"),
        description="Bronze, staged tables, identity crosswalk, held records, ledgers (PHI).",
    )
    quarantine_url: str | None = Field(
        default=None,
        description="Rejected records: rule and lineage (file, line), never values. Default: restricted_url.",
    )
    patient_buckets: int = Field(
        default=32,
        ge=1,
        le=4096,
        description=(
            "Silver and gold tables with a patient key are partitioned into this many patient "
            "buckets (patient_bucket), so that a build reads and rewrites only the buckets of the "
            "patients whose rows changed. Changing it rebuilds silver and gold whole."
        ),
    )

    spill_dir: str | None = Field(
        default=None,
        description=(
            "A local folder where a build writes what exceeds its memory (the SQL engine's spill "
            "and large tables split in parts): restricted data, removed after use; put it on a "
            "disk cleared for PHI. Default: a private folder under the system's temporary folder."
        ),
    )

    @property
    def quarantine_root(self) -> str:
        return self.quarantine_url or self.restricted_url

    def zone_urls(self) -> dict[str, str]:
        return {
            "landing": self.landing_url,
            "restricted": self.restricted_url,
            "quarantine": self.quarantine_root,
            "warehouse": self.warehouse_url,
        }


AzureAuth = Literal["entra", "connection_string", "account_key", "sas"]


class AzureSettings(BaseModel):
    """How to reach Azure Blob Storage when a zone URL is ``az://`` or ``abfss://``.

    ``auth`` defaults to the secret that is set (connection string, then account key, then SAS
    token), else to Microsoft Entra ID through ``DefaultAzureCredential`` (managed identity,
    workload identity, ``az login``): the production choice, with shared keys off.
    """

    account_name: str | None = Field(default=None, description="Storage account name.")
    auth: AzureAuth | None = Field(default=None, description="entra | connection_string | account_key | sas.")
    connection_string: SecretStr | None = Field(default=None, description="A storage connection string.")
    account_key: SecretStr | None = Field(default=None, description="The account's shared key.")
    sas_token: SecretStr | None = Field(default=None, description="A SAS token (account or container).")
    endpoint: str | None = Field(
        default=None,
        description="Blob endpoint, e.g. http://127.0.0.1:10000/devstoreaccount1 for Azurite.",
    )
    tenant_id: str | None = Field(default=None, description="Entra ID service principal: tenant.")
    client_id: str | None = Field(default=None, description="Entra ID service principal: client id.")
    client_secret: SecretStr | None = Field(default=None, description="Entra ID service principal: secret.")
    credentials_block: str | None = Field(
        default=None,
        description="Name of a prefect-azure AzureBlobStorageCredentials block (read by the flows).",
    )
    max_retries: int = Field(default=3, ge=0, description="Retries of a transient storage error.")
    timeout_seconds: int = Field(default=30, ge=1, description="Timeout of one storage request.")


class IdentitySettings(BaseModel):
    """The secret key of the keyed hash (HMAC-SHA256) behind every patient key."""

    patient_key: SecretStr | None = Field(
        default=None, description="The HMAC key itself (prefer a secret store in production)."
    )
    patient_key_file: Path | None = Field(default=None, description="A file whose content is the HMAC key.")


class SourceSettings(BaseModel):
    """Where each source is found inside the landing zone, the registry database, and what every
    source shares. A source may declare settings of its own (``Source.options``, in its module):
    they are read from this section too (``JOURNEY_SOURCES__<FIELD>``), checked by their source's
    model, and a field no source declares is refused in preflight."""

    model_config = ConfigDict(extra="allow")

    fhir_prefix: str = Field(default="ehr", description="FHIR bulk exports and bundles.")
    device_prefix: str = Field(default="device", description="IoT Hub routed telemetry blobs.")
    redcap_prefix: str = Field(default="outcomes/redcap", description="REDCap exports.")
    settle_seconds: int = Field(
        default=60,
        ge=0,
        description=(
            "An input modified less than this many seconds ago may still be being written: it is "
            "left for the next run and reported as pending."
        ),
    )
    registry_lookback_seconds: int = Field(
        default=86_400,
        ge=0,
        description=(
            "Registry rows are read from this long before each table's watermark, so a row committed "
            "late with an older updated_at is still picked up; rows already read are skipped."
        ),
    )
    device_templates_dir: Path = Field(
        default_factory=lambda: shipped("catalog", "devices"),
        description="Folder of device templates, one JSON file per device type.",
    )
    device_skew_tolerance_seconds: int = Field(
        default=900,
        ge=0,
        description=(
            "Device events are attributed to a procedure when their device time lies within the "
            "procedure's start and end widened by this many seconds (device clocks drift)."
        ),
    )
    optional: list[str] = Field(
        default_factory=list,
        description=(
            'Sources whose landing prefix may be absent (JSON list, e.g. ["redcap"]): preflight '
            "fails for any other file source with nothing under its prefix."
        ),
    )
    allow_empty: bool = Field(
        default=False,
        description="Let a first run that finds no input at all succeed (it fails by default, saying so).",
    )
    registry_url: SecretStr | None = Field(
        default=None,
        description=(
            "SQLAlchemy URL of the outcomes registry. Default: the SQLite file "
            "outcomes/registry.sqlite in a local landing zone, if it exists."
        ),
    )


class QualitySettings(BaseModel):
    """The quality gate."""

    expectations_dir: Path = Field(
        default_factory=lambda: shipped("expectations"),
        description="Folder of Great Expectations suites, one JSON file per table.",
    )
    min_linkage_rate: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description=(
            "A run in which a staged table with at least min_linkage_rows linked or held rows links "
            'fewer than this share of them (loaded / (loaded + held)) ends "Completed with warnings" after loading, and '
            "emits patient-journey.linkage.below-floor: e.g. references that resolve to no patient."
        ),
    )
    min_linkage_rows: int = Field(
        default=20,
        ge=1,
        description="Tables with fewer linked or held rows than this are not held to min_linkage_rate.",
    )


TaskRunnerKind = Literal["default", "dask"]


class OrchestrationSettings(BaseModel):
    """How the Prefect flows run their tasks, split their work and raise alerts."""

    task_runner: TaskRunnerKind = Field(
        default="default",
        description=(
            "default: Prefect's thread pool in the flow-run process; dask: prefect-dask's DaskTaskRunner "
            "(an existing cluster at dask_address, else a LocalCluster)."
        ),
    )
    dask_address: str | None = Field(
        default=None, description="Scheduler address of an existing Dask cluster, e.g. tcp://10.0.0.5:8786."
    )
    dask_workers: int = Field(
        default=2, ge=1, description="Worker processes of the LocalCluster started when no address is set."
    )
    dask_threads_per_worker: int = Field(default=1, ge=1, description="Threads per LocalCluster worker.")
    dask_local_directory: Path | None = Field(
        default=None,
        description="Scratch folder of LocalCluster workers. Default: a folder under the temp dir.",
    )
    threads: int = Field(
        default=4,
        ge=1,
        description="Threads of the default task runner: ingestion batches read at once in the flow-run process.",
    )
    ingest_processes: int | None = Field(
        default=None,
        ge=1,
        description=(
            "With the default runner, worker processes that read ingestion batches when a source has more "
            "than one (Python threads share one core). Default: one per core; 1: read them on the threads."
        ),
    )
    ingest_batch_files: int = Field(
        default=5000,
        ge=1,
        description="New input files per ingestion task: the unit of parallel work on the task runner.",
    )
    ingest_batch_mib: int = Field(
        default=64,
        ge=1,
        description=(
            "Input MiB (listed sizes) per ingestion task, at most: a task holds its batch's rows in memory "
            "until it puts them aside. A larger file is a batch of its own."
        ),
    )
    quarantine_share_threshold: float = Field(
        default=0.05,
        ge=0.0,
        le=1.0,
        description=(
            "A run whose quarantined (or rejected-at-read) share of rows read exceeds this emits the "
            "event patient-journey.quarantine.threshold-exceeded."
        ),
    )
    alert_webhook_url: SecretStr | None = Field(
        default=None,
        description=(
            "Webhook (Slack, Teams, any JSON endpoint) that `journey serve` points the sample "
            "quarantine alert automation at. Unset: the automation is not created."
        ),
    )


class JourneySettings(BaseSettings):
    """All of patient-journey's settings."""

    model_config = SettingsConfigDict(
        env_prefix="JOURNEY_", env_nested_delimiter="__", env_file=".env", extra="ignore"
    )

    storage: StorageSettings = StorageSettings()
    azure: AzureSettings = AzureSettings()
    identity: IdentitySettings = IdentitySettings()
    sources: SourceSettings = SourceSettings()
    quality: QualitySettings = QualitySettings()
    orchestration: OrchestrationSettings = OrchestrationSettings()

    def patient_hmac_key(self) -> bytes:
        """The HMAC key, or a ConfigurationError that lists every place looked at."""
        if self.identity.patient_key is not None:
            key = self.identity.patient_key.get_secret_value().encode()
        elif self.identity.patient_key_file is not None:
            path = self.identity.patient_key_file
            if not path.is_file():
                raise ConfigurationError(
                    f"The patient key file {path} (JOURNEY_IDENTITY__PATIENT_KEY_FILE) does not exist."
                )
            key = path.read_bytes().strip()
        else:
            raise ConfigurationError(
                "No patient key is configured, so patient keys cannot be computed. Looked in: "
                "JOURNEY_IDENTITY__PATIENT_KEY, JOURNEY_IDENTITY__PATIENT_KEY_FILE (environment, "
                "then .env). Set one of them to a secret of at least 32 bytes kept outside the "
                "repository; `journey demo` creates a local key for the demo only."
            )
        if len(key) < 32:
            raise ConfigurationError(
                "The configured patient key is shorter than 32 bytes; use a longer random secret "
                "(e.g. `python -c 'import secrets; print(secrets.token_hex(32))'`)."
            )
        return key


def load_settings(**overrides: object) -> JourneySettings:
    """Build the settings from the environment (and .env), with explicit overrides on top."""
    return JourneySettings(**overrides)  # type: ignore[arg-type]
