"""Unit tests of the library's contracts: configuration, keys, the quality gate, parsing, CLI."""

from __future__ import annotations

import hashlib
import hmac
import json
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pytest
from typer.testing import CliRunner

from journey_cli import app
from patient_journey import pipeline
from patient_journey.errors import ConfigurationError, ExpectationSuiteError, QualityGateError, SourceError
from patient_journey.identity import KeyMaker
from patient_journey.quality import QualityGate
from patient_journey.report import RunSummary, render_markdown
from patient_journey.sources.fhir import extract_ndjson, resource_type_of_file
from patient_journey.sources.records import Extraction, InputSelection
from patient_journey.storage import (
    LISTING_SCHEMA,
    PROBE_NAME,
    FileInfo,
    InputChangedError,
    Storage,
    listed_files,
)
from tests.conftest import settings_for


def test_a_run_without_a_key_refuses_to_start_and_says_where_it_looked(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, key=None)
    with pytest.raises(ConfigurationError) as error:
        settings.patient_hmac_key()
    assert "JOURNEY_IDENTITY__PATIENT_KEY" in str(error.value)
    assert "JOURNEY_IDENTITY__PATIENT_KEY_FILE" in str(error.value)


def test_a_short_key_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="shorter than 32 bytes"):
        settings_for(tmp_path, key="short").patient_hmac_key()


def test_patient_key_is_hmac_sha256_of_the_namespaced_identifier() -> None:
    secret = b"k" * 32
    expected = hmac.new(secret, b"mrn:MRN00000001", hashlib.sha256).hexdigest()
    keys = KeyMaker(secret)
    assert keys.patient_key("MRN00000001") == expected
    assert keys.case_key("MRN00000001") != expected  # namespaces never collide
    assert KeyMaker(b"j" * 32).patient_key("MRN00000001") != expected


def test_the_cli_run_without_a_key_exits_with_a_clear_message(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["run"])
    assert result.exit_code == 2
    assert "No patient key is configured" in result.output


def _suite(folder: Path, layer: str, table: str, expectations: list[dict[str, object]]) -> None:
    (folder / layer).mkdir(parents=True, exist_ok=True)
    (folder / layer / f"{table}.json").write_text(json.dumps({"name": table, "expectations": expectations}))


def _rows() -> pa.Table:
    return pa.table(
        {
            "id": ["a", "b", "c", "d"],
            "score": [10.0, 250.0, None, 99.0],
            "source_uri": ["f.ndjson"] * 4,
            "source_offset": [1, 2, 3, 4],
        }
    )


def test_row_rules_of_error_severity_quarantine_only_the_rows_that_break_them(tmp_path: Path) -> None:
    _suite(
        tmp_path,
        "staged",
        "t",
        [
            {
                "type": "expect_column_values_to_be_between",
                "kwargs": {"column": "score", "min_value": 0, "max_value": 100},
                "meta": {"severity": "error", "rule": "score_in_range"},
            },
            {
                "type": "expect_column_values_to_not_be_null",
                "kwargs": {"column": "score"},
                "meta": {"severity": "warn", "rule": "score_present"},
            },
        ],
    )
    result = QualityGate(tmp_path).check("staged", "t", _rows(), "test", "run-1")
    assert result.passed.column("id").to_pylist() == ["a", "c", "d"]
    assert result.quarantined.column("record_id").to_pylist() == ["b"]
    assert result.quarantined.column("rule").to_pylist() == ["score_in_range"]
    assert result.quarantined.column("source_offset").to_pylist() == [2]
    outcomes = {o.rule: o for o in result.outcomes}
    assert outcomes["score_present"].success is False and outcomes["score_present"].unexpected_count == 1
    assert "250" not in repr(result.outcomes)  # counts, never values


