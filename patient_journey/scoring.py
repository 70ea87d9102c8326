"""Patient-reported outcome measures (PROMs) scored from data: one file per instrument.

Each instrument (KOOS JR, HOOS JR, Oxford Knee Score, PROMIS-10, ...) is a JSON file in
``catalog/instruments/<id>.json`` that states its items (response range, recoding, reverse
scoring), its scores (sum, or sum then a published lookup table), the missing-item rule, the
direction of each score and its minimal clinically important difference (MCID) with a citation.
``catalog/instruments/README.md`` describes the format. Adding an instrument is adding a file.

Responses come in wide form, one row per completed questionnaire: ``response_id``,
``instrument`` (an instrument id) and one column per item, named by item id (int, or text that
reads as an integer; null = not answered). :func:`responses_from_long` turns long data
(``response_id, instrument, item_id, value``) into that shape. :func:`score_responses` returns
one row per (response, score) with a status, all in one DuckDB query over Arrow:

- ``scored``: ``raw_score`` (sum of the answered items after recoding) and ``score``;
- ``out_of_range`` (rule ``item_in_range``): an answered item is not a valid response code; the
  caller quarantines the response;
- ``incomplete`` (rule ``items_complete``): more items missing than the instrument allows;
- ``unknown_instrument`` (rule ``instrument_known``): no definition for the row's instrument.

Statuses and rules name the check, never a value a patient gave.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from patient_journey.engine import connect
from patient_journey.errors import ConfigurationError, SourceError
from patient_journey.settings import shipped

DEFAULT_CATALOG_DIR = shipped("catalog", "instruments")
FORMAT_HELP = "The format is described in catalog/instruments/README.md."

# Ids become column names and SQL literals, so they are kept to a safe alphabet.
ID_PATTERN = r"^[a-z][a-z0-9_]*$"
RESERVED_COLUMNS = frozenset({"response_id", "instrument"})
ROW_COLUMN = "_scoring_row"  # input row number, kept so duplicate response ids stay apart

SCORED = "scored"
INCOMPLETE = "incomplete"
OUT_OF_RANGE = "out_of_range"
UNKNOWN_INSTRUMENT = "unknown_instrument"
RULE_ITEM_IN_RANGE = "item_in_range"
RULE_ITEMS_COMPLETE = "items_complete"
RULE_INSTRUMENT_KNOWN = "instrument_known"

SCORES_SCHEMA = pa.schema(
    [
        ("response_id", pa.string()),
        ("instrument", pa.string()),
        ("score_name", pa.string()),
        ("raw_score", pa.float64()),
        ("score", pa.float64()),
        ("items_answered", pa.int64()),
        ("status", pa.string()),
        ("rule", pa.string()),
    ]
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Item(_Strict):
    """One question: its valid response codes and how a response becomes an item score."""

    id: str = Field(pattern=ID_PATTERN)
    label: str = Field(min_length=1)
    range: tuple[int, int] = Field(description="Lowest and highest valid response code.")
    reverse: bool = Field(default=False, description="Score = low + high - response.")
    recode: dict[int, int] | None = Field(default=None, description="Response code -> item score.")
    notes: str | None = None

    @model_validator(mode="after")
    def _check(self) -> Item:
        low, high = self.range
        if low > high:
            raise ValueError(f"item {self.id}: range [{low}, {high}] runs backwards")
        if self.recode is not None:
            if self.reverse:
                raise ValueError(f"item {self.id}: use either recode or reverse, not both")
            expected = set(range(low, high + 1))
            if set(self.recode) != expected:
                raise ValueError(
                    f"item {self.id}: recode must map every response code {low}..{high} exactly once"
                )
        return self

    def scored_values(self) -> set[int]:
        """Every item score a valid response can produce."""
        low, high = self.range
        if self.recode is not None:
            return set(self.recode.values())
        return set(range(low, high + 1))


class MissingRule(_Strict):
    max_missing: int = Field(ge=0, description="Items that may be unanswered for a score.")
    impute: Literal["none", "person_mean"] = "none"
    source: str = Field(min_length=1)


class Mcid(_Strict):
    value: float | None = Field(ge=0, description="Minimal clinically important change; null if unknown.")
    source: str = Field(min_length=1)


class Score(_Strict):
    """One score an instrument produces from some of its items."""

    name: str = Field(pattern=ID_PATTERN)
    label: str = Field(min_length=1)
    items: list[str] = Field(min_length=1)
    rule: Literal["sum", "sum_lookup"]
    missing: MissingRule
    lookup: dict[int, float] | None = None
    lookup_source: str | None = None
    range: tuple[float, float]
    higher_is_better: bool
    mcid: Mcid
    notes: str | None = None


class Instrument(_Strict):
    """A whole instrument definition, as read from one catalog file."""

    format_version: Literal[1]
    id: str = Field(pattern=ID_PATTERN)
    name: str = Field(min_length=1)
    version: str = Field(min_length=1)
    description: str | None = None
    source: str = Field(min_length=1)
    items: list[Item] = Field(min_length=1)
    scores: list[Score] = Field(min_length=1)

    @model_validator(mode="after")
    def _check(self) -> Instrument:
        items = {item.id: item for item in self.items}
        if len(items) != len(self.items):
            raise ValueError("item ids must be unique")
        if reserved := RESERVED_COLUMNS & set(items):
            raise ValueError(f"item ids {sorted(reserved)} are reserved column names")
        if len({score.name for score in self.scores}) != len(self.scores):
            raise ValueError("score names must be unique")
        for score in self.scores:
            _check_score(score, items)
        return self

    @property
    def primary_score(self) -> Score:
        """The score the warehouse reports for the instrument: the first in its file."""
        return self.scores[0]

    def score(self, name: str) -> Score:
        for score in self.scores:
            if score.name == name:
                return score
        known = ", ".join(s.name for s in self.scores)
        raise ConfigurationError(f"Instrument {self.id!r} has no score {name!r}; its scores are: {known}.")


def _check_score(score: Score, items: dict[str, Item]) -> None:
    where = f"score {score.name}"
    unknown = [item_id for item_id in score.items if item_id not in items]
    if unknown:
        raise ValueError(f"{where}: items {unknown} are not defined in 'items'")
    if len(set(score.items)) != len(score.items):
        raise ValueError(f"{where}: an item is listed twice")
    if score.missing.max_missing >= len(score.items):
        raise ValueError(f"{where}: max_missing must be smaller than the number of items")
    members = [items[item_id] for item_id in score.items]
    low, high = score.range
    if low > high:
        raise ValueError(f"{where}: range runs backwards")
    if score.rule == "sum":
        if score.lookup is not None:
            raise ValueError(f"{where}: rule 'sum' takes no lookup (use rule 'sum_lookup')")
        if score.missing.impute == "person_mean" and len({frozenset(i.scored_values()) for i in members}) > 1:
            raise ValueError(f"{where}: person_mean imputation needs items with the same scores")
        smallest = sum(min(i.scored_values()) for i in members)
        largest = sum(max(i.scored_values()) for i in members)
        if smallest < low or largest > high:
            raise ValueError(f"{where}: the sum runs {smallest}..{largest}, outside range [{low}, {high}]")
        return
    if score.lookup is None or not score.lookup_source:
        raise ValueError(f"{where}: rule 'sum_lookup' needs 'lookup' and 'lookup_source'")
    if score.missing.max_missing != 0 or score.missing.impute != "none":
        raise ValueError(f"{where}: a lookup table is defined for complete responses only (max_missing 0)")
    sums = {0}
    for item in members:
        sums = {total + value for total in sums for value in item.scored_values()}
    if absent := sorted(sums - set(score.lookup)):
        raise ValueError(f"{where}: lookup has no entry for raw scores {absent}")
    if extra := sorted(set(score.lookup) - sums):
        raise ValueError(f"{where}: lookup has entries for raw scores no response can reach: {extra}")
    outside = [raw for raw, value in score.lookup.items() if not low <= value <= high]
    if outside:
        raise ValueError(f"{where}: lookup values for raw scores {sorted(outside)} fall outside range")


def _describe(error: ValidationError) -> str:
    parts = []
    for detail in error.errors():
        message = str(detail["ctx"]["error"]) if detail["type"] == "value_error" else detail["msg"]
        location = ".".join(str(part) for part in detail["loc"])
        parts.append(f"{location}: {message}" if location else message)
    return "; ".join(parts)


def load_instrument(path: Path) -> Instrument:
    """Read and validate one definition file; any problem raises ConfigurationError naming it."""
    try:
        document: Any = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"Instrument definition {path} cannot be read: {exc}.") from exc
    except json.JSONDecodeError as exc:
        raise ConfigurationError(
            f"Instrument definition {path} is not valid JSON (line {exc.lineno}, column {exc.colno}: "
            f"{exc.msg}). {FORMAT_HELP}"
        ) from exc
    try:
        instrument = Instrument.model_validate(document)
    except ValidationError as exc:
        raise ConfigurationError(
            f"Instrument definition {path} is invalid: {_describe(exc)}. Fix the file or remove it. "
            f"{FORMAT_HELP}"
        ) from exc
    if instrument.id != path.stem:
        raise ConfigurationError(
            f"Instrument definition {path} has id {instrument.id!r}; the id must equal the file name "
            f"({path.stem!r}). Rename the file or change the id."
        )
    return instrument


@dataclass(frozen=True)
class Catalog:
    """The instruments known to the scoring engine, by id."""

    instruments: dict[str, Instrument]
    directory: Path | None = None

    def instrument(self, instrument_id: str) -> Instrument:
        try:
            return self.instruments[instrument_id]
        except KeyError:
            known = ", ".join(sorted(self.instruments)) or "(none)"
            raise ConfigurationError(
                f"No instrument {instrument_id!r} in the catalog {self.directory}; known: {known}. "
                f"Add catalog/instruments/{instrument_id}.json to define it."
            ) from None

    def score(self, instrument_id: str, score_name: str) -> Score:
        return self.instrument(instrument_id).score(score_name)


def load_catalog(directory: Path | None = None) -> Catalog:
    """Every ``*.json`` definition in ``directory`` (default: the repository's catalog)."""
    folder = directory or DEFAULT_CATALOG_DIR
    if not folder.is_dir():
        raise ConfigurationError(f"Instrument catalog folder {folder} does not exist. {FORMAT_HELP}")
    instruments: dict[str, Instrument] = {}
    for path in sorted(folder.glob("*.json")):
        instrument = load_instrument(path)
        instruments[instrument.id] = instrument
    return Catalog(instruments=instruments, directory=folder)


def mcid(instrument: str, score_name: str, catalog: Catalog | None = None) -> float | None:
    """The score's minimal clinically important difference, or None where none is set."""
    return (catalog or load_catalog()).score(instrument, score_name).mcid.value


def higher_is_better(instrument: str, score_name: str, catalog: Catalog | None = None) -> bool:
    """Whether a higher value of the score means better health."""
    return (catalog or load_catalog()).score(instrument, score_name).higher_is_better


def change_reaches_mcid(
    instrument: str,
    score_name: str,
    baseline: Any,
    follow_up: Any,
    catalog: Catalog | None = None,
) -> pa.Array | pa.ChunkedArray:
    """Element-wise: did the score improve from baseline to follow-up by at least the MCID?

    ``baseline`` and ``follow_up`` are Arrow arrays (or anything ``pa.array`` accepts) of equal
    length. Improvement follows the score's direction; a worsening is False. The result is null
    where either value is null or the instrument defines no MCID for the score.
    """
    score = (catalog or load_catalog()).score(instrument, score_name)
    before = pc.cast(_as_arrow(baseline), pa.float64())
    after = pc.cast(_as_arrow(follow_up), pa.float64())
    if len(before) != len(after):
        raise ValueError(f"baseline has {len(before)} values and follow_up {len(after)}; pair them first")
    if score.mcid.value is None:
        return pa.nulls(len(before), pa.bool_())
    change = pc.subtract(after, before) if score.higher_is_better else pc.subtract(before, after)
    # A tolerance, so that 64.0 - 50.0 reaches an MCID of 14 despite binary floating point.
    return pc.greater_equal(change, pa.scalar(score.mcid.value - 1e-9))


def _as_arrow(values: Any) -> pa.Array | pa.ChunkedArray:
    if isinstance(values, pa.Array | pa.ChunkedArray):
        return values
    return pa.array(values)


def responses_from_long(long: pa.Table) -> pa.Table:
    """Long rows (``response_id, instrument, item_id, value``) -> the wide form, one row each."""
    missing = {"response_id", "instrument", "item_id", "value"} - set(long.column_names)
    if missing:
        raise SourceError(f"Long responses lack the columns {sorted(missing)}.")
    connection = connect()
    try:
        connection.register("long_responses", long)
        items = [row[0] for row in connection.sql("SELECT DISTINCT item_id FROM long_responses").fetchall()]
        if bad := sorted(str(i) for i in items if not isinstance(i, str) or i in RESERVED_COLUMNS):
            raise SourceError(f"Long responses have item ids that cannot be columns: {bad}.")
        if not items:
            return pa.table({"response_id": long["response_id"], "instrument": long["instrument"]})
        return connection.sql(
            "PIVOT long_responses ON item_id USING first(value) GROUP BY response_id, instrument"
        ).to_arrow_table()
    finally:
        connection.close()


DEFINITION_SCHEMAS = {
    "item_def": pa.schema(
        [
            ("instrument", pa.string()),
            ("score_name", pa.string()),
            ("item_id", pa.string()),
            ("lo", pa.int64()),
            ("hi", pa.int64()),
            ("reverse", pa.bool_()),
            ("has_recode", pa.bool_()),
        ]
    ),
    "recode_def": pa.schema(
        [
            ("instrument", pa.string()),
            ("item_id", pa.string()),
            ("response", pa.int64()),
            ("scored", pa.float64()),
        ]
    ),
    "score_def": pa.schema(
        [
            ("instrument", pa.string()),
            ("score_name", pa.string()),
            ("score_order", pa.int64()),
            ("max_missing", pa.int64()),
            ("impute", pa.string()),
            ("use_lookup", pa.bool_()),
        ]
    ),
    "lookup_def": pa.schema(
        [
            ("instrument", pa.string()),
            ("score_name", pa.string()),
            ("raw", pa.int64()),
            ("value", pa.float64()),
        ]
    ),
}


def _definition_tables(catalog: Catalog) -> dict[str, pa.Table]:
    """The catalog as four small relational tables the scoring query joins against."""
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in DEFINITION_SCHEMAS}
    for instrument in catalog.instruments.values():
        by_id = {item.id: item for item in instrument.items}
        for item in instrument.items:
            for response, scored in (item.recode or {}).items():
                rows["recode_def"].append(
                    {"instrument": instrument.id, "item_id": item.id, "response": response, "scored": scored}
                )
        for order, score in enumerate(instrument.scores):
            rows["score_def"].append(
                {
                    "instrument": instrument.id,
                    "score_name": score.name,
                    "score_order": order,
                    "max_missing": score.missing.max_missing,
                    "impute": score.missing.impute,
                    "use_lookup": score.rule == "sum_lookup",
                }
            )
            for item_id in score.items:
                item = by_id[item_id]
                rows["item_def"].append(
                    {
                        "instrument": instrument.id,
                        "score_name": score.name,
                        "item_id": item.id,
                        "lo": item.range[0],
                        "hi": item.range[1],
                        "reverse": item.reverse,
                        "has_recode": item.recode is not None,
                    }
                )
            for raw, value in (score.lookup or {}).items():
                rows["lookup_def"].append(
                    {"instrument": instrument.id, "score_name": score.name, "raw": raw, "value": value}
                )
    return {
        name: pa.Table.from_pylist(rows[name], schema=schema) for name, schema in DEFINITION_SCHEMAS.items()
    }


