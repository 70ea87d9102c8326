"""A device run lists only the latest IoT Hub time folders, and everything when it must.

IoT Hub names a routed blob by the time its batch was written
(``{iothub}/{partition}/{YYYY}/{MM}/{DD}/{HH}/{mm}``), so new blobs appear only in the latest
folders. These tests land blobs in the generated landing zone's layout and check which ones a
run reads: a new minute at once, a blob that appears in an old folder only on the first run of
the next full-listing period (or every run with the period set to 0), on a backfill and after
``journey reprocess``.
"""

from __future__ import annotations

import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pytest
from pydantic import ValidationError

from patient_journey import pipeline
from patient_journey.generate import GenerationResult
from patient_journey.lake import Lake, ledger_table
from patient_journey.settings import JourneySettings
from patient_journey.sources.iothub import (
    DEFAULT_FORMAT,
    BlobNameFormat,
    IotHubListingOptions,
    listing_cutoff,
)
from patient_journey.sources.records import FORGOTTEN
from tests.conftest import settings_for

NOW = datetime(2026, 12, 7, 12, 30, tzinfo=UTC)


def ledger(uris: list[str], processed_at: datetime = NOW, versions: list[str] | None = None) -> pa.Table:
    return pa.table(
        {
            "uri": pa.array(uris, pa.string()),
            "version": pa.array(versions or ["v1"] * len(uris), pa.string()),
            "processed_at": pa.array([processed_at] * len(uris), pa.timestamp("us", tz="UTC")),
        }
    )


HUB = "/landing/device/hub/0"


def test_the_cutoff_is_the_newest_folder_read_less_the_lookback() -> None:
    options = IotHubListingOptions()
    read = ledger(
        [
            f"{HUB}/2024/01/02/03/05.avro",
            f"{HUB}/2023/12/31/23/55.avro",
            "/landing/device/stray.avro",
            f"{HUB}/2099/01/01/00/00.avro",  # dated in the future: ignored
        ]
    )
    assert listing_cutoff(read, options, NOW) == datetime(2024, 1, 2, 2, 5, tzinfo=UTC)
    shorter = IotHubListingOptions(device_listing_lookback_seconds=0)
    assert listing_cutoff(read, shorter, NOW) == datetime(2024, 1, 2, 3, 5, tzinfo=UTC)


@pytest.mark.parametrize(
    ("read", "options", "why"),
    [
        (None, IotHubListingOptions(), "a first run"),
        (
            ledger([f"{HUB}/2024/01/02/03/05.avro"], NOW - timedelta(days=1)),
            IotHubListingOptions(),
            "a new day",
        ),
        (
            ledger([f"{HUB}/2024/01/02/03/05.avro"]),
            IotHubListingOptions(device_full_listing_hours=0),
            "always",
        ),
        (
            ledger(["/landing/device/a.avro", f"{HUB}/2024/13/02/03/05.avro"]),
            IotHubListingOptions(),
            "no time",
        ),
        (
            ledger(
                [f"{HUB}/2024/01/02/03/05.avro", f"{HUB}/2024/01/02/03/10.avro"], versions=["v1", FORGOTTEN]
            ),
            IotHubListingOptions(),
            "reprocess forgot an input",
        ),
        (
            ledger([f"{HUB}/2024/01/02/03/05.avro"]),
            IotHubListingOptions(device_blob_name_format="{iothub}/{partition}/{YYYY}/{DD}/{MM}/{HH}/{mm}"),
            "days before months",
        ),
        (
            ledger([f"{HUB}/2024-01-02/03/05.avro"]),
            IotHubListingOptions(device_blob_name_format="{iothub}/{partition}/{YYYY}-{MM}-{DD}/{HH}/{mm}"),
            "a folder of several time tokens",
        ),
    ],
)
def test_everything_is_listed_when_it_must_be(
    read: pa.Table | None, options: IotHubListingOptions, why: str
) -> None:
    assert listing_cutoff(read, options, NOW) is None, why


def test_an_input_forgotten_then_read_again_no_longer_forces_a_full_listing() -> None:
    uri = f"{HUB}/2024/01/02/03/05.avro"
    read = ledger([uri, uri], versions=[FORGOTTEN, "v2"])
    assert listing_cutoff(read, IotHubListingOptions(), NOW) == datetime(2024, 1, 2, 2, 5, tzinfo=UTC)


