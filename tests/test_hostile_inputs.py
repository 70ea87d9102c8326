"""Real inputs never stop a load: each class of input that once raised out of an extractor is
now a rule on the smallest unit it spoils (record, Bundle entry, Avro block, file), the records
around it load, and the input is recorded as read, so the next run moves on."""

from __future__ import annotations

import gzip
import shutil
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from patient_journey import pipeline
from patient_journey.generate import GenerationResult
from patient_journey.sources import fhir
from patient_journey.sources.plugins import STAGED_TABLES
from patient_journey.sources.records import Extraction, InputSelection
from patient_journey.staging import stage
from patient_journey.storage import Storage
from tests.conftest import settings_for

PATIENT = b'{"resourceType":"Patient","id":"p1"}'


def _deep(levels: int) -> bytes:
    return b'{"resourceType":"Observation","id":"deep","extension":' + b"[" * levels + b"]" * levels + b"}"


def _bundle(entries: list[Any], **fields: Any) -> bytes:
    return orjson.dumps({"resourceType": "Bundle", "type": "transaction", **fields, "entry": entries})


GOOD_ENTRY = {"fullUrl": "urn:uuid:p2", "resource": {"resourceType": "Patient", "id": "p2"}}
# name -> (file name, content, [(offset, rule)] expected, ids expected to load)
CASES: dict[str, tuple[str, bytes, list[tuple[int, str]], list[str]]] = {
    "bundle nested 600 levels deep": (
        "deep.json",
        _bundle([GOOD_ENTRY, {"resource": "DEEP"}]).replace(b'"DEEP"', _deep(600)),
        [(2, "json_nesting_depth")],
        ["p2"],
    ),
    "ndjson line nested deeper than the parser goes": (
        "Observation.001.ndjson",
        b'{"resourceType":"Observation","id":"o1"}\n' + _deep(1100) + b"\n",
        [(2, "json_nesting_depth")],
        ["o1"],
    ),
    "truncated ndjson.gz": (
        "Patient.002.ndjson.gz",
        gzip.compress(b"".join(b'{"resourceType":"Patient","id":"t%d"}\n' % n for n in range(50)))[:-12],
        [(0, "gzip_readable")],  # offset checked apart: the line after the last whole one
        [],
    ),
    "gz that is not gzip": (
        "Encounter.003.ndjson.gz",
        b"plain text, no gzip header",
        [(0, "gzip_readable")],
        [],
    ),
    "entry request is a string": (
        "request.json",
        _bundle([{"request": "POST", "resource": {"resourceType": "Patient", "id": "x"}}, GOOD_ENTRY]),
        [(1, "fhir_field_type")],
        ["p2"],
    ),
    "resource meta is a string": (
        "meta.json",
        _bundle(
            [{"resource": {"resourceType": "Patient", "id": "x", "meta": "CANARY"}}, GOOD_ENTRY], meta="x"
        ),
        [(1, "fhir_field_type")],
        ["p2"],
    ),
    "id is a number": (
        "Patient.004.ndjson",
        b'{"resourceType":"Patient","id":12345}\n' + PATIENT + b"\n",
        [(1, "fhir_field_type")],
        ["p1"],
    ),
    "byte order mark": ("Patient.005.ndjson", b"\xef\xbb\xbf" + PATIENT + b"\n", [], ["p1"]),
    "number beyond a double": (
        "Observation.006.ndjson",
        b'{"resourceType":"Observation","id":"big","valueQuantity":{"value":1e400}}\n'
        + PATIENT.replace(b"Patient", b"Observation")
        + b"\n",
        [(1, "json_number_in_range")],
        ["p1"],
    ),
    "invalid utf-8": (
        "Patient.007.ndjson",
        b'{"resourceType":"Patient","id":"\xc0\xaf"}\n' + PATIENT + b"\n",
        [(1, "utf8_valid")],
        ["p1"],
    ),
    "entry is not a list": (
        "entries.json",
        _bundle([]).replace(b'"entry":[]', b'"entry":"x"'),
        [(0, "fhir_field_type")],
        [],
    ),
}


def _extract(tmp_path: Path, name: str, content: bytes) -> Extraction:
    (tmp_path / "ehr").mkdir(exist_ok=True)
    (tmp_path / "ehr" / name).write_bytes(content)
    return fhir.extract(Storage(str(tmp_path)), f"ehr/{name}", InputSelection(), "run-hostile")


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_hostile_fhir_input_is_a_named_rule_at_its_position_and_its_neighbours_load(
    case: str, tmp_path: Path
) -> None:
    name, content, expected, ids = CASES[case]
    out = _extract(tmp_path, name, content)
    rejects = out.rejects().to_pylist()
    got = [(r["source_offset"], r["rule"]) for r in rejects]
    if case == "truncated ndjson.gz":
        assert [rule for _, rule in got] == ["gzip_readable"]
        loaded = out.records().column("record_id").to_pylist()
        # every whole line before the cut loads, and the reject names the line after them
        assert loaded == [f"t{n}" for n in range(len(loaded))] and 0 < len(loaded) < 50
        assert got[0][0] == len(loaded) + 1
    else:
        assert got == expected
        assert sorted(out.records().column("record_id").to_pylist()) == sorted(ids)
    assert out.input_count == 1  # recorded as read: the next run moves on
    for reject in rejects:
        assert "CANARY" not in (reject["detail"] or "")


