"""PROM scoring from catalog files, checked against the instruments' published scoring documents.

Reference values are typed in here from the scoring documents (not read from the catalog), so a
wrong number in a catalog file fails a test. Where a document was only available through a public
copy of its table, the test says so.
"""

from __future__ import annotations

import json
import random
import shutil
from itertools import pairwise
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from patient_journey.errors import ConfigurationError, SourceError
from patient_journey.scoring import (
    DEFAULT_CATALOG_DIR,
    SCORES_SCHEMA,
    Catalog,
    change_reaches_mcid,
    higher_is_better,
    load_catalog,
    mcid,
    responses_from_long,
    score_responses,
)

# KOOS, JR. scoring instructions (Hospital for Special Surgery): raw summed score 0..28 -> interval
# score, 0 = total knee disability, 100 = perfect knee health (raw 0 -> 100.000, raw 28 -> 0.000).
KOOS_JR_TABLE = [
    100.000, 91.975, 84.600, 79.914, 76.332, 73.342, 70.704, 68.284, 65.994, 63.776,
    61.583, 59.381, 57.140, 54.840, 52.465, 50.012, 47.487, 44.905, 42.281, 39.625,
    36.931, 34.174, 31.307, 28.251, 24.875, 20.941, 15.939, 8.291, 0.000,
]  # fmt: skip
# HOOS, JR. scoring instructions (Hospital for Special Surgery): raw summed score 0..24 -> interval
# score (raw 0 -> 100.000, raw 24 -> 0.000); as copied in the Stanford CHOIR registry's HSS table.
HOOS_JR_TABLE = [
    100.000, 92.340, 85.257, 80.550, 76.776, 73.472, 70.426, 67.516, 64.664, 61.815,
    58.930, 55.985, 52.965, 49.858, 46.652, 43.335, 39.902, 36.363, 32.735, 29.009,
    25.103, 20.805, 15.633, 8.104, 0.000,
]  # fmt: skip
# PROMIS Global Health scoring manual (HealthMeasures), raw score 4..20 -> T-score tables for Global
# Physical Health and Global Mental Health (Hays RD et al. Qual Life Res 2009;18:873-880).
GPH_TABLE = dict(zip(range(4, 21), [
    16.2, 19.9, 23.5, 26.7, 29.6, 32.4, 34.9, 37.4, 39.8, 42.3, 44.9, 47.7, 50.8, 54.1, 57.7, 61.9, 67.7,
], strict=True))  # fmt: skip
GMH_TABLE = dict(zip(range(4, 21), [
    21.2, 25.1, 28.4, 31.3, 33.8, 36.3, 38.8, 41.1, 43.5, 45.8, 48.3, 50.8, 53.3, 56.0, 59.0, 62.5, 67.6,
], strict=True))  # fmt: skip
# PROMIS Global Health scoring manual: Global07r pain 0-10 recoded to Global07rc 1-5.
GLOBAL07_RECODE = {0: 5, 1: 4, 2: 4, 3: 4, 4: 3, 5: 3, 6: 3, 7: 2, 8: 2, 9: 2, 10: 1}

KOOS_ITEMS = [f"koos_jr_{i}" for i in range(1, 8)]
HOOS_ITEMS = [f"hoos_jr_{i}" for i in range(1, 7)]
OKS_ITEMS = [f"oks_{i}" for i in range(1, 13)]
GPH_ITEMS = ["global03", "global06", "global07r", "global08r"]
GMH_ITEMS = ["global02", "global04", "global05", "global10r"]


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return load_catalog()


def wide(rows: list[dict[str, Any]]) -> pa.Table:
    """A wide response table from dicts; absent items become null columns."""
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    return pa.table({c: [row.get(c) for row in rows] for c in columns})


def spread(raw: int, items: list[str], high: int = 4) -> dict[str, int]:
    """Item responses (0..high each) that sum to ``raw``."""
    answers = {}
    for item in items:
        answers[item] = min(high, raw)
        raw -= answers[item]
    assert raw == 0
    return answers


def scores_by(table: pa.Table) -> dict[tuple[str, str | None], dict[str, Any]]:
    return {(row["response_id"], row["score_name"]): row for row in table.to_pylist()}


