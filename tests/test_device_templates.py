"""Device templates: the IoMT connector's own templates and samples, our surgical catalog, the generator."""

from __future__ import annotations

import io
import json
import re
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import fastavro
import orjson
import pytest

from patient_journey.device_templates import (
    RULE_NO_TEMPLATE,
    RULE_REQUIRED_VALUE,
    DeviceTemplates,
    Envelope,
    MappingResult,
    Measurement,
    compile_expression,
    containers_of,
    event_document,
    load_template_files,
    load_templates,
)
from patient_journey.errors import ConfigurationError
from patient_journey.generate.model import OR_DEVICE_MODELS, build_cohort
from patient_journey.generate.writers import write_device
from patient_journey.sources.device import decode_body
from tests.conftest import SHARED_DATA

REPO = Path(__file__).resolve().parents[1]
CATALOG = REPO / "catalog" / "devices"
SAMPLES = Path(__file__).parent / "data" / "device_messages"
IOMT = SHARED_DATA / "iomt-device-messages"
TEST_INPUT = IOMT / "template-test-input"

# The connector's sample device-content templates and how many content templates each holds.
CONNECTOR_TEMPLATES = {
    "basic/devicecontent.json": 6,
    "healthkitOnFhir/devicecontent.json": 17,
    "sandbox/devicecontent.json": 7,
    "sandbox/legacy/devicecontent.json": 7,
}
# Its FHIR mapping templates: a different kind of template, rejected with an error saying so.
CONNECTOR_FHIR_MAPPINGS = (
    "basic/fhirmapping.json",
    "healthkitOnFhir/fhirmapping.json",
    "sandbox/fhirmapping.json",
)

# Every file of template-test-input, by what it is. Valid templates: number of content templates.
VALID_INPUTS = {
    "data_CalculatedFunctionContentTemplateValid.json": 1,
    "data_CalculatedFunctionContentTemplateValidExpressionObject.json": 1,
    "data_CalculatedFunctionContentTemplateValidOptional.json": 1,
    "data_CollectionContentTemplateEmptyWithType.json": 0,  # the connector accepts an empty collection
    "data_CollectionContentTemplateHrAndSteps.json": 2,
    "data_CollectionContentTemplateHrAndStepsJmesPath.json": 2,
    "data_CollectionContentTemplateMixed.json": 17,
    "data_CollectionContentTemplateMultipleIotCentralJsonPath.json": 3,
    "data_CollectionFhirTemplateMixed.json": 17,  # despite its name, a CollectionContent template
    "data_Documentation_CalculatedFunction_BloodPressure_Template.json": 1,
    "data_Documentation_CalculatedFunction_HeartRate_Template.json": 1,
    "data_Documentation_CalculatedFunction_MultipleMatches_Template.json": 1,
    "data_Documentation_CalculatedFunction_MultipleMeasurements_Template.json": 2,
    "data_Documentation_CalculatedFunction_TransformData_Template.json": 2,
    "data_IotCentralJsonPathContentTemplateValid.json": 1,
    "data_IotCentralJsonPathContentTemplateValidWithOptional.json": 1,
    "data_IotJsonPathContentTemplateValid.json": 1,
    "data_IotJsonPathContentTemplateValidWithOptional.json": 1,
    "data_JsonPathContentTemplateValid.json": 1,
    "data_JsonPathContentTemplateValidWithOptional.json": 1,
}
# Invalid templates and a fragment the error must contain (besides the file name).
INVALID_INPUTS = {
    "data_CalculatedFunctionContentTemplateValidInvalidAndMissingMembers.json": "'typeMatchExpression'",
    "data_CollectionContentTemplateEmpty.json": "'templateType' is missing or empty",
    "data_CollectionContentTemplateInvalid.json": "'deviceIdExpression', 'timestampExpression'",
    "data_CollectionContentTemplateMixedValidity.json": "template 2 (bootTime): missing required field 'typeMatchExpression'",
    "data_CollectionContentTemplateMultipleMocks.json": "unknown templateType 'mockA'",
    "data_CollectionFhirTemplateEmpty.json": "'templateType' is missing or empty",
    "data_InvalidCollectionContentTemplateWithNoTemplateArray.json": "must be an array of templates",
    "data_InvalidJson.txt": "is not valid JSON",
    "data_InvalidTemplateType.json": "unknown templateType 'templateType'",
    "data_IotCentralJsonPathContentTemplateInvalidMissingTypeMetadata.json": "'typeName', 'typeMatchExpression'",
    "data_IotCentralJsonPathContentTemplateInvalidMissingValueField.json": "missing required field 'valueName'",
    "data_IotJsonPathContentTemplateInvalidMissingTypeMetadata.json": "'typeName', 'typeMatchExpression'",
    "data_IotJsonPathContentTemplateInvalidMissingValueField.json": "missing required field 'valueName'",
    "data_JsonPathContentTemplateInvalidMissingExpression.json": "'deviceIdExpression', 'timestampExpression'",
}
FHIR_INPUTS = (
    "data_CodeValueFhirTemplateInvalid_MissingCodeField.json",
    "data_CodeValueFhirTemplateInvalid_MissingFields.json",
    "data_CodeValueFhirTemplate_CodeableConceptAndStringComponent.json",
    "data_CodeValueFhirTemplate_CodeableConceptData.json",
    "data_CodeValueFhirTemplate_Components.json",
    "data_CodeValueFhirTemplate_Quantity.json",
    "data_CodeValueFhirTemplate_SampledData.json",
    "data_CodeValueFhirTemplate_String.json",
    "data_CollectionFhirTemplateEmptyWithType.json",
    "data_CollectionFhirTemplateInvalid.json",
    "data_CollectionFhirTemplateMixedValidity.json",
    "data_CollectionFhirTemplateMultipleMocks.json",
    "data_CollectionFhirTemplateValid.json",
    "data_InvalidCollectionFhirTemplateWithNoTemplateArray.json",
)
PAYLOADS = (  # messages, not templates: used by the mapping tests below
    "data_Documentation_CalculatedFunction_BloodPressure_Payload.json",
    "data_Documentation_CalculatedFunction_HeartRate_Payload.json",
    "data_Documentation_CalculatedFunction_MultipleMatches_Payload.json",
    "data_Documentation_CalculatedFunction_MultipleMeasurements_FromArray_Payload.json",
    "data_Documentation_CalculatedFunction_MultipleMeasurements_Payload.json",
    "data_Documentation_CalculatedFunction_TransformData_Payload.json",
    "data_IotCentralPayloadExample.json",
    "data_IotCentralPayloadExampleMultipleMessages.json",
    "data_IotHubPayloadExample.json",
    "data_IotHubPayloadExampleMissingCreateTime.json",
    "data_IotHubPayloadMultiValueExample.json",
)

