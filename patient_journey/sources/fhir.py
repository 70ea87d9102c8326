"""FHIR R4: bulk export NDJSON (one resource per line, a file per type, optional gzip) and Bundles.

Every line or Bundle entry becomes one bronze record whose entity is the resource type. No input
stops a load: whatever cannot be read becomes a reject with its rule and position, and the rest
of the input still loads. The rules:

- ``gzip_readable``: a ``.gz`` file that is not gzip (offset 0), or whose stream is corrupt or
  ends early (offset: the line after the last whole line; the lines before it load);
- ``utf8_valid``, ``json_well_formed``, ``json_nesting_depth``, ``json_number_in_range``: a line
  (or Bundle file) that is not UTF-8, not JSON, nested deeper than the reader's limit, or holds a
  number beyond a 64-bit float; a UTF-8 byte order mark is accepted;
- ``fhir_resource_type_present``, ``fhir_resource_type_matches_file``: not a resource, or not the
  type its bulk file is named after;
- ``fhir_field_type``: a field the pipeline reads has the wrong JSON type (``id``, ``meta``,
  ``meta.lastUpdated``; in a Bundle ``entry``, ``entry.request``, ``entry.fullUrl``);
- ``fhir_bundle_entry_has_resource``, ``fhir_delete_names_resource``: Bundle entries that carry
  nothing to load.

A resource without an ``id`` gets a stable one of its own (``~`` and a hash of its input, position
and content), so distinct id-less resources are never taken for versions of one another.

References inside a Bundle are resolved as FHIR defines them: an entry's ``fullUrl``
(``urn:uuid:``, ``urn:oid:`` or an absolute URL) referenced by another entry becomes the
relative ``Type/id`` of that entry's resource, and a conditional reference
(``Patient?identifier=system|value``, as transaction Bundles such as Synthea's write them) becomes
the entry whose resource carries that identifier. Staging reads every reference as ``Type/id``
(an absolute URL's last two segments, ``_history`` dropped).
"""

from __future__ import annotations

import codecs
import hashlib
import re
import zlib
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qsl

import orjson

from patient_journey.contracts import TableContract, silver_contract
from patient_journey.journey import JourneyParts
from patient_journey.linkage import IdentityRelation, LinkSpec
from patient_journey.settings import JourneySettings
from patient_journey.sources.records import Extraction, InputSelection, read_new_files
from patient_journey.sources.source import ExtractJob, Source
from patient_journey.staging import (
    PROM_SCORE_COLUMNS,
    JsonText,
    StagedTable,
    Versions,
    declared,
    json_fields,
    timestamp,
)
from patient_journey.storage import FileInfo, Storage

SOURCE = "fhir"
NDJSON_SUFFIXES = (".ndjson", ".ndjson.gz")
BUNDLE_SUFFIXES = (".json",)
# Patient.000.ndjson (Synthea), Patient-1-1.ndjson (Azure $export), Patient.ndjson
_TYPE_FROM_NAME = re.compile(r"^([A-Z][A-Za-z]+)(?:[.-].*)?\.ndjson(?:\.gz)?$")
_DELETE_URL = re.compile(r"^(?:.*/)?([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})(?:/_history/[^/]+)?$")
_BOM = b"\xef\xbb\xbf"
_GZIP_MAGIC = b"\x1f\x8b"

RULE_GZIP = "gzip_readable"
RULE_UTF8 = "utf8_valid"
RULE_JSON = "json_well_formed"
RULE_DEPTH = "json_nesting_depth"
RULE_NUMBER = "json_number_in_range"
RULE_TYPE_PRESENT = "fhir_resource_type_present"
RULE_TYPE_MATCHES_FILE = "fhir_resource_type_matches_file"
RULE_FIELD_TYPE = "fhir_field_type"
RULE_ENTRY_HAS_RESOURCE = "fhir_bundle_entry_has_resource"
RULE_DELETE_NAMES_RESOURCE = "fhir_delete_names_resource"
# orjson serialises at most this many levels; a resource of a Bundle is serialised again.
MAX_DEPTH = 254


class Unreadable(Exception):
    """One record that cannot be read: the rule it breaks and a detail without its content."""

    def __init__(self, rule: str, detail: str) -> None:
        super().__init__(detail)
        self.rule = rule
        self.detail = detail


def resource_type_of_file(url: str) -> str | None:
    match = _TYPE_FROM_NAME.match(url.rsplit("/", 1)[-1])
    return match.group(1) if match else None


