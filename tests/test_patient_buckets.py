"""Silver and gold are laid out by patient bucket, so a build touches only its patients' buckets.

The Delta writer derives ``patient_bucket`` from ``patient_key`` (its first four hex digits
modulo JOURNEY_STORAGE__PATIENT_BUCKETS, -1 without a key) and partitions every table with a
patient key by it; a read of some buckets reads their partitions alone, and deleting patients'
rows deletes within their buckets. Another bucket count rebuilds the warehouse whole.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from deltalake import DeltaTable

from patient_journey import pipeline
from patient_journey.contracts import contract_of
from patient_journey.generate import GenerationResult
from patient_journey.lake import Lake, gold, patient_buckets, silver
from tests.conftest import settings_for


def test_a_bucket_is_the_keys_first_four_hex_digits_modulo_the_count() -> None:
    keys = pa.array(["00ff" + "0" * 60, "ffff" + "1" * 60, None, "not hex at all", "0020" + "2" * 60])
    # 0x00ff = 255, 0xffff = 65535, 0x0020 = 32
    assert patient_buckets(keys, 32).to_pylist() == [255 % 32, 65535 % 32, -1, -1, 0]
    assert patient_buckets(keys, 1).to_pylist() == [0, 0, -1, -1, 0]
    assert patient_buckets(pa.chunked_array([keys[:2], keys[2:]]), 7).to_pylist() == [
        255 % 7,
        65535 % 7,
        -1,
        -1,
        32 % 7,
    ]


def _readmissions(patients: list[str | None]) -> pa.Table:
    contract = contract_of("silver", "readmission")
    assert contract is not None
    names = [c for c in contract.schema.names if c != "patient_bucket"]
    rows = {name: pa.nulls(len(patients), contract.schema.field(name).type) for name in names}
    rows["patient_key"] = pa.array(patients, pa.string())
    rows["source_offset"] = pa.array(range(len(patients)), pa.int64())
    return pa.table([rows[name] for name in names], names=names)


def test_the_writer_partitions_by_bucket_and_reads_and_deletes_within_buckets(tmp_path: Path) -> None:
    lake = Lake(settings_for(tmp_path))
    patients = [f"{n:04x}" + "a" * 60 for n in range(0, 200, 7)] + [None]
    lake.overwrite(silver("readmission"), _readmissions(patients))
    ref = silver("readmission")
    assert DeltaTable(lake.uri(ref)).metadata().partition_columns == ["patient_bucket"]
    stored = lake.read(ref)
    assert stored is not None
    assert (
        stored.column("patient_bucket").to_pylist()
        == lake.buckets_of(stored.column("patient_key")).to_pylist()
    )

    wanted = {int(patients[3][:4], 16) % lake.bucket_count, -1}
    some = lake.read(ref, buckets=wanted)
    assert some is not None and set(some.column("patient_bucket").to_pylist()) == wanted
    expected = sum(1 for p in patients if (-1 if p is None else int(p[:4], 16) % lake.bucket_count) in wanted)
    assert some.num_rows == expected
    none = lake.read(ref, buckets=set())
    assert none is not None and none.num_rows == 0

    assert lake.delete_keys(ref, "patient_key", {patients[3], None}) == 2
    left = lake.read(ref)
    assert left is not None and left.num_rows == len(patients) - 2
    assert patients[3] not in left.column("patient_key").to_pylist()
    assert pc.sum(pc.is_null(left.column("patient_key"))).as_py() == 0


def test_another_bucket_count_rebuilds_the_warehouse_whole(
    generated: GenerationResult, tmp_path: Path
) -> None:
    landing = tmp_path / "landing"
    shutil.copytree(generated.out / "landing", landing)
    blobs = sorted(p for p in (landing / "device").rglob("*") if p.is_file())
    newest = max(blobs, key=lambda b: (*b.parent.parts[-4:], b.stem, str(b)))  # {YYYY}/{MM}/{DD}/{HH}/{mm}
    later = newest.read_bytes()
    newest.unlink()
    settings = settings_for(tmp_path / "root", landing=landing)
    for source in pipeline.SOURCES:
        pipeline.ingest(settings, source, "run-1")
    pipeline.build_silver(settings, "run-1")
    pipeline.build_gold(settings, "run-1")
    before = Lake(settings).read(gold("journey_event"))
    assert before is not None and before.num_rows > 0

    newest.write_bytes(later)  # a new blob, and another bucket count
    fewer = settings.model_copy(
        update={"storage": settings.storage.model_copy(update={"patient_buckets": 3})}
    )
    assert pipeline.ingest(fewer, "device", "run-2").new_inputs == 1
    report = pipeline.build_silver(fewer, "run-2")
    assert report.built and set(report.replaced.values()) == {"whole"}
    pipeline.build_gold(fewer, "run-2")
    after = Lake(fewer).read(gold("journey_event"))
    assert after is not None
    assert set(after.column("patient_bucket").to_pylist()) <= {0, 1, 2}
    assert after.num_rows >= before.num_rows
    for name in ("journey_event", "surgical_episode"):
        table = Lake(fewer).read(gold(name))
        assert table is not None
        assert (
            table.column("patient_bucket").to_pylist()
            == patient_buckets(table.column("patient_key"), 3).to_pylist()
        )


def test_a_tables_row_count_comes_from_its_log_and_matches_its_rows(tmp_path: Path) -> None:
    lake = Lake(settings_for(tmp_path))
    ref = silver("readmission")
    assert lake.row_count(ref) is None
    patients = [f"{n:04x}" + "b" * 60 for n in range(40)]
    lake.overwrite(ref, _readmissions(patients))
    lake.append(ref, _readmissions(patients[:5]))
    lake.delete_keys(ref, "patient_key", {patients[0]})
    stored = lake.read(ref)
    assert stored is not None and lake.row_count(ref) == stored.num_rows == 40 + 5 - 2


def _rows(table: pa.Table) -> list[str]:
    return sorted(json.dumps(row, sort_keys=True, default=str) for row in table.to_pylist())


def test_gold_of_every_patient_built_bucket_by_bucket_equals_gold_built_at_once(
    generated: GenerationResult, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_for(tmp_path / "root", landing=generated.out / "landing")
    for source in pipeline.SOURCES:
        pipeline.ingest(settings, source, "run-1")
    pipeline.build_silver(settings, "run-1")
    at_once = pipeline.build_gold(settings, "run-1")
    lake = Lake(settings)
    assert pipeline._bucket_units(lake, lake.bucket_count) == [None]  # small: one unit
    refs = [*(gold(name) for name in pipeline.GOLD_TABLES), pipeline.GOLD_QUARANTINE]
    tables = {ref: lake.read(ref) for ref in refs}

    monkeypatch.setattr(pipeline, "GOLD_UNIT_ROWS", 1)  # one bucket per unit
    units = pipeline._bucket_units(lake, lake.bucket_count)
    assert len(units) == lake.bucket_count and -1 in (units[0] or set())
    pipeline._gold_pending(lake, None)  # every patient again
    in_units = pipeline.build_gold(settings, "run-1")
    assert in_units.patients == "all"
    for ref, table in tables.items():
        again = lake.read(ref)
        assert table is not None and again is not None
        assert table.num_rows > 0 or ref == pipeline.GOLD_QUARANTINE
        assert _rows(again) == _rows(table), ref.label
    # The gate's outcomes, counted unit by unit, add up to the outcomes of the whole tables.
    assert in_units.expectations == at_once.expectations
    assert [asdict(t) for t in in_units.tables] == [asdict(t) for t in at_once.tables]
