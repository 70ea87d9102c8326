"""Serialise a cohort into the landing formats of docs/sources.md, plus the ground truth."""

from __future__ import annotations

import csv
import io
import sqlite3
import zlib
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import fastavro
import orjson

from patient_journey.generate.model import (
    CONDITIONS,
    EXPORT_TIME,
    IMPLANT_MODELS,
    PROCEDURES,
    TIMEPOINTS,
    Cohort,
    DeviceEvent,
    Encounter,
    Journey,
    Observation,
    PhysicalDevice,
    PlantedRecord,
    iso,
)

EXPORT_FOLDER = "fhir-export-20250301T000000Z"
EHR_DIR = f"ehr/{EXPORT_FOLDER}"
IOT_HUB = "surgical-iot-hub"
DEVICE_DIR = f"device/{IOT_HUB}"
REGISTRY_PATH = "outcomes/registry.sqlite"
REDCAP_DIR = "outcomes/redcap"
RESOURCE_TYPES: tuple[str, ...] = (
    "Patient",
    "Encounter",
    "Procedure",
    "Condition",
    "Observation",
    "Device",
)
PARTITIONS = 4
AVRO_SYNC_MARKER = b"patient-journey!"  # 16 bytes, fixed so blobs are byte-identical per seed

MRN_SYSTEM = "http://hospital.example.org/fhir/mrn"
OR_CASE_SYSTEM = "http://hospital.example.org/fhir/or-case"
PURPOSE_SYSTEM = "http://patient-journey.example.org/fhir/CodeSystem/encounter-purpose"
DEVICE_TYPE_SYSTEM = "http://patient-journey.example.org/fhir/CodeSystem/device-type"
SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"

_LAST_UPDATED = iso(EXPORT_TIME)
_META = {"lastUpdated": _LAST_UPDATED}
_PURPOSE_DISPLAY = {
    "preop": "Pre-operative assessment",
    "surgical-admission": "Surgical admission",
    "follow-up": "Post-operative follow-up",
    "readmission": "Readmission",
}
_CLASS_DISPLAY = {"AMB": "ambulatory", "IMP": "inpatient encounter"}

AVRO_SCHEMA: dict[str, Any] = {
    "type": "record",
    "name": "Message",
    "namespace": "Microsoft.Azure.Devices",
    "fields": [
        {"name": "EnqueuedTimeUtc", "type": "string"},
        {"name": "Properties", "type": {"type": "map", "values": "string"}},
        {"name": "SystemProperties", "type": {"type": "map", "values": "string"}},
        {"name": "Body", "type": "bytes"},
    ],
}
_AUTH_METHOD = '{"scope":"device","type":"sas","issuer":"iothub","acceptingIpFilterRule":null}'

REDCAP_DICTIONARY_HEADER = (
    '"Variable / Field Name","Form Name","Section Header","Field Type","Field Label",'
    '"Choices, Calculations, OR Slider Labels","Field Note",'
    '"Text Validation Type OR Show Slider Number","Text Validation Min","Text Validation Max",'
    'Identifier?,"Branching Logic (Show field only if...)","Required Field?","Custom Alignment",'
    '"Question Number (surveys only)","Matrix Group Name","Matrix Ranking?","Field Annotation"'
)
REDCAP_EVENTS: dict[str, str] = {
    "baseline": "baseline_arm_1",
    "6w": "week_6_arm_1",
    "6m": "month_6_arm_1",
    "12m": "month_12_arm_1",
}
REDCAP_INSTRUMENT_CODES: dict[str, str] = {"KOOS JR": "1", "HOOS JR": "2"}

EPISODE_COLUMNS: tuple[str, ...] = (
    "case_id", "mrn", "joint", "procedure_code", "robotic_assisted", "admission_time",
    "discharge_time", "surgery_start", "surgery_end", "or_minutes", "devices_used",
    "length_of_stay_days", "complication_30d", "complication_90d", "max_complication_grade_90d",
    "readmission_30d", "readmission_90d", "prom_instrument", "prom_source", "prom_baseline",
    "prom_6w", "prom_6m", "prom_12m", "prom_change_12m",
)  # fmt: skip
PLANTED_COLUMNS: tuple[str, ...] = (
    "kind",
    "source",
    "path",
    "locator",
    "table",
    "field",
    "expected_outcome",
)


def dumps(obj: Any) -> bytes:
    return orjson.dumps(obj)


def _ref(kind: str, ident: str) -> dict[str, str]:
    return {"reference": f"{kind}/{ident}"}


# --------------------------------------------------------------------------- FHIR


