"""Device telemetry routed by Azure IoT Hub to storage, mapped by the device templates.

IoT Hub writes routed messages under ``{iothub}/{partition}/{YYYY}/{MM}/{DD}/{HH}/{mm}`` in the
encoding of the routing endpoint:

* ``avro`` and ``avrodeflate``: Avro container files (``.avro``; the deflate codec is declared in
  the file header, so one reader serves both); ``Body`` is bytes;
* ``json``: one JSON object per line (``.json``); ``Body`` is the message itself when the device
  declared ``application/json`` in UTF-8, else the message bytes in base64.

Every message is mapped by the device templates (``catalog/devices``, one file per device type)
as soon as it is read. Each template match becomes one bronze record (entity
``device_measurement``) holding the match's device id, case id, time, the IoT Hub envelope times
and its named values; the offset is the message's index in its blob (record or line). A message
that no template matches, or that lacks a value its template requires, is rejected with the
rule it broke. Changing a template applies to messages read afterwards; ``journey reprocess
device`` reads the landed blobs again.
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import fastavro
import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from patient_journey.contracts import TableContract, silver_contract
from patient_journey.device_templates import DeviceTemplates, Envelope, Measurement, load_templates
from patient_journey.journey import JourneyParts
from patient_journey.linkage import LinkSpec
from patient_journey.quality import QUARANTINE_SCHEMA, ExpectationOutcome, QualityGate, quarantine_rows
from patient_journey.settings import JourneySettings
from patient_journey.sources.iothub import IotHubListingOptions, list_recent, listing_cutoff
from patient_journey.sources.records import Extraction, InputSelection, content_hash, read_new_files
from patient_journey.sources.source import ExtractJob, Gated, Source, source_options
from patient_journey.staging import StagedTable, declared, json_fields, timestamp
from patient_journey.storage import Storage

SOURCE = "device"
ENTITY = "device_measurement"
DEVICE_LAYER = "device"  # expectations/device/<type name>.json: one suite per device type
AVRO_MAGIC = b"Obj\x01"
SUFFIXES = (".avro", ".json")


class _BadMessage(Exception):
    def __init__(self, rule: str, detail: str) -> None:
        super().__init__(detail)
        self.rule = rule
        self.detail = detail


def decode_body(body: Any) -> Any:
    """A message body as JSON: bytes or text of UTF-8 JSON, or the same in base64."""
    if isinstance(body, dict | list):
        return body
    if isinstance(body, str):
        body = body.encode("utf-8")
    if not isinstance(body, bytes | bytearray):
        raise _BadMessage("device_body_present", "no Body")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        first_error = exc
    try:
        decoded = base64.b64decode(bytes(body), validate=True)
        return orjson.loads(decoded)
    except (binascii.Error, ValueError):
        raise _BadMessage(
            "json_well_formed", f"Body is neither JSON nor base64 JSON (column {first_error.colno})"
        ) from None


def avro_messages(data: bytes) -> Iterator[dict[str, Any] | _BadMessage]:
    """The records of an Avro container file, block by block: a block that cannot be decoded
    ends the file there (its records and the rest become one reject), the blocks before it load."""
    if not data.startswith(AVRO_MAGIC):
        raise _BadMessage("avro_container_readable", "not an Avro container file")
    try:
        blocks = fastavro.block_reader(io.BytesIO(data))
    except Exception as exc:  # fastavro raises many types for a corrupt header
        raise _BadMessage(
            "avro_container_readable", f"the header does not decode ({type(exc).__name__})"
        ) from None
    try:
        for block in blocks:
            for record in block:
                yield (
                    record
                    if isinstance(record, dict)
                    else _BadMessage("iothub_message_shape", "not a record")
                )
    except Exception as exc:  # and many types for a corrupt block or codec
        yield _BadMessage("avro_block_readable", f"a block does not decode ({type(exc).__name__})")


def json_messages(data: bytes) -> Iterator[dict[str, Any] | _BadMessage]:
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            yield _BadMessage("json_well_formed", f"not well-formed JSON (column {exc.colno})")
            continue
        yield record if isinstance(record, dict) else _BadMessage("iothub_message_shape", "not an object")


def _payload(measurements: list[Measurement], envelope: Envelope) -> dict[str, Any]:
    first = measurements[0]
    system = envelope.system_properties
    return {
        "typeName": first.type_name,
        "template": first.template,
        "match": first.match,
        "deviceId": first.device_id,
        "caseId": first.case_id,
        "patientId": first.patient_id,
        "measuredAt": first.measured_at.isoformat(),
        "iotDeviceId": system.get("connectionDeviceId") or system.get("iothub-connection-device-id"),
        "enqueuedTime": envelope.enqueued_time,
        "values": {m.value_name: m.value for m in measurements},
    }


def _message_id(body: Any, envelope: Envelope) -> str:
    """A message's identity: a hash of its decoded body, the sending device connection and
    IoT Hub's enqueued time. It names the message wherever it is read: in another blob (IoT Hub
    delivers at least once) or read again with changed templates; never the serial in clear."""
    system = envelope.system_properties
    device = system.get("connectionDeviceId") or system.get("iothub-connection-device-id")
    try:
        identity = orjson.dumps(
            [body, device, envelope.enqueued_time], option=orjson.OPT_SORT_KEYS, default=str
        )
    except orjson.JSONEncodeError:  # only a body nested deeper than orjson writes
        raise _BadMessage("json_nesting_depth", "the body is nested deeper than 250 levels") from None
    return content_hash(identity)[:20]


def _envelope(message: dict[str, Any]) -> Envelope:
    """The routed record's envelope, its fields of the types IoT Hub writes (maps, a string)."""
    for name in ("Properties", "SystemProperties"):
        if message.get(name) is not None and not isinstance(message[name], dict):
            raise _BadMessage("iothub_message_shape", f"{name} is not a map")
    enqueued = message.get("EnqueuedTimeUtc")
    if enqueued is not None and not isinstance(enqueued, str):
        raise _BadMessage("iothub_field_type", "EnqueuedTimeUtc is not a string")
    return Envelope.from_routed_record(message)


