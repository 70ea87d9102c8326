"""Compare the warehouse two versions of the code build from the same input, table by table.

    # the landing zone, once
    journey generate --out /tmp/sgen --patients 5200 --seed 20261204
    # each version builds with its own code first on the path (a git worktree for the old one)
    PYTHONPATH=<checkout> python -m bench.warehouse_diff build /tmp/s-new /tmp/sgen/landing
    python -m bench.warehouse_diff compare /tmp/s-old /tmp/s-new [--ignore source_uri,input_key]

``build`` runs ingest, build_silver and build_gold in process and writes every silver and gold
table's rows (run ids aside) sorted as JSON lines; ``compare`` prints, per table, the rows of each,
the columns only one has, and whether the rows are equal once the ignored columns are left out.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections import Counter
from pathlib import Path

import orjson


def build(out: Path, landing: Path) -> None:
    from bench.increment_profile import settings_for
    from patient_journey import pipeline
    from patient_journey.lake import Lake, Zone

    shutil.rmtree(out, ignore_errors=True)
    settings = settings_for(out, landing)  # the bench's embedded settings, zones under ``out``
    for source in pipeline.SOURCES:
        pipeline.ingest(settings, source, "diff")
    pipeline.build_silver(settings, "diff")
    pipeline.build_gold(settings, "diff")
    lake = Lake(settings)
    for layer in ("silver", "gold"):
        for ref in lake.tables(Zone.WAREHOUSE, layer):
            table = lake.read(ref)
            assert table is not None
            rows = sorted(
                orjson.dumps(
                    {k: v for k, v in r.items() if k != "run_id"}, default=str, option=orjson.OPT_SORT_KEYS
                ).decode()
                for r in table.to_pylist()
            )
            (out / f"{layer}.{ref.name}.jsonl").write_text("\n".join(rows))


def compare(old: Path, new: Path, ignore: set[str]) -> None:
    for name in sorted({p.name for p in old.glob("*.jsonl")} | {p.name for p in new.glob("*.jsonl")}):
        sides = [
            [json.loads(x) for x in (d / name).read_text().splitlines()] if (d / name).exists() else None
            for d in (old, new)
        ]
        if sides[0] is None or sides[1] is None:
            print(f"{name}: only in {'new' if sides[0] is None else 'old'}")
            continue
        a, b = sides[0], sides[1]
        columns = [set(rows[0]) if rows else set() for rows in (a, b)]

        def rows_of(rows: list[dict[str, object]]) -> Counter[str]:
            return Counter(
                json.dumps({k: v for k, v in r.items() if k not in ignore}, sort_keys=True) for r in rows
            )

        print(
            f"{name}: rows {len(a)} -> {len(b)}; only old {sorted(columns[0] - columns[1])}, only new "
            f"{sorted(columns[1] - columns[0])}; equal without {sorted(ignore)}: {rows_of(a) == rows_of(b)}"
        )


def main(argv: list[str]) -> int:
    if argv[:1] == ["build"] and len(argv) == 3:
        build(Path(argv[1]), Path(argv[2]))
        return 0
    if argv[:1] == ["compare"] and len(argv) in (3, 5):
        ignore = set(argv[4].split(",")) if len(argv) == 5 and argv[3] == "--ignore" else set()
        compare(Path(argv[1]), Path(argv[2]), ignore)
        return 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
