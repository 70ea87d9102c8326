"""One bulk NDJSON file of several GB through one ingestion batch, with the worker's peak RSS.

Real bulk exports hold multi-GB Observation files. This writes one (lines of the generator's
Observations, repeated with new ids) and reads it the way the flow does: ``plan_ingest``, then
``extract_batch`` in a child process (the worker) whose RSS is sampled with its descendants,
then ``commit_ingest``. The file streams in chunks (patient_journey.sources.records.STREAM_BYTES)
and the batch's bronze rows are put aside in parts, so the worker's memory should not grow with
the file.

    .venv/bin/python -m bench.large_file [--gib 2] [--work bench/work/large-file]

Writes ``bench/results/large-file.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import orjson

from bench.child import RssSampler
from patient_journey.settings import JourneySettings

RESULTS = Path(__file__).resolve().parent / "results" / "large-file.json"
KEY = "bench-large-file-key-0123456789abcdef0123456789"


def write_file(target: Path, gib: float, work: Path) -> tuple[int, int]:
    """Write an Observation NDJSON file of about ``gib`` GiB; returns (bytes, lines)."""
    from patient_journey.generate import generate

    sample = generate(work / "sample", patients=50, seed=11, bad_rate=0.0)
    source = sample.out / "landing" / "ehr" / "fhir-export-20250301T000000Z" / "Observation.000.ndjson"
    templates = [orjson.loads(line) for line in source.read_bytes().splitlines() if line.strip()]
    goal = int(gib * 2**30)
    written = lines = 0
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("wb") as out:
        while written < goal:
            block = bytearray()
            for template in templates:
                lines += 1
                block += orjson.dumps({**template, "id": f"big-{lines}"}) + b"\n"
            out.write(block)
            written += len(block)
    return written, lines


def child(work: Path) -> None:
    """In the worker process: read the planned batch of the big file into its put-aside parts."""
    from patient_journey import pipeline

    settings = _settings(work)
    plan = pipeline.plan_ingest(settings, "fhir", batch_files=5000)
    reports = [pipeline.extract_batch(settings, batch, "bench-large-file") for batch in plan.batches]
    (work / "reports.json").write_bytes(orjson.dumps([r.__dict__ for r in reports], default=str))


def _settings(work: Path) -> JourneySettings:
    from patient_journey.settings import load_settings

    return load_settings(
        storage={
            "landing_url": str(work / "landing"),
            "warehouse_url": str(work / "warehouse"),
            "restricted_url": str(work / "restricted"),
        },
        identity={"patient_key": KEY},
        sources={"settle_seconds": 0},
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=2.0)
    parser.add_argument("--work", type=Path, default=Path("bench/work/large-file"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    work: Path = args.work.resolve()
    if args.child:
        child(work)
        return 0
    shutil.rmtree(work, ignore_errors=True)
    started = time.perf_counter()
    size, lines = write_file(work / "landing" / "ehr" / "big" / "Observation.000.ndjson", args.gib, work)
    print(
        f"wrote {size / 2**30:.2f} GiB, {lines:,} lines in {time.perf_counter() - started:.1f} s", flush=True
    )
    command = [sys.executable, "-m", "bench.large_file", "--child", "--work", str(work)]
    started = time.perf_counter()
    process = subprocess.Popen(command, env={**os.environ, "PYTHONHASHSEED": "0"})
    with RssSampler(interval=0.05, pid=process.pid) as sampler:
        code = process.wait()
    extract_seconds = time.perf_counter() - started
    if code != 0:
        print(f"the worker failed with exit code {code}", file=sys.stderr)
        return code
    from patient_journey import pipeline

    reports = [pipeline.IngestReport(**r) for r in orjson.loads((work / "reports.json").read_bytes())]
    for report in reports:
        report.spilled = tuple(report.spilled)
    started = time.perf_counter()
    with RssSampler(interval=0.05) as commit_sampler:
        committed = pipeline.commit_ingest(_settings(work), "fhir", reports)
    commit_seconds = time.perf_counter() - started
    result = {
        "command": f"python -m bench.large_file --gib {args.gib}",
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "file_bytes": size,
        "file_gib": round(size / 2**30, 3),
        "lines": lines,
        "records": committed.records,
        "rejects": committed.rejects,
        "extract_seconds": round(extract_seconds, 1),
        "extract_peak_rss_mib": sampler.peak,
        "commit_seconds": round(commit_seconds, 1),
        "commit_peak_rss_mib": commit_sampler.peak,
        "bronze_version": committed.bronze_version,
    }
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    return 0 if committed.records == lines else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