NAVIGATION_TEMPLATE = {
    "templateType": "CollectionContent",
    "template": [
        {
            "templateType": "JsonPathContent",
            "template": {
                "typeName": "navigation-registration",
                "typeMatchExpression": "$..[?(@deviceType == 'navigation-system' && @event == 'registration')]",
                "deviceIdExpression": "$.serial",
                "timestampExpression": "$.eventTime",
                "caseIdExpression": "$.caseId",
                "values": [
                    {"valueName": "rmsErrorMm", "valueExpression": "$.rmsErrorMm", "required": True},
                    {"valueName": "landmarks", "valueExpression": "$.landmarks", "required": False},
                ],
            },
        }
    ],
}
NAVIGATION_MESSAGE = {
    "deviceType": "navigation-system",
    "udiDi": "00812345000080",
    "serial": "NV-7001",
    "caseId": "CASE-204871",
    "eventTime": "2025-02-11T09:05:12Z",
    "event": "registration",
    "rmsErrorMm": 0.42,
    "landmarks": 12,
}


def _payload(name: str) -> Any:
    return json.loads((TEST_INPUT / name).read_text(encoding="utf-8-sig"))


def _write(folder: Path, name: str, content: Any) -> Path:
    path = folder / name
    path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return path


def _template(tmp_path: Path, kind: str, body: dict[str, Any], name: str = "t.json") -> Path:
    return _write(
        tmp_path,
        name,
        {"templateType": "CollectionContent", "template": [{"templateType": kind, "template": body}]},
    )


def _values(result: MappingResult) -> list[tuple[str, str, Any]]:
    return [(r.type_name, r.value_name, r.value) for r in result.rows]


