"""Synthea's own layout end to end: one transaction Bundle per patient, named after the patient,
with urn:uuid references. Every patient gets the journey events the bulk layout of the same
cohort gives, type for type, and no patient name, MRN, phone or street (planted in file names,
folder names and every PHI field) is found outside the restricted zone: in any file of any Delta
version of the warehouse, the Data Docs, the Prefect database's runs, task runs, logs and
artifacts, or what the run printed."""

from __future__ import annotations

import asyncio
import csv
import shutil
from collections import Counter
from pathlib import Path

import orjson
import pyarrow.parquet as pq
import pytest
from prefect.client.orchestration import get_client

from flows.journey import patient_journey
from patient_journey import pipeline
from patient_journey.generate import generate
from patient_journey.generate.model import build_cohort
from patient_journey.generate.synthea import SYNTHEA_DIR, synthea_names
from patient_journey.lake import Lake, gold
from tests.conftest import settings_for, use_settings_env

pytestmark = pytest.mark.prefect

PATIENTS, SEED = 12, 20261204


def _canaries() -> set[str]:
    """The direct identifiers of every patient of the cohort, as the landing zone carries them."""
    found: set[str] = set()
    for journey in build_cohort(PATIENTS, SEED).journeys:
        given, family = synthea_names(journey)
        found |= {given, family, journey.mrn, journey.phone, journey.address_line}
    return found


def _warehouse_text(root: Path) -> str:
    """Every file of the warehouse folder (every Delta version's data files and logs) as text."""
    parts = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        parts.append(str(path.relative_to(root)))
        if path.suffix == ".parquet":
            parts.append(repr(pq.read_table(path).to_pylist()))
        else:
            parts.append(path.read_bytes().decode("utf-8", "replace"))
    return "\n".join(parts)


async def _prefect_text() -> str:
    async with get_client() as client:
        runs = await client.read_flow_runs()
        tasks = await client.read_task_runs()
        logs = await client.read_logs()
        artifacts = await client.read_artifacts()
    rows = [
        *(r.model_dump(mode="json") for r in runs),
        *(t.model_dump(mode="json") for t in tasks),
        *(entry.model_dump(mode="json") for entry in logs),
        *(a.model_dump(mode="json") for a in artifacts),
    ]
    assert runs and tasks and artifacts
    return orjson.dumps(rows).decode()


def _events_per_type(settings_root: Path) -> Counter[tuple[str, str]]:
    events = Lake(settings_for(settings_root)).read(gold("journey_event"))
    assert events is not None
    return Counter(
        zip(events.column("patient_key").to_pylist(), events.column("event_type").to_pylist(), strict=True)
    )


def test_synthea_bundles_load_every_patient_s_journey_and_no_name_leaves_the_restricted_zone(
    harness: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    synthea = generate(
        tmp_path / "synthea", patients=PATIENTS, seed=SEED, bad_rate=0.0, fhir_layout="synthea"
    )
    bulk = generate(tmp_path / "bulk", patients=PATIENTS, seed=SEED, bad_rate=0.0)
    landing = synthea.out / "landing"
    bundles = sorted((landing / SYNTHEA_DIR).glob("*_*_*.json"))
    assert len(bundles) == PATIENTS
    # A folder named after a patient too, for the EHR files and for a device hub's blobs.
    first = bundles[0].name.split("_")
    named = landing / "ehr" / f"{first[0]}_{first[1]}"
    shutil.move(landing / SYNTHEA_DIR, named)
    hub = sorted((landing / "device").iterdir())[0]
    shutil.move(hub, landing / "device" / f"{first[0]}-{first[1]}")
    canaries = _canaries()
    assert any(c in bundles[0].name for c in canaries)

    settings = settings_for(tmp_path / "run", landing=landing)
    use_settings_env(monkeypatch, settings)
    summary = patient_journey()
    printed = capfd.readouterr()
    assert summary.balanced and summary.built

    # The same cohort in the bulk layout, through the pipeline's steps.
    reference = settings_for(tmp_path / "reference", landing=bulk.out / "landing")
    for source in pipeline.SOURCES:
        pipeline.ingest(reference, source, "reference")
    pipeline.build_silver(reference, "reference")
    pipeline.build_gold(reference, "reference")
    ours, theirs = _events_per_type(tmp_path / "run"), _events_per_type(tmp_path / "reference")
    assert ours == theirs
    patients = {patient for patient, _ in ours}
    assert len(patients) == PATIENTS
    for patient in patients:
        for kind in ("encounter", "procedure", "condition", "observation", "prom"):
            assert ours[(patient, kind)] > 0, (patient, kind)
        assert sum(n for (p, kind), n in ours.items() if p == patient and kind.startswith("device:")) > 0

    places = {
        "warehouse": _warehouse_text(tmp_path / "run" / "warehouse"),
        "prefect": asyncio.run(_prefect_text()),
        "output": printed.out + printed.err,
    }
    docs = sorted((tmp_path / "run").rglob("data_docs/**/*.html"))
    assert docs
    places["data docs"] = "\n".join(p.read_text() for p in docs)
    leaks = {(place, c) for place, text in places.items() for c in canaries if c in text}
    assert leaks == set()
    # ... and they are where they belong: the restricted zone keeps the landing paths.
    restricted = pipeline.Lake(settings).read(pipeline.ledger_table("fhir"))
    assert restricted is not None and any(first[0] in uri for uri in restricted.column("uri").to_pylist())


def test_the_synthea_layout_keeps_the_bulk_layout_s_ground_truth(tmp_path: Path) -> None:
    synthea = generate(tmp_path / "s", patients=5, seed=7, bad_rate=0.0, fhir_layout="synthea")
    bulk = generate(tmp_path / "b", patients=5, seed=7, bad_rate=0.0)
    for name in ("episodes.csv", "device_clock.csv"):
        ours, theirs = ((r.out / "ground_truth" / name).read_text() for r in (synthea, bulk))
        assert ours == theirs, name
    assert synthea.resources["Patient"] == bulk.resources["Patient"] == 5
    rows = list(csv.DictReader((synthea.out / "ground_truth" / "planted_bad_records.csv").open()))
    assert rows == []
    with pytest.raises(ValueError, match="fhir_layout"):
        generate(tmp_path / "x", patients=1, seed=1, fhir_layout="ccda")
