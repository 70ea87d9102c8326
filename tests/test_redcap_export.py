"""REDCap exports through the data dictionary: the public REDCapR test exports and small hand-made ones.

The public exports in ../shared/data/redcap-exports pair up as follows (``PAIRS``):

- simple/dictionary.csv + simple/data.csv: classic project, REDCap's download headers; quoted
  values over several lines (addresses, notes); one checkbox (race___1..6); Gender exported as
  TRUE/FALSE instead of its codes 0/1, and heights/weights below the dictionary's minimum.
- simple/metadata.csv + simple/data.csv: the same project's dictionary as the API returns it
  (snake_case headers, written by R: missing cells are ``NA``; ``age`` is a calc field there).
- checkboxes-1/dictionary.csv + data.csv: two checkbox fields, one with letter codes; a form whose
  only field is the record id; a record with nothing filled.
- repeating-instruments/dictionary.csv + data.csv: a repeating instrument (bp, instances 1-3).
- longitudinal/dictionary.csv + data.csv, with event.csv (events, arm of each) and arm.csv (arm
  names): two arms, twelve events, forms filled in some events only, a slider, calc fields.

Expected counts come from reading the raw CSV with the csv module, independently of the parser.
"""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import orjson
import pytest

from patient_journey.errors import SourceError
from patient_journey.sources import redcap
from patient_journey.sources.records import Extraction
from patient_journey.sources.redcap_export import (
    COMPLETION_SCHEMA,
    REJECTS_SCHEMA,
    RULE_CHOICE_VALID,
    RULE_EVENT_DEFINED,
    RULE_FIELD_IN_DICTIONARY,
    RULE_ROW_WELL_FORMED,
    RULE_VALUE_VALID,
    VALUES_SCHEMA,
    DataDictionary,
    RedcapRecords,
    checkbox_column_code,
    parse_arms,
    parse_dictionary,
    parse_events,
    parse_records,
)
from tests.redcap_rows import raw_rows

REDCAP_EXPORTS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "redcap-exports"

# (folder, dictionary file, records file): every dictionary + records pair in the shared folder.
PAIRS = [
    ("simple", "dictionary.csv", "data.csv"),
    ("simple", "metadata.csv", "data.csv"),
    ("checkboxes-1", "dictionary.csv", "data.csv"),
    ("repeating-instruments", "dictionary.csv", "data.csv"),
    ("longitudinal", "dictionary.csv", "data.csv"),
]
MAPPING_FILES = {("longitudinal", "event.csv"), ("longitudinal", "arm.csv")}
VALUE_RULES = {RULE_CHOICE_VALID, RULE_VALUE_VALID}


@pytest.fixture(scope="module")
def exports() -> Path:
    if not REDCAP_EXPORTS.is_dir():
        pytest.fail(
            f"The public REDCap exports are missing: expected them at {REDCAP_EXPORTS} "
            "(../shared/data/redcap-exports beside the repository)."
        )
    return REDCAP_EXPORTS


def _parse(
    exports: Path, folder: str, dictionary: str = "dictionary.csv"
) -> tuple[DataDictionary, RedcapRecords]:
    parsed = parse_dictionary((exports / folder / dictionary).read_bytes())
    events_file = exports / folder / "event.csv"
    events = parse_events(events_file.read_bytes()) if events_file.exists() else None
    return parsed, parse_records((exports / folder / "data.csv").read_bytes(), parsed, events)


# --- an independent reading of the raw files --------------------------------------------------------


def _raw_forms(path: Path) -> dict[str, str]:
    """field -> form, from the dictionary's first two columns (both header variants put them there)."""
    with path.open(newline="", encoding="utf-8-sig") as file:
        rows = list(csv.reader(file))
    return {row[0]: row[1] for row in rows[1:]}


def _form_of_column(column: str, forms: dict[str, str]) -> str | None:
    if column.startswith("redcap_"):
        return None
    if column.endswith("_complete") and column[: -len("_complete")] in forms.values():
        return None
    return forms.get(column.split("___")[0])


