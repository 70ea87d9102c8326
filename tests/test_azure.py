"""Azure Blob Storage for real: the flow, the Delta writer and queries against Azurite.

Azurite (npm, installed by `make`) is started by these tests on its standard port. Landing,
restricted, quarantine and warehouse are four containers, as the deployment guide recommends.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from azure.storage.blob import AccountSasPermissions, BlobServiceClient, ResourceTypes, generate_account_sas
from typer.testing import CliRunner

from flows.journey import patient_journey
from journey_cli import app
from patient_journey import pipeline
from patient_journey.azurite import ACCOUNT, WELL_KNOWN_KEY, Azurite, port_is_open, upload_folder
from patient_journey.errors import ConfigurationError, StorageError
from patient_journey.generate import GenerationResult
from patient_journey.lake import Lake, TableRef, Zone, bronze, gold, silver
from patient_journey.pipeline import HELD, QUARANTINE, ledger_table
from patient_journey.report import RunSummary
from patient_journey.settings import JourneySettings, load_settings
from patient_journey.sources import records
from tests.conftest import TEST_KEY, use_settings_env
from tests.journey_checks import assert_planted_records_caught, episode_mismatches

pytestmark = [pytest.mark.azure, pytest.mark.prefect]

RUN = "e2e"  # every zone of the end-to-end run lives under this prefix of its container
REGISTRY: dict[str, str] = {}  # the registry is a database, not a blob: set by `first_run`


@pytest.fixture(scope="module")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Azurite]:
    with Azurite(tmp_path_factory.mktemp("azurite")) as emulator:
        yield emulator


def blob_settings(
    emulator: Azurite, prefix: str = RUN, warehouse: str = "warehouse", **azure: object
) -> JourneySettings:
    return load_settings(
        storage={
            "landing_url": f"az://landing/{prefix}",
            "restricted_url": f"az://restricted/{prefix}",
            "quarantine_url": f"az://quarantine/{prefix}",
            "warehouse_url": f"az://{warehouse}/{prefix}",
        },
        azure=azure or {"connection_string": emulator.connection_string},
        identity={"patient_key": TEST_KEY},
        sources={"settle_seconds": 0, **REGISTRY},
    )


def run_flow(settings: JourneySettings) -> RunSummary:
    with pytest.MonkeyPatch.context() as monkeypatch:
        use_settings_env(monkeypatch, settings)
        return patient_journey()


@pytest.fixture(scope="module")
def first_run(harness: None, azurite: Azurite, generated: GenerationResult) -> RunSummary:
    upload_folder(generated.out / "landing", f"az://landing/{RUN}", azurite.connection_string)
    REGISTRY["registry_url"] = f"sqlite:///{generated.out / 'landing' / 'outcomes' / 'registry.sqlite'}"
    return run_flow(blob_settings(azurite))


def every_table(lake: Lake) -> list[TableRef]:
    return [
        ref
        for zone in Zone
        for layer in ("bronze", "staged", "silver", "gold", "quarantine", "held", "ledger", "identity")
        for ref in lake.tables(zone, layer)
    ]


def versions(lake: Lake) -> dict[str, int | None]:
    return {f"{ref.zone}:{ref.label}": lake.version(ref) for ref in every_table(lake)}


def test_the_flow_on_blob_storage_reproduces_the_ground_truth(
    first_run: RunSummary, azurite: Azurite, generated: GenerationResult
) -> None:
    lake = Lake(blob_settings(azurite))
    assert episode_mismatches(lake, generated) == []
    assert_planted_records_caught(lake, generated)
    assert all(table.balanced for table in first_run.tables)
    # Each zone is its own container: PHI (bronze) never lands in the warehouse container.
    service = BlobServiceClient.from_connection_string(azurite.connection_string)
    top = {
        name: {
            b.name.split("/")[1] for b in service.get_container_client(name).list_blobs(name_starts_with=RUN)
        }
        for name in ("restricted", "quarantine", "warehouse")
    }
    assert top["warehouse"] == {"silver", "gold"}
    assert top["quarantine"] == {"quarantine", "data_docs"}  # Data Docs (counts only) beside the quarantine
    assert {"bronze", "staged", "identity", "held", "ledger"} <= top["restricted"]
    assert "quarantine" not in top["restricted"] and "silver" not in top["restricted"]


def test_journey_query_and_patient_read_the_warehouse_back(
    first_run: RunSummary, azurite: Azurite, generated: GenerationResult, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_settings_env(monkeypatch, blob_settings(azurite))
    runner = CliRunner()
    answer = runner.invoke(app, ["query", "select count(*) as n from surgical_episode", "-o", "json"])
    assert answer.exit_code == 0, answer.output
    assert json.loads(answer.output) == [{"n": generated.episodes}]
    key = runner.invoke(app, ["query", "select min(patient_key) as k from surgical_episode", "-o", "json"])
    timeline = runner.invoke(app, ["patient", json.loads(key.output)[0]["k"], "-o", "json"])
    assert timeline.exit_code == 0 and {e["phase"] for e in json.loads(timeline.output)} >= {"pre", "intra"}


def test_a_rerun_loads_nothing_twice_and_a_new_blob_alone_is_loaded(
    first_run: RunSummary, azurite: Azurite, generated: GenerationResult
) -> None:
    settings = blob_settings(azurite)
    lake = Lake(settings)
    before = versions(lake)
    rerun = run_flow(settings)
    assert all(i.new_inputs == 0 and i.records == 0 for i in rerun.ingests)
    assert versions(lake) == before

    # A new export folder with one file of two new Observations of an existing patient.
    source = next((generated.out / "landing").rglob("Observation.000.ndjson"))
    lines = [json.loads(line) for line in source.read_text().splitlines()[:2]]
    for number, resource in enumerate(lines):
        resource["id"] = f"late-observation-{number}"
    new_blob = "ehr/fhir-export-20250302T000000Z/Observation-1-1.ndjson"
    container = BlobServiceClient.from_connection_string(azurite.connection_string).get_container_client(
        "landing"
    )
    container.upload_blob(f"{RUN}/{new_blob}", "\n".join(json.dumps(r) for r in lines) + "\n")
    observations = lake.read(silver("observation"))
    assert observations is not None
    summary = run_flow(settings)
    by_source = {i.source: i for i in summary.ingests}
    assert (by_source["fhir"].new_inputs, by_source["fhir"].records) == (1, 2)
    assert all(i.new_inputs == 0 for s, i in by_source.items() if s != "fhir")
    after = lake.read(silver("observation"))
    assert after is not None and after.num_rows == observations.num_rows + 2

    # The same bytes uploaded again get a new etag: recorded, not loaded again.
    container.upload_blob(f"{RUN}/{new_blob}", "\n".join(json.dumps(r) for r in lines) + "\n", overwrite=True)
    again = {i.source: i for i in run_flow(settings).ingests}["fhir"]
    assert (again.new_inputs, again.records, again.changed_inputs) == (1, 0, 0)

    # Reprocessing a prefix on purpose reads it again, and staging collapses the re-read.
    assert pipeline.forget_inputs(settings, "fhir", "fhir-export-20250302T000000Z") == 2
    reread = run_flow(settings)
    assert {i.source: i for i in reread.ingests}["fhir"].records == 2
    final = lake.read(silver("observation"))
    assert final is not None and final.num_rows == after.num_rows


# --- failures: each fails fast, names the operation and container, shows no secret, changes nothing


def _sas(permission: AccountSasPermissions, expiry: datetime) -> str:
    return generate_account_sas(
        ACCOUNT,
        WELL_KNOWN_KEY,
        resource_types=ResourceTypes(service=True, container=True, object=True),
        permission=permission,
        expiry=expiry,
    )


def _free_port() -> int:
    port = 10999
    while port_is_open(port):
        port += 1
    return port


FAILURES = {
    "wrong account key": (
        lambda e: {"account_name": ACCOUNT, "account_key": "d3Jvbmcta2V5" * 8, "endpoint": e.endpoint},
        "refused",  # Azure says AuthenticationFailed; Azurite says AuthorizationFailure
        "landing",
    ),
    "expired SAS token": (
        lambda e: {
            "account_name": ACCOUNT,
            "sas_token": _sas(
                AccountSasPermissions(read=True, list=True, write=True, delete=True, add=True, create=True),
                datetime.now(UTC) - timedelta(hours=1),
            ),
            "endpoint": e.endpoint,
        },
        "refused",
        "landing",
    ),
    "read-only SAS token": (
        lambda e: {
            "account_name": ACCOUNT,
            "sas_token": _sas(
                AccountSasPermissions(read=True, list=True), datetime.now(UTC) + timedelta(hours=1)
            ),
            "endpoint": e.endpoint,
        },
        "lack the permission",
        "restricted",
    ),
    "storage unreachable": (
        lambda e: {
            "account_name": ACCOUNT,
            "account_key": WELL_KNOWN_KEY,
            "endpoint": f"http://127.0.0.1:{_free_port()}/{ACCOUNT}",
        },
        "could not be reached",
        "landing",
    ),
}


@pytest.mark.parametrize("case", list(FAILURES))
def test_a_storage_failure_fails_fast_names_the_container_and_hides_the_secret(
    case: str, first_run: RunSummary, azurite: Azurite
) -> None:
    make_azure, reason, container = FAILURES[case]
    good = Lake(blob_settings(azurite))
    before = versions(good)
    settings = blob_settings(azurite, **make_azure(azurite))
    started = time.monotonic()
    with pytest.raises(StorageError) as caught:
        pipeline.preflight(settings)
    assert time.monotonic() - started < 45
    message = str(caught.value)
    assert reason in message and f"container '{container}'" in message
    for secret in [
        WELL_KNOWN_KEY,
        "d3Jvbmcta2V5",
        "sig=",
        *(v for v in make_azure(azurite).values() if "sig=" in str(v)),
    ]:
        assert secret not in message
    assert versions(good) == before


def test_a_missing_container_is_named_and_nothing_changes(first_run: RunSummary, azurite: Azurite) -> None:
    good = Lake(blob_settings(azurite))
    before = versions(good)
    with pytest.raises(StorageError) as caught:
        pipeline.preflight(blob_settings(azurite, warehouse="no-such-container"))
    assert "container 'no-such-container'" in str(caught.value) and "does not exist" in str(caught.value)
    assert versions(good) == before


def test_a_write_refused_mid_run_leaves_every_table_as_it_was(
    first_run: RunSummary, azurite: Azurite
) -> None:
    """Past the preflight (e.g. a role removed during a run): the Delta write fails cleanly."""
    good = Lake(blob_settings(azurite))
    before = versions(good)
    read_only = blob_settings(
        azurite,
        account_name=ACCOUNT,
        sas_token=_sas(AccountSasPermissions(read=True, list=True), datetime.now(UTC) + timedelta(hours=1)),
        endpoint=azurite.endpoint,
    )
    with pytest.raises(StorageError) as caught:
        pipeline.build_silver(read_only, "run-read-only", force=True)
    message = str(caught.value)
    assert "Delta table" in message and "lack the permission" in message and "sig=" not in message
    assert versions(good) == before
    assert good.version(gold("surgical_episode")) == before["warehouse:gold.surgical_episode"]


def test_the_flow_fails_with_a_clean_message_on_a_wrong_key(harness: None, azurite: Azurite) -> None:
    settings = blob_settings(
        azurite, account_name=ACCOUNT, account_key="d3Jvbmcta2V5" * 8, endpoint=azurite.endpoint
    )
    with pytest.MonkeyPatch.context() as monkeypatch:
        use_settings_env(monkeypatch, settings)
        state = patient_journey(return_state=True)
    assert state.is_failed()
    message = str(state.result(raise_on_failure=False))
    assert "container 'landing'" in message and "refused" in message and "d3Jvbmcta2V5" not in message


def test_the_ledgers_and_bronze_live_in_the_restricted_container(
    first_run: RunSummary, azurite: Azurite
) -> None:
    lake = Lake(blob_settings(azurite))
    assert lake.uri(ledger_table("fhir")).startswith("az://restricted/")
    assert lake.uri(bronze("fhir_resource")).startswith("az://restricted/")
    assert lake.uri(QUARANTINE).startswith("az://quarantine/") and lake.uri(HELD).startswith(
        "az://restricted/"
    )
    assert lake.uri(gold("journey_event")).startswith("az://warehouse/")


def test_credentials_can_come_from_a_prefect_azure_block(
    harness: None, first_run: RunSummary, azurite: Azurite, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect_azure import AzureBlobStorageCredentials
    from pydantic import SecretStr

    from tasks.settings import journey_settings

    AzureBlobStorageCredentials(connection_string=SecretStr(azurite.connection_string)).save(
        "journey-azurite", overwrite=True
    )
    use_settings_env(monkeypatch, blob_settings(azurite))
    monkeypatch.delenv("JOURNEY_AZURE__CONNECTION_STRING")
    monkeypatch.setenv("JOURNEY_AZURE__CREDENTIALS_BLOCK", "journey-azurite")
    settings = journey_settings()
    assert settings.azure.auth == "connection_string"
    pipeline.preflight(settings)  # lists landing and probes the other three containers
    monkeypatch.setenv("JOURNEY_AZURE__CREDENTIALS_BLOCK", "no-such-block")
    with pytest.raises(ConfigurationError, match="no-such-block"):
        journey_settings()


def test_a_blob_still_settling_waits_for_the_next_run(first_run: RunSummary, azurite: Azurite) -> None:
    container = BlobServiceClient.from_connection_string(azurite.connection_string).get_container_client(
        "landing"
    )
    container.upload_blob("settle/ehr/export-1/Patient-1-1.ndjson", b'{"resourceType":"Patient","id":"s1"}\n')
    settings = blob_settings(azurite, prefix="settle")
    waiting = settings.model_copy(
        update={"sources": settings.sources.model_copy(update={"settle_seconds": 3600})}
    )
    report = pipeline.ingest(waiting, "fhir", "run-settle-1")
    assert (report.pending_inputs, report.new_inputs, report.records) == (1, 0, 0)
    report = pipeline.ingest(settings, "fhir", "run-settle-2")
    assert (report.pending_inputs, report.new_inputs, report.records) == (0, 1, 1)


def test_blobs_are_read_ahead_in_listing_order_and_a_changed_one_waits(
    azurite: Azurite, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Blob reads run a few at a time ahead of the reader (bounded by files and bytes); the
    order is the listing's, and a blob overwritten after listing is not read (left for later)."""
    container = BlobServiceClient.from_connection_string(azurite.connection_string).get_container_client(
        "landing"
    )
    for number in range(40):
        container.upload_blob(f"ahead/{number:03d}.json", f'{{"n": {number}}}'.encode() * 50, overwrite=True)
    settings = blob_settings(azurite, prefix="ahead")
    landing = Lake(settings).storage(settings.storage.landing_url)
    listed = landing.list_files("")
    container.upload_blob("ahead/007.json", b"written after the listing", overwrite=True)
    monkeypatch.setattr(records, "READ_AHEAD_BYTES", 3_000)  # about three blobs in flight
    read = list(records.read_ahead(landing, listed))
    assert [file.url for file, _ in read] == [file.url for file in listed]
    assert [number for number, (_, data) in enumerate(read) if data is None] == [7]
    assert all(data == f'{{"n": {n}}}'.encode() * 50 for n, (_, data) in enumerate(read) if n != 7)


