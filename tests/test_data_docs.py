"""Data Docs are rendered by a process started with the flow, and equal those rendered in place.

Great Expectations takes seconds to import and nothing else in a run needs it, so a building flow
starts ``DataDocsRenderer`` first and hands it the run's outcomes at the end; if that process is
gone, the pages are rendered in the flow's own process.
"""

from __future__ import annotations

import re
from dataclasses import asdict
from pathlib import Path

import pytest

from patient_journey.data_docs import DataDocsRenderer, render_pages
from patient_journey.pipeline import BuildReport
from patient_journey.quality import ExpectationOutcome
from patient_journey.report import RunSummary, write_data_docs
from tests.conftest import settings_for

SUITES = Path(__file__).resolve().parents[1] / "expectations"
OUTCOMES = [  # real rules of the shipped suites, with counts
    asdict(
        ExpectationOutcome(
            "staged.patient",
            "record_id_present",
            "expect_column_values_to_not_be_null",
            "patient_id",
            "reject",
            True,
            120,
            0,
            None,
        )
    ),
    asdict(
        ExpectationOutcome(
            "staged.patient",
            "gender_in_value_set",
            "expect_column_values_to_be_in_set",
            "gender",
            "reject",
            False,
            120,
            3,
            None,
        )
    ),
    asdict(
        ExpectationOutcome(
            "gold.journey_event",
            "event_time_present",
            "expect_column_values_to_not_be_null",
            "event_time",
            "warn",
            True,
            900,
            0,
            None,
        )
    ),
]


def _stable(pages: dict[str, str]) -> dict[str, str]:
    """The pages without what GX makes new on every render: a cache-busting time on its logo's URL
    and random ids of collapsible elements."""
    uuid = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
    return {name: uuid.sub("<id>", re.sub(r"\?d=\d{8}T[\d.]+Z", "", page)) for name, page in pages.items()}


def test_the_renderers_pages_equal_those_rendered_in_place() -> None:
    renderer = DataDocsRenderer()
    pages = renderer.render("run-7", OUTCOMES, SUITES)
    assert _stable(pages) == _stable(render_pages("run-7", OUTCOMES, SUITES))
    assert set(pages) == {"index.html", "staged.patient.html", "gold.journey_event.html"}
    assert (
        "run-7" in pages["index.html"] and ">1</td>" in pages["index.html"]
    )  # one not met in staged.patient
    with pytest.raises(RuntimeError, match="used or closed"):
        renderer.render("run-8", OUTCOMES, SUITES)


def test_a_renderer_that_died_leaves_the_pages_to_the_caller(tmp_path: Path) -> None:
    renderer = DataDocsRenderer()
    renderer.close()  # as if its process had gone: the pages are rendered in place
    dead = DataDocsRenderer()
    assert dead._process is not None
    dead._process.kill()
    summary = RunSummary(run_id="run-9")
    summary.silver = BuildReport(built=True, expectations=OUTCOMES)
    location = write_data_docs(settings_for(tmp_path), summary, dead)
    assert location is not None
    index = Path(location)
    assert index.read_text() == render_pages("run-9", OUTCOMES, SUITES)["index.html"]
    assert (index.parent / "staged.patient.html").is_file()
