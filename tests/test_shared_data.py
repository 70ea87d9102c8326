"""The public files in ../shared/data go through the FHIR path; counts reconcile per type."""

from __future__ import annotations

import re
import shutil
from collections import Counter
from pathlib import Path

import orjson
import pytest

from patient_journey import pipeline
from patient_journey.lake import Lake, bronze
from patient_journey.pipeline import extraction_rejects_table
from patient_journey.sources.fhir import resource_type_of_file
from tests.conftest import settings_for

pytestmark = pytest.mark.shared_data


def _land(tmp_path: Path, files: list[Path], folder: str) -> Path:
    landing = tmp_path / "landing"
    target = landing / "ehr" / folder
    target.mkdir(parents=True)
    for file in files:
        shutil.copy(file, target / file.name)
    return landing


def _by_entity(lake: Lake) -> tuple[Counter[str], Counter[str]]:
    records = lake.read(bronze("fhir_resource"))
    rejects = lake.read(extraction_rejects_table("fhir"))
    loaded = Counter(records.column("entity").to_pylist()) if records is not None else Counter()
    rejected = Counter(rejects.column("entity").to_pylist()) if rejects is not None else Counter()
    return loaded, rejected


def test_synthea_bulk_export_loads_with_counts_per_resource_type(shared_data: Path, tmp_path: Path) -> None:
    files = sorted((shared_data / "synthea-bulk-10").glob("*.ndjson"))
    landing = _land(tmp_path, files, "synthea")
    settings = settings_for(tmp_path, landing=landing)
    report = pipeline.ingest(settings, "fhir", "run-synthea")
    loaded, rejected = _by_entity(Lake(settings))
    for file in files:
        lines = sum(1 for line in file.read_bytes().split(b"\n") if line.strip())
        entity = resource_type_of_file(file.name) or "unknown"  # log.ndjson: Synthea's export log
        assert loaded[entity] + rejected[entity] == lines, entity
    assert report.records == sum(loaded.values()) > 0
    patients = (
        (shared_data / "synthea-bulk-10" / "Patient.000.ndjson").read_text().count('"resourceType":"Patient"')
    )
    assert loaded["Patient"] == patients and rejected["Patient"] == 0

    silver = pipeline.build_silver(settings, "run-synthea")
    counts = {t.table: t for t in silver.tables}
    assert all(t.balanced for t in silver.tables)
    # Synthea's MRN is the identifier typed MR: every patient and their encounters link.
    assert counts["patient"].loaded == patients
    assert counts["encounter"].loaded == loaded["Encounter"] and counts["encounter"].held == 0
    assert silver.bronze_only["Location"] == loaded["Location"]


def test_fhir_r4_examples_load_or_are_rejected_per_resource_type(shared_data: Path, tmp_path: Path) -> None:
    files = sorted((shared_data / "fhir-r4-examples").glob("*.json"))
    landing = _land(tmp_path, files, "bundles")
    settings = settings_for(tmp_path, landing=landing)
    pipeline.ingest(settings, "fhir", "run-examples")
    loaded, rejected = _by_entity(Lake(settings))
    expected: Counter[str] = Counter()
    for file in files:
        document = orjson.loads(file.read_bytes())
        if document["resourceType"] == "Bundle":
            for entry in document.get("entry", []):
                url = entry.get("request", {}).get("url", "")
                if entry.get("request", {}).get("method") == "DELETE":  # Type/id, else rejected
                    expected[url.split("/")[0] if re.fullmatch(r"[A-Z]\w+/[\w.-]+", url) else "Bundle"] += 1
                else:
                    expected[entry["resource"]["resourceType"] if "resource" in entry else "Bundle"] += 1
        else:
            expected[document["resourceType"]] += 1
    assert loaded + rejected == expected
    assert loaded["Patient"] >= 1 and loaded["QuestionnaireResponse"] >= 1

    silver = pipeline.build_silver(settings, "run-examples")
    assert all(t.balanced for t in silver.tables)


def test_json_test_suite_invalid_files_are_quarantined_without_a_crash(
    shared_data: Path, tmp_path: Path
) -> None:
    invalid = sorted((shared_data / "json-test-suite").glob("n_*.json"))
    valid = sorted((shared_data / "json-test-suite").glob("y_*.json"))
    landing = _land(tmp_path, invalid + valid, "bundles")
    settings = settings_for(tmp_path, landing=landing)
    report = pipeline.ingest(settings, "fhir", "run-json")
    rejects = Lake(settings).read(extraction_rejects_table("fhir"))
    assert rejects is not None
    rules = {
        Path(uri).name: rule
        for uri, rule in zip(
            rejects.column("source_uri").to_pylist(), rejects.column("rule").to_pylist(), strict=True
        )
    }
    assert report.records == 0
    for file in invalid:
        # bytes that are not UTF-8 are named as such; everything else is not well-formed JSON
        # (and 100,000 opening brackets are deeper than the reader goes)
        expected = "utf8_valid" if rules[file.name] == "utf8_valid" else "json_well_formed"
        if file.name in ("n_structure_100000_opening_arrays.json", "n_structure_open_array_object.json"):
            expected = "json_nesting_depth"
        if file.stat().st_size == 0:
            expected = "input_not_empty"
        assert rules[file.name] == expected, file.name
    not_utf8 = sorted(name for name, rule in rules.items() if rule == "utf8_valid")
    assert not_utf8 and all(name.startswith("n_") for name in not_utf8)
    for name in not_utf8:
        with pytest.raises(UnicodeDecodeError):
            (shared_data / "json-test-suite" / name).read_bytes().decode("utf-8")
    for file in valid:
        # Well-formed JSON that is not a FHIR resource is rejected under another rule.
        assert rules[file.name] == "fhir_resource_type_present", file.name
    details = " ".join(rejects.column("detail").to_pylist())
    assert "column" in details
