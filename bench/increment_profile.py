"""Where an incremental build's time goes: the bench's 1% increment, built once, profiled.

Loads 99% of a generated input (``bench.run.split_increment``: the last 1% of every NDJSON
file's lines, every 100th device blob and Bundle file held back) in one process, ingest then
build, and keeps that warehouse; then, on a copy of it, lands the 1%, ingests it, and profiles
``build_silver`` and ``build_gold`` with cProfile. The flow's fixed parts (start-up, planning,
the summary) are not in it: ``make bench`` measures the whole rerun.

    .venv/bin/python -m bench.increment_profile [--input bench/work/inputs/M-52000p-seed42]
        [--work bench/work/increment-profile] [--top 40]

With ``--minute``, the increment is instead the bench's device minute (one IoT Hub
folder-minute of blobs landed on the base) and the whole library path of a device-only run is
profiled: preflight, ingest of the device source, both builds and the Data Docs.

Prints the silver and gold step times, what each build made again, and the top functions by
cumulative time. The base is kept under ``--work`` and reused while it exists (it takes minutes
at M); delete it after changing anything that the base build writes.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from bench.run import BENCH, split_increment
from patient_journey import pipeline
from patient_journey.settings import JourneySettings, load_settings

KEY = "bench-increment-profile-key-not-a-secret"


def settings_for(root: Path, landing: Path) -> JourneySettings:
    return load_settings(
        storage={
            "landing_url": str(landing),
            "warehouse_url": str(root / "warehouse"),
            "restricted_url": str(root / "restricted"),
        },
        identity={"patient_key": KEY},
        sources={"settle_seconds": 0},
    )


def load(settings: JourneySettings, run_id: str) -> None:
    for source in pipeline.SOURCES:
        report = pipeline.ingest(settings, source, run_id)
        print(f"  ingest {source}: {report.new_inputs} inputs, {report.records} records", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", type=Path, default=BENCH / "work" / "inputs" / "M-52000p-seed42")
    parser.add_argument("--work", type=Path, default=BENCH / "work" / "increment-profile")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--minute", action="store_true", help="profile the device minute's whole run instead")
    args = parser.parse_args()
    work: Path = args.work
    landing, new, base = work / "landing", work / "new", work / "base"
    if not (base / "restricted").exists():
        shutil.rmtree(work, ignore_errors=True)
        print(split_increment(args.input / "landing", landing, new, work / "minute"), flush=True)
        started = time.perf_counter()
        settings = settings_for(base, landing)
        load(settings, "base")
        pipeline.build_silver(settings, "base")
        pipeline.build_gold(settings, "base")
        print(f"base built in {time.perf_counter() - started:.1f} s", flush=True)
    root = work / "increment"
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(base, root)
    added = []  # the 1% lands where the base's inputs are: lineage keys name their paths
    arriving = work / "minute" if args.minute else new
    for path in sorted(p for p in arriving.rglob("*") if p.is_file()):
        target = landing / path.relative_to(arriving)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(path, target)
        added.append(target)
    try:
        settings = settings_for(root, landing)
        if args.minute:
            profile = cProfile.Profile()
            started = time.perf_counter()
            profile.runcall(device_minute, settings)
            print(f"device minute: {time.perf_counter() - started:.2f} s", flush=True)
            profile.dump_stats(work / "minute.pstats")  # for pstats queries after the run
            stats = pstats.Stats(profile).sort_stats("cumulative")
            stats.print_stats(args.top)
            stats.print_callers(r"lake.py.*\((read|delete_matching|scan)\)")
            return
        load(settings, "increment")
        for step in (pipeline.build_silver, pipeline.build_gold):
            profile = cProfile.Profile()
            started = time.perf_counter()
            report = profile.runcall(step, settings, "increment")
            print(
                f"{step.__name__}: {time.perf_counter() - started:.2f} s, steps {report.stage_seconds}, "
                f"replaced {report.replaced or '-'}, gold patients {report.patients or '-'}",
                flush=True,
            )
            pstats.Stats(profile).sort_stats("cumulative").print_stats(args.top)
    finally:
        for target in added:
            target.unlink()


def device_minute(settings: JourneySettings) -> None:
    """A device-only run's library steps, as the flow calls them, each timed."""
    from patient_journey.report import RunSummary, write_data_docs

    summary = RunSummary(run_id="minute")
    steps: list[tuple[str, Callable[[], object]]] = [
        ("preflight", lambda: pipeline.preflight(settings)),
        ("ingest", lambda: summary.ingests.append(pipeline.ingest(settings, "device", "minute"))),
        ("silver", lambda: setattr(summary, "silver", pipeline.build_silver(settings, "minute"))),
        ("gold", lambda: setattr(summary, "gold", pipeline.build_gold(settings, "minute"))),
        ("data docs", lambda: write_data_docs(settings, summary)),
    ]
    for name, step in steps:
        started = time.perf_counter()
        step()
        print(f"  {name}: {time.perf_counter() - started:.2f} s", flush=True)


if __name__ == "__main__":
    main()
