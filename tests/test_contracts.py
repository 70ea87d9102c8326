"""Every analysts' table is declared once; writes are checked against the declaration, and the
warehouse page is made from it."""

from __future__ import annotations

import re
from pathlib import Path

import pyarrow as pa
import pytest
from typer.testing import CliRunner

from journey_cli import app
from patient_journey.contracts import ContractError, all_contracts, contract_of, render_markdown
from patient_journey.lake import Lake, gold, silver
from tests.conftest import settings_for

DOC = Path(__file__).resolve().parents[1] / "docs" / "warehouse.md"


def _valid(name: str) -> pa.Table:
    contract = contract_of("silver", name)
    assert contract is not None
    return contract.schema.empty_table()


def test_a_write_that_differs_from_the_declaration_is_refused_naming_the_columns(tmp_path: Path) -> None:
    lake = Lake(settings_for(tmp_path))
    good = _valid("readmission")
    assert lake.overwrite(silver("readmission"), good) == 0
    renamed = good.rename_columns(
        [
            "patient_key",
            "admitted_on",
            "discharged_on",
            "source_uri",
            "source_offset",
            "run_id",
            "patient_bucket",
        ]
    )
    with pytest.raises(ContractError, match=r"silver\.readmission.*missing input_key; undeclared source_uri"):
        lake.overwrite(silver("readmission"), renamed)
    retyped = good.set_column(1, "admitted_on", pa.array([], pa.string()))
    with pytest.raises(ContractError, match="admitted_on is string, declared date32"):
        lake.overwrite(silver("readmission"), retyped)
    with pytest.raises(ContractError, match="not declared"):
        lake.overwrite(gold("surgical_episode_copy"), good)
    assert lake.version(silver("readmission")) == 0  # nothing more was written


def test_the_warehouse_page_lists_the_declared_tables_as_they_are() -> None:
    text = DOC.read_text(encoding="utf-8")
    generated = re.search(r"<!-- tables:begin[^>]*-->\n(.*)<!-- tables:end -->", text, re.S)
    assert generated is not None
    assert generated.group(1) == render_markdown(), "run `journey tables --markdown` into docs/warehouse.md"


def test_journey_tables_prints_every_declared_table() -> None:
    result = CliRunner().invoke(app, ["tables"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for contract in all_contracts():
        assert contract.label in result.output
    assert CliRunner().invoke(app, ["tables", "--markdown"]).output == render_markdown()


def test_declarations_are_sound() -> None:
    labels = [c.label for c in all_contracts()]
    assert len(labels) == len(set(labels))
    for contract in all_contracts():
        names = [c.name for c in contract.columns]
        assert len(names) == len(set(names)), contract.label
        assert set(contract.key) <= set(names), contract.label
        assert all(c.description for c in contract.columns), contract.label