def map_message(
    out: Extraction, templates: DeviceTemplates, url: str, index: int, message: dict[str, Any]
) -> None:
    """Map one routed message into bronze records, or one reject with the rule it broke."""
    try:
        body = decode_body(message.get("Body"))
        envelope = _envelope(message)
        message_id = _message_id(body, envelope)
    except _BadMessage as exc:
        out.add_reject(ENTITY, url, index, exc.rule, exc.detail)
        return
    result = templates.map_message(body, envelope, message=index)
    if result.rejects:  # a message with any reject loads nothing: one reject row for it
        first = result.rejects[0]
        out.add_reject(ENTITY, url, index, first.rule, first.detail)
        return
    matches: dict[int, list[Measurement]] = {}
    for row in result.rows:
        matches.setdefault(row.match, []).append(row)
    for match, rows in matches.items():
        raw = orjson.dumps(_payload(rows, envelope), default=str)
        out.add_record(ENTITY, f"{message_id}-{match}", raw.decode(), url, index, raw)


def map_blob(out: Extraction, templates: DeviceTemplates, url: str, data: bytes) -> None:
    """Map every message of one routed blob into bronze records or rejects."""
    messages = avro_messages(data) if url.endswith(".avro") else json_messages(data)
    try:
        for index, message in enumerate(messages):
            if isinstance(message, _BadMessage):
                out.add_reject(ENTITY, url, index, message.rule, message.detail)
                continue
            map_message(out, templates, url, index, message)
    except _BadMessage as exc:  # the file as a whole
        out.add_reject(ENTITY, url, 0, exc.rule, exc.detail)


def extract(
    landing: Storage,
    prefix: str,
    seen: InputSelection,
    run_id: str,
    templates: DeviceTemplates,
    out: Extraction | None = None,
) -> Extraction:
    """Read every routed telemetry blob under ``prefix`` that the ledger has not seen."""
    out = out if out is not None else Extraction(SOURCE, run_id)
    read_new_files(
        out,
        landing,
        prefix,
        SUFFIXES,
        seen,
        lambda file, data: map_blob(out, templates, file.url, data),
        ENTITY,
    )
    return out


# --------------------------------------------------------------------------- gating by device type

