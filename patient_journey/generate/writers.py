"""Serialise a cohort into the landing formats of docs/sources.md, plus the ground truth."""

from __future__ import annotations

import base64
import csv
import io
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
    Cohort,
    DeviceEvent,
    EhrComplication,
    Encounter,
    Journey,
    Observation,
    PhysicalDevice,
    PlantedRecord,
    iso,
    prom_catalog,
    sql_round,
)

# PROMs with item answers (REDCap project, QuestionnaireResponses) are written by proms.py.
from patient_journey.generate.proms import questionnaire_responses
from patient_journey.generate.registry_db import write_registry_db
from patient_journey.scoring import change_reaches_mcid

EXPORT_FOLDER = "fhir-export-20250301T000000Z"
EHR_DIR = f"ehr/{EXPORT_FOLDER}"
# IoT Hub routes to one storage endpoint per encoding; each device type's messages take one route.
ROUTES: dict[str, tuple[str, str]] = {  # device type -> (endpoint folder, encoding)
    "robotic-arm": ("or-telemetry-avro", "avro"),
    "powered-saw": ("or-telemetry-avrodeflate", "avrodeflate"),
    "tourniquet": ("or-telemetry-json", "json"),
}
UNKNOWN_ROUTE = ROUTES["robotic-arm"]
DEVICE_DIR = "device"
REGISTRY_PATH = "outcomes/registry.sqlite"
REDCAP_DIR = "outcomes/redcap"
RESOURCE_TYPES: tuple[str, ...] = (
    "Patient",
    "Encounter",
    "Procedure",
    "Condition",
    "Observation",
    "Device",
    "QuestionnaireResponse",
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


EPISODE_COLUMNS: tuple[str, ...] = (
    "case_id", "mrn", "joint", "procedure_code", "robotic_assisted", "admission_time",
    "discharge_time", "surgery_start", "surgery_end", "or_minutes", "devices_used",
    "length_of_stay_days", "complication_30d", "complication_90d", "max_complication_grade_90d",
    "readmission_30d", "readmission_90d", "prom_instrument", "prom_source", "prom_baseline",
    "prom_6w", "prom_6m", "prom_12m", "prom_change_6w", "prom_change_6m", "prom_change_12m",
    "prom_mcid_6w", "prom_mcid_6m", "prom_mcid_12m", "complications_90d", "readmissions_90d",
    "device_events",
)  # fmt: skip
# Device events count towards a procedure when their device time is within its start and end,
# widened by this (the default of JOURNEY_SOURCES__DEVICE_SKEW_TOLERANCE_SECONDS).
DEVICE_SKEW_TOLERANCE = timedelta(seconds=900)
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


def encounter_resource(j: Journey, e: Encounter) -> dict[str, Any]:
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


def _complication_condition(j: Journey, c: EhrComplication) -> dict[str, Any]:
    """A post-operative complication as the EHR records it: an encounter diagnosis, no grade."""
    return {
        "resourceType": "Condition",
        "id": c.condition_id,
        "meta": _META,
        "clinicalStatus": {
            "coding": [
                {"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}
            ]
        },
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/condition-category",
                        "code": "encounter-diagnosis",
                    }
                ]
            }
        ],
        "code": {
            "coding": [{"system": SNOMED, "code": c.code, "display": c.description}],
            "text": c.description,
        },
        "subject": _ref("Patient", j.patient_id),
        "onsetDateTime": f"{c.occurred_on.isoformat()}T12:00:00+00:00",
        "recordedDate": f"{c.occurred_on.isoformat()}T12:00:00+00:00",
    }


def fhir_lines(cohort: Cohort) -> dict[str, list[bytes]]:
    """Good NDJSON lines per resource type, in a stable order."""
    out: dict[str, list[bytes]] = {t: [] for t in RESOURCE_TYPES}
    for j in cohort.journeys:
        out["Patient"].append(dumps(_patient(j)))
        out["Encounter"].extend(dumps(encounter_resource(j, e)) for e in j.encounters)
        out["Procedure"].append(dumps(_procedure(j)))
        out["Condition"].append(dumps(_condition(j)))
        out["Condition"].extend(dumps(_complication_condition(j, c)) for c in j.ehr_complications)
        out["Observation"].extend(dumps(observation_resource(j, o)) for o in j.observations)
        out["Device"].append(dumps(_implant(j)))
    out["Device"].extend(dumps(_or_device(d)) for d in cohort.devices)
    out["QuestionnaireResponse"] = questionnaire_responses(cohort)
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