def _patient(j: Journey) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "id": j.patient_id,
        "meta": _META,
        "identifier": [
            {
                "use": "usual",
                "type": {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                            "code": "MR",
                        }
                    ]
                },
                "system": MRN_SYSTEM,
                "value": j.mrn,
            }
        ],
        "name": [{"use": "official", "family": j.family, "given": [j.given]}],
        "telecom": [{"system": "phone", "value": j.phone, "use": "home"}],
        "gender": j.gender,
        "birthDate": j.birth_date.isoformat(),
        "address": [
            {
                "use": "home",
                "line": [j.address_line],
                "city": j.city,
                "postalCode": j.postal_code,
                "country": "US",
            }
        ],
    }


def _encounter(j: Journey, e: Encounter) -> dict[str, Any]:
    return {
        "resourceType": "Encounter",
        "id": e.id,
        "meta": _META,
        "status": "finished",
        "class": {
            "system": ACT_CODE,
            "code": e.class_code,
            "display": _CLASS_DISPLAY[e.class_code],
        },
        "type": [
            {
                "coding": [
                    {
                        "system": PURPOSE_SYSTEM,
                        "code": e.purpose,
                        "display": _PURPOSE_DISPLAY[e.purpose],
                    }
                ]
            }
        ],
        "subject": _ref("Patient", j.patient_id),
        "period": {"start": iso(e.start), "end": iso(e.end)},
    }


def _procedure(j: Journey) -> dict[str, Any]:
    code, display = PROCEDURES[j.joint]
    return {
        "resourceType": "Procedure",
        "id": j.procedure_id,
        "meta": _META,
        "identifier": [{"system": OR_CASE_SYSTEM, "value": j.case_id}],
        "status": "completed",
        "code": {
            "coding": [{"system": SNOMED, "code": code, "display": display}],
            "text": display,
        },
        "subject": _ref("Patient", j.patient_id),
        "encounter": _ref("Encounter", j.admission.id),
        "performedPeriod": {"start": iso(j.surgery_start), "end": iso(j.surgery_end)},
        "focalDevice": [{"manipulated": _ref("Device", j.implant_id)}],
        "usedReference": [_ref("Device", d.resource_id) for d in j.devices],
    }


def _condition(j: Journey) -> dict[str, Any]:
    code, display = CONDITIONS[j.joint]
    return {
        "resourceType": "Condition",
        "id": j.condition_id,
        "meta": _META,
        "clinicalStatus": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                    "code": "active",
                }
            ]
        },
        "code": {
            "coding": [{"system": SNOMED, "code": code, "display": display}],
            "text": display,
        },
        "subject": _ref("Patient", j.patient_id),
        "onsetDateTime": iso(j.onset),
        "recordedDate": iso(j.recorded),
    }


def observation_resource(j: Journey, o: Observation) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": o.id,
        "meta": _META,
        "status": "final",
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                        "code": "vital-signs",
                    }
                ]
            }
        ],
        "code": {"coding": [{"system": LOINC, "code": o.code, "display": o.display}]},
        "subject": _ref("Patient", j.patient_id),
        "encounter": _ref("Encounter", o.encounter_id),
        "effectiveDateTime": iso(o.effective),
        "valueQuantity": {
            "value": o.value,
            "unit": o.unit,
            "system": UCUM,
            "code": o.unit,
        },
    }


def _or_device(d: PhysicalDevice) -> dict[str, Any]:
    return {
        "resourceType": "Device",
        "id": d.resource_id,
        "meta": _META,
        "udiCarrier": [
            {
                "deviceIdentifier": d.model.udi_di,
                "carrierHRF": f"(01){d.model.udi_di}(21){d.serial}",
            }
        ],
        "status": "active",
        "serialNumber": d.serial,
        "deviceName": [{"name": d.model.name, "type": "user-friendly-name"}],
        "type": {"coding": [{"system": DEVICE_TYPE_SYSTEM, "code": d.model.device_type}]},
        "version": [{"value": d.firmware}],
    }


def _implant(j: Journey) -> dict[str, Any]:
    udi, name = IMPLANT_MODELS[j.joint]
    return {
        "resourceType": "Device",
        "id": j.implant_id,
        "meta": _META,
        "udiCarrier": [{"deviceIdentifier": udi, "carrierHRF": f"(01){udi}(21){j.implant_serial}"}],
        "status": "active",
        "serialNumber": j.implant_serial,
        "deviceName": [{"name": name, "type": "user-friendly-name"}],
        "type": {"coding": [{"system": DEVICE_TYPE_SYSTEM, "code": f"{j.joint}-implant"}]},
        "patient": _ref("Patient", j.patient_id),
    }


