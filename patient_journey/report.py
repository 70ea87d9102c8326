"""The run summary: what each table read, loaded, quarantined and held. Counts only, no PHI.

What an operator sees of a run is built here, from the pipeline's reports: the markdown summary,
the rows of the expectations table, the quarantine share that raises an alert, the locations of
the quarantine tables, and Great Expectations Data Docs rendered from counts (never values).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from patient_journey.azure import is_blob_url
from patient_journey.data_docs import DataDocsRenderer, render_pages
from patient_journey.lake import Lake, extraction_rejects_table
from patient_journey.pipeline import (
    QUARANTINE,
    SOURCES,
    BuildReport,
    IngestReport,
    TableCounts,
)
from patient_journey.settings import JourneySettings
from patient_journey.sources.plugins import LINKS

QUARANTINE_EVENT = "patient-journey.quarantine.threshold-exceeded"
LINKAGE_EVENT = "patient-journey.linkage.below-floor"
BRONZE_ONLY_LISTED = 10
EXPECTATION_COLUMNS = (
    "table",
    "rule",
    "expectation",
    "column",
    "severity",
    "outcome",
    "element_count",
    "unexpected_count",
)


@dataclass
class RunSummary:
    run_id: str
    ingests: list[IngestReport] = field(default_factory=list)
    silver: BuildReport | None = None
    gold: BuildReport | None = None
    seconds: float = 0.0
    flow: str = "patient-journey"
    links: dict[str, str] = field(default_factory=dict)  # label -> location (paths, no values)

    @property
    def tables(self) -> list[TableCounts]:
        return (self.silver.tables if self.silver else []) + (self.gold.tables if self.gold else [])

    @property
    def balanced(self) -> bool:
        return all(t.balanced for t in self.tables)

    @property
    def built(self) -> bool:
        return self.silver is not None and self.silver.built

    def linkage_rate(self) -> float | None:
        staged = self.silver.tables if self.silver else []
        loaded = sum(t.loaded for t in staged)
        held = sum(t.held for t in staged)
        return None if loaded + held == 0 else loaded / (loaded + held)

    def below_linkage_floor(self, floor: float, min_rows: int) -> list[tuple[str, int, int]]:
        """(table, loaded, held) of the staged tables with at least ``min_rows`` loaded or held
        rows whose linkage rate is below ``floor``."""
        staged = self.silver.tables if self.silver and self.silver.built else []
        return [
            (t.table, t.loaded, t.held)
            for t in staged
            if t.loaded + t.held >= min_rows and t.loaded < floor * (t.loaded + t.held)
        ]

    def failed_expectations(self) -> list[dict[str, object]]:
        reports = [r for r in (self.silver, self.gold) if r is not None]
        return [e for r in reports for e in r.expectations if not e["success"]]

    def quarantine_share(self) -> float | None:
        """Quarantined rows over rows read in the build (silver tables), or, for a run that only
        ingested, records rejected at read over records read. None when nothing was read."""
        if self.silver is not None and self.silver.built:
            read = sum(t.read for t in self.silver.tables)
            quarantined = sum(t.quarantined for t in self.silver.tables)
        else:
            quarantined = sum(i.rejects for i in self.ingests)
            read = sum(i.records for i in self.ingests) + quarantined
        return None if read == 0 else quarantined / read

    def expectation_rows(self) -> list[dict[str, object]]:
        """Every expectation evaluated by the run with its outcome and counts (no observed values)."""
        rows: list[dict[str, object]] = []
        for report in (self.silver, self.gold):
            for e in report.expectations if report is not None else []:
                outcome = "passed" if e["success"] else ("failed" if e["severity"] == "error" else "warned")
                rows.append({**{k: e.get(k) for k in EXPECTATION_COLUMNS}, "outcome": outcome})
        order = {"failed": 0, "warned": 1, "passed": 2}  # what needs reading first
        return sorted(rows, key=lambda row: order[str(row["outcome"])])

    def versions(self) -> dict[str, int]:
        reports = [r for r in (self.silver, self.gold) if r is not None]
        return {k: v for r in reports for k, v in r.versions.items()}


def quarantine_locations(settings: JourneySettings) -> dict[str, str]:
    """Where rejected records are kept (restricted: rule and lineage only), by table label."""
    lake = Lake(settings)
    tables = [QUARANTINE] + [extraction_rejects_table(source) for source in SOURCES]
    return {f"quarantine: {t.label}": lake.uri(t) for t in tables}


def linkage_warning(below: list[tuple[str, int, int]], floor: float) -> str:
    """The one line a run below the linkage floor ends with (tables as ``RunSummary.below_linkage_floor``)."""
    described = "; ".join(
        f"{table} {100 * loaded / (loaded + held):.1f}% ({loaded:,} of {loaded + held:,})"
        for table, loaded, held in below
    )
    return (
        f"Linkage below the floor of {100 * floor:.0f}% (JOURNEY_QUALITY__MIN_LINKAGE_RATE): {described}. "
        "Everything read was loaded or held; held records are retried on later runs. Check that their "
        "patients arrive (references, MRNs, case ids)."
    )


def _rate(loaded: int, held: int) -> str:
    return "-" if loaded + held == 0 else f"{100 * loaded / (loaded + held):.1f}%"


def _percent(share: float | None) -> str:
    return "-" if share is None else f"{100 * share:.2f}%"


# A staged table loads into the silver table its link names (the PROM sources into prom_score).
SILVER_OF = {spec.staged: spec.silver for spec in LINKS if spec.silver is not None}


def _version_of(table: str, versions: dict[str, int]) -> str:
    for name in (f"gold.{table}", f"silver.{SILVER_OF.get(table, table)}"):
        if name in versions:
            return f"{name.split('.')[0]} v{versions[name]}"
    return "-"


def _link(location: str) -> str:
    if is_blob_url(location) or "://" in location:
        return f"`{location}`"
    return f"[{location}](file://{location})"


def render_markdown(summary: RunSummary) -> str:
    lines = [f"# {summary.flow} run `{summary.run_id}`", ""]
    if summary.ingests:
        lines += [
            "## Sources",
            "",
            "| source | new inputs | of which changed | waiting (still settling) | records | rejected at read | bronze version | seconds |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for ingest in summary.ingests:
            note = f" ({ingest.skipped})" if ingest.skipped else ""
            version = "-" if ingest.bronze_version is None else f"v{ingest.bronze_version}"
            lines.append(
                f"| {ingest.source}{note} | {ingest.new_inputs} | {ingest.changed_inputs} | {ingest.pending_inputs} "
                f"| {ingest.records} | {ingest.rejects} | {version} | {ingest.seconds:.2f} |"
            )
        lines.append("")
        blank = sum(ingest.blank_rows for ingest in summary.ingests)
        if blank:
            lines += [
                f"Rows with nothing to load (a REDCap row holding only its record id, form statuses or "
                f"unchecked boxes): {blank:,}.",
                "",
            ]
        if any(ingest.pending_inputs for ingest in summary.ingests):
            lines += [
                "Inputs modified within the settle window (JOURNEY_SOURCES__SETTLE_SECONDS) may still be "
                "being written: the next run reads them.",
                "",
            ]
    share = summary.quarantine_share()
    lines += [f"Quarantine share of rows read: {_percent(share)}.", ""]
    if summary.silver is None or not summary.silver.built:
        reason = summary.silver.reason if summary.silver else "not built"
        lines += [f"Warehouse unchanged: {reason}.", ""]
        _links(lines, summary)
        lines += [f"Total {summary.seconds:.1f} s.", ""]
        return "\n".join(lines)
    rate = summary.linkage_rate()
    versions = summary.versions()
    lines += [
        "## Tables",
        "",
        "Every row read is loaded, quarantined, held or superseded: read = loaded + quarantined + "
        "held + superseded. Superseded rows were replaced by a later version of the same record, "
        "deleted at the source, or delivered again unchanged.",
        "",
        "| table | read | loaded | quarantined | held | superseded | linkage rate | balanced | version written |",
        "|---|---:|---:|---:|---:|---:|---:|:---:|---|",
    ]
    for t in summary.tables:
        lines.append(
            f"| {t.table} | {t.read} | {t.loaded} | {t.quarantined} | {t.held} | {t.superseded} | "
            f"{_rate(t.loaded, t.held)} | {'yes' if t.balanced else '**no**'} | {_version_of(t.table, versions)} |"
        )
    lines += ["", f"Overall linkage rate: {'-' if rate is None else f'{100 * rate:.1f}%'}", ""]
    cells = [f"{t.table} {t.cells_rejected:,}" for t in summary.tables if t.cells_rejected]
    if cells:
        lines += [
            f"REDCap cells rejected in rows that loaded (in the quarantine, not counted as rows): {', '.join(cells)}.",
            "",
        ]
    if summary.silver.bronze_only:
        # at most BRONZE_ONLY_LISTED by name: a wide REDCap project has thousands of forms
        largest = sorted(summary.silver.bronze_only.items(), key=lambda item: (-item[1], item[0]))
        kept = ", ".join(f"{k} {v}" for k, v in largest[:BRONZE_ONLY_LISTED])
        more = len(largest) - BRONZE_ONLY_LISTED
        kept += f" and {more:,} more" if more > 0 else ""
        lines += [f"Kept in bronze, not modelled yet: {kept}.", ""]
    if summary.gold is not None and summary.gold.device_clocks:
        clocks = summary.gold.device_clocks
        lines += [
            "## Device clocks",
            "",
            f"{clocks['devices']} device(s); largest median clock skew {clocks['max_median_skew_seconds']} s; "
            f"{clocks['beyond_tolerance']} beyond the tolerance of {clocks['tolerance_seconds']} s "
            "(see gold.device_clock).",
            "",
        ]
    failed = summary.failed_expectations()
    lines += [
        "## Expectations",
        "",
        f"{len(summary.expectation_rows())} expectation(s) evaluated, {len(failed)} not met "
        "(row rules quarantine, warn rules report):",
        "",
    ]
    if failed:
        lines += ["| table | rule | severity | unexpected | of |", "|---|---|---|---:|---:|"]
        for e in failed:
            lines.append(
                f"| {e['table']} | {e['rule']} | {e['severity']} | {e['unexpected_count']} | {e['element_count']} |"
            )
    durations = [f"{i.source} {i.seconds:.1f} s" for i in summary.ingests]
    durations.append(f"silver {summary.silver.seconds:.1f} s")
    if summary.gold:
        durations.append(f"gold {summary.gold.seconds:.1f} s")
    gold_versions = ", ".join(f"{k} v{v}" for k, v in versions.items() if k.startswith("gold."))
    lines += [
        "",
        "## Run",
        "",
        f"Durations: {', '.join(durations)}; total {summary.seconds:.1f} s.",
        *_increment(summary),
        f"Gold versions written: {gold_versions}.",
        "",
    ]
    _links(lines, summary)
    return "\n".join(lines)


def _increment(summary: RunSummary) -> list[str]:
    """What the build made again: every record, or those at the positions new rows touched."""
    replaced = summary.silver.replaced if summary.silver is not None else {}
    if not replaced:
        return []
    whole = sorted(name for name, count in replaced.items() if count == "whole")
    if len(whole) == len(replaced):
        text = "whole (every record resolved, checked and linked)"
    else:
        positions = sum(count for count in replaced.values() if isinstance(count, int))
        text = f"incremental, the records of {positions} position(s) made again" + (
            f"; whole: {', '.join(whole)}" if whole else ""
        )
    if summary.gold is not None and summary.gold.patients != "":
        who = "every patient" if summary.gold.patients == "all" else f"{summary.gold.patients} patient(s)"
        text += f"; gold made again for {who}"
    return [f"Build: {text}."]


def _links(lines: list[str], summary: RunSummary) -> None:
    if summary.links:
        lines += ["## Where to look", ""]
        lines += [f"- {label}: {_link(location)}" for label, location in summary.links.items()]
        lines.append("")


def expectation_outcomes(summary: RunSummary) -> list[dict[str, Any]]:
    """Every expectation outcome of the run's builds (counts, as ``BuildReport.expectations``)."""
    return [e for report in (summary.silver, summary.gold) if report is not None for e in report.expectations]


def write_data_docs(
    settings: JourneySettings, summary: RunSummary, renderer: DataDocsRenderer | None = None
) -> str | None:
    """Write the run's Data Docs beside the quarantine (``data_docs/<run id>/``); returns the
    location of their index page, or None when the run evaluated no expectation. With a
    ``renderer`` started earlier, it renders them (here, if it fails)."""
    if not summary.expectation_rows():
        if renderer is not None:
            renderer.close()
        return None
    outcomes, folder_of_suites = expectation_outcomes(summary), settings.quality.expectations_dir
    pages = None
    if renderer is not None:
        try:
            pages = renderer.render(summary.run_id, outcomes, folder_of_suites)
        except RuntimeError:
            pages = None
    if pages is None:
        pages = render_pages(summary.run_id, outcomes, folder_of_suites)
    storage = Lake(settings).storage(settings.storage.quarantine_root)
    folder = f"data_docs/{summary.run_id}"
    for name, page in pages.items():
        storage.write_bytes(f"{folder}/{name}", page.encode())
    location = storage.url(folder, "index.html")
    return location if is_blob_url(location) else str(Path(location).resolve())