def device_body(e: DeviceEvent) -> dict[str, Any]:
    return {
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


def embeds_json_body(device: PhysicalDevice) -> bool:
    """Whether the device declares application/json in UTF-8, so that IoT Hub's JSON encoding
    embeds the body as JSON; other devices' bodies are written in base64."""
    return zlib.crc32(device.serial.encode("utf-8")) % 2 == 0


def routed_message(e: DeviceEvent, body: dict[str, Any], encoding: str) -> dict[str, Any]:
    """One message as IoT Hub's storage routing writes it in ``encoding``."""
    enqueued = _enqueued_str(e.enqueued)
    system = {
        "connectionDeviceId": e.device.iot_id,
        "connectionAuthMethod": _AUTH_METHOD,
        "connectionDeviceGenerationId": e.device.generation_id,
        "enqueuedTime": enqueued,
    }
    raw = dumps(body)
    if encoding != "json":
        system |= {"contentType": "application/json", "contentEncoding": "utf-8"}
        return {"EnqueuedTimeUtc": enqueued, "Properties": {}, "SystemProperties": system, "Body": raw}
    if embeds_json_body(e.device):
        system |= {"contentType": "application/json", "contentEncoding": "utf-8"}
        return {"EnqueuedTimeUtc": enqueued, "Properties": {}, "SystemProperties": system, "Body": body}
    encoded = base64.b64encode(raw).decode("ascii")
    return {"EnqueuedTimeUtc": enqueued, "Properties": {}, "SystemProperties": system, "Body": encoded}


def route_of(device: PhysicalDevice) -> tuple[str, str]:
    return ROUTES.get(device.model.device_type, UNKNOWN_ROUTE)


def blob_path(endpoint: str, encoding: str, partition: int, enqueued: datetime) -> str:
    w = enqueued.replace(minute=enqueued.minute - enqueued.minute % 5, second=0, microsecond=0)
    suffix = "json" if encoding == "json" else "avro"
    return f"{DEVICE_DIR}/{endpoint}/{partition}/{w:%Y/%m/%d/%H/%M}.{suffix}"


def _write_blob(target: Path, encoding: str, messages: list[dict[str, Any]]) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if encoding == "json":
        target.write_bytes(b"".join(dumps(m) + b"\n" for m in messages))
        return
    buf = io.BytesIO()
    codec = "deflate" if encoding == "avrodeflate" else "null"
    fastavro.writer(
        buf, fastavro.parse_schema(AVRO_SCHEMA), messages, codec=codec, sync_marker=AVRO_SYNC_MARKER
    )
    target.write_bytes(buf.getvalue())


def write_device(
    landing: Path, events: list[DeviceEvent], bodies: dict[int, dict[str, Any]] | None = None
) -> tuple[int, list[tuple[str, int]]]:
    """Write IoT Hub routed blobs; return blob count and (blob path, message index) per event.

    ``bodies`` replaces the body of the events at those positions (planted bad messages).
    """
    bodies = bodies or {}
    blobs: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i, e in enumerate(events):
        endpoint, encoding = route_of(e.device)
        blobs[(blob_path(endpoint, encoding, partition_of(e.device), e.enqueued), encoding)].append(i)
    where: list[tuple[str, int]] = [("", -1)] * len(events)
    for path, encoding in sorted(blobs):
        order = sorted(
            blobs[(path, encoding)],
            key=lambda i: (events[i].enqueued, events[i].device.iot_id, events[i].timestamp, i),
        )
        for pos, i in enumerate(order):
            where[i] = (path, pos)
        messages = [
            routed_message(events[i], bodies.get(i) or device_body(events[i]), encoding) for i in order
        ]
        _write_blob(landing / path, encoding, messages)
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
                    c.code,
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


def write_registry(landing: Path, rows: RegistryRows) -> None:
    """The registry as the embedded SQLite file (tables from ``registry_db.REGISTRY_METADATA``)."""
    path = landing / REGISTRY_PATH
    path.parent.mkdir(parents=True, exist_ok=True)
    write_registry_db(f"sqlite:///{path}", rows)


# --------------------------------------------------------------------------- ground truth


def _b(flag: bool) -> str:
    return "true" if flag else "false"


def _score(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


def episode_row(j: Journey) -> list[str]:
    surgery_day = j.surgery_start.date()
    discharge_day = j.admission.end.date()
    # A complication the registry and the EHR both report (same code, same day) is one event.
    complications = {(c.code, c.occurred_on) for c in j.complications}
    complications |= {(c.code, c.occurred_on) for c in j.ehr_complications}
    comp_days = [(day - surgery_day).days for _, day in complications]
    grades_90 = [c.grade for c in j.complications if 0 <= (c.occurred_on - surgery_day).days <= 90]
    # An admission the EHR and the registry both report (same day) is one readmission.
    readmit_dates = {r.admitted_on for r in j.registry_readmissions}
    if j.readmission is not None:
        readmit_dates.add(j.readmission.start.date())
    readmit_days = [(day - discharge_day).days for day in readmit_dates]
    scores = {p.timepoint: p.score for p in j.proms if p.score is not None}
    base = scores.get("baseline")
    primary = prom_catalog().instrument(j.instrument_id).primary_score
    changes: dict[str, float | None] = {}
    reached: dict[str, str] = {}
    for timepoint in ("6w", "6m", "12m"):
        later = scores.get(timepoint)
        if base is None or later is None:
            changes[timepoint], reached[timepoint] = None, ""
            continue
        changes[timepoint] = sql_round(later - base) + 0.0
        mcid = change_reaches_mcid(j.instrument_id, primary.name, [base], [later], prom_catalog())[0].as_py()
        reached[timepoint] = "" if mcid is None else _b(mcid)
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
        j.instrument_id,
        j.prom_source,
        _score(base),
        _score(scores.get("6w")),
        _score(scores.get("6m")),
        _score(scores.get("12m")),
        _score(changes["6w"]),
        _score(changes["6m"]),
        _score(changes["12m"]),
        reached["6w"],
        reached["6m"],
        reached["12m"],
        str(sum(1 for d in comp_days if 0 <= d <= 90)),
        str(sum(1 for d in readmit_days if 0 <= d <= 90)),
        str(
            sum(
                1
                for e in j.events
                if j.surgery_start - DEVICE_SKEW_TOLERANCE
                <= e.timestamp
                <= j.surgery_end + DEVICE_SKEW_TOLERANCE
            )
        ),
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

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(("device_type", "device_id", "clock_skew_seconds"))
    writer.writerows((d.model.device_type, d.serial, d.clock_skew_s) for d in cohort.devices)
    (folder / "device_clock.csv").write_text(buf.getvalue(), encoding="utf-8")
    (folder / "generation.json").write_bytes(orjson.dumps(generation, option=orjson.OPT_INDENT_2) + b"\n")
