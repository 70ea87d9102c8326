"""FHIR R4: bulk export NDJSON (one resource per line, a file per type, optional gzip) and Bundles.

Every line or Bundle entry becomes one bronze record whose entity is the resource type. A line
that is not JSON, is not a resource, or whose type disagrees with its file is rejected with the
rule it broke and its line number.
"""

from __future__ import annotations

import gzip
import re
from collections.abc import Iterator
from typing import Any

import orjson

from patient_journey.sources.records import Extraction, InputSelection, new_files
from patient_journey.storage import FileInfo, Storage

SOURCE = "fhir"
NDJSON_SUFFIXES = (".ndjson", ".ndjson.gz")
BUNDLE_SUFFIXES = (".json",)
# Patient.000.ndjson (Synthea), Patient-1-1.ndjson (Azure $export), Patient.ndjson
_TYPE_FROM_NAME = re.compile(r"^([A-Z][A-Za-z]+)(?:[.-].*)?\.ndjson(?:\.gz)?$")
_DELETE_URL = re.compile(r"^(?:.*/)?([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})(?:/_history/[^/]+)?$")


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


def deletion(resource_type: str, resource_id: str, deleted_at: str | None) -> bytes:
    """The bronze payload of a deleted resource: staging drops every version up to this one."""
    meta = {"lastUpdated": deleted_at} if deleted_at else {}
    return orjson.dumps({"resourceType": resource_type, "id": resource_id, "meta": meta, "_deleted": True})


def _bundle_time(bundle: dict[str, Any]) -> str | None:
    for value in (bundle.get("timestamp"), (bundle.get("meta") or {}).get("lastUpdated")):
        if isinstance(value, str):
            return value
    return None


def _add_delete(
    out: Extraction, entry: dict[str, Any], deleted_at: str | None, uri: str, offset: int
) -> None:
    url = (entry.get("request") or {}).get("url")
    match = _DELETE_URL.match(url) if isinstance(url, str) else None
    if match is None:
        out.add_reject("Bundle", uri, offset, "fhir_delete_names_resource", "request.url is not Type/id")
        return
    raw = deletion(match.group(1), match.group(2), deleted_at)
    out.add_record(match.group(1), match.group(2), raw.decode(), uri, offset, raw)


def extract_bundle(out: Extraction, bundle: dict[str, Any], uri: str, offset: int | None) -> None:
    """Each entry's resource is a record; a DELETE entry (transaction or batch, and the Bundles of
    a bulk export's ``deleted`` files) removes its resource. ``offset`` is the NDJSON line of a
    Bundle on one line; for a Bundle file, each entry's number is its offset."""
    entries = bundle.get("entry") or []
    if not isinstance(entries, list):
        out.add_reject("Bundle", uri, offset or 0, "fhir_bundle_entry_list", "entry is not a list")
        return
    deleted_at = _bundle_time(bundle)
    for number, entry in enumerate(entries, start=1):
        where = offset if offset is not None else number
        if not isinstance(entry, dict):
            out.add_reject("Bundle", uri, where, "fhir_bundle_entry_has_resource", "entry is not an object")
            continue
        if (entry.get("request") or {}).get("method") == "DELETE":
            _add_delete(out, entry, deleted_at, uri, where)
            continue
        resource = entry.get("resource")
        if resource is None:
            # Response bundles carry entries with only a response: nothing to load.
            out.add_reject("Bundle", uri, where, "fhir_bundle_entry_has_resource", "no resource")
            continue
        _add_resource(out, resource, orjson.dumps(resource), uri, where, None)


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
        if expected == "Bundle" and isinstance(resource, dict) and resource.get("resourceType") == "Bundle":
            extract_bundle(out, resource, file.url, number)
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
        extract_bundle(out, document, file.url, None)
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