def parse_json(raw: bytes) -> Any:
    """One JSON document, or ``Unreadable`` naming why not (never quoting the input)."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        reason = str(exc.msg)
        if "depth limit" in reason:
            raise Unreadable(RULE_DEPTH, "nested deeper than the reader's limit (1024 levels)") from None
        if "infinity" in reason:
            raise Unreadable(
                RULE_NUMBER, f"a number beyond the range of a 64-bit float (column {exc.colno})"
            ) from None
        if "UTF-8" in reason:
            raise Unreadable(RULE_UTF8, "not valid UTF-8") from None
        raise Unreadable(RULE_JSON, f"not well-formed JSON (column {exc.colno})") from None


# A gzip stream is inflated at most this many bytes at a time.
_INFLATE_BYTES = 16 * 2**20


def _gunzipped(chunks: Iterator[bytes], problems: list[str]) -> Iterator[bytes]:
    """The content of a gzip stream given in chunks (every member, each inflated a bounded piece
    at a time). Where it stops early (not gzip, corrupt, cut short, followed by something else)
    the reason goes to ``problems`` and the content up to there has been yielded."""
    inflater = None
    started = False
    carry = b""
    for chunk in chunks:
        data = carry + chunk if carry else chunk
        carry = b""
        while data:
            if inflater is None:
                if started:
                    data = data.lstrip(b"\x00")  # members may be padded with zeros
                if len(data) < len(_GZIP_MAGIC):
                    carry = data
                    break
                if not data.startswith(_GZIP_MAGIC):
                    problems.append(
                        "data after the gzip stream is not gzip" if started else "not a gzip file"
                    )
                    return
                inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
                started = True
            try:
                piece = inflater.decompress(data, _INFLATE_BYTES)
            except zlib.error:
                problems.append("the gzip stream is corrupt")
                return
            if piece:
                yield piece
            if inflater.eof:
                data, inflater = inflater.unused_data, None
            else:
                data = inflater.unconsumed_tail
    if not started:
        problems.append("not a gzip file")
    elif inflater is not None:
        problems.append("the gzip stream ends early")
    elif carry.strip(b"\x00"):
        problems.append("data after the gzip stream is not gzip")


def _own_id(uri: str, offset: int, raw: bytes) -> str:
    """The record id of a resource without one: stable for the same input, position and content."""
    digest = hashlib.sha256(b"\0".join((uri.encode(), str(offset).encode(), raw))).hexdigest()
    return f"~{digest[:32]}"


def _check_fields(resource: dict[str, Any]) -> None:
    """The resource-level fields the reader and staging's versioning read, of the right type."""
    if "id" in resource and not isinstance(resource["id"], str):
        raise Unreadable(RULE_FIELD_TYPE, "id is not a string")
    meta = resource.get("meta")
    if meta is not None:
        if not isinstance(meta, dict):
            raise Unreadable(RULE_FIELD_TYPE, "meta is not an object")
        updated = meta.get("lastUpdated")
        if updated is not None and not isinstance(updated, str):
            raise Unreadable(RULE_FIELD_TYPE, "meta.lastUpdated is not a string")


def _add_resource(
    out: Extraction, resource: object, raw: bytes, uri: str, offset: int, expected: str | None
) -> None:
    entity = expected or "unknown"
    if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
        out.add_reject(entity, uri, offset, RULE_TYPE_PRESENT, "no resourceType")
        return
    resource_type: str = resource["resourceType"]
    if expected is not None and resource_type != expected:
        out.add_reject(expected, uri, offset, RULE_TYPE_MATCHES_FILE, f"found {resource_type}")
        return
    try:
        _check_fields(resource)
    except Unreadable as exc:
        out.add_reject(resource_type, uri, offset, exc.rule, exc.detail)
        return
    record_id = resource.get("id") or _own_id(uri, offset, raw)
    out.add_record(resource_type, record_id, raw.decode(), uri, offset, raw)


def deletion(resource_type: str, resource_id: str, deleted_at: str | None) -> bytes:
    """The bronze payload of a deleted resource: staging drops every version up to this one."""
    meta = {"lastUpdated": deleted_at} if deleted_at else {}
    return orjson.dumps({"resourceType": resource_type, "id": resource_id, "meta": meta, "_deleted": True})


def _bundle_time(bundle: dict[str, Any]) -> str | None:
    meta = bundle.get("meta")
    updated = meta.get("lastUpdated") if isinstance(meta, dict) else None
    for value in (bundle.get("timestamp"), updated):
        if isinstance(value, str):
            return value
    return None


def _add_delete(out: Extraction, url: object, deleted_at: str | None, uri: str, offset: int) -> None:
    match = _DELETE_URL.match(url) if isinstance(url, str) else None
    if match is None:
        out.add_reject("Bundle", uri, offset, RULE_DELETE_NAMES_RESOURCE, "request.url is not Type/id")
        return
    raw = deletion(match.group(1), match.group(2), deleted_at)
    out.add_record(match.group(1), match.group(2), raw.decode(), uri, offset, raw)