def _utc(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


@pytest.fixture(scope="module")
def catalog() -> DeviceTemplates:
    return load_templates(CATALOG)


# --------------------------------------------------------------------------- the connector's files


@pytest.mark.shared_data
def test_every_template_test_input_file_is_classified(shared_data: Path) -> None:
    known = set(VALID_INPUTS) | set(INVALID_INPUTS) | set(FHIR_INPUTS) | set(PAYLOADS)
    assert {p.name for p in TEST_INPUT.iterdir()} == known


@pytest.mark.shared_data
@pytest.mark.parametrize(("name", "count"), sorted(CONNECTOR_TEMPLATES.items()))
def test_connector_device_content_templates_load(shared_data: Path, name: str, count: int) -> None:
    templates = load_template_files([IOMT / "templates" / name])
    assert len(templates) == count


@pytest.mark.shared_data
@pytest.mark.parametrize("name", CONNECTOR_FHIR_MAPPINGS)
def test_connector_fhir_mapping_templates_are_rejected_as_such(shared_data: Path, name: str) -> None:
    with pytest.raises(ConfigurationError, match="IoMT FHIR mapping template") as error:
        load_template_files([IOMT / "templates" / name])
    assert name in str(error.value)


@pytest.mark.shared_data
@pytest.mark.parametrize(("name", "count"), sorted(VALID_INPUTS.items()))
def test_valid_template_inputs_load(shared_data: Path, name: str, count: int) -> None:
    assert len(load_template_files([TEST_INPUT / name])) == count


@pytest.mark.shared_data
@pytest.mark.parametrize(("name", "fragment"), sorted(INVALID_INPUTS.items()))
def test_invalid_template_inputs_raise_naming_the_file(shared_data: Path, name: str, fragment: str) -> None:
    with pytest.raises(ConfigurationError) as error:
        load_template_files([TEST_INPUT / name])
    message = str(error.value)
    assert f"{TEST_INPUT / name}: " in message
    assert fragment in message


@pytest.mark.shared_data
@pytest.mark.parametrize("name", FHIR_INPUTS)
def test_fhir_template_inputs_are_rejected_as_fhir_mappings(shared_data: Path, name: str) -> None:
    with pytest.raises(ConfigurationError, match="FHIR mapping template"):
        load_template_files([TEST_INPUT / name])


@pytest.mark.shared_data
def test_iot_hub_payload_maps_with_device_creation_time(shared_data: Path) -> None:
    templates = load_template_files([TEST_INPUT / "data_IotJsonPathContentTemplateValid.json"])
    event = _payload("data_IotHubPayloadExample.json")
    envelope = Envelope(system_properties=event["SystemProperties"], properties=event["Properties"])
    result = templates.map_message(event["Body"], envelope)
    assert result.rejects == []
    [row] = result.rows
    assert (row.type_name, row.device_id, row.value_name, row.value) == (
        "heartrate",
        "ev-d795-1d04-55ae",
        "hr",
        "203",
    )
    assert row.measured_at == _utc("2019-01-30T22:45:02.607374Z")  # Properties.iothub-creation-time-utc
    assert row.template == "data_IotJsonPathContentTemplateValid.json" and row.case_id is None


@pytest.mark.shared_data
def test_iot_hub_payload_without_creation_time_uses_enqueued_time(shared_data: Path) -> None:
    templates = load_template_files([TEST_INPUT / "data_IotJsonPathContentTemplateValid.json"])
    [row] = templates.map_event(_payload("data_IotHubPayloadExampleMissingCreateTime.json")).rows
    assert row.measured_at == _utc("2019-02-01T22:46:01.875Z") and row.value == "203"


@pytest.mark.shared_data
def test_iot_hub_multi_value_payload(shared_data: Path, tmp_path: Path) -> None:
    path = _template(
        tmp_path,
        "IotJsonPathContent",
        {
            "typeName": "bloodpressure",
            "typeMatchExpression": "$..[?(@Body.systolic && @Body.diastolic)]",
            "values": [
                {"valueName": "systolic", "valueExpression": "$.Body.systolic", "required": True},
                {"valueName": "diastolic", "valueExpression": "$.Body.diastolic", "required": True},
            ],
        },
    )
    result = load_template_files([path]).map_event(_payload("data_IotHubPayloadMultiValueExample.json"))
    assert _values(result) == [("bloodpressure", "systolic", "111"), ("bloodpressure", "diastolic", "75")]
    assert {r.device_id for r in result.rows} == {"ev-d795-1d04-55ae"}


@pytest.mark.shared_data
def test_iot_central_export_with_several_messages(shared_data: Path) -> None:
    templates = load_template_files(
        [TEST_INPUT / "data_CollectionContentTemplateMultipleIotCentralJsonPath.json"]
    )
    result = templates.map_event(_payload("data_IotCentralPayloadExampleMultipleMessages.json"))
    assert result.rejects == []
    first: dict[tuple[str, str], Measurement] = {}
    for row in result.rows:
        first.setdefault((row.type_name, row.value_name), row)
    assert {(r.type_name, r.value_name): r.value for r in first.values()} == {
        ("heartrate", "hr"): 75,
        ("respiratoryrate", "respiratoryrate"): 15,
        ("bloodpressure", "systolic"): 62,
        ("bloodpressure", "diastolic"): 30,
    }
    matches = {(r.type_name, r.measured_at) for r in result.rows}
    assert len(matches) == 6  # two of each type, as in the connector's own test
    hr = first[("heartrate", "hr")]
    assert hr.device_id == hr.patient_id == "1qsi9p8t5l2"
    assert hr.measured_at == _utc("2021-06-08T19:45:20.202Z")  # the export's enqueuedTime


@pytest.mark.shared_data
def test_sandbox_iot_central_templates_map_each_exported_message(shared_data: Path) -> None:
    templates = load_template_files([IOMT / "templates" / "sandbox" / "devicecontent.json"])
    bodies = _payload("data_IotCentralPayloadExampleMultipleMessages.json")["Body"]
    result = templates.map_messages((body, None) for body in bodies)
    assert result.messages == 3 and result.rejects == []
    assert {(r.message, r.type_name) for r in result.rows if r.message == 1} == {
        (1, "rangeofmotion"),
        (1, "kneebend"),
    }
    assert [r.value for r in result.rows if r.type_name == "kneebend"] == [-19]


@pytest.mark.shared_data
@pytest.mark.parametrize(
    ("template", "payload", "expected"),
    [
        ("HeartRate", "HeartRate", [("2019-02-01T22:46:01.875Z", {"hr": "78"})]),
        (
            "BloodPressure",
            "BloodPressure",
            [("2019-02-01T22:46:01.875Z", {"systolic": "123", "diastolic": "87"})],
        ),
        (
            "MultipleMeasurements",
            "MultipleMeasurements",
            [("2019-02-01T22:46:01.875Z", {"hr": "78"}), ("2019-02-01T22:46:01.875Z", {"steps": "2"})],
        ),
        (
            "HeartRate",
            "MultipleMeasurements_FromArray",
            [
                ("2019-02-01T20:46:01.875Z", {"hr": "78"}),
                ("2019-02-01T21:46:01.875Z", {"hr": "81"}),
                ("2019-02-01T22:46:01.875Z", {"hr": "72"}),
            ],
        ),
        (
            "MultipleMatches",
            "MultipleMatches",
            [
                ("2021-07-13T17:29:01.061144Z", {"systolic": "120", "diastolic": "80"}),
                ("2021-07-13T17:28:01.061122Z", {"systolic": "122", "diastolic": "82"}),
            ],
        ),
    ],
)
def test_connector_documentation_examples(
    shared_data: Path, template: str, payload: str, expected: list[tuple[str, dict[str, str]]]
) -> None:
    templates = load_template_files(
        [TEST_INPUT / f"data_Documentation_CalculatedFunction_{template}_Template.json"]
    )
    result = templates.map_event(_payload(f"data_Documentation_CalculatedFunction_{payload}_Payload.json"))
    assert result.rejects == []
    got: dict[tuple[str, datetime], dict[str, Any]] = {}
    for row in result.rows:
        assert row.device_id == "device123"
        got.setdefault((row.type_name, row.measured_at), {})[row.value_name] = row.value
    assert sorted(got.values(), key=str) == sorted((values for _, values in expected), key=str)
    assert sorted(at for _, at in got) == sorted(_utc(at) for at, _ in expected)


@pytest.mark.shared_data
def test_connector_transform_example_converts_with_jmespath(shared_data: Path) -> None:
    templates = load_template_files(
        [TEST_INPUT / "data_Documentation_CalculatedFunction_TransformData_Template.json"]
    )
    result = templates.map_event(_payload("data_Documentation_CalculatedFunction_TransformData_Payload.json"))
    by_time = {r.measured_at: r.value for r in result.rows}
    assert by_time[_utc("2019-02-01T22:46:01.875Z")] == pytest.approx(1.9812)  # 78 inches
    assert by_time[_utc("2019-02-01T23:46:01.875Z")] == "1.9304"  # already in meters: as given


@pytest.mark.shared_data
@pytest.mark.parametrize(
    "name",
    [
        "data_CollectionContentTemplateHrAndSteps.json",
        "data_CollectionContentTemplateHrAndStepsJmesPath.json",
    ],
)
def test_connector_normalization_examples(shared_data: Path, name: str) -> None:
    templates = load_template_files([TEST_INPUT / name])
    date = "2025-01-02T03:04:05Z"
    both = templates.map_event({"heartrate": "60", "steps": "2", "device": "abc", "date": date})
    assert _values(both) == [("heartrate", "hr", "60"), ("steps", "steps", "2")]
    assert {(r.device_id, r.measured_at) for r in both.rows} == {("abc", _utc(date))}
    only_hrv = templates.map_event({"hrv": "5", "device": "abc", "date": date})
    assert only_hrv.rows == [] and [r.rule for r in only_hrv.rejects] == [RULE_NO_TEMPLATE]


@pytest.mark.shared_data
def test_basic_templates_reject_a_body_without_device_id(shared_data: Path) -> None:
    templates = load_template_files([IOMT / "templates" / "basic" / "devicecontent.json"])
    result = templates.map_event(_payload("data_IotHubPayloadMultiValueExample.json"))
    assert result.rows == []
    assert {(r.rule, r.type_name) for r in result.rejects} == {
        (RULE_REQUIRED_VALUE, "steps"),
        (RULE_REQUIRED_VALUE, "bloodpressure"),
    }
    assert all("$.deviceid found no value" in r.detail for r in result.rejects)


# --------------------------------------------------------------------------- our catalog


def _sample_cases() -> list[Any]:
    cases = []
    for path in sorted(SAMPLES.glob("*.json")):
        doc = json.loads(path.read_text(encoding="utf-8"))
        for i, message in enumerate(doc["messages"]):
            cases.append(pytest.param(doc["template"], message, id=f"{path.stem}-{i}"))
    return cases


def test_catalog_loads_and_every_template_file_has_sample_messages(catalog: DeviceTemplates) -> None:
    files = sorted(p.name for p in CATALOG.glob("*.json"))
    assert list(catalog.files) == files and len(files) >= 6
    assert sorted(p.name for p in SAMPLES.glob("*.json")) == files
    assert {"robotic-instrument", "robotic-console", "energy-activation", "stapler-fire"} <= set(
        catalog.type_names()
    )


@pytest.mark.parametrize(("template", "message"), _sample_cases())
def test_catalog_maps_sample_messages(
    catalog: DeviceTemplates, template: str, message: dict[str, Any]
) -> None:
    envelope = Envelope(
        system_properties=message.get("systemProperties", {}), enqueued_time=message.get("enqueuedTimeUtc")
    )
    result = catalog.map_message(message["body"], envelope)
    expected = message["expected"]
    assert [r.rule for r in result.rejects] == expected["rejects"]
    got: list[dict[str, Any]] = []
    for row in result.rows:
        assert row.template == template
        key = {
            "typeName": row.type_name,
            "deviceId": row.device_id,
            "caseId": row.case_id,
            "measuredAt": row.measured_at,
        }
        if not got or {k: got[-1][k] for k in key} != key:
            got.append({**key, "values": {}})
        got[-1]["values"][row.value_name] = row.value
    want = [{**m, "measuredAt": _utc(m["measuredAt"])} for m in expected["matches"]]
    assert [{k: v for k, v in g.items() if k != "values"} for g in got] == [
        {k: v for k, v in w.items() if k != "values"} for w in want
    ]
    for g, w in zip(got, want, strict=True):
        assert g["values"] == {
            k: pytest.approx(v) if isinstance(v, float) else v for k, v in w["values"].items()
        }
        assert all(type(g["values"][k]) is type(v) for k, v in w["values"].items())


def test_generator_device_messages_all_map(catalog: DeviceTemplates, tmp_path: Path) -> None:
    """Every device kind the generator writes has a template, and its Avro messages map whole."""
    assert {f"{kind}.json" for kind in OR_DEVICE_MODELS} <= set(catalog.files)
    cohort = build_cohort(patients=6, seed=7)
    events = [e for j in cohort.journeys for e in j.events]
    write_device(tmp_path, events)
    messages = []
    for blob in sorted(tmp_path.rglob("*.avro")):
        for record in fastavro.reader(io.BytesIO(blob.read_bytes())):
            assert isinstance(record, dict)
            messages.append((orjson.loads(record["Body"]), Envelope.from_routed_record(record)))
    for blob in sorted(tmp_path.rglob("*.json")):  # IoT Hub's JSON encoding: embedded or base64 bodies
        for line in blob.read_bytes().splitlines():
            record = orjson.loads(line)
            messages.append((decode_body(record["Body"]), Envelope.from_routed_record(record)))
    result = catalog.map_messages(messages)
    assert result.messages == len(events) > 0
    assert result.rejects == []
    events_by_row: dict[int, dict[str, Any]] = {}
    for row in result.rows:
        events_by_row.setdefault(row.message, {"row": row, "values": {}})["values"][row.value_name] = (
            row.value
        )
    assert len(events_by_row) == len(messages)
    for index, found in events_by_row.items():
        body = messages[index][0]
        first: Measurement = found["row"]
        assert (first.type_name, first.template) == (body["deviceType"], f"{body['deviceType']}.json")
        assert (first.device_id, first.case_id) == (body["serial"], body["caseId"])
        assert first.measured_at == _utc(body["timestamp"])
        expected = {"event": body["eventType"], "udiDi": body["udiDi"], "firmware": body["firmware"]}
        if body["value"] is not None:
            expected |= {"value": body["value"], "unit": body["unit"]}
        assert found["values"] == expected


def test_a_message_no_template_matches(catalog: DeviceTemplates) -> None:
    body = {"deviceType": "smoke-evacuator", "serial": "SE-1", "caseId": "CASE-999999", "flow": 42}
    result = catalog.map_message(body, message=17)
    assert result.rows == []
    [reject] = result.rejects
    assert (reject.message, reject.rule, reject.template) == (17, RULE_NO_TEMPLATE, None)
    assert "CASE-999999" not in reject.detail and "SE-1" not in reject.detail


def test_a_required_value_missing_rejects_the_whole_message(catalog: DeviceTemplates, tmp_path: Path) -> None:
    body = {
        "deviceType": "surgical-stapler",
        "serial": "ST-5521",
        "caseId": "CASE-204871",
        "eventTime": "2025-02-11T10:01:00Z",
        "event": "fire",
        "cartridge": "60mm-blue",
        "clampForceN": 98.0,
    }
    result = catalog.map_message(body)
    assert result.rows == []
    [reject] = result.rejects
    assert (reject.rule, reject.template, reject.type_name) == (
        RULE_REQUIRED_VALUE,
        "surgical-stapler.json",
        "stapler-fire",
    )
    assert "'firingCount'" in reject.detail and "98" not in reject.detail and "60mm" not in reject.detail

    # Atomic: another template that matches the same message and succeeds gives no rows either.
    _write(
        tmp_path,
        "stapler-cartridge.json",
        {
            "templateType": "JsonPathContent",
            "template": {
                "typeName": "stapler-cartridge",
                "typeMatchExpression": "$..[?(@deviceType == 'surgical-stapler')]",
                "deviceIdExpression": "$.serial",
                "timestampExpression": "$.eventTime",
                "values": [{"valueName": "cartridge", "valueExpression": "$.cartridge", "required": True}],
            },
        },
    )
    shutil.copy(CATALOG / "surgical-stapler.json", tmp_path)
    both = load_templates(tmp_path).map_message(body)
    assert both.rows == [] and [r.type_name for r in both.rejects] == ["stapler-fire"]
    body["firingCount"] = 2
    assert {r.type_name for r in load_templates(tmp_path).map_message(body).rows} == {
        "stapler-fire",
        "stapler-cartridge",
    }


def test_adding_a_device_type_is_adding_a_file(tmp_path: Path) -> None:
    folder = tmp_path / "devices"
    shutil.copytree(CATALOG, folder, ignore=shutil.ignore_patterns("*.md"))
    before = load_templates(folder).map_message(NAVIGATION_MESSAGE)
    assert before.rows == [] and [r.rule for r in before.rejects] == [RULE_NO_TEMPLATE]

    _write(folder, "navigation-system.json", json.dumps(NAVIGATION_TEMPLATE, indent=2))
    after = load_templates(folder).map_message(NAVIGATION_MESSAGE)
    assert after.rejects == []
    assert [(r.type_name, r.template, r.device_id, r.case_id, r.value_name, r.value) for r in after.rows] == [
        ("navigation-registration", "navigation-system.json", "NV-7001", "CASE-204871", "rmsErrorMm", 0.42),
        ("navigation-registration", "navigation-system.json", "NV-7001", "CASE-204871", "landmarks", 12),
    ]
    assert after.rows[0].measured_at == datetime(2025, 2, 11, 9, 5, 12, tzinfo=UTC)


def test_the_readme_worked_example_is_the_tested_one() -> None:
    readme = (CATALOG / "README.md").read_text(encoding="utf-8")
    start = readme.index('{\n  "templateType": "CollectionContent"', readme.index("## Worked example"))
    end = readme.index("```", start)
    assert json.loads(readme[start:end]) == NAVIGATION_TEMPLATE


# --------------------------------------------------------------------------- load errors


def _load_error(tmp_path: Path, content: Any, name: str = "device.json") -> str:
    _write(tmp_path, name, content)
    with pytest.raises(ConfigurationError) as error:
        load_templates(tmp_path)
    message = str(error.value)
    assert f"{tmp_path / name}: " in message
    return message


GOOD_BODY: dict[str, Any] = {
    "typeName": "t",
    "typeMatchExpression": "$..[?(@x)]",
    "deviceIdExpression": "$.serial",
    "timestampExpression": "$.at",
    "values": [{"valueName": "x", "valueExpression": "$.x", "required": True}],
}


def _collection(kind: str = "JsonPathContent", **changes: Any) -> dict[str, Any]:
    body = {k: v for k, v in {**GOOD_BODY, **changes}.items() if v is not None}
    return {"templateType": "CollectionContent", "template": [{"templateType": kind, "template": body}]}


@pytest.mark.parametrize(
    ("changes", "kind", "fragment"),
    [
        (
            {"typeMatchExpression": "$..[?(@x ==)]"},
            "JsonPathContent",
            "typeMatchExpression: bad JSONPath '$..[?(@x ==)]'",
        ),
        ({"deviceIdExpression": "serial"}, "JsonPathContent", "must start with '$'"),
        (
            {"timestampExpresion": "$.at", "timestampExpression": None},
            "JsonPathContent",
            "did you mean 'timestampExpression'",
        ),
        ({"deviceIdExpression": {"value": "$.serial"}}, "JsonPathContent", "takes a JSONPath string"),
        (
            {"deviceIdExpression": {"value": "serial", "language": "FhirPath"}},
            "CalculatedContent",
            "unsupported expression language 'FhirPath'",
        ),
        (
            {"defaultExpressionLanguage": "XPath"},
            "CalculatedContent",
            "unsupported expression language 'XPath'",
        ),
        (
            {"deviceIdExpression": {"value": "serial[", "language": "JmesPath"}},
            "CalculatedContent",
            "bad JMESPath 'serial['",
        ),
        (
            {"deviceIdExpression": {"value": "nosuch(serial)", "language": "JmesPath"}},
            "CalculatedContent",
            "unknown JMESPath function nosuch()",
        ),
        ({"values": []}, "JsonPathContent", "'values' must be a non-empty array"),
        (
            {"values": [{"valueName": "x", "valueExpression": "$.x", "required": "yes"}]},
            "JsonPathContent",
            "'required' must be true or false",
        ),
        (
            {"values": [{"valueName": "x", "valueExpression": "$.x"}] * 2},
            "JsonPathContent",
            "valueName appears twice",
        ),
        ({"typeName": None}, "JsonPathContent", "missing required field 'typeName'"),
        ({}, "IotJsonPathContent", "IotJsonPathContent sets 'deviceIdExpression' itself"),
        ({}, "CodeValueFhir", "IoMT FHIR mapping template"),
        ({}, "CollectionContent", "cannot be nested"),
    ],
)
def test_invalid_templates_fail_the_load_naming_file_and_problem(
    tmp_path: Path, changes: dict[str, Any], kind: str, fragment: str
) -> None:
    assert fragment in _load_error(tmp_path, _collection(kind, **changes))


def test_every_problem_of_every_file_is_listed_at_once(tmp_path: Path) -> None:
    _write(tmp_path, "a.json", _collection(typeMatchExpression="$.[", values=[]))
    _write(tmp_path, "b.json", "{ not json")
    with pytest.raises(ConfigurationError) as error:
        load_templates(tmp_path)
    message = str(error.value)
    assert "(2 problems)" in message
    assert (
        f"{tmp_path / 'a.json'}: template 0 (t)" in message
        and f"{tmp_path / 'b.json'}: is not valid JSON" in message
    )


def test_missing_or_empty_template_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="does not exist"):
        load_templates(tmp_path / "nowhere")
    with pytest.raises(ConfigurationError, match=r"no \*\.json template files"):
        load_templates(tmp_path)


