"""Item-level PROMs as the generator writes them: a REDCap project and FHIR QuestionnaireResponses.

Patients whose ``prom_source`` is ``redcap`` go into one longitudinal REDCap project (``prom``);
those whose source is ``fhir`` get one QuestionnaireResponse per questionnaire. Both carry the item
answers (``Prom.items``, keyed by catalog item id), never a score: the pipeline scores them with
``catalog/instruments``. The registry's PROMs (scores only) are written by ``writers.registry_rows``.

The REDCap project, exported the way REDCap exports it (raw codes, flat):

- two arms (1 knee, 2 hip), each with the events Baseline, Week 6, Month 6, Month 12
  (``baseline_arm_1`` ... ``month_12_arm_2``): ``prom_arms.csv`` and ``prom_events.csv``;
- forms ``enrolment`` (baseline only: ``mrn`` and ``dob``, identifiers; ``asa_class`` dropdown;
  ``comorbid`` checkbox, exported as ``comorbid___1..5``), ``koos_jr`` (arm 1) and ``hoos_jr``
  (arm 2) with one radio field per catalog item (named by the item id) and ``<form>_date``, and
  ``adverse_event``, a repeating instrument on the Week 6 event (``redcap_repeat_instrument`` /
  ``redcap_repeat_instance``);
- questionnaires not returned are either missing (no row for the event) or saved blank
  (every field empty, ``<form>_complete`` 0); partly answered ones have status 0 as well.

Every draw that only shapes the REDCap export (ASA class, comorbidities, blank forms, extra adverse
events) comes from a stream per patient derived from the seed, so it changes no cohort fact.
"""

from __future__ import annotations

import csv
import io
import random
import uuid
from dataclasses import dataclass, field
from datetime import datetime, time, timedelta
from functools import cache
from pathlib import Path
from typing import Any

import orjson

from patient_journey.generate.model import EXPORT_TIME, Cohort, Journey, Prom, iso
from patient_journey.scoring import Catalog, load_catalog

REDCAP_DIR = "outcomes/redcap"
REDCAP_PROJECT = "prom"
QUESTIONNAIRE_BASE = "http://patient-journey.example.org/fhir/Questionnaire/"
_QR_NAMESPACE = uuid.UUID("6f1c5a2e-4b7d-4c1e-9a53-2d8e7f0b9c41")

# joint -> (arm number, arm name)
ARMS: dict[str, tuple[int, str]] = {"knee": (1, "Knee arthroplasty"), "hip": (2, "Hip arthroplasty")}
# timepoint -> (event label, unique event name prefix); unique names end in _arm_<n>
EVENTS: dict[str, tuple[str, str]] = {
    "baseline": ("Baseline", "baseline"),
    "6w": ("Week 6", "week_6"),
    "6m": ("Month 6", "month_6"),
    "12m": ("Month 12", "month_12"),
}
EVENT_IDS = {(arm, tp): 100 * arm + n for arm in (1, 2) for n, tp in enumerate(EVENTS, start=1)}
PROM_FORMS = ("koos_jr", "hoos_jr")
AE_EVENT = "6w"  # adverse events are collected, repeatedly, at the Week 6 visit
AE_FORM = "adverse_event"
BLANK_FORM_RATE = 0.4  # a follow-up questionnaire not returned: saved blank rather than missing
EXTRA_AE_RATE = 0.08

DICTIONARY_HEADER = (
    "Variable / Field Name", "Form Name", "Section Header", "Field Type", "Field Label",
    "Choices, Calculations, OR Slider Labels", "Field Note", "Text Validation Type OR Show Slider Number",
    "Text Validation Min", "Text Validation Max", "Identifier?", "Branching Logic (Show field only if...)",
    "Required Field?", "Custom Alignment", "Question Number (surveys only)", "Matrix Group Name",
    "Matrix Ranking?", "Field Annotation",
)  # fmt: skip
EVENTS_HEADER = ("event_name", "arm_num", "unique_event_name", "custom_event_label", "event_id")
ARMS_HEADER = ("arm_num", "name")
ASA_CHOICES = "1, ASA I | 2, ASA II | 3, ASA III | 4, ASA IV"
COMORBIDITIES = ("Diabetes", "Hypertension", "Chronic lung disease", "Obesity", "Depression")
AE_GRADES = "1, Grade I | 2, Grade II | 3, Grade III | 4, Grade IV | 5, Grade V"
_SEVERITY = ("None", "Mild", "Moderate", "Severe", "Extreme")
_EXTRA_AES = ("Nausea", "Constipation", "Wound ooze", "Calf pain")


@cache
def _catalog() -> Catalog:
    return load_catalog()


def unique_event_name(timepoint: str, arm: int) -> str:
    return f"{EVENTS[timepoint][1]}_arm_{arm}"