def test_the_shipped_catalog_defines_the_four_instruments_with_sources(catalog: Catalog) -> None:
    assert set(catalog.instruments) >= {"koos_jr", "hoos_jr", "oxford_knee_score", "promis_10"}
    for instrument in catalog.instruments.values():
        assert instrument.source
        for score in instrument.scores:
            assert score.mcid.source and score.missing.source
            assert score.rule == "sum" or score.lookup_source


def test_koos_jr_full_conversion_table_matches_the_hss_scoring_instructions(catalog: Catalog) -> None:
    # KOOS, JR. scoring instructions (HSS), raw summed score -> interval score, every row 0..28.
    rows = [
        {"response_id": f"r{raw}", "instrument": "koos_jr", **spread(raw, KOOS_ITEMS)} for raw in range(29)
    ]
    result = scores_by(score_responses(wide(rows), catalog))
    for raw, expected in enumerate(KOOS_JR_TABLE):
        row = result[(f"r{raw}", "interval")]
        assert (row["status"], row["raw_score"], row["items_answered"]) == ("scored", raw, 7)
        assert row["score"] == pytest.approx(expected, abs=5e-4)


def test_koos_jr_all_best_is_100_and_all_worst_is_0(catalog: Catalog) -> None:
    # KOOS, JR. scoring instructions (HSS): raw 0 -> 100.000 (perfect knee health), raw 28 -> 0.000.
    table = wide(
        [
            {"response_id": "best", "instrument": "koos_jr", **dict.fromkeys(KOOS_ITEMS, 0)},
            {"response_id": "worst", "instrument": "koos_jr", **dict.fromkeys(KOOS_ITEMS, 4)},
        ]
    )
    result = scores_by(score_responses(table, catalog))
    assert result[("best", "interval")]["score"] == 100.0
    assert result[("worst", "interval")]["score"] == 0.0


def test_hoos_jr_full_conversion_table_matches_the_hss_scoring_instructions(catalog: Catalog) -> None:
    # HOOS, JR. scoring instructions (HSS), raw summed score -> interval score, every row 0..24.
    rows = [
        {"response_id": f"r{raw}", "instrument": "hoos_jr", **spread(raw, HOOS_ITEMS)} for raw in range(25)
    ]
    result = scores_by(score_responses(wide(rows), catalog))
    for raw, expected in enumerate(HOOS_JR_TABLE):
        row = result[(f"r{raw}", "interval")]
        assert (row["status"], row["raw_score"]) == ("scored", raw)
        assert row["score"] == pytest.approx(expected, abs=5e-4)
    # Spot checks named in the brief: raw 0 -> 100.000 (perfect hip health), raw 24 -> 0.000.
    assert result[("r0", "interval")]["score"] == 100.0
    assert result[("r24", "interval")]["score"] == 0.0


def test_oxford_knee_score_sums_twelve_items_scored_0_to_4_with_48_best(catalog: Catalog) -> None:
    # Murray DW et al. 2007 J Bone Joint Surg Br 89:1010 (current scoring): each item 0-4, 4 = best;
    # total 0 (most severe symptoms) .. 48 (least symptoms).
    answers = dict(zip(OKS_ITEMS, [4, 3, 2, 1, 0, 4, 3, 2, 1, 0, 4, 3], strict=True))
    table = wide(
        [
            {"response_id": "best", "instrument": "oxford_knee_score", **dict.fromkeys(OKS_ITEMS, 4)},
            {"response_id": "worst", "instrument": "oxford_knee_score", **dict.fromkeys(OKS_ITEMS, 0)},
            {"response_id": "mixed", "instrument": "oxford_knee_score", **answers},
        ]
    )
    result = scores_by(score_responses(table, catalog))
    assert result[("best", "total")]["score"] == 48.0
    assert result[("worst", "total")]["score"] == 0.0
    assert result[("mixed", "total")]["score"] == 27.0
    assert result[("mixed", "total")]["raw_score"] == 27.0


