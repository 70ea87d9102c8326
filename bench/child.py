"""One measured process of the benchmark (started by ``bench.run``, one per measurement).

Modes (``python -m bench.child MODE ARGS``), each printing one JSON object as its last line:

- ``pipeline``: the library's steps in the flow's order (preflight; ingest of every source in
  threads, as Prefect's default task runner does; build_silver; build_gold), each timed, with its
  peak RSS (the kernel's high-water mark, reset at each step) and, for the silver and gold steps'
  sub-steps, the highest RSS sampled every 10 ms.
- ``flow``: the Prefect flow itself, against the Prefect server in ``PREFECT_API_URL``.
- ``floor``: the fastest single-library parse of the FHIR NDJSON into Parquet (DuckDB and pyarrow).
- ``device-floor``: the fastest single-library read of the routed device blobs into Parquet
  (fastavro and orjson).

The data locations and the patient key come from the environment (``JOURNEY_*``), as in
production; the parent sets them. Only counts, sizes and timings are printed, never values.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
PROCESS_START = time.perf_counter()
_HWM = re.compile(r"VmHWM:\s+(\d+) kB")
_RSS = re.compile(r"VmRSS:\s+(\d+) kB")


def _status_kib(pattern: re.Pattern[str]) -> int:
    with open("/proc/self/status") as status:
        match = pattern.search(status.read())
    return int(match.group(1)) if match else 0


def reset_peak() -> bool:
    """Reset the kernel's RSS high-water mark of this process (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        return False
    return True


def peak_mib() -> float:
    return round(_status_kib(_HWM) / 1024, 1)


