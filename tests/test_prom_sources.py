"""PROMs from item answers: the REDCap adapter (read through each project's data dictionary), FHIR
QuestionnaireResponses, and their scores in staging (catalog/instruments via patient_journey.prom).

The REDCap adapter is run on every public export in ../shared/data/redcap-exports (copied into a
landing folder under the adapter's naming, ``<project>_records.csv`` + ``_dictionary.csv`` and, for
the longitudinal one, ``_events.csv`` + ``_arms.csv``) and on the generated project. Expected
counts are read from the raw CSV with the csv module, independently of the parser.
"""

from __future__ import annotations

import csv
import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from patient_journey.generate import GenerationResult
from patient_journey.generate.model import Cohort, build_cohort
from patient_journey.generate.proms import REDCAP_DIR
from patient_journey.identity import KeyMaker
from patient_journey.linkage import link
from patient_journey.pipeline import BRONZE_TABLES
from patient_journey.quality import QualityGate
from patient_journey.scoring import load_catalog, score_responses
from patient_journey.sources import fhir, redcap
from patient_journey.sources.plugins import IDENTITY, LINKS, STAGED_TABLES
from patient_journey.sources.records import BRONZE_SCHEMA, Extraction, InputSelection
from patient_journey.sources.redcap_export import (
    RULE_CHOICE_VALID,
    RULE_EVENT_DEFINED,
    parse_arms,
    parse_dictionary,
    parse_events,
    parse_records,
)
from patient_journey.staging import SUPERSEDED, stage
from patient_journey.storage import Storage
from tests.conftest import TEST_KEY
from tests.redcap_rows import raw_rows

EXPECTATIONS = Path(__file__).resolve().parents[1] / "expectations"
# landing project name -> (shared folder, dictionary file)
SHARED_PROJECTS = {
    "simple": ("simple", "dictionary.csv"),
    "simple_api": ("simple", "metadata.csv"),
    "checkboxes": ("checkboxes-1", "dictionary.csv"),
    "repeating": ("repeating-instruments", "dictionary.csv"),
    "longitudinal": ("longitudinal", "dictionary.csv"),
}
PROM_FORMS = {"koos_jr": 7, "hoos_jr": 6}  # generated PROM forms -> item count
QR = "ehr/fhir-export-20250301T000000Z/QuestionnaireResponse.000.ndjson"


# --- helpers ------------------------------------------------------------------------------------


def _field_forms(dictionary: Path) -> dict[str, str]:
    """field -> form, from the dictionary's first two columns (both header variants put them there)."""
    with dictionary.open(newline="", encoding="utf-8-sig") as file:
        return {row[0]: row[1] for row in list(csv.reader(file))[1:]}


def _forms_with_values(records: Path, dictionary: Path, rejects: pa.Table) -> set[tuple[int, str]]:
    """(line, form) of every form instance with a value that was not rejected (NA is no value, as
    R writes a missing one), or saved as unverified or complete (1, 2) with nothing in it."""
    forms = _field_forms(dictionary)
    record_id = next(iter(forms))
    rejected = {
        (r["source_offset"], r["detail"].split(":")[0].removeprefix("column ")) for r in rejects.to_pylist()
    }
    found: set[tuple[int, str]] = set()
    names = set(forms.values())
    for line, row in raw_rows(records.read_text(encoding="utf-8-sig"), skip_blank=True):
        for column, value in row.items():
            if (
                column.endswith("_complete")
                and column.removesuffix("_complete") in names
                and value in ("1", "2")
            ):
                found.add((line, column.removesuffix("_complete")))
                continue
            field = column.split("___")[0] if "___" in column else column
            if column == record_id or field not in forms or (line, column) in rejected:
                continue
            if ("___" in column and value == "1") or ("___" not in column and value not in ("", "NA")):
                found.add((line, forms[field]))
    return found


def _payloads(out: Extraction) -> list[dict[str, Any]]:
    return [
        {**orjson.loads(r["payload"]), "_line": r["source_offset"], "_id": r["record_id"]}
        for r in out.records().to_pylist()
    ]


