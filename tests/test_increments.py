"""Correctness is unchanged by increments: the same input loaded in one run, or split at random
into k increments (2 to 10), gives the same warehouse, table for table, run ids and load times
aside.

Each source's files arrive in their listing order, cut at random points, and the sources are cut
independently: an increment can hold a patient's device data, feed messages or PROMs before the
patient, a later version or a deletion of a record before or after the record. The registry
database grows row by row (by ``updated_at``), so its later rows arrive late."""

from __future__ import annotations

import json
import shutil
import sqlite3
import tempfile
from pathlib import Path

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from patient_journey import pipeline
from patient_journey.generate import GenerationResult, generate
from patient_journey.lake import Lake, Zone, bronze
from patient_journey.pipeline import HELD, QUARANTINE, TableCounts
from patient_journey.settings import QualitySettings
from patient_journey.sources.plugins import STAGED_TABLES
from tests.conftest import settings_for

SOURCE_OF = {table: source for source, table in pipeline.BRONZE_TABLES.items()}
REGISTRY = Path("outcomes") / "registry.sqlite"
# Columns that name the run or the time of a load: they differ between any two loads.
RUN_COLUMNS = {"run_id", "ingested_at", "processed_at", "first_seen_run_id", "held_in_run_id"}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> GenerationResult:
    return generate(tmp_path_factory.mktemp("increments"), patients=30, seed=7, bad_rate=0.05)


