"""docs/adding-a-source.md, run as written: its message and what it becomes, the files it names,
and its queries on a warehouse built from generated data (feed included)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from patient_journey import pipeline
from patient_journey.generate import generate
from patient_journey.query import run_query
from patient_journey.settings import JourneySettings
from patient_journey.sources import hl7v2
from patient_journey.sources.plugins import PLUGINS
from tests.conftest import settings_for

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "adding-a-source.md"
_BLOCK = re.compile(r"<!-- example: (\S+) -->\n```\w+\n(.*?)```", re.S)
_NUMBERS = {"five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10}


def _page() -> str:
    return DOC.read_text(encoding="utf-8")


def test_the_pages_message_becomes_the_bronze_record_it_shows() -> None:
    blocks = dict(_BLOCK.findall(_page()))
    message = blocks["adt-a01"].strip().replace("\n", "\r").encode()
    control_id, fields = hl7v2.read_message(message)
    assert control_id == "MSG00001"
    assert fields == json.loads(blocks["adt-a01-bronze"])


# What names the HL7 v2 source in a file (not http://terminology.hl7.org, a FHIR code system).
_NAMES_THE_SOURCE = re.compile(r"hl7 ?v2|\badt\b|adt_", re.I)
# Where a source is not counted: tests, docs, the bench's committed results.
_NOT_COUNTED = ("tests/", "docs/", "bench/results/")


def test_the_files_the_page_names_are_the_sources_files() -> None:
    page = _page()
    table = page[page.index("## 3.") : page.index("## 4.")]
    files = re.findall(r"^\| `([\w/.]+\.(?:py|json|toml|yaml))`", table, re.M)
    count = re.search(r"That is (\w+) files", table)
    assert count is not None and _NUMBERS[count.group(1)] == len(files)
    # every file of the repository that names the source is in the table, and only those
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True)
    naming = {
        name
        for name in tracked.stdout.splitlines()
        if not name.startswith(_NOT_COUNTED)
        and not name.endswith(".md")
        and (REPO / name).is_file()
        and _NAMES_THE_SOURCE.search((REPO / name).read_text(encoding="utf-8", errors="replace"))
    }
    assert naming == set(files)
    assert isinstance(PLUGINS["hl7v2"], hl7v2.Hl7v2Source)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> JourneySettings:
    root = tmp_path_factory.mktemp("adding-a-source")
    generated = generate(root / "gen", patients=30, seed=9, bad_rate=0.0)
    settings = settings_for(root, landing=generated.out / "landing")
    for source in pipeline.SOURCES:
        pipeline.ingest(settings, source, "run-1")
    pipeline.build_silver(settings, "run-1")
    pipeline.build_gold(settings, "run-1")
    return settings


def test_the_pages_queries_answer_as_it_says(built: JourneySettings) -> None:
    queries = re.findall(r'^journey query "(.+?)"', _page(), re.M)
    assert len(queries) == 2
    messages, events = (run_query(built, sql).to_pylist() for sql in queries)
    assert {row["trigger_event"] for row in messages} <= set(hl7v2.TRIGGERS)
    assert {"A01", "A03", "A04"} <= {row["trigger_event"] for row in messages}
    # the feed's admissions are the EHR's encounter events already: discharges and transfers only
    assert {row["event_type"] for row in events} <= {"discharge", "transfer"}
    assert any(row["event_type"] == "discharge" and row["events"] > 0 for row in events)