@pytest.fixture(scope="module")
def shared_landing(tmp_path_factory: pytest.TempPathFactory) -> Path:
    exports = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "redcap-exports"
    if not exports.is_dir():
        pytest.fail(f"The public REDCap exports are missing: expected them at {exports}.")
    landing = tmp_path_factory.mktemp("shared-redcap")
    folder = landing / "redcap"
    folder.mkdir()
    for project, (source, dictionary) in SHARED_PROJECTS.items():
        shutil.copy(exports / source / "data.csv", folder / f"{project}_records.csv")
        shutil.copy(exports / source / dictionary, folder / f"{project}_dictionary.csv")
        if (exports / source / "event.csv").exists():
            shutil.copy(exports / source / "event.csv", folder / f"{project}_events.csv")
            shutil.copy(exports / source / "arm.csv", folder / f"{project}_arms.csv")
    return landing


@pytest.fixture(scope="module")
def shared_extraction(shared_landing: Path) -> Extraction:
    return redcap.extract(Storage(str(shared_landing)), "redcap", InputSelection(), "test-run")


def _cohort(generated: GenerationResult) -> Cohort:
    generation = json.loads((generated.out / "ground_truth" / "generation.json").read_text())
    return build_cohort(generation["patients"], generation["seed"])


def _planted(generated: GenerationResult, source: str) -> list[dict[str, str]]:
    with (generated.out / "ground_truth" / "planted_bad_records.csv").open(newline="") as handle:
        return [row for row in csv.DictReader(handle) if row["source"] == source and "prom" in row["table"]]


@pytest.fixture(scope="module")
def generated_bronze(generated: GenerationResult) -> dict[str, pa.Table]:
    landing = Storage(str(generated.out / "landing"))
    return {
        "redcap_record": redcap.extract(landing, "outcomes/redcap", InputSelection(), "test-run").records(),
        "fhir_resource": fhir.extract(landing, "ehr", InputSelection(), "test-run").records(),
    }


@pytest.fixture(scope="module")
def staged_proms(generated_bronze: dict[str, pa.Table]) -> dict[str, pa.Table]:
    return stage(generated_bronze, STAGED_TABLES)


@pytest.fixture(scope="module")
def gate() -> QualityGate:
    return QualityGate(EXPECTATIONS)


# --- the REDCap adapter on the public exports ----------------------------------------------------


@pytest.mark.shared_data
@pytest.mark.parametrize("project", SHARED_PROJECTS)
def test_every_shared_export_loads_one_record_per_form_with_values(
    shared_landing: Path, shared_extraction: Extraction, project: str
) -> None:
    folder = shared_landing / "redcap"
    entity = f"redcap:{project}"
    mine = [r for r in shared_extraction.records().to_pylist() if r["entity"] == entity]
    rejects = shared_extraction.rejects().filter(pc.equal(shared_extraction.rejects()["entity"], entity))
    assert mine, "every export loads"
    expected = _forms_with_values(
        folder / f"{project}_records.csv", folder / f"{project}_dictionary.csv", rejects
    )
    loaded = {(r["source_offset"], orjson.loads(r["payload"])["form"]) for r in mine}
    assert len(mine) == len(loaded) == len(expected)
    assert loaded == expected
    # Every bronze record keys back to the row it came from, and its values are that row's cells.
    raw = dict(raw_rows((folder / f"{project}_records.csv").read_text(encoding="utf-8-sig"), skip_blank=True))
    id_field = next(iter(_field_forms(folder / f"{project}_dictionary.csv")))
    for r in mine:
        payload = orjson.loads(r["payload"])
        row = raw[r["source_offset"]]
        assert payload["record_id"] == row[id_field]
        assert payload["event"] == (row.get("redcap_event_name") or None)
        assert r["record_id"].split("|")[0] == row[id_field] and r["record_id"].endswith(
            f"|{payload['form']}"
        )
        for name, value in payload["values"].items():
            if isinstance(value, list):
                assert all(row[f"{name}___{code.lower()}"] == "1" for code in value)
            else:
                assert row[name] == value


