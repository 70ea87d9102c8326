"""Suites evaluated in SQL give Great Expectations' own results: the same outcome for every
expectation (success, element and unexpected counts) and the same rows quarantined, on tables of
every column kind with nulls, NaN and values outside the sets and bounds; GX is the oracle."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from patient_journey.errors import QualityGateError
from patient_journey.quality import QualityGate, SqlSuite

CODES = ["a", "b", "c", "8867-4"]
TYPES = {"code": pa.string(), "count": pa.int64(), "value": pa.float64(), "flag": pa.bool_()}
VALUES = {
    "code": st.sampled_from(CODES),
    "count": st.integers(-3, 12),
    "value": st.one_of(st.floats(-5, 150, allow_nan=False), st.just(math.nan)),
    "flag": st.booleans(),
}


@st.composite
def tables(draw: st.DrawFn) -> pa.Table:
    rows = draw(st.integers(0, 30))
    columns = {
        name: pa.array(
            draw(st.lists(st.one_of(st.none(), VALUES[name]), min_size=rows, max_size=rows)), TYPES[name]
        )
        for name in TYPES
    }
    return pa.table(columns)


@st.composite
def expectations(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(
        st.sampled_from(
            [
                "expect_column_values_to_not_be_null",
                "expect_column_values_to_be_in_set",
                "expect_column_values_to_not_be_in_set",
                "expect_column_values_to_be_between",
                "expect_column_values_to_be_unique",
                "expect_compound_columns_to_be_unique",
                "expect_table_columns_to_match_set",
            ]
        )
    )
    kwargs: dict[str, Any] = {}
    if kind == "expect_table_columns_to_match_set":
        kwargs["column_set"] = draw(st.lists(st.sampled_from([*TYPES, "other"]), unique=True))
        kwargs["exact_match"] = draw(st.booleans())
    elif kind == "expect_compound_columns_to_be_unique":
        kwargs["column_list"] = draw(
            st.lists(st.sampled_from(["code", "count", "flag"]), min_size=2, unique=True)
        )
    else:
        column = draw(st.sampled_from(["count", "value"] if kind.endswith("between") else list(TYPES)))
        kwargs["column"] = column
        if kind.endswith("in_set"):
            kwargs["value_set"] = draw(
                st.lists(VALUES[column].filter(lambda v: v == v), min_size=1, max_size=3)
            )
        if kind.endswith("between"):
            kwargs["min_value"] = draw(st.one_of(st.none(), st.integers(-2, 5)))
            kwargs["max_value"] = draw(
                st.one_of(
                    st.integers(6, 120) if kwargs["min_value"] is None else st.none(), st.integers(6, 120)
                )
            )
            kwargs["strict_min"] = draw(st.booleans())
            kwargs["strict_max"] = draw(st.booleans())
        if draw(st.booleans()):
            kwargs["mostly"] = draw(st.sampled_from([0.5, 0.8, 0.95]))
        if draw(st.booleans()):
            kwargs["row_condition"] = f'code=="{draw(st.sampled_from(CODES))}"'
            kwargs["condition_parser"] = "pandas"
    severity = draw(st.sampled_from(["error", "error", "warn"]))
    return {
        "type": kind,
        "kwargs": kwargs,
        "meta": {"severity": severity, "rule": f"rule_{draw(st.integers(0, 99))}"},
    }


def gate_for(tmp: Path, suite: list[dict[str, Any]]) -> QualityGate:
    (tmp / "staged").mkdir(parents=True, exist_ok=True)
    (tmp / "staged" / "t.json").write_text(json.dumps({"name": "staged.t", "expectations": suite}))
    return QualityGate(tmp)


def outcome_or_error(run: Any) -> Any:
    try:
        result = run()
    except QualityGateError as error:
        return ("stopped", str(error))
    return (
        [(o.rule, o.success, o.element_count, o.unexpected_count) for o in result.outcomes],
        repr(result.passed.to_pylist()),  # repr: NaN equals itself
        result.quarantined.select(["rule", "record_id"]).to_pylist(),
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(table=tables(), suite=st.lists(expectations(), min_size=1, max_size=4))
def test_a_suite_in_sql_gives_great_expectations_results(
    table: pa.Table, suite: list[dict[str, Any]], tmp_path: Path
) -> None:
    gate = gate_for(tmp_path, suite)
    assert SqlSuite.of({"expectations": suite}, table.schema) is not None  # every kind drawn is in SQL
    suite_file = gate._suites[("staged", "t")]
    in_sql = outcome_or_error(lambda: gate.check("staged", "t", table, "test", "run-1"))
    in_gx = outcome_or_error(lambda: gate._check_in_gx(suite_file, "staged.t", "t", table, "test", "run-1"))
    if in_gx[0] == "stopped":
        assert in_sql[0] == "stopped"
        return
    # GX lists outcomes in its own order (not-evaluated first): compare them as sets
    assert sorted(in_sql[0], key=repr) == sorted(in_gx[0], key=repr)
    assert in_sql[1:] == in_gx[1:]


def test_a_table_with_a_column_named_like_the_gates_own_is_checked_all_the_same(tmp_path: Path) -> None:
    table = pa.table({"_position": pa.array([5, None, 7]), "code": pa.array(["a", "b", "a"])})
    suite = [
        {
            "type": "expect_column_values_to_not_be_null",
            "kwargs": {"column": "_position"},
            "meta": {"severity": "error", "rule": "present"},
        },
        {
            "type": "expect_column_values_to_be_unique",
            "kwargs": {"column": "code"},
            "meta": {"severity": "error", "rule": "unique"},
        },
    ]
    result = gate_for(tmp_path, suite).check("staged", "t", table, "test", "run-1")
    assert result.passed.to_pylist() == []
    assert result.quarantined.column("rule").to_pylist() == ["unique", "present", "unique"]


@pytest.mark.parametrize(
    "expectation",
    [
        {"type": "expect_column_values_to_match_regex", "kwargs": {"column": "code", "regex": "^a"}},
        {"type": "expect_column_values_to_be_in_set", "kwargs": {"column": "code", "value_set": [1, 2]}},
        {"type": "expect_column_values_to_be_between", "kwargs": {"column": "code", "min_value": 1}},
        {"type": "expect_column_values_to_not_be_null", "kwargs": {"column": "missing"}},
        {
            "type": "expect_column_values_to_not_be_null",
            "kwargs": {"column": "code", "row_condition": "count > 3", "condition_parser": "pandas"},
        },
    ],
)
def test_an_expectation_sql_does_not_evaluate_as_gx_does_goes_to_gx(expectation: dict[str, Any]) -> None:
    schema = pa.schema(list(TYPES.items()))
    assert SqlSuite.of({"expectations": [expectation]}, schema) is None