class _References:
    """What the references of one Bundle's entries can point at: each entry's ``fullUrl``, and
    each (type, identifier system|value) for conditional references; both as ``Type/id``."""

    def __init__(self, entries: list[Any], own_ids: dict[int, str]) -> None:
        self.by_url: dict[str, str] = {}
        self.by_identifier: dict[tuple[str, str], str] = {}
        for number, entry in enumerate(entries, start=1):
            resource = entry.get("resource") if isinstance(entry, dict) else None
            if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
                continue
            resource_id = resource.get("id") if isinstance(resource.get("id"), str) else own_ids.get(number)
            if not resource_id:
                continue
            target = f"{resource['resourceType']}/{resource_id}"
            full_url = entry.get("fullUrl")
            if isinstance(full_url, str) and full_url:
                self.by_url[full_url] = target
            identifiers = resource.get("identifier")
            for identifier in identifiers if isinstance(identifiers, list) else ():
                if isinstance(identifier, dict) and isinstance(identifier.get("value"), str):
                    system = identifier.get("system") if isinstance(identifier.get("system"), str) else ""
                    key = (resource["resourceType"], f"{system}|{identifier['value']}")
                    self.by_identifier.setdefault(key, target)
                    self.by_identifier.setdefault((resource["resourceType"], identifier["value"]), target)

    def resolve(self, reference: str) -> str | None:
        found = self.by_url.get(reference)
        if found is not None or "?" not in reference:
            return found
        resource_type, _, query = reference.partition("?")
        for name, value in parse_qsl(query):
            if name == "identifier":
                return self.by_identifier.get((resource_type, value))
        return None

    def rewrite(self, node: Any, depth: int = 0) -> Any:
        """``node`` with every ``reference`` this Bundle resolves made relative (a copy)."""
        if depth > MAX_DEPTH:
            raise Unreadable(RULE_DEPTH, f"nested deeper than {MAX_DEPTH} levels")
        if isinstance(node, dict):
            changed = {key: self.rewrite(value, depth + 1) for key, value in node.items()}
            reference = changed.get("reference")
            if isinstance(reference, str):
                resolved = self.resolve(reference)
                if resolved is not None:
                    changed["reference"] = resolved
            return changed
        if isinstance(node, list):
            return [self.rewrite(item, depth + 1) for item in node]
        return node


def extract_bundle(out: Extraction, bundle: dict[str, Any], uri: str, offset: int | None) -> None:
    """Each entry's resource is a record; a DELETE entry (transaction or batch, and the Bundles of
    a bulk export's ``deleted`` files) removes its resource. ``offset`` is the NDJSON line of a
    Bundle on one line; for a Bundle file, each entry's number is its offset."""
    entries = bundle.get("entry")
    if entries is None:
        return
    if not isinstance(entries, list):
        out.add_reject("Bundle", uri, offset or 0, RULE_FIELD_TYPE, "entry is not a list")
        return
    deleted_at = _bundle_time(bundle)
    # An entry of a transaction without resource.id is named by its fullUrl's uuid or oid.
    own_ids: dict[int, str] = {}
    for number, entry in enumerate(entries, start=1):
        full_url = entry.get("fullUrl") if isinstance(entry, dict) else None
        if isinstance(full_url, str) and full_url.startswith(("urn:uuid:", "urn:oid:")):
            own_ids[number] = full_url.rsplit(":", 1)[-1][:64]
    references = _References(entries, own_ids)
    for number, entry in enumerate(entries, start=1):
        where = offset if offset is not None else number
        if not isinstance(entry, dict):
            out.add_reject("Bundle", uri, where, RULE_FIELD_TYPE, "entry is not an object")
            continue
        request = entry.get("request")
        if request is not None and not isinstance(request, dict):
            out.add_reject("Bundle", uri, where, RULE_FIELD_TYPE, "entry.request is not an object")
            continue
        if request is not None and request.get("method") == "DELETE":
            _add_delete(out, request.get("url"), deleted_at, uri, where)
            continue
        resource = entry.get("resource")
        if resource is None:
            # Response bundles carry entries with only a response: nothing to load.
            out.add_reject("Bundle", uri, where, RULE_ENTRY_HAS_RESOURCE, "no resource")
            continue
        if isinstance(resource, dict) and "id" not in resource and number in own_ids:
            resource = {**resource, "id": own_ids[number]}
        try:
            resource = references.rewrite(resource)
        except Unreadable as exc:
            out.add_reject("Bundle", uri, where, exc.rule, exc.detail)
            continue
        raw = orjson.dumps(resource)
        if _NOT_UTF8.encode() in raw:
            out.add_reject("Bundle", uri, where, RULE_UTF8, "the entry holds bytes that are not UTF-8")
            continue
        _add_resource(out, resource, raw, uri, where, None)


