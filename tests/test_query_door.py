"""The analysts' door (``journey query`` and ``open_warehouse``) opens onto the warehouse alone:
no DuckDB function reads a file outside it, and only read-only statements run."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import write_deltalake
from typer.testing import CliRunner

from journey_cli import app
from patient_journey.errors import JourneyError
from patient_journey.query import open_warehouse, run_query
from patient_journey.settings import JourneySettings
from tests.conftest import settings_for, use_settings_env

CANARY = "CANARY-Given-Family-555-12-3456"


@pytest.fixture
def zones(tmp_path: Path) -> tuple[JourneySettings, list[Path]]:
    settings = settings_for(tmp_path)
    write_deltalake(str(tmp_path / "warehouse" / "gold" / "surgical_episode"), pa.table({"n": [1, 2]}))
    secret = pa.table({"name": [CANARY]})
    write_deltalake(str(tmp_path / "restricted" / "bronze" / "fhir_resource"), secret)
    landing = tmp_path / "landing" / "ehr"
    landing.mkdir(parents=True)
    files = [
        landing / "Patient.000.ndjson",
        tmp_path / "restricted" / "names.csv",
        tmp_path / "restricted" / "names.parquet",
    ]
    files[0].write_text(f'{{"name": "{CANARY}"}}\n')
    files[1].write_text(f"name\n{CANARY}\n")
    duckdb.sql(f"COPY (SELECT '{CANARY}' AS name) TO '{files[2]}' (FORMAT parquet)")
    return settings, [tmp_path / "restricted" / "bronze" / "fhir_resource", *files]


def _table_functions() -> list[str]:
    with duckdb.connect() as connection:
        rows = connection.sql(
            "SELECT DISTINCT function_name FROM duckdb_functions() WHERE function_type = 'table' ORDER BY 1"
        ).fetchall()
    return [name for (name,) in rows]


def test_no_duckdb_table_function_reads_outside_the_warehouse(
    zones: tuple[JourneySettings, list[Path]],
) -> None:
    settings, outside = zones
    functions = [*_table_functions(), "delta_scan"]
    assert {"read_csv", "read_text", "read_parquet", "read_json", "glob", "read_blob"} <= set(functions)
    connection = open_warehouse(settings)
    tried = 0
    try:
        assert connection.sql("SELECT count(*) FROM surgical_episode").fetchone() == (2,)
        for function in functions:
            for path in outside:
                for target in (str(path), f"{path}/**", str(path.parent / "*")):
                    tried += 1
                    try:
                        rows = connection.sql(f"SELECT * FROM {function}('{target}')").fetchall()
                    except duckdb.Error:
                        continue
                    assert CANARY not in repr(rows), (function, target)
        for statement in (
            f"SELECT * FROM '{outside[2]}'",  # a replacement scan by file name
            f"ATTACH '{outside[1]}' AS leak",
            "SET enable_external_access = true",
            "SET allowed_directories = ['/']",
            "LOAD httpfs",
        ):
            with pytest.raises(duckdb.Error):
                connection.sql(statement).fetchall()
    finally:
        connection.close()
    assert tried > 500


@pytest.mark.parametrize(
    "sql",
    [
        "",
        "  ;  ",
        "drop view surgical_episode",
        "copy (select 1) to 'out.csv'",
        "create table x as select 1",
        "attach 'x.duckdb'",
        "explain analyze copy (select 1) to 'out.csv'",
        "select 1; drop view surgical_episode",
        "set threads = 1",
    ],
)
def test_only_read_only_statements_run_and_others_are_refused_in_one_line(
    zones: tuple[JourneySettings, list[Path]], sql: str
) -> None:
    settings, _ = zones
    with pytest.raises(JourneyError) as refused:
        run_query(settings, sql)
    assert "\n" not in str(refused.value)
    assert run_query(settings, "select count(*) as n from surgical_episode").column("n").to_pylist() == [2]


def test_read_only_statements_of_every_kind_run(zones: tuple[JourneySettings, list[Path]]) -> None:
    settings, _ = zones
    for sql in (
        "select 1 as n",
        "with a as (select 1 as n) select * from a",
        "from surgical_episode",
        "describe surgical_episode",
        "show tables",
        "summarize surgical_episode",
        "explain select * from surgical_episode",
    ):
        assert run_query(settings, sql).num_rows >= 1, sql


def test_journey_query_shows_every_statement_reads_a_file_and_writes_parquet(
    zones: tuple[JourneySettings, list[Path]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, _ = zones
    use_settings_env(monkeypatch, settings)
    runner = CliRunner()
    both = runner.invoke(app, ["query", "select 11 as first_one; select 22 as second_one", "-o", "csv"])
    assert both.exit_code == 0 and both.output.splitlines() == ['"first_one"', "11", '"second_one"', "22"]
    script = tmp_path / "q.sql"
    script.write_text("select count(*) as n from surgical_episode;\n")
    target = tmp_path / "out.parquet"
    written = runner.invoke(app, ["query", "--file", str(script), "-o", "parquet", "--to", str(target)])
    assert written.exit_code == 0, written.output
    assert pq.read_table(target).column("n").to_pylist() == [2]
    assert runner.invoke(app, ["query"]).exit_code == 2  # neither SQL nor a file
    refused = runner.invoke(app, ["query", "drop view surgical_episode"])
    assert refused.exit_code == 2 and "Query refused" in refused.output and "Traceback" not in refused.output
