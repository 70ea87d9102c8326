"""Golden files for the pure transforms: staging, linkage and the journey build.

A three-patient population from the generator goes through ingest -> stage -> link -> journey;
every staged, silver and gold table is compared with tests/golden/*.json. After an intended
change, regenerate with ``UPDATE_GOLDEN=1 pytest tests/test_transforms_golden.py`` and review
the diff.
"""

from __future__ import annotations

import os
from pathlib import Path

import orjson
import pyarrow as pa
import pytest

from patient_journey import pipeline, staging
from patient_journey.generate import generate
from patient_journey.identity import KeyMaker
from patient_journey.journey import build_journey
from patient_journey.lake import Lake, bronze
from patient_journey.linkage import link
from patient_journey.quality import SqlSuite, load_suite_files
from patient_journey.sources.plugins import IDENTITY, JOURNEY_PARTS, LINKS, STAGED_TABLES
from patient_journey.sources.records import BRONZE_SCHEMA
from patient_journey.staging import FIELD_ERROR, SUPERSEDED, flatten, resolve, stage
from tests.conftest import TEST_KEY, settings_for

GOLDEN = Path(__file__).parent / "golden"


def _rows(table: pa.Table, landing: Path, inputs: dict[str, str]) -> list[dict[str, object]]:
    """Rows with the landing folder as ``<landing>``, and each input key as the input it names
    (``<input <landing>/...>``; keys hash the URI, whose folder differs between runs)."""
    rows = table.to_pylist()
    for row in rows:
        for key, value in row.items():
            if key == "input_key" and value is not None:
                value = f"<input {inputs[value]}>"
            if isinstance(value, str):
                row[key] = value.replace(str(landing), "<landing>")
    return rows


def _input_keys(bronze_tables: dict[str, pa.Table]) -> dict[str, str]:
    keys = KeyMaker(TEST_KEY.encode())
    uris = {uri for table in bronze_tables.values() for uri in table.column("source_uri").to_pylist()}
    return {keys.input_key(uri): uri for uri in uris}


@pytest.fixture(scope="module")
def golden_bronze(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, pa.Table], Path]:
    root = tmp_path_factory.mktemp("golden")
    generated = generate(root / "gen", patients=3, seed=5, bad_rate=0.0)
    landing = generated.out / "landing"
    settings = settings_for(root, landing=landing)
    for source in pipeline.SOURCES:
        pipeline.ingest(settings, source, "golden-run")
    lake = Lake(settings)
    bronze_tables = {
        name: lake.read(bronze(name)) or BRONZE_SCHEMA.empty_table()
        for name in pipeline.BRONZE_TABLES.values()
    }
    return bronze_tables, landing


@pytest.fixture(scope="module")
def transformed(
    golden_bronze: tuple[dict[str, pa.Table], Path],
) -> tuple[dict[str, pa.Table], Path, dict[str, str]]:
    bronze_tables, landing = golden_bronze
    staged = stage(bronze_tables, STAGED_TABLES)
    linked = link(staged, KeyMaker(TEST_KEY.encode()), "golden-run", LINKS, IDENTITY)
    gold = build_journey(linked.silver, JOURNEY_PARTS)
    tables = {f"staged.{k}": v for k, v in staged.items()}
    tables |= {f"silver.{k}": v for k, v in linked.silver.items()}
    tables |= {f"gold.{k}": v for k, v in gold.items()}
    return tables, landing, _input_keys(bronze_tables)


def test_bronze_flattened_in_parts_resolves_to_the_same_staged_tables(
    golden_bronze: tuple[dict[str, pa.Table], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Builds flatten only the bronze rows committed since the last build, in record batches:
    bronze split into parts (here: halves, in reverse order, each flattened in batches of 7
    rows) gives the same staged tables as bronze flattened at once."""
    bronze_tables, _ = golden_bronze
    whole = stage(bronze_tables, STAGED_TABLES)
    monkeypatch.setattr(staging, "FLATTEN_BATCH_ROWS", 7)
    flattened, most_batches = {}, 0
    for spec in STAGED_TABLES:
        rows = bronze_tables[spec.bronze]
        half = rows.num_rows // 2
        parts = [flatten(rows.slice(half), spec), flatten(rows.slice(0, half).to_reader(), spec)]
        batches = [batch for part in parts for batch in part]
        most_batches = max(most_batches, len(batches))
        flattened[spec.name] = pa.Table.from_batches(batches, parts[0].schema)
    assert most_batches > 2  # some table came in several batches
    in_parts = resolve(flattened, STAGED_TABLES)
    assert flattened == {}  # each flattened table was released once resolved
    assert list(in_parts) == list(whole)
    for name in whole:
        assert in_parts[name].equals(whole[name]), name


@pytest.mark.parametrize(
    "table",
    [
        "staged.patient",
        "staged.encounter",
        "staged.procedure",
        "staged.observation",
        "staged.device_event",
        "staged.prom_response",
        "staged.redcap_prom",
        "silver.patient",
        "silver.device_event",
        "silver.prom_score",
        "gold.surgical_episode",
        "gold.journey_event",
    ],
)
def test_transform_output_matches_its_golden_file(
    transformed: tuple[dict[str, pa.Table], Path, dict[str, str]], table: str
) -> None:
    tables, landing, inputs = transformed
    actual = orjson.loads(orjson.dumps(_rows(tables[table], landing, inputs), default=str))
    path = GOLDEN / f"{table}.json"
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_bytes(orjson.dumps(actual, option=orjson.OPT_INDENT_2) + b"\n")
    assert path.exists(), f"missing golden file {path}: run with UPDATE_GOLDEN=1"
    assert actual == orjson.loads(path.read_bytes())


def test_every_shipped_staged_and_gold_suite_is_evaluated_in_sql(
    transformed: tuple[dict[str, pa.Table], Path, dict[str, str]],
) -> None:
    """The build gates these tables without Great Expectations' pandas batches (SqlSuite); a
    suite edited to hold an expectation SQL does not evaluate would go to GX, and this names it."""
    tables, _, _ = transformed
    suites = load_suite_files(Path(__file__).parents[1] / "expectations")
    checked = 0
    for label, table in tables.items():
        layer, name = label.split(".")
        if layer not in ("staged", "gold"):
            continue
        gated = table.drop_columns([c for c in (SUPERSEDED, FIELD_ERROR) if c in table.column_names])
        assert SqlSuite.of(suites[(layer, name)].document, gated.schema) is not None, label
        checked += 1
    assert checked == len([key for key in suites if key[0] in ("staged", "gold")])
