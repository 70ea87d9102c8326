"""The run summary: what each table read, loaded, quarantined and held. Counts only, no PHI."""

from __future__ import annotations

from dataclasses import dataclass, field

from patient_journey.pipeline import BuildReport, IngestReport, TableCounts


@dataclass
class RunSummary:
    run_id: str
    ingests: list[IngestReport] = field(default_factory=list)
    silver: BuildReport | None = None
    gold: BuildReport | None = None
    seconds: float = 0.0

    @property
    def tables(self) -> list[TableCounts]:
        return (self.silver.tables if self.silver else []) + (self.gold.tables if self.gold else [])

    @property
    def balanced(self) -> bool:
        return all(t.balanced for t in self.tables)

    def linkage_rate(self) -> float | None:
        staged = self.silver.tables if self.silver else []
        loaded = sum(t.loaded for t in staged)
        held = sum(t.held for t in staged)
        return None if loaded + held == 0 else loaded / (loaded + held)

    def failed_expectations(self) -> list[dict[str, object]]:
        reports = [r for r in (self.silver, self.gold) if r is not None]
        return [e for r in reports for e in r.expectations if not e["success"]]


def _rate(loaded: int, held: int) -> str:
    return "-" if loaded + held == 0 else f"{100 * loaded / (loaded + held):.1f}%"


def render_markdown(summary: RunSummary) -> str:
    lines = [f"# patient-journey run `{summary.run_id}`", ""]
    lines += [
        "## Sources",
        "",
        "| source | new inputs | of which changed | waiting (still settling) | records | rejected at read | seconds |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for ingest in summary.ingests:
        note = f" ({ingest.skipped})" if ingest.skipped else ""
        lines.append(
            f"| {ingest.source}{note} | {ingest.new_inputs} | {ingest.changed_inputs} | {ingest.pending_inputs} "
            f"| {ingest.records} | {ingest.rejects} | {ingest.seconds:.2f} |"
        )
    lines.append("")
    if any(ingest.pending_inputs for ingest in summary.ingests):
        lines += [
            "Inputs modified within the settle window (JOURNEY_SOURCES__SETTLE_SECONDS) may still be "
            "being written: the next run reads them.",
            "",
        ]
    if summary.silver is None or not summary.silver.built:
        reason = summary.silver.reason if summary.silver else "not built"
        lines += [f"Warehouse unchanged: {reason}.", ""]
        return "\n".join(lines)
    rate = summary.linkage_rate()
    lines += [
        "## Tables",
        "",
        "Every row read is loaded, quarantined, held or superseded: read = loaded + quarantined + "
        "held + superseded. Superseded rows were replaced by a later version of the same record, "
        "deleted at the source, or delivered again unchanged.",
        "",
        "| table | read | loaded | quarantined | held | superseded | linkage rate | balanced |",
        "|---|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for t in summary.tables:
        lines.append(
            f"| {t.table} | {t.read} | {t.loaded} | {t.quarantined} | {t.held} | {t.superseded} | "
            f"{_rate(t.loaded, t.held)} | {'yes' if t.balanced else '**no**'} |"
        )
    lines += ["", f"Overall linkage rate: {'-' if rate is None else f'{100 * rate:.1f}%'}", ""]
    if summary.silver.bronze_only:
        kept = ", ".join(f"{k} {v}" for k, v in sorted(summary.silver.bronze_only.items()))
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
        f"{len(failed)} expectation(s) not met (row rules quarantine, warn rules report):",
        "",
    ]
    if failed:
        lines += ["| table | rule | severity | unexpected | of |", "|---|---|---|---:|---:|"]
        for e in failed:
            lines.append(
                f"| {e['table']} | {e['rule']} | {e['severity']} | {e['unexpected_count']} | {e['element_count']} |"
            )
    durations = f"silver {summary.silver.seconds:.1f} s"
    if summary.gold:
        durations += f", gold {summary.gold.seconds:.1f} s"
    versions = {**summary.silver.versions, **(summary.gold.versions if summary.gold else {})}
    gold_versions = ", ".join(f"{k} v{v}" for k, v in versions.items() if k.startswith("gold."))
    lines += [
        "",
        "## Run",
        "",
        f"Durations: {durations}; total {summary.seconds:.1f} s.",
        f"Gold versions written: {gold_versions}.",
        "",
    ]
    return "\n".join(lines)