def extract_ndjson(out: Extraction, file: FileInfo, data: bytes) -> None:
    """A bulk NDJSON file (plain or gzip) read whole: the streamed reader over one chunk."""
    stream_ndjson(out, file, iter((data,)), streamed=False)


def stream_ndjson(out: Extraction, file: FileInfo, chunks: Iterator[bytes], streamed: bool = True) -> None:
    """A bulk NDJSON file (plain or gzip), given in chunks of any size: lines are cut across chunk
    boundaries, numbered from 1, and read one by one. ``streamed``: ``out`` may hand its rows to
    its sink between chunks (``Extraction.flush_if_full``), so that memory stays bounded by a
    chunk whatever the file's size. A gzip stream that stops early loads its whole lines and is
    rejected (``gzip_readable``) at the line after them."""
    expected = resource_type_of_file(file.url)
    entity = expected or "unknown"
    problems: list[str] = []
    if file.url.endswith(".gz"):
        chunks = _gunzipped(chunks, problems)
    number, rest = 0, b""
    for chunk in chunks:
        data = rest + chunk if rest else chunk
        cut = data.rfind(b"\n")
        if cut < 0:
            rest = data
            continue
        rest = data[cut + 1 :]
        block = data[:cut]
        _read_lines(out, file.url, expected, entity, number, block)
        number += block.count(b"\n") + 1
        if streamed:
            out.flush_if_full()
    if problems:  # the last line of a stream that stops early may be cut: it is not read
        out.add_reject(entity, file.url, number + 1 if number or rest else 0, RULE_GZIP, problems[0])
    elif rest:
        _read_line(out, file.url, expected, entity, number + 1, rest)


def _read_lines(
    out: Extraction, uri: str, expected: str | None, entity: str, before: int, block: bytes
) -> None:
    """Lines ``before + 1``, ... of a bulk file (``block``: whole lines). A line that is one
    resource of the file's type with a non-empty string id and well-typed meta (nearly every
    line of a real export) is taken here, in batches; any other goes to ``_read_line``, which
    does the same to it and also knows every way a line can be wrong. (msgspec, which checks a
    line without building it, was measured: it does not check UTF-8 or number ranges in what it
    skips, and the pre-checks that would make up for it cost what it saved.)"""
    lines = block.split(b"\n")
    if expected is None or expected == "Bundle":
        for number, line in enumerate(lines, start=before + 1):
            _read_line(out, uri, expected, entity, number, line)
        return
    ids: list[str] = []
    payloads: list[bytes] = []
    offsets: list[int] = []
    hashes: list[str] = []
    raw_bytes = 0

    def added() -> None:
        nonlocal raw_bytes
        if ids:
            out.add_records(entity, uri, ids, payloads, offsets, hashes, raw_bytes)
            for column in (ids, payloads, offsets, hashes):
                column.clear()
            raw_bytes = 0

    loads, sha256 = orjson.loads, hashlib.sha256
    for number, line in enumerate(lines, start=before + 1):
        line = line.rstrip(b"\r")
        try:
            resource = loads(line)
        except orjson.JSONDecodeError:
            resource = None
        if type(resource) is dict and resource.get("resourceType") == expected:
            record_id, meta = resource.get("id"), resource.get("meta")
            if (
                type(record_id) is str
                and record_id
                and (meta is None or (type(meta) is dict and type(meta.get("lastUpdated", "")) is str))
            ):
                ids.append(record_id)
                payloads.append(line)  # UTF-8: orjson read it
                offsets.append(number)
                hashes.append(sha256(line).hexdigest())
                raw_bytes += len(line)
                continue
        added()  # records stay in line order
        _read_line(out, uri, expected, entity, number, line)
    added()


def _read_line(
    out: Extraction, uri: str, expected: str | None, entity: str, number: int, line: bytes
) -> None:
    if line.startswith(_BOM):
        line = line[len(_BOM) :]
    if not line.strip():
        return
    line = line.rstrip(b"\r")
    try:
        resource = parse_json(line)
    except Unreadable as exc:
        out.add_reject(entity, uri, number, exc.rule, exc.detail)
        return
    if expected == "Bundle" and isinstance(resource, dict) and resource.get("resourceType") == "Bundle":
        extract_bundle(out, resource, uri, number)
        return
    _add_resource(out, resource, line, uri, number, expected)


# Where a Bundle file holds bytes that are not UTF-8, each is read as this noncharacter, so that the
# entries holding one are rejected alone (utf8_valid) and the others load.
_NOT_UTF8 = "\U0010fffe"
_ENTRY_KEY = re.compile(rb'"resource"\s*:')


def _mark_not_utf8(error: UnicodeError) -> tuple[str, int]:
    assert isinstance(error, UnicodeDecodeError)
    return _NOT_UTF8, error.end