def test_an_expectation_that_cannot_be_evaluated_does_not_shift_the_others(tmp_path: Path) -> None:
    # GX returns such a result first: outcomes must still be matched to their own rules.
    _suite(
        tmp_path,
        "staged",
        "t",
        [
            {
                "type": "expect_column_values_to_be_between",
                "kwargs": {"column": "score", "min_value": 0, "max_value": 100},
                "meta": {"severity": "error", "rule": "score_in_range"},
            },
            {
                "type": "expect_column_values_to_not_be_null",
                "kwargs": {"column": "no_such_column"},
                "meta": {"severity": "warn", "rule": "optional_present"},
            },
        ],
    )
    result = QualityGate(tmp_path).check("staged", "t", _rows(), "test", "run-1")
    assert result.quarantined.column("rule").to_pylist() == ["score_in_range"]
    outcomes = {o.rule: o for o in result.outcomes}
    assert outcomes["score_in_range"].unexpected_count == 1 and outcomes["score_in_range"].column == "score"
    assert outcomes["optional_present"].evaluated is False and outcomes["optional_present"].severity == "warn"

    _suite(
        tmp_path,
        "staged",
        "u",
        [
            {
                "type": "expect_column_values_to_not_be_null",
                "kwargs": {"column": "id"},
                "meta": {"severity": "error", "rule": "id_present"},
            },
            {
                "type": "expect_column_values_to_not_be_null",
                "kwargs": {"column": "no_such_column"},
                "meta": {"severity": "error", "rule": "required_present"},
            },
        ],
    )
    with pytest.raises(QualityGateError, match=r"required_present .* could not be evaluated"):
        QualityGate(tmp_path).check("staged", "u", _rows(), "test", "run-1")


def test_only_the_columns_a_suite_reads_go_to_great_expectations(tmp_path: Path) -> None:
    in_range = {
        "type": "expect_column_values_to_be_between",
        "kwargs": {"column": "score", "min_value": 0, "max_value": 100},
        "meta": {"severity": "error", "rule": "score_in_range"},
    }
    pair_unique = {
        "type": "expect_compound_columns_to_be_unique",
        "kwargs": {"column_list": ["id", "source_offset"]},
        "meta": {"severity": "error", "rule": "pair_unique"},
    }
    every_column = {
        "type": "expect_table_columns_to_match_set",
        "kwargs": {"column_set": ["id", "score", "source_uri", "source_offset"], "exact_match": False},
        "meta": {"severity": "error", "rule": "columns_as_declared"},
    }
    _suite(tmp_path, "staged", "narrow", [in_range, pair_unique])
    _suite(tmp_path, "staged", "wide", [in_range, every_column])
    gate = QualityGate(tmp_path)
    assert gate._suites[("staged", "narrow")].columns() == {"score", "id", "source_offset"}
    assert gate._suites[("staged", "wide")].columns() is None  # a table rule sees every column
    for table in ("narrow", "wide"):
        result = gate.check("staged", table, _rows(), "test", "run-1")
        assert result.quarantined.column("record_id").to_pylist() == ["b"]
        assert result.passed.column_names == _rows().column_names  # the rows pass on whole
        assert all(o.success for o in result.outcomes if o.rule != "score_in_range")


def test_a_failing_table_rule_stops_the_run_naming_table_rule_and_counts(tmp_path: Path) -> None:
    _suite(
        tmp_path,
        "gold",
        "t",
        [
            {
                "type": "expect_table_row_count_to_be_between",
                "kwargs": {"min_value": 10},
                "meta": {"severity": "error", "rule": "enough_rows"},
            }
        ],
    )
    with pytest.raises(QualityGateError) as error:
        QualityGate(tmp_path).check("gold", "t", _rows(), "test", "run-1")
    assert (
        "gold.t" in str(error.value)
        and "enough_rows" in str(error.value)
        and "observed 4" in str(error.value)
    )


def test_a_suite_without_severity_or_with_an_unknown_expectation_fails_naming_the_file(
    tmp_path: Path,
) -> None:
    _suite(
        tmp_path, "staged", "t", [{"type": "expect_column_values_to_not_be_null", "kwargs": {"column": "id"}}]
    )
    with pytest.raises(ExpectationSuiteError, match=r"t\.json.*severity"):
        QualityGate(tmp_path)
    _suite(
        tmp_path, "staged", "t", [{"type": "expect_nonsense", "kwargs": {}, "meta": {"severity": "error"}}]
    )
    with pytest.raises(ExpectationSuiteError, match=r"t\.json"):
        QualityGate(tmp_path).check_all_parse()