@pytest.fixture(scope="module")
def landing(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where every load finds its input: lineage carries a keyed hash of each input's URI, so
    the loads compared read the same paths."""
    return tmp_path_factory.mktemp("shared") / "landing"


@pytest.fixture(scope="module")
def one_load(
    cohort: GenerationResult, landing: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, object]:
    shutil.copytree(cohort.out / "landing", landing)
    return load(tmp_path_factory.mktemp("one-load"), landing, "run-1")


def load(root: Path, landing: Path, run_id: str, spill: Path | None = None) -> dict[str, object]:
    """Ingest every source and build; the warehouse, quarantine and held records as comparable rows.

    Every run lists every device blob: the increments land blobs in any time folder, where IoT
    Hub only writes the latest (the listing of recent folders has its own tests,
    test_iothub_listing)."""
    settings = settings_for(root, landing=landing)
    settings = settings.model_copy(
        update={
            "sources": settings.sources.model_copy(update={"device_full_listing_hours": 0}),
            "storage": settings.storage.model_copy(update={"spill_dir": spill and str(spill)}),
        }
    )
    read = {source for source in pipeline.SOURCES if pipeline.ingest(settings, source, run_id).records}
    report = pipeline.build_silver(settings, run_id)
    gold = pipeline.build_gold(settings, run_id) if report.built else None
    return {
        "patients": None if gold is None else gold.patients,
        "tables": warehouse(settings_for(root)),
        "counts": report.tables,
        "read": read,
        "flattened": report.flattened,
        "replaced": report.replaced,
    }


def canonical(table: pa.Table) -> list[str]:
    table = table.drop_columns([c for c in table.column_names if c in RUN_COLUMNS])
    return sorted(json.dumps(row, sort_keys=True, default=str) for row in table.to_pylist())


def warehouse(settings: object) -> dict[str, list[str]]:
    lake = Lake(settings)  # type: ignore[arg-type]
    refs = [*lake.tables(Zone.WAREHOUSE, "silver"), *lake.tables(Zone.WAREHOUSE, "gold"), QUARANTINE, HELD]
    tables = {}
    for ref in refs:
        table = lake.read(ref)
        assert table is not None, ref.label
        tables[ref.label] = canonical(table)
    return tables


def areas(landing: Path) -> dict[str, list[Path]]:
    """Each source area's files (the landing's top folders), in listing order; not the registry."""
    grouped: dict[str, list[Path]] = {}
    for path in sorted(p.relative_to(landing) for p in landing.rglob("*") if p.is_file()):
        if path != REGISTRY:
            grouped.setdefault(path.parts[0], []).append(path)
    return grouped


def registry_stamps(database: Path) -> list[str]:
    with sqlite3.connect(database) as connection:
        tables = [row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return sorted({row[0] for t in tables for row in connection.execute(f'SELECT updated_at FROM "{t}"')})


def registry_until(source: Path, target: Path, stamp: str | None) -> None:
    """The registry as it stood when its latest change was ``stamp`` (all of it for None)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    if stamp is None:
        return
    with sqlite3.connect(target) as connection:
        tables = [row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            connection.execute(f'DELETE FROM "{table}" WHERE updated_at > ?', (stamp,))


def cuts(data: st.DataObject, k: int, n: int, label: str) -> list[int]:
    """Where each of k increments ends: k - 1 sorted cut points in [0, n], and n."""
    points = data.draw(st.lists(st.integers(0, n), min_size=k - 1, max_size=k - 1), label=label)
    return [*sorted(points), n]


# No shrinking: each example loads up to ten times; a failure reports the increments it drew.
@settings(
    max_examples=4,
    deadline=None,
    phases=(Phase.explicit, Phase.reuse, Phase.generate),
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_a_load_split_into_increments_gives_the_same_warehouse(
    data: st.DataObject, cohort: GenerationResult, one_load: dict[str, object], landing: Path
) -> None:
    source = cohort.out / "landing"
    k = data.draw(st.integers(2, 10), label="increments")
    files = areas(source)
    ends = {area: cuts(data, k, len(paths), area) for area, paths in files.items()}
    stamps = registry_stamps(source / REGISTRY)
    registry_ends = cuts(data, k, len(stamps), "registry")
    shutil.rmtree(landing)
    landing.mkdir()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        copied = dict.fromkeys(files, 0)
        read_before: set[str] = set()
        for step in range(k):
            for area, paths in files.items():
                for path in paths[copied[area] : ends[area][step]]:
                    (landing / path).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(source / path, landing / path)
                copied[area] = max(copied[area], ends[area][step])
            end = registry_ends[step]
            if end:  # the registry as it stood then; absent before its first row
                stamp = None if end == len(stamps) else stamps[end - 1]
                registry_until(source / REGISTRY, landing / REGISTRY, stamp)
            result = load(root, landing, f"run-{step + 1}")
            for spec in STAGED_TABLES:  # a bronze table that grew again: only its new rows flattened
                if SOURCE_OF[spec.bronze] in result["read"] & read_before:  # type: ignore[operator]
                    assert result["flattened"][spec.name] == "since", (step, spec.name)  # type: ignore[index]
                    # ... and only the records at the positions its new rows touch made again
                    assert result["replaced"][spec.name] != "whole", (step, spec.name)  # type: ignore[index]
            read_before |= result["read"]  # type: ignore[arg-type]
            if result["replaced"] and "whole" not in result["replaced"].values():  # type: ignore[attr-defined]
                # no table built whole: gold made again for the patients whose rows changed only
                assert isinstance(result["patients"], int), (step, result["patients"])
    expected_tables = one_load["tables"]
    assert isinstance(expected_tables, dict) and isinstance(result["tables"], dict)
    assert sorted(result["tables"]) == sorted(expected_tables)
    for name, rows in expected_tables.items():
        assert result["tables"][name] == rows, name
    counts: list[TableCounts] = result["counts"]  # type: ignore[assignment]
    assert counts == one_load["counts"]
    assert all(table.balanced for table in counts)


def test_rows_are_deleted_by_many_keys_and_by_a_null_key(tmp_path: Path) -> None:
    lake = Lake(settings_for(tmp_path))
    ref = bronze("keyed")
    keys = [f"patient-{n:05d}" for n in range(30_000)]
    lake.append(ref, pa.table({"patient_key": [*keys, None], "n": range(len(keys) + 1)}))
    gone = {*keys[::3], None, "not-there"}
    assert lake.delete_keys(ref, "patient_key", gone) == len(keys[::3]) + 1
    left = lake.read(ref)
    assert left is not None and sorted(left.column("patient_key").to_pylist()) == sorted(
        set(keys) - set(keys[::3])
    )
    assert lake.delete_keys(ref, "patient_key", set()) == 0


def test_the_change_feed_gives_the_rows_appended_between_two_versions_and_only_those(tmp_path: Path) -> None:
    lake = Lake(settings_for(tmp_path))
    ref = bronze("example")
    for n in range(4):  # versions 0-3
        lake.append(ref, pa.table({"entity": ["a", "b"], "n": [n, n]}))
    rows = lake.changes_since(ref, 0, 2, ["n"], "entity = 'a'")
    assert rows is not None and sorted(rows.read_all().column("n").to_pylist()) == [1, 2]
    assert lake.changes_since(ref, 3, 3, ["n"]) is None  # nothing new
    lake.delete(ref, "n = 3")  # version 4: rows deleted, so the feed is not all that changed
    assert lake.changes_since(ref, 2, 4, ["n"]) is None
    rows = lake.changes_since(ref, 0, 3, ["n"])  # before the delete: still appends only
    assert rows is not None and sorted(rows.read_all().column("n").to_pylist()) == [1, 1, 2, 2, 3, 3]


def test_a_build_flattens_whole_when_bronze_rows_were_deleted_and_loads_the_same(
    cohort: GenerationResult, tmp_path: Path
) -> None:
    """The clean-up of a crashed commit deletes bronze rows: the next build cannot extend what it
    flattened from the change feed, flattens those tables whole, and loads what a clean run does."""
    landing = tmp_path / "landing"
    shutil.copytree(cohort.out / "landing", landing)
    clean = load(tmp_path / "clean", landing, "run-1")
    settings = settings_for(tmp_path / "crashed", landing=landing)
    for source in pipeline.SOURCES:
        pipeline.ingest(settings, source, "run-1")
    pipeline.build_silver(settings, "run-1")
    lake = Lake(settings)
    registry = lake.read(bronze("registry_row"))
    assert registry is not None
    run = registry.schema.get_field_index("run_id")
    crashed = registry.slice(0, 3).set_column(run, "run_id", pa.array(["crashed"] * 3))
    lake.append(bronze("registry_row"), crashed)  # a commit that crashed before its ledger entry
    pipeline._remove_uncommitted(lake, "registry")  # what the next ingest of the registry does
    report = pipeline.build_silver(settings, "run-2", force=True)
    registry_tables = [spec.name for spec in STAGED_TABLES if spec.bronze == "registry_row"]
    assert {report.flattened[name] for name in registry_tables} == {"whole"}
    assert report.tables == clean["counts"]


def hold_back(landing: Path, aside: Path, every: int = 2) -> list[Path]:
    """Move the newest 1/``every`` of the device blobs (by IoT Hub time folder, where new blobs
    land) out of the landing zone (to ``aside``); returns their paths relative to it, for
    ``bring_back``."""
    blobs = sorted(
        (p.relative_to(landing) for p in (landing / "device").rglob("*") if p.is_file()),
        key=lambda blob: (*blob.parent.parts[-4:], blob.stem, str(blob)),  # {YYYY}/{MM}/{DD}/{HH}/{mm}
    )
    blobs = blobs[len(blobs) - len(blobs) // every :]
    for path in blobs:
        (aside / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.move(landing / path, aside / path)
    return blobs


def bring_back(landing: Path, aside: Path, blobs: list[Path]) -> None:
    for path in blobs:
        shutil.move(aside / path, landing / path)


def test_a_build_after_one_that_did_not_finish_is_whole_and_loads_the_same(
    cohort: GenerationResult, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A build that stops part way may have replaced some tables' rows and not others: the
    next build cannot trust what it finds, builds every table whole, and loads what a clean
    run does."""
    landing, aside = tmp_path / "landing", tmp_path / "aside"
    shutil.copytree(cohort.out / "landing", landing)
    clean = load(tmp_path / "clean", landing, "run-1")
    later = hold_back(landing, aside)
    load(tmp_path / "crashed", landing, "run-1")
    bring_back(landing, aside, later)
    settings = settings_for(tmp_path / "crashed", landing=landing)
    assert pipeline.ingest(settings, "device", "run-2").new_inputs == len(later)

    def power_cut(*_args: object, **_kwargs: object) -> int:
        raise RuntimeError("the machine went away")

    with monkeypatch.context() as patched:
        patched.setattr(pipeline, "_replace_silver", power_cut)  # after the staged stores were replaced
        with pytest.raises(RuntimeError):
            pipeline.build_silver(settings, "run-2")
    report = pipeline.build_silver(settings, "run-3")
    assert set(report.replaced.values()) == {"whole"}
    pipeline.build_gold(settings, "run-3")
    assert warehouse(settings_for(tmp_path / "crashed")) == clean["tables"]
    assert report.tables == clean["counts"]


def test_a_changed_suite_makes_the_next_build_whole(cohort: GenerationResult, tmp_path: Path) -> None:
    """Records are gated again only where something new arrived, unless the rules changed: then
    every record is (a build under other suites, templates or code is whole)."""
    landing, aside = tmp_path / "landing", tmp_path / "aside"
    shutil.copytree(cohort.out / "landing", landing)
    suites = tmp_path / "expectations"
    shutil.copytree(Path(__file__).resolve().parents[1] / "expectations", suites)
    settings = settings_for(tmp_path / "root", landing=landing).model_copy(
        update={"quality": QualitySettings(expectations_dir=suites)}
    )

    def build(run_id: str) -> pipeline.BuildReport:
        for source in pipeline.SOURCES:
            pipeline.ingest(settings, source, run_id)
        return pipeline.build_silver(settings, run_id)

    later = hold_back(landing, aside, every=3)
    assert set(build("run-1").replaced.values()) == {"whole"}  # the first build
    pipeline.build_gold(settings, "run-1")
    held_back = later[: len(later) // 2]
    bring_back(landing, aside, held_back)
    report = build("run-2")
    assert report.replaced["device_event"] != "whole" and report.replaced["patient"] == 0
    gold = pipeline.build_gold(settings, "run-2")  # for the patients of the new device data alone
    assert isinstance(gold.patients, int) and gold.patients > 0
    bring_back(landing, aside, later[len(later) // 2 :])
    suite = suites / "staged" / "patient.json"
    suite.write_text(suite.read_text() + "\n")  # the same rules, but the build cannot know
    report = build("run-3")
    assert set(report.replaced.values()) == {"whole"}


def test_an_input_read_again_replaces_its_rows_in_an_incremental_build(
    cohort: GenerationResult, tmp_path: Path
) -> None:
    """New content under a file's name is read again, and its latest read replaces what the
    earlier one loaded: the records it no longer holds leave every table, as in a clean load."""
    landing = tmp_path / "landing"
    shutil.copytree(cohort.out / "landing", landing)
    load(tmp_path / "root", landing, "run-1")
    export = max(landing.rglob("*Observation*.ndjson"), key=lambda p: p.stat().st_size)
    lines = export.read_bytes().splitlines()
    export.write_bytes(b"\n".join(lines[: len(lines) // 2]) + b"\n")
    again = load(tmp_path / "root", landing, "run-2")
    assert again["replaced"]["observation"] != "whole"  # type: ignore[index]
    clean = load(tmp_path / "clean", landing, "run-1")
    assert again["tables"] == clean["tables"]
    assert again["counts"] == clean["counts"]


def test_a_gold_build_run_again_changes_nothing(cohort: GenerationResult, tmp_path: Path) -> None:
    """A retried gold build (its task failed after writing) leaves the warehouse and the
    quarantine as they were: gold's quarantined rows are replaced, not appended again."""
    landing = tmp_path / "landing"
    shutil.copytree(cohort.out / "landing", landing)
    first = load(tmp_path / "root", landing, "run-1")
    again = pipeline.build_gold(settings_for(tmp_path / "root", landing=landing), "run-1")
    assert again.patients == 0  # nothing new since the last gold build
    assert warehouse(settings_for(tmp_path / "root")) == first["tables"]


def test_a_build_in_parts_of_records_and_patient_buckets_loads_the_same(
    one_load: dict[str, object], landing: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A large table built whole is resolved, gated and linked part by part of its record ids,
    and gold of every patient a few buckets at a time, so that a build holds one part: the
    parts give the warehouse that one piece gives, and leave no file in the spill folder."""
    split: list[str] = []
    made = pipeline.FlattenedParts

    def counted(lake: Lake, spec: object, count: int) -> object:
        split.append(f"{spec.name}:{count}")  # type: ignore[attr-defined]
        return made(lake, spec, count)  # type: ignore[arg-type]

    spill = tmp_path / "spill"
    monkeypatch.setattr(pipeline, "FlattenedParts", counted)
    monkeypatch.setattr(pipeline, "STAGE_PART_ROWS", 40)
    monkeypatch.setattr(pipeline, "GOLD_UNIT_ROWS", 50)
    in_parts = load(tmp_path / "parts", landing, "run-1", spill)
    assert any(name.startswith("device_event:") and int(name.split(":")[1]) > 1 for name in split)
    assert not any(name.split(":")[0] in pipeline.identity_inputs(pipeline.IDENTITY) for name in split)
    assert in_parts["tables"] == one_load["tables"]
    assert in_parts["counts"] == one_load["counts"]
    assert spill.is_dir() and not any(spill.iterdir())


def test_a_table_whose_suite_has_a_rule_over_all_rows_is_not_split_in_parts(
    cohort: GenerationResult, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A unique column is a rule over all rows: parts checked apart would miss a value repeated
    across two of them, so such a table is built in one piece whatever its size."""
    suites = tmp_path / "expectations"
    shutil.copytree(Path(__file__).resolve().parents[1] / "expectations", suites)
    suite = suites / "staged" / "device_event.json"
    document = json.loads(suite.read_text())
    document["expectations"].append(
        {
            "type": "expect_column_values_to_be_unique",
            "kwargs": {"column": "measurement_id"},
            "meta": {"severity": "warn", "rule": "measurement_id_unique"},
        }
    )
    suite.write_text(json.dumps(document))
    settings = settings_for(tmp_path / "root", landing=cohort.out / "landing").model_copy(
        update={"quality": QualitySettings(expectations_dir=suites)}
    )
    split: list[str] = []
    made = pipeline.FlattenedParts

    def counted(lake: Lake, spec: object, count: int) -> object:
        split.append(spec.name)  # type: ignore[attr-defined]
        return made(lake, spec, count)  # type: ignore[arg-type]

    monkeypatch.setattr(pipeline, "FlattenedParts", counted)
    monkeypatch.setattr(pipeline, "STAGE_PART_ROWS", 40)
    for source in pipeline.SOURCES:
        pipeline.ingest(settings, source, "run-1")
    report = pipeline.build_silver(settings, "run-1")
    assert report.built and "device_event" not in split
    assert "observation" in split  # row-by-row suites: split as before