def _observed_sql(catalog: Catalog, columns: Iterable[str]) -> str:
    """Long (row, item, value) over the item columns present, each read only for its instrument."""
    present = set(columns)
    selects = [
        f"SELECT _scoring_row, '{item.id}' AS item_id, TRY_CAST(\"{item.id}\" AS DOUBLE) AS value, "
        f'"{item.id}" IS NOT NULL AS present, {item.range[0]} AS lo, {item.range[1]} AS hi '
        f"FROM responses WHERE instrument = '{instrument.id}'"
        for instrument in catalog.instruments.values()
        for item in instrument.items
        if item.id in present
    ]
    empty = (
        "SELECT NULL::BIGINT AS _scoring_row, NULL::VARCHAR AS item_id, NULL::DOUBLE AS value, "
        "false AS present, NULL::INTEGER AS lo, NULL::INTEGER AS hi WHERE false"
    )
    return "\nUNION ALL\n".join(selects or [empty])


SCORE_SQL = """
WITH base AS (
    SELECT _scoring_row, CAST(response_id AS VARCHAR) AS response_id, CAST(instrument AS VARCHAR) AS instrument
    FROM responses
),
observed AS ({observed}),
checked AS (
    SELECT b._scoring_row, b.response_id, b.instrument, d.score_name, d.lo, d.hi, d.reverse, d.has_recode,
           o.value, coalesce(o.present, false) AS present,
           coalesce(o.present, false) AND NOT coalesce(
               o.value = floor(o.value) AND o.value BETWEEN d.lo AND d.hi, false) AS invalid,
           r.scored AS recoded
    FROM base b
    JOIN item_def d ON d.instrument = b.instrument
    LEFT JOIN observed o ON o._scoring_row = b._scoring_row AND o.item_id = d.item_id
    LEFT JOIN recode_def r ON r.instrument = d.instrument AND r.item_id = d.item_id AND r.response = o.value
),
per_score AS (
    SELECT _scoring_row, response_id, instrument, score_name,
           count(*) AS n_items,
           count(*) FILTER (WHERE present) AS answered,
           count(*) FILTER (WHERE invalid) AS n_invalid,
           sum(CASE WHEN present AND NOT invalid THEN
                   CASE WHEN has_recode THEN recoded WHEN reverse THEN lo + hi - value ELSE value END
               END) AS answered_sum
    FROM checked
    GROUP BY _scoring_row, response_id, instrument, score_name
),
-- an item in no score (PROMIS-10's Global01 and Global09r) must be a valid response code too:
-- one that is not makes every score of its response out of range
invalid_anywhere AS (
    SELECT o._scoring_row, count(*) AS n_bad FROM observed o JOIN base b USING (_scoring_row)
    WHERE o.present AND NOT coalesce(o.value = floor(o.value) AND o.value BETWEEN o.lo AND o.hi, false)
      AND NOT EXISTS (SELECT 1 FROM item_def d WHERE d.instrument = b.instrument AND d.item_id = o.item_id)
    GROUP BY o._scoring_row
),
judged AS (
    SELECT p.*, s.score_order, s.impute, s.use_lookup,
           CASE WHEN p.n_invalid > 0 OR coalesce(ia.n_bad, 0) > 0 THEN 'out_of_range'
                WHEN p.n_items - p.answered > s.max_missing THEN 'incomplete'
                ELSE 'scored' END AS status
    FROM per_score p
    JOIN score_def s ON s.instrument = p.instrument AND s.score_name = p.score_name
    LEFT JOIN invalid_anywhere ia ON ia._scoring_row = p._scoring_row
)
SELECT j._scoring_row, j.score_order, j.response_id, j.instrument, j.score_name,
       CASE WHEN j.status = 'scored' THEN j.answered_sum END AS raw_score,
       CASE WHEN j.status <> 'scored' THEN NULL
            WHEN j.use_lookup THEN l.value
            WHEN j.impute = 'person_mean' THEN j.answered_sum * j.n_items / j.answered
            ELSE j.answered_sum END AS score,
       j.answered AS items_answered,
       j.status,
       CASE j.status WHEN 'out_of_range' THEN 'item_in_range'
                     WHEN 'incomplete' THEN 'items_complete' END AS rule
FROM judged j
LEFT JOIN lookup_def l ON l.instrument = j.instrument AND l.score_name = j.score_name
                      AND j.use_lookup AND l.raw = j.answered_sum
UNION ALL
SELECT b._scoring_row, 0, b.response_id, b.instrument, NULL, NULL, NULL, NULL, 'unknown_instrument', 'instrument_known'
FROM base b
WHERE b.instrument IS NULL OR b.instrument NOT IN (SELECT instrument FROM score_def)
ORDER BY 1, 2
"""


