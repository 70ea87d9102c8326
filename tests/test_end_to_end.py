"""The flow on generated data reproduces the generator's ground truth exactly."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest
from prefect.testing.utilities import prefect_test_harness

from flows.patient_journey import patient_journey
from patient_journey.generate import GenerationResult
from patient_journey.identity import KeyMaker
from patient_journey.lake import Lake, gold
from patient_journey.pipeline import HELD, QUARANTINE
from patient_journey.query import run_query
from patient_journey.report import RunSummary, render_markdown
from tests.conftest import TEST_KEY, settings_for, use_settings_env

pytestmark = pytest.mark.prefect

# The rule each planted kind must be caught by, and where it must end up.
EXPECTED_RULE = {
    ("malformed_json", "observation"): "json_well_formed",
    ("missing_required_field", "observation"): "subject_present",
    ("out_of_range_value", "prom_response"): "score_in_range",
    ("duplicate_id", "observation"): "record_id_unique",
    ("device_case_unmatched", "device_message"): "case_id_links_to_procedure",
    ("unknown_patient_outcome", "registry_patient"): "mrn_and_birth_date_link_to_patient",
    ("unknown_patient_outcome", "prom_response"): "registry_id_links_to_patient",
}
STAGED_NAME = {"device_message": "device_event"}


@pytest.fixture(scope="module")
def harness() -> Iterator[None]:
    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="module")
def first_run(
    harness: None, generated: GenerationResult, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[RunSummary, Path]]:
    root = tmp_path_factory.mktemp("e2e")
    settings = settings_for(root, landing=generated.out / "landing")
    with pytest.MonkeyPatch.context() as monkeypatch:
        use_settings_env(monkeypatch, settings)
        yield patient_journey(), root


def _truth(generated: GenerationResult, name: str) -> list[dict[str, str]]:
    with (generated.out / "ground_truth" / name).open() as handle:
        return list(csv.DictReader(handle))


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ";".join(value)
    if isinstance(value, float):
        return f"{value:.1f}"
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)


def test_every_episode_fact_matches_the_ground_truth(
    first_run: tuple[RunSummary, Path], generated: GenerationResult
) -> None:
    _, root = first_run
    keys = KeyMaker(TEST_KEY.encode())
    episodes = Lake(settings_for(root)).read(gold("surgical_episode"))
    assert episodes is not None
    by_key = {row["episode_key"]: row for row in episodes.to_pylist()}
    truth = _truth(generated, "episodes.csv")
    assert len(by_key) == len(truth) == generated.episodes
    mismatches = []
    for expected in truth:
        row = by_key[keys.case_key(expected["case_id"])]
        assert row["patient_key"] == keys.patient_key(expected["mrn"])
        for column, value in expected.items():
            if column in ("case_id", "mrn"):
                continue
            actual = row[column]
            if column.startswith("prom_") and column not in ("prom_instrument", "prom_source") and value:
                value = f"{float(value):.1f}"
            if _text(actual) != value:
                mismatches.append((expected["case_id"], column, value, _text(actual)))
    assert mismatches == []


def test_every_planted_bad_record_is_quarantined_or_held_under_its_rule(
    first_run: tuple[RunSummary, Path], generated: GenerationResult
) -> None:
    _, root = first_run
    lake = Lake(settings_for(root))
    places = {"quarantined": lake.read(QUARANTINE), "held": lake.read(HELD)}
    planted = _truth(generated, "planted_bad_records.csv")
    assert len(planted) == sum(generated.planted.values()) > 0
    for record in planted:
        table = places[record["expected_outcome"]]
        assert table is not None
        rows = table.to_pylist()
        if record["source"] == "registry":
            registry_table, key = record["locator"].split(":")
            found = [r for r in rows if r["table_name"] == registry_table and r["record_id"] == key]
        else:
            found = [
                r
                for r in rows
                if r["source_uri"].endswith(record["path"]) and r["source_offset"] == int(record["locator"])
            ]
        rule = EXPECTED_RULE[(record["kind"], record["table"])]
        assert len(found) == 1, record
        assert rule in found[0]["rule"].split("; "), (record, found[0]["rule"])


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
        assert table.read == table.loaded + table.quarantined + table.held, table
    held = {t.table: t.held for t in summary.tables}
    assert held["device_event"] > 0 and held["registry_patient"] > 0


def test_the_summary_carries_no_patient_values(
    first_run: tuple[RunSummary, Path], generated: GenerationResult
) -> None:
    summary, _ = first_run
    markdown = render_markdown(summary)
    assert "| observation |" in markdown and "Overall linkage rate" in markdown
    truth = _truth(generated, "episodes.csv")
    for row in truth:
        assert row["mrn"] not in markdown and row["case_id"] not in markdown
    patients = (generated.out / "landing").rglob("Patient.000.ndjson")
    names = [
        line.split('"family":"')[1].split('"')[0] for p in patients for line in p.read_text().splitlines()
    ]
    assert names and not any(f"| {name} " in markdown for name in names)


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
