"""docs/adding-a-device-type.md, run as written.

The template, the suite, the sample messages and the script that writes test messages are read
from the page itself (the blocks tagged ``<!-- file: ... -->`` or ``<!-- example: ... -->``), so
the page and this test cannot drift apart. Everything happens in a tmp folder holding copies of
catalog/devices and expectations/, with settings pointing at them.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import re
import runpy
import shutil
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import fastavro
import orjson
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from journey_cli import app
from patient_journey import pipeline
from patient_journey.device_templates import RULE_NO_TEMPLATE, RULE_REQUIRED_VALUE
from patient_journey.errors import ConfigurationError, ExpectationSuiteError
from patient_journey.generate import generate
from patient_journey.increments import stored_passed
from patient_journey.lake import Lake
from patient_journey.quality import QualityGate
from patient_journey.query import run_query
from patient_journey.settings import JourneySettings
from tests.conftest import settings_for

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "adding-a-device-type.md"
TEMPLATE = "catalog/devices/smoke-evacuator.json"
SUITE = "expectations/device/smoke-evacuation.json"
SCRIPT = "write_smoke_messages.py"
TYPE = "smoke-evacuation"
FLOW_RULE = "smoke_evacuation_flow_in_range"
UDI_RULE = "smoke_evacuation_udi_di_present"
FILTER_RULE = "smoke_evacuation_filter_life_in_range"
CFM = 28.316846592  # litres per minute
_BLOCK = re.compile(r"<!-- (?:file|example): (\S+) -->\n```\w+\n(.*?)```", re.S)


def doc_blocks() -> dict[str, str]:
    """The page's tagged code blocks by tag (a file path or an example name)."""
    return {name: body for name, body in _BLOCK.findall(DOC.read_text(encoding="utf-8"))}


def doc_queries() -> list[str]:
    return re.findall(r'^journey query "(.+?)"', DOC.read_text(encoding="utf-8"), re.M)


def test_the_page_has_the_blocks_this_test_runs() -> None:
    blocks = doc_blocks()
    assert set(blocks) == {"message-firmware-4", "message-firmware-3", TEMPLATE, SUITE, SCRIPT}
    template, suite = json.loads(blocks[TEMPLATE]), json.loads(blocks[SUITE])
    assert {t["template"]["typeName"] for t in template["template"]} == {TYPE}
    assert Path(SUITE).stem == TYPE and suite["name"] == f"device.{TYPE}"
    rules = {e["meta"]["rule"]: e["meta"]["severity"] for e in suite["expectations"]}
    assert rules == {
        UDI_RULE: "error",
        "smoke_evacuation_mode_known": "error",
        FLOW_RULE: "error",
        FILTER_RULE: "warn",
    }
    assert len(doc_queries()) == 4


# --------------------------------------------------------------------------- set-up as the page says


def _project(root: Path, *, template: bool = True, suite: bool = True) -> JourneySettings:
    """Copies of catalog/devices and expectations/ with the page's files added; settings for them."""
    shutil.copytree(
        REPO / "catalog" / "devices", root / "catalog" / "devices", ignore=shutil.ignore_patterns("*.md")
    )
    shutil.copytree(REPO / "expectations", root / "expectations")
    blocks = doc_blocks()
    for path, wanted in ((TEMPLATE, template), (SUITE, suite)):
        if wanted:
            (root / path).write_text(blocks[path], encoding="utf-8")
    landing = root / "data" / "landing"
    landing.mkdir(parents=True, exist_ok=True)
    settings = settings_for(root, landing=landing)
    settings.sources.device_templates_dir = root / "catalog" / "devices"
    settings.quality.expectations_dir = root / "expectations"
    settings.sources.optional = ["fhir", "device", "redcap"]  # its landing zone starts empty
    return settings


def _add_page_files(settings: JourneySettings) -> None:
    root = settings.quality.expectations_dir.parent
    for path in (TEMPLATE, SUITE):
        (root / path).write_text(doc_blocks()[path], encoding="utf-8")


def _run_script(settings: JourneySettings) -> Path:
    """Run the page's script, which writes its Avro blob into the landing zone."""
    script = settings.quality.expectations_dir.parent / SCRIPT
    script.write_text(doc_blocks()[SCRIPT], encoding="utf-8")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JOURNEY_STORAGE__LANDING_URL", settings.storage.landing_url)
        runpy.run_path(str(script), run_name="__main__")
    [blob] = (Path(settings.storage.landing_url) / "device" / "smoke-hub" / "0").rglob("*.avro")
    return blob


