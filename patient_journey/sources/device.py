"""Device telemetry routed by Azure IoT Hub to storage: Avro container files.

Each Avro record (EnqueuedTimeUtc, Properties, SystemProperties, Body) becomes one bronze record
whose payload keeps the envelope fields the warehouse needs and the decoded JSON body. The record
offset is the record's index inside its blob.
"""

from __future__ import annotations

import io

import fastavro
import orjson

from patient_journey.sources.records import Extraction, InputSelection, content_hash, new_files
from patient_journey.storage import Storage

SOURCE = "device"
ENTITY = "device_message"
AVRO_MAGIC = b"Obj\x01"


def extract_avro(out: Extraction, url: str, data: bytes) -> None:
    if not data.startswith(AVRO_MAGIC):
        out.add_reject(ENTITY, url, 0, "avro_container_readable", "not an Avro container file")
        return
    try:
        records = list(fastavro.reader(io.BytesIO(data)))
    except Exception as exc:  # fastavro raises many types for corrupt blocks
        out.add_reject(ENTITY, url, 0, "avro_container_readable", type(exc).__name__)
        return
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            out.add_reject(ENTITY, url, index, "iothub_message_shape", "record is not a message")
            continue
        body = record.get("Body")
        system = record.get("SystemProperties") or {}
        if not isinstance(body, bytes | bytearray):
            out.add_reject(ENTITY, url, index, "device_body_present", "no Body bytes")
            continue
        try:
            event = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            out.add_reject(ENTITY, url, index, "json_well_formed", f"Body column {exc.colno}")
            continue
        envelope = {
            "enqueuedTimeUtc": record.get("EnqueuedTimeUtc"),
            "connectionDeviceId": system.get("connectionDeviceId"),
            "body": event,
        }
        device_id = system.get("connectionDeviceId") or ""
        raw = orjson.dumps(envelope)
        out.add_record(ENTITY, f"{device_id}:{content_hash(bytes(body))[:16]}", raw.decode(), url, index, raw)


def extract(landing: Storage, prefix: str, seen: InputSelection, run_id: str) -> Extraction:
    """Read every telemetry blob under ``prefix`` that the ledger has not seen with this content."""
    out = Extraction(SOURCE, run_id)
    for file, data in new_files(out, landing, prefix, (), seen):
        extract_avro(out, file.url, data)
    return out