@pytest.mark.shared_data
def test_invalid_cells_of_shared_exports_become_rejects_naming_column_and_rule(
    shared_landing: Path, shared_extraction: Extraction
) -> None:
    folder = shared_landing / "redcap"
    for project in SHARED_PROJECTS:
        dictionary = parse_dictionary((folder / f"{project}_dictionary.csv").read_bytes())
        events_file = folder / f"{project}_events.csv"
        events = parse_events(events_file.read_bytes()) if events_file.exists() else None
        parsed = parse_records((folder / f"{project}_records.csv").read_bytes(), dictionary, events)
        expected = Counter((r["source_line"], r["rule"], r["field"]) for r in parsed.rejects.to_pylist())
        got = Counter(
            (r["source_offset"], r["rule"], r["detail"].split(":")[0].removeprefix("column "))
            for r in shared_extraction.rejects().to_pylist()
            if r["entity"] == f"redcap:{project}"
        )
        assert got == expected, project
    rejects = shared_extraction.rejects().to_pylist()
    assert {r["rule"] for r in rejects} == {RULE_CHOICE_VALID, "redcap_value_valid"}
    # simple exports Gender as TRUE/FALSE: rejected under its column, the value never written
    sex = [r for r in rejects if r["detail"].startswith("column sex:")]
    assert sex and all(r["rule"] == RULE_CHOICE_VALID for r in sex)
    assert not any("TRUE" in r["detail"] or "FALSE" in r["detail"] for r in rejects)


@pytest.mark.shared_data
def test_shared_export_variants_in_bronze(shared_extraction: Extraction) -> None:
    payloads = _payloads(shared_extraction)
    longitudinal = [p for p in payloads if p["_id"] and p["event"] and p["arm"]]
    assert {(p["arm"], p["arm_name"]) for p in longitudinal} == {(1, "Drug A"), (2, "Drug B")}
    repeats = [p for p in payloads if p["repeat_instrument"] == "bp"]
    assert sorted(p["repeat_instance"] for p in repeats if p["record_id"] == "1") == [1, 2, 3]
    assert all(
        p["form"] == "bp" and p["_id"] == f"{p['record_id']}||bp|{p['repeat_instance']}|bp" for p in repeats
    )
    checks = {p["record_id"]: p["values"] for p in payloads if p["form"] == "form_2"}
    assert checks["1"]["check_one"] == ["1"] and checks["1"]["check_two"] == ["a", "c"]
    assert checks["3"]["check_one"] == ["1", "2", "3", "4"] and "check_two" not in checks["3"]


def test_missing_or_broken_companion_files_are_rejected_with_a_rule(tmp_path: Path) -> None:
    folder = tmp_path / "redcap"
    folder.mkdir()
    header = '"Variable / Field Name","Form Name","Field Type","Choices, Calculations, OR Slider Labels"\n'
    (folder / "a_records.csv").write_text("record_id,x\n1,2\n")
    (folder / "b_records.csv").write_text("record_id,x\n1,2\n")
    (folder / "b_dictionary.csv").write_text("not,a,dictionary\n1,2,3\n")
    (folder / "c_records.csv").write_text("record_id,redcap_event_name,x\n1,e_arm_1,1\n2,other_arm_1,9\n")
    (folder / "c_dictionary.csv").write_text(header + 'record_id,f,text,\nx,f,radio,"1, One | 2, Two"\n')
    (folder / "c_events.csv").write_text("event_name,arm_num,unique_event_name\nE,1,e_arm_1\n")
    out = redcap.extract(Storage(str(tmp_path)), "redcap", InputSelection(), "t")
    rules = {(r["entity"], r["source_offset"], r["rule"]) for r in out.rejects().to_pylist()}
    assert rules == {
        ("redcap:a", 0, redcap.RULE_DICTIONARY_PRESENT),
        ("redcap:b", 0, redcap.RULE_DICTIONARY_VALID),
        ("redcap:c", 3, RULE_EVENT_DEFINED),
    }
    assert [orjson.loads(p)["values"] for p in out.records().column("payload").to_pylist()] == [{"x": "1"}]
    assert out.ledger().num_rows == 3


# --- the generated REDCap project ----------------------------------------------------------------