def _expected(exports: Path, folder: str, dictionary: str) -> tuple[int, set[tuple[int, str]]]:
    """Non-blank value cells (checked boxes only, record id left out) and (line, form) statuses."""
    forms = _raw_forms(exports / folder / dictionary)
    record_id = next(iter(forms))
    cells = 0
    statuses: set[tuple[int, str]] = set()
    for line, row in raw_rows((exports / folder / "data.csv").read_text(encoding="utf-8-sig")):
        for column, value in row.items():
            if column.endswith("_complete") and value != "":
                statuses.add((line, column[: -len("_complete")]))
            form = _form_of_column(column, forms)
            if column == record_id or form is None:
                continue
            if ("___" in column and value == "1") or ("___" not in column and value != ""):
                cells += 1
                statuses.add((line, form))
    return cells, statuses


# --- the shared exports -------------------------------------------------------------------------------


@pytest.mark.shared_data
def test_every_shared_file_is_a_known_pair_or_mapping(exports: Path) -> None:
    found = {(path.parent.name, path.name) for path in exports.glob("*/*.csv")}
    known = {(folder, name) for folder, dictionary, records in PAIRS for name in (dictionary, records)}
    assert found == known | MAPPING_FILES, "a file was added or removed: map it in PAIRS or MAPPING_FILES"


@pytest.mark.shared_data
@pytest.mark.parametrize(("folder", "dictionary", "records"), PAIRS)
def test_shared_export_reconciles_with_the_raw_csv(
    exports: Path, folder: str, dictionary: str, records: str
) -> None:
    _, parsed = _parse(exports, folder, dictionary)
    assert parsed.values.schema == VALUES_SCHEMA
    assert parsed.completion.schema == COMPLETION_SCHEMA
    assert parsed.rejects.schema == REJECTS_SCHEMA
    raw = raw_rows((exports / folder / records).read_text(encoding="utf-8-sig"))
    cells, statuses = _expected(exports, folder, dictionary)

    value_rejects = [r for r in parsed.rejects.to_pylist() if r["rule"] in VALUE_RULES]
    assert not [r for r in parsed.rejects.to_pylist() if r["rule"] not in VALUE_RULES]
    assert parsed.rows_read == len(raw)
    assert parsed.values.num_rows + len(value_rejects) == cells
    assert {(r["source_line"], r["form"]) for r in parsed.completion.to_pylist()} == statuses
    assert parsed.completion.num_rows == len(statuses)

    # Every value is the raw cell of its row (line) and column; checked boxes point at a "1".
    by_line = dict(raw)
    for value in parsed.values.to_pylist():
        row = by_line[value["source_line"]]
        assert row[next(iter(row))] == value["record_id"]
        if value["checkbox_code"] is None:
            assert row[value["field"]] == value["value"]
        else:
            assert row[f"{value['field']}___{checkbox_column_code(value['checkbox_code'])}"] == "1"


@pytest.mark.shared_data
def test_simple_rejects_the_exported_booleans_and_the_out_of_range_measures(exports: Path) -> None:
    _, parsed = _parse(exports, "simple")
    rejects = Counter((r["field"], r["rule"]) for r in parsed.rejects.to_pylist())
    raw = raw_rows((exports / "simple" / "data.csv").read_text(encoding="utf-8-sig"))
    below_height = sum(1 for _, row in raw if float(row["height"]) < 130)
    below_weight = sum(1 for _, row in raw if float(row["weight"]) < 35)
    assert rejects == {
        ("sex", RULE_CHOICE_VALID): sum(1 for _, row in raw if row["sex"] not in ("0", "1")),
        ("height", RULE_VALUE_VALID): below_height,
        ("weight", RULE_VALUE_VALID): below_weight,
    }
    assert rejects[("sex", RULE_CHOICE_VALID)] == 5 and below_height == below_weight == 2
    for reject in parsed.rejects.to_pylist():  # the values themselves are never in a reject
        assert "TRUE" not in reject["detail"] and "FALSE" not in reject["detail"]
    # Quoted addresses span two lines and one note four: rows start on lines 2, 4, 6, 8, 13.
    assert sorted(set(parsed.values.column("source_line").to_pylist())) == [2, 4, 6, 8, 13]
    # The good values of a row with a rejected one still load.
    record_1 = {v["field"] for v in parsed.values.to_pylist() if v["record_id"] == "1"}
    assert {"name_first", "dob", "bmi", "ethnicity"} <= record_1
    assert not record_1 & {"sex", "height", "weight"}