def test_resources_without_an_id_are_never_taken_for_one_another(tmp_path: Path) -> None:
    line = b'{"resourceType":"Patient","gender":"female"}\n'
    out = _extract(tmp_path, "Patient.008.ndjson", line * 2 + b'{"resourceType":"Patient","gender":"male"}\n')
    ids = out.records().column("record_id").to_pylist()
    assert len(ids) == 3 and len(set(ids)) == 3 and all(i.startswith("~") for i in ids)
    again = _extract(
        tmp_path, "Patient.008.ndjson", line * 2 + b'{"resourceType":"Patient","gender":"male"}\n'
    )
    assert again.records().column("record_id").to_pylist() == ids  # stable for the same input
    staged = stage({"fhir_resource": out.records()}, STAGED_TABLES)["patient"]
    assert staged.num_rows == 3 and not any(staged.column("_superseded").to_pylist())


def _synthea_bundle() -> bytes:
    """A patient's transaction Bundle as Synthea writes it: urn:uuid fullUrls and references,
    conditional references to Organization and Practitioner (in their own Bundles)."""
    patient_url = "urn:uuid:b0a5b4b8-7bd4-4b4c-9e1f-1d1d5b8f0c11"
    encounter_url = "urn:uuid:5f3e2d1c-0b9a-4877-8665-544332211000"
    return orjson.dumps(
        {
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [
                {
                    "fullUrl": patient_url,
                    "resource": {
                        "resourceType": "Patient",
                        "id": "b0a5b4b8-7bd4-4b4c-9e1f-1d1d5b8f0c11",
                        "identifier": [{"type": {"coding": [{"code": "MR"}]}, "value": "MRN-1"}],
                    },
                    "request": {"method": "POST", "url": "Patient"},
                },
                {
                    "fullUrl": encounter_url,
                    "resource": {
                        "resourceType": "Encounter",
                        "id": "5f3e2d1c-0b9a-4877-8665-544332211000",
                        "subject": {"reference": patient_url},
                        "serviceProvider": {
                            "reference": "Organization?identifier=https://github.com/synthetichealth/synthea|7f"
                        },
                    },
                    "request": {"method": "POST", "url": "Encounter"},
                },
                {
                    "fullUrl": "urn:uuid:0c1d2e3f-4a5b-4c6d-8e9f-a0b1c2d3e4f5",
                    "resource": {
                        "resourceType": "Procedure",
                        "subject": {"reference": patient_url},
                        "encounter": {"reference": encounter_url},
                    },
                    "request": {"method": "POST", "url": "Procedure"},
                },
            ],
        }
    )


def test_urn_uuid_references_of_a_transaction_bundle_resolve_to_the_entries_they_name(tmp_path: Path) -> None:
    out = _extract(tmp_path, "Given1_Family2_b0a5b4b8.json", _synthea_bundle())
    assert out.reject_count == 0
    staged = stage({"fhir_resource": out.records()}, STAGED_TABLES)
    patient = "b0a5b4b8-7bd4-4b4c-9e1f-1d1d5b8f0c11"
    assert staged["encounter"].column("patient_id").to_pylist() == [patient]
    procedure = staged["procedure"].to_pylist()[0]
    # an entry without resource.id is named by its fullUrl's uuid
    assert procedure["procedure_id"] == "0c1d2e3f-4a5b-4c6d-8e9f-a0b1c2d3e4f5"
    assert (procedure["patient_id"], procedure["encounter_id"]) == (
        patient,
        "5f3e2d1c-0b9a-4877-8665-544332211000",
    )


@pytest.mark.parametrize(
    ("reference", "expected"),
    [
        ("Patient/p9", "p9"),
        ("https://fhir.example.org/r4/Patient/p9", "p9"),
        ("https://fhir.example.org/r4/Patient/p9/_history/3", "p9"),
    ],
)
def test_staging_reads_relative_and_absolute_references_alike(
    reference: str, expected: str, tmp_path: Path
) -> None:
    line = orjson.dumps({"resourceType": "Encounter", "id": "e1", "subject": {"reference": reference}})
    out = _extract(tmp_path, "Encounter.009.ndjson", line + b"\n")
    assert stage({"fhir_resource": out.records()}, STAGED_TABLES)["encounter"].column(
        "patient_id"
    ).to_pylist() == [expected]