def _salvaged(data: bytes) -> Any:
    """A document whose only fault is bytes that are not UTF-8, each such byte marked; else None."""
    codecs.register_error("patient-journey-not-utf8", _mark_not_utf8)
    try:
        return orjson.loads(data.decode("utf-8", errors="patient-journey-not-utf8"))
    except orjson.JSONDecodeError:
        return None


def extract_bundle_or_resource(out: Extraction, file: FileInfo, data: bytes) -> None:
    """A JSON file: a Bundle (each entry.resource is a record, offset = entry number) or one resource.

    A Bundle file that does not parse is rejected as many times as it has entries (counted by
    their ``"resource":`` keys, at offsets 1..n), so that what it held is counted; one whose only
    fault is bytes that are not UTF-8 loads every entry but those holding such bytes."""
    if data.startswith(_BOM):
        data = data[len(_BOM) :]
    try:
        document = parse_json(data)
    except Unreadable as exc:
        salvaged = _salvaged(data) if exc.rule == RULE_UTF8 else None
        if isinstance(salvaged, dict) and salvaged.get("resourceType") == "Bundle":
            extract_bundle(out, salvaged, file.url, None)
            return
        entries = len(_ENTRY_KEY.findall(data)) or 1
        for number in range(1, entries + 1) if entries > 1 else (0,):
            out.add_reject("Bundle", file.url, number, exc.rule, exc.detail)
        return
    if isinstance(document, dict) and document.get("resourceType") == "Bundle":
        extract_bundle(out, document, file.url, None)
        return
    _add_resource(out, document, data, file.url, 1, None)


def _read_file(out: Extraction, file: FileInfo, data: bytes) -> None:
    name = file.url.rsplit("/", 1)[-1]
    if name == "manifest.json":
        return  # export metadata: recorded in the ledger, no records
    if name.endswith(NDJSON_SUFFIXES):
        extract_ndjson(out, file, data)
    else:
        extract_bundle_or_resource(out, file, data)


def extract(
    landing: Storage, prefix: str, seen: InputSelection, run_id: str, out: Extraction | None = None
) -> Extraction:
    """Read every FHIR file under ``prefix`` that the ledger has not seen with this content."""
    out = out if out is not None else Extraction(SOURCE, run_id)
    read_new_files(
        out,
        landing,
        prefix,
        NDJSON_SUFFIXES + BUNDLE_SUFFIXES,
        seen,
        lambda file, data: _read_file(out, file, data),
        "unknown",
        read_stream=lambda file, chunks: _stream_file(out, file, chunks),
    )
    return out


def _stream_file(out: Extraction, file: FileInfo, chunks: Iterator[bytes]) -> None:
    """A large input: NDJSON streams; a Bundle or single resource is one JSON document, read whole."""
    if file.url.endswith(NDJSON_SUFFIXES):
        stream_ndjson(out, file, chunks)
    else:
        _read_file(out, file, b"".join(chunks))


# --------------------------------------------------------------------------- staged tables and links

MRN_SYSTEM = "http://hospital.example.org/fhir/mrn"
OR_CASE_SYSTEM = "http://hospital.example.org/fhir/or-case"


def _identifier(where: str) -> str:
    """The value of the first ``identifier[]`` element for which ``where`` (over ``i``) holds."""
    return f"list_filter(json_extract(payload, '$.identifier[*]'), lambda i: {where})[1]->>'$.value'"


# The MRN: the identifier with the hospital's MRN system, else the one typed MR (as Synthea writes it).
_MRN_BY_SYSTEM = _identifier(f"i->>'$.system' = '{MRN_SYSTEM}'")
_MRN_BY_TYPE = _identifier("i->>'$.type.coding[0].code' = 'MR'")
MRN = f"coalesce({_MRN_BY_SYSTEM}, {_MRN_BY_TYPE})"
OR_CASE_ID = _identifier(f"i->>'$.system' = '{OR_CASE_SYSTEM}'")


def _ref_id(at: JsonText, path: str) -> str:
    """The id of a reference: the last segment of ``Type/id`` or of an absolute URL, its
    ``_history/<version>`` dropped (references a Bundle resolves are relative by now)."""
    return f"nullif(regexp_extract({at('$.' + path)}, '([^/]+)(/_history/[^/]*)?$', 1), '')"


def fhir_versions(at: JsonText) -> Versions:
    """meta.lastUpdated orders versions; the reader writes a deletion (bulk export ``deleted``
    entries, DELETE entries of a Bundle) as a record marked ``_deleted``."""
    return {"version": timestamp(at, "meta.lastUpdated"), "deleted": f"{at('$._deleted')} = 'true'"}


