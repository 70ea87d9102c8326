"""The first EHR export in Synthea's own FHIR layout, instead of bulk NDJSON.

Synthea (the most used synthetic EHR) writes one transaction Bundle per patient, named after the
patient (``Given123_Family456_<patient uuid>.json``), whose entries carry ``urn:uuid:<id>``
``fullUrl``s and reference one another by them, and whose references to the hospital and its
clinicians are conditional (``Organization?identifier=https://github.com/synthetichealth/synthea|<id>``),
resolved against the Organizations and Practitioners of their own Bundles
(``hospitalInformation<time>.json``, ``practitionerInformation<time>.json``). Names get digits, as
Synthea's do, so that each is a distinctive string a privacy test can look for.

The same resources as the bulk layout (the cohort and the ground truth are unchanged); the
operating-room Devices, which belong to no patient, go into the hospital's Bundle.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import orjson

from patient_journey.generate.model import Cohort, Journey

SYNTHEA_DIR = "ehr/synthea"
SYNTHEA_SYSTEM = "https://github.com/synthetichealth/synthea"
ORGANIZATION_ID = "ef6ab57c-ed94-3dbe-9861-812d515918b3"
PRACTITIONER_ID = "0000016d-3a85-4cca-0000-0000000000b4"
INFO_TIME = "1739404800000"  # Synthea suffixes its information Bundles with the export time


def synthea_names(journey: Journey) -> tuple[str, str]:
    """The patient's given and family names with digits, as Synthea writes them."""
    rng = random.Random(f"synthea-names:{journey.patient_id}")
    return f"{journey.given}{rng.randint(100, 999)}", f"{journey.family}{rng.randint(100, 999)}"


def _patient_of(resource: dict[str, Any]) -> str | None:
    if resource["resourceType"] == "Patient":
        return str(resource["id"])
    for field in ("subject", "patient"):
        reference = (resource.get(field) or {}).get("reference", "")
        if isinstance(reference, str) and reference.startswith("Patient/"):
            return reference.split("/", 1)[1]
    return None


def _by_urn(node: Any, inside: set[str]) -> Any:
    """``node`` with every relative reference to a resource of the same Bundle as its urn:uuid."""
    if isinstance(node, dict):
        changed = {key: _by_urn(value, inside) for key, value in node.items()}
        reference = changed.get("reference")
        if isinstance(reference, str) and reference in inside:
            changed["reference"] = f"urn:uuid:{reference.split('/', 1)[1]}"
        return changed
    if isinstance(node, list):
        return [_by_urn(item, inside) for item in node]
    return node


def _conditional(resource: dict[str, Any]) -> dict[str, Any]:
    """Where Synthea references the hospital and the clinician: conditionally, by identifier."""
    organization = {"reference": f"Organization?identifier={SYNTHEA_SYSTEM}|{ORGANIZATION_ID}"}
    practitioner = {"reference": f"Practitioner?identifier=http://hl7.org/fhir/sid/us-npi|{PRACTITIONER_ID}"}
    if resource["resourceType"] == "Encounter":
        return {**resource, "serviceProvider": organization, "participant": [{"individual": practitioner}]}
    if resource["resourceType"] == "Procedure":
        return {**resource, "performer": [{"actor": practitioner}]}
    return resource


def _transaction(resources: list[dict[str, Any]]) -> dict[str, Any]:
    inside = {f"{r['resourceType']}/{r['id']}" for r in resources}
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": f"urn:uuid:{r['id']}",
                "resource": _by_urn(_conditional(r), inside),
                "request": {"method": "POST", "url": r["resourceType"]},
            }
            for r in resources
        ],
    }


def _information(resources: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {
                "fullUrl": f"urn:uuid:{r['id']}",
                "resource": r,
                "request": {
                    "method": "POST",
                    "url": r["resourceType"],
                    "ifNoneExist": f"identifier={SYNTHEA_SYSTEM}|{r['id']}",
                },
            }
            for r in resources
        ],
    }


def write_synthea(landing: Path, cohort: Cohort, lines: dict[str, list[bytes]]) -> dict[str, int]:
    """Write the resources of ``lines`` as Synthea does; returns resources written per type."""
    folder = landing / SYNTHEA_DIR
    folder.mkdir(parents=True, exist_ok=True)
    journeys = {j.patient_id: j for j in cohort.journeys}
    per_patient: dict[str, list[dict[str, Any]]] = {patient: [] for patient in journeys}
    unowned: list[dict[str, Any]] = []
    counts: dict[str, int] = {}
    for resource_type, typed in lines.items():
        for line in typed:
            resource = orjson.loads(line)
            counts[resource_type] = counts.get(resource_type, 0) + 1
            patient = _patient_of(resource)
            per_patient.get(patient or "", unowned).append(resource)
    for patient, resources in per_patient.items():
        given, family = synthea_names(journeys[patient])
        for resource in resources:
            if resource["resourceType"] == "Patient":
                resource["name"] = [{"use": "official", "family": family, "given": [given]}]
        bundle = _transaction(resources)
        (folder / f"{given}_{family}_{patient}.json").write_bytes(orjson.dumps(bundle))
    organization = {
        "resourceType": "Organization",
        "id": ORGANIZATION_ID,
        "identifier": [{"system": SYNTHEA_SYSTEM, "value": ORGANIZATION_ID}],
        "name": "Hospital Example Orthopaedics",
    }
    practitioner = {
        "resourceType": "Practitioner",
        "id": PRACTITIONER_ID,
        "identifier": [{"system": "http://hl7.org/fhir/sid/us-npi", "value": PRACTITIONER_ID}],
    }
    hospital = _information([organization, *unowned])
    (folder / f"hospitalInformation{INFO_TIME}.json").write_bytes(orjson.dumps(hospital))
    (folder / f"practitionerInformation{INFO_TIME}.json").write_bytes(
        orjson.dumps(_information([practitioner]))
    )
    counts["Organization"] = 1
    counts["Practitioner"] = 1
    return counts