def test_oxford_knee_score_imputes_up_to_two_missing_items_with_the_mean_of_the_others(
    catalog: Catalog,
) -> None:
    # Murray DW et al. 2007 (revised scoring guidelines, as restated in the OKS scoring guide): one or
    # two unanswered items take the mean of the answered ones; more than two -> no total.
    eleven = {**dict.fromkeys(OKS_ITEMS[:11], 3), OKS_ITEMS[11]: None}
    ten = {**dict.fromkeys(OKS_ITEMS[:5], 4), **dict.fromkeys(OKS_ITEMS[5:10], 2)}
    nine = dict.fromkeys(OKS_ITEMS[:9], 4)
    table = wide(
        [
            {"response_id": "eleven", "instrument": "oxford_knee_score", **eleven},
            {"response_id": "ten", "instrument": "oxford_knee_score", **ten},
            {"response_id": "nine", "instrument": "oxford_knee_score", **nine},
        ]
    )
    result = scores_by(score_responses(table, catalog))
    assert result[("eleven", "total")] == {
        "response_id": "eleven",
        "instrument": "oxford_knee_score",
        "score_name": "total",
        "raw_score": 33.0,
        "score": 36.0,
        "items_answered": 11,
        "status": "scored",
        "rule": None,
    }
    assert result[("ten", "total")]["score"] == pytest.approx(30 * 12 / 10)
    assert (result[("nine", "total")]["status"], result[("nine", "total")]["rule"]) == (
        "incomplete",
        "items_complete",
    )
    assert result[("nine", "total")]["score"] is None


def test_promis_10_tables_match_the_global_health_scoring_manual(catalog: Catalog) -> None:
    # PROMIS Global Health scoring manual: GPH and GMH raw 4..20 -> T-score tables. Item responses
    # 1..5 are spread so each summary's raw sum takes every value; Global07r pain is given on the
    # 0-10 scale as the value that recodes to the wanted 1..5.
    pain_for = {recoded: pain for pain, recoded in GLOBAL07_RECODE.items()}
    rows = []
    for raw in range(4, 21):
        gph = {item: 1 + extra for item, extra in spread(raw - 4, GPH_ITEMS).items()}
        gmh = {item: 1 + extra for item, extra in spread(raw - 4, GMH_ITEMS).items()}
        gph["global07r"] = pain_for[gph["global07r"]]
        rows.append({"response_id": f"r{raw}", "instrument": "promis_10", **gph, **gmh})
    result = scores_by(score_responses(wide(rows), catalog))
    for raw in range(4, 21):
        physical = result[(f"r{raw}", "global_physical_health")]
        mental = result[(f"r{raw}", "global_mental_health")]
        assert (physical["status"], physical["raw_score"]) == ("scored", raw)
        assert physical["score"] == pytest.approx(GPH_TABLE[raw])
        assert (mental["status"], mental["raw_score"]) == ("scored", raw)
        assert mental["score"] == pytest.approx(GMH_TABLE[raw])


def test_promis_10_all_best_and_all_worst_give_the_table_extremes(catalog: Catalog) -> None:
    # PROMIS Global Health scoring manual: GPH raw 20 -> 67.7, raw 4 -> 16.2; GMH 20 -> 67.6, 4 -> 21.2.
    best = {**dict.fromkeys(GPH_ITEMS + GMH_ITEMS + ["global01", "global09r"], 5), "global07r": 0}
    worst = {**dict.fromkeys(GPH_ITEMS + GMH_ITEMS + ["global01", "global09r"], 1), "global07r": 10}
    table = wide(
        [
            {"response_id": "best", "instrument": "promis_10", **best},
            {"response_id": "worst", "instrument": "promis_10", **worst},
        ]
    )
    result = scores_by(score_responses(table, catalog))
    assert result[("best", "global_physical_health")]["score"] == 67.7
    assert result[("best", "global_mental_health")]["score"] == 67.6
    assert result[("worst", "global_physical_health")]["score"] == 16.2
    assert result[("worst", "global_mental_health")]["score"] == 21.2


@pytest.mark.parametrize(("pain", "recoded"), sorted(GLOBAL07_RECODE.items()))
def test_promis_global07r_pain_rating_is_recoded_before_summing(
    catalog: Catalog, pain: int, recoded: int
) -> None:
    # PROMIS Global Health scoring manual: Global07rc = 5 (pain 0), 4 (1-3), 3 (4-6), 2 (7-9), 1 (10).
    row = {"response_id": "r", "instrument": "promis_10", "global03": 3, "global06": 3, "global08r": 3}
    result = scores_by(score_responses(wide([{**row, "global07r": pain}]), catalog))
    physical = result[("r", "global_physical_health")]
    assert physical["raw_score"] == 9 + recoded
    assert physical["score"] == GPH_TABLE[9 + recoded]


