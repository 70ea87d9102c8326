"""Tests of the synthetic landing-zone generator (small cohorts, fast)."""

from __future__ import annotations

import base64
import csv
import hashlib
import sqlite3
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, cast

import fastavro
import orjson
import pytest

from patient_journey.generate import GenerationResult, generate

PATIENTS = 40
BAD_RATE = 0.05  # -> 2 instances of each kind
EHR = "landing/ehr/fhir-export-20250301T000000Z"
EPISODE_HEADER = (
    "case_id,mrn,joint,procedure_code,robotic_assisted,admission_time,discharge_time,"
    "surgery_start,surgery_end,or_minutes,devices_used,length_of_stay_days,complication_30d,"
    "complication_90d,max_complication_grade_90d,readmission_30d,readmission_90d,"
    "prom_instrument,prom_source,prom_baseline,prom_6w,prom_6m,prom_12m,"
    "prom_change_6w,prom_change_6m,prom_change_12m,prom_mcid_6w,prom_mcid_6m,prom_mcid_12m,"
    "complications_90d,readmissions_90d,device_events"
)


def _hashes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _ndjson(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines()


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> GenerationResult:
    return generate(tmp_path_factory.mktemp("a"), PATIENTS, seed=7, bad_rate=BAD_RATE)


@pytest.fixture(scope="module")
def planted(run: GenerationResult) -> list[dict[str, str]]:
    return _csv(run.out / "ground_truth" / "planted_bad_records.csv")


def test_same_seed_same_bytes_other_seed_differs(run: GenerationResult, tmp_path: Path) -> None:
    again = generate(tmp_path / "b", PATIENTS, seed=7, bad_rate=BAD_RATE)
    other = generate(tmp_path / "c", PATIENTS, seed=8, bad_rate=BAD_RATE)
    assert _hashes(run.out) == _hashes(again.out)
    assert (again.resources, again.device_messages, again.planted) == (
        run.resources,
        run.device_messages,
        run.planted,
    )
    h1, h3 = _hashes(run.out), _hashes(other.out)
    assert h1["ground_truth/episodes.csv"] != h3["ground_truth/episodes.csv"]
    assert h1["landing/outcomes/registry.sqlite"] != h3["landing/outcomes/registry.sqlite"]


def test_refuses_existing_landing(run: GenerationResult) -> None:
    with pytest.raises(FileExistsError):
        generate(run.out, PATIENTS, seed=7)


def test_manifest_counts_match_lines(run: GenerationResult) -> None:
    manifest = orjson.loads((run.out / EHR / "manifest.json").read_bytes())
    assert manifest["transactionTime"] and manifest["error"] == []
    types = {o["type"] for o in manifest["output"]}
    assert types == {
        "Patient",
        "Encounter",
        "Procedure",
        "Condition",
        "Observation",
        "Device",
        "QuestionnaireResponse",
    }
    for entry in manifest["output"]:
        name = entry["url"].rsplit("/", 1)[1]
        assert entry["count"] == len(_ndjson(run.out / EHR / name))
        assert run.resources[entry["type"]] == entry["count"]


def test_ndjson_parses_except_planted_malformed(run: GenerationResult, planted: list[dict[str, str]]) -> None:
    malformed = {int(p["locator"]) for p in planted if p["kind"] == "malformed_json"}
    for path in sorted((run.out / EHR).glob("*.ndjson")):
        for lineno, line in enumerate(_ndjson(path), start=1):
            if path.name == "Observation.000.ndjson" and lineno in malformed:
                with pytest.raises(orjson.JSONDecodeError):
                    orjson.loads(line)
                continue
            res = orjson.loads(line)
            assert res["resourceType"] == path.name.split(".")[0]
            assert res["meta"]["lastUpdated"]


def _read_avro(path: Path) -> list[dict[str, Any]]:
    with path.open("rb") as fh:
        reader = fastavro.reader(fh)
        schema: Any = reader.writer_schema
        assert schema["name"] == "Microsoft.Azure.Devices.Message"
        return [cast(dict[str, Any], record) for record in reader]


def _routed_messages(blob: Path) -> list[dict[str, Any]]:
    if blob.suffix == ".avro":
        return _read_avro(blob)
    return [orjson.loads(line) for line in blob.read_bytes().splitlines()]


def _body(message: dict[str, Any]) -> dict[str, Any]:
    body = message["Body"]
    if isinstance(body, dict):
        return body
    if isinstance(body, str):  # JSON routing of a body not declared as UTF-8 JSON: base64
        body = base64.b64decode(body)
    return cast(dict[str, Any], orjson.loads(body))


def test_avro_reads_back(run: GenerationResult, planted: list[dict[str, str]]) -> None:
    device = run.out / "landing/device"
    blobs = sorted(p for p in device.rglob("*") if p.suffix in (".avro", ".json"))
    skews = {
        row["device_id"]: int(row["clock_skew_seconds"])
        for row in csv.DictReader((run.out / "ground_truth/device_clock.csv").open())
    }
    total = 0
    for blob in blobs:
        records = _routed_messages(blob)
        total += len(records)
        enqueued = [r["EnqueuedTimeUtc"] for r in records]
        assert enqueued == sorted(enqueued)
        rel = blob.relative_to(device).parts
        assert rel[0].startswith("or-telemetry-") and rel[1] in {"0", "1", "2", "3"}
        for r in records:
            enq = datetime.fromisoformat(r["EnqueuedTimeUtc"])
            window = f"{enq:%Y/%m/%d/%H}/{enq.minute // 5 * 5:02d}{blob.suffix}"
            assert "/".join(rel[2:]) == window
            sp = r["SystemProperties"]
            body = _body(r)
            assert sp["connectionDeviceId"].endswith(f"-{body['serial']}")
            assert set(body) == {
                "caseId", "deviceType", "udiDi", "serial", "firmware",
                "eventType", "timestamp", "value", "unit",
            }  # fmt: skip
            ts = datetime.fromisoformat(body["timestamp"]) - timedelta(seconds=skews.get(body["serial"], 0))
            assert 0 <= (enq - ts).total_seconds() <= 21
    assert total == run.device_messages
    for p in planted:
        if p["kind"] == "device_case_unmatched":
            record = _routed_messages(run.out / "landing" / p["path"])[int(p["locator"])]
            assert _body(record)["caseId"].startswith("CASE-9")
        elif p["kind"] == "unknown_device_type":
            record = _routed_messages(run.out / "landing" / p["path"])[int(p["locator"])]
            assert _body(record)["deviceType"] == "smoke-evacuator"


def test_planted_counts(run: GenerationResult, planted: list[dict[str, str]]) -> None:
    n = max(1, round(BAD_RATE * PATIENTS))
    expected = {
        "malformed_json": n,
        "missing_required_field": n,
        # registry score, device value, QuestionnaireResponse item
        "out_of_range_value": 3 * n,
        "duplicate_id": n,
        "device_case_unmatched": 4 * n,  # one bad record per message of each extra stream
        "unknown_patient_outcome": 2 * n,  # registry_patient row + prom_response row
        "unknown_device_type": n,
        "invalid_choice_code": n,
    }
    assert Counter(p["kind"] for p in planted) == expected
    assert run.planted == expected
    for p in planted:
        assert p["expected_outcome"] == (
            "held" if p["kind"] in {"device_case_unmatched", "unknown_patient_outcome"}
            else "quarantined"
        )  # fmt: skip


def test_planted_fhir_records_are_what_they_claim(
    run: GenerationResult, planted: list[dict[str, str]]
) -> None:
    lines = _ndjson(run.out / EHR / "Observation.000.ndjson")
    for p in planted:
        if p["source"] != "fhir":
            continue
        line = lines[int(p["locator"]) - 1]
        if p["kind"] == "missing_required_field":
            assert "subject" not in orjson.loads(line)
        elif p["kind"] == "duplicate_id":
            ident = orjson.loads(line)["id"]
            earlier = lines[: int(p["locator"]) - 1]
            assert any(not ln.endswith(b"}") or orjson.loads(ln)["id"] == ident for ln in earlier)
            assert sum(ident.encode() in ln for ln in earlier) >= 1


def test_bad_rate_zero_plants_nothing_and_keeps_facts(run: GenerationResult, tmp_path: Path) -> None:
    clean = generate(tmp_path / "clean", PATIENTS, seed=7, bad_rate=0.0)
    assert set(clean.planted.values()) == {0}
    assert _csv(clean.out / "ground_truth" / "planted_bad_records.csv") == []
    gt = "ground_truth/episodes.csv"
    assert (clean.out / gt).read_bytes() == (run.out / gt).read_bytes()
    for line in _ndjson(clean.out / EHR / "Observation.000.ndjson"):
        assert "subject" in orjson.loads(line)


def test_ground_truth_invariants(run: GenerationResult, planted: list[dict[str, str]]) -> None:
    gt = run.out / "ground_truth" / "episodes.csv"
    assert gt.read_text(encoding="utf-8").splitlines()[0] == EPISODE_HEADER
    episodes = _csv(gt)
    assert len(episodes) == PATIENTS == run.episodes
    procedures = [orjson.loads(line) for line in _ndjson(run.out / EHR / "Procedure.000.ndjson")]
    case_ids = {i["value"] for p in procedures for i in p["identifier"]}
    patients = [orjson.loads(line) for line in _ndjson(run.out / EHR / "Patient.000.ndjson")]
    ehr_dob = {p["identifier"][0]["value"]: p["birthDate"] for p in patients}
    for e in episodes:
        admit, start = e["admission_time"], e["surgery_start"]
        assert datetime.fromisoformat(admit) <= datetime.fromisoformat(start)
        assert datetime.fromisoformat(start) < datetime.fromisoformat(e["surgery_end"])
        assert datetime.fromisoformat(e["surgery_end"]) <= datetime.fromisoformat(e["discharge_time"])
        assert float(e["or_minutes"]) > 0
        assert int(e["length_of_stay_days"]) >= 1
        assert e["case_id"] in case_ids
        assert e["mrn"] in ehr_dob
        assert len(e["devices_used"].split(";")) == 2
        assert e["prom_source"] in {"registry", "redcap", "fhir"}

    planted_keys = {p["locator"] for p in planted if p["source"] == "registry"}
    con = sqlite3.connect(run.out / "landing/outcomes/registry.sqlite")
    try:
        reg = con.execute("SELECT registry_id, mrn, birth_date FROM registry_patient").fetchall()
        scores = con.execute("SELECT response_id, registry_id, score FROM prom_response").fetchall()
    finally:
        con.close()
    good = [r for r in reg if f"registry_patient:{r[0]}" not in planted_keys]
    assert len(good) == PATIENTS
    assert all(ehr_dob[mrn] == dob for _, mrn, dob in good)
    bad_patients = [r for r in reg if f"registry_patient:{r[0]}" in planted_keys]
    assert all(mrn not in ehr_dob for _, mrn, _ in bad_patients)
    for response_id, _, score in scores:
        key = f"prom_response:{response_id}"
        kinds = {p["kind"] for p in planted if p["locator"] == key}
        assert (score > 100) == (kinds == {"out_of_range_value"})

    # PROMs come from the registry or REDCap, never both
    registry_mrns = {mrn for rid, mrn, _ in good if any(s[1] == rid for s in scores)}
    redcap = _csv(run.out / "landing/outcomes/redcap/prom_records.csv")
    redcap_mrns = {r["mrn"] for r in redcap if r["redcap_event_name"] == "baseline_arm_1"}
    bad_rids = {int(p["locator"].split(":")[1]) for p in planted if p["table"] == "prom_response"}
    registry_good = {mrn for rid, mrn, _ in good if any(s[1] == rid and s[0] not in bad_rids for s in scores)}
    assert registry_good <= registry_mrns
    assert not registry_good & redcap_mrns
