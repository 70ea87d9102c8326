"""Plant bad records on top of the good data (they never change an episode fact)."""

from __future__ import annotations

import random
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
from patient_journey.generate.writers import (
    EHR_DIR,
    REGISTRY_PATH,
    RegistryRows,
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
)
OBSERVATION_PATH = f"{EHR_DIR}/Observation.000.ndjson"


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


def device_planted(paths: list[tuple[str, int]]) -> list[PlantedRecord]:
    return [
        PlantedRecord(
            "device_case_unmatched",
            "device",
            path,
            str(index),
            "device_message",
            "caseId",
            "held",
        )
        for path, index in paths
    ]


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