@pytest.mark.shared_data
def test_simple_checkboxes_and_choice_labels(exports: Path) -> None:
    _, parsed = _parse(exports, "simple")
    race: dict[str, set[str]] = {}
    for value in parsed.values.to_pylist():
        if value["field"] == "race":
            race.setdefault(value["record_id"], set()).add(value["checkbox_code"])
            assert value["value"] == value["checkbox_code"]
    assert race == {"1": {"5"}, "2": {"3", "5"}, "3": {"4", "5"}, "4": {"2", "5"}, "5": {"1", "6"}}
    labels = {
        (v["record_id"], v["field"], v["value"]): v["value_label"]
        for v in parsed.values.to_pylist()
        if v["field"] in ("race", "ethnicity")
    }
    assert labels[("5", "race", "6")] == "Unknown / Not Reported"
    assert labels[("5", "ethnicity", "2")] == "Hispanic or Latino"
    assert labels[("1", "ethnicity", "1")] == "NOT Hispanic or Latino"


@pytest.mark.shared_data
def test_both_dictionary_headers_give_the_same_fields(exports: Path) -> None:
    download = parse_dictionary((exports / "simple" / "dictionary.csv").read_bytes())
    api = parse_dictionary((exports / "simple" / "metadata.csv").read_bytes())
    assert [f.name for f in download.fields] == [f.name for f in api.fields]
    different = [f.name for f, g in zip(download.fields, api.fields, strict=True) if f != g]
    assert different == ["age"]  # text in the download, calc in the API export
    assert api.field_named("age").calculation == "rounddown(datediff([dob],'today','y'))"
    assert api.field_named("sex").choices == {"0": "Female", "1": "Male"}
    height = api.field_named("height")
    assert (height.validation, height.minimum, height.maximum) == ("number", "130", "215")
    # R wrote missing cells as NA: they read as missing, not as a validation type or a choice.
    assert api.field_named("record_id").validation is None and api.field_named("comments").choices == {}
    assert api.field_named("dob").identifier and not api.field_named("age").identifier


@pytest.mark.shared_data
def test_checkboxes_expand_to_the_checked_codes_only(exports: Path) -> None:
    _, parsed = _parse(exports, "checkboxes-1")
    checked: dict[tuple[str, str], set[str]] = {}
    for value in parsed.values.to_pylist():
        if value["checkbox_code"] is not None:
            checked.setdefault((value["record_id"], value["field"]), set()).add(value["value"])
    assert checked == {
        ("1", "check_one"): {"1"},
        ("1", "check_two"): {"a", "c"},
        ("2", "check_two"): {"b", "d"},
        ("3", "check_one"): {"1", "2", "3", "4"},
    }
    labels = {v["value_label"] for v in parsed.values.to_pylist() if v["field"] == "check_two"}
    assert labels == {"A", "B", "C", "D"}


@pytest.mark.shared_data
def test_a_blank_form_is_not_started_and_a_partly_filled_one_incomplete(exports: Path) -> None:
    _, parsed = _parse(exports, "checkboxes-1")
    status = {
        (c["record_id"], c["form"]): (c["status"], c["state"], c["filled_count"])
        for c in parsed.completion.to_pylist()
    }
    assert status[("4", "form_2")] == (0, "not_started", 0)
    assert status[("2", "form_2")] == (0, "incomplete", 3)  # two checked boxes and the note
    assert status[("1", "form_2")] == (2, "complete", 4)
    # form_1 holds only the record id, which is a key, not a value: never started.
    assert {status[(record, "form_1")] for record in "1234"} == {(0, "not_started", 0)}
    assert "4" not in parsed.values.column("record_id").to_pylist()


@pytest.mark.shared_data
def test_repeating_instrument_instances(exports: Path) -> None:
    _, parsed = _parse(exports, "repeating-instruments")
    raw = raw_rows((exports / "repeating-instruments" / "data.csv").read_text())
    expected = {
        (row["record_id"], int(row["redcap_repeat_instance"]), row["bp_systolic"])
        for _, row in raw
        if row["redcap_repeat_instrument"] == "bp"
    }
    systolic = {
        (v["record_id"], v["repeat_instance"], v["value"])
        for v in parsed.values.to_pylist()
        if v["field"] == "bp_systolic"
    }
    assert systolic == expected == {("1", 1, "110"), ("1", 2, "111"), ("1", 3, "112"), ("2", 1, "114")}
    for value in parsed.values.to_pylist():
        repeating = value["form"] == "bp"
        assert (value["repeat_instrument"] == "bp") == repeating
        assert (value["repeat_instance"] is not None) == repeating
    bp_forms = [c for c in parsed.completion.to_pylist() if c["form"] == "bp"]
    assert sorted((c["record_id"], c["repeat_instance"]) for c in bp_forms) == [
        ("1", 1),
        ("1", 2),
        ("1", 3),
        ("2", 1),
    ]