def fhir_lines(cohort: Cohort) -> dict[str, list[bytes]]:
    """Good NDJSON lines per resource type, in a stable order."""
    out: dict[str, list[bytes]] = {t: [] for t in RESOURCE_TYPES}
    for j in cohort.journeys:
        out["Patient"].append(dumps(_patient(j)))
        out["Encounter"].extend(dumps(_encounter(j, e)) for e in j.encounters)
        out["Procedure"].append(dumps(_procedure(j)))
        out["Condition"].append(dumps(_condition(j)))
        out["Observation"].extend(dumps(observation_resource(j, o)) for o in j.observations)
        out["Device"].append(dumps(_implant(j)))
    out["Device"].extend(dumps(_or_device(d)) for d in cohort.devices)
    return out


def write_fhir(landing: Path, lines: dict[str, list[bytes]]) -> dict[str, int]:
    folder = landing / EHR_DIR
    folder.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    output = []
    for rtype in RESOURCE_TYPES:
        name = f"{rtype}.000.ndjson"
        rows = lines[rtype]
        (folder / name).write_bytes(b"".join(line + b"\n" for line in rows))
        counts[rtype] = len(rows)
        output.append(
            {
                "type": rtype,
                "url": f"https://landing.blob.core.windows.net/{EHR_DIR}/{name}",
                "count": len(rows),
            }
        )
    manifest = {
        "transactionTime": _LAST_UPDATED,
        "request": "https://fhir.hospital.example.org/$export?_type=" + ",".join(RESOURCE_TYPES),
        "requiresAccessToken": True,
        "output": output,
        "error": [],
    }
    (folder / "manifest.json").write_bytes(orjson.dumps(manifest, option=orjson.OPT_INDENT_2))
    return counts


# --------------------------------------------------------------------------- device


def partition_of(device: PhysicalDevice) -> int:
    return zlib.crc32(device.iot_id.encode("utf-8")) % PARTITIONS


def _enqueued_str(ts: datetime) -> str:
    # IoT Hub writes 7 fractional digits and a Z.
    return f"{ts:%Y-%m-%dT%H:%M:%S}.{ts.microsecond * 10:07d}Z"


def _avro_record(e: DeviceEvent) -> dict[str, Any]:
    body = {
        "caseId": e.case_id,
        "deviceType": e.device.model.device_type,
        "udiDi": e.device.model.udi_di,
        "serial": e.device.serial,
        "firmware": e.device.firmware,
        "eventType": e.event_type,
        "timestamp": iso(e.timestamp),
        "value": e.value,
        "unit": e.unit,
    }
    enqueued = _enqueued_str(e.enqueued)
    return {
        "EnqueuedTimeUtc": enqueued,
        "Properties": {},
        "SystemProperties": {
            "connectionDeviceId": e.device.iot_id,
            "connectionAuthMethod": _AUTH_METHOD,
            "connectionDeviceGenerationId": e.device.generation_id,
            "enqueuedTime": enqueued,
            "contentType": "application/json",
            "contentEncoding": "utf-8",
        },
        "Body": dumps(body),
    }


def blob_path(partition: int, enqueued: datetime) -> str:
    w = enqueued.replace(minute=enqueued.minute - enqueued.minute % 5, second=0, microsecond=0)
    return f"{DEVICE_DIR}/{partition}/{w:%Y/%m/%d/%H/%M}.avro"


def write_device(landing: Path, events: list[DeviceEvent]) -> tuple[int, list[tuple[str, int]]]:
    """Write IoT Hub Avro blobs; return blob count and (blob path, record index) per event."""
    blobs: dict[str, list[int]] = defaultdict(list)
    for i, e in enumerate(events):
        blobs[blob_path(partition_of(e.device), e.enqueued)].append(i)
    schema = fastavro.parse_schema(AVRO_SCHEMA)
    where: list[tuple[str, int]] = [("", -1)] * len(events)
    for path in sorted(blobs):
        order = sorted(
            blobs[path],
            key=lambda i: (
                events[i].enqueued,
                events[i].device.iot_id,
                events[i].timestamp,
                i,
            ),
        )
        for pos, i in enumerate(order):
            where[i] = (path, pos)
        target = landing / path
        target.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        fastavro.writer(
            buf,
            schema,
            [_avro_record(events[i]) for i in order],
            sync_marker=AVRO_SYNC_MARKER,
        )
        target.write_bytes(buf.getvalue())
    return len(blobs), where


