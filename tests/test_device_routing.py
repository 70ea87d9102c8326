"""The device adapter on every encoding IoT Hub routes messages to storage in.

The IoMT connector's own sample messages (../shared/data/iomt-device-messages) go into routed
blobs four ways: Avro with the null codec (``avro``), Avro with the deflate codec
(``avrodeflate``), and JSON lines with the body embedded (the device declared
``application/json``, UTF-8) or in base64 (it did not). ``device.map_blob`` must give the same
bronze records from all four, and the same rejects at the same message index.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fastavro
import orjson
import pytest

from patient_journey.device_templates import (
    ROUTED_SYSTEM_PROPERTIES,
    RULE_NO_TEMPLATE,
    RULE_REQUIRED_VALUE,
    DeviceTemplates,
    load_templates,
)
from patient_journey.generate.writers import AVRO_SCHEMA
from patient_journey.sources import device
from patient_journey.sources.records import Extraction, InputSelection
from patient_journey.storage import Storage
from tests.conftest import SHARED_DATA

pytestmark = pytest.mark.shared_data

IOMT = SHARED_DATA / "iomt-device-messages"
INPUT = "template-test-input"
ENCODINGS = ("avro", "avrodeflate", "json", "json-base64")
DEFAULT_ENQUEUED = "2019-02-01T22:46:02.0000000Z"  # for samples whose envelope has no enqueued time
# Event Hub property names (as the samples have them) -> the names storage routing writes.
ROUTED_NAMES = {hub: routed for routed, hub in ROUTED_SYSTEM_PROPERTIES.items()}


@dataclass(frozen=True)
class Sample:
    """One message made of a sample file: its ``Body`` (IoT Hub event samples), the whole
    document (an IoT Central export sample), one item of its ``Body`` array (an exported IoT
    Central message), or what the device sent through IoT Hub for such an item (``telemetry``
    as the body, its message properties, device id and enqueued time as the envelope)."""

    file: str
    part: str = "Body"  # "Body", "document", "Body[i]" or "telemetry[i]"
    index: int = 0

    def message(self) -> tuple[Any, dict[str, str], dict[str, str]]:
        """(body, properties, system properties) of the message."""
        doc = json.loads((IOMT / INPUT / self.file).read_text(encoding="utf-8-sig"))
        if self.part == "document":
            return doc, {}, {}
        if self.part == "Body[i]":
            return doc["Body"][self.index], {}, {}
        if self.part == "telemetry[i]":
            item = doc["Body"][self.index]
            system = {"connectionDeviceId": item["deviceId"], "enqueuedTime": item["enqueuedTime"]}
            return item["telemetry"], item["messageProperties"], system
        system = {ROUTED_NAMES.get(k, k): v for k, v in doc.get("SystemProperties", {}).items()}
        return doc["Body"], dict(doc.get("Properties", {})), system


@dataclass(frozen=True)
class Case:
    templates: tuple[str, ...]  # template files under iomt-device-messages
    samples: tuple[Sample, ...]  # the blob's messages, in order
    records: dict[int, int]  # message index -> bronze records (one per template match)
    rejects: dict[int, str] = field(default_factory=dict)  # message index -> rule


HR = Sample("data_Documentation_CalculatedFunction_HeartRate_Payload.json")
BP = Sample("data_Documentation_CalculatedFunction_BloodPressure_Payload.json")
HR_ARRAY = Sample("data_Documentation_CalculatedFunction_MultipleMeasurements_FromArray_Payload.json")
HR_STEPS = Sample("data_Documentation_CalculatedFunction_MultipleMeasurements_Payload.json")
BP_MATCHES = Sample("data_Documentation_CalculatedFunction_MultipleMatches_Payload.json")
HEIGHTS = Sample("data_Documentation_CalculatedFunction_TransformData_Payload.json")
HUB = Sample("data_IotHubPayloadExample.json")
HUB_NO_CREATE_TIME = Sample("data_IotHubPayloadExampleMissingCreateTime.json")
HUB_BP_STEPS = Sample("data_IotHubPayloadMultiValueExample.json")
CENTRAL = Sample("data_IotCentralPayloadExample.json", "document")
CENTRAL_EXPORT = "data_IotCentralPayloadExampleMultipleMessages.json"


def _doc(name: str) -> str:
    return f"{INPUT}/data_Documentation_CalculatedFunction_{name}_Template.json"


CASES = {
    # IotJsonPathContent: device id and time from the envelope, which each encoding must carry.
    # The documentation samples send `heartRate`, which `@Body.heartrate` does not match.
    "iot-hub": Case(
        (f"{INPUT}/data_IotJsonPathContentTemplateValid.json",),
        (HUB, HUB_NO_CREATE_TIME, HR, HUB_BP_STEPS),
        {0: 1, 1: 1},
        {2: RULE_NO_TEMPLATE, 3: RULE_NO_TEMPLATE},
    ),
    # CalculatedContent over bodies that are objects or arrays. MultipleMatches' readings carry
    # no deviceId of their own, which the blood pressure template requires from the match.
    "calculated": Case(
        (_doc("HeartRate"), _doc("BloodPressure"), _doc("TransformData")),
        (HR, BP, HR_ARRAY, HEIGHTS, HR_STEPS, BP_MATCHES, HUB),
        {0: 1, 1: 1, 2: 3, 3: 2, 4: 1},
        {5: RULE_REQUIRED_VALUE, 6: RULE_NO_TEMPLATE},
    ),
    "calculated-several-matches": Case(
        (_doc("MultipleMeasurements"), _doc("MultipleMatches")),
        (HR_STEPS, BP_MATCHES),
        {0: 2, 1: 2},
    ),
    # The connector's basic templates want `deviceid` and `measurementdatetime` in the body.
    "basic": Case(
        ("templates/basic/devicecontent.json",),
        (HUB_BP_STEPS, HUB, HR),
        {},
        {0: RULE_REQUIRED_VALUE, 1: RULE_REQUIRED_VALUE, 2: RULE_NO_TEMPLATE},
    ),
    # IoT Central exports: each exported message routed on its own, the example, and the whole
    # export as one message (the Body array: every item is a match).
    "iot-central": Case(
        ("templates/sandbox/devicecontent.json",),
        (*(Sample(CENTRAL_EXPORT, "Body[i]", i) for i in range(3)), CENTRAL, HUB),
        {0: 5, 1: 2, 2: 5, 3: 2},
        {4: RULE_NO_TEMPLATE},
    ),
    # The sandbox's legacy templates (the shared folder itself is the template folder): the same
    # telemetry as the device sent it through IoT Hub, flat in the body. Blood pressure is nested
    # there, which `@Body.Systolic` does not reach; the IoT Central export has no `Body.HeartRate`.
    "iot-hub-legacy": Case(
        ("templates/sandbox/legacy",),
        (*(Sample(CENTRAL_EXPORT, "telemetry[i]", i) for i in range(3)), CENTRAL),
        {0: 4, 1: 2, 2: 4},
        {3: RULE_NO_TEMPLATE},
    ),
    "iot-central-export": Case(
        (f"{INPUT}/data_CollectionContentTemplateMultipleIotCentralJsonPath.json",),
        (Sample(CENTRAL_EXPORT),),
        {0: 6},
    ),
    # The connector's sample template reads `$.template.*`, which its sample export lacks.
    "iot-central-missing-values": Case(
        (f"{INPUT}/data_IotCentralJsonPathContentTemplateValid.json",),
        (CENTRAL,),
        {},
        {0: RULE_REQUIRED_VALUE},
    ),
}


def _templates(tmp_path: Path, files: tuple[str, ...]) -> DeviceTemplates:
    """A device template folder (JOURNEY_SOURCES__DEVICE_TEMPLATES_DIR) holding ``files``, or
    the shared folder itself when ``files`` names one."""
    if len(files) == 1 and (IOMT / files[0]).is_dir():
        return load_templates(IOMT / files[0])
    folder = tmp_path / "devices"
    folder.mkdir()
    for file in files:
        shutil.copy(IOMT / file, folder / file.replace("/", "_"))
    return load_templates(folder)


def _routed(sample: Sample, encoding: str) -> dict[str, Any]:
    """One message as IoT Hub's storage routing writes it in ``encoding``."""
    body, properties, system = sample.message()
    enqueued = system.get("enqueuedTime", DEFAULT_ENQUEUED)
    raw = orjson.dumps(body)
    if encoding == "json-base64":  # no content type declared: IoT Hub writes the bytes in base64
        payload: Any = base64.b64encode(raw).decode("ascii")
    else:
        system = {**system, "contentType": "application/json", "contentEncoding": "utf-8"}
        payload = body if encoding == "json" else raw
    return {
        "EnqueuedTimeUtc": enqueued,
        "Properties": properties,
        "SystemProperties": system,
        "Body": payload,
    }


