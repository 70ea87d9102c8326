"""A source's batches are read in parallel and put aside; one commit per table appends them."""

from __future__ import annotations

import gzip
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pytest

from patient_journey import pipeline
from patient_journey.errors import StorageError
from patient_journey.generate import GenerationResult
from patient_journey.lake import Lake, TableRef, bronze
from patient_journey.pipeline import SPILL_PREFIX, extraction_rejects_table, ledger_table
from patient_journey.settings import JourneySettings
from patient_journey.sources import records
from patient_journey.storage import Storage
from tests.conftest import settings_for


def test_batches_read_apart_and_commit_once_as_one_step_would(
    generated: GenerationResult, tmp_path: Path
) -> None:
    landing = generated.out / "landing"
    batched = settings_for(tmp_path / "batched", landing=landing)
    lake = Lake(batched)
    restricted = tmp_path / "batched" / "restricted"
    crashed = restricted / SPILL_PREFIX / "device" / "a-crashed-run" / "000001-bronze.arrow"
    crashed.parent.mkdir(parents=True)
    crashed.write_bytes(b"left by a run that crashed before its commit")

    plan = pipeline.plan_ingest(batched, "device", batch_files=40)
    assert len(plan.batches) > 3
    with ThreadPoolExecutor(4) as pool:
        parts = list(pool.map(lambda b: pipeline.extract_batch(batched, b, "run-1"), plan.batches))
    assert lake.version(bronze("device_message")) is None  # reading wrote no Delta table
    assert all(p.spilled and Path(p.spilled[0]).is_file() for p in parts)

    report = pipeline.commit_ingest(batched, "device", parts, plan.pending_inputs)
    assert report.records == sum(p.records for p in parts) > 0
    assert report.new_inputs == plan.inputs and report.rejects > 0  # the generator plants bad blobs
    assert report.started == min(p.started for p in parts) and report.seconds >= max(p.seconds for p in parts)
    for table in (bronze("device_message"), extraction_rejects_table("device"), ledger_table("device")):
        assert lake.version(table) == 0  # one commit for all batches
    assert not (restricted / SPILL_PREFIX).exists()  # put-aside rows gone, the crashed run's too

    whole = settings_for(tmp_path / "whole", landing=landing)
    one_step = pipeline.ingest(whole, "device", "run-1")
    assert (one_step.records, one_step.rejects, one_step.new_inputs) == (
        report.records,
        report.rejects,
        report.new_inputs,
    )
    columns = ["record_id", "source_uri", "source_offset", "content_hash"]
    ours, theirs = (Lake(s).read(bronze("device_message"), columns) for s in (batched, whole))
    assert ours is not None and theirs is not None
    assert ours.sort_by([(c, "ascending") for c in columns]).equals(
        theirs.sort_by([(c, "ascending") for c in columns])
    )
    assert pipeline.plan_ingest(batched, "device", batch_files=40).batches == ()  # the ledger has them all


