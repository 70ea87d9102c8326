"""Where an incremental build's time goes: the bench's 1% increment, built once, profiled.

Loads 99% of a generated input (``bench.run.split_increment``: the last 1% of every NDJSON
file's lines, every 100th device blob and Bundle file held back) in one process, ingest then
build, and keeps that warehouse; then, on a copy of it, lands the 1%, ingests it, and profiles
``build_silver`` and ``build_gold`` with cProfile. The flow's fixed parts (start-up, planning,
the summary) are not in it: ``make bench`` measures the whole rerun.

    .venv/bin/python -m bench.increment_profile [--input bench/work/inputs/M-52000p-seed42]
        [--work bench/work/increment-profile] [--top 40]

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
    for path in sorted(p for p in new.rglob("*") if p.is_file()):
        target = landing / path.relative_to(new)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(path, target)
        added.append(target)
    try:
        settings = settings_for(root, landing)
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


if __name__ == "__main__":
    main()