def test_a_custom_format_is_parsed_and_a_wrong_one_refused() -> None:
    layout = BlobNameFormat("{iothub}-{partition}/{YYYY}/{MM}/{DD}/{HH}/{mm}")
    assert layout.prunable()
    uris = pa.array(["az://c/device/hub-1/2025/03/04/05/06.json", "az://c/device/hub-1/2025/03/04/05/07"])
    assert layout.newest(uris, NOW) == datetime(2025, 3, 4, 5, 7, tzinfo=UTC)
    assert layout.newest(uris, datetime(2025, 3, 4, 5, 6, tzinfo=UTC)) == datetime(
        2025, 3, 4, 5, 6, tzinfo=UTC
    )
    assert BlobNameFormat(DEFAULT_FORMAT).newest(pa.array(["az://c/x.json"], pa.string()), NOW) is None
    for wrong in (
        "{iothub}/{partition}/{YYYY}/{MM}/{DD}/{HH}",
        "{iothub}/{partition}/{yyyy}/{MM}/{DD}/{HH}/{mm}",
    ):
        with pytest.raises(ValidationError, match="missing"):
            IotHubListingOptions(device_blob_name_format=wrong)


# --- a run on the generated landing zone ------------------------------------------------------------


def _blobs(device: Path) -> list[Path]:
    """The routed blobs, oldest folder first."""
    return sorted(
        (p for p in device.rglob("*") if p.is_file()), key=lambda b: (*b.parent.parts[-4:], b.stem, str(b))
    )


def _with_options(settings: JourneySettings, **options: object) -> JourneySettings:
    return settings.model_copy(update={"sources": settings.sources.model_copy(update=options)})


def test_a_run_reads_a_new_minute_and_an_old_folder_blob_waits_for_a_full_listing(
    tmp_path: Path, generated: GenerationResult
) -> None:
    device = tmp_path / "landing" / "device"
    shutil.copytree(generated.out / "landing" / "device", device)
    blobs = _blobs(device)
    assert len(blobs) > 10
    oldest, newest = blobs[0], blobs[-1]
    held = {p: p.read_bytes() for p in (oldest, newest)}
    for path in held:
        path.unlink()
    settings = settings_for(tmp_path)
    first = pipeline.ingest(settings, "device", "run-1")
    assert first.new_inputs == len(blobs) - 2

    for path, data in held.items():  # the newest minute arrives, and a blob in an old folder
        path.write_bytes(data)
    second = pipeline.ingest(settings, "device", "run-2")
    assert second.new_inputs == 1
    read = Lake(settings).read(ledger_table("device"), columns=["uri"])
    assert read is not None and str(newest) in read.column("uri").to_pylist()
    assert str(oldest) not in read.column("uri").to_pylist()

    # The first run of the next full-listing period (here: every run) finds it.
    third = pipeline.ingest(_with_options(settings, device_full_listing_hours=0), "device", "run-3")
    assert third.new_inputs == 1
    assert (
        pipeline.ingest(_with_options(settings, device_full_listing_hours=0), "device", "run-4").new_inputs
        == 0
    )


def test_reprocess_and_a_backfill_list_every_folder(tmp_path: Path, generated: GenerationResult) -> None:
    device = tmp_path / "landing" / "device"
    shutil.copytree(generated.out / "landing" / "device", device)
    settings = settings_for(tmp_path)
    assert pipeline.ingest(settings, "device", "run-1").new_inputs > 1
    oldest = _blobs(device)[0]
    folder = str(oldest.parent.relative_to(device))
    forgotten = pipeline.forget_inputs(settings, "device", folder)
    assert forgotten >= 1
    assert pipeline.ingest(settings, "device", "run-2").new_inputs == forgotten

    # A blob written again in an old folder (a restore) is read by a backfill of its landing day.
    oldest.write_bytes(oldest.read_bytes() + b"\n")
    assert pipeline.ingest(settings, "device", "run-3").new_inputs == 0
    today = datetime.now(UTC)
    window = (today - timedelta(days=1), today + timedelta(days=1))
    backfilled = pipeline.ingest(settings, "device", "run-4", window=window)
    assert backfilled.new_inputs == 1
