"""Deterministic synthetic surgical patient journeys in the landing formats of docs/sources.md."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from patient_journey.generate.bad_records import (
    KINDS,
    device_planted,
    plant_count,
    plant_device_messages,
    plant_device_streams,
    plant_fhir,
    plant_questionnaire_responses,
    plant_redcap,
    plant_registry,
)
from patient_journey.generate.fhir_layouts import fhir_variants, write_fhir_variants
from patient_journey.generate.model import build_cohort
from patient_journey.generate.proms import redcap_project, write_redcap
from patient_journey.generate.synthea import write_synthea
from patient_journey.generate.writers import (
    encounter_resource,
    fhir_lines,
    registry_rows,
    write_device,
    write_fhir,
    write_ground_truth,
    write_registry,
)
from patient_journey.sources.plugins import PLUGINS

__all__ = ["FHIR_LAYOUTS", "GenerationResult", "generate"]

# The first EHR export: bulk NDJSON (Synthea's bulk layout), or Synthea's own transaction Bundles
# per patient, named after the patient (patient_journey.generate.synthea).
FHIR_LAYOUTS = ("bulk", "synthea")


@dataclass(frozen=True)
class GenerationResult:
    out: Path
    patients: int
    episodes: int
    resources: dict[str, int]  # NDJSON lines written per FHIR resource type (bad lines included)
    device_messages: int  # Avro records written (planted ones included)
    planted: dict[str, int]  # planted bad records (rows of planted_bad_records.csv) per kind
    derived: dict[str, int]  # what the sources derived from the cohort wrote (Source.generate)


def generate(
    out: Path, patients: int, seed: int, bad_rate: float = 0.02, fhir_layout: str = "bulk"
) -> GenerationResult:
    """Write a synthetic landing zone and its ground truth under ``out``.

    Same ``seed`` (and arguments) -> byte-identical files. Refuses to write into an existing
    ``out/landing`` so that two runs never mix. With ``fhir_layout="synthea"`` the first EHR
    export is one transaction Bundle per patient; the malformed Observation and
    QuestionnaireResponse lines planted in bulk NDJSON have no place there and are not planted.
    """
    if fhir_layout not in FHIR_LAYOUTS:
        raise ValueError(f"fhir_layout must be one of {', '.join(FHIR_LAYOUTS)}")
    out = Path(out)
    landing = out / "landing"
    if landing.exists():
        raise FileExistsError(f"{landing} already exists; generate into an empty output folder")
    if not 0.0 <= bad_rate <= 1.0:
        raise ValueError("bad_rate must be between 0 and 1")

    cohort = build_cohort(patients, seed)
    n_bad = plant_count(bad_rate, patients)
    bad_rng = random.Random(seed * 1_000_003 + 7919)  # separate stream: good data never depends on it

    lines = fhir_lines(cohort)
    variants = fhir_variants(cohort, lines, encounter_resource)
    n_bad_fhir = n_bad if fhir_layout == "bulk" else 0
    lines["Observation"], planted = plant_fhir(lines["Observation"], cohort, bad_rng, n_bad_fhir)
    prom_bad_rng = random.Random(seed * 1_000_003 + 104_729)  # PROM plants: no other plant shifts
    lines["QuestionnaireResponse"], planted_qr = plant_questionnaire_responses(
        lines["QuestionnaireResponse"], cohort, prom_bad_rng, n_bad_fhir
    )
    planted += planted_qr
    redcap = redcap_project(cohort)
    planted_redcap = plant_redcap(redcap, prom_bad_rng, n_bad)

    good_events = [e for j in cohort.journeys for e in j.events]
    bad_events = plant_device_streams(cohort, bad_rng, n_bad)
    bad_messages = plant_device_messages(cohort, bad_rng, n_bad)
    rows = registry_rows(cohort)
    planted_registry = plant_registry(rows, cohort, bad_rng, n_bad)

    landing.mkdir(parents=True)
    resources = write_fhir(landing, lines) if fhir_layout == "bulk" else write_synthea(landing, cohort, lines)
    fhir_files = write_fhir_variants(landing, variants)
    events = good_events + bad_events + [m.event for m in bad_messages]
    first_message = len(good_events) + len(bad_events)
    bodies = {first_message + i: m.body for i, m in enumerate(bad_messages)}
    blobs, where = write_device(landing, events, bodies)
    planted += device_planted(where[len(good_events) : first_message], bad_messages, where[first_message:])
    planted += planted_registry
    write_registry(landing, rows)
    redcap_rows = write_redcap(landing, redcap)
    planted += planted_redcap
    derived: dict[str, int] = {}  # sources derived from the cohort with no random draws
    for plugin in PLUGINS.values():
        derived |= plugin.generate(cohort, landing)

    planted_counts = {kind: sum(1 for p in planted if p.kind == kind) for kind in KINDS}
    device_messages = len(events)
    generation = {
        "seed": seed,
        "patients": patients,
        "bad_rate": bad_rate,
        "fhir_layout": fhir_layout,
        "counts": {
            "episodes": len(cohort.journeys),
            "fhir_resources": resources,
            "fhir_variant_files": fhir_files,
            "device_messages": device_messages,
            "device_blobs": blobs,
            "or_devices": len(cohort.devices),
            "registry": rows.counts(),
            "redcap_records": redcap_rows,
            **derived,
            "planted_instances_per_kind": n_bad,
            "planted": planted_counts,
        },
    }
    write_ground_truth(out, cohort, planted, generation)
    return GenerationResult(
        out=out,
        patients=patients,
        episodes=len(cohort.journeys),
        resources=resources,
        device_messages=device_messages,
        planted=planted_counts,
        derived=derived,
    )