@pytest.mark.shared_data
def test_longitudinal_events_and_arms(exports: Path) -> None:
    dictionary, parsed = _parse(exports, "longitudinal")
    events = parse_events((exports / "longitudinal" / "event.csv").read_bytes())
    assert parse_arms((exports / "longitudinal" / "arm.csv").read_bytes()) == {1: "Drug A", 2: "Drug B"}
    assert len(events) == 12 and {e.arm for e in events} == {1, 2}
    arm_of_event = {e.unique_event_name: e.arm for e in events}

    raw = raw_rows((exports / "longitudinal" / "data.csv").read_text())
    rows_per_record = Counter((row["study_id"], row["redcap_event_name"]) for _, row in raw)
    assert {e for _, e in rows_per_record} <= set(arm_of_event)
    assert {(r, arm_of_event[e]) for r, e in rows_per_record} == {("100", 1), ("220", 1), ("304", 2)}

    keys = {(c["record_id"], c["event"], c["arm"]) for c in parsed.completion.to_pylist()}
    assert keys == {(r, e, arm_of_event[e]) for r, e in rows_per_record}
    for value in parsed.values.to_pylist():
        assert value["arm"] == arm_of_event[value["event"]]
    # Without the events file the arm comes from the _arm_N suffix: the same answer.
    by_suffix = parse_records((exports / "longitudinal" / "data.csv").read_bytes(), dictionary)
    assert by_suffix.values.column("arm").to_pylist() == parsed.values.column("arm").to_pylist()

    # Forms live in some events only: baseline data at enrolment, the questionnaire at every dose.
    forms_by_event = {(v["event"], v["form"]) for v in parsed.values.to_pylist() if v["record_id"] == "100"}
    assert ("enrollment_arm_1", "baseline_data") in forms_by_event
    assert ("dose_1_arm_1", "patient_morale_questionnaire") in forms_by_event
    assert not any(
        event == "dose_1_arm_1" and form != "patient_morale_questionnaire" for event, form in forms_by_event
    )
    # Checkboxes with codes 0-4 (weekdays), a slider kept as exported, calc fields kept.
    gym = {
        (v["record_id"], v["value"], v["value_label"])
        for v in parsed.values.to_pylist()
        if v["field"] == "gym"
    }
    assert gym == {
        ("100", "0", "Monday"),
        ("220", "0", "Monday"),
        ("220", "1", "Tuesday"),
        ("304", "0", "Monday"),
        ("304", "1", "Tuesday"),
    }
    mood = {v["record_id"]: v["value"] for v in parsed.values.to_pylist() if v["field"] == "specify_mood"}
    assert mood == {"100": "71", "220": "29", "304": "83"}
    # A form marked complete (or unverified) with nothing in it: status and filled count both kept.
    opt_out = [c for c in parsed.completion.to_pylist() if c["event"] == "deadline_to_opt_ou_arm_2"]
    assert [(c["form"], c["status"], c["state"], c["filled_count"]) for c in opt_out] == [
        ("contact_info", 1, "unverified", 0)
    ]


@pytest.mark.shared_data
def test_longitudinal_dictionary_fields(exports: Path) -> None:
    dictionary = parse_dictionary((exports / "longitudinal" / "dictionary.csv").read_bytes())
    assert dictionary.record_id_field == "study_id"
    assert dictionary.forms[:3] == ("demographics", "contact_info", "baseline_data")
    weight = dictionary.field_named("weight")
    assert (weight.form, weight.field_type, weight.validation, weight.minimum, weight.maximum) == (
        "demographics",
        "text",
        "integer",
        "35",
        "200",
    )
    assert dictionary.field_named("first_name").identifier and not dictionary.field_named("age").identifier
    assert dictionary.field_named("race").choices["4"] == "White"
    assert dictionary.field_named("given_birth").choices == {"1": "Yes", "0": "No"}  # yesno
    mood = dictionary.field_named("specify_mood")
    assert (mood.field_type, mood.choices, mood.validation) == ("slider", {}, None)  # labels, not codes
    assert dictionary.field_named("bmi").calculation == "round(([weight]*10000)/(([height])^(2)),1)"
    assert dictionary.field_named("gym").checkbox_columns == {f"gym___{d}": str(d) for d in range(5)}