def test_template_type_names_match_like_the_connector(tmp_path: Path) -> None:
    doc = _collection("jsonPathContentTemplate")
    doc["templateType"] = "collectioncontenttemplate"
    _write(tmp_path, "t.json", doc)
    assert [t.kind for t in load_templates(tmp_path).templates] == ["JsonPathContent"]


# --------------------------------------------------------------------------- mapping details


def test_envelope_offers_both_iot_hub_property_names() -> None:
    record = {
        "EnqueuedTimeUtc": "2025-01-14T08:02:19.4410000Z",
        "Properties": {"k": "v"},
        "SystemProperties": {"connectionDeviceId": "robotic-arm-RA-10001", "contentType": "application/json"},
    }
    document = event_document({"a": 1}, Envelope.from_routed_record(record))
    assert document["Body"] == {"a": 1} and document["Properties"] == {"k": "v"}
    system = document["SystemProperties"]
    assert system["iothub-connection-device-id"] == system["connectionDeviceId"] == "robotic-arm-RA-10001"
    assert system["iothub-enqueuedtime"] == "2025-01-14T08:02:19.4410000Z"
    assert system["iothub-content-type"] == "application/json"
    when = datetime(2025, 1, 1, tzinfo=UTC)
    assert (
        event_document(None, Envelope(enqueued_time=when))["SystemProperties"]["iothub-enqueuedtime"]
        == when.isoformat()
    )