def test_a_plan_reads_only_what_the_ledger_lacks(generated: GenerationResult, tmp_path: Path) -> None:
    """The plan compares the listing with the whole ledger in Arrow; a batch carries the ledger
    facts of its own files: a file touched with the same bytes is recorded, a changed one read."""
    landing = tmp_path / "landing"
    shutil.copytree(generated.out / "landing" / "device", landing / "device")
    settings = settings_for(tmp_path / "zones", landing=landing)
    first = pipeline.ingest(settings, "device", "run-1")
    assert first.new_inputs > 2 and pipeline.plan_ingest(settings, "device", batch_files=40).batches == ()

    # Two blobs of the latest IoT Hub minutes, which a run lists ({YYYY}/{MM}/{DD}/{HH}/{mm}).
    blobs = sorted(
        (p for p in landing.rglob("*.json") if p.stat().st_size),
        key=lambda b: (*b.parent.parts[-4:], b.stem, str(b)),
    )
    touched, changed = blobs[-1], blobs[-2]
    later = touched.stat().st_mtime_ns + 5_000_000_000
    os.utime(touched, ns=(later, later))
    changed.write_bytes(changed.read_bytes() + changed.read_bytes())  # every message twice

    plan = pipeline.plan_ingest(settings, "device", batch_files=1)
    assert sorted(b.inputs[0] for b in plan.batches) == sorted([str(touched), str(changed)])
    by_file = {b.inputs[0]: b for b in plan.batches}
    assert all(len(b.ledger_versions) == len(b.ledger_hashes) == 1 for b in plan.batches)
    parts = [pipeline.extract_batch(settings, b, "run-2") for b in plan.batches]
    report = pipeline.commit_ingest(settings, "device", parts, plan.pending_inputs)
    assert (report.new_inputs, report.changed_inputs) == (2, 1)
    touched_part = next(p for b, p in zip(plan.batches, parts, strict=True) if b is by_file[str(touched)])
    assert (touched_part.new_inputs, touched_part.records, touched_part.rejects) == (1, 0, 0)
    assert report.records > 0 and pipeline.plan_ingest(settings, "device", batch_files=40).batches == ()


def test_batches_are_bounded_by_bytes_as_well_as_files(generated: GenerationResult, tmp_path: Path) -> None:
    settings = settings_for(tmp_path, landing=generated.out / "landing")
    by_files = pipeline.plan_ingest(settings, "fhir", batch_files=10_000)
    files = [f for b in by_files.batches for f in b.files]
    largest = max(f.size for f in files)
    bound = largest // 2  # some files are above it: each of those is a batch of its own
    plan = pipeline.plan_ingest(settings, "fhir", batch_files=10_000, batch_bytes=bound)
    assert len(by_files.batches) == 1 and len(plan.batches) > 2
    assert [f for b in plan.batches for f in b.files] == files  # the same files, in listing order
    for batch in plan.batches:
        assert len(batch.files) == 1 or sum(f.size for f in batch.files) <= bound
    assert any(len(b.files) == 1 and b.files[0].size > bound for b in plan.batches)
    assert [b.number for b in plan.batches] == list(range(1, len(plan.batches) + 1))
    assert {b.of for b in plan.batches} == {len(plan.batches)}