def _first_episode(settings: JourneySettings) -> dict[str, str]:
    episodes = Path(settings.storage.landing_url).parent / "ground_truth" / "episodes.csv"
    with episodes.open() as file:
        return next(csv.DictReader(file))


def _json_blob(settings: JourneySettings) -> Path:
    """More messages in IoT Hub's JSON encoding: a good one, one no template matches, one
    without a UDI-DI (in base64: the device declared no content type) and one with a filter life
    of 120% (a warn rule)."""
    episode = _first_episode(settings)
    start = datetime.fromisoformat(episode["surgery_start"])
    blocks = doc_blocks()
    firmware_3 = json.loads(blocks["message-firmware-3"])
    firmware_4 = json.loads(blocks["message-firmware-4"])

    def at(body: dict[str, Any], minute: int, **changes: Any) -> dict[str, Any]:
        when = (start + timedelta(minutes=minute)).isoformat()
        return {**body, "caseId": episode["case_id"], "eventTime": when, **changes}

    no_udi = at(firmware_4, 11, flowLpm=700)
    del no_udi["udiDi"]
    bodies: list[dict[str, Any]] = [
        at(firmware_3, 9),
        {"deviceType": "suction-irrigation-pump", "serial": "SP-0007", "caseId": episode["case_id"]},
        no_udi,
        at(firmware_4, 12, flowLpm=700, filterLifePct=120),
    ]
    enqueued = (start + timedelta(minutes=15)).strftime("%Y-%m-%dT%H:%M:%S.0000000Z")
    lines = []
    for i, body in enumerate(bodies):
        system = {"connectionDeviceId": f"smoke-evacuator-{body['serial']}", "enqueuedTime": enqueued}
        routed: dict[str, Any] = {"EnqueuedTimeUtc": enqueued, "Properties": {}, "SystemProperties": system}
        if i == 2:
            routed["Body"] = base64.b64encode(orjson.dumps(body)).decode("ascii")
        else:
            system |= {"contentType": "application/json", "contentEncoding": "utf-8"}
            routed["Body"] = body
        lines.append(orjson.dumps(routed))
    blob = (
        Path(settings.storage.landing_url) / "device" / "smoke-hub" / "1" / f"{start:%Y/%m/%d/%H}" / "15.json"
    )
    blob.parent.mkdir(parents=True)
    blob.write_bytes(b"\n".join(lines) + b"\n")
    return blob


# --------------------------------------------------------------------------- the page's run


@dataclass
class Run:
    settings: JourneySettings
    avro: Path
    json: Path
    episode: dict[str, str]
    silver: pipeline.BuildReport
    staged: list[dict[str, Any]]
    quarantine: list[dict[str, Any]]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """Section 6 of the page: generated journeys plus the page's messages, one full run."""
    root = tmp_path_factory.mktemp("device-type-example")
    generate(root / "data", patients=2, seed=20250211, bad_rate=0.0)
    settings = _project(root)
    avro = _run_script(settings)
    json_blob = _json_blob(settings)
    assert pipeline.preflight(settings) > 0
    for source in pipeline.SOURCES:
        pipeline.ingest(settings, source, "run-example")
    silver = pipeline.build_silver(settings, "run-example")
    pipeline.build_gold(settings, "run-example")
    lake = Lake(settings)
    events = stored_passed(lake, "device_event")
    quarantine = lake.read(pipeline.QUARANTINE)
    assert events is not None and quarantine is not None
    smoke = "/device/smoke-hub/"
    return Run(
        settings,
        avro,
        json_blob,
        _first_episode(settings),
        silver,
        [r for r in events.to_pylist() if r["device_type"] == TYPE],
        [r for r in quarantine.to_pylist() if smoke in (r["source_uri"] or "")],
    )


def _by_lineage(rows: list[dict[str, Any]]) -> dict[tuple[str, int], dict[str, Any]]:
    return {(Path(r["source_uri"]).suffix, r["source_offset"]): r for r in rows}


