"""Great Expectations Data Docs of a run, rendered from counts, and a renderer started early.

Rendering needs Great Expectations, whose import takes about 5 s (the rest of a run never imports
it: the suites are evaluated in SQL). A flow starts a ``DataDocsRenderer`` after its silver
build: a process of its own that imports the renderer while the run builds gold, then waits for
the run's outcomes on its standard input and answers with the pages. A renderer that fails or is
never started leaves the rendering to the caller's process (``render_pages``).

    python -m patient_journey.data_docs    # the renderer's process: JSON in, JSON out
"""

from __future__ import annotations

import html
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from patient_journey.quality import load_suite_files, rule_of

# How long the renderer may take once it has the outcomes (its imports overlap the run).
RENDER_TIMEOUT_SECONDS = 300


def _suite_kwargs(expectations_dir: Path) -> dict[tuple[str, str, str], dict[str, Any]]:
    """(layer.table, rule, expectation type) -> the expectation's kwargs in its suite file (the
    rule's definition, e.g. a value set of codes; never data)."""
    found: dict[tuple[str, str, str], dict[str, Any]] = {}
    for (layer, table), suite in load_suite_files(expectations_dir).items():
        for config in suite.document["expectations"]:
            kwargs = dict(config.get("kwargs") or {})
            rule = rule_of(config["type"], kwargs.get("column"), config.get("meta"))
            found[(f"{layer}.{table}", rule, config["type"])] = kwargs
    return found


def render_pages(run_id: str, expectations: list[dict[str, Any]], expectations_dir: Path) -> dict[str, str]:
    """Great Expectations Data Docs of a run, one HTML page per table plus ``index.html``,
    rendered from its expectation outcomes (``BuildReport.expectations``: counts) and the
    suites' definitions: no unexpected values, no observed values, no row ids."""
    from great_expectations.core import ExpectationSuiteValidationResult, ExpectationValidationResult
    from great_expectations.expectations.expectation_configuration import ExpectationConfiguration
    from great_expectations.render.renderer.page_renderer import ValidationResultsPageRenderer
    from great_expectations.render.view.view import DefaultJinjaPageView

    by_table: dict[str, list[dict[str, Any]]] = {}
    for e in expectations:
        by_table.setdefault(str(e["table"]), []).append(e)
    pages: dict[str, str] = {}
    index = [
        "<!doctype html><html><head><meta charset='utf-8'><title>Data Docs</title></head><body>",
        f"<h1>Expectations of run {html.escape(run_id)}</h1>",
        "<p>Counts only: no values are rendered.</p><table border='1' cellpadding='4'>",
        "<tr><th>table</th><th>evaluated</th><th>not met</th></tr>",
    ]
    renderer, view = ValidationResultsPageRenderer(), DefaultJinjaPageView()
    definitions = _suite_kwargs(expectations_dir)
    for table, expectations in sorted(by_table.items()):
        results = []
        for e in expectations:
            kwargs = definitions.get((table, str(e["rule"]), str(e["expectation"])))
            if kwargs is None:
                kwargs = {"column": e["column"]} if e.get("column") else {}
            element_count = e.get("element_count")
            unexpected = e.get("unexpected_count")
            counts: dict[str, object] = {}
            if isinstance(element_count, int):
                counts["element_count"] = element_count
            if isinstance(unexpected, int):
                counts["unexpected_count"] = unexpected
                if isinstance(element_count, int) and element_count:
                    counts["unexpected_percent"] = 100 * unexpected / element_count
            try:
                config = ExpectationConfiguration(
                    type=str(e["expectation"]),
                    kwargs=kwargs,
                    meta={"rule": e["rule"], "severity": e["severity"]},
                )
            except Exception:  # noqa: S112 - a definition GX cannot rebuild: in the table artifact only
                continue
            results.append(
                ExpectationValidationResult(
                    success=bool(e["success"]), expectation_config=config, result=counts
                )
            )
        failed = sum(not r.success for r in results)
        layer, _, name = table.partition(".")
        validation = ExpectationSuiteValidationResult(
            success=failed == 0,
            results=results,
            suite_name=table,
            statistics={
                "evaluated_expectations": len(results),
                "successful_expectations": len(results) - failed,
                "unsuccessful_expectations": failed,
                "success_percent": 100 * (len(results) - failed) / len(results) if results else 100.0,
            },
            meta={
                "run_id": {"run_name": run_id, "run_time": "1970-01-01T00:00:00+00:00"},
                "active_batch_definition": {
                    "datasource_name": layer,
                    "data_connector_name": "patient-journey",
                    "data_asset_name": name or table,
                    "batch_identifiers": {},
                },
            },
        )
        page = f"{table}.html"
        pages[page] = str(view.render(renderer.render(validation)))  # type: ignore[no-untyped-call]
        index.append(
            f"<tr><td><a href='{html.escape(page)}'>{html.escape(table)}</a></td>"
            f"<td>{len(results)}</td><td>{failed}</td></tr>"
        )
    index.append("</table></body></html>")
    pages["index.html"] = "\n".join(index)
    return pages


class DataDocsRenderer:
    """``render_pages`` in a process started now: its imports run while the caller works. Use
    it once (``render``), or ``close`` it; the process also ends when the caller's does."""

    def __init__(self) -> None:
        self._process: subprocess.Popen[bytes] | None = subprocess.Popen(
            [sys.executable, "-m", "patient_journey.data_docs"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )

    def render(
        self, run_id: str, expectations: list[dict[str, Any]], expectations_dir: Path
    ) -> dict[str, str]:
        """The pages, rendered by the process (RuntimeError if it failed: render them here)."""
        process, self._process = self._process, None
        if process is None:
            raise RuntimeError("the Data Docs renderer was used or closed already")
        request = {"run_id": run_id, "expectations": expectations, "expectations_dir": str(expectations_dir)}
        try:
            out, _ = process.communicate(
                json.dumps(request, default=str).encode(), timeout=RENDER_TIMEOUT_SECONDS
            )
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            raise RuntimeError("the Data Docs renderer did not answer in time") from None
        if process.returncode != 0:
            raise RuntimeError(f"the Data Docs renderer exited with {process.returncode}")
        pages = json.loads(out)
        if not isinstance(pages, dict) or not all(isinstance(v, str) for v in pages.values()):
            raise RuntimeError("the Data Docs renderer answered something else than pages")
        return pages

    def close(self) -> None:
        """Stop the process if it was not used."""
        process, self._process = self._process, None
        if process is not None:
            process.kill()
            process.communicate()


def main() -> int:
    """The renderer's process: import the renderer, then render the one request on stdin."""
    import great_expectations.render.renderer.page_renderer  # noqa: F401 - the import it exists for

    data = sys.stdin.buffer.read()
    if not data:  # the caller went away, or closed it unused
        return 0
    request = json.loads(data)
    pages = render_pages(request["run_id"], request["expectations"], Path(request["expectations_dir"]))
    sys.stdout.write(json.dumps(pages))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