def questionnaire_url(instrument_id: str) -> str:
    return QUESTIONNAIRE_BASE + instrument_id


# --------------------------------------------------------------------------- REDCap


def _field(
    name: str,
    form: str,
    field_type: str,
    label: str,
    choices: str = "",
    validation: str = "",
    identifier: bool = False,
    note: str = "",
) -> list[str]:
    row = [name, form, "", field_type, label, choices, note, validation, "", "", "y" if identifier else ""]
    return row + [""] * (len(DICTIONARY_HEADER) - len(row))


def _prom_form(instrument_id: str) -> list[list[str]]:
    instrument = _catalog().instrument(instrument_id)
    rows = [_field(f"{instrument_id}_date", instrument_id, "text", "Date completed", validation="date_ymd")]
    for item in instrument.items:
        low, high = item.range
        labels = " | ".join(
            f"{code}, {_SEVERITY[code] if high == 4 and low == 0 else code}" for code in range(low, high + 1)
        )
        rows.append(_field(item.id, instrument_id, "radio", item.label, labels))
    return rows


def dictionary_rows() -> list[list[str]]:
    checkbox = " | ".join(f"{n}, {name}" for n, name in enumerate(COMORBIDITIES, start=1))
    rows = [
        _field("record_id", "enrolment", "text", "Record ID"),
        _field("mrn", "enrolment", "text", "Medical record number", identifier=True),
        _field("dob", "enrolment", "text", "Date of birth", validation="date_ymd", identifier=True),
        _field("asa_class", "enrolment", "dropdown", "ASA physical status", ASA_CHOICES),
        _field("comorbid", "enrolment", "checkbox", "Comorbidities", checkbox),
    ]
    for form in PROM_FORMS:
        rows += _prom_form(form)
    rows += [
        _field("ae_date", AE_FORM, "text", "Date of onset", validation="date_ymd"),
        _field("ae_description", AE_FORM, "notes", "Description"),
        _field("ae_grade", AE_FORM, "dropdown", "Clavien-Dindo grade", AE_GRADES),
    ]
    return rows


def records_header(dictionary: list[list[str]]) -> list[str]:
    """Export columns: keys, then each form's fields (checkboxes expanded) and its status."""
    header = ["record_id", "redcap_event_name", "redcap_repeat_instrument", "redcap_repeat_instance"]
    forms = list(dict.fromkeys(row[1] for row in dictionary))
    for form in forms:
        for row in dictionary:
            if row[1] != form or row[0] == "record_id":
                continue
            if row[3] == "checkbox":
                header += [f"{row[0]}___{part.split(',')[0].strip()}" for part in row[5].split("|")]
            else:
                header.append(row[0])
        header.append(f"{form}_complete")
    return header


@dataclass
class RedcapProject:
    """A REDCap project's four export files, as rows (``records`` in export order)."""

    name: str
    dictionary: list[list[str]]
    events: list[list[str]]
    arms: list[list[str]]
    header: list[str]
    records: list[dict[str, str]] = field(default_factory=list)

    @property
    def records_path(self) -> str:
        return f"{REDCAP_DIR}/{self.name}_records.csv"

    def line_of(self, index: int) -> int:
        """The line where record row ``index`` starts (the header is line 1; notes span lines)."""
        return 2 + index + sum(v.count("\n") for row in self.records[:index] for v in row.values())


def _blank(project: RedcapProject, record: int, event: str) -> dict[str, str]:
    row = dict.fromkeys(project.header, "")
    row["record_id"] = str(record)
    row["redcap_event_name"] = event
    return row


def _fill_prom(row: dict[str, str], form: str, prom: Prom | None) -> None:
    """A PROM form: answered items, blank when not answered; status 2 only when complete."""
    items = [c for c in row if c.startswith(f"{form}_") and c[len(form) + 1 :].isdigit()]
    if prom is not None:
        row[f"{form}_date"] = prom.collected_on.isoformat()
        for item in items:
            row[item] = str(prom.items[item]) if item in prom.items else ""
    row[f"{form}_complete"] = "2" if prom is not None and all(i in prom.items for i in items) else "0"