def test_the_script_writes_the_page_messages(run: Run) -> None:
    blocks = doc_blocks()
    records = list(fastavro.reader(io.BytesIO(run.avro.read_bytes())))
    assert len(records) == 5
    bodies = [orjson.loads(r["Body"]) for r in records if isinstance(r, dict)]
    for body, example in zip(bodies, ("message-firmware-4", "message-firmware-3"), strict=False):
        expected = json.loads(blocks[example])
        assert body["caseId"] == run.episode["case_id"]
        assert {k: v for k, v in body.items() if k not in ("caseId", "eventTime")} == {
            k: v for k, v in expected.items() if k not in ("caseId", "eventTime")
        }


def test_good_measurements_are_staged_with_their_values(run: Run) -> None:
    rows = _by_lineage(run.staged)
    assert set(rows) == {(".avro", 0), (".avro", 1), (".json", 0), (".json", 3)}
    for row in rows.values():
        assert (row["device_type"], row["template"], row["case_id"]) == (
            TYPE,
            "smoke-evacuator.json",
            run.episode["case_id"],
        )
        assert row["udi_di"] == "00812345000097" and row["event_type"] == TYPE
    assert json.loads(rows[(".avro", 0)]["measured_values"]) == {
        "mode": "auto",
        "flowLpm": 850,
        "filterLifePct": 82,
        "udiDi": "00812345000097",
        "firmware": "4.1.0",
    }
    firmware_3 = json.loads(rows[(".avro", 1)]["measured_values"])
    assert firmware_3 == {
        "mode": "manual",
        "flowLpm": pytest.approx(30 * CFM),  # converted by the CalculatedContent template
        "udiDi": "00812345000097",
        "firmware": "3.2.1",
    }
    assert rows[(".avro", 1)]["device_id"] == "SE-2107" and rows[(".avro", 0)]["device_id"] == "SE-3302"
    start = datetime.fromisoformat(run.episode["surgery_start"])
    assert rows[(".avro", 0)]["event_time"] == start + timedelta(minutes=5)
    assert json.loads(rows[(".json", 3)]["measured_values"])["filterLifePct"] == 120  # warn: loaded


def test_rejected_messages_are_quarantined_with_rule_and_lineage(run: Run) -> None:
    rows = _by_lineage(run.quarantine)
    assert {key: row["rule"] for key, row in rows.items()} == {
        (".avro", 2): FLOW_RULE,  # 5000 L/min, by the suite
        (".avro", 3): RULE_NO_TEMPLATE,  # the suction-irrigation pump
        (".avro", 4): RULE_REQUIRED_VALUE,  # no case id
        (".json", 1): RULE_NO_TEMPLATE,
        (".json", 2): UDI_RULE,
    }
    assert len(run.quarantine) == len(rows)
    assert {r["source_uri"] for r in run.quarantine} == {str(run.avro), str(run.json)}
    assert all(r["table_name"] == "device_event" and r["source"] == "device" for r in run.quarantine)
    by_suite = rows[(".avro", 2)]
    assert re.fullmatch(r"[0-9a-f]{20}-0", by_suite["record_id"])  # the measurement id: message, match
    assert not any("SE-" in str(r["record_id"]) for r in run.quarantine)  # never the serial
    assert by_suite["record_id"] not in {r["measurement_id"] for r in run.staged}
    assert rows[(".avro", 3)]["record_id"] is None  # rejected as read: no record yet
    assert "5000" not in by_suite["detail"]


def test_the_run_reports_the_suite_and_balances(run: Run) -> None:
    failed = {
        (e["table"], e["rule"], e["severity"]): e["unexpected_count"]
        for e in run.silver.expectations
        if not e["success"]
    }
    assert failed[(f"device.{TYPE}", FLOW_RULE, "error")] == 1
    assert failed[(f"device.{TYPE}", UDI_RULE, "error")] == 1
    assert failed[(f"device.{TYPE}", FILTER_RULE, "warn")] == 1
    assert all(t.balanced for t in run.silver.tables)
    [events] = [t for t in run.silver.tables if t.table == "device_event"]
    assert events.held == 0


def test_the_page_queries_show_the_linked_rows(run: Run) -> None:
    device_rows, flows, journey, episodes = (run_query(run.settings, sql) for sql in doc_queries())
    assert device_rows.num_rows == 4
    assert set(device_rows.column("device_type").to_pylist()) == {TYPE}
    assert flows.to_pylist()[:2] == [
        {
            "event_time": flows.column("event_time")[0].as_py(),
            "mode": "auto",
            "flow_lpm": 850.0,
            "filter_life_pct": 82,
        },
        {
            "event_time": flows.column("event_time")[1].as_py(),
            "mode": "manual",
            "flow_lpm": 849.5,
            "filter_life_pct": None,
        },
    ]
    assert journey.num_rows == 4 and set(journey.column("phase").to_pylist()) == {"intra"}
    assert set(journey.column("event_type").to_pylist()) == {f"device:{TYPE}"}
    assert episodes.to_pylist() == [{"episodes": 1}]
    silver = run_query(
        run.settings, f"select episode_key from silver.device_event where device_type = '{TYPE}'"
    )
    assert silver.num_rows == 4 and None not in silver.column("episode_key").to_pylist()