# --- hand-made exports: each rule ---------------------------------------------------------------------

DICTIONARY = """\
"Variable / Field Name","Form Name","Section Header","Field Type","Field Label","Choices, Calculations, OR Slider Labels","Field Note","Text Validation Type OR Show Slider Number","Text Validation Min","Text Validation Max",Identifier?
study_id,enrolment,,text,Study ID,,,,,,
sex,enrolment,,radio,Sex,"0, Female | 1, Male",,,,,
age,enrolment,,text,Age,,,integer,18,110,
surgery_date,enrolment,,text,Surgery date,,,date_ymd,2000-01-01,,
email,enrolment,,text,E-mail,,,email,,,y
side,enrolment,,checkbox,Side,"L, Left | R, Right | -1, Unknown",,,,,
intro,followup,,descriptive,Please answer,,,,,,
pain,followup,,slider,Pain,None | Worst,,,,,
koos,followup,,text,KOOS JR,,,number,0,100,
"""
HEADER = "study_id,sex,age,surgery_date,email,side___l,side___r,side____1,enrolment_complete,pain,koos,followup_complete"


def _records(*rows: str, header: str = HEADER, events: str | None = None) -> RedcapRecords:
    parsed_events = parse_events(events) if events is not None else None
    return parse_records("\n".join([header, *rows]) + "\n", parse_dictionary(DICTIONARY), parsed_events)


def _rejects(parsed: RedcapRecords) -> list[tuple[int, str | None, str]]:
    return [(r["source_line"], r["field"], r["rule"]) for r in parsed.rejects.to_pylist()]


def test_a_bad_choice_is_rejected_and_the_values_around_it_load() -> None:
    parsed = _records(
        "P1,0,54,2024-03-01,a@b.org,1,0,0,2,40,55.5,2",
        "P2,7,61,2024-03-02,c@d.org,0,1,0,2,,,0",
    )
    assert _rejects(parsed) == [(3, "sex", RULE_CHOICE_VALID)]
    p2 = {(v["field"], v["value"]) for v in parsed.values.to_pylist() if v["record_id"] == "P2"}
    assert p2 == {("age", "61"), ("surgery_date", "2024-03-02"), ("email", "c@d.org"), ("side", "R")}
    p1_sex = [v for v in parsed.values.to_pylist() if v["record_id"] == "P1" and v["field"] == "sex"]
    assert [(v["value"], v["value_label"]) for v in p1_sex] == [("0", "Female")]
    status = {(c["record_id"], c["form"]): c["state"] for c in parsed.completion.to_pylist()}
    assert status == {
        ("P1", "enrolment"): "complete",
        ("P1", "followup"): "complete",
        ("P2", "enrolment"): "complete",
        ("P2", "followup"): "not_started",
    }


def test_values_failing_their_validation_or_range_are_rejected_without_their_value() -> None:
    parsed = _records(
        "P1,0,54,2024-03-01,a@b.org,1,0,0,2,40,55.5,2",
        "P3,1,12a,2024-02-30,not-an-email,2,0,1,1,150,101,5",
        "P4,1,17,1999-12-31,e@f.org,0,0,0,1,0,100,1",
    )
    assert _rejects(parsed) == [
        (3, "age", RULE_VALUE_VALID),
        (3, "email", RULE_VALUE_VALID),
        (3, "followup_complete", RULE_VALUE_VALID),
        (3, "koos", RULE_VALUE_VALID),
        (3, "pain", RULE_VALUE_VALID),
        (3, "side___l", RULE_VALUE_VALID),
        (3, "surgery_date", RULE_VALUE_VALID),
        (4, "age", RULE_VALUE_VALID),  # below 18
        (4, "surgery_date", RULE_VALUE_VALID),  # before 2000-01-01
    ]
    details = " ".join(parsed.rejects.column("detail").to_pylist())
    for value in ("12a", "2024-02-30", "not-an-email", "150", "101", "1999-12-31"):
        assert value not in details
    p3 = {
        (v["field"], v["value"], v["checkbox_code"])
        for v in parsed.values.to_pylist()
        if v["record_id"] == "P3"
    }
    assert p3 == {("sex", "1", None), ("side", "-1", "-1")}  # side____1 is code -1
    p4 = {(v["field"], v["value"]) for v in parsed.values.to_pylist() if v["record_id"] == "P4"}
    assert p4 == {("sex", "1"), ("email", "e@f.org"), ("pain", "0"), ("koos", "100")}
    p3_followup = [
        c for c in parsed.completion.to_pylist() if c["record_id"] == "P3" and c["form"] == "followup"
    ]
    assert [(c["status"], c["state"], c["filled_count"]) for c in p3_followup] == [(None, "no_status", 2)]