def test_generated_project_has_every_variant(generated: GenerationResult) -> None:
    folder = generated.out / "landing" / REDCAP_DIR
    dictionary = parse_dictionary((folder / "prom_dictionary.csv").read_bytes())
    events = parse_events((folder / "prom_events.csv").read_bytes())
    assert parse_arms((folder / "prom_arms.csv").read_bytes()) == {
        1: "Knee arthroplasty",
        2: "Hip arthroplasty",
    }
    assert {e.unique_event_name for e in events} == {
        f"{event}_arm_{arm}" for event in ("baseline", "week_6", "month_6", "month_12") for arm in (1, 2)
    }
    assert {f.name: f.identifier for f in dictionary.fields if f.identifier} == {"mrn": True, "dob": True}
    catalog = load_catalog()
    for form, count in PROM_FORMS.items():
        items = [f for f in dictionary.fields if f.form == form and f.field_type == "radio"]
        assert [f.name for f in items] == [i.id for i in catalog.instrument(form).items][:count]
        assert all(list(f.choices) == ["0", "1", "2", "3", "4"] for f in items)
    parsed = parse_records((folder / "prom_records.csv").read_bytes(), dictionary, events)
    values, completion = parsed.values.to_pylist(), parsed.completion.to_pylist()

    assert {v["arm"] for v in values} == {1, 2}
    assert {v["form"] for v in values if v["arm"] == 1} & set(PROM_FORMS) == {"koos_jr"}
    repeats = [v for v in values if v["repeat_instrument"] == "adverse_event"]
    assert repeats and all(v["event"].startswith("week_6_arm_") for v in repeats)
    assert any("\n" in v["value"] for v in repeats if v["field"] == "ae_description")  # notes over lines
    assert any(v["checkbox_code"] for v in values if v["field"] == "comorbid")
    proms = [c for c in completion if c["form"] in PROM_FORMS]
    assert any(c["state"] == "not_started" and c["filled_count"] == 0 for c in proms)  # blank forms
    partial = [c for c in proms if c["state"] == "incomplete"]
    assert partial and all(0 < c["filled_count"] <= PROM_FORMS[c["form"]] for c in partial)
    assert {c["state"] for c in proms} == {"complete", "incomplete", "not_started"}

    # The only rejects are the planted invalid choice codes, on the lines the ground truth names.
    planted = _planted(generated, "redcap")
    assert planted and all(p["kind"] == "invalid_choice_code" for p in planted)
    assert sorted((r["source_line"], r["field"], r["rule"]) for r in parsed.rejects.to_pylist()) == sorted(
        (int(p["locator"]), p["field"], RULE_CHOICE_VALID) for p in planted
    )


def test_generated_project_bronze_grain(
    generated: GenerationResult, generated_bronze: dict[str, pa.Table]
) -> None:
    folder = generated.out / "landing" / REDCAP_DIR
    bronze = generated_bronze["redcap_record"]
    planted = _planted(generated, "redcap")
    rejects = pa.table(
        {
            "source_offset": [int(p["locator"]) for p in planted],
            "detail": [f"column {p['field']}: planted" for p in planted],
        }
    )
    expected = _forms_with_values(folder / "prom_records.csv", folder / "prom_dictionary.csv", rejects)
    keys = [(r["source_offset"], orjson.loads(r["payload"])["form"]) for r in bronze.to_pylist()]
    assert len(keys) == len(set(keys)) == len(expected) and set(keys) == expected
    assert len(set(bronze.column("record_id").to_pylist())) == bronze.num_rows
    assert set(bronze.column("entity").to_pylist()) == {"redcap:prom"}


# --- scores through staging ----------------------------------------------------------------------


def test_generator_scores_are_the_catalog_scores_of_its_items(generated: GenerationResult) -> None:
    cohort = _cohort(generated)
    proms = [(j, p) for j in cohort.journeys for p in j.proms]
    assert {j.prom_source for j, _ in proms} == {"registry", "redcap", "fhir"}
    item_ids = sorted({item for _, p in proms for item in p.items})
    wide = pa.table(
        {
            "response_id": [str(n) for n in range(len(proms))],
            "instrument": [j.instrument_id for j, _ in proms],
            **{item: [p.items.get(item) for _, p in proms] for item in item_ids},
        }
    )
    scores = score_responses(wide)
    assert scores.column("score").to_pylist() == [p.score for _, p in proms]
    unscored = [(j.prom_source, p) for j, p in proms if p.score is None]
    assert unscored and {source for source, _ in unscored} <= {"redcap", "fhir"}  # partly answered
    assert all(len(p.items) < PROM_FORMS[j.instrument_id] for j, p in proms if p.score is None)
    mean = {
        tp: [p.score for _, p in proms if p.timepoint == tp and p.score is not None]
        for tp in ("baseline", "12m")
    }
    assert sum(mean["12m"]) / len(mean["12m"]) > sum(mean["baseline"]) / len(mean["baseline"]) + 10


