"""Records that cannot be linked yet are held, and load on a later run once their patient arrives."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from patient_journey import pipeline
from patient_journey.generate import GenerationResult
from tests.conftest import settings_for


def test_held_records_link_on_the_next_run_after_their_patient_arrives(
    generated: GenerationResult, tmp_path: Path
) -> None:
    landing = tmp_path / "landing"
    shutil.copytree(generated.out / "landing" / "outcomes", landing / "outcomes")
    shutil.copytree(generated.out / "landing" / "device", landing / "device")
    settings = settings_for(tmp_path, landing=landing)

    for source in pipeline.SOURCES:
        pipeline.ingest(settings, source, "run-1")
    first = {t.table: t for t in pipeline.build_silver(settings, "run-1").tables}
    device = first["device_event"]
    assert device.loaded == 0 and device.held == device.read - device.quarantined > 0
    assert first["prom_response"].loaded == 0 and first["prom_response"].held > 0

    shutil.copytree(generated.out / "landing" / "ehr", landing / "ehr")
    reports = [pipeline.ingest(settings, source, "run-2") for source in pipeline.SOURCES]
    assert [r.source for r in reports if r.records] == ["fhir"]  # nothing else is read twice
    second = {t.table: t for t in pipeline.build_silver(settings, "run-2").tables}
    assert second["device_event"].read == first["device_event"].read
    assert second["device_event"].loaded > 0
    # only the planted unmatched cases stay held
    assert second["device_event"].held == generated.planted["device_case_unmatched"]
    assert second["registry_patient"].held == generated.planted["unknown_patient_outcome"] // 2
    for table in second.values():
        assert table.balanced, table


@pytest.mark.parametrize("source", ["nonsense"])
def test_an_unknown_source_is_refused_with_the_valid_names(source: str, tmp_path: Path) -> None:
    from patient_journey.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="fhir, device, registry, redcap, hl7v2"):
        pipeline.ingest(settings_for(tmp_path), source, "run-1")