def test_promis_global08r_and_global10r_count_in_their_summaries_and_each_summary_needs_all_items(
    catalog: Catalog,
) -> None:
    # PROMIS scoring manual: GPH = Global03 + Global06 + Global07rc + Global08r; GMH = Global02 +
    # Global04 + Global05 + Global10r; the tables need all four items of a summary.
    full = {**dict.fromkeys(GPH_ITEMS + GMH_ITEMS, 3), "global07r": 5}
    no_fatigue = {**full, "global08r": None}
    no_emotional = {**full, "global10r": None}
    table = wide(
        [
            {"response_id": "full", "instrument": "promis_10", **full},
            {"response_id": "no_fatigue", "instrument": "promis_10", **no_fatigue},
            {"response_id": "no_emotional", "instrument": "promis_10", **no_emotional},
        ]
    )
    result = scores_by(score_responses(table, catalog))
    assert result[("full", "global_physical_health")]["raw_score"] == 12  # 3 + 3 + recode(5)=3 + 3
    assert result[("full", "global_mental_health")]["raw_score"] == 12
    assert result[("no_fatigue", "global_physical_health")]["status"] == "incomplete"
    assert result[("no_fatigue", "global_mental_health")]["status"] == "scored"
    assert result[("no_emotional", "global_mental_health")]["status"] == "incomplete"
    assert result[("no_emotional", "global_physical_health")]["status"] == "scored"


def test_every_shipped_score_is_higher_is_better_and_the_jr_tables_fall_as_raw_rises(
    catalog: Catalog,
) -> None:
    for instrument in catalog.instruments.values():
        for score in instrument.scores:
            assert higher_is_better(instrument.id, score.name, catalog) is True
    # KOOS/HOOS JR raw sums count problems, so the interval score must fall monotonically.
    for table in (KOOS_JR_TABLE, HOOS_JR_TABLE):
        assert all(a > b for a, b in pairwise(table))
    for instrument_id, score_name in (("koos_jr", "interval"), ("hoos_jr", "interval")):
        lookup = catalog.score(instrument_id, score_name).lookup or {}
        values = [lookup[raw] for raw in sorted(lookup)]
        assert all(a > b for a, b in pairwise(values))


def test_a_missing_koos_jr_item_leaves_the_response_incomplete(catalog: Catalog) -> None:
    # KOOS, JR.: the table converts complete raw sums only, so one missing item -> no score.
    row = {"response_id": "r", "instrument": "koos_jr", **dict.fromkeys(KOOS_ITEMS, 1), "koos_jr_4": None}
    result = scores_by(score_responses(wide([row]), catalog))[("r", "interval")]
    assert (result["status"], result["rule"], result["items_answered"]) == ("incomplete", "items_complete", 6)
    assert result["raw_score"] is None and result["score"] is None


def test_absent_item_columns_count_as_unanswered(catalog: Catalog) -> None:
    table = pa.table({"response_id": ["r"], "instrument": ["hoos_jr"], "hoos_jr_1": [2]})
    result = scores_by(score_responses(table, catalog))[("r", "interval")]
    assert (result["status"], result["items_answered"]) == ("incomplete", 1)


@pytest.mark.parametrize("bad", [5, -1, 99])
def test_an_item_outside_its_range_marks_the_response_out_of_range(catalog: Catalog, bad: int) -> None:
    row = {"response_id": "r", "instrument": "koos_jr", **dict.fromkeys(KOOS_ITEMS, 1), "koos_jr_2": bad}
    result = scores_by(score_responses(wide([row]), catalog))[("r", "interval")]
    assert (result["status"], result["rule"]) == ("out_of_range", "item_in_range")
    assert result["raw_score"] is None and result["score"] is None
    assert str(bad) not in f"{result['status']}{result['rule']}"