class RssSampler:
    """Samples the RSS of a process (this one by default) and its descendants (the flow reads
    ingestion batches in worker processes), summed, every ``interval`` seconds: (time, MiB)
    pairs. Sampling stops when the process exits."""

    def __init__(self, interval: float = 0.02, pid: int | None = None) -> None:
        self.samples: list[tuple[float, float]] = []
        self._interval = interval
        self._pid = pid
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        children: list[psutil.Process] = []
        try:
            me = psutil.Process(self._pid)
        except psutil.Error:  # exited before the first sample
            return
        for tick in itertools.count():
            if self._stop.is_set():
                break
            try:
                if tick % 25 == 0:  # finding descendants scans all of /proc: every 0.5 s, not every sample
                    children = me.children(recursive=True)
                total = me.memory_info().rss
            except psutil.Error:  # the process exited
                break
            for child in children:
                try:
                    total += child.memory_info().rss
                except psutil.Error:  # exited since it was listed
                    continue
            self.samples.append((time.perf_counter(), total / 2**20))
            self._stop.wait(self._interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak(self) -> float | None:
        return self.peak_between(-math.inf, math.inf)

    def peak_between(self, start: float, end: float) -> float | None:
        values = [mib for at, mib in self.samples if start <= at <= end]
        return round(max(values), 1) if values else None


def dir_bytes(path: str | Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                continue
    return total


class Steps:
    """Times each top-level step with its own peak RSS."""

    def __init__(self) -> None:
        self.results: dict[str, dict[str, Any]] = {}
        self.resettable = reset_peak()

    def run(self, name: str, action: Callable[[], T]) -> tuple[T, float, float]:
        reset_peak()
        started = time.perf_counter()
        value = action()
        ended = time.perf_counter()
        self.results[name] = {
            "seconds": round(ended - started, 3),
            "peak_rss_mib": peak_mib(),
        }
        return value, started, ended


def _sub_steps(
    stage_seconds: dict[str, float], start: float, sampler: RssSampler, prefix: str = ""
) -> dict[str, dict[str, Any]]:
    """Sub-steps from their contiguous durations, with the highest RSS sampled in each."""
    out: dict[str, dict[str, Any]] = {}
    at = start
    for step, seconds in stage_seconds.items():
        out[prefix + step] = {"seconds": seconds, "peak_rss_mib": sampler.peak_between(at, at + seconds)}
        at += seconds
    return out


def run_pipeline(run_id: str) -> dict[str, Any]:
    """The flow's steps without Prefect, each measured."""
    imports_started = time.perf_counter()
    from patient_journey import pipeline
    from patient_journey.settings import load_settings

    imported = time.perf_counter()
    settings = load_settings()
    steps = Steps()
    sampler = RssSampler()
    with sampler:
        steps.run("preflight", lambda: pipeline.preflight(settings))

        def ingest_all() -> list[Any]:
            with ThreadPoolExecutor(len(pipeline.SOURCES)) as pool:
                futures = [pool.submit(pipeline.ingest, settings, s, run_id) for s in pipeline.SOURCES]
                return [f.result() for f in futures]

        ingests, _, _ = steps.run("extract", ingest_all)
        silver, silver_start, _ = steps.run("silver", lambda: pipeline.build_silver(settings, run_id))
        gold = None
        if silver.built:
            gold, gold_start, _ = steps.run("gold", lambda: pipeline.build_gold(settings, run_id))
        ended = time.perf_counter()
    for values in steps.results.values():
        values.pop("start", None)
    sub = _sub_steps(silver.stage_seconds, silver_start, sampler)
    if gold is not None:
        sub.update(_sub_steps(gold.stage_seconds, gold_start, sampler, prefix="gold_"))
    tables = {t.table: {"read": t.read, "loaded": t.loaded} for t in silver.tables}
    if gold is not None:
        tables.update({t.table: {"read": t.read, "loaded": t.loaded} for t in gold.tables})
    return {
        "mode": "pipeline",
        "import_seconds": round(imported - imports_started, 3),
        "flow_seconds": round(ended - imported, 3),
        "steps": steps.results,
        "sub_steps": sub,
        "peak_rss_resettable": steps.resettable,
        "ingests": {
            r.source: {
                "seconds": r.seconds,
                "records": r.records,
                "rejects": r.rejects,
                "inputs": r.new_inputs,
            }
            for r in ingests
        },
        "silver_built": silver.built,
        "balanced": all(t.balanced for t in silver.tables),
        "tables": tables,
        "process_peak_rss_mib": round(max((m for _, m in sampler.samples), default=0.0), 1),
    }


class StepRecorder:
    """Wraps the library's step functions (the Prefect tasks call them through the module) to
    record when each step ran and its peak RSS; batches run in parallel, so "extract" spans the
    first batch's start to the last commit's end."""

    def __init__(self, sampler: RssSampler) -> None:
        self.sampler = sampler
        self.spans: dict[str, list[tuple[float, float]]] = {}
        self.peaks: dict[str, float] = {}
        self.reports: dict[str, list[Any]] = {}
        self._active = 0
        self._lock = threading.Lock()

    def wrap(self, step: str, function: Callable[..., T]) -> Callable[..., T]:
        def measured(*args: Any, **kwargs: Any) -> T:
            with self._lock:
                if self._active == 0:
                    reset_peak()
                self._active += 1
            started = time.perf_counter()
            try:
                value = function(*args, **kwargs)
            finally:
                ended = time.perf_counter()
                with self._lock:
                    self._active -= 1
                    self.spans.setdefault(step, []).append((started, ended))
                    self.peaks[step] = max(self.peaks.get(step, 0.0), peak_mib())
            self.reports.setdefault(step, []).append(value)
            return value

        return measured

    def steps(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for step, spans in self.spans.items():
            start, end = min(s for s, _ in spans), max(e for _, e in spans)
            out[step] = {
                "seconds": round(end - start, 3),
                "calls": len(spans),
                "peak_rss_mib": self.peaks[step],
                "start": start,
            }
        return out


def _landing_bytes() -> int:
    return dir_bytes(os.environ["JOURNEY_STORAGE__LANDING_URL"])


def run_flow() -> dict[str, Any]:
    """The Prefect flow, as `journey run` runs it (the server is the one in PREFECT_API_URL),
    with each library step timed and its peak RSS recorded."""
    imports_started = time.perf_counter()
    from flows.journey import patient_journey
    from patient_journey import pipeline

    imported = time.perf_counter()
    sampler = RssSampler()
    recorder = StepRecorder(sampler)
    for step, name in (
        ("preflight", "preflight"),
        ("silver", "build_silver"),
        ("gold", "build_gold"),
    ):
        setattr(pipeline, name, recorder.wrap(step, getattr(pipeline, name)))
    # BENCH_SOURCES: the sources this run reads (comma-separated), as a deployment of one kind does.
    only = [name for name in os.environ.get("BENCH_SOURCES", "").split(",") if name]
    with sampler:
        summary = patient_journey(sources=only or None)  # type: ignore[arg-type]
        ended = time.perf_counter()
    steps = recorder.steps()
    # Batches run in worker processes, where these wrappers are not: "extract" spans the sources'
    # reports, from the first batch's start to the last commit's end (epoch seconds).
    spans = [(r.started, r.started + r.seconds) for r in summary.ingests if r.started]
    if spans:
        offset = time.perf_counter() - time.time()
        start, end = min(s for s, _ in spans) + offset, max(e for _, e in spans) + offset
        steps["extract"] = {
            "seconds": round(end - start, 3),
            "calls": len(spans),
            "peak_rss_mib": sampler.peak_between(start, end),
            "start": start,
        }
    for step in ("preflight", "silver", "gold"):  # the kernel's peak of this process, or the tree's
        if step in steps:
            tree = sampler.peak_between(steps[step]["start"], steps[step]["start"] + steps[step]["seconds"])
            steps[step]["peak_rss_mib"] = max(steps[step]["peak_rss_mib"], tree or 0.0)
    # When journey_event was written, from the flow's start (imports done, as in a served flow).
    to_journey = steps["gold"]["start"] + steps["gold"]["seconds"] - imported if "gold" in steps else None
    sub: dict[str, dict[str, Any]] = {}
    for step, prefix in (("silver", ""), ("gold", "gold_")):
        report = summary.silver if step == "silver" else summary.gold
        if step in steps and report is not None:
            sub.update(_sub_steps(report.stage_seconds, steps[step]["start"], sampler, prefix))
    for values in steps.values():
        values.pop("start")
    tables: dict[str, dict[str, int]] = {}
    for report in (summary.silver, summary.gold):
        if report is not None:
            tables.update({t.table: {"read": t.read, "loaded": t.loaded} for t in report.tables})
    ingests: dict[str, dict[str, Any]] = {}
    for r in summary.ingests:
        entry = ingests.setdefault(r.source, {"seconds": 0.0, "records": 0, "rejects": 0, "inputs": 0})
        entry["seconds"] = r.seconds  # the source's wall time, first batch to commit
        entry["records"] += r.records
        entry["rejects"] += r.rejects
        entry["inputs"] += r.new_inputs
    return {
        "mode": "flow",
        "import_seconds": round(imported - imports_started, 3),
        "flow_seconds": round(ended - imported, 3),
        "journey_event_seconds": None if to_journey is None else round(to_journey, 3),
        "steps": steps,
        "sub_steps": sub,
        "ingests": ingests,
        "silver_built": bool(summary.silver and summary.silver.built),
        "balanced": summary.balanced,
        "tables": tables,
        "process_peak_rss_mib": round(max((m for _, m in sampler.samples), default=0.0), 1),
    }


def run_floor(input_dir: str, out_dir: str) -> dict[str, Any]:
    """DuckDB and pyarrow each parse every NDJSON file of the export into one Parquet file per
    resource type (schema inferred, nested columns kept); the faster is the floor."""
    files = sorted(p for p in Path(input_dir).iterdir() if p.name.endswith(".ndjson"))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"mode": "floor", "files": len(files)}

    started = time.perf_counter()
    import duckdb

    connection = duckdb.connect()
    connection.execute("SET preserve_insertion_order = false")
    imported = time.perf_counter()
    rows = 0
    for path in files:
        target = out / f"duckdb-{path.name}.parquet"
        connection.execute(
            f"COPY (SELECT * FROM read_json('{path}', format = 'newline_delimited', "
            "ignore_errors = true, maximum_object_size = 67108864, sample_size = -1)) "
            f"TO '{target}' (FORMAT parquet)"
        )
        rows += connection.execute(f"SELECT count(*) FROM '{target}'").fetchone()[0]  # type: ignore[index]
    ended = time.perf_counter()
    result["duckdb"] = {
        "seconds": round(ended - imported, 3),
        "import_seconds": round(imported - started, 3),
        "rows": rows,
        "bytes_out": sum(p.stat().st_size for p in out.glob("duckdb-*")),
    }

    started = time.perf_counter()
    import pyarrow.json as pajson
    import pyarrow.parquet as pq

    imported = time.perf_counter()
    rows = 0
    errors = 0
    for path in files:
        try:
            table = pajson.read_json(path, read_options=pajson.ReadOptions(block_size=64 << 20))
        except Exception:  # pyarrow.json has no skip-bad-lines option; a file it cannot parse is counted
            errors += 1
            continue
        pq.write_table(table, out / f"pyarrow-{path.name}.parquet")
        rows += table.num_rows
    ended = time.perf_counter()
    result["pyarrow"] = {
        "seconds": round(ended - imported, 3),
        "import_seconds": round(imported - started, 3),
        "rows": rows,
        "files_failed": errors,
        "bytes_out": sum(p.stat().st_size for p in out.glob("pyarrow-*")),
    }
    return result


DEVICE_FLOOR_PART_ROWS = 100_000


def run_device_floor(input_dir: str, out_dir: str) -> dict[str, Any]:
    """The fastest single-library read of the routed device blobs into a columnar file: fastavro
    decodes each Avro blob (null and deflate codecs) and orjson each line of a JSON-routed blob,
    into one Parquet file (envelope fields and the body bytes, as routed; no template mapping,
    no hashing, no checks). Per blob, DuckDB's avro extension was slower (its per-file set-up:
    13,081 small blobs in 1.8 s against fastavro's 0.44 s), so fastavro is the floor."""
    started = time.perf_counter()
    import fastavro
    import orjson
    import pyarrow as pa
    import pyarrow.parquet as pq

    imported = time.perf_counter()
    schema = pa.schema(
        [
            ("blob", pa.string()),
            ("message", pa.int64()),
            ("enqueued_time", pa.string()),
            ("properties", pa.map_(pa.string(), pa.string())),
            ("system_properties", pa.map_(pa.string(), pa.string())),
            ("body", pa.binary()),
        ]
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    columns: dict[str, list[Any]] = {name: [] for name in schema.names}
    messages = blobs = failed = 0

    def text_map(value: Any) -> list[tuple[str, str]] | None:
        return [(str(k), str(v)) for k, v in value.items()] if isinstance(value, dict) else None

    def add(blob: str, index: int, record: Any) -> None:
        if not isinstance(record, dict):
            return
        body = record.get("Body")
        if isinstance(body, str):
            body = body.encode()
        elif isinstance(body, dict | list):
            body = orjson.dumps(body)
        for name, value in (
            ("blob", blob),
            ("message", index),
            ("enqueued_time", str(record.get("EnqueuedTimeUtc"))),
            ("properties", text_map(record.get("Properties"))),
            ("system_properties", text_map(record.get("SystemProperties"))),
            ("body", body if isinstance(body, bytes) else None),
        ):
            columns[name].append(value)

    with pq.ParquetWriter(out / "device.parquet", schema) as writer:
        for root, _dirs, files in os.walk(input_dir):
            for name in files:
                path = os.path.join(root, name)
                blobs += 1
                try:
                    if name.endswith(".avro"):
                        with open(path, "rb") as handle:
                            for index, record in enumerate(fastavro.reader(handle)):
                                add(path, index, record)
                    elif name.endswith(".json"):
                        with open(path, "rb") as handle:
                            for index, line in enumerate(handle):
                                if line.strip():
                                    add(path, index, orjson.loads(line))
                except Exception:  # a planted malformed blob: counted, not read (a floor, not a reader)
                    failed += 1
                if len(columns["blob"]) >= DEVICE_FLOOR_PART_ROWS:
                    messages += len(columns["blob"])
                    writer.write_table(pa.table(columns, schema=schema))
                    columns = {name: [] for name in schema.names}
        messages += len(columns["blob"])
        writer.write_table(pa.table(columns, schema=schema))
    ended = time.perf_counter()
    return {
        "mode": "device-floor",
        "engine": "fastavro + orjson -> pyarrow Parquet",
        "seconds": round(ended - imported, 3),
        "import_seconds": round(imported - started, 3),
        "blobs": blobs,
        "blobs_failed": failed,
        "messages": messages,
        "bytes_out": (out / "device.parquet").stat().st_size,
    }


def main(argv: list[str]) -> int:
    mode = argv[0]
    if mode == "pipeline":
        import uuid

        result = run_pipeline(str(uuid.uuid4()))
    elif mode == "flow":
        result = run_flow()
    elif mode == "floor":
        result = run_floor(argv[1], argv[2])
    elif mode == "device-floor":
        result = run_device_floor(argv[1], argv[2])
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    result["process_seconds"] = round(time.perf_counter() - PROCESS_START, 3)
    sys.stdout.write("\n" + json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