def test_a_column_outside_the_dictionary_is_rejected_once_and_the_rest_loads() -> None:
    parsed = _records("P1,0,54,,,0,0,0,2,,,,secret", header=HEADER + ",mystery")
    assert _rejects(parsed) == [(1, "mystery", RULE_FIELD_IN_DICTIONARY)]
    assert {v["field"] for v in parsed.values.to_pylist()} == {"sex", "age"}
    # A descriptive field has no data column: exporting one is also outside the dictionary.
    descriptive = _records("P1,0,54,,,0,0,0,2,,,,x", header=HEADER + ",intro")
    assert _rejects(descriptive) == [(1, "intro", RULE_FIELD_IN_DICTIONARY)]


def test_malformed_rows_are_rejected_with_their_first_line() -> None:
    parsed = _records(
        'P1,0,54,2024-03-01,a@b.org,1,0,0,2,40,"55.5",2',
        'P2,1,60,2024-03-02,"line one',
        'line two",0,0,0,2,,,0',
        "P3,1,61",
        "",
        "P4,1,62,2024-03-04,g@h.org,0,0,0,2,,,0,extra",
        ",1,63,2024-03-05,i@j.org,0,0,0,2,,,0",
        "P5,1,64,2024-03-06,k@l.org,0,0,0,2,,,0",
    )
    assert _rejects(parsed) == [
        (3, "email", RULE_VALUE_VALID),  # a quoted value over two lines: named by its first line
        (5, None, RULE_ROW_WELL_FORMED),  # too few columns
        (7, None, RULE_ROW_WELL_FORMED),  # too many columns (after a blank line 6)
        (8, "study_id", RULE_ROW_WELL_FORMED),  # no record id
    ]
    lines = {v["record_id"]: v["source_line"] for v in parsed.values.to_pylist()}
    assert lines == {"P1": 2, "P2": 3, "P5": 9}
    assert parsed.rows_read == 6  # P1-P5 and the row without an id; the blank line is not a row


def test_events_keys_and_repeats_are_checked() -> None:
    events = "event_name,arm_num,unique_event_name,custom_event_label,event_id\nBaseline,1,baseline_arm_1,,1\nWeek 6,2,week_6_arm_2,,2\n"
    header = "study_id,redcap_event_name,redcap_repeat_instrument,redcap_repeat_instance,redcap_data_access_group,age,koos,followup_complete"
    rows = (
        "P1,baseline_arm_1,,,site_a,54,,",
        "P1,week_6_arm_2,followup,1,site_a,,40,2",
        "P1,week_6_arm_2,followup,2,site_a,,45,1",
        "P1,ghost_arm_1,,,site_a,55,,",
        "P1,week_6_arm_2,followup,x,site_a,,50,2",
        "P1,week_6_arm_2,nowhere,1,site_a,,50,2",
        "P1,,,,site_a,56,,",
        "P2,week_6_arm_2,,3,site_b,,60,2",
    )
    parsed = _records(*rows, header=header, events=events)
    assert _rejects(parsed) == [
        (5, "redcap_event_name", RULE_EVENT_DEFINED),
        (6, "redcap_repeat_instance", RULE_VALUE_VALID),
        (7, "redcap_repeat_instrument", RULE_VALUE_VALID),
        (8, "redcap_event_name", RULE_ROW_WELL_FORMED),
    ]
    keys = [
        (
            v["record_id"],
            v["event"],
            v["arm"],
            v["repeat_instrument"],
            v["repeat_instance"],
            v["data_access_group"],
            v["field"],
        )
        for v in parsed.values.to_pylist()
    ]
    assert keys == [
        ("P1", "baseline_arm_1", 1, None, None, "site_a", "age"),
        ("P1", "week_6_arm_2", 2, "followup", 1, "site_a", "koos"),
        ("P1", "week_6_arm_2", 2, "followup", 2, "site_a", "koos"),
        ("P2", "week_6_arm_2", 2, None, 3, "site_b", "koos"),  # a repeating event: instance, no instrument
    ]
    # Without the events file, the arm is read from the event name and unknown events pass.
    suffix = _records(*rows, header=header)
    assert (5, "redcap_event_name", RULE_EVENT_DEFINED) not in _rejects(suffix)
    assert [v["arm"] for v in suffix.values.to_pylist() if v["event"] == "ghost_arm_1"] == [1]