def test_every_shipped_suite_loads() -> None:
    gate = QualityGate(Path(__file__).parents[1] / "expectations")
    assert gate.check_all_parse() > 40


@pytest.mark.parametrize(
    ("name", "resource_type"),
    [
        ("Patient.000.ndjson", "Patient"),
        ("Observation-1-3.ndjson", "Observation"),
        ("Encounter.ndjson.gz", "Encounter"),
        ("log.ndjson", None),
    ],
)
def test_resource_type_comes_from_the_bulk_file_name(name: str, resource_type: str | None) -> None:
    assert resource_type_of_file(f"/x/{name}") == resource_type


def test_a_malformed_line_is_rejected_by_line_without_its_content() -> None:
    out = Extraction("fhir", "run-1")
    data = b'{"resourceType":"Patient","id":"p1"}\n{"resourceType":"Patient","name":"Secret Name\n{"resourceType":"Encounter","id":"e1"}\n'
    extract_ndjson(out, FileInfo("/x/Patient.000.ndjson", len(data), "v1", datetime.now(UTC)), data)
    records, rejects = out.records().to_pylist(), out.rejects().to_pylist()
    assert [r["record_id"] for r in records] == ["p1"]
    assert [(r["source_offset"], r["rule"]) for r in rejects] == [
        (2, "json_well_formed"),
        (3, "fhir_resource_type_matches_file"),
    ]
    assert "Secret" not in repr(rejects)


def test_the_summary_of_a_run_with_no_new_input_says_the_warehouse_is_unchanged() -> None:
    from patient_journey.pipeline import BuildReport

    summary = RunSummary(
        run_id="r", silver=BuildReport(built=False, reason="no new input since the last build")
    )
    assert "Warehouse unchanged: no new input since the last build." in render_markdown(summary)


def test_fhir_exports_at_the_landing_root_leave_the_other_sources_prefixes_alone(tmp_path: Path) -> None:
    """Azure's FHIR $export cannot write under a prefix: with an empty FHIR prefix, the FHIR
    reader skips what lies under the device and REDCap prefixes."""
    landing = tmp_path / "landing"
    export = landing / "20250301T000000-job-1"
    export.mkdir(parents=True)
    (export / "Patient-1-1.ndjson").write_text('{"resourceType":"Patient","id":"p1"}\n')
    telemetry = landing / "device" / "hub" / "0" / "2025" / "03" / "01" / "00"
    telemetry.mkdir(parents=True)
    (telemetry / "05.json").write_text('{"EnqueuedTimeUtc":"2025-03-01T00:05:00Z","Body":"e30="}\n')
    settings = settings_for(tmp_path, landing=landing)
    settings = settings.model_copy(
        update={"sources": settings.sources.model_copy(update={"fhir_prefix": ""})}
    )
    report = pipeline.ingest(settings, "fhir", "run-root")
    assert (report.new_inputs, report.records, report.rejects) == (1, 1, 0)


def test_the_cli_creates_a_prefect_home_whose_parents_are_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from journey_cli import _prefect_defaults

    home = tmp_path / "not" / "there" / "prefect"
    monkeypatch.setenv("PREFECT_HOME", str(home))
    _prefect_defaults()
    assert home.is_dir()


def test_the_cli_prints_a_summary_with_file_links_verbatim(capsys: pytest.CaptureFixture[str]) -> None:
    # A link to a local path starts with "[/", which Rich would take for a closing markup tag.
    from journey_cli import print_markdown

    text = "- quarantine: [/tmp/x/quarantine/record](file:///tmp/x/quarantine/record) [bold]"
    print_markdown(text)
    assert text in capsys.readouterr().out