def _blob(messages: list[dict[str, Any]], encoding: str) -> bytes:
    if encoding.startswith("json"):
        return b"".join(orjson.dumps(m) + b"\n" for m in messages)
    buffer = io.BytesIO()
    codec = "deflate" if encoding == "avrodeflate" else "null"
    fastavro.writer(buffer, fastavro.parse_schema(AVRO_SCHEMA), messages, codec=codec)
    return buffer.getvalue()


def _url(encoding: str) -> str:
    suffix = "json" if encoding.startswith("json") else "avro"
    return f"/landing/device/{encoding}/0/2019/02/01/22/45.{suffix}"


def _map(
    templates: DeviceTemplates, url: str, data: bytes
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    out = Extraction(device.SOURCE, "run-routing")
    device.map_blob(out, templates, url, data)
    return out.records().to_pylist(), out.rejects().to_pylist()


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_encoding_gives_the_same_bronze_records(shared_data: Path, tmp_path: Path, name: str) -> None:
    case = CASES[name]
    templates = _templates(tmp_path, case.templates)
    mapped: dict[str, list[tuple[Any, ...]]] = {}
    for encoding in ENCODINGS:
        url = _url(encoding)
        data = _blob([_routed(s, encoding) for s in case.samples], encoding)
        if encoding == "avrodeflate":
            assert b"deflate" in data[:200]  # the codec is declared in the container's header
        records, rejects = _map(templates, url, data)
        assert {r["source_uri"] for r in records + rejects} <= {url}
        assert {r["entity"] for r in records + rejects} <= {device.ENTITY}
        assert Counter(r["source_offset"] for r in records) == case.records, encoding
        assert {r["source_offset"]: r["rule"] for r in rejects} == case.rejects, encoding
        assert len(rejects) == len(case.rejects)  # one reject per rejected message
        assert all(r["detail"] and r["record_id"] is None for r in rejects)
        mapped[encoding] = [
            (r["record_id"], r["payload"], r["source_offset"], r["content_hash"]) for r in records
        ] + [(r["source_offset"], r["rule"], r["detail"]) for r in rejects]
    assert all(mapped[encoding] == mapped["avro"] for encoding in ENCODINGS)


def _payloads(templates: DeviceTemplates, samples: tuple[Sample, ...], encoding: str) -> list[dict[str, Any]]:
    records, rejects = _map(
        templates, _url(encoding), _blob([_routed(s, encoding) for s in samples], encoding)
    )
    assert rejects == []
    return [orjson.loads(r["payload"]) for r in records]


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_the_envelope_reaches_the_templates_in_every_encoding(
    shared_data: Path, tmp_path: Path, encoding: str
) -> None:
    templates = _templates(tmp_path, CASES["iot-hub"].templates)
    created, enqueued = _payloads(templates, (HUB, HUB_NO_CREATE_TIME), encoding)
    assert created == {
        "typeName": "heartrate",
        "template": f"{INPUT}_data_IotJsonPathContentTemplateValid.json",
        "match": 0,
        "deviceId": "ev-d795-1d04-55ae",  # the connection device id of the envelope
        "caseId": None,
        "patientId": None,
        "measuredAt": "2019-01-30T22:45:02.607374+00:00",  # Properties.iothub-creation-time-utc
        "iotDeviceId": "ev-d795-1d04-55ae",
        "enqueuedTime": "2019-02-01T22:46:01.875Z",
        "values": {"hr": "203"},
    }
    assert enqueued["measuredAt"] == "2019-02-01T22:46:01.875000+00:00"  # no creation time: enqueued


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_matches_of_one_message_are_records_with_their_own_values(
    shared_data: Path, tmp_path: Path, encoding: str
) -> None:
    templates = _templates(tmp_path, (_doc("TransformData"),))
    inches, meters = _payloads(templates, (HEIGHTS,), encoding)
    assert (inches["match"], inches["deviceId"], inches["values"]["height"]) == (
        0,
        "device123",
        pytest.approx(78 * 0.0254),  # JMESPath converted inches to meters
    )
    assert (meters["match"], meters["values"]) == (1, {"height": "1.9304"})  # as the device sent it
    assert inches["measuredAt"] != meters["measuredAt"]


def test_the_adapter_lists_both_blob_kinds_under_the_device_prefix(shared_data: Path, tmp_path: Path) -> None:
    templates = _templates(tmp_path, CASES["iot-hub"].templates)
    landing = tmp_path / "landing"
    for i, encoding in enumerate(ENCODINGS):
        blob = landing / "device" / "hub" / str(i) / "2019" / "02" / "01" / "22" / "45.avro"
        if encoding.startswith("json"):
            blob = blob.with_suffix(".json")
        blob.parent.mkdir(parents=True)
        blob.write_bytes(_blob([_routed(HUB, encoding)], encoding))
    (landing / "device" / "hub" / "README.txt").write_text("not a routed blob")
    out = device.extract(Storage(str(landing)), "device", InputSelection(), "run-routing", templates)
    assert out.record_count == len(ENCODINGS) and out.reject_count == 0
    assert len({r["record_id"] for r in out.records().to_pylist()}) == 1  # the same message four times
    assert out.ledger().num_rows == len(ENCODINGS)


# --------------------------------------------------------------------------- unreadable input


@pytest.fixture
def iot_hub_templates(shared_data: Path, tmp_path: Path) -> DeviceTemplates:
    return _templates(tmp_path, CASES["iot-hub"].templates)


@pytest.mark.parametrize("encoding", ["avro", "avrodeflate"])
def test_a_corrupt_avro_block_is_rejected_at_its_first_record(
    iot_hub_templates: DeviceTemplates, encoding: str
) -> None:
    data = _blob([_routed(HUB, encoding)] * 3, encoding)  # one block
    for broken in (data[: len(data) - 40], data[:-20] + b"\xff" * 20):
        records, rejects = _map(iot_hub_templates, _url(encoding), broken)
        assert records == []
        assert [(r["source_offset"], r["rule"]) for r in rejects] == [(0, "avro_block_readable")]
    records, rejects = _map(iot_hub_templates, _url(encoding), b"Obj\x01" + b"\x00" * 10)
    assert records == [] and [(r["source_offset"], r["rule"]) for r in rejects] == [
        (0, "avro_container_readable")
    ]
    records, rejects = _map(iot_hub_templates, _url(encoding), b'{"Body": "not Avro"}\n')
    assert records == [] and [(r["rule"], r["detail"]) for r in rejects] == [
        ("avro_container_readable", "not an Avro container file")
    ]


@pytest.mark.parametrize("encoding", ["avro", "avrodeflate"])
def test_the_blocks_before_a_corrupt_avro_block_still_load(
    iot_hub_templates: DeviceTemplates, encoding: str
) -> None:
    buffer = io.BytesIO()
    codec = "deflate" if encoding == "avrodeflate" else "null"
    # sync_interval=1: every record is a block of its own
    fastavro.writer(
        buffer, fastavro.parse_schema(AVRO_SCHEMA), [_routed(HUB, encoding)] * 4, codec=codec, sync_interval=1
    )
    data = buffer.getvalue()
    records, rejects = _map(iot_hub_templates, _url(encoding), data[:-30])
    assert sorted({r["source_offset"] for r in records}) == [0, 1, 2]
    assert [(r["source_offset"], r["rule"]) for r in rejects] == [(3, "avro_block_readable")]


@pytest.mark.parametrize(
    ("field", "value", "rule"),
    [
        ("Properties", "CANARY-PROPERTIES", "iothub_message_shape"),
        ("SystemProperties", [1, 2], "iothub_message_shape"),
        ("EnqueuedTimeUtc", 1549061162, "iothub_field_type"),
    ],
)
def test_an_envelope_field_of_the_wrong_type_is_a_rule_on_its_message(
    iot_hub_templates: DeviceTemplates, field: str, value: Any, rule: str
) -> None:
    good = _routed(HUB, "json")
    lines = [orjson.dumps(good), orjson.dumps({**good, field: value}), orjson.dumps(good)]
    records, rejects = _map(iot_hub_templates, _url("json"), b"\n".join(lines) + b"\n")
    assert sorted({r["source_offset"] for r in records}) == [0, 2]
    assert [(r["source_offset"], r["rule"]) for r in rejects] == [(1, rule)]
    assert str(value) not in rejects[0]["detail"]


def test_a_body_nested_too_deep_is_a_rule_on_its_message(iot_hub_templates: DeviceTemplates) -> None:
    good = _routed(HUB, "json")
    lines = [orjson.dumps(good), b'{"Body": ' + b'{"x":' * 600 + b"1" + b"}" * 600 + b"}"]
    records, rejects = _map(iot_hub_templates, _url("json"), b"\n".join(lines) + b"\n")
    assert sorted({r["source_offset"] for r in records}) == [0]
    assert [(r["source_offset"], r["rule"]) for r in rejects] == [(1, "json_nesting_depth")]


def test_a_non_json_line_is_rejected_and_the_other_lines_load(iot_hub_templates: DeviceTemplates) -> None:
    good = orjson.dumps(_routed(HUB, "json"))
    lines = [
        good,
        b'{"EnqueuedTimeUtc": "2019-02-01T22:46:02Z", "Body": {"heartrate": ',
        good,
        b"[1, 2]",
        good,
    ]
    records, rejects = _map(iot_hub_templates, _url("json"), b"\n".join(lines) + b"\n")
    assert [r["source_offset"] for r in records] == [0, 2, 4]
    assert [(r["source_offset"], r["rule"]) for r in rejects] == [
        (1, "json_well_formed"),
        (3, "iothub_message_shape"),
    ]


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_a_body_that_is_not_json_is_rejected_at_its_index(
    iot_hub_templates: DeviceTemplates, encoding: str
) -> None:
    messages = [_routed(HUB, encoding), _routed(HUB, encoding), _routed(HUB, encoding)]
    text = b"heartrate=203"
    if encoding == "json-base64":
        messages[1]["Body"] = base64.b64encode(text).decode("ascii")
    else:
        messages[1]["Body"] = text.decode() if encoding == "json" else text
    records, rejects = _map(iot_hub_templates, _url(encoding), _blob(messages, encoding))
    assert [r["source_offset"] for r in records] == [0, 2]
    assert [(r["source_offset"], r["rule"]) for r in rejects] == [(1, "json_well_formed")]
    assert "203" not in rejects[0]["detail"]