# --------------------------------------------------------------------------- registry

Row = tuple[Any, ...]


def updated_at(day: date, key: int) -> str:
    """A stable ISO UTC 'updated_at' one to three days after ``day``."""
    ts = datetime(day.year, day.month, day.day, tzinfo=UTC) + timedelta(
        days=1 + key % 3, hours=6 + key % 11, minutes=(key * 37) % 60
    )
    return iso(ts)


@dataclass
class RegistryRows:
    patients: list[Row] = field(default_factory=list)
    proms: list[Row] = field(default_factory=list)
    complications: list[Row] = field(default_factory=list)
    readmissions: list[Row] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {
            "registry_patient": len(self.patients),
            "prom_response": len(self.proms),
            "complication": len(self.complications),
            "readmission": len(self.readmissions),
        }


def registry_rows(cohort: Cohort) -> RegistryRows:
    rows = RegistryRows()
    for j in cohort.journeys:
        rows.patients.append(
            (
                j.registry_id,
                j.mrn,
                j.birth_date.isoformat(),
                j.site,
                updated_at(j.surgery_start.date(), j.registry_id),
            )
        )
        if j.prom_source == "registry":
            for p in j.proms:
                pk = len(rows.proms) + 1
                rows.proms.append(
                    (
                        pk,
                        j.registry_id,
                        j.instrument,
                        p.timepoint,
                        p.score,
                        p.collected_on.isoformat(),
                        updated_at(p.collected_on, pk),
                    )
                )
        for c in j.complications:
            pk = len(rows.complications) + 1
            rows.complications.append(
                (
                    pk,
                    j.registry_id,
                    c.occurred_on.isoformat(),
                    c.description,
                    c.grade,
                    updated_at(c.occurred_on, pk),
                )
            )
        for r in j.registry_readmissions:
            pk = len(rows.readmissions) + 1
            rows.readmissions.append(
                (
                    pk,
                    j.registry_id,
                    r.admitted_on.isoformat(),
                    r.discharged_on.isoformat(),
                    r.reason,
                    updated_at(r.discharged_on, pk),
                )
            )
    return rows


_REGISTRY_DDL = """
CREATE TABLE registry_patient (
    registry_id INTEGER PRIMARY KEY, mrn TEXT NOT NULL, birth_date TEXT, site TEXT,
    updated_at TEXT NOT NULL);
CREATE TABLE prom_response (
    response_id INTEGER PRIMARY KEY, registry_id INTEGER NOT NULL, instrument TEXT,
    timepoint TEXT, score REAL, collected_on TEXT, updated_at TEXT NOT NULL);
CREATE TABLE complication (
    complication_id INTEGER PRIMARY KEY, registry_id INTEGER NOT NULL, occurred_on TEXT,
    description TEXT, clavien_dindo_grade INTEGER, updated_at TEXT NOT NULL);
CREATE TABLE readmission (
    readmission_id INTEGER PRIMARY KEY, registry_id INTEGER NOT NULL, admitted_on TEXT,
    discharged_on TEXT, reason TEXT, updated_at TEXT NOT NULL);
"""


def write_registry(landing: Path, rows: RegistryRows) -> None:
    path = landing / REGISTRY_PATH
    path.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(path)
    try:
        con.executescript(_REGISTRY_DDL)
        with con:
            con.executemany("INSERT INTO registry_patient VALUES (?,?,?,?,?)", rows.patients)
            con.executemany("INSERT INTO prom_response VALUES (?,?,?,?,?,?,?)", rows.proms)
            con.executemany("INSERT INTO complication VALUES (?,?,?,?,?,?)", rows.complications)
            con.executemany("INSERT INTO readmission VALUES (?,?,?,?,?,?)", rows.readmissions)
    finally:
        con.close()


# --------------------------------------------------------------------------- REDCap


def _redcap_cell(value: str) -> str:
    if any(ch in value for ch in ' ,"\n'):
        return '"' + value.replace('"', '""') + '"'
    return value


def _dictionary_row(
    name: str,
    ftype: str,
    label: str,
    choices: str = "",
    validation: str = "",
    vmin: str = "",
    vmax: str = "",
    identifier: str = "",
) -> str:
    cells = [
        name,
        "prom",
        "",
        ftype,
        label,
        choices,
        "",
        validation,
        vmin,
        vmax,
        identifier,
    ]
    cells += [""] * 7
    return ",".join(_redcap_cell(c) for c in cells)


