"""Plant bad records on top of the good data (they never change an episode fact)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import orjson

from patient_journey.generate.model import (
    SURGERY_DAYS,
    SURGERY_FIRST_DAY,
    Cohort,
    DeviceEvent,
    PlantedRecord,
    add_years,
    device_stream,
    new_uuid,
)
from patient_journey.generate.proms import RedcapProject, questionnaire_response
from patient_journey.generate.writers import (
    EHR_DIR,
    REGISTRY_PATH,
    RegistryRows,
    device_body,
    dumps,
    observation_resource,
    updated_at,
)

KINDS: tuple[str, ...] = (
    "malformed_json",
    "missing_required_field",
    "out_of_range_value",
    "duplicate_id",
    "device_case_unmatched",
    "unknown_patient_outcome",
    "unknown_device_type",
    "invalid_choice_code",
)
OBSERVATION_PATH = f"{EHR_DIR}/Observation.000.ndjson"
QUESTIONNAIRE_RESPONSE_PATH = f"{EHR_DIR}/QuestionnaireResponse.000.ndjson"


def plant_count(bad_rate: float, patients: int) -> int:
    """How many instances of each bad kind to plant."""
    return 0 if bad_rate == 0 else max(1, round(bad_rate * patients))


def plant_fhir(
    lines: list[bytes], cohort: Cohort, rng: random.Random, n: int
) -> tuple[list[bytes], list[PlantedRecord]]:
    """Insert malformed, subject-less and duplicate-id Observation lines into ``lines``."""
    entries: list[tuple[bytes, tuple[str, str] | None]] = [(line, None) for line in lines]

    def sample_observation() -> dict[str, object]:
        j = rng.choice(cohort.journeys)
        return observation_resource(j, rng.choice(j.observations))

    for _ in range(n):
        line = dumps(sample_observation())
        entries.insert(
            rng.randint(0, len(entries)),
            (line[: len(line) // 2], ("malformed_json", "")),
        )
    for _ in range(n):
        res = sample_observation()
        res["id"] = new_uuid(rng)
        del res["subject"]
        entries.insert(
            rng.randint(0, len(entries)),
            (dumps(res), ("missing_required_field", "subject")),
        )
    for _ in range(n):
        good = [i for i, (_, tag) in enumerate(entries) if tag is None]
        pos = rng.choice(good)
        res = orjson.loads(entries[pos][0])
        res["valueQuantity"]["value"] = round(res["valueQuantity"]["value"] + rng.uniform(1, 5), 1)
        entries.insert(rng.randint(pos + 1, len(entries)), (dumps(res), ("duplicate_id", "id")))

    planted = [
        PlantedRecord(
            tag[0],
            "fhir",
            OBSERVATION_PATH,
            str(lineno),
            "observation",
            tag[1],
            "quarantined",
        )
        for lineno, (_, tag) in enumerate(entries, start=1)
        if tag is not None
    ]
    planted.sort(key=lambda p: (KINDS.index(p.kind), int(p.locator)))
    return [line for line, _ in entries], planted


def plant_device_streams(cohort: Cohort, rng: random.Random, n: int) -> list[DeviceEvent]:
    """Device streams for case ids (CASE-9xxxxx) that have no Procedure."""
    events: list[DeviceEvent] = []
    for number in sorted(rng.sample(range(90_000, 100_000), n)):
        device = rng.choice(cohort.devices)
        day = SURGERY_FIRST_DAY + timedelta(days=rng.randrange(SURGERY_DAYS))
        start = datetime(
            day.year,
            day.month,
            day.day,
            rng.randint(7, 16),
            rng.randint(0, 59),
            tzinfo=UTC,
        )
        stop = start + timedelta(minutes=rng.randint(30, 90))
        events.extend(device_stream(rng, f"CASE-{number}", device, start, stop, 2))
    return events


@dataclass(frozen=True)
class PlantedMessage:
    """A device message whose body is replaced, and what it plants."""

    event: DeviceEvent
    body: dict[str, object]
    kind: str
    table: str
    field: str
    outcome: str


def plant_device_messages(cohort: Cohort, rng: random.Random, n: int) -> list[PlantedMessage]:
    """Messages of a device type no template knows, and tourniquet pressures out of range."""
    planted: list[PlantedMessage] = []
    for _ in range(n):
        j = rng.choice(cohort.journeys)
        event = rng.choice([e for e in j.events if e.event_type != "self_test"])
        body = {**device_body(event), "deviceType": "smoke-evacuator", "eventType": "filter_change"}
        planted.append(
            PlantedMessage(event, body, "unknown_device_type", "device_event", "deviceType", "quarantined")
        )
    with_tourniquet = [
        j for j in cohort.journeys if any(d.model.device_type == "tourniquet" for d in j.devices)
    ]
    for _ in range(n if with_tourniquet else 0):
        j = rng.choice(with_tourniquet)
        event = rng.choice([e for e in j.events if e.device.model.device_type == "tourniquet"])
        body = {
            **device_body(event),
            "eventType": "tourniquet_pressure",
            "value": round(rng.uniform(900.0, 2000.0), 1),
            "unit": "mm[Hg]",
        }
        planted.append(
            PlantedMessage(event, body, "out_of_range_value", "device_event", "value", "quarantined")
        )
    return planted


def device_planted(
    paths: list[tuple[str, int]], messages: list[PlantedMessage], message_paths: list[tuple[str, int]]
) -> list[PlantedRecord]:
    records = [
        PlantedRecord("device_case_unmatched", "device", path, str(index), "device_message", "caseId", "held")
        for path, index in paths
    ]
    records += [
        PlantedRecord(m.kind, "device", path, str(index), m.table, m.field, m.outcome)
        for m, (path, index) in zip(messages, message_paths, strict=True)
    ]
    return records


def plant_registry(rows: RegistryRows, cohort: Cohort, rng: random.Random, n: int) -> list[PlantedRecord]:
    """Append out-of-range PROM scores and outcome rows for patients unknown to the EHR."""
    planted: list[PlantedRecord] = []
    candidates = [
        j
        for j in cohort.journeys
        if j.prom_source == "registry" and all(p.timepoint != "12m" for p in j.proms)
    ] or cohort.journeys
    for _ in range(n):
        j = rng.choice(candidates)
        pk = len(rows.proms) + 1
        collected = j.surgery_start.date() + timedelta(days=365 + rng.randint(-14, 14))
        score = round(rng.uniform(101.0, 250.0), 1)
        rows.proms.append(
            (
                pk,
                j.registry_id,
                j.instrument,
                "12m",
                score,
                collected.isoformat(),
                updated_at(collected, pk),
            )
        )
        planted.append(
            PlantedRecord(
                "out_of_range_value",
                "registry",
                REGISTRY_PATH,
                f"prom_response:{pk}",
                "prom_response",
                "score",
                "quarantined",
            )
        )

    used = {j.mrn for j in cohort.journeys}
    for _ in range(n):
        mrn = f"MRN{rng.randint(10_000_000, 99_999_999):08d}"
        while mrn in used:
            mrn = f"MRN{rng.randint(10_000_000, 99_999_999):08d}"
        used.add(mrn)
        surgery_day = SURGERY_FIRST_DAY + timedelta(days=rng.randrange(SURGERY_DAYS))
        birth = add_years(surgery_day, -rng.randint(50, 85)) - timedelta(days=rng.randint(0, 300))
        registry_id = len(rows.patients) + 1
        rows.patients.append(
            (
                registry_id,
                mrn,
                birth.isoformat(),
                "SITE-01",
                updated_at(surgery_day, registry_id),
            )
        )
        pk = len(rows.proms) + 1
        collected = surgery_day - timedelta(days=rng.randint(1, 60))
        rows.proms.append(
            (
                pk,
                registry_id,
                rng.choice(("KOOS JR", "HOOS JR")),
                "baseline",
                round(rng.uniform(20.0, 70.0), 1),
                collected.isoformat(),
                updated_at(collected, pk),
            )
        )
        for locator, table, fld in (
            (f"registry_patient:{registry_id}", "registry_patient", "mrn"),
            (f"prom_response:{pk}", "prom_response", "registry_id"),
        ):
            planted.append(
                PlantedRecord(
                    "unknown_patient_outcome",
                    "registry",
                    REGISTRY_PATH,
                    locator,
                    table,
                    fld,
                    "held",
                )
            )
    return planted


def plant_questionnaire_responses(
    lines: list[bytes], cohort: Cohort, rng: random.Random, n: int
) -> tuple[list[bytes], list[PlantedRecord]]:
    """Insert extra QuestionnaireResponses with one answer outside its item's range (the
    catalog's rule item_in_range); the good responses are all kept."""
    candidates = [(j, p) for j in cohort.journeys if j.prom_source == "fhir" for p in j.proms]
    candidates = candidates or [(j, p) for j in cohort.journeys for p in j.proms]
    entries: list[tuple[bytes, bool]] = [(line, False) for line in lines]
    for _ in range(n if candidates else 0):
        j, p = rng.choice(candidates)
        resource = questionnaire_response(j, p, new_uuid(rng))
        item = rng.choice([item for item in resource["item"] if "answer" in item])
        item["answer"] = [{"valueInteger": rng.choice((-1, 5, 7, 9))}]
        entries.insert(rng.randint(0, len(entries)), (dumps(resource), True))
    planted = [
        PlantedRecord(
            "out_of_range_value",
            "fhir",
            QUESTIONNAIRE_RESPONSE_PATH,
            str(lineno),
            "fhir_prom",
            "item.answer",
            "quarantined",
        )
        for lineno, (_, bad) in enumerate(entries, start=1)
        if bad
    ]
    return [line for line, _ in entries], planted


def plant_redcap(project: RedcapProject, rng: random.Random, n: int) -> list[PlantedRecord]:
    """Put a code that is not one of the field's choices into the ASA class of enrolment rows
    (rejected at read under redcap_choice_valid; the rest of the row still loads)."""
    rows = [index for index, row in enumerate(project.records) if row["asa_class"]]
    planted: list[PlantedRecord] = []
    for index in sorted(rng.sample(rows, min(n, len(rows)))):
        project.records[index]["asa_class"] = rng.choice(("0", "5", "9"))
        planted.append(
            PlantedRecord(
                "invalid_choice_code",
                "redcap",
                project.records_path,
                str(project.line_of(index)),
                "redcap_prom",
                "asa_class",
                "quarantined",
            )
        )
    return planted