# --------------------------------------------------------------------------- preflight


def test_preflight_names_the_type_whose_suite_is_missing(tmp_path: Path) -> None:
    settings = _project(tmp_path, suite=False)
    with pytest.raises(ExpectationSuiteError) as error:
        pipeline.preflight(settings)
    message = str(error.value)
    assert "No expectation suite for device table(s) smoke-evacuation" in message
    assert "expectations/device/<table>.json" in message


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (lambda text: text.replace('"required": true },', '"required": true },,', 1), "is not valid JSON"),
        (
            lambda text: text.replace('"timestampExpression"', '"timestampExpresion"', 1),
            "template 0 (smoke-evacuation): unknown field 'timestampExpresion' (did you mean 'timestampExpression'?)",
        ),
    ],
    ids=["not-json", "typo"],
)
def test_a_template_that_does_not_load_fails_preflight_naming_the_file(
    tmp_path: Path, change: Any, fragment: str
) -> None:
    settings = _project(tmp_path)
    path = tmp_path / TEMPLATE
    broken = change(path.read_text(encoding="utf-8"))
    assert broken != path.read_text(encoding="utf-8")
    path.write_text(broken, encoding="utf-8")
    with pytest.raises(ConfigurationError) as error:
        pipeline.preflight(settings)
    assert f"{path}: " in str(error.value) and fragment in str(error.value)


def test_preflight_builds_an_unchanged_suite_set_once_and_a_changed_one_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _project(tmp_path)
    count = pipeline.preflight(settings)
    assert count > 0
    assert len(list((tmp_path / "restricted" / pipeline.PREFLIGHT_PREFIX).iterdir())) == 1

    def must_not_build(_gate: QualityGate) -> int:
        raise AssertionError("an unchanged suite set was built again")

    with monkeypatch.context() as patch:
        patch.setattr(QualityGate, "check_all_parse", must_not_build)
        assert pipeline.preflight(settings) == count

    suite = tmp_path / SUITE
    document = json.loads(suite.read_text(encoding="utf-8"))
    original = json.loads(suite.read_text(encoding="utf-8"))
    document["expectations"][0]["type"] = "expect_column_values_to_be_greener"
    suite.write_text(json.dumps(document), encoding="utf-8")
    with pytest.raises(ExpectationSuiteError) as error:
        pipeline.preflight(settings)
    assert str(suite) in str(error.value)

    markers = tmp_path / "restricted" / pipeline.PREFLIGHT_PREFIX
    before = {p.name for p in markers.iterdir()}
    document["expectations"][0]["type"] = original["expectations"][0]["type"]
    document["meta"] = {"notes": "edited"}  # a valid change: a new suite set, built once
    suite.write_text(json.dumps(document), encoding="utf-8")
    assert pipeline.preflight(settings) == count
    after = {p.name for p in markers.iterdir()}
    assert len(after) == 1 and after.isdisjoint(before)  # the earlier set's marker is gone


# --------------------------------------------------------------------------- section 7: reprocess


@dataclass
class Reprocessed:
    settings: JourneySettings
    before: pa.Table  # rejects of the first read
    silver: pipeline.BuildReport