def test_no_hostile_input_stops_a_load_and_a_rerun_moves_on(
    generated: GenerationResult, tmp_path: Path
) -> None:
    landing = tmp_path / "landing"
    shutil.copytree(generated.out / "landing", landing)
    hostile = landing / "ehr" / "hostile"
    hostile.mkdir()
    for name, content, _, _ in CASES.values():
        (hostile / name).write_bytes(content)
    device = landing / "device" / "hostile" / "0" / "2023" / "01" / "01" / "00"
    device.mkdir(parents=True)
    message = {
        "EnqueuedTimeUtc": "2023-01-01T00:00:00Z",
        "Properties": "x",
        "SystemProperties": {},
        "Body": {},
    }
    (device / "00.json").write_bytes(orjson.dumps(message) + b"\n")
    (device / "01.avro").write_bytes(b"Obj\x01" + b"\x00" * 10)
    (device / "02.json").write_bytes(b'{"Body": ' + b'{"x":' * 600 + b"1" + b"}" * 600 + b"}\n")
    settings = settings_for(tmp_path, landing=landing)

    first = {source: pipeline.ingest(settings, source, "run-1") for source in pipeline.SOURCES}
    assert first["fhir"].records > 0 and first["device"].records > 0
    report = pipeline.build_silver(settings, "run-1")
    assert report.built
    for table in report.tables:
        assert table.balanced, table
    quarantined = pipeline.Lake(settings).read(pipeline.extraction_rejects_table("fhir"))
    assert quarantined is not None
    hostile_rules = {
        (r["source_uri"].rsplit("/", 1)[-1], r["rule"])
        for r in quarantined.to_pylist()
        if "/hostile/" in r["source_uri"]
    }
    for name, _, expected, _ in CASES.values():
        for _, rule in expected:
            assert (name, rule) in hostile_rules
    second = [pipeline.ingest(settings, source, "run-2") for source in pipeline.SOURCES]
    assert {r.source: r.records + r.rejects for r in second if r.source != "registry"} == {
        source: 0 for source in pipeline.FILE_SOURCES
    }


WRONG_TYPES = [
    (
        {"resourceType": "Encounter", "subject": {"reference": 12345}},
        "encounter",
        "subject.reference is a number",
    ),
    (
        {"resourceType": "Encounter", "subject": "Patient/x"},
        "encounter",
        "subject is a string, expected an object",
    ),
    (
        {
            "resourceType": "Observation",
            "subject": {"reference": "Patient/x"},
            "valueQuantity": {"value": "CANARY"},
        },
        "observation",
        "valueQuantity.value is a string, expected a number",
    ),
    (
        {
            "resourceType": "Procedure",
            "subject": {"reference": "Patient/x"},
            "performedPeriod": {"start": 2023},
        },
        "procedure",
        "performedPeriod.start is a number, expected a string",
    ),
    (
        {"resourceType": "Condition", "code": {"coding": {"code": "x"}}},
        "condition",
        "code.coding is an object",
    ),
    (
        {"resourceType": "Patient", "birthDate": ["CANARY"]},
        "patient",
        "birthDate is an array, expected a string",
    ),
]


def test_a_field_of_the_wrong_json_type_is_quarantined_naming_the_field(tmp_path: Path) -> None:
    landing = tmp_path / "landing" / "ehr"
    landing.mkdir(parents=True)
    good = {
        "resourceType": "Observation",
        "subject": {"reference": "Patient/x"},
        "valueQuantity": {"value": 72},
    }
    lines = [orjson.dumps({**resource, "id": f"r{n}"}) for n, (resource, _, _) in enumerate(WRONG_TYPES)]
    by_type: dict[str, list[bytes]] = {}
    for line in [*lines, orjson.dumps({**good, "id": "good"})]:
        by_type.setdefault(orjson.loads(line)["resourceType"], []).append(line)
    for resource_type, typed in by_type.items():
        (landing / f"{resource_type}.000.ndjson").write_bytes(b"\n".join(typed) + b"\n")
    settings = settings_for(tmp_path)
    pipeline.ingest(settings, "fhir", "run-1")
    report = pipeline.build_silver(settings, "run-1")
    quarantine = pipeline.Lake(settings).read(pipeline.QUARANTINE)
    assert quarantine is not None
    found = {r["record_id"]: r for r in quarantine.to_pylist() if r["rule"] == "fhir_field_type"}
    for n, (_, table, detail) in enumerate(WRONG_TYPES):
        assert found[f"r{n}"]["table_name"] == table
        assert detail in found[f"r{n}"]["detail"]
        assert "CANARY" not in found[f"r{n}"]["detail"]
    assert "good" not in found
    assert all(t.balanced for t in report.tables)