def score_responses(responses: pa.Table, catalog: Catalog | None = None) -> pa.Table:
    """Score wide responses: one output row per (response, score), see the module docstring.

    Output columns: response_id, instrument, score_name, raw_score, score, items_answered,
    status, rule (``SCORES_SCHEMA``), in input row order and then definition order of scores.
    """
    missing = RESERVED_COLUMNS - set(responses.column_names)
    if missing:
        raise SourceError(
            f"Responses lack the columns {sorted(missing)}; expected response_id, instrument and one "
            "column per item id (wide form; see responses_from_long for long data)."
        )
    if ROW_COLUMN in responses.column_names:
        raise SourceError(f"Responses have a column named {ROW_COLUMN!r}, which the scoring engine reserves.")
    catalog = catalog or load_catalog()
    numbered = responses.append_column(ROW_COLUMN, pa.array(range(responses.num_rows), type=pa.int64()))
    connection = connect()
    try:
        connection.register("responses", numbered)
        for name, table in _definition_tables(catalog).items():
            connection.register(name, table)
        sql = SCORE_SQL.format(observed=_observed_sql(catalog, responses.column_names))
        result = connection.sql(sql).to_arrow_table()
    finally:
        connection.close()
    return result.drop_columns([ROW_COLUMN, "score_order"]).cast(SCORES_SCHEMA)