@pytest.fixture(scope="module")
def reprocessed(tmp_path_factory: pytest.TempPathFactory) -> Reprocessed:
    """Messages land before the template; the files are added; the blobs are read again."""
    root = tmp_path_factory.mktemp("device-type-reprocess")
    settings = _project(root, template=False, suite=False)
    truth = root / "data" / "ground_truth"
    truth.mkdir(parents=True)
    (truth / "episodes.csv").write_text("case_id,surgery_start\nCASE-204871,2025-02-11T09:09:30+00:00\n")
    _run_script(settings)
    first = pipeline.ingest(settings, "device", "run-1")
    assert (first.records, first.rejects) == (0, 5)
    before = Lake(settings).read(pipeline.extraction_rejects_table("device"))
    assert before is not None

    _add_page_files(settings)
    assert pipeline.ingest(settings, "device", "run-2").new_inputs == 0  # the ledger has the blob
    storage = {f"JOURNEY_STORAGE__{k.upper()}": str(v) for k, v in settings.storage.model_dump().items() if v}
    command = re.search(r"^journey (reprocess device .*)$", DOC.read_text(encoding="utf-8"), re.M)
    assert command is not None
    result = CliRunner().invoke(app, command.group(1).split(), env=storage)
    assert result.exit_code == 0 and "1 device input(s) will be read again" in result.output
    again = pipeline.ingest(settings, "device", "run-3")
    assert (again.new_inputs, again.records, again.rejects) == (1, 3, 2)
    return Reprocessed(settings, before, pipeline.build_silver(settings, "run-3"))


def test_reprocess_maps_messages_that_landed_before_the_template(reprocessed: Reprocessed) -> None:
    assert set(reprocessed.before.column("rule").to_pylist()) == {RULE_NO_TEMPLATE}
    lake = Lake(reprocessed.settings)
    events = stored_passed(lake, "device_event")
    assert events is not None
    assert sorted(r["source_offset"] for r in events.to_pylist() if r["device_type"] == TYPE) == [0, 1]
    held = lake.read(pipeline.HELD)
    assert held is not None  # CASE-204871 is on no Procedure here: held, retried at every build
    assert sorted((r["source_offset"], r["rule"]) for r in held.to_pylist()) == [
        (0, "case_id_links_to_procedure"),
        (1, "case_id_links_to_procedure"),
    ]
    quarantine = lake.read(pipeline.QUARANTINE)
    assert quarantine is not None
    latest = sorted((r["source_offset"], r["rule"]) for r in quarantine.to_pylist() if r["run_id"] == "run-3")
    assert latest == [(2, FLOW_RULE), (3, RULE_NO_TEMPLATE), (4, RULE_REQUIRED_VALUE)]


def test_a_remapped_message_leaves_the_quarantine(reprocessed: Reprocessed) -> None:
    quarantine = Lake(reprocessed.settings).read(pipeline.QUARANTINE)
    assert quarantine is not None
    offsets = sorted(r["source_offset"] for r in quarantine.to_pylist())
    assert offsets == [2, 3, 4]
    [events] = [t for t in reprocessed.silver.tables if t.table == "device_event"]
    assert events.read == 5


def test_reprocessing_after_a_template_change_replaces_the_measurements(tmp_path: Path) -> None:
    settings = _project(tmp_path)
    (tmp_path / "data" / "ground_truth").mkdir(parents=True)
    (tmp_path / "data" / "ground_truth" / "episodes.csv").write_text(
        "case_id,surgery_start\nCASE-204871,2025-02-11T09:09:30+00:00\n"
    )
    _run_script(settings)
    pipeline.ingest(settings, "device", "run-1")
    first = pipeline.build_silver(settings, "run-1")
    lake = Lake(settings)
    before = stored_passed(lake, "device_event")
    assert before is not None and before.num_rows > 0
    assert any('"firmware"' in values for values in before.column("measured_values").to_pylist())

    template = tmp_path / TEMPLATE
    text = template.read_text(encoding="utf-8")
    changed = re.sub(r',\n\s*\{ "valueName": "firmware"[^}]*\}', "", text)
    assert changed != text  # the template no longer maps the firmware
    template.write_text(changed, encoding="utf-8")
    assert pipeline.forget_inputs(settings, "device") == 1
    pipeline.ingest(settings, "device", "run-2")
    second = pipeline.build_silver(settings, "run-2")

    after = stored_passed(lake, "device_event")
    assert after is not None
    assert sorted(after.column("measurement_id").to_pylist()) == sorted(
        before.column("measurement_id").to_pylist()
    )
    assert set(after.column("run_id").to_pylist()) == {"run-2"}
    assert not any('"firmware"' in values for values in after.column("measured_values").to_pylist())
    [was] = [t for t in first.tables if t.table == "device_event"]
    [now] = [t for t in second.tables if t.table == "device_event"]
    assert (now.read, now.superseded) == (was.read, 0) and now.balanced
    rejects = lake.read(pipeline.QUARANTINE)
    assert rejects is not None and set(rejects.column("run_id").to_pylist()) == {"run-2"}