def test_iot_template_reads_a_routed_avro_message(tmp_path: Path) -> None:
    path = _template(
        tmp_path,
        "IotJsonPathContentTemplate",
        {
            "typeName": "arm",
            "typeMatchExpression": "$..[?(@Body.eventType)]",
            "caseIdExpression": "$.Body.caseId",
            "values": [{"valueName": "event", "valueExpression": "$.Body.eventType", "required": "true"}],
        },
    )
    record = {
        "EnqueuedTimeUtc": "2025-01-14T08:02:19.4410000Z",
        "Properties": {},
        "SystemProperties": {"connectionDeviceId": "robotic-arm-RA-10001"},
    }
    [row] = (
        load_templates(tmp_path)
        .map_message({"eventType": "session_start", "caseId": "CASE-1"}, Envelope.from_routed_record(record))
        .rows
    )
    assert path.name == row.template
    assert (row.device_id, row.case_id, row.value) == ("robotic-arm-RA-10001", "CASE-1", "session_start")
    assert row.measured_at == datetime(2025, 1, 14, 8, 2, 19, 441000, tzinfo=UTC)


@pytest.mark.parametrize(
    ("message", "fragment"),
    [
        ({"x": 1, "serial": "S", "at": "not a time"}, "gave no ISO-8601 time"),
        ({"x": 1, "serial": {"id": 1}, "at": "2025-01-01T00:00:00Z"}, "device id missing"),
        ({"x": None, "serial": "S", "at": "2025-01-01T00:00:00Z"}, "required value 'x' missing"),
        ({"x": "  ", "serial": "S", "at": "2025-01-01T00:00:00Z"}, "required value 'x' missing"),
        ({"x": [1, 2], "serial": "S", "at": "2025-01-01T00:00:00Z"}, "is not a single value"),
    ],
)
def test_required_fields_follow_the_connector_presence_rule(
    tmp_path: Path, message: dict[str, Any], fragment: str
) -> None:
    _write(tmp_path, "t.json", _collection())
    result = load_templates(tmp_path).map_message(message)
    assert result.rows == [] and [r.rule for r in result.rejects] == [RULE_REQUIRED_VALUE]
    assert fragment in result.rejects[0].detail


