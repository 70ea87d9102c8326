"""A source's batches are read in parallel and put aside; one commit per table appends them."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from patient_journey import pipeline
from patient_journey.generate import GenerationResult
from patient_journey.lake import Lake, bronze
from patient_journey.pipeline import SPILL_PREFIX, extraction_rejects_table, ledger_table
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
