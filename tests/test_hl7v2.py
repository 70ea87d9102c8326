"""The HL7 v2 ADT feed: reading its files, what each message becomes, and the journey it feeds.

The end-to-end part runs the generated feed (A01/A04 admissions, A02 transfers, A03 discharges,
A08 updates, an admission cancelled by A11, a discharge cancelled by A13) with the rest of the
generated landing zone through ingest, silver and gold, and checks what the analysts' tables
hold against what the generator wrote, not against the code under test.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import orjson
import pyarrow.compute as pc
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from patient_journey import pipeline
from patient_journey.errors import ConfigurationError
from patient_journey.generate import generate
from patient_journey.generate.hl7v2 import adt_messages
from patient_journey.generate.model import Journey, build_cohort
from patient_journey.lake import Lake, bronze, gold, silver
from patient_journey.settings import load_settings
from patient_journey.sources import hl7v2
from patient_journey.sources.plugins import PLUGINS
from patient_journey.sources.records import Extraction
from patient_journey.storage import FileInfo
from tests.conftest import settings_for

NAME, PHONE, STREET = "Doe^Jane", "+1-555-0100", "1 Canary Lane"


def _message(
    trigger: str, control: str, mrn: str = "MRN-1", visit: str = "V-1", at: str = "20230601083000"
) -> str:
    pv1 = ["PV1", "1", "I", "ORTHO^101^1"] + [""] * 42
    pv1[19], pv1[44] = visit, "20230601080000+0000"
    return "\r".join(
        [
            f"MSH|^~\\&|EHR|HOSP|JOURNEY|HOSP|{at}||ADT^{trigger}^ADT_{trigger}|{control}|P|2.5.1",
            f"EVN|{trigger}|{at}+0200",
            f"PID|1||X-9^^^OTHER^PI~{mrn}^^^HOSP^MR||{NAME}||19560101|F|||{STREET}^^Town||{PHONE}",
            "|".join(pv1),
        ]
    )


def _read(data: bytes, name: str = "feed.hl7") -> Extraction:
    out = Extraction(hl7v2.SOURCE, "run-1")
    hl7v2.read_file(
        out, FileInfo(url=f"/landing/adt/{name}", version="v", size=len(data), modified=None), data
    )  # type: ignore[arg-type]
    return out


def test_framed_and_newline_separated_files_give_the_same_records() -> None:
    messages = [_message("A01", "C1"), _message("A03", "C2")]
    framed = b"".join(b"\x0b" + m.encode() + b"\x1c\x0d" for m in messages)
    lines = b"\n".join(m.replace("\r", "\r\n").encode() for m in messages) + b"\n"
    for data in (framed, lines):
        records = _read(data).records().to_pylist()
        assert [(r["record_id"], r["source_offset"], r["entity"]) for r in records] == [
            ("C1", 1, "adt"),
            ("C2", 2, "adt"),
        ]
        first = orjson.loads(records[0]["payload"])
        assert first == {
            "trigger": "A01",
            "eventTime": "2023-06-01T06:30:00",  # EVN-2 at +02:00, in UTC
            "messageTime": "2023-06-01T08:30:00",
            "mrn": "MRN-1",  # the identifier typed MR, not the first one
            "visitNumber": "V-1",
            "patientClass": "I",
            "admitTime": "2023-06-01T08:00:00",
            "dischargeTime": None,
        }


def test_line_feeds_inside_frames_and_batch_headers_are_read_as_senders_write_them() -> None:
    """Segments ending in LF or CR LF inside MLLP frames, a byte order mark, and a batch file's
    FHS/BHS headers and BTS/FTS trailers: the same records as a conformant file."""
    messages = [_message("A01", "C1"), _message("A03", "C2")]
    framed = b"".join(b"\x0b\xef\xbb\xbf" + m.replace("\r", "\n").encode() + b"\x1c\x0d" for m in messages)
    batch = ("FHS|^~\\&|EHR\rBHS|^~\\&|EHR\r" + "\r".join(messages) + "\rBTS|2\rFTS|1\r").encode()
    expected = _read(b"".join(b"\x0b" + m.encode() + b"\x1c\x0d" for m in messages)).records()
    for data in (framed, batch):
        out = _read(data)
        assert out.reject_count == 0
        same = ["entity", "record_id", "payload", "source_offset"]
        assert out.records().select(same).equals(expected.select(same))


def test_bad_messages_are_rejected_by_rule_and_number_and_their_neighbours_load() -> None:
    data = b"".join(
        b"\x0b" + text + b"\x1c\x0d"
        for text in (
            _message("A01", "C1").encode(),
            b"PID|1||MRN-2^^^HOSP^MR||" + NAME.encode(),  # no MSH
            _message("A01", "C3").replace("ADT^A01^ADT_A01", "ORU^R01^ORU_R01").encode(),
            _message("A05", "C4").replace("ADT^A05", f"ADT^{NAME}").encode(),  # a name where the trigger goes
            _message("A03", "").encode(),  # no control id
            bytes(range(128, 256)),  # not text (0x0B and 0x1C, which frame messages, left out)
            _message("A03", "C7").encode(),
        )
    )
    out = _read(data)
    assert [r["record_id"] for r in out.records().to_pylist()] == ["C1", "C7"]
    rejects = out.rejects().to_pylist()
    assert [(r["source_offset"], r["rule"]) for r in rejects] == [
        (2, hl7v2.RULE_PARSABLE),
        (3, hl7v2.RULE_TRIGGER),
        (4, hl7v2.RULE_TRIGGER),
        (5, hl7v2.RULE_CONTROL_ID),
        (6, hl7v2.RULE_PARSABLE),
    ]
    text = orjson.dumps([out.records().to_pylist(), rejects], default=str).decode()
    for value in (NAME, "Doe", "Jane", PHONE, STREET, "19560101"):
        assert value not in text  # names, phone, address and birth date stay in the landing zone


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=400), st.integers(min_value=0, max_value=4))
@example(garbage=b"+", where=1)  # a time whose offset datetime refuses (found by this test)
def test_no_bytes_stop_the_reader(garbage: bytes, where: int) -> None:
    """Any bytes, alone or spliced into a good message, end as records or named rejects."""
    good = _message("A01", "C1").encode()
    data = b"\x0b" + good[: where * 40] + garbage + good[where * 40 :] + b"\x1c\x0d" + garbage
    out = _read(data)
    assert out.record_count + out.reject_count >= 1
    assert set(out.rejects().column("rule").to_pylist()) <= {
        hl7v2.RULE_PARSABLE,
        hl7v2.RULE_TRIGGER,
        hl7v2.RULE_CONTROL_ID,
    }


def _both(raw: bytes) -> tuple[object, object]:
    """What the split and python-hl7 make of a message: fields, or the rule of the reject."""
    results = []
    for split in (True, False):
        try:
            results.append(hl7v2.read_message(raw, split=split))
        except hl7v2._Unreadable as exc:
            results.append(exc.rule)
    return results[0], results[1]


def test_the_split_reads_every_generated_message_as_python_hl7_does() -> None:
    for message in adt_messages(build_cohort(25, seed=8)):
        fast, reference = _both(message.text.encode())
        assert fast == reference


_VALUE = st.text(alphabet="AZaz09 -.:+^~&\\|", max_size=12)


@settings(max_examples=300, deadline=None)
@given(
    trigger=st.sampled_from(["A01", "A03", "A05", "", "A0"]),
    control=_VALUE,
    identifiers=st.lists(st.tuples(_VALUE, st.sampled_from(["MR", "PI", "", "mr"])), max_size=3),
    visit=_VALUE,
    patient_class=_VALUE,
    times=st.lists(
        st.sampled_from(["20230601", "202306011230", "20230601123045.12+0130", "2023", "x", ""]),
        min_size=3,
        max_size=3,
    ),
    segments=st.permutations(["EVN", "PID", "PV1"]),
)
def test_the_split_agrees_with_python_hl7_on_any_field_values(
    trigger: str,
    control: str,
    identifiers: list[tuple[str, str]],
    visit: str,
    patient_class: str,
    times: list[str],
    segments: list[str],
) -> None:
    """Delimiters, escapes, repetitions, absent fields and any segment order: where the split
    reads a message, it reads what python-hl7 reads (it leaves the rest to python-hl7)."""
    pid3 = "~".join(f"{value}^^^H^{kind}" for value, kind in identifiers)
    pv1 = ["PV1", "1", patient_class] + [""] * 16 + [visit] + [""] * 24 + [times[1], times[2]]
    body = {
        "EVN": f"EVN|{trigger}|{times[0]}",
        "PID": f"PID|1||{pid3}||{NAME}",
        "PV1": "|".join(pv1),
    }
    text = "\r".join(
        [f"MSH|^~\\&|A|B|C|D|{times[0]}||ADT^{trigger}|{control}|P|2.5", *(body[s] for s in segments)]
    )
    fast, reference = _both(text.encode())
    assert fast == reference


def test_the_generated_feed_is_the_cohorts_encounters() -> None:
    cohort = build_cohort(30, seed=4)
    messages = adt_messages(cohort)
    encounters = [e for j in cohort.journeys for e in j.encounters]
    triggers = [m.text.split("|")[8].split("^")[1] for m in messages]
    # one admission or registration and one final discharge per encounter, plus the extras
    assert triggers.count("A01") + triggers.count("A04") == len(encounters) + triggers.count("A11")
    assert triggers.count("A03") == len(encounters) + triggers.count("A13")
    assert len({m.control_id for m in messages}) == len(messages)
    assert messages == sorted(messages, key=lambda m: (m.at, m.control_id))


@dataclass(frozen=True)
class Built:
    lake: Lake
    landing: Path
    readmitted: Journey  # the patient the extra stay belongs to
    readmitted_at: datetime  # when the feed says they were admitted again


@pytest.fixture(scope="module")
def journey(tmp_path_factory: pytest.TempPathFactory) -> Built:
    root = tmp_path_factory.mktemp("hl7")
    generated = generate(root / "gen", patients=40, seed=11, bad_rate=0.0)
    landing = generated.out / "landing"
    # One more stay only the feed knows: a readmission 10 days after the first index discharge.
    cohort = build_cohort(40, seed=11)
    first = next(j for j in cohort.journeys if j.readmission is None)
    admitted = first.admission.end + timedelta(days=10)
    extra = _message("A01", "EXTRA-1", mrn=first.mrn, visit="V-EXTRA", at=admitted.strftime("%Y%m%d%H%M%S"))
    extra = extra.replace("20230601080000+0000", admitted.strftime("%Y%m%d%H%M%S+0000"))
    extra = extra.replace(f"{admitted:%Y%m%d%H%M%S}+0200", f"{admitted:%Y%m%d%H%M%S}+0000")
    (landing / "adt" / "extra.hl7").write_bytes(b"\x0b" + extra.encode() + b"\x1c\x0d")
    settings_ = settings_for(root, landing=landing)
    for source in pipeline.SOURCES:
        pipeline.ingest(settings_, source, "run-1")
    pipeline.build_silver(settings_, "run-1")
    pipeline.build_gold(settings_, "run-1")
    return Built(Lake(settings_), landing, first, admitted)


def test_every_message_is_loaded_and_linked(journey: Built) -> None:
    lake, landing = journey.lake, journey.landing
    sent = sum(len(list(hl7v2.split_messages(p.read_bytes()))) for p in (landing / "adt").rglob("*.hl7"))
    adt = lake.read(silver("adt_event"))
    assert adt is not None and adt.num_rows == sent
    assert adt.column("patient_key").null_count == 0
    assert lake.read(bronze("hl7v2_message")).num_rows == sent  # type: ignore[union-attr]
    # the visit number reaches the warehouse only as a key
    visits = {v for v in adt.column("visit_key").to_pylist()}
    assert all(len(v) == 64 for v in visits)


def test_discharges_transfers_and_cancellations_in_the_journey(journey: Built) -> None:
    lake = journey.lake
    adt = lake.read(silver("adt_event"))
    events = lake.read(gold("journey_event"))
    assert adt is not None and events is not None
    feed = events.filter(pc.equal(events.column("source"), "hl7v2"))
    counts = {
        t: feed.filter(pc.equal(feed.column("event_type"), t)).num_rows for t in ("discharge", "transfer")
    }
    triggers = adt.column("trigger_event").to_pylist()
    # a discharge cancelled by A13 is gone (the real one follows it); every transfer stands
    assert counts == {
        "discharge": triggers.count("A03") - triggers.count("A13"),
        "transfer": triggers.count("A02"),
    }
    # admissions the EHR export holds too are its encounter events: only the extra stay remains
    admissions = feed.filter(pc.equal(feed.column("event_type"), "admission"))
    assert admissions.column("event_time").to_pylist() == [journey.readmitted_at]


def test_an_admission_only_the_feed_knows_is_a_readmission_counted_once(journey: Built) -> None:
    episodes = journey.lake.read(gold("surgical_episode"))
    assert episodes is not None
    first = journey.readmitted
    rows = [r for r in episodes.to_pylist() if r["surgery_start"] == first.surgery_start]
    assert len(rows) == 1
    assert rows[0]["readmission_30d"] is True and rows[0]["readmissions_90d"] == 1
    others = [r for r in episodes.to_pylist() if r["surgery_start"] != first.surgery_start]
    assert all(r["readmissions_90d"] <= 2 for r in others)


def test_a_landing_zone_without_a_feed_needs_no_setting(tmp_path: Path) -> None:
    generated = generate(tmp_path / "gen", patients=5, seed=2, bad_rate=0.0)
    landing = generated.out / "landing"
    shutil.rmtree(landing / "adt")
    settings_ = settings_for(tmp_path, landing=landing)
    pipeline.preflight(settings_)  # no JOURNEY_SOURCES__OPTIONAL needed
    report = pipeline.ingest(settings_, "hl7v2", "run-1")
    assert report.records == 0 and report.rejects == 0


def test_the_feeds_own_setting_is_read_from_the_sources_section(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    generated = generate(tmp_path / "gen", patients=5, seed=2, bad_rate=0.0)
    landing = generated.out / "landing"
    (landing / "adt").rename(landing / "feeds")
    monkeypatch.setenv("JOURNEY_SOURCES__HL7V2_PREFIX", "feeds")
    settings_ = settings_for(tmp_path, landing=landing)
    assert PLUGINS["hl7v2"].prefix(settings_) == "feeds"
    pipeline.preflight(settings_)
    assert pipeline.ingest(settings_, "hl7v2", "run-1").records > 0


def test_a_source_setting_no_source_declares_fails_preflight_naming_the_closest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    generated = generate(tmp_path / "gen", patients=5, seed=2, bad_rate=0.0)
    monkeypatch.setenv("JOURNEY_SOURCES__HL7_PREFIX", "feeds")  # misspelt
    settings_ = settings_for(tmp_path, landing=generated.out / "landing")
    with pytest.raises(ConfigurationError) as error:
        pipeline.preflight(settings_)
    assert "JOURNEY_SOURCES__HL7_PREFIX (did you mean JOURNEY_SOURCES__HL7V2_PREFIX?)" in str(error.value)


def test_an_invalid_source_setting_is_named_without_its_value(tmp_path: Path) -> None:
    generated = generate(tmp_path / "gen", patients=5, seed=2, bad_rate=0.0)
    base = settings_for(tmp_path, landing=generated.out / "landing")
    settings_ = load_settings(  # a list where the prefix is a string
        storage=base.storage,
        identity=base.identity,
        sources={"settle_seconds": 0, "hl7v2_prefix": ["secret-value"]},
    )
    with pytest.raises(ConfigurationError) as error:
        pipeline.preflight(settings_)
    assert "JOURNEY_SOURCES__HL7V2_PREFIX" in str(error.value)
    assert "secret-value" not in str(error.value)


def test_mrn_unknown_to_the_ehr_is_held(tmp_path: Path) -> None:
    generated = generate(tmp_path / "gen", patients=5, seed=2, bad_rate=0.0)
    landing = generated.out / "landing"
    (landing / "adt" / "stranger.hl7").write_bytes(
        b"\x0b" + _message("A01", "S1", mrn="NOBODY").encode() + b"\x1c\x0d"
    )
    settings_ = settings_for(tmp_path, landing=landing)
    for source in pipeline.SOURCES:
        pipeline.ingest(settings_, source, "run-1")
    report = pipeline.build_silver(settings_, "run-1")
    adt = next(t for t in report.tables if t.table == "adt_event")
    assert adt.held == 1 and adt.balanced
    held = Lake(settings_).read(pipeline.HELD)
    assert held is not None
    rows = held.filter(pc.equal(held.column("table_name"), "adt_event")).to_pylist()
    assert [(r["record_id"], r["rule"]) for r in rows] == [("S1", "mrn_links_to_patient")]


def test_python_hl7_logs_no_value_it_cannot_unescape(caplog: pytest.LogCaptureFixture) -> None:
    """python-hl7 logs a value it cannot unescape; the reader keeps it out of the logs."""
    caplog.set_level("DEBUG")
    message = _message("A01", "C1", mrn="MRN\\Z-Canary\\").encode()
    hl7v2.read_message(message)
    assert "Canary" not in caplog.text