def write_redcap(landing: Path, cohort: Cohort) -> int:
    folder = landing / REDCAP_DIR
    folder.mkdir(parents=True, exist_ok=True)
    dictionary = [
        REDCAP_DICTIONARY_HEADER,
        _dictionary_row("record_id", "text", "Record ID"),
        _dictionary_row("mrn", "text", "Medical record number", identifier="y"),
        _dictionary_row("dob", "text", "Date of birth", validation="date_ymd", identifier="y"),
        _dictionary_row("prom_instrument", "dropdown", "PROM instrument", "1, KOOS JR | 2, HOOS JR"),
        _dictionary_row(
            "prom_score",
            "text",
            "PROM interval score (0-100)",
            "",
            "number",
            "0",
            "100",
        ),
        _dictionary_row("prom_date", "text", "Date completed", validation="date_ymd"),
    ]
    (folder / "prom_dictionary.csv").write_text("\n".join(dictionary) + "\n", encoding="utf-8")

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(
        [
            "record_id",
            "redcap_event_name",
            "mrn",
            "dob",
            "prom_instrument",
            "prom_score",
            "prom_date",
            "prom_complete",
        ]
    )
    rows = 0
    record_id = 0
    for j in cohort.journeys:
        if j.prom_source != "redcap":
            continue
        record_id += 1
        by_tp = {p.timepoint: p for p in j.proms}
        code = REDCAP_INSTRUMENT_CODES[j.instrument]
        for tp in TIMEPOINTS:
            prom = by_tp.get(tp)
            if prom is None and tp != "baseline":
                continue
            ident = [j.mrn, j.birth_date.isoformat()] if tp == "baseline" else ["", ""]
            if prom is None:
                values = ["", "", "", "0"]
            else:
                values = [code, f"{prom.score:.1f}", prom.collected_on.isoformat(), "2"]
            writer.writerow([str(record_id), REDCAP_EVENTS[tp], *ident, *values])
            rows += 1
    (folder / "prom_records.csv").write_text(buf.getvalue(), encoding="utf-8")
    return rows


# --------------------------------------------------------------------------- ground truth


def _b(flag: bool) -> str:
    return "true" if flag else "false"


def _score(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


def episode_row(j: Journey) -> list[str]:
    surgery_day = j.surgery_start.date()
    discharge_day = j.admission.end.date()
    comp_days = [(c.occurred_on - surgery_day).days for c in j.complications]
    grades_90 = [c.grade for c in j.complications if 0 <= (c.occurred_on - surgery_day).days <= 90]
    readmit_days = [(r.admitted_on - discharge_day).days for r in j.registry_readmissions]
    if j.readmission is not None:
        readmit_days.append((j.readmission.start.date() - discharge_day).days)
    scores = {p.timepoint: p.score for p in j.proms}
    base, last = scores.get("baseline"), scores.get("12m")
    change = None if base is None or last is None else round(last - base, 1) + 0.0
    return [
        j.case_id,
        j.mrn,
        j.joint,
        PROCEDURES[j.joint][0],
        _b(j.robotic),
        iso(j.admission.start),
        iso(j.admission.end),
        iso(j.surgery_start),
        iso(j.surgery_end),
        f"{j.or_minutes():.1f}",
        ";".join(sorted(d.model.udi_di for d in j.devices)),
        str((discharge_day - j.admission.start.date()).days),
        _b(any(0 <= d <= 30 for d in comp_days)),
        _b(any(0 <= d <= 90 for d in comp_days)),
        str(max(grades_90)) if grades_90 else "",
        _b(any(0 <= d <= 30 for d in readmit_days)),
        _b(any(0 <= d <= 90 for d in readmit_days)),
        j.instrument,
        j.prom_source,
        _score(base),
        _score(scores.get("6w")),
        _score(scores.get("6m")),
        _score(last),
        _score(change),
    ]


def write_ground_truth(
    out: Path, cohort: Cohort, planted: list[PlantedRecord], generation: dict[str, Any]
) -> None:
    folder = out / "ground_truth"
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(EPISODE_COLUMNS)
    writer.writerows(episode_row(j) for j in cohort.journeys)
    (folder / "episodes.csv").write_text(buf.getvalue(), encoding="utf-8")

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(PLANTED_COLUMNS)
    writer.writerows(
        [p.kind, p.source, p.path, p.locator, p.table, p.field, p.expected_outcome] for p in planted
    )
    (folder / "planted_bad_records.csv").write_text(buf.getvalue(), encoding="utf-8")
    (folder / "generation.json").write_bytes(orjson.dumps(generation, option=orjson.OPT_INDENT_2) + b"\n")