def test_non_integer_and_unreadable_codes_are_out_of_range_and_win_over_incomplete(catalog: Catalog) -> None:
    table = pa.table(
        {
            "response_id": ["half", "text", "numeric_text", "pain_11"],
            "instrument": ["oxford_knee_score"] * 3 + ["promis_10"],
            **{item: pa.array(["2"] * 4, pa.string()) for item in OKS_ITEMS[1:]},
            "oks_1": pa.array(["2.5", "two", "3", None], pa.string()),
            "global07r": pa.array([None, None, None, "11"], pa.string()),
            "global03": pa.array([None, None, None, "3"], pa.string()),
        }
    )
    result = scores_by(score_responses(table, catalog))
    assert result[("half", "total")]["status"] == "out_of_range"
    assert result[("text", "total")]["status"] == "out_of_range"
    assert result[("numeric_text", "total")]["status"] == "scored"
    assert result[("numeric_text", "total")]["score"] == 3 + 11 * 2
    # Global07r 11 is off its 0-10 scale, although Global06 and Global08r are also missing.
    assert result[("pain_11", "global_physical_health")]["rule"] == "item_in_range"
    assert result[("pain_11", "global_mental_health")]["rule"] == "items_complete"


def test_unknown_instruments_get_one_row_and_duplicate_ids_stay_apart(catalog: Catalog) -> None:
    rows = [
        {"response_id": "same", "instrument": "koos_jr", **dict.fromkeys(KOOS_ITEMS, 0)},
        {"response_id": "same", "instrument": "koos_jr", **dict.fromkeys(KOOS_ITEMS, 4)},
        {"response_id": "other", "instrument": "womac"},
        {"response_id": "none", "instrument": None},
    ]
    result = score_responses(wide(rows), catalog)
    assert result.schema == SCORES_SCHEMA
    assert result.column("score").to_pylist()[:2] == [100.0, 0.0]
    assert result.to_pylist()[2:] == [
        {
            "response_id": "other",
            "instrument": "womac",
            "score_name": None,
            "raw_score": None,
            "score": None,
            "items_answered": None,
            "status": "unknown_instrument",
            "rule": "instrument_known",
        },
        {
            "response_id": "none",
            "instrument": None,
            "score_name": None,
            "raw_score": None,
            "score": None,
            "items_answered": None,
            "status": "unknown_instrument",
            "rule": "instrument_known",
        },
    ]


def test_scoring_needs_the_response_id_and_instrument_columns(catalog: Catalog) -> None:
    with pytest.raises(SourceError, match="instrument"):
        score_responses(pa.table({"response_id": ["r"]}), catalog)


def test_long_responses_pivot_to_the_wide_form(catalog: Catalog) -> None:
    long = pa.table(
        {
            "response_id": ["a"] * 7 + ["b"] * 6,
            "instrument": ["koos_jr"] * 7 + ["hoos_jr"] * 6,
            "item_id": KOOS_ITEMS + HOOS_ITEMS,
            "value": [1] * 7 + [4] * 6,
        }
    )
    result = scores_by(score_responses(responses_from_long(long), catalog))
    assert result[("a", "interval")]["score"] == KOOS_JR_TABLE[7]
    assert result[("b", "interval")]["score"] == HOOS_JR_TABLE[24]


def test_mcid_lookups_and_their_sources(catalog: Catalog) -> None:
    # Lyman S et al. Clin Orthop Relat Res 2018;476:2432 (KOOS JR 14, HOOS JR 18); Beard DJ et al.
    # J Clin Epidemiol 2015;68:73 (OKS individual MIC 7). PROMIS-10: none chosen yet (null).
    assert mcid("koos_jr", "interval", catalog) == 14
    assert mcid("hoos_jr", "interval", catalog) == 18
    assert mcid("oxford_knee_score", "total", catalog) == 7
    assert mcid("promis_10", "global_physical_health", catalog) is None
    with pytest.raises(ConfigurationError, match="has no score 'total'"):
        mcid("koos_jr", "total", catalog)
    with pytest.raises(ConfigurationError, match="No instrument 'womac'"):
        mcid("womac", "total", catalog)