# A QuestionnaireResponse's answers as a JSON object linkId -> first answer (top-level items and
# items one group deep); an answer of another type than integer or coding is kept as its JSON.
_QR_ITEM_LIST = "list_concat(json_extract(payload, '$.item[*]'), json_extract(payload, '$.item[*].item[*]'))"
_QR_ANSWER = (
    "coalesce(i->>'$.answer[0].valueInteger', i->>'$.answer[0].valueCoding.code', "
    "CAST(i->'$.answer[0]' AS VARCHAR))"
)
QR_ITEMS = (
    f"'{{' || array_to_string(list_transform(list_filter({_QR_ITEM_LIST}, "
    f"lambda i: (i->>'$.linkId') IS NOT NULL AND (i->'$.answer[0]') IS NOT NULL), "
    f"lambda i: to_json(i->>'$.linkId') || ':' || to_json({_QR_ANSWER})), ',') || '}}'"
)

STAGED: tuple[StagedTable, ...] = (
    declared(
        lambda at: StagedTable(
            "patient",
            "fhir_resource",
            "Patient",
            f"""record_id AS patient_id, {MRN} AS mrn,
            try_cast({at("$.birthDate")} AS DATE) AS birth_date, {at("$.gender")} AS gender""",
            **fhir_versions(at),
            fields=json_fields("identifier:array", "birthDate:string", "gender:string"),
        )
    ),
    declared(
        lambda at: StagedTable(
            "encounter",
            "fhir_resource",
            "Encounter",
            f"""record_id AS encounter_id, {_ref_id(at, "subject.reference")} AS patient_id,
            {at("$.class.code")} AS class_code, {at("$.type[0].coding[0].code")} AS purpose,
            {timestamp(at, "period.start")} AS period_start, {timestamp(at, "period.end")} AS period_end""",
            **fhir_versions(at),
            fields=json_fields(
                "subject:object",
                "subject.reference:string",
                "class:object",
                "class.code:string",
                "type:array",
                "period:object",
                "period.start:string",
                "period.end:string",
            ),
        )
    ),
    declared(
        lambda at: StagedTable(
            "procedure",
            "fhir_resource",
            "Procedure",
            f"""record_id AS procedure_id, {_ref_id(at, "subject.reference")} AS patient_id,
            {_ref_id(at, "encounter.reference")} AS encounter_id, {OR_CASE_ID} AS case_id,
            {at("$.code.coding[0].code")} AS code, {at("$.code.coding[0].display")} AS display,
            {at("$.status")} AS status,
            {timestamp(at, "performedPeriod.start")} AS performed_start, {timestamp(at, "performedPeriod.end")} AS performed_end""",
            **fhir_versions(at),
            fields=json_fields(
                "subject:object",
                "subject.reference:string",
                "encounter:object",
                "encounter.reference:string",
                "identifier:array",
                "code:object",
                "code.coding:array",
                "code.coding[0]:object",
                "code.coding[0].code:string",
                "code.coding[0].display:string",
                "status:string",
                "performedPeriod:object",
                "performedPeriod.start:string",
                "performedPeriod.end:string",
            ),
        )
    ),
    declared(
        lambda at: StagedTable(
            "condition",
            "fhir_resource",
            "Condition",
            f"""record_id AS condition_id, {_ref_id(at, "subject.reference")} AS patient_id,
            {at("$.code.coding[0].code")} AS code, {at("$.code.coding[0].display")} AS display,
            coalesce({timestamp(at, "onsetDateTime")}, {timestamp(at, "recordedDate")}) AS onset_time""",
            **fhir_versions(at),
            fields=json_fields(
                "subject:object",
                "subject.reference:string",
                "code:object",
                "code.coding:array",
                "code.coding[0]:object",
                "code.coding[0].code:string",
                "code.coding[0].display:string",
                "onsetDateTime:string",
                "recordedDate:string",
            ),
        )
    ),
    declared(
        lambda at: StagedTable(
            "observation",
            "fhir_resource",
            "Observation",
            f"""record_id AS observation_id, {_ref_id(at, "subject.reference")} AS patient_id,
            {_ref_id(at, "encounter.reference")} AS encounter_id,
            {at("$.code.coding[0].code")} AS code, {at("$.code.coding[0].display")} AS display,
            {timestamp(at, "effectiveDateTime")} AS effective_time,
            try_cast({at("$.valueQuantity.value")} AS DOUBLE) AS value,
            {at("$.valueQuantity.unit")} AS unit""",
            **fhir_versions(at),
            fields=json_fields(
                "subject:object",
                "subject.reference:string",
                "encounter:object",
                "encounter.reference:string",
                "code:object",
                "code.coding:array",
                "code.coding[0]:object",
                "code.coding[0].code:string",
                "code.coding[0].display:string",
                "effectiveDateTime:string",
                "valueQuantity:object",
                "valueQuantity.value:number",
                "valueQuantity.unit:string",
            ),
        )
    ),
    declared(
        lambda at: StagedTable(
            "device",
            "fhir_resource",
            "Device",
            f"""record_id AS device_id, {at("$.udiCarrier[0].deviceIdentifier")} AS udi_di,
            {at("$.serialNumber")} AS serial_number, {at("$.deviceName[0].name")} AS device_name,
            {at("$.type.coding[0].code")} AS device_type, {_ref_id(at, "patient.reference")} AS patient_id""",
            **fhir_versions(at),
            fields=json_fields(
                "udiCarrier:array",
                "udiCarrier[0].deviceIdentifier:string",
                "serialNumber:string",
                "deviceName:array",
                "deviceName[0].name:string",
                "type:object",
                "type.coding:array",
                "patient:object",
                "patient.reference:string",
            ),
        )
    ),
    declared(
        lambda at: StagedTable(
            "fhir_prom",
            "fhir_resource",
            "QuestionnaireResponse",
            # One row per QuestionnaireResponse, scored by patient_journey.prom: the instrument is the
            # questionnaire canonical's last segment (catalog id), items are linkId -> answer[0].
            f"""record_id AS questionnaire_response_id, {_ref_id(at, "subject.reference")} AS patient_id,
            nullif(regexp_extract({at("$.questionnaire")}, '([^/|]*)(\\|.*)?$', 1), '') AS instrument,
            CAST(NULL AS VARCHAR) AS timepoint,
            try_cast(left({at("$.authored")}, 10) AS DATE) AS collected_on,
            {at("$.status")} AS response_status,
            {PROM_SCORE_COLUMNS}, {QR_ITEMS} AS items""",
            **fhir_versions(at),
            fields=json_fields(
                "subject:object",
                "subject.reference:string",
                "questionnaire:string",
                "authored:string",
                "status:string",
                "item:array",
            ),
        )
    ),
)

