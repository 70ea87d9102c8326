"""The FHIR layouts and resource histories a real EHR feed has, on top of the first bulk export.

``journey generate`` writes a first bulk export in Synthea's layout (``Type.000.ndjson``). This
module moves part of the same resources into the other layouts and adds their history, so that
every variant the reader must handle is in the landing zone and the ground truth still holds
only if each is handled right:

* a second, incremental export in Azure's layout (``Type-1-1.ndjson``, its own folder and
  manifest) with corrected Procedures (a later ``meta.lastUpdated`` replaces the first export's
  draft), Observations gzipped, Patients delivered again unchanged, and a ``deleted`` file of
  Bundles removing Encounters entered in error;
* transaction Bundles (POST of follow-up Encounters and their Observations; DELETE of an
  Encounter entered in error), a batch Bundle (PUT of Conditions) and a collection Bundle of
  stale Procedure versions (an older ``meta.lastUpdated`` arriving later must be ignored).

Choices come from their own random stream, so the cohort itself is unchanged.
"""

from __future__ import annotations

import gzip
import random
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import orjson

from patient_journey.generate.model import EXPORT_TIME, Cohort, Encounter, Journey, iso, new_uuid

SECOND_EXPORT = "ehr/export-20250302T000000Z"
BUNDLES_DIR = "ehr/bundles"
FIRST_UPDATE = iso(EXPORT_TIME)
SECOND_UPDATE = iso(EXPORT_TIME + timedelta(days=1))
STALE_UPDATE = iso(EXPORT_TIME - timedelta(days=30))


@dataclass
class FhirVariants:
    second_export: dict[str, list[bytes]] = field(default_factory=dict)
    deleted: list[bytes] = field(default_factory=list)  # Bundle lines of the second export
    bundles: dict[str, dict[str, Any]] = field(default_factory=dict)  # file name -> Bundle


def _id(line: bytes) -> str:
    return str(orjson.loads(line)["id"])


def _bundle(kind: str, entries: list[dict[str, Any]], when: str) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": kind, "timestamp": when, "entry": entries}


def _with(line: bytes, **changes: Any) -> dict[str, Any]:
    resource = orjson.loads(line)
    resource.update(changes)
    return dict(resource)


def _take(lines: list[bytes], ids: set[str]) -> dict[str, bytes]:
    """Remove the lines whose resource id is in ``ids``; returns them by id, in line order."""
    taken: dict[str, bytes] = {}
    kept: list[bytes] = []
    for line in lines:
        resource_id = _id(line)
        if resource_id in ids:
            taken[resource_id] = line
        else:
            kept.append(line)
    lines[:] = kept
    return taken


def _entered_in_error(rng: random.Random, j: Journey) -> Encounter:
    start = j.admission.end + timedelta(days=rng.randint(3, 20), hours=rng.randint(0, 8))
    return Encounter(new_uuid(rng), "readmission", "IMP", start, start + timedelta(days=2))