@pytest.mark.parametrize("size", [0, 1, 4096, 10_000, 12_288])
def test_a_blob_is_read_in_ranged_chunks_and_a_change_mid_read_is_noticed(
    azurite: Azurite, size: int
) -> None:
    container = BlobServiceClient.from_connection_string(azurite.connection_string).get_container_client(
        "landing"
    )
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    container.upload_blob(f"chunks/{size}.ndjson", data, overwrite=True)
    settings = blob_settings(azurite, prefix="chunks")
    landing = Lake(settings).storage(settings.storage.landing_url)
    [file] = [f for f in landing.list_files("") if f.url.endswith(f"/{size}.ndjson")]
    chunks = list(landing.read_chunks(file.url, file.version, chunk_bytes=4096))
    assert b"".join(chunks) == data and all(len(c) <= 4096 for c in chunks)
    if size > 4096:
        reading = landing.read_chunks(file.url, file.version, chunk_bytes=4096)
        next(reading)
        container.upload_blob(f"chunks/{size}.ndjson", data[::-1], overwrite=True)
        with pytest.raises(records.InputChangedError):
            list(reading)


def test_a_device_run_lists_only_the_latest_time_folders_of_the_container(
    azurite: Azurite, generated: GenerationResult
) -> None:
    prefix = "iothub-listing"
    upload_folder(
        generated.out / "landing" / "device", f"az://landing/{prefix}/device", azurite.connection_string
    )
    settings = blob_settings(azurite, prefix=prefix)
    assert pipeline.ingest(settings, "device", "run-1").new_inputs > 2
    container = BlobServiceClient.from_connection_string(azurite.connection_string).get_container_client(
        "landing"
    )

    def written(name: str) -> datetime:  # .../{YYYY}/{MM}/{DD}/{HH}/{mm}.<ext>
        *_, year, month, day, hour, minute = name.rsplit(".", 1)[0].split("/")
        return datetime(int(year), int(month), int(day), int(hour), int(minute), tzinfo=UTC)

    names = sorted(
        (b.name for b in container.list_blobs(name_starts_with=f"{prefix}/device/")),
        key=lambda n: (written(n), n),
    )
    data = container.download_blob(names[-1]).readall()
    head, extension = names[-1].rsplit("/", 5)[0], names[-1].rsplit(".", 1)[1]
    later = written(names[-1]) + timedelta(minutes=5)
    container.upload_blob(f"{head}/{later:%Y/%m/%d/%H/%M}.{extension}", data)  # the next routed minute
    container.upload_blob(f"{names[0].rsplit('/', 1)[0]}/restored.{extension}", data)  # an old folder
    assert pipeline.ingest(settings, "device", "run-2").new_inputs == 1
    every_run = settings.model_copy(
        update={"sources": settings.sources.model_copy(update={"device_full_listing_hours": 0})}
    )
    assert pipeline.ingest(every_run, "device", "run-3").new_inputs == 1