RULE_DEVICE_VALUE_TYPE = "device_value_type"


def _typed_column(values: list[object]) -> pa.Array:
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # mixed kinds: compare as text
        return pa.array([None if v is None else str(v) for v in values], pa.string())


def _number(value: object) -> float | None:
    """A device value as a number, as JMESPath's to_number reads it (numbers, numeric text), or
    None when it is not one (a boolean, a list, other text, NaN or infinity)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return None
    else:
        return None
    return number if np.isfinite(number) else None


def device_type_table(
    events: pa.Table, type_name: str, value_names: list[str], numeric: frozenset[str] = frozenset()
) -> tuple[pa.Table, dict[int, list[str]]]:
    """One device type's measurements with a column per value its templates name (the shape
    its suite in expectations/device/<type>.json is written against), and the rows whose value
    in a ``numeric`` column (one the suite compares with numbers) is not a number, with those
    columns' names. Numeric columns are float64, so that a type error stays a row's fault."""
    rows = events.filter(pc.equal(events.column("device_type"), type_name))
    measured = [orjson.loads(text) for text in rows.column("measured_values").to_pylist()]
    columns: dict[str, pa.Array | pa.ChunkedArray] = {"measurement_id": rows.column("measurement_id")}
    wrong: dict[int, list[str]] = {}
    for name in value_names:
        values = [values.get(name) for values in measured]
        if name not in numeric:
            columns[name] = _typed_column(values)
            continue
        numbers = [None if value is None else _number(value) for value in values]
        for row, (value, number) in enumerate(zip(values, numbers, strict=True)):
            if value is not None and number is None:
                wrong.setdefault(row, []).append(name)
        columns[name] = pa.array(numbers, pa.float64())
    for name in ("_row", "source_uri", "source_offset"):
        columns[name] = rows.column(name)
    return pa.table(columns), wrong


def gate_device_types(
    gate: QualityGate, templates: DeviceTemplates, events: pa.Table, run_id: str
) -> tuple[pa.Table, pa.Table, list[ExpectationOutcome]]:
    """Check each device type's measurements against its own suite: (passed, quarantined, outcomes).
    A value of the wrong type where the suite expects a number quarantines its row
    (``device_value_type``, naming the value) before the suite runs."""
    quarantined: list[pa.Table] = []
    outcomes: list[ExpectationOutcome] = []
    for type_name in templates.type_names():
        numeric = gate.numeric_columns(DEVICE_LAYER, type_name)
        table, wrong = device_type_table(events, type_name, templates.value_names(type_name), numeric)
        if table.num_rows == 0:
            continue
        if wrong:
            mistyped = np.zeros(table.num_rows, dtype=bool)
            mistyped[sorted(wrong)] = True
            bad = table.filter(pa.array(mistyped))
            details = [f"{', '.join(wrong[row])} is not a number" for row in sorted(wrong)]
            quarantined.append(
                quarantine_rows(bad, "device_event", SOURCE, RULE_DEVICE_VALUE_TYPE, details, run_id)
            )
            table = table.filter(pa.array(~mistyped))
            if table.num_rows == 0:
                continue
        result = gate.check(DEVICE_LAYER, type_name, table, "device", run_id)
        outcomes.extend(result.outcomes)
        bad = result.quarantined
        names = pa.array(["device_event"] * bad.num_rows, pa.string())
        quarantined.append(bad.set_column(0, "table_name", names))
    failed = pa.concat_tables(quarantined) if quarantined else QUARANTINE_SCHEMA.empty_table()
    keep = pc.invert(pc.is_in(events.column("measurement_id"), value_set=failed.column("record_id")))
    return events.filter(keep), failed, outcomes


# --------------------------------------------------------------------------- staged tables and links

STAGED: tuple[StagedTable, ...] = (
    declared(
        lambda at: StagedTable(
            "device_event",
            "device_message",
            "device_measurement",
            f"""record_id AS measurement_id, {at("$.iotDeviceId")} AS iot_device_id,
            {at("$.typeName")} AS device_type, {at("$.deviceId")} AS device_id,
            {at("$.caseId")} AS case_id, {at("$.template")} AS template,
            coalesce({at("$.values.event")}, {at("$.typeName")}) AS event_type,
            {timestamp(at, "measuredAt")} AS event_time, {timestamp(at, "enqueuedTime")} AS enqueued_time,
            {at("$.values.udiDi")} AS udi_di, {at("$.values.firmware")} AS firmware,
            try_cast({at("$.values.value")} AS DOUBLE) AS value, {at("$.values.unit")} AS unit,
            CAST(json_extract(payload, '$.values') AS VARCHAR) AS measured_values""",
            # What the templates mapped, of the kinds staging reads; a case id or serial may be a
            # number. A value a suite compares with numbers is checked by its device type's gate.
            fields=json_fields(
                "caseId:scalar",
                "deviceId:scalar",
                "values.event:string",
                "values.udiDi:string",
                "values.firmware:scalar",
                "values.unit:string",
            ),
        )
    ),
)

LINKS: tuple[LinkSpec, ...] = (
    LinkSpec(
        "device_event",
        "device_event",
        "device",
        "measurement_id",
        "s LEFT JOIN case_link k USING (case_id)",
        "case_id_links_to_procedure",
        "s.measurement_id, k.episode_key, k.patient_key, s.device_type, "
        "pseudonym('device-serial', s.device_id) AS device_key, s.udi_di, s.firmware, "
        "s.event_type, s.event_time, s.value, s.unit, s.enqueued_time, s.measured_values",
    ),
)


# The silver tables it feeds, each declared once (patient_journey.contracts).
SILVER: tuple[TableContract, ...] = (
    silver_contract(
        "device_event",
        "one row per device template match of a routed IoT Hub message",
        ("measurement_id",),
        """