def fhir_variants(cohort: Cohort, lines: dict[str, list[bytes]], encounter: Any) -> FhirVariants:
    """Move resources out of ``lines`` (the first export) into the other layouts; see above.

    ``encounter`` serialises an Encounter of a journey (the writers' function).
    """
    rng = random.Random(f"fhir-layout:{cohort.seed}:{len(cohort.journeys)}")
    out = FhirVariants(second_export={"Patient": [], "Procedure": [], "Observation": []})
    journeys = list(cohort.journeys)
    by_procedure = {j.procedure_id: j for j in journeys}

    # A. Procedures corrected after the first export: a draft end time first, the real one later.
    corrected = {j.procedure_id for j in journeys if rng.random() < 0.10}
    for index, line in enumerate(lines["Procedure"]):
        pid = _id(line)
        if pid in corrected:
            j = by_procedure[pid]
            draft = _with(
                line,
                performedPeriod={
                    "start": iso(j.surgery_start),
                    "end": iso(j.surgery_end - timedelta(minutes=20)),
                },
            )
            lines["Procedure"][index] = orjson.dumps(draft)
            out.second_export["Procedure"].append(
                orjson.dumps(_with(line, meta={"lastUpdated": SECOND_UPDATE}))
            )

    # B. Stale versions arriving late, in a collection Bundle.
    stale = []
    for line in lines["Procedure"]:
        if rng.random() < 0.05:
            j = by_procedure[_id(line)]
            old = _with(
                line,
                meta={"lastUpdated": STALE_UPDATE},
                performedPeriod={
                    "start": iso(j.surgery_start),
                    "end": iso(j.surgery_end - timedelta(minutes=45)),
                },
            )
            stale.append({"fullUrl": f"urn:uuid:{old['id']}", "resource": old})
    out.bundles["collection-stale-procedures.json"] = _bundle("collection", stale, SECOND_UPDATE)

    # C. Encounters entered in error: in the first export, deleted afterwards (bulk or Bundle).
    deletions_in_bundle = []
    for j in journeys:
        if rng.random() < 0.06:
            wrong = _entered_in_error(rng, j)
            lines["Encounter"].append(orjson.dumps(encounter(j, wrong)))
            request = {"request": {"method": "DELETE", "url": f"Encounter/{wrong.id}"}}
            if rng.random() < 0.5:
                out.deleted.append(orjson.dumps(_bundle("transaction", [request], SECOND_UPDATE)))
            else:
                deletions_in_bundle.append(request)

    # D. Follow-up visits posted in transaction Bundles (one per patient).
    posted: list[tuple[Journey, list[str]]] = []
    for j in journeys:
        follow_ups = {e.id for e in j.encounters if e.purpose == "follow-up"}
        if not follow_ups or rng.random() >= 0.05:
            continue
        encounters = [e.id for e in j.encounters if e.id in follow_ups]
        posted.append((j, encounters + [o.id for o in j.observations if o.encounter_id in follow_ups]))
    moving = {resource_id for _, ids in posted for resource_id in ids}
    moved = _take(lines["Encounter"], moving) | _take(lines["Observation"], moving)
    for j, ids in posted:
        entries: list[dict[str, Any]] = []
        for resource_id in ids:
            resource = orjson.loads(moved[resource_id])
            post = {"method": "POST", "url": resource["resourceType"]}
            entries.append({"fullUrl": f"urn:uuid:{resource_id}", "resource": resource, "request": post})
        out.bundles[f"transaction-{j.index:05d}.json"] = _bundle("transaction", entries, FIRST_UPDATE)
    out.bundles["transaction-deletions.json"] = _bundle("transaction", deletions_in_bundle, SECOND_UPDATE)

    # E. Conditions put in one batch Bundle.
    conditions = {j.condition_id for j in journeys if rng.random() < 0.05}
    batch = [
        {"resource": orjson.loads(line), "request": {"method": "PUT", "url": f"Condition/{_id(line)}"}}
        for line in _take(lines["Condition"], conditions).values()
    ]
    out.bundles["batch-conditions.json"] = _bundle("batch", batch, FIRST_UPDATE)

    # F. Observations of some patients only in the second export (gzipped there).
    moved_patients = {j.patient_id for j in journeys if rng.random() < 0.10}
    moved_obs = {o.id for j in journeys if j.patient_id in moved_patients for o in j.observations}
    out.second_export["Observation"] = list(_take(lines["Observation"], moved_obs).values())

    # G. Patients delivered again, unchanged (a repeated export must not duplicate them).
    out.second_export["Patient"] = [line for line in lines["Patient"] if rng.random() < 0.10]
    return out


def write_fhir_variants(landing: Path, variants: FhirVariants) -> dict[str, int]:
    """Write the second export (Azure layout + manifest) and the Bundles; returns files per layout."""
    folder = landing / SECOND_EXPORT
    folder.mkdir(parents=True, exist_ok=True)
    output = []
    for rtype, rows in sorted(variants.second_export.items()):
        name = f"{rtype}-1-1.ndjson"
        data = b"".join(line + b"\n" for line in rows)
        if rtype == "Observation":
            name += ".gz"
            data = gzip.compress(data, mtime=0)
        (folder / name).write_bytes(data)
        output.append(
            {
                "type": rtype,
                "url": f"https://landing.blob.core.windows.net/{SECOND_EXPORT}/{name}",
                "count": len(rows),
            }
        )
    deleted_name = "Bundle-deleted-1-1.ndjson"
    (folder / deleted_name).write_bytes(b"".join(line + b"\n" for line in variants.deleted))
    manifest = {
        "transactionTime": SECOND_UPDATE,
        "request": f"https://fhir.hospital.example.org/$export?_since={FIRST_UPDATE}",
        "requiresAccessToken": True,
        "output": output,
        "deleted": [
            {
                "type": "Bundle",
                "url": f"https://landing.blob.core.windows.net/{SECOND_EXPORT}/{deleted_name}",
                "count": len(variants.deleted),
            }
        ],
        "error": [],
    }
    (folder / "manifest.json").write_bytes(orjson.dumps(manifest, option=orjson.OPT_INDENT_2))
    bundles = landing / BUNDLES_DIR
    bundles.mkdir(parents=True, exist_ok=True)
    for name, bundle in sorted(variants.bundles.items()):
        (bundles / name).write_bytes(orjson.dumps(bundle, option=orjson.OPT_INDENT_2))
    return {"second_export_files": len(output) + 1, "bundles": len(variants.bundles)}