LINKS: tuple[LinkSpec, ...] = (
    LinkSpec(
        "patient",
        "patient",
        "fhir",
        "patient_id",
        "s LEFT JOIN ehr_patient k USING (patient_id)",
        "mrn_present",
        "k.patient_key, year(s.birth_date) AS birth_year, s.gender",
    ),
    LinkSpec(
        "encounter",
        "encounter",
        "fhir",
        "encounter_id",
        "s LEFT JOIN ehr_patient k USING (patient_id)",
        "subject_links_to_patient",
        "s.encounter_id, k.patient_key, s.class_code, s.purpose, s.period_start, s.period_end",
    ),
    LinkSpec(
        "procedure",
        "procedure",
        "fhir",
        "procedure_id",
        "s LEFT JOIN ehr_patient k USING (patient_id)",
        "subject_links_to_patient",
        "s.procedure_id, k.patient_key, pseudonym('or-case', s.case_id) AS episode_key, s.encounter_id, "
        "s.code, s.display, s.status, s.performed_start, s.performed_end",
    ),
    LinkSpec(
        "condition",
        "condition",
        "fhir",
        "condition_id",
        "s LEFT JOIN ehr_patient k USING (patient_id)",
        "subject_links_to_patient",
        "s.condition_id, k.patient_key, s.code, s.display, s.onset_time",
    ),
    LinkSpec(
        "observation",
        "observation",
        "fhir",
        "observation_id",
        "s LEFT JOIN ehr_patient k USING (patient_id)",
        "subject_links_to_patient",
        "s.observation_id, k.patient_key, s.encounter_id, s.code, s.display, s.effective_time, s.value, s.unit",
    ),
    LinkSpec(
        "device",
        "device",
        "fhir",
        "device_id",
        "s LEFT JOIN ehr_patient k USING (patient_id)",
        "patient_links_to_patient",
        "s.device_id, k.patient_key, s.udi_di, s.device_name, s.device_type",
        optional_link="s.patient_id IS NULL",
    ),
    LinkSpec(
        "fhir_prom",
        "prom_score",
        "fhir",
        "questionnaire_response_id",
        "s LEFT JOIN ehr_patient k USING (patient_id)",
        "subject_links_to_patient",
        "k.patient_key, s.instrument, s.timepoint, s.score, s.collected_on, 'fhir' AS prom_source",
    ),
)

