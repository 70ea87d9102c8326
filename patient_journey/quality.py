"""The quality gate: one Great Expectations suite per table, each expectation with a severity.

Suites live in ``expectations/<layer>/<table>.json`` in GX 1.x's suite format; each
expectation's ``meta`` carries ``severity`` (``error`` or ``warn``) and ``rule`` (the name that
quarantine rows and reports use). Row expectations of error severity quarantine the rows that
break them; a table expectation of error severity that fails stops the run. Results are computed
with ``exclude_unexpected_values`` and only row ids are read back, so no value reaches a report.

Suites whose expectations are all of the kinds ``SqlSuite`` knows (the column expectations and
the table-columns check our suites use) are evaluated in DuckDB SQL over the Arrow table, as Great
Expectations evaluates them (nulls skipped, ``mostly``, ``row_condition`` of the form
``column=="value"``): no pandas copy of the table, no GX import in the build. Any other suite is
validated by Great Expectations itself. ``tests/test_quality_sql.py`` checks the two agree.

Great Expectations is imported here lazily, once per process, because it costs seconds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cache
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from patient_journey.engine import connect
from patient_journey.errors import ExpectationSuiteError, QualityGateError

if TYPE_CHECKING:
    from great_expectations.core.expectation_suite import ExpectationSuite

SEVERITIES = ("error", "warn")

QUARANTINE_SCHEMA = pa.schema(
    [
        ("table_name", pa.string()),
        ("rule", pa.string()),
        ("source", pa.string()),
        ("record_id", pa.string()),
        ("source_uri", pa.string()),
        ("source_offset", pa.int64()),
        ("detail", pa.string()),
        ("run_id", pa.string()),
    ]
)


@dataclass(frozen=True)
class ExpectationOutcome:
    """One expectation's result, with counts only."""

    table: str
    rule: str
    expectation: str
    column: str | None
    severity: str
    success: bool
    element_count: int | None
    unexpected_count: int | None
    observed: str | None
    evaluated: bool = True  # False when GX raised while computing it (e.g. a missing column)


def merge_outcomes(outcomes: Sequence[ExpectationOutcome]) -> list[ExpectationOutcome]:
    """The outcomes of a table checked in parts (a gold build unit by unit) as one per
    expectation: counts added, a success only if every part's was; an observed value kept only
    when every part saw the same one."""
    merged: dict[tuple[object, ...], ExpectationOutcome] = {}
    for outcome in outcomes:
        key = (outcome.table, outcome.rule, outcome.expectation, outcome.column, outcome.severity)
        seen = merged.get(key)
        if seen is None:
            merged[key] = outcome
            continue
        merged[key] = replace(
            seen,
            success=seen.success and outcome.success,
            element_count=_added(seen.element_count, outcome.element_count),
            unexpected_count=_added(seen.unexpected_count, outcome.unexpected_count),
            observed=seen.observed if seen.observed == outcome.observed else None,
            evaluated=seen.evaluated and outcome.evaluated,
        )
    return list(merged.values())


def _added(first: int | None, second: int | None) -> int | None:
    return None if first is None and second is None else (first or 0) + (second or 0)


@dataclass(frozen=True)
class GateResult:
    table: str
    passed: pa.Table
    quarantined: pa.Table
    outcomes: tuple[ExpectationOutcome, ...]
    failed: pa.Array  # for each row checked: whether it was quarantined (the rows of ``quarantined``)


# Expectations that read only the columns their kwargs name, and those kwargs.
COLUMN_EXPECTATIONS = ("expect_column_", "expect_compound_columns_", "expect_multicolumn_")
COLUMN_KWARGS = ("column", "column_list", "column_A", "column_B")