def test_several_nodes_for_one_value_reject_and_times_convert_to_utc(tmp_path: Path) -> None:
    _write(tmp_path, "t.json", _collection(deviceIdExpression="$..serial"))
    templates = load_templates(tmp_path)
    ambiguous = templates.map_message(
        {"x": 1, "serial": "S", "at": "2025-01-01T00:00:00Z", "n": {"serial": "T"}}
    )
    assert "selected 2 values; expected one" in ambiguous.rejects[0].detail
    [row] = templates.map_message({"x": 1, "serial": 7, "at": "2025-01-01T02:00:00+02:00"}).rows
    assert (row.device_id, row.measured_at) == ("7", datetime(2025, 1, 1, tzinfo=UTC))
    [naive] = templates.map_message({"x": 1, "serial": "S", "at": "2025-01-01T02:00:00"}).rows
    assert naive.measured_at == datetime(2025, 1, 1, 2, tzinfo=UTC)


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("add(matchedToken.a, `2`)", 12),
        ("subtract(matchedToken.a, `2`)", 8),
        ("divide(matchedToken.a, `4`)", 2.5),
        ("pow(matchedToken.a, `2`)", 100.0),
        ("insertString('suess', 'cc', `2`)", "success"),
        ("fromUnixTimestamp(`1625677200`)", "2021-07-07T17:00:00+00:00"),
        ("fromUnixTimestampMs(`1626799080000`)", "2021-07-20T16:38:00+00:00"),
    ],
)
def test_connector_jmespath_functions(tmp_path: Path, expression: str, expected: Any) -> None:
    _write(
        tmp_path,
        "t.json",
        _collection(
            "CalculatedContent",
            deviceIdExpression="$.matchedToken.serial",
            timestampExpression="$.matchedToken.at",
            values=[{"valueName": "v", "valueExpression": {"value": expression, "language": "JmesPath"}}],
        ),
    )
    [row] = (
        load_templates(tmp_path)
        .map_message({"x": 1, "a": 10, "serial": "S", "at": "2025-01-01T00:00:00Z"})
        .rows
    )
    assert row.value == expected