def _journey_rows(project: RedcapProject, seed: int, j: Journey, record: int) -> list[dict[str, str]]:
    rng = random.Random(f"redcap:{seed}:{j.index}")
    arm, _ = ARMS[j.joint]
    by_tp = {p.timepoint: p for p in j.proms}
    rows: list[dict[str, str]] = []
    for tp in EVENTS:
        event = unique_event_name(tp, arm)
        prom = by_tp.get(tp)
        if prom is not None or tp == "baseline" or rng.random() < BLANK_FORM_RATE:
            row = _blank(project, record, event)
            if tp == "baseline":
                row["mrn"] = j.mrn
                row["dob"] = j.birth_date.isoformat()
                row["asa_class"] = str(rng.choice((1, 2, 2, 2, 3, 3, 4)))
                for n in range(1, len(COMORBIDITIES) + 1):
                    row[f"comorbid___{n}"] = "1" if rng.random() < 0.2 else "0"
                row["enrolment_complete"] = "2"
            _fill_prom(row, j.instrument_id, prom)
            rows.append(row)
        if tp != AE_EVENT:
            continue
        events = [(c.occurred_on, c.description, c.grade) for c in j.complications]
        if rng.random() < EXTRA_AE_RATE:
            day = j.surgery_start.date() + timedelta(days=rng.randint(2, 40))
            events.append((day, rng.choice(_EXTRA_AES), 1))
        for instance, (day, description, grade) in enumerate(sorted(events), start=1):
            row = _blank(project, record, event)
            row["redcap_repeat_instrument"] = AE_FORM
            row["redcap_repeat_instance"] = str(instance)
            row["ae_date"] = day.isoformat()
            row["ae_description"] = description + (
                "\nFollowed up at the next visit." if rng.random() < 0.5 else ""
            )
            row["ae_grade"] = str(grade)
            row[f"{AE_FORM}_complete"] = "2"
            rows.append(row)
    return rows


def redcap_project(cohort: Cohort) -> RedcapProject:
    """The REDCap project of every patient whose PROMs are collected in REDCap."""
    dictionary = dictionary_rows()
    events = [
        [label, str(arm), unique_event_name(tp, arm), "", str(EVENT_IDS[(arm, tp)])]
        for arm, _ in sorted(ARMS.values())
        for tp, (label, _) in EVENTS.items()
    ]
    arms = [[str(arm), name] for arm, name in sorted(ARMS.values())]
    project = RedcapProject(REDCAP_PROJECT, dictionary, events, arms, records_header(dictionary))
    record = 0
    for j in cohort.journeys:
        if j.prom_source == "redcap":
            record += 1
            project.records += _journey_rows(project, cohort.seed, j, record)
    return project


def _csv_bytes(header: tuple[str, ...] | list[str], rows: list[list[str]]) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue().encode("utf-8")


def write_redcap(landing: Path, project: RedcapProject) -> int:
    """Write the dictionary, events, arms and records exports; returns the records' row count."""
    folder = landing / REDCAP_DIR
    folder.mkdir(parents=True, exist_ok=True)
    name = project.name
    (folder / f"{name}_dictionary.csv").write_bytes(_csv_bytes(DICTIONARY_HEADER, project.dictionary))
    (folder / f"{name}_events.csv").write_bytes(_csv_bytes(EVENTS_HEADER, project.events))
    (folder / f"{name}_arms.csv").write_bytes(_csv_bytes(ARMS_HEADER, project.arms))
    rows = [[row[c] for c in project.header] for row in project.records]
    (folder / f"{name}_records.csv").write_bytes(_csv_bytes(project.header, rows))
    return len(rows)


# --------------------------------------------------------------------------- FHIR


def _authored(j: Journey, p: Prom) -> str:
    minutes = (j.index * 97 + len(p.timepoint) * 31) % (9 * 60)
    at = datetime.combine(p.collected_on, time(8 + minutes // 60, minutes % 60), EXPORT_TIME.tzinfo)
    return iso(at)


def questionnaire_response(j: Journey, p: Prom, response_id: str | None = None) -> dict[str, Any]:
    """A QuestionnaireResponse for one Prom: items by catalog id, answers as valueInteger."""
    instrument = _catalog().instrument(j.instrument_id)
    items: list[dict[str, Any]] = []
    for item in instrument.items:
        entry: dict[str, Any] = {"linkId": item.id, "text": item.label}
        if item.id in p.items:
            entry["answer"] = [{"valueInteger": p.items[item.id]}]
        items.append(entry)
    complete = all(item.id in p.items for item in instrument.items)
    return {
        "resourceType": "QuestionnaireResponse",
        "id": response_id or str(uuid.uuid5(_QR_NAMESPACE, f"{j.patient_id}/{p.timepoint}")),
        "meta": {"lastUpdated": iso(EXPORT_TIME)},
        "questionnaire": questionnaire_url(j.instrument_id),
        "status": "completed" if complete else "in-progress",
        "subject": {"reference": f"Patient/{j.patient_id}"},
        "authored": _authored(j, p),
        "item": items,
    }


def questionnaire_responses(cohort: Cohort) -> list[bytes]:
    """NDJSON lines (without the newline): one QuestionnaireResponse per Prom of FHIR patients."""
    return [
        orjson.dumps(questionnaire_response(j, p))
        for j in cohort.journeys
        if j.prom_source == "fhir"
        for p in j.proms
    ]
