"""FHIR R4: bulk export NDJSON (one resource per line, a file per type, optional gzip) and Bundles.

Every line or Bundle entry becomes one bronze record whose entity is the resource type. A line
that is not JSON, is not a resource, or whose type disagrees with its file is rejected with the
rule it broke and its line number.
"""

from __future__ import annotations

import gzip
import re
from collections.abc import Iterator

import orjson

from patient_journey.sources.records import Extraction, InputSelection, new_files
from patient_journey.storage import FileInfo, Storage

SOURCE = "fhir"
NDJSON_SUFFIXES = (".ndjson", ".ndjson.gz")
BUNDLE_SUFFIXES = (".json",)
# Patient.000.ndjson (Synthea), Patient-1-1.ndjson (Azure $export), Patient.ndjson
_TYPE_FROM_NAME = re.compile(r"^([A-Z][A-Za-z]+)(?:[.-].*)?\.ndjson(?:\.gz)?$")


def resource_type_of_file(url: str) -> str | None:
    match = _TYPE_FROM_NAME.match(url.rsplit("/", 1)[-1])
    return match.group(1) if match else None


def _lines(data: bytes) -> Iterator[tuple[int, bytes]]:
    for number, line in enumerate(data.split(b"\n"), start=1):
        if line.strip():
            yield number, line.rstrip(b"\r")


def _decode_error(exc: orjson.JSONDecodeError) -> str:
    # orjson's message can quote the input; keep only the position.
    return f"not well-formed JSON (column {exc.colno})"


def _add_resource(
    out: Extraction, resource: object, raw: bytes, uri: str, offset: int, expected: str | None
) -> None:
    entity = expected or "unknown"
    if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
        out.add_reject(entity, uri, offset, "fhir_resource_type_present", "no resourceType")
        return
    resource_type: str = resource["resourceType"]
    if expected is not None and resource_type != expected:
        out.add_reject(expected, uri, offset, "fhir_resource_type_matches_file", f"found {resource_type}")
        return
    resource_id = resource.get("id")
    record_id = resource_id if isinstance(resource_id, str) else ""
    out.add_record(resource_type, record_id, raw.decode(), uri, offset, raw)


def extract_ndjson(out: Extraction, file: FileInfo, data: bytes) -> None:
    expected = resource_type_of_file(file.url)
    if file.url.endswith(".gz"):
        data = gzip.decompress(data)
    for number, line in _lines(data):
        try:
            resource = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            out.add_reject(expected or "unknown", file.url, number, "json_well_formed", _decode_error(exc))
            continue
        _add_resource(out, resource, line, file.url, number, expected)


def extract_bundle_or_resource(out: Extraction, file: FileInfo, data: bytes) -> None:
    """A JSON file: a Bundle (each entry.resource is a record, offset = entry number) or one resource."""
    try:
        document = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        out.add_reject("Bundle", file.url, 0, "json_well_formed", _decode_error(exc))
        return
    if isinstance(document, dict) and document.get("resourceType") == "Bundle":
        entries = document.get("entry") or []
        if not isinstance(entries, list):
            out.add_reject("Bundle", file.url, 0, "fhir_bundle_entry_list", "entry is not a list")
            return
        for number, entry in enumerate(entries, start=1):
            resource = entry.get("resource") if isinstance(entry, dict) else None
            if resource is None:
                # Response bundles carry entries with only a response: nothing to load.
                out.add_reject("Bundle", file.url, number, "fhir_bundle_entry_has_resource", "no resource")
                continue
            _add_resource(out, resource, orjson.dumps(resource), file.url, number, None)
        return
    _add_resource(out, document, data, file.url, 1, None)


def extract(landing: Storage, prefix: str, seen: InputSelection, run_id: str) -> Extraction:
    """Read every FHIR file under ``prefix`` that the ledger has not seen with this content."""
    out = Extraction(SOURCE, run_id)
    for file, data in new_files(out, landing, prefix, NDJSON_SUFFIXES + BUNDLE_SUFFIXES, seen):
        name = file.url.rsplit("/", 1)[-1]
        if name == "manifest.json":
            continue  # export metadata: recorded in the ledger, no records
        if name.endswith(NDJSON_SUFFIXES):
            extract_ndjson(out, file, data)
        else:
            extract_bundle_or_resource(out, file, data)
    return out