def test_two_contents_of_one_id_and_time_are_settled_by_arrival_not_by_file_name() -> None:
    resource = {"resourceType": "Patient", "id": "p1", "meta": {"lastUpdated": "2025-01-01T00:00:00Z"}}
    first, second = Extraction("fhir", "run-1"), Extraction("fhir", "run-2")
    first.started_at, second.started_at = datetime(2025, 1, 2, tzinfo=UTC), datetime(2025, 1, 3, tzinfo=UTC)
    for out, uri, gender in (
        (first, "/l/ehr/z-first.ndjson", "female"),
        (second, "/l/ehr/a-later.ndjson", "male"),
    ):
        raw = orjson.dumps({**resource, "gender": gender})
        out.add_record("Patient", "p1", raw.decode(), uri, 1, raw)
    bronze = pa.concat_tables([second.records(), first.records()])
    patient = stage({"fhir_resource": bronze}, STAGED_TABLES)["patient"]
    kept = [r for r in patient.to_pylist() if r["_first_of_id"] and not r["_superseded"]]
    assert [r["gender"] for r in kept] == ["female"]  # the first to arrive, though its file sorts last


def test_a_bundle_with_a_byte_that_is_not_utf8_loads_every_other_entry(tmp_path: Path) -> None:
    entries = [
        {"resource": {"resourceType": "Patient", "id": name, "note": "\ufffd" if name == "a" else "QQ"}}
        for name in "abc"
    ]
    data = _bundle(entries).replace(b"QQ", b"\xff", 1)  # only entry b is spoilt
    out = _extract(tmp_path, "utf8.json", data)
    assert out.records().column("record_id").to_pylist() == ["a", "c"]  # a real U+FFFD is no fault
    assert [(r["source_offset"], r["rule"]) for r in out.rejects().to_pylist()] == [(2, "utf8_valid")]


def test_a_bundle_that_does_not_parse_is_counted_by_its_entries(tmp_path: Path) -> None:
    entries = [{"resource": {"resourceType": "Patient", "id": str(n)}} for n in range(7)]
    out = _extract(tmp_path, "cut.json", _bundle(entries)[:-30])
    assert [(r["source_offset"], r["rule"]) for r in out.rejects().to_pylist()] == [
        (n, "json_well_formed") for n in range(1, 8)
    ]


def test_the_registry_s_free_text_never_reaches_the_warehouse(
    generated: GenerationResult, tmp_path: Path
) -> None:
    landing = tmp_path / "landing"
    shutil.copytree(generated.out / "landing", landing)
    database = sqlite3.connect(landing / "outcomes" / "registry.sqlite")
    database.execute("UPDATE complication SET description = 'CANARY-NOTE ' || complication_id")
    database.execute("UPDATE readmission SET reason = 'CANARY-REASON ' || readmission_id")
    database.commit()
    database.close()
    settings = settings_for(tmp_path, landing=landing)
    for source in pipeline.SOURCES:
        pipeline.ingest(settings, source, "run-1")
    pipeline.build_silver(settings, "run-1")
    pipeline.build_gold(settings, "run-1")
    lake = pipeline.Lake(settings)
    complications = lake.read(pipeline.silver("complication"))
    assert complications is not None and complications.num_rows > 0
    assert "description" not in complications.column_names
    warehouse = [pq.read_table(p).to_pylist() for p in (tmp_path / "warehouse").rglob("*.parquet")]
    logs = [p.read_text() for p in (tmp_path / "warehouse").rglob("*.json")]
    assert "CANARY" not in repr(warehouse) + "".join(logs)
    bronze = lake.read(pipeline.bronze("registry_row"))
    assert bronze is not None and "CANARY-NOTE" in "".join(
        bronze.column("payload").to_pylist()
    )  # kept, restricted


def test_redcap_rows_balance_in_rows_with_rejected_cells_counted_beside_them(
    generated: GenerationResult, tmp_path: Path
) -> None:
    planted = generated.planted["invalid_choice_code"]
    assert planted > 0
    settings = settings_for(tmp_path, landing=generated.out / "landing")
    for source in pipeline.SOURCES:
        pipeline.ingest(settings, source, "run-1")
    report = pipeline.build_silver(settings, "run-1")
    redcap = {t.table: t for t in report.tables}["redcap_prom"]
    staged_rows = pipeline.Lake(settings).read(pipeline.bronze("redcap_record"))
    assert staged_rows is not None
    # every form read is a bronze record, read into redcap_prom or kept in bronze (forms that are
    # no PROM); a rejected cell leaves its row loading, counted apart, not as a row read
    kept = sum(n for name, n in report.bronze_only.items() if name.startswith("redcap"))
    assert redcap.read + kept == staged_rows.num_rows and redcap.balanced
    assert redcap.cells_rejected == planted
