"""The benchmark harness (bench/) end to end at a tiny scale: the shape of what it writes.

Nothing here times anything (speed is measured only by `make bench`): one real measured child
runs the library's steps on 60 generated patients and the floor parses their export; Cumulus ETL
is replaced by a stand-in (installing it takes a minute), and every later run of our pipeline
reuses the first run's figures.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench import run as bench_run

STEPS = ("preflight", "extract", "stage", "validate", "link", "load", "gold")


def test_harness_writes_every_step_and_ratio(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_measure = bench_run.measure
    ours: list[bench_run.Measured] = []
    fhir_only: list[bench_run.Measured] = []

    def measure(command: list[str], env: dict[str, str], log_file: Path, **kwargs: Any) -> bench_run.Measured:
        if "cumulus-etl" in command[0]:
            return bench_run.Measured(10.0, 200.0, {"bytes_out": 1000}, 0)
        if "floor" in command or "device-floor" in command:
            return real_measure(command, env, log_file, **kwargs)
        if "JOURNEY_SOURCES__OPTIONAL" in env:  # the flow on the FHIR source alone, measured once
            if not fhir_only:
                fhir_only.append(real_measure(command, env, log_file, **kwargs))
            return fhir_only[0]
        if not ours:
            ours.append(real_measure(command, env, log_file, **kwargs))
        return ours[0]

    monkeypatch.setattr(bench_run, "measure", measure)
    monkeypatch.setattr(
        bench_run.Bench, "cumulus_run", lambda self, export, label: measure([str(self.cumulus)], {}, Path())
    )
    monkeypatch.setitem(bench_run.SCALES, "XS", 40)
    bench = bench_run.Bench(tmp_path / "work", runs=1, server=None, profile=None, results=tmp_path)
    scale = bench.scale("XS")
    scale["ratios"] = bench_run.ratios(scale, {"cumulus_seconds": 5.0})
    scale["fhir_only"]["ratios"] = bench_run.ratios(scale, {"cumulus_seconds": 5.0}, "fhir_only")
    result = {
        "command": "test",
        "started_at": "now",
        "bench_seconds": 0.0,
        "machine": bench_run.machine(),
        "cumulus_etl": {"version": "stand-in"},
        "orchestration": "library steps, no Prefect",
        "startup": {"ours_seconds": 1.0, "cumulus_seconds": 5.0},
        "scales": {"XS": scale},
    }
    result["targets"] = bench_run.targets(result)
    text = json.dumps(result)  # JSON-serialisable as written to results.json
    markdown = bench_run.render(json.loads(text))

    ours_result = scale["ours"]
    assert ours_result["balanced"]
    assert ours_result["fhir_resources"] > 0
    for step in STEPS:
        assert ours_result["steps"][step]["seconds"] is not None, step
        assert ours_result["steps"][step]["peak_rss_mib"], step
        assert f"| {step} |" in markdown
    for key in ("bytes_in", "bytes_out"):
        assert ours_result["steps"]["extract"][key] > 0
        assert ours_result["steps"]["gold"][key] > 0
    assert ours_result["steps"]["stage"]["bytes_in"] > 0 and ours_result["steps"]["load"]["bytes_out"] > 0
    assert set(scale["ratios"]) >= {
        "fhir_resources_per_second",
        "vs_cumulus_total",
        "vs_cumulus_excluding_startup",
        "floor_over_ours_excluding_startup",
        "floor_over_ours_total",
    }
    assert scale["floor"]["duckdb"]["rows"] == scale["input"]["compared_export"]["resources"]
    assert scale["rerun_one_percent"]["held_lines"] > 0 and scale["rerun_one_percent"]["held_files"] > 0
    assert {"cpu", "cores", "memory_gib", "python", "packages"} <= set(result["machine"])
    assert "## Targets" in markdown
    # Like with like (issue 16): our flow on the compared export alone, and the device floor.
    alone = scale["fhir_only"]
    assert alone["fhir_resources"] == scale["input"]["compared_export"]["resources"]
    assert {source for source, read in alone["ingests"].items() if read["records"]} == {"fhir"}
    assert set(alone["ratios"]) >= {"vs_cumulus_total", "floor_over_ours_excluding_startup"}
    assert "extract_over_floors" not in alone["ratios"]
    assert scale["ratios"]["extract_over_floors"] > 0
    device_floor = scale["device_floor"]
    generated = scale["generator"]["counts"]
    assert device_floor["seconds"] > 0 and device_floor["blobs"] == generated["device_blobs"]
    assert device_floor["messages"] >= generated["device_messages"]
    assert "Device floor" in markdown and "FHIR source alone" in markdown
    # Counts, sizes and timings only: no patient identifiers or values in the results.
    assert "MRN" not in text and "mrn-" not in text.lower()