def test_redcap_forms_score_as_the_generator_drew_them(
    generated: GenerationResult, staged_proms: dict[str, pa.Table]
) -> None:
    cohort = _cohort(generated)
    expected = {
        (j.mrn, p.timepoint): (j.instrument_id, p.score, p.collected_on)
        for j in cohort.journeys
        if j.prom_source == "redcap"
        for p in j.proms
    }
    rows = staged_proms["redcap_prom"].to_pylist()
    got = {(r["mrn"], r["timepoint"]): (r["instrument"], r["score"], r["collected_on"]) for r in rows}
    assert len(got) == len(rows)  # one row per questionnaire; blank forms and other forms are not PROMs
    assert got == expected
    assert {r["scoring_status"] for r in rows} == {"scored", "incomplete"}
    assert all((r["score"] is None) == (r["scoring_status"] == "incomplete") for r in rows)
    assert all(r["score_name"] == "interval" for r in rows)


def test_questionnaire_responses_score_as_drawn_and_planted_ones_are_out_of_range(
    generated: GenerationResult, staged_proms: dict[str, pa.Table]
) -> None:
    cohort = _cohort(generated)
    expected = {
        (j.patient_id, p.collected_on): (j.instrument_id, p.score)
        for j in cohort.journeys
        if j.prom_source == "fhir"
        for p in j.proms
    }
    rows = staged_proms["fhir_prom"].to_pylist()
    good = [r for r in rows if r["scoring_status"] != "out_of_range"]
    assert {(r["patient_id"], r["collected_on"]): (r["instrument"], r["score"]) for r in good} == expected
    assert all(r["timepoint"] is None for r in rows)
    planted = _planted(generated, "fhir")
    assert planted and all(p["path"] == QR for p in planted)
    bad = [r for r in rows if r["scoring_status"] == "out_of_range"]
    assert sorted(r["source_offset"] for r in bad) == sorted(int(p["locator"]) for p in planted)
    assert all(r["score"] is None and r["source_uri"].endswith(QR) for r in bad)


def test_suites_quarantine_out_of_range_items_and_load_incomplete_responses(
    generated: GenerationResult, staged_proms: dict[str, pa.Table], gate: QualityGate
) -> None:
    qr = gate.check("staged", "fhir_prom", staged_proms["fhir_prom"], "fhir", "test-run")
    quarantined = qr.quarantined.to_pylist()
    assert sorted(r["source_offset"] for r in quarantined) == sorted(
        int(p["locator"]) for p in _planted(generated, "fhir")
    )
    assert all(r["rule"] == "item_in_range" and r["table_name"] == "fhir_prom" for r in quarantined)
    assert None in qr.passed.column("score").to_pylist()  # incomplete: loaded, no score
    forms = gate.check("staged", "redcap_prom", staged_proms["redcap_prom"], "redcap", "test-run")
    assert forms.quarantined.num_rows == 0
    assert forms.passed.num_rows == staged_proms["redcap_prom"].num_rows
    warned = {o.rule: o.unexpected_count for o in forms.outcomes if not o.success}
    assert warned == {
        "items_complete": sum(1 for s in forms.passed["scoring_status"].to_pylist() if s != "scored")
    }


def _qr(
    questionnaire: str | None, items: list[dict[str, Any]], rid: str, authored: str | None = "2024-02-03"
) -> bytes:
    resource: dict[str, Any] = {
        "resourceType": "QuestionnaireResponse",
        "id": rid,
        "status": "completed",
        "subject": {"reference": "Patient/p1"},
        "item": items,
    }
    if questionnaire is not None:
        resource["questionnaire"] = questionnaire
    if authored is not None:
        resource["authored"] = authored
    return orjson.dumps(resource)


def _answer(link: str, answer: dict[str, Any] | None) -> dict[str, Any]:
    return {"linkId": link, **({"answer": [answer]} if answer is not None else {})}


