"""The flow on generated data reproduces the generator's ground truth exactly."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows.journey import patient_journey
from patient_journey.errors import ConfigurationError
from patient_journey.generate import GenerationResult
from patient_journey.generate.model import build_cohort
from patient_journey.identity import KeyMaker
from patient_journey.lake import Lake, bronze, gold
from patient_journey.pipeline import BRONZE_TABLES, HELD, QUARANTINE, SPILL_PREFIX
from patient_journey.query import run_query
from patient_journey.report import RunSummary, render_markdown
from tests.conftest import TEST_KEY, settings_for, use_settings_env
from tests.journey_checks import (
    assert_planted_records_caught,
    device_clock_mismatches,
    episode_mismatches,
    truth,
)

pytestmark = pytest.mark.prefect


@pytest.fixture(scope="module")
def first_run(
    harness: None, generated: GenerationResult, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[RunSummary, Path]]:
    root = tmp_path_factory.mktemp("e2e")
    settings = settings_for(root, landing=generated.out / "landing")
    with pytest.MonkeyPatch.context() as monkeypatch:
        use_settings_env(monkeypatch, settings)
        yield patient_journey(), root


def test_every_episode_fact_matches_the_ground_truth(
    first_run: tuple[RunSummary, Path], generated: GenerationResult
) -> None:
    _, root = first_run
    assert episode_mismatches(Lake(settings_for(root)), generated) == []


def test_each_device_clock_skew_is_measured(
    first_run: tuple[RunSummary, Path], generated: GenerationResult
) -> None:
    summary, root = first_run
    assert device_clock_mismatches(Lake(settings_for(root)), generated) == []
    planted = [abs(int(r["clock_skew_seconds"])) for r in truth(generated, "device_clock.csv")]
    assert summary.gold is not None
    assert summary.gold.device_clocks["devices"] == len(planted)
    assert "## Device clocks" in render_markdown(summary)


def test_the_generator_writes_every_source_variant(generated: GenerationResult) -> None:
    landing = generated.out / "landing"
    names = {p.relative_to(landing).as_posix() for p in landing.rglob("*") if p.is_file()}
    device = [n for n in names if n.startswith("device/")]
    # IoT Hub routing: every encoding, several partitions each.
    for endpoint, suffix in (("avro", ".avro"), ("avrodeflate", ".avro"), ("json", ".json")):
        blobs = [n for n in device if n.startswith(f"device/or-telemetry-{endpoint}/") and n.endswith(suffix)]
        assert len({n.split("/")[2] for n in blobs}) > 1, endpoint
    deflated = next(landing.glob("device/or-telemetry-avrodeflate/*/*/*/*/*/*.avro")).read_bytes()
    assert b"avro.codec\x0edeflate" in deflated
    json_blobs = [landing / n for n in device if n.endswith(".json")]
    bodies = [line.split(b'"Body":')[1][:1] for blob in json_blobs for line in blob.read_bytes().splitlines()]
    assert {b"{", b'"'} <= set(bodies)  # embedded JSON bodies and base64 bodies
    # FHIR: Synthea and Azure layouts, gzip, manifest with deleted entries, three Bundle types.
    assert any(n.endswith("/Patient.000.ndjson") for n in names)
    assert any(n.endswith("/Procedure-1-1.ndjson") for n in names)
    assert any(n.endswith(".ndjson.gz") for n in names)
    assert any(n.endswith("/Bundle-deleted-1-1.ndjson") for n in names)
    bundle_types = {
        json.loads((landing / n).read_text())["type"] for n in names if n.startswith("ehr/bundles/")
    }
    assert bundle_types == {"transaction", "batch", "collection"}


def test_complications_reported_by_both_sources_count_once(
    first_run: tuple[RunSummary, Path], generated: GenerationResult
) -> None:
    """The cohort has complications both the registry and the EHR report, and EHR-only ones;
    gold counts each (code, day) once (the other facts are checked against the ground truth)."""
    _, root = first_run
    cohort = build_cohort(generated.patients, seed=20261123)
    both = [
        j
        for j in cohort.journeys
        if {(c.code, c.occurred_on) for c in j.complications}
        & {(c.code, c.occurred_on) for c in j.ehr_complications}
    ]
    ehr_only = [
        j
        for j in cohort.journeys
        if {(c.code, c.occurred_on) for c in j.ehr_complications}
        - {(c.code, c.occurred_on) for c in j.complications}
    ]
    assert both and ehr_only
    counts = {
        row["episode_key"]: row["complications_90d"]
        for row in run_query(
            settings_for(root), "select episode_key, complications_90d from surgical_episode"
        ).to_pylist()
    }
    keys = KeyMaker(TEST_KEY.encode())
    for journey in both:
        events = {(c.code, c.occurred_on) for c in [*journey.complications, *journey.ehr_complications]}
        surgery_day = journey.surgery_start.date()
        expected = sum(1 for _, day in events if 0 <= (day - surgery_day).days <= 90)
        assert counts[keys.case_key(journey.case_id)] == expected
        assert expected < len(journey.complications) + len(journey.ehr_complications)


def test_every_planted_bad_record_is_quarantined_or_held_under_its_rule(
    first_run: tuple[RunSummary, Path], generated: GenerationResult
) -> None:
    _, root = first_run
    assert_planted_records_caught(Lake(settings_for(root)), generated)


def test_rows_read_equal_loaded_plus_quarantined_plus_held(first_run: tuple[RunSummary, Path]) -> None:
    summary, _ = first_run
    assert summary.silver is not None and summary.gold is not None
    assert {t.table for t in summary.tables} >= {
        "observation",
        "device_event",
        "prom_response",
        "surgical_episode",
    }
    for table in summary.tables:
        assert table.read == table.loaded + table.quarantined + table.held + table.superseded, table
    held = {t.table: t.held for t in summary.tables}
    assert held["device_event"] > 0 and held["registry_patient"] > 0
    # Versions: corrected Procedures replace their drafts, stale ones and re-delivered Patients
    # are superseded, and Encounters deleted at the source are gone.
    superseded = {t.table: t.superseded for t in summary.tables}
    assert superseded["procedure"] > 0 and superseded["patient"] > 0 and superseded["encounter"] > 0


def test_the_summary_carries_no_patient_values(
    first_run: tuple[RunSummary, Path], generated: GenerationResult
) -> None:
    summary, _ = first_run
    markdown = render_markdown(summary)
    assert "| observation |" in markdown and "Overall linkage rate" in markdown
    rows = truth(generated, "episodes.csv")
    for row in rows:
        assert row["mrn"] not in markdown and row["case_id"] not in markdown
    patients = (generated.out / "landing").rglob("Patient.000.ndjson")
    names = [
        line.split('"family":"')[1].split('"')[0] for p in patients for line in p.read_text().splitlines()
    ]
    assert names and not any(f"| {name} " in markdown for name in names)


def test_no_direct_identifier_reaches_the_analysts_zone(
    first_run: tuple[RunSummary, Path], generated: GenerationResult
) -> None:
    """MRNs, OR case ids and device serials stay in the restricted zone: no Parquet file of the
    warehouse holds one, in any column (checked on the files' decoded text values)."""
    _, root = first_run
    identifiers = {row["mrn"] for row in truth(generated, "episodes.csv")}
    identifiers |= {row["case_id"] for row in truth(generated, "episodes.csv")}
    serials = {row["device_id"] for row in truth(generated, "device_clock.csv")}
    assert serials and identifiers
    found: set[str] = set()
    files = list((root / "warehouse").rglob("*.parquet"))
    assert files
    for path in files:
        table = pq.read_table(path)
        for column in table.columns:
            if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
                values = set(column.drop_null().to_pylist())
                found |= {v for v in values if v in identifiers or v in serials}
                found |= {s for s in serials for v in values if s in v}  # also inside ids and JSON
    assert found == set()


def test_the_warehouse_answers_sql_by_table_name(
    first_run: tuple[RunSummary, Path], generated: GenerationResult
) -> None:
    _, root = first_run
    answer = run_query(settings_for(root), "select count(*) as n from surgical_episode")
    assert answer.to_pylist() == [{"n": generated.episodes}]
    phases = run_query(settings_for(root), "select distinct phase from journey_event order by 1")
    assert phases.column("phase").to_pylist() == ["intra", "post", "pre"]


def test_a_rerun_over_the_same_inputs_changes_nothing(
    first_run: tuple[RunSummary, Path], generated: GenerationResult
) -> None:
    _, root = first_run
    settings = settings_for(root, landing=generated.out / "landing")
    lake = Lake(settings)
    tables = [gold("surgical_episode"), gold("journey_event"), QUARANTINE, HELD]
    before = {t.label: lake.version(t) for t in tables}
    content = lake.read(gold("surgical_episode"))
    with pytest.MonkeyPatch.context() as monkeypatch:
        use_settings_env(monkeypatch, settings)
        summary = patient_journey()
    assert all(i.records == 0 and i.new_inputs == 0 for i in summary.ingests)
    assert summary.silver is not None and not summary.silver.built
    assert {t.label: lake.version(t) for t in tables} == before
    after = lake.read(gold("surgical_episode"))
    assert isinstance(after, pa.Table) and after.equals(content)


def test_a_failed_preflight_fails_the_flow_and_nothing_reaches_bronze(
    harness: None, generated: GenerationResult, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A missing key fails the flow with its own error; no batch is put aside or committed."""
    settings = settings_for(tmp_path, landing=generated.out / "landing")
    use_settings_env(monkeypatch, settings)
    monkeypatch.setenv("JOURNEY_IDENTITY__PATIENT_KEY", "")
    with pytest.raises(ConfigurationError, match="patient key"):
        patient_journey()
    lake = Lake(settings)
    assert [name for name in BRONZE_TABLES.values() if lake.version(bronze(name)) is not None] == []
    assert not (tmp_path / "restricted" / SPILL_PREFIX).exists()


def test_a_run_whose_records_mostly_wait_for_their_patients_ends_with_a_warning_after_loading(
    harness: None, generated: GenerationResult, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    landing = tmp_path / "landing"
    shutil.copytree(generated.out / "landing" / "device", landing / "device")  # no EHR: no case links
    settings = settings_for(tmp_path, landing=landing)
    use_settings_env(monkeypatch, settings)
    monkeypatch.setenv("JOURNEY_SOURCES__OPTIONAL", '["fhir", "redcap"]')
    state = patient_journey(return_state=True)
    assert state.is_completed() and state.name == "Completed with warnings"  # not a plain Completed
    message = str(state.message)
    assert "device_event 0.0%" in message and "JOURNEY_QUALITY__MIN_LINKAGE_RATE" in message
    held = Lake(settings).read(HELD)
    assert held is not None and held.num_rows > 0  # loaded (held) all the same, retried later
    monkeypatch.setenv("JOURNEY_QUALITY__MIN_LINKAGE_RATE", "0")
    assert patient_journey(rebuild=True).built  # with no floor, the same run completes