def test_an_expression_that_fails_on_a_message_rejects_it(tmp_path: Path) -> None:
    _write(
        tmp_path,
        "t.json",
        _collection(
            "CalculatedContent",
            deviceIdExpression="$.matchedToken.serial",
            timestampExpression="$.matchedToken.at",
            values=[
                {
                    "valueName": "v",
                    "valueExpression": {"value": "divide(matchedToken.a, `0`)", "language": "JmesPath"},
                }
            ],
        ),
    )
    result = load_templates(tmp_path).map_message(
        {"x": 1, "a": 10, "serial": "S", "at": "2025-01-01T00:00:00Z"}
    )
    assert result.rows == [] and "failed (ZeroDivisionError)" in result.rejects[0].detail


def test_map_messages_numbers_rows_and_rejects_by_message(catalog: DeviceTemplates) -> None:
    messages = [
        (NAVIGATION_MESSAGE, None),
        (json.loads((SAMPLES / "robotic-platform.json").read_text())["messages"][2]["body"], None),
    ]
    result = catalog.map_messages(messages)
    assert result.messages == 2
    assert [(r.message, r.rule) for r in result.rejects] == [(0, RULE_NO_TEMPLATE)]
    assert {r.message for r in result.rows} == {1}


DIALECT_EVENT = {
    "Body": {
        "batch": [{"heartRate": 70, "at": "a"}, {"steps": 3}, {"heartRate": 72, "at": "b"}],
        "telemetry": [{"name": "x", "v": 1}, {"name": "y", "v": 2}],
        "mode": "x",
    },
    "Properties": {"a b": "spaced"},
    "SystemProperties": {"iothub-connection-device-id": "dev-1"},
}


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("$..[?(@heartRate)]", [{"heartRate": 70, "at": "a"}, {"heartRate": 72, "at": "b"}]),
        ("$..[?(@heartRate && @at == 'b')]", [{"heartRate": 72, "at": "b"}]),
        ("$..[?(@steps || @heartRate > 71)]", [{"steps": 3}, {"heartRate": 72, "at": "b"}]),
        ("$..[?(@Body.mode)]", [DIALECT_EVENT]),  # the root itself matches, as in Newtonsoft
        ("$..[?(@['a b'])]", [{"a b": "spaced"}]),
        ("$..[?(@heartRate)].at", ["a", "b"]),
        ("$.Body.telemetry[?(@.name == 'y')].v", [2]),
        ("$.SystemProperties.iothub-connection-device-id", ["dev-1"]),
        ("$['Properties']['a b']", ["spaced"]),
        ("$.Body.batch[1].steps", [3]),
        ("$.Body.missing.deeper", []),
        ("$..[?(@ == 'x')]", ["x", "x"]),  # a bare @ tests scalars too (python-jsonpath path)
        ("$..[?(@.mode == $.Body.mode)]", [DIALECT_EVENT["Body"]]),  # $ inside a filter is the root
    ],
)
def test_newtonsoft_jsonpath_dialect(expression: str, expected: list[Any]) -> None:
    compiled = compile_expression(expression, "JsonPath", "test")
    assert compiled.select(DIALECT_EVENT) == expected
    assert compiled.select(DIALECT_EVENT, containers_of(DIALECT_EVENT)) == expected