def test_change_reaches_mcid_is_vectorised_direction_aware_and_null_safe(
    catalog: Catalog, tmp_path: Path
) -> None:
    reached = change_reaches_mcid(
        "koos_jr", "interval", [50.0, 50.0, 80.0, None], [64.0, 63.9, 60.0, 70.0], catalog
    )
    assert reached.to_pylist() == [True, False, False, None]
    unknown = change_reaches_mcid(
        "promis_10", "global_mental_health", pa.array([40.0]), pa.array([60.0]), catalog
    )
    assert unknown.to_pylist() == [None]
    # A lower-is-better score improves when it falls.
    toy = load_catalog(write_toy_catalog(tmp_path))
    assert change_reaches_mcid("toy_pain", "pain", [10, 10, 10], [8, 9, 12], toy).to_pylist() == [
        True,
        False,
        False,
    ]
    with pytest.raises(ValueError, match="pair them"):
        change_reaches_mcid("koos_jr", "interval", [1.0, 2.0], [1.0], catalog)


TOY = {
    "format_version": 1,
    "id": "toy_pain",
    "name": "Toy pain scale",
    "version": "test",
    "source": "test fixture",
    "items": [
        {"id": "toy_1", "label": "pain now", "range": [1, 5]},
        {"id": "toy_2", "label": "pain-free days (reverse scored)", "range": [1, 5], "reverse": True},
        {"id": "toy_3", "label": "pain at night", "range": [1, 5]},
    ],
    "scores": [
        {
            "name": "pain",
            "label": "Toy pain",
            "items": ["toy_1", "toy_2", "toy_3"],
            "rule": "sum",
            "missing": {"max_missing": 1, "impute": "person_mean", "source": "test"},
            "range": [3, 15],
            "higher_is_better": False,
            "mcid": {"value": 2, "source": "test"},
        }
    ],
}


def write_toy_catalog(folder: Path, document: dict[str, Any] = TOY) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{document['id']}.json").write_text(json.dumps(document), encoding="utf-8")
    return folder


def test_a_new_instrument_file_is_scored_with_no_code_change(tmp_path: Path) -> None:
    folder = tmp_path / "instruments"
    folder.mkdir()
    for path in DEFAULT_CATALOG_DIR.glob("*.json"):
        shutil.copy(path, folder)
    write_toy_catalog(folder)
    catalog = load_catalog(folder)
    assert "toy_pain" in catalog.instruments and "koos_jr" in catalog.instruments
    table = wide(
        [
            {"response_id": "t1", "instrument": "toy_pain", "toy_1": 5, "toy_2": 1, "toy_3": 4},
            {"response_id": "t2", "instrument": "toy_pain", "toy_1": 2, "toy_2": None, "toy_3": 4},
            {"response_id": "k", "instrument": "koos_jr", **dict.fromkeys(KOOS_ITEMS, 2)},
        ]
    )
    result = scores_by(score_responses(table, catalog))
    assert result[("t1", "pain")]["score"] == 5 + (1 + 5 - 1) + 4  # toy_2 reversed: 1 -> 5
    assert result[("t2", "pain")]["score"] == pytest.approx((2 + 4) * 3 / 2)
    assert result[("k", "interval")]["score"] == KOOS_JR_TABLE[14]
    assert higher_is_better("toy_pain", "pain", catalog) is False


def broken(document_changes: dict[str, Any] | None = None, **score_changes: Any) -> dict[str, Any]:
    """The toy definition with some fields of the document or of its one score changed."""
    document = json.loads(json.dumps(TOY))
    document.update(document_changes or {})
    document["scores"][0].update(score_changes)
    return document


@pytest.mark.parametrize(
    ("document", "message"),
    [
        (broken(rule="sum_lookup", lookup={"3": 0.0}, lookup_source="x", range=[0, 100],
                missing={"max_missing": 0, "source": "x"}),
         "lookup has no entry for raw scores [4, 5, 6"),
        (broken(items=["toy_1", "toy_9"]), "items ['toy_9'] are not defined"),
        (broken(higer_is_better=True), "scores.0.higer_is_better: Extra inputs are not permitted"),
        (broken(range=[3, 10]), "the sum runs 3..15, outside range [3.0, 10.0]"),
        (broken({"id": "something_else"}), "the id must equal the file name"),
    ],
)  # fmt: skip
def test_an_invalid_definition_file_is_refused_naming_the_file_and_the_problem(
    tmp_path: Path, document: dict[str, Any], message: str
) -> None:
    path = tmp_path / "toy_pain.json"
    path.write_text(json.dumps(document), encoding="utf-8")
    with pytest.raises(ConfigurationError) as error:
        load_catalog(tmp_path)
    assert str(path) in str(error.value)
    assert message in str(error.value)


