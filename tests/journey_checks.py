"""Checks shared by the end-to-end tests on a local folder and on Azure Blob Storage (Azurite):
the warehouse must reproduce the generator's ground truth exactly, wherever it lives."""

from __future__ import annotations

import csv

from patient_journey.generate import GenerationResult
from patient_journey.identity import KeyMaker
from patient_journey.lake import Lake, gold
from patient_journey.pipeline import HELD, QUARANTINE
from tests.conftest import TEST_KEY

# The rule each planted kind must be caught by, and where it must end up.
EXPECTED_RULE = {
    ("malformed_json", "observation"): "json_well_formed",
    ("missing_required_field", "observation"): "subject_present",
    ("out_of_range_value", "prom_response"): "score_in_range",
    ("duplicate_id", "observation"): "record_id_unique",
    ("device_case_unmatched", "device_message"): "case_id_links_to_procedure",
    ("unknown_patient_outcome", "registry_patient"): "mrn_and_birth_date_link_to_patient",
    ("unknown_patient_outcome", "prom_response"): "registry_id_links_to_patient",
    ("unknown_device_type", "device_event"): "device_template_matches",
    ("out_of_range_value", "device_event"): "tourniquet_pressure_in_range",
    ("out_of_range_value", "fhir_prom"): "item_in_range",
    ("invalid_choice_code", "redcap_prom"): "redcap_choice_valid",
}
STAGED_NAME = {"device_message": "device_event"}


def truth(generated: GenerationResult, name: str) -> list[dict[str, str]]:
    with (generated.out / "ground_truth" / name).open() as handle:
        return list(csv.DictReader(handle))


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ";".join(value)
    if isinstance(value, float):
        return f"{value:.1f}"
    if hasattr(value, "isoformat"):
        return str(value.isoformat())
    return str(value)


def episode_mismatches(lake: Lake, generated: GenerationResult) -> list[tuple[str, str, str, str]]:
    """(case id, column, expected, actual) for every gold episode fact that differs from the truth."""
    keys = KeyMaker(TEST_KEY.encode())
    episodes = lake.read(gold("surgical_episode"))
    assert episodes is not None
    by_key = {row["episode_key"]: row for row in episodes.to_pylist()}
    rows = truth(generated, "episodes.csv")
    assert len(by_key) == len(rows) == generated.episodes
    mismatches = []
    for expected in rows:
        row = by_key[keys.case_key(expected["case_id"])]
        assert row["patient_key"] == keys.patient_key(expected["mrn"])
        for column, value in expected.items():
            if column in ("case_id", "mrn"):
                continue
            actual = row[column]
            numeric = not column.startswith(("prom_mcid_", "prom_instrument", "prom_source"))
            if column.startswith("prom_") and numeric and value:
                value = f"{float(value):.1f}"
            if _text(actual) != value:
                mismatches.append((expected["case_id"], column, value, _text(actual)))
    return mismatches


def assert_planted_records_caught(lake: Lake, generated: GenerationResult) -> None:
    """Every planted bad record is in quarantine or held, once, under its rule."""
    places = {"quarantined": lake.read(QUARANTINE), "held": lake.read(HELD)}
    planted = truth(generated, "planted_bad_records.csv")
    assert len(planted) == sum(generated.planted.values()) > 0
    for record in planted:
        table = places[record["expected_outcome"]]
        assert table is not None
        rows = table.to_pylist()
        if record["source"] == "registry":
            registry_table, key = record["locator"].split(":")
            found = [r for r in rows if r["table_name"] == registry_table and r["record_id"] == key]
        else:
            found = [
                r
                for r in rows
                if r["source_uri"].endswith(record["path"]) and r["source_offset"] == int(record["locator"])
            ]
        rule = EXPECTED_RULE[(record["kind"], record["table"])]
        assert len(found) == 1, record
        assert rule in found[0]["rule"].split("; "), (record, found[0]["rule"])


def device_clock_mismatches(lake: Lake, generated: GenerationResult) -> list[tuple[str, int, float]]:
    """Devices whose measured clock skew is off the planted one by more than IoT Hub's latency.

    The generator delays each message by 0-20 s between the device and IoT Hub, so the median of
    (device time - enqueued time) is the planted skew minus about 10 s.
    """
    clock = lake.read(gold("device_clock"))
    assert clock is not None
    measured = {row["device_key"]: row["median_skew_seconds"] for row in clock.to_pylist()}
    keys = KeyMaker(TEST_KEY.encode())
    planted = {  # the ground truth names each device by its serial; gold by the serial's keyed hash
        keys.key("device-serial", row["device_id"]): int(row["clock_skew_seconds"])
        for row in truth(generated, "device_clock.csv")
    }
    assert set(planted) <= set(measured)
    return [(d, skew, measured[d]) for d, skew in planted.items() if abs(measured[d] - (skew - 10)) > 10]