def test_the_summary_names_the_silver_version_a_prom_source_loaded_into() -> None:
    from patient_journey.pipeline import BuildReport, TableCounts
    from patient_journey.report import RunSummary, render_markdown

    silver = BuildReport(
        built=True, tables=[TableCounts("redcap_prom", 3, 3)], versions={"silver.prom_score": 7}
    )
    markdown = render_markdown(RunSummary(run_id="r", silver=silver))
    [row] = [line for line in markdown.splitlines() if line.startswith("| redcap_prom |")]
    assert row.rstrip().endswith("| silver v7 |")


def test_the_summary_says_what_the_build_made_again() -> None:
    from patient_journey.pipeline import BuildReport
    from patient_journey.report import RunSummary, render_markdown

    def build_line(silver: BuildReport, gold: BuildReport | None = None) -> str:
        markdown = render_markdown(RunSummary(run_id="r", silver=silver, gold=gold))
        [line] = [line for line in markdown.splitlines() if line.startswith("Build: ")]
        return line

    incremental = BuildReport(built=True, replaced={"patient": 0, "device_event": 12, "redcap_prom": "whole"})
    assert build_line(incremental, BuildReport(built=True, patients=9)) == (
        "Build: incremental, the records of 12 position(s) made again; whole: redcap_prom; "
        "gold made again for 9 patient(s)."
    )
    whole = BuildReport(built=True, replaced={"patient": "whole", "device_event": "whole"})
    assert build_line(whole, BuildReport(built=True, patients="all")) == (
        "Build: whole (every record resolved, checked and linked); gold made again for every patient."
    )