def test_a_definition_that_is_not_json_is_refused_with_its_line(tmp_path: Path) -> None:
    (tmp_path / "toy_pain.json").write_text('{"id": "toy_pain",\n  oops}', encoding="utf-8")
    with pytest.raises(ConfigurationError, match=r"toy_pain.json is not valid JSON \(line 2"):
        load_catalog(tmp_path)


def reference_score(instrument: Any, score: Any, row: dict[str, Any]) -> tuple[str, float | None]:
    """A plain-Python reading of the same definition, to check the vectorised engine against."""
    items = {item.id: item for item in instrument.items}
    in_a_score = {item_id for each in instrument.scores for item_id in each.items}
    for item in instrument.items:  # an item in no score is range-checked too, for every score
        value = row.get(item.id)
        if item.id not in in_a_score and value is not None and not item.range[0] <= value <= item.range[1]:
            return "out_of_range", None
    values = []
    for item_id in score.items:
        value = row.get(item_id)
        if value is None:
            continue
        item = items[item_id]
        if not item.range[0] <= value <= item.range[1]:
            return "out_of_range", None
        values.append(item.recode[value] if item.recode else value)
    if len(score.items) - len(values) > score.missing.max_missing:
        return "incomplete", None
    if score.rule == "sum_lookup":
        return "scored", score.lookup[sum(values)]
    if score.missing.impute == "person_mean":
        return "scored", sum(values) * len(score.items) / len(values)
    return "scored", float(sum(values))


def test_a_large_random_batch_matches_a_row_by_row_reference(catalog: Catalog) -> None:
    generator = random.Random(20261123)
    rows = []
    for n in range(3000):
        instrument = generator.choice(list(catalog.instruments.values()))
        row: dict[str, Any] = {"response_id": f"r{n}", "instrument": instrument.id}
        for item in instrument.items:
            low, high = item.range
            roll = generator.random()
            row[item.id] = None if roll < 0.04 else high + 1 if roll < 0.06 else generator.randint(low, high)
        rows.append(row)
    result = scores_by(score_responses(wide(rows), catalog))
    checked = 0
    for row in rows:
        instrument = catalog.instrument(row["instrument"])
        for score in instrument.scores:
            status, expected = reference_score(instrument, score, row)
            got = result[(row["response_id"], score.name)]
            assert got["status"] == status
            assert got["score"] == (pytest.approx(expected) if expected is not None else None)
            checked += 1
    assert len(result) == checked


def test_the_ground_truth_rounds_prom_changes_as_the_warehouse_sql_does() -> None:
    # Exactly representable halves and near-halves from score differences: DuckDB rounds them
    # half away from zero on the scaled double; Python's round() would disagree on some.
    import duckdb

    from patient_journey.generate.model import sql_round

    values = [12.25, -12.25, 0.05, 2.675, 63.108 - 50.752, 81.667 - 47.487, -0.15, 1e-9, 99.95]
    values += [a / 8 - b * 0.0033 for a in range(-80, 80) for b in range(0, 40)]
    sql = duckdb.sql(f"select round(v, 1) from unnest({values}::double[]) t(v)").fetchall()
    assert [row[0] for row in sql] == [sql_round(v) for v in values]
    assert any(round(v, 1) != sql_round(v) for v in values)  # the case the helper exists for


def test_promis_10_items_in_no_score_are_range_checked_too(catalog: Catalog) -> None:
    good = {**dict.fromkeys(GPH_ITEMS + GMH_ITEMS + ["global01", "global09r"], 3), "global07r": 4}
    rows = [
        {"response_id": "ok", "instrument": "promis_10", **good},
        {"response_id": "g01", "instrument": "promis_10", **good, "global01": 9},
        {"response_id": "g09", "instrument": "promis_10", **good, "global09r": 0},
    ]
    result = scores_by(score_responses(wide(rows), catalog))
    for name in ("global_physical_health", "global_mental_health"):
        assert result[("ok", name)]["status"] == "scored"
        for bad in ("g01", "g09"):
            assert (result[(bad, name)]["status"], result[(bad, name)]["rule"]) == (
                "out_of_range",
                "item_in_range",
            )