measurement_id string  a hash of the message and the template match (no serial)
episode_key string  the surgical case
patient_key string  the patient of the case
device_type string  the template's type name
device_key string  HMAC-SHA256 of the device serial
udi_di string  the device's UDI-DI
firmware string  firmware version
event_type string  the event the device reported
event_time timestamp  the device's own time
value double  the measured value, if any
unit string  its unit
enqueued_time timestamp  IoT Hub's enqueued time
measured_values string  every named value of the match, as JSON
""",
    ),
)

# What device telemetry adds to the gold journey: every template match as an event.
JOURNEY = JourneyParts(
    events=(
        "SELECT patient_key, event_time, 'device', 'device:' || event_type, udi_di, device_type, value, unit, "
        "input_key, source_offset FROM device_event",
    )
)


class DeviceSource(Source):
    """IoT Hub telemetry routed to storage; each device type's measurements have their own suite."""

    staged = STAGED
    silver = SILVER
    journey = JOURNEY
    kind = "device"
    links = LINKS
    name = SOURCE
    bronze_table = "device_message"
    suffixes = SUFFIXES

    options = IotHubListingOptions

    def prefix(self, settings: JourneySettings) -> str:
        return settings.sources.device_prefix

    def list_inputs(
        self, settings: JourneySettings, landing: Storage, ledger: pa.Table | None, everything: bool
    ) -> pa.Table:
        """The blobs under the latest time folders, or all of them (``patient_journey.sources.iothub``)."""
        options = source_options(IotHubListingOptions, settings)
        since = None if everything else listing_cutoff(ledger, options, datetime.now(UTC))
        return list_recent(landing, self.prefix(settings), self.suffixes, options, since)

    def extract(self, job: ExtractJob) -> Extraction:
        templates = load_templates(job.settings.sources.device_templates_dir)
        return extract(job.landing, self.prefix(job.settings), job.seen, job.run_id, templates, job.out)

    def require_suites(self, settings: JourneySettings, gate: QualityGate) -> None:
        gate.require(DEVICE_LAYER, load_templates(settings.sources.device_templates_dir).type_names())

    def gate_staged(
        self, settings: JourneySettings, gate: QualityGate, passed: dict[str, pa.Table], run_id: str
    ) -> Gated | None:
        if "device_event" not in passed:
            return None
        templates = load_templates(settings.sources.device_templates_dir)
        passed["device_event"], quarantined, outcomes = gate_device_types(
            gate, templates, passed["device_event"], run_id
        )
        return Gated(quarantined, outcomes)