# The type-match filters run as Python predicates (`_member_filter`) where they can; these must
# select exactly what python-jsonpath selects, on every value shape a message may carry.
FILTER_VALUES: list[Any] = [None, True, False, 0, 1, 1.0, 2.5, "1", "x", "", [], [1], {}, {"b": "x"}]
SHIPPED_FILTERS = sorted(
    {
        text
        for folder in (
            Path(__file__).parents[1] / "catalog" / "devices",
            SHARED_DATA / "iomt-device-messages",
        )
        for path in folder.rglob("*.json")
        for text in re.findall(r'"typeMatchExpression":\s*"([^"]*)"', path.read_text())
        if text.startswith("$..[?(") and text.endswith(")]") and "!=" not in text
    }
)


@pytest.mark.parametrize(
    "expression",
    [
        *SHIPPED_FILTERS,
        "$..[?(@a)]",
        "$..[?(@.a.b)]",
        "$..[?(@['a'] == 1)]",
        "$..[?(@a == true)]",
        "$..[?(@a == false)]",
        "$..[?(@a == null)]",
        "$..[?(@a == 1.0)]",
        "$..[?(@a == '1')]",
        "$..[?(@a.b == 'x' || @c && @a)]",
        "$..[?((@a == 'x' || @c) && @a)]",
        '$..[?(@a == "x" && (@c == 2.5 || @c == 0))]',
    ],
)
def test_member_filters_select_what_python_jsonpath_selects(expression: str) -> None:
    import jsonpath

    from patient_journey.device_templates import _member_filter

    test = _member_filter(expression[len("$..[?(") : -2])
    assert test is not None, "this filter should take the fast path"
    reference = jsonpath.JSONPathEnvironment().compile("$" + expression[3:])
    nodes = [
        {"a": a, "c": c, "deviceType": d, "event": e, "clampForceN": a}
        for a in FILTER_VALUES
        for c in (None, 2.5, 0, "x")
        for d, e in (("surgical-stapler", "fire"), ("robotic-platform", "console_time"), ("tourniquet", None))
    ] + [{}, {"c": 1}, {"deviceType": "powered-saw"}]
    for node in nodes:
        expected = [m.obj for m in reference.finditer([node])] == [node]
        assert test(node) == expected, node


@pytest.mark.parametrize(
    "inside", ["@a != 'x'", "@a < 3", "!@a", "@", "@a == @b", "@a ==", "(@a", "@a =~ /x/"]
)
def test_other_filters_are_left_to_python_jsonpath(inside: str) -> None:
    from patient_journey.device_templates import _member_filter

    assert _member_filter(inside) is None