def test_checkbox_codes_in_column_names_and_a_bom_with_crlf() -> None:
    assert [checkbox_column_code(c) for c in ("A", "-1", "1.5", "x y")] == ["a", "_1", "1_5", "xy"]
    rows = ["P1,0,54,2024-03-01,a@b.org,1,1,0,2,40,55.5,2", "P2,1,60,,,0,0,0,0,,,"]
    plain = _records(*rows)
    crlf = parse_records(
        ("\ufeff" + "\r\n".join([HEADER, *rows]) + "\r\n").encode("utf-8"), parse_dictionary(DICTIONARY)
    )
    assert crlf.values.equals(plain.values) and crlf.completion.equals(plain.completion)
    sides = {(v["value"], v["value_label"]) for v in plain.values.to_pylist() if v["field"] == "side"}
    assert sides == {("L", "Left"), ("R", "Right")}


def test_whole_file_problems_raise_a_source_error_naming_the_fix() -> None:
    with pytest.raises(SourceError, match="Variable / Field Name"):
        parse_dictionary("name,form\nrecord_id,a\n")
    with pytest.raises(SourceError, match="'study_id' column"):
        _records("0,54", header="sex,age")
    with pytest.raises(SourceError, match="empty"):
        parse_records(b"", parse_dictionary(DICTIONARY))


def test_na_is_a_missing_value_in_every_field_as_r_writes_it() -> None:
    parsed = _records(
        "P1,NA,NA,NA,NA,1,0,0,2,NA,NA,2",  # a choice, validated fields, free text: all missing
        "P2,1,NA,2024-03-02,NA,NA,NA,NA,2,,,0",
    )
    assert _rejects(parsed) == []
    values = {(v["record_id"], v["field"], v["value"]) for v in parsed.values.to_pylist()}
    assert values == {("P1", "side", "L"), ("P2", "sex", "1"), ("P2", "surgery_date", "2024-03-02")}


def test_a_form_saved_complete_with_nothing_in_it_loads_blank_and_one_never_started_does_not() -> None:
    out = Extraction("redcap", "run")
    rows = [
        "P1,0,54,,,0,0,0,2,,,2",
        "P2,1,60,,,0,0,0,2,,,0",
    ]  # P1's follow-up saved blank; P2's never started
    redcap.extract_project(
        out, "t", "/l/t_records.csv", ("\n".join([HEADER, *rows]) + "\n").encode(), DICTIONARY.encode()
    )
    forms = {
        (r["source_offset"], orjson.loads(r["payload"])["form"]): orjson.loads(r["payload"])
        for r in out.records().to_pylist()
    }
    assert sorted(forms) == [(2, "enrolment"), (2, "followup"), (3, "enrolment")]
    assert (forms[(2, "followup")]["values"], forms[(2, "followup")]["form_state"]) == ({}, "complete")


def test_rows_with_nothing_to_load_are_counted_as_blank() -> None:
    out = Extraction("redcap", "run")
    rows = [
        "P1,0,54,,,0,0,0,2,,,0",  # an enrolment form
        "P2,,,,,0,0,0,0,,,0",  # a record id, unchecked boxes and statuses of forms never started
        "P3,,,,,,,,,,,",  # a record id alone
        "P4,9,,,,0,0,0,0,,,0",  # its only value is a rejected code: quarantined, not blank
    ]
    redcap.extract_project(
        out, "t", "/l/t_records.csv", ("\n".join([HEADER, *rows]) + "\n").encode(), DICTIONARY.encode()
    )
    assert [r["source_offset"] for r in out.records().to_pylist()] == [2]
    assert [r["source_offset"] for r in out.rejects().to_pylist()] == [5]
    assert out.blank_rows == 2