@dataclass(frozen=True)
class SuiteFile:
    path: Path
    layer: str
    table: str
    document: dict[str, Any]

    def columns(self) -> frozenset[str] | None:
        """The columns the suite's expectations read, or None when a table-level expectation
        or a row condition may read any column. Only these columns go to Great Expectations,
        which converts the batch to pandas and fingerprints it whole."""
        named: set[str] = set()
        for config in self.document.get("expectations", []):
            kwargs = config.get("kwargs") or {}
            if not str(config.get("type", "")).startswith(COLUMN_EXPECTATIONS):
                return None
            # a row condition's words: the columns it reads among them (the others match no column)
            named.update(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", str(kwargs.get("row_condition") or "")))
            for key in COLUMN_KWARGS:
                value = kwargs.get(key)
                named.update(value if isinstance(value, list) else [value] if isinstance(value, str) else [])
        return frozenset(named)

    def numeric_columns(self) -> frozenset[str]:
        """The columns the suite compares with numbers (``..._to_be_between`` on values or their
        statistics): a value of another type there is a row's fault, not a table's."""
        return frozenset(
            str((config.get("kwargs") or {}).get("column"))
            for config in self.document.get("expectations", [])
            if str(config.get("type", "")).endswith("_to_be_between")
            and "length" not in str(config.get("type"))
            and (config.get("kwargs") or {}).get("column")
        )

    def across_rows(self) -> list[tuple[str, ...]] | None:
        """The column sets whose values the suite wants unique (each a rule over all rows of the
        table, not row by row); None when it has another expectation that is not row by row
        (anything but a column map, or table columns matching a set, which reads no rows)."""
        keys: list[tuple[str, ...]] = []
        for config in self.document.get("expectations", []):
            kind = str(config.get("type", ""))
            kwargs = config.get("kwargs") or {}
            if kind == "expect_column_values_to_be_unique":
                keys.append((str(kwargs.get("column")),))
            elif kind in ("expect_compound_columns_to_be_unique", "expect_multicolumn_values_to_be_unique"):
                keys.append(tuple(str(c) for c in kwargs.get("column_list") or ()))
            elif kwargs.get("mostly") is not None or not (
                kind.startswith("expect_column_values_") or kind == "expect_table_columns_to_match_set"
            ):
                return None
        return keys


def rule_of(kind: str, column: str | None, meta: dict[str, Any] | None) -> str:
    """An expectation's rule name: ``meta.rule``, else its type and column."""
    return str((meta or {}).get("rule") or (f"{kind}({column})" if column else kind))


def load_suite_files(expectations_dir: Path) -> dict[tuple[str, str], SuiteFile]:
    """Read and check every suite file; any problem fails here, before anything loads."""
    if not expectations_dir.is_dir():
        raise ExpectationSuiteError(
            f"The expectations folder {expectations_dir} does not exist (JOURNEY_QUALITY__EXPECTATIONS_DIR)."
        )
    suites: dict[tuple[str, str], SuiteFile] = {}
    for path in sorted(expectations_dir.glob("*/*.json")):
        try:
            document = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ExpectationSuiteError(f"{path} is not valid JSON (line {exc.lineno}).") from exc
        for number, config in enumerate(document.get("expectations", []), start=1):
            severity = (config.get("meta") or {}).get("severity")
            if severity not in SEVERITIES:
                raise ExpectationSuiteError(
                    f"{path}: expectation {number} ({config.get('type')}) has severity "
                    f"{severity!r}; set meta.severity to one of {', '.join(SEVERITIES)}."
                )
        suites[(path.parent.name, path.stem)] = SuiteFile(path, path.parent.name, path.stem, document)
    return suites


@cache
def _gx_context() -> Any:
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig
    from great_expectations.execution_engine import pandas_execution_engine

    # GX fingerprints every pandas batch below this many bytes by hashing all its values (with
    # pandas 3's Arrow-backed strings, 3.2 s of 8.5 s of validation at M). The fingerprint only
    # labels a batch in GX's own stores, which this ephemeral context never keeps: skip it.
    pandas_execution_engine.HASH_THRESHOLD = 0

    # GX sets INFO on some of its own loggers at import; keep them to warnings (no run-time chatter).
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("great_expectations"):
            logging.getLogger(name).setLevel(logging.WARNING)
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    return context


def _build_suite(suite: SuiteFile) -> ExpectationSuite:
    from great_expectations.core.expectation_suite import ExpectationSuite

    _gx_context()
    wanted = suite.document["expectations"]
    try:
        built = ExpectationSuite(name=suite.document.get("name", suite.table), expectations=wanted)
    except Exception as exc:
        raise ExpectationSuiteError(
            f"{suite.path} does not load as a Great Expectations suite: {exc}"
        ) from exc
    # GX may log and drop an invalid expectation instead of raising: count what loaded.
    if len(built.expectations) != len(wanted):
        raise ExpectationSuiteError(
            f"{suite.path}: {len(wanted) - len(built.expectations)} of {len(wanted)} expectation(s) "
            "did not load; check their type and kwargs."
        )
    return built


def _lineage(table: pa.Table, name: str, kind: pa.DataType) -> pa.Array | pa.ChunkedArray:
    """A lineage column, or nulls for a table built by aggregation (it has no single source)."""
    if name in table.column_names:
        return table.column(name)
    return pa.nulls(table.num_rows, kind)


def quarantine_rows(
    bad: pa.Table,
    table_name: str,
    source: str,
    rules: str | list[str],
    details: str | list[str] | pa.Array | pa.ChunkedArray,
    run_id: str,
) -> pa.Table:
    """Quarantine rows (QUARANTINE_SCHEMA) for the rows of ``bad``: its first column is the
    record id, its lineage columns (or nulls) the place; ``rules`` and ``details`` are one for
    all rows or one per row, and a detail names the rule and field, never a value."""
    count = bad.num_rows

    def each(value: str | list[str] | pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
        if isinstance(value, str):
            return pa.array([value] * count, pa.string())
        return value if isinstance(value, pa.Array | pa.ChunkedArray) else pa.array(value, pa.string())

    return pa.table(
        {
            "table_name": each(table_name),
            "rule": each(rules),
            "source": each(source),
            "record_id": pc.cast(bad.column(0), pa.string()),
            "source_uri": _lineage(bad, "source_uri", pa.string()),
            "source_offset": _lineage(bad, "source_offset", pa.int64()),
            "detail": each(details),
            "run_id": each(run_id),
        },
        schema=QUARANTINE_SCHEMA,
    )


# Kwargs that do not change what an expectation computes.
_NEUTRAL_KWARGS = frozenset({"catch_exceptions", "result_format", "include_config", "meta", "notes"})
_ROW_CONDITION = re.compile(r"""^\s*([A-Za-z_][A-Za-z0-9_]*)\s*==\s*(?:"([^"\\]*)"|'([^'\\]*)')\s*$""")


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return "'" + str(value).replace("'", "''") + "'"


def _kind(kind: pa.DataType) -> str | None:
    """The kind of values a column holds, for the comparisons SQL can make as GX does."""
    if pa.types.is_boolean(kind):
        return "bool"
    if pa.types.is_integer(kind) or pa.types.is_floating(kind):
        return "number"
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return "string"
    return None


def _value_kind(value: object) -> str | None:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    return "string" if isinstance(value, str) else None


@dataclass(frozen=True)
class _SqlExpectation:
    config: dict[str, Any]
    unexpected: str | None  # SQL: the row breaks it (None: a table expectation)
    counted: str  # SQL: the row counts towards the element count (its row condition)
    nonnull: str | None  # SQL: the row counts towards the non-null count (map expectations)


class SqlSuite:
    """A suite evaluated in SQL, or None from ``of`` when it holds an expectation SQL does not
    evaluate as Great Expectations does (then GX validates it)."""

    def __init__(self, expectations: list[_SqlExpectation], columns: list[str]) -> None:
        self.expectations = expectations
        self.columns = columns

    @classmethod
    def of(cls, document: dict[str, Any], schema: pa.Schema) -> SqlSuite | None:
        parsed = []
        for config in document.get("expectations", []):
            one = cls._expectation(config, schema)
            if one is None:
                return None
            parsed.append(one)
        return cls(parsed, schema.names)

    @staticmethod
    def _expectation(config: dict[str, Any], schema: pa.Schema) -> _SqlExpectation | None:
        kind = str(config.get("type"))
        kwargs = dict(config.get("kwargs") or {})
        counted = "true"
        if "row_condition" in kwargs:
            if kwargs.pop("condition_parser", None) != "pandas":
                return None
            match = _ROW_CONDITION.match(str(kwargs.pop("row_condition")))
            if match is None or match.group(1) not in schema.names:
                return None
            if _kind(schema.field(match.group(1)).type) != "string":
                return None
            value = match.group(2) if match.group(2) is not None else match.group(3)
            counted = f"({_quoted(match.group(1))} = {_literal(value)})"
        mostly = kwargs.pop("mostly", 1.0)
        if not isinstance(mostly, int | float) or isinstance(mostly, bool) or not 0 <= mostly <= 1:
            return None
        kwargs = {k: v for k, v in kwargs.items() if k not in _NEUTRAL_KWARGS}
        if kind == "expect_table_columns_to_match_set":
            if set(kwargs) - {"column_set", "exact_match"} or not isinstance(kwargs.get("column_set"), list):
                return None
            return _SqlExpectation(config, None, counted, None)
        if kind == "expect_compound_columns_to_be_unique":
            names = kwargs.pop("column_list", None)
            if (
                kwargs
                or not isinstance(names, list)
                or not names
                or any(n not in schema.names for n in names)
            ):
                return None
            quoted = ", ".join(_quoted(n) for n in names)
            some = " OR ".join(f"{_quoted(n)} IS NOT NULL" for n in names)
            return _SqlExpectation(
                config,
                f"count(*) OVER (PARTITION BY {quoted}, ({counted})) > 1",
                counted,
                f"({some})",
            )
        column = kwargs.pop("column", None)
        if not isinstance(column, str) or column not in schema.names:
            return None  # GX reports a missing column as not evaluated
        col = _quoted(column)
        values_kind = _kind(schema.field(column).type)
        # Great Expectations sees the table through pandas, where a float NaN is a missing value.
        missing = (
            f"({col} IS NULL OR isnan({col}))"
            if pa.types.is_floating(schema.field(column).type)
            else f"{col} IS NULL"
        )
        nonnull = f"NOT {missing}"
        if kind == "expect_column_values_to_not_be_null" and not kwargs:
            return _SqlExpectation(config, missing, counted, None)
        if kind == "expect_column_values_to_be_unique" and not kwargs and values_kind is not None:
            return _SqlExpectation(
                config, f"count({col}) OVER (PARTITION BY {col}, ({counted})) > 1", counted, nonnull
            )
        if kind in ("expect_column_values_to_be_in_set", "expect_column_values_to_not_be_in_set"):
            values = kwargs.pop("value_set", None)
            if kwargs or not isinstance(values, list) or not values or values_kind is None:
                return None
            if any(_value_kind(v) != values_kind for v in values):
                return None
            listed = ", ".join(_literal(v) for v in values)
            test = "IN" if kind == "expect_column_values_to_not_be_in_set" else "NOT IN"
            return _SqlExpectation(config, f"{col} {test} ({listed})", counted, nonnull)
        if kind == "expect_column_values_to_be_between" and values_kind == "number":
            low, high = kwargs.pop("min_value", None), kwargs.pop("max_value", None)
            strict_low, strict_high = kwargs.pop("strict_min", False), kwargs.pop("strict_max", False)
            bounds = [b for b in (low, high) if b is not None]
            if kwargs or not bounds or any(_value_kind(b) != "number" for b in bounds):
                return None
            inside = []
            if low is not None:
                inside.append(f"{col} {'>' if strict_low else '>='} {_literal(low)}")
            if high is not None:
                inside.append(f"{col} {'<' if strict_high else '<='} {_literal(high)}")
            return _SqlExpectation(config, f"NOT ({' AND '.join(inside)})", counted, nonnull)
        return None

    def evaluate(
        self, data: pa.Table, name: str
    ) -> tuple[list[ExpectationOutcome], dict[int, list[str]], list[ExpectationOutcome]]:
        """Every expectation's outcome; the positions of the rows that break an error-severity
        row expectation that failed, with the rules they break; the failed error-severity table
        expectations."""
        connection = connect()
        try:
            # Each row's position travels with it (windows return rows in any order), under a
            # name none of the table's columns has.
            numbered = "_position"
            while numbered in data.column_names:
                numbered = "_" + numbered
            positions = pa.array(np.arange(data.num_rows, dtype=np.int64))
            connection.register("rows", data.append_column(numbered, positions))
            row_level = [e for e in self.expectations if e.unexpected is not None]
            flags = ", ".join(
                f"coalesce(({e.counted}) AND {'(' + e.nonnull + ') AND ' if e.nonnull else ''}({e.unexpected}), false) AS f{n}"
                for n, e in enumerate(row_level)
            )
            counts = ", ".join(
                f"count(*) FILTER (WHERE {e.counted}) AS e{n}, "
                + (f"count(*) FILTER (WHERE ({e.counted}) AND {e.nonnull})" if e.nonnull else "NULL")
                + f" AS m{n}"
                for n, e in enumerate(row_level)
            )
            marked = (
                connection.sql(f"SELECT {_quoted(numbered)} AS _position, {flags} FROM rows").to_arrow_table()
                if row_level
                else pa.table({})
            )
            totals: tuple[Any, ...] = (
                (connection.sql(f"SELECT {counts} FROM rows").fetchone() or ()) if row_level else ()
            )
        finally:
            connection.close()
        outcomes: list[ExpectationOutcome] = []
        failed_rows: dict[int, list[str]] = {}
        table_failures: list[ExpectationOutcome] = []
        position = {id(e): n for n, e in enumerate(row_level)}
        for expectation in self.expectations:
            config = expectation.config
            meta = config.get("meta") or {}
            kwargs = config.get("kwargs") or {}
            severity = meta.get("severity", "error")
            column = kwargs.get("column")
            rule = rule_of(str(config["type"]), column, meta)
            if expectation.unexpected is None:  # the table's columns
                wanted, present = set(kwargs["column_set"]), set(self.columns)
                success = wanted == present if kwargs.get("exact_match", True) else wanted <= present
                outcome = ExpectationOutcome(
                    name, rule, str(config["type"]), None, severity, success, None, None, None
                )
                outcomes.append(outcome)
                if not success and severity == "error":
                    table_failures.append(outcome)
                continue
            n = position[id(expectation)]
            flagged = marked.column(f"f{n}")
            unexpected = pc.sum(flagged).as_py() or 0
            elements = int(totals[2 * n] or 0)
            nonnull = elements if expectation.nonnull is None else int(totals[2 * n + 1] or 0)
            mostly = float(kwargs.get("mostly", 1.0))
            success = nonnull == 0 or (nonnull - unexpected) / nonnull >= mostly
            outcomes.append(
                ExpectationOutcome(
                    name, rule, str(config["type"]), column, severity, success, elements, unexpected, None
                )
            )
            if not success and severity == "error":
                for row in marked.column("_position").filter(flagged).to_pylist():
                    failed_rows.setdefault(int(row), []).append(rule)
        return outcomes, failed_rows, table_failures


class QualityGate:
    """Validates tables against their suites; all suites are checked when the gate is made."""

    def __init__(self, expectations_dir: Path) -> None:
        self._suites = load_suite_files(expectations_dir)

    def require(self, layer: str, tables: list[str]) -> None:
        missing = [t for t in tables if (layer, t) not in self._suites]
        if missing:
            raise ExpectationSuiteError(
                f"No expectation suite for {layer} table(s) {', '.join(missing)}: add "
                f"expectations/{layer}/<table>.json (every table is gated)."
            )

    def numeric_columns(self, layer: str, table: str) -> frozenset[str]:
        return self._suites[(layer, table)].numeric_columns()

    def across_rows(self, layer: str, table: str) -> list[tuple[str, ...]] | None:
        """See ``SuiteFile.across_rows``: what a table checked in parts must be checked for whole."""
        return self._suites[(layer, table)].across_rows()

    def check_all_parse(self) -> int:
        """Build every suite in GX once (fails naming the file); returns the expectation count."""
        return sum(len(_build_suite(s).expectations) for s in self._suites.values())

    def fingerprint(self) -> str:
        """A hash of every suite's content and the Great Expectations version: the same
        fingerprint builds the same suites (``check_all_parse`` need not run again)."""
        digest = hashlib.sha256(version("great_expectations").encode())
        for key in sorted(self._suites):
            suite = self._suites[key]
            digest.update(json.dumps([key, suite.document], sort_keys=True, default=str).encode())
        return digest.hexdigest()[:32]

    def check(self, layer: str, table: str, data: pa.Table, source: str, run_id: str) -> GateResult:
        suite_file = self._suites[(layer, table)]
        name = f"{layer}.{table}"
        in_sql = SqlSuite.of(suite_file.document, data.schema)
        if in_sql is not None:
            return _gated(name, table, data, source, run_id, *in_sql.evaluate(data, name))
        return self._check_in_gx(suite_file, name, table, data, source, run_id)

    def _check_in_gx(
        self, suite_file: SuiteFile, name: str, table: str, data: pa.Table, source: str, run_id: str
    ) -> GateResult:
        context = _gx_context()
        suite = _build_suite(suite_file)
        wanted = suite_file.columns()
        checked = data if wanted is None else data.select([c for c in data.column_names if c in wanted])
        # GX names a failing row by its frame index: with a RangeIndex, its position in ``data``.
        # No row id column is added, so table rules see the table's own columns only.
        frame = checked.to_pandas().reset_index(drop=True)
        try:
            source_ds = context.data_sources.get(name)
        except (KeyError, ValueError):
            source_ds = context.data_sources.add_pandas(name)
            source_ds.add_dataframe_asset("rows").add_batch_definition_whole_dataframe("all")
        batch = (
            source_ds.get_asset("rows")
            .get_batch_definition("all")
            .get_batch(batch_parameters={"dataframe": frame})
        )
        result = batch.validate(
            suite,
            result_format={
                "result_format": "COMPLETE",
                "exclude_unexpected_values": True,
                "return_unexpected_index_query": False,
            },
        )
        outcomes: list[ExpectationOutcome] = []
        failed_rows: dict[int, list[str]] = {}
        table_failures: list[ExpectationOutcome] = []
        # Results come back in GX's own order (an expectation that could not be evaluated comes
        # first), so each one is read with the configuration GX returns alongside it.
        for item in result.results:
            expectation = item.expectation_config
            details = item.result or {}
            meta = expectation.meta or {}
            severity = meta.get("severity", "error")
            column = expectation.kwargs.get("column")
            rule = rule_of(expectation.type, column, meta)
            observed = details.get("observed_value")
            outcome = ExpectationOutcome(
                table=name,
                rule=rule,
                expectation=expectation.type,
                column=column,
                severity=severity,
                success=bool(item.success),
                element_count=details.get("element_count"),
                unexpected_count=details.get("unexpected_count"),
                observed=None if observed is None or isinstance(observed, dict | list) else str(observed),
                evaluated=bool(details),
            )
            outcomes.append(outcome)
            if item.success or severity != "error":
                continue
            if "unexpected_index_list" in details:
                for row in details["unexpected_index_list"]:
                    failed_rows.setdefault(int(row), []).append(rule)
            else:
                table_failures.append(outcome)
        return _gated(name, table, data, source, run_id, outcomes, failed_rows, table_failures)


def _gated(
    name: str,
    table: str,
    data: pa.Table,
    source: str,
    run_id: str,
    outcomes: list[ExpectationOutcome],
    failed_rows: dict[int, list[str]],
    table_failures: list[ExpectationOutcome],
) -> GateResult:
    """The gate's result from the outcomes: stop on a failed table-level error expectation,
    else quarantine the rows that broke a failed error-severity row expectation."""
    if table_failures:
        first = table_failures[0]
        what = (
            f"failed, observed {first.observed}, {first.unexpected_count} unexpected of {first.element_count}"
            if first.evaluated
            else "could not be evaluated (does the table have the column it names?)"
        )
        raise QualityGateError(
            f"Quality gate failed for table {name}: expectation {first.rule} ({first.expectation}) "
            f"{what}; {len(table_failures)} table-level error expectation(s) failed. Nothing was loaded."
        )
    failed = sorted(failed_rows)
    flags = np.zeros(data.num_rows, dtype=bool)
    flags[failed] = True
    mask = pa.array(flags)
    quarantined = quarantine_rows(
        data.filter(mask),
        table,
        source,
        ["; ".join(sorted(set(failed_rows[row]))) for row in failed],  # each rule once, in one order
        "error-severity row expectation failed",
        run_id,
    )
    return GateResult(name, data.filter(pc.invert(mask)), quarantined, tuple(outcomes), mask)