@pytest.mark.parametrize("step", ["rejects", "ledger"])
def test_a_run_that_crashed_at_any_step_of_its_commit_leaves_bronze_exactly_once(
    generated: GenerationResult, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    """Bronze, then rejects, then the ledger: a crash before the ledger write (at the rejects or
    at the ledger) leaves rows of a run the ledger does not name. The next run removes them
    before it appends the inputs it reads again, so bronze and the rejects hold every record
    once, as if the crashed run had never happened, and the warehouse is the same."""
    landing = generated.out / "landing"
    once, crashed = (settings_for(tmp_path / name, landing=landing) for name in ("once", "crashed"))
    for source in pipeline.SOURCES:
        pipeline.ingest(once, source, "run-1")

    stops = {
        (ledger_table(source) if step == "ledger" else extraction_rejects_table(source))
        for source in pipeline.SOURCES
    }
    append = Lake.append
    crashes = []

    def crash_at(lake: Lake, ref: TableRef, data: pa.Table | pa.RecordBatchReader) -> int:
        if ref in stops:
            crashes.append(ref)
            raise RuntimeError("the run's process died here")
        return append(lake, ref, data)

    with monkeypatch.context() as patched:
        patched.setattr(Lake, "append", crash_at)
        for source in pipeline.SOURCES:
            try:
                pipeline.ingest(crashed, source, "run-crashed")
            except RuntimeError:
                continue
    assert crashes  # some source's commit died at that step, after its bronze append
    for source in pipeline.SOURCES:
        pipeline.ingest(crashed, source, "run-1")  # read again: no ledger entry says otherwise

    def kept(settings: JourneySettings, ref: TableRef) -> list[tuple[object, ...]]:
        table = Lake(settings).read(ref)
        assert table is not None
        names = [n for n in table.column_names if n not in ("run_id", "ingested_at")]
        return sorted(tuple(row.values()) for row in table.select(names).to_pylist())

    for source in pipeline.SOURCES:
        for ref in (bronze(pipeline.BRONZE_TABLES[source]), extraction_rejects_table(source)):
            if Lake(once).read(ref) is not None:
                assert kept(crashed, ref) == kept(once, ref), ref
    built = {name: pipeline.build_silver(s, "build") for name, s in (("once", once), ("crashed", crashed))}
    assert all(t.balanced for report in built.values() for t in report.tables)

    def outcome(report: pipeline.BuildReport) -> dict[str, tuple[int, int, int, int]]:
        return {t.table: (t.read, t.loaded, t.quarantined, t.held) for t in report.tables}

    assert outcome(built["crashed"]) == outcome(built["once"])


def test_a_commit_retried_after_its_clean_up_failed_part_way_appends_nothing_twice(
    generated: GenerationResult, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_for(tmp_path, landing=generated.out / "landing")
    plan = pipeline.plan_ingest(settings, "device", batch_files=40)
    parts = [pipeline.extract_batch(settings, b, "run-1") for b in plan.batches]
    assert len(parts) > 2
    delete = Storage.delete
    deleted: list[str] = []

    def fail_after_the_first(store: Storage, path: str) -> None:
        if deleted:
            raise StorageError("the storage service timed out", transient=True)
        deleted.append(path)
        delete(store, path)

    with monkeypatch.context() as patched:
        patched.setattr(Storage, "delete", fail_after_the_first)
        with pytest.raises(StorageError):
            pipeline.commit_ingest(settings, "device", parts, plan.pending_inputs)
    assert len(deleted) == 1  # one spill file gone, the others still there

    retried = pipeline.commit_ingest(settings, "device", parts, plan.pending_inputs)  # the task's retry
    lake = Lake(settings)
    for table in (bronze("device_message"), extraction_rejects_table("device"), ledger_table("device")):
        assert lake.version(table) == 0, table.label  # appended once, by the first attempt
    assert retried.records == sum(p.records for p in parts) and retried.bronze_version == 0
    assert not (tmp_path / "restricted" / SPILL_PREFIX / "device").exists()


def test_prefect_sees_a_planned_batch_as_a_few_leaves(generated: GenerationResult, tmp_path: Path) -> None:
    """Prefect walks every task parameter for futures, in the flow and in the worker: a batch's
    thousands of files must not be nodes of that walk."""
    from prefect.utilities.collections import visit_collection

    settings = settings_for(tmp_path, landing=generated.out / "landing")
    [batch] = pipeline.plan_ingest(settings, "device", batch_files=10_000).batches
    assert len(batch.files) > 100
    visited: list[object] = []
    visit_collection({"batch": batch}, visit_fn=visited.append, return_data=False, max_depth=-1)
    assert len(visited) < 15


def test_reprocess_of_inputs_no_longer_landed_keeps_what_they_loaded(
    generated: GenerationResult, tmp_path: Path
) -> None:
    """`journey reprocess` invalidates ledger entries instead of deleting them, so their runs stay
    committed: bronze rows of a run with no ledger entry would be taken for a crashed commit's."""
    landing = tmp_path / "landing"
    shutil.copytree(generated.out / "landing", landing)
    settings = settings_for(tmp_path, landing=landing)
    pipeline.ingest(settings, "fhir", "run-1")
    before = Lake(settings).read(bronze("fhir_resource"), ["record_id"])
    assert before is not None and before.num_rows > 0
    assert pipeline.forget_inputs(settings, "fhir") > 0
    shutil.rmtree(landing / "ehr" / "bundles")  # archived meanwhile: these inputs are not read again
    again = pipeline.ingest(settings, "fhir", "run-2")
    assert again.records > 0 and again.changed_inputs == 0  # the others are read again, as new
    after = Lake(settings).read(bronze("fhir_resource"), ["record_id", "run_id"])
    assert after is not None
    kept = [r for r in after.to_pylist() if r["run_id"] == "run-1"]
    assert len(kept) == before.num_rows  # nothing the first run loaded was removed
    assert pipeline.forget_inputs(settings, "fhir") > 0  # and forgetting again works


def _bronze_and_rejects(
    settings: JourneySettings,
) -> tuple[list[tuple[object, ...]], list[tuple[object, ...]]]:
    lake = Lake(settings)
    bronze_rows = lake.read(
        bronze("fhir_resource"), ["record_id", "payload", "source_offset", "content_hash"]
    )
    rejects = lake.read(extraction_rejects_table("fhir"), ["source_offset", "rule", "detail"])
    assert bronze_rows is not None and rejects is not None
    return sorted(tuple(r.values()) for r in bronze_rows.to_pylist()), sorted(
        tuple(r.values()) for r in rejects.to_pylist()
    )


def test_a_file_larger_than_the_stream_bound_is_read_in_chunks_as_if_whole(
    generated: GenerationResult, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lines = (
        generated.out / "landing" / "ehr" / "fhir-export-20250301T000000Z" / "Observation.000.ndjson"
    ).read_bytes()
    body = lines.splitlines()[:400]
    body[17] = body[17][:40]  # a cut line
    body[250] = b"\xef\xbb\xbf" + body[250]  # a byte order mark
    content = b"\n".join(body) + b"\n"
    landing = tmp_path / "landing" / "ehr"
    landing.mkdir(parents=True)
    (landing / "Observation.000.ndjson").write_bytes(content)
    (landing / "Observation.001.ndjson.gz").write_bytes(gzip.compress(content, mtime=0) * 2)  # two members
    (landing / "Observation.002.ndjson.gz").write_bytes(gzip.compress(content, mtime=0)[:-5000])  # cut short
    whole, streamed = (
        settings_for(tmp_path / name, landing=tmp_path / "landing") for name in ("whole", "streamed")
    )

    def load(settings: JourneySettings) -> None:
        plan = pipeline.plan_ingest(settings, "fhir", batch_files=10)
        parts = [pipeline.extract_batch(settings, b, "run-1") for b in plan.batches]
        pipeline.commit_ingest(settings, "fhir", parts)

    load(whole)
    monkeypatch.setattr(records, "STREAM_BYTES", 1_000)
    monkeypatch.setattr(records, "STREAM_CHUNK_BYTES", 777)  # lines and gzip members cut across chunks
    monkeypatch.setattr(records, "FLUSH_ROWS", 64)  # and the bronze rows put aside in parts,
    monkeypatch.setattr(pipeline, "BRONZE_APPEND_BYTES", 100_000)  # committed in several appends
    written: list[str] = []
    write = Storage.write_bytes
    monkeypatch.setattr(
        Storage, "write_bytes", lambda store, path, data: (written.append(path), write(store, path, data))[1]
    )
    load(streamed)
    assert sum(path.endswith("-bronze.arrow") for path in written) > 10
    assert (Lake(streamed).version(bronze("fhir_resource")) or 0) > 1  # several appends before the ledger's
    assert _bronze_and_rejects(streamed) == _bronze_and_rejects(whole)
    _, rejects = _bronze_and_rejects(streamed)
    assert {rule for _, rule, _ in rejects} == {"json_well_formed", "gzip_readable"}
    ledgers = [
        Lake(s).read(ledger_table("fhir"), ["uri", "content_hash", "records"]) for s in (whole, streamed)
    ]
    assert ledgers[0] is not None and ledgers[1] is not None
    assert sorted(ledgers[0].to_pylist(), key=str) == sorted(ledgers[1].to_pylist(), key=str)  # same hashes
    again = pipeline.ingest(streamed, "fhir", "run-2")
    assert (again.records, again.rejects) == (0, 0)
