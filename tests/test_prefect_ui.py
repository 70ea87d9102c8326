"""The Prefect UI of the served stack, in Debian's chromium driven by Playwright: the
deployments are listed, a completed run is found and its summary artifact shows the figures
the warehouse holds. Screenshots go to test-output/prefect-ui/."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

from patient_journey.lake import Lake, gold
from tests.conftest import settings_for
from tests.prefect_stack import Served, require_or_skip

pytestmark = [pytest.mark.prefect, pytest.mark.browser]
CHROMIUM = Path("/usr/bin/chromium")
SHOTS = Path(__file__).resolve().parents[1] / "test-output" / "prefect-ui"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def page(served: Served) -> Iterator[object]:
    require_or_skip(CHROMIUM.exists(), f"{CHROMIUM} is missing: `make test` installs Debian's chromium.")
    require_or_skip(shutil.which("chromium") is not None or CHROMIUM.exists(), "chromium is not on PATH")
    from playwright.sync_api import sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        yield context.new_page()
        browser.close()


def test_the_ui_lists_deployments_and_shows_a_completed_runs_summary(
    served: Served, served_client: SyncPrefectClient, page: object, served_runs: object
) -> None:
    from playwright.sync_api import Page, expect

    assert isinstance(page, Page)
    ui = served.stack.ui_url
    page.goto(f"{ui}/deployments")
    for name in ("ingest-device", "ingest-ehr", "ingest-outcomes", "journey-build", "backfill"):
        expect(page.get_by_text(name, exact=True).first).to_be_visible(timeout=60_000)
    page.screenshot(path=str(SHOTS / "deployments.png"), full_page=True)

    page.goto(f"{ui}/runs")
    expect(page.get_by_text("Completed").first).to_be_visible(timeout=60_000)
    page.screenshot(path=str(SHOTS / "runs.png"), full_page=True)

    # The summary of the last build that loaded the warehouse, opened from its run's page.
    summaries = served_client.read_artifacts(
        artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["patient-journey-summary"]))
    )
    built = [a for a in summaries if "## Tables" in str(a.data) and a.flow_run_id]
    assert built, "no completed build published a summary"
    artifact = max(built, key=lambda a: a.created or 0)
    run = served_client.read_flow_run(artifact.flow_run_id)
    assert run.state is not None and run.state.is_completed()
    page.goto(f"{ui}/runs/flow-run/{run.id}")
    expect(page.get_by_text(run.name).first).to_be_visible(timeout=60_000)
    page.screenshot(path=str(SHOTS / "run.png"), full_page=True)

    page.goto(f"{ui}/artifacts/artifact/{artifact.id}")
    episodes = Lake(settings_for(served.root)).read(gold("surgical_episode"))
    assert episodes is not None
    row = page.get_by_role("row").filter(has_text=re.compile(r"^\s*surgical_episode"))
    expect(row.first).to_be_visible(timeout=60_000)
    cells = [c.strip() for c in row.first.locator("td").all_inner_texts()]
    assert cells[:3] == ["surgical_episode", str(episodes.num_rows), str(episodes.num_rows)], cells
    expect(page.get_by_text("Overall linkage rate").first).to_be_visible()
    page.screenshot(path=str(SHOTS / "summary-artifact.png"), full_page=True)
    assert all(
        (SHOTS / f).stat().st_size > 10_000 for f in ("deployments.png", "runs.png", "summary-artifact.png")
    )