IDENTITY = (
    IdentityRelation(
        "ehr_patient",
        "SELECT patient_id, mrn, birth_date, pseudonym('mrn', mrn) AS patient_key FROM staged_patient",
        "SELECT 'fhir-patient' AS identifier_type, patient_id AS identifier, patient_key FROM ehr_patient",
    ),
    # One row per MRN: what a source that carries the MRN (REDCap, a hospital feed) joins to
    # (ehr_patient may hold two Patient resources of one MRN).
    IdentityRelation(
        "mrn_link",
        "SELECT DISTINCT mrn, patient_key FROM ehr_patient",
        "SELECT 'mrn', mrn, patient_key FROM mrn_link",
    ),
    IdentityRelation(
        "case_link",
        """SELECT DISTINCT p.case_id, k.patient_key, pseudonym('or-case', p.case_id) AS episode_key
        FROM staged_procedure p JOIN ehr_patient k USING (patient_id) WHERE p.case_id IS NOT NULL""",
        "SELECT 'or-case', case_id, patient_key FROM case_link",
    ),
)


# The silver tables it feeds, each declared once (patient_journey.contracts).
SILVER: tuple[TableContract, ...] = (
    silver_contract(
        "patient",
        "one row per linked FHIR Patient",
        ("patient_key",),
        """
patient_key string  pseudonymous key (HMAC of the MRN)
birth_year int64  year of birth (the date stays restricted)
gender string  administrative gender
""",
    ),
    silver_contract(
        "encounter",
        "one row per linked FHIR Encounter (current version)",
        ("encounter_id",),
        """
encounter_id string  the Encounter's id
patient_key string  the patient
class_code string  AMB or IMP
purpose string  preop, surgical-admission, follow-up, readmission
period_start timestamp  period.start
period_end timestamp  period.end
""",
    ),
    silver_contract(
        "procedure",
        "one row per linked FHIR Procedure (current version)",
        ("procedure_id",),
        """
procedure_id string  the Procedure's id
patient_key string  the patient
episode_key string  the surgical case (HMAC of the OR case id)
encounter_id string  the Procedure's encounter
code string  SNOMED CT code
display string  the code's display
status string  FHIR status
performed_start timestamp  performedPeriod.start
performed_end timestamp  performedPeriod.end
""",
    ),
    silver_contract(
        "condition",
        "one row per linked FHIR Condition (current version)",
        ("condition_id",),
        """
condition_id string  the Condition's id
patient_key string  the patient
code string  SNOMED CT code
display string  the code's display
onset_time timestamp  onsetDateTime, else recordedDate
""",
    ),
    silver_contract(
        "observation",
        "one row per linked FHIR Observation (current version)",
        ("observation_id",),
        """
observation_id string  the Observation's id
patient_key string  the patient
encounter_id string  its encounter
code string  LOINC code
display string  the code's display
effective_time timestamp  effectiveDateTime
value double  valueQuantity.value
unit string  valueQuantity.unit
""",
    ),
    silver_contract(
        "device",
        "one row per FHIR Device (implants linked to their patient; OR devices without one)",
        ("device_id",),
        """
device_id string  the Device's id
patient_key string  the patient (implants only)
udi_di string  udiCarrier[0].deviceIdentifier
device_name string  deviceName[0].name
device_type string  type.coding[0].code
""",
    ),
)

# What the EHR adds to the gold journey: its encounters, procedures, conditions and observations as
# events, its inpatient encounters as admissions (readmissions), and its Conditions whose code is
# in catalog/complications.csv as complications.
JOURNEY = JourneyParts(
    events=(
        "SELECT patient_key, period_start, 'fhir', 'encounter', purpose, class_code, NULL, NULL, input_key, "
        "source_offset FROM encounter",
        "SELECT patient_key, performed_start, 'fhir', 'procedure', code, display, NULL, NULL, input_key, "
        "source_offset FROM procedure",
        "SELECT patient_key, onset_time, 'fhir', 'condition', code, display, NULL, NULL, input_key, "
        "source_offset FROM condition",
        "SELECT patient_key, effective_time, 'fhir', 'observation', code, display, value, unit, input_key, "
        "source_offset FROM observation",
    ),
    admissions=(
        "SELECT patient_key, CAST(period_start AS DATE), encounter_id FROM encounter WHERE class_code = 'IMP'",
    ),
    complications=(
        "SELECT patient_key, code, CAST(onset_time AS DATE), NULL FROM condition "
        "WHERE code IN (SELECT code FROM complication_code)",
    ),
)


class FhirSource(Source):
    """FHIR R4 bulk exports (NDJSON, gzip) and Bundles."""

    staged = STAGED
    silver = SILVER
    journey = JOURNEY
    links = LINKS
    identity = IDENTITY
    name = SOURCE
    bronze_table = "fhir_resource"
    suffixes = NDJSON_SUFFIXES + BUNDLE_SUFFIXES

    def prefix(self, settings: JourneySettings) -> str:
        return settings.sources.fhir_prefix

    def extract(self, job: ExtractJob) -> Extraction:
        return extract(job.landing, self.prefix(job.settings), job.seen, job.run_id, job.out)