def test_a_local_listing_is_sorted_filtered_and_compared_with_the_ledger_in_arrow(tmp_path: Path) -> None:
    for name in ("b/2.avro", "a/1.avro", "a/skip.txt", "c/3.json", f"a/{PROBE_NAME}"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(name.encode())
    storage = Storage(str(tmp_path))
    listing = storage.list_table("", (".avro", ".json"))
    files = listed_files(listing)
    assert [Path(f.url).relative_to(tmp_path).as_posix() for f in files] == [
        "a/1.avro",
        "b/2.avro",
        "c/3.json",
    ]
    for file in files:
        stat = (tmp_path / file.url).stat()
        assert (file.size, file.version) == (stat.st_size, f"{stat.st_mtime_ns}-{stat.st_size}")
        assert abs(file.modified.timestamp() - stat.st_mtime) < 1e-5

    # The ledger has 1.avro as listed and 2.avro at an older version: 2.avro and 3.json are unread.
    ledger = pa.table(
        {
            "uri": [files[0].url, files[1].url],
            "version": [files[0].version, "1-1"],
            "content_hash": ["x", "y"],
        }
    )
    unread = InputSelection.from_ledger(ledger).unread(listing)
    assert unread == files[1:]
    assert InputSelection().unread(listing) == files


@pytest.mark.parametrize("size", [0, 1, 2**20 - 1, 2**20, 2**20 + 1, 2**21, 3 * 2**20 + 7])
def test_a_local_read_returns_the_whole_file_at_its_listed_version_only(tmp_path: Path, size: int) -> None:
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    (tmp_path / "f.avro").write_bytes(data)
    storage = Storage(str(tmp_path))
    [file] = storage.list_files()
    assert storage.read_bytes(file.url, file.version) == data
    (tmp_path / "f.avro").write_bytes(data + b"x")  # changed after it was listed
    with pytest.raises(InputChangedError, match="changed while it was being read"):
        storage.read_bytes(file.url, file.version)
    with pytest.raises(SourceError, match="no such file"):
        storage.read_bytes(file.url + ".gone", None)


def test_an_exact_column_set_rule_sees_the_table_s_own_columns_and_rows_are_named_by_position(
    tmp_path: Path,
) -> None:
    exact_columns = {
        "type": "expect_table_columns_to_match_set",
        "kwargs": {"column_set": _rows().column_names, "exact_match": True},
        "meta": {"severity": "error", "rule": "columns_exactly"},
    }
    in_range = {
        "type": "expect_column_values_to_be_between",
        "kwargs": {"column": "score", "min_value": 0, "max_value": 100},
        "meta": {"severity": "error", "rule": "score_in_range"},
    }
    _suite(tmp_path, "gold", "exact", [exact_columns, in_range])
    result = QualityGate(tmp_path).check("gold", "exact", _rows(), "test", "run-1")
    assert [o.success for o in result.outcomes if o.rule == "columns_exactly"] == [True]
    assert result.quarantined.column("record_id").to_pylist() == ["b"]
    assert result.quarantined.column("rule").to_pylist() == ["score_in_range"]
    assert result.passed.column_names == _rows().column_names
    assert result.passed.num_rows + result.quarantined.num_rows == _rows().num_rows


def test_what_to_read_of_a_listing_keeps_the_window_leaves_other_sources_and_waits_for_fresh_files() -> None:
    day = datetime(2026, 1, 10, tzinfo=UTC)
    files = [
        FileInfo("s3/ehr/a.ndjson", 10, "1-10", day),
        FileInfo("s3/ehr/b.ndjson", 10, "2-10", day.replace(day=12)),  # after the window
        FileInfo("s3/device/c.avro", 10, "3-10", day),  # another source's prefix
        FileInfo("s3/ehr/d.ndjson", 10, "4-10", day.replace(hour=23)),  # not settled yet
        FileInfo("s3/ehr/e.ndjson", 10, "5-10", day.replace(day=9)),  # read before at this version
    ]
    listing = pa.table(
        {name: [getattr(f, name) for f in files] for name in LISTING_SCHEMA.names}, LISTING_SCHEMA
    )
    selection = InputSelection(
        versions=frozenset({("s3/ehr/e.ndjson", "5-10")}),
        settle_before=day.replace(hour=12),
        other_sources=("s3/device/",),
        window=(day.replace(day=9), day.replace(day=11)),
    )
    rows, pending = selection.to_read(listing)
    assert listed_files(rows) == [files[0]] and pending == 1
    everything, none_pending = InputSelection().to_read(listing)
    assert listed_files(everything) == files and none_pending == 0


def test_the_last_build_is_the_one_with_the_newest_bronze_versions_whatever_the_row_order(
    tmp_path: Path,
) -> None:
    lake = pipeline.Lake(settings_for(tmp_path))
    newer, older = "device_message=7,fhir_resource=5", "device_message=3,fhir_resource=5"
    lake.append(pipeline.BUILDS, pa.table({"run_id": ["b", "a"], "bronze_versions": [newer, older]}))
    assert pipeline._last_build(lake) == {"device_message": 7, "fhir_resource": 5}


def test_csv_output_writes_list_columns_as_json(capsys: pytest.CaptureFixture[str]) -> None:
    from journey_cli import OutputFormat, print_table

    print_table(pa.table({"n": [1, 2], "devices_used": [["0081", "0082"], None]}), OutputFormat.csv)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == '"n","devices_used"'
    assert lines[1] == '1,"[""0081"",""0082""]"' and lines[2] == "2,"


def test_implausible_vital_signs_are_quarantined_by_the_observation_suite() -> None:
    gate = QualityGate(Path(__file__).resolve().parents[1] / "expectations")
    rows = {
        "observation_id": ["ok", "hr", "bmi", "kg", "other"],
        "_first_of_id": [True] * 5,
        "patient_id": ["p"] * 5,
        "code": ["8867-4", "8867-4", "39156-5", "29463-7", "1234-5"],
        "effective_time": [None] * 5,
        "value": [72.0, 1e20, 300.0, -4.0, 1e20],  # an unknown code has no range
        "source_uri": ["u"] * 5,
        "source_offset": [1, 2, 3, 4, 5],
    }
    result = gate.check("staged", "observation", pa.table(rows), "fhir", "run")
    assert dict(
        zip(
            result.quarantined.column("record_id").to_pylist(),
            result.quarantined.column("rule").to_pylist(),
            strict=True,
        )
    ) == {
        "hr": "heart_rate_plausible",
        "bmi": "bmi_plausible",
        "kg": "body_weight_plausible",
    }


def test_the_summary_of_a_very_wide_redcap_project_stays_short() -> None:
    from patient_journey.pipeline import BuildReport, IngestReport, TableCounts

    forms = {f"redcap:wide/form_{n:05d}": 3 for n in range(12_000)}
    silver = BuildReport(
        built=True, tables=[TableCounts("redcap_prom", 3, 3, cells_rejected=35_000)], bronze_only=forms
    )
    summary = RunSummary(run_id="r", silver=silver, ingests=[IngestReport("redcap", blank_rows=7)])
    markdown = render_markdown(summary)
    assert len(markdown.splitlines()) < 60
    assert (
        "and 11,990 more" in markdown
        and "redcap_prom 35,000" in markdown
        and "unchecked boxes): 7." in markdown
    )


def test_an_input_removed_after_listing_is_left_for_later_and_names_no_path(tmp_path: Path) -> None:
    from patient_journey.azure import storage_failure
    from patient_journey.sources import fhir

    landing = tmp_path / "landing" / "ehr"
    landing.mkdir(parents=True)
    for name in ("Given1_Family2.ndjson", "Patient.000.ndjson"):
        (landing / name).write_text('{"resourceType":"Patient","id":"p"}\n')
    storage = Storage(str(tmp_path / "landing"))
    listing = storage.list_table("ehr")
    (landing / "Given1_Family2.ndjson").unlink()  # gone between the listing and the read
    out = fhir.extract(storage, "ehr", InputSelection(listed=listing), "run")
    assert (out.pending_inputs, out.input_count, out.record_count) == (1, 1, 1)
    failure = storage_failure(OSError("boom"), "read", "az://landing/ehr/Given1_Family2.ndjson")
    assert "Given1" not in str(failure) and "container 'landing'" in str(failure)
    assert "Given1" not in str(
        storage_failure(OSError("boom"), "read", str(landing / "Given1_Family2.ndjson"))
    )


def test_preflight_names_a_landing_zone_or_prefix_that_is_not_there(tmp_path: Path) -> None:
    missing = settings_for(tmp_path, landing=tmp_path / "no-such-landing")
    with pytest.raises(ConfigurationError, match="no-such-landing does not exist"):
        pipeline.preflight(missing)
    result = CliRunner().invoke(
        app, ["check"], env={"JOURNEY_STORAGE__LANDING_URL": str(tmp_path / "nope"), "COLUMNS": "200"}
    )
    assert result.exit_code == 2 and "does not exist" in result.output
    landing = tmp_path / "landing"
    (landing / "ehr").mkdir(parents=True)
    (landing / "ehr" / "Patient.000.ndjson").write_text('{"resourceType":"Patient","id":"p"}\n')
    settings = settings_for(tmp_path, landing=landing)
    with pytest.raises(ConfigurationError, match=r"for the device source \(JOURNEY_SOURCES__DEVICE_PREFIX\)"):
        pipeline.preflight(settings)
    settings.sources.optional = ["device", "redcap"]
    assert pipeline.preflight(settings) > 0


def test_preflight_refuses_a_registry_that_does_not_answer_and_creates_no_file(tmp_path: Path) -> None:
    from pydantic import SecretStr

    landing = tmp_path / "landing"
    landing.mkdir()
    settings = settings_for(tmp_path, landing=landing)
    settings.sources.optional = ["fhir", "device", "redcap"]
    typo = tmp_path / "outcomes" / "registy.sqlite"
    settings.sources.registry_url = SecretStr(f"sqlite:///{typo}")
    with pytest.raises(ConfigurationError, match="no such SQLite file") as refused:
        pipeline.preflight(settings)
    assert not typo.exists() and "\n" not in str(refused.value)
    settings.sources.registry_url = SecretStr("postgresql+psycopg://journey:s3cret-pw@127.0.0.1:1/none")
    with pytest.raises(ConfigurationError, match="Cannot connect to the registry") as refused:
        pipeline.preflight(settings)
    assert "s3cret-pw" not in str(refused.value)


def test_a_first_run_that_finds_no_input_fails_saying_so_unless_empty_is_fine(tmp_path: Path) -> None:
    from patient_journey.pipeline import IngestReport

    settings = settings_for(tmp_path)
    nothing = [IngestReport(source) for source in pipeline.SOURCES]
    with pytest.raises(ConfigurationError, match=r"No input found .* first run"):
        pipeline.require_input(settings, nothing)
    settings.sources.allow_empty = True
    pipeline.require_input(settings, nothing)
    settings.sources.allow_empty = False
    pipeline.require_input(settings, [IngestReport("fhir", new_inputs=1)])  # something was read


def test_tables_printed_at_80_columns_wrap_and_cut_nothing() -> None:
    from rich.console import Console

    import journey_cli

    table = pa.table(
        {
            "patient_key": ["0e5e7751e1b1d8d0ae167267b670fde86b2bb7db68c9706bfe16da9e121b5f9b"],
            "event_time": ["2023-06-14 09:31"],
            "phase": ["intra"],
        }
    )
    narrow = Console(width=80, record=True, force_terminal=False)
    original = journey_cli.console
    journey_cli.console = narrow
    try:
        journey_cli.print_table(table)
    finally:
        journey_cli.console = original
    text = narrow.export_text()
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 80
    rows = [line.split("│")[1:-1] for line in text.splitlines() if line.startswith("│")]
    cells = ["".join(row[i].strip() for row in rows) for i in range(3)]  # cells folded over lines
    assert cells == [
        "0e5e7751e1b1d8d0ae167267b670fde86b2bb7db68c9706bfe16da9e121b5f9b",
        "2023-06-14 09:31",
        "intra",
    ]


def test_the_expectations_list_failures_first() -> None:
    from patient_journey.pipeline import BuildReport

    def outcome(rule: str, success: bool, severity: str) -> dict[str, object]:
        return {
            "table": "staged.x",
            "rule": rule,
            "expectation": "e",
            "column": None,
            "severity": severity,
            "success": success,
            "element_count": 1,
            "unexpected_count": 0,
            "observed": None,
            "evaluated": True,
        }

    silver = BuildReport(
        built=True,
        expectations=[outcome("a", True, "error"), outcome("b", False, "warn"), outcome("c", False, "error")],
    )
    rows = RunSummary(run_id="r", silver=silver).expectation_rows()
    assert [(r["rule"], r["outcome"]) for r in rows] == [("c", "failed"), ("b", "warned"), ("a", "passed")]


def test_the_quarantine_alert_reads_as_text() -> None:
    import jinja2
    import yaml

    from tasks.journey import _counts_text

    document = yaml.safe_load(
        (Path(__file__).resolve().parents[1] / "infra" / "automations" / "quarantine-alert.yaml").read_text()
    )
    payload = {
        "flow": "patient-journey",
        "share_text": "12.5%",
        "threshold_text": "5.0%",
        "tables_text": _counts_text({"observation": 1200, "encounter": 3}),
        "rejected_text": _counts_text({}),
    }
    body = jinja2.Template(document["actions"][0]["body"]).render(
        event={"resource": {"id": "patient-journey.run.r1"}, "payload": payload}
    )
    assert "quarantined 12.5% of the rows it read (threshold 5.0%)" in " ".join(body.split())
    assert "encounter 3, observation 1,200" in body and "by source: none" in body and "{" not in body


def test_serve_refuses_to_start_deployments_that_would_fail_and_names_the_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("JOURNEY_IDENTITY__PATIENT_KEY", "JOURNEY_IDENTITY__PATIENT_KEY_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # no demo key in ./journey-data either
    result = CliRunner().invoke(app, ["serve", "--home", str(tmp_path / "home")], env={"COLUMNS": "200"})
    assert result.exit_code == 2
    assert "would fail its preflight" in result.output and "JOURNEY_IDENTITY__PATIENT_KEY" in result.output
    assert not (tmp_path / "home").exists()  # nothing was started