def test_questionnaire_response_mapping(tmp_path: Path, gate: QualityGate) -> None:
    base = "http://patient-journey.example.org/fhir/Questionnaire/"
    koos = [_answer(f"koos_jr_{n}", {"valueInteger": 0}) for n in range(1, 8)]
    coded = [_answer(f"hoos_jr_{n}", {"valueCoding": {"code": "4"}}) for n in range(1, 7)]
    lines = [
        _qr(base + "koos_jr", koos, "all-best"),
        _qr(
            base + "hoos_jr|1.0",
            [{"linkId": "group", "item": coded}],
            "coded-in-group",
            "2024-02-03T23:30:00-05:00",
        ),
        _qr(base + "koos_jr", [*koos[:6], _answer("koos_jr_7", None)], "unanswered"),
        _qr(base + "koos_jr", [*koos[:6], _answer("koos_jr_7", {"valueDecimal": 2.5})], "decimal"),
        _qr(base + "koos_jr", [*koos[:6], _answer("koos_jr_7", {"valueInteger": 5})], "five"),
        _qr("http://example.org/Questionnaire/eq-5d-5l", koos, "unknown"),
        _qr(None, koos, "no-questionnaire"),
        _qr(base + "koos_jr", koos, "no-date", authored=None),
    ]
    path = tmp_path / "ehr" / "QuestionnaireResponse.000.ndjson"
    path.parent.mkdir()
    path.write_bytes(b"\n".join(lines) + b"\n")
    bronze = fhir.extract(Storage(str(tmp_path)), "ehr", InputSelection(), "t").records()
    staged = stage({"fhir_resource": bronze}, STAGED_TABLES)["fhir_prom"]
    rows = {r["questionnaire_response_id"]: r for r in staged.to_pylist()}
    status = {rid: (r["instrument"], r["scoring_status"], r["score"]) for rid, r in rows.items()}
    assert status == {
        "all-best": ("koos_jr", "scored", 100.0),
        "coded-in-group": ("hoos_jr", "scored", 0.0),
        "unanswered": ("koos_jr", "incomplete", None),
        "decimal": ("koos_jr", "out_of_range", None),
        "five": ("koos_jr", "out_of_range", None),
        "unknown": ("eq-5d-5l", "unknown_instrument", None),
        "no-questionnaire": (None, "unknown_instrument", None),
        "no-date": ("koos_jr", "scored", 100.0),
    }
    assert str(rows["coded-in-group"]["collected_on"]) == "2024-02-03"  # the date as authored
    assert rows["all-best"]["patient_id"] == "p1" and rows["all-best"]["items_answered"] == 7
    result = gate.check("staged", "fhir_prom", staged, "fhir", "t")
    rules = {r["record_id"]: r["rule"] for r in result.quarantined.to_pylist()}
    assert rules == {
        "decimal": "item_in_range",
        "five": "item_in_range",
        "unknown": "instrument_known",
        "no-questionnaire": "instrument_known",
        "no-date": "authored_present",
    }


def test_prom_tables_link_to_silver_prom_score(
    generated_bronze: dict[str, pa.Table], staged_proms: dict[str, pa.Table]
) -> None:
    bronze = {name: BRONZE_SCHEMA.empty_table() for name in BRONZE_TABLES.values()} | {
        "fhir_resource": generated_bronze["fhir_resource"],
        "redcap_record": generated_bronze["redcap_record"],
    }
    staged = {  # current records only, as the pipeline passes them on
        name: table.filter(pc.invert(table[SUPERSEDED])).drop_columns([SUPERSEDED])
        for name, table in stage(bronze, STAGED_TABLES).items()
    }
    linked = link(staged, KeyMaker(TEST_KEY.encode()), "test-run", LINKS, IDENTITY)
    silver = linked.silver["prom_score"]
    for column in ("patient_key", "instrument", "timepoint", "score", "collected_on", "prom_source"):
        assert column in silver.column_names
    counts = Counter(silver.column("prom_source").to_pylist())
    assert counts == {
        "redcap": staged_proms["redcap_prom"].num_rows,
        "fhir": staged_proms["fhir_prom"].num_rows,
    }
    assert None not in silver.column("patient_key").to_pylist()
    assert set(silver.column("instrument").to_pylist()) == {"koos_jr", "hoos_jr"}
