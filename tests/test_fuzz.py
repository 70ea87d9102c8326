"""The fuzz suite: malformed inputs of every source mixed into good data.

``test_malformed_inputs_are_each_quarantined_and_the_good_data_loads_as_without_them`` generates at
least 500 malformed inputs from a recorded seed (``FUZZ_SEED``, default below; the seed is in every
failure message): FHIR lines truncated, with a wrong JSON type in every field the pipeline reads,
nested too deep, with invalid or overlong UTF-8, NaN/Infinity, numbers beyond a double, values that
are not resources or not of their file's type; Bundle entries of the wrong shape; zero-byte and
random-byte files under every extension; truncated gzip; broken Avro headers, blocks and codecs
and Avro files of a foreign schema; routed device messages with envelope and body fields of the
wrong type, bodies that are not JSON or nested too deep; REDCap rows with the wrong number of
columns; registry rows with NULLs and wrong types. Beside them: lines with a byte order mark and
resources without an id, which must load. One run reads it all, then:

- the run completes;
- every malformed input is in the quarantine under a named rule at its position (file and line,
  entry, message or record; the registry's by table and key), without its values;
- every good record loads: each silver table loads exactly the rows of a run without the
  malformed inputs, and every table balances;
- a second run reads nothing twice.

The property tests below drive single records of each reader with Hypothesis.
"""

from __future__ import annotations

import gzip
import io
import itertools
import os
import random
import shutil
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import fastavro
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from patient_journey import pipeline
from patient_journey.device_templates import load_templates
from patient_journey.generate import GenerationResult
from patient_journey.generate.writers import AVRO_SCHEMA
from patient_journey.lake import Lake, silver
from patient_journey.settings import JourneySettings
from patient_journey.sources import device, fhir
from patient_journey.sources.plugins import STAGED_BY_NAME
from patient_journey.sources.records import Extraction
from patient_journey.storage import FileInfo
from tests.conftest import settings_for

SEED = int(os.environ.get("FUZZ_SEED", "20261204"))
NOW = datetime(2026, 12, 4, tzinfo=UTC)
CANARY = "CANARY"
TABLE_OF_TYPE = {
    "Patient": "patient",
    "Encounter": "encounter",
    "Procedure": "procedure",
    "Condition": "condition",
    "Observation": "observation",
    "Device": "device",
    "QuestionnaireResponse": "fhir_prom",
}


@dataclass(frozen=True)
class Planted:
    """One malformed input and where the quarantine must name it."""

    kind: str
    where: str  # path inside landing; for the registry, the staged table
    position: int | str | None  # line, entry, message or record (None: the file's own rule decides)
    rules: frozenset[str] | None = None  # the rules it may be named under (None: any named rule)


def _wrong_value(kind: str, rng: random.Random, n: int) -> Any:
    choices: dict[str, list[Any]] = {
        "string": [n, {"x": f"{CANARY}-{n}"}, [f"{CANARY}-{n}"], True],
        "scalar": [{"x": f"{CANARY}-{n}"}, [n], True],
        "number": [f"{CANARY}-{n}", {"v": n}, [n], False],
        "object": [f"{CANARY}-{n}", [n], n],
        "array": [f"{CANARY}-{n}", {"v": n}, n],
    }
    return rng.choice(choices[kind])


def _set(resource: dict[str, Any], path: str, value: Any) -> None:
    """Set a dotted path with ``[0]`` items, creating what is missing on the way."""
    parts = path.replace("[0]", ".[0]").split(".")
    node: Any = resource
    for part, following in itertools.pairwise(parts):
        if part == "[0]":
            if not node:
                node.append([] if following == "[0]" else {})
            node = node[0]
            continue
        if not isinstance(node.get(part), dict | list):
            node[part] = [] if following == "[0]" else {}
        node = node[part]
    last = parts[-1]
    if last == "[0]":
        node[:1] = [value]
    else:
        node[last] = value


class Corpus:
    """Malformed inputs written into a landing zone, and where each must be quarantined."""

    def __init__(self, landing: Path, rng: random.Random) -> None:
        self.landing = landing
        self.rng = rng
        self.planted: list[Planted] = []
        self.n = 0
        self.good_lines = self._good_fhir_lines()

    def _next(self) -> int:
        self.n += 1
        return self.n

    def _good_fhir_lines(self) -> dict[str, list[bytes]]:
        lines: dict[str, list[bytes]] = {}
        for path in sorted((self.landing / "ehr").rglob("*.000.ndjson")):
            resource_type = fhir.resource_type_of_file(path.name)
            if resource_type in TABLE_OF_TYPE:
                lines[resource_type] = [line for line in path.read_bytes().splitlines() if line.strip()]
        return lines

    def write(self, where: str, content: bytes) -> str:
        path = self.landing / where
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        return where

    # ------------------------------------------------------------------ FHIR NDJSON lines

    def fhir_line(self, resource_type: str) -> tuple[bytes, str | frozenset[str] | None]:
        """One malformed line of ``resource_type``'s file, and the rule(s) it must be named under."""
        rng, n = self.rng, self._next()
        good = orjson.loads(rng.choice(self.good_lines[resource_type]))
        good["id"] = f"fuzz-{n}"
        mutation = rng.choice(
            [
                "truncated",
                "field",
                "field",
                "field",
                "deep",
                "utf8",
                "constant",
                "huge",
                "not_resource",
                "other_type",
            ]
        )
        raw = orjson.dumps(good)
        if mutation == "truncated":
            return raw[: rng.randint(1, len(raw) - 2)], frozenset({"json_well_formed", "utf8_valid"})
        if mutation == "field":
            fields = STAGED_BY_NAME[TABLE_OF_TYPE[resource_type]].fields
            options = [*fields, ("id", "string"), ("meta", "object"), ("meta.lastUpdated", "string")]
            path, kind = rng.choice(options)
            _set(good, path, _wrong_value(kind, rng, n))
            return orjson.dumps(good), "fhir_field_type"
        if mutation == "deep":
            depth = rng.randint(1100, 3000)
            return raw[:-1] + b',"extension":' + b"[" * depth + b"]" * depth + b"}", "json_nesting_depth"
        if mutation == "utf8":
            bad = rng.choice([b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xe2\x82", b"\xf8\x88\x80\x80\x80"])
            at = raw.index(b'"id":"') + 6
            return raw[:at] + bad + raw[at:], "utf8_valid"
        if mutation == "constant":
            constant = rng.choice([b"NaN", b"Infinity", b"-Infinity"])
            return raw[:-1] + b',"valueQuantity":{"value":' + constant + b"}}", "json_well_formed"
        if mutation == "huge":
            number = rng.choice([b"1e400", b"-2.5e999", b"1" + b"0" * 400 + b".5"])
            return raw[:-1] + b',"_fuzz":' + number + b"}", "json_number_in_range"
        if mutation == "not_resource":
            return rng.choice(
                [b"[1, 2]", b'"a string"', b"42", b"null", b'{"id": "x"}']
            ), "fhir_resource_type_present"
        other = rng.choice([t for t in TABLE_OF_TYPE if t != resource_type])
        good["resourceType"] = other
        return orjson.dumps(good), "fhir_resource_type_matches_file"

    def fhir_files(self, files: int, lines_per_file: int) -> None:
        for number in range(files):
            resource_type = self.rng.choice(sorted(self.good_lines))
            lines: list[bytes] = []
            rules: list[str | frozenset[str] | None] = []
            for _ in range(lines_per_file):
                line, rule = self.fhir_line(resource_type)
                lines.append(line)
                rules.append(rule)
                if self.rng.random() < 0.2:  # a good line with a byte order mark: it loads
                    lines.append(b"\xef\xbb\xbf" + self.rng.choice(self.good_lines[resource_type]))
                    rules.append(None)
            content = b"\n".join(lines) + b"\n"
            gz = number % 3 == 0
            where = f"ehr/fuzz/{resource_type}.fuzz{number}.ndjson" + (".gz" if gz else "")
            self.write(where, gzip.compress(content, mtime=0) if gz else content)
            for line_number, rule in enumerate(rules, start=1):
                if rule is not None:
                    self._plant("fhir line", where, line_number, rule)

    def _plant(
        self, kind: str, where: str, position: int | str | None, rule: str | frozenset[str] | None
    ) -> None:
        rules = frozenset({rule}) if isinstance(rule, str) else rule
        self.planted.append(Planted(kind, where, position, rules))

    # ------------------------------------------------------------------ Bundles

    def bundles(self, count: int) -> None:
        for number in range(count):
            good = orjson.loads(self.rng.choice(self.good_lines["Observation"]))
            entries: list[Any] = [{"resource": good}]  # a good one, already delivered: superseded
            expected: list[tuple[int, str]] = []
            for _ in range(self.rng.randint(2, 5)):
                n = self._next()
                entry, rule = self.rng.choice(
                    [
                        (f"{CANARY}-{n}", "fhir_field_type"),
                        (
                            {"request": f"{CANARY}-{n}", "resource": {"resourceType": "Patient"}},
                            "fhir_field_type",
                        ),
                        ({"resource": [n]}, "fhir_resource_type_present"),
                        ({"response": {"status": "201"}}, "fhir_bundle_entry_has_resource"),
                        (
                            {"request": {"method": "DELETE", "url": f"{CANARY}-{n}"}},
                            "fhir_delete_names_resource",
                        ),
                        ({"resource": {"resourceType": "Patient", "id": n}}, "fhir_field_type"),
                    ]
                )
                entries.append(entry)
                expected.append((len(entries), rule))
            where = self.write(
                f"ehr/fuzz/bundle-{number}.json",
                orjson.dumps({"resourceType": "Bundle", "type": "collection", "entry": entries}),
            )
            for position, rule in expected:
                self._plant("bundle entry", where, position, rule)

    # ------------------------------------------------------------------ whole files

    def _random_bytes(self, size: int) -> bytes:
        return bytes(self.rng.choice([b for b in range(256) if b != 0x0A]) for _ in range(size))

    def files(self) -> None:
        targets = [
            ("ehr/fuzz/files/Patient.{n}.ndjson", 1, frozenset({"json_well_formed", "utf8_valid"})),
            ("ehr/fuzz/files/Encounter.{n}.ndjson.gz", 0, frozenset({"gzip_readable"})),
            ("ehr/fuzz/files/random-{n}.json", 0, frozenset({"json_well_formed", "utf8_valid"})),
            ("device/fuzz/0/2023/01/01/00/{n}.avro", 0, frozenset({"avro_container_readable"})),
            ("device/fuzz/1/2023/01/01/00/{n}.json", 0, frozenset({"json_well_formed", "utf8_valid"})),
            ("outcomes/redcap/fuzz{n}_records.csv", None, None),
        ]
        for template, position, rules in targets:
            for _ in range(4):
                where = self.write(template.format(n=self._next()), b"")
                self._plant("zero-byte file", where, 0, "input_not_empty")
                where = self.write(
                    template.format(n=self._next()), self._random_bytes(self.rng.randint(8, 300))
                )
                self._plant("random-byte file", where, position, rules)
        good = b"".join(self.rng.choice(self.good_lines["Patient"]) + b"\n" for _ in range(200))
        for _ in range(6):  # truncated gzip: the whole lines before the cut load (superseded)
            compressed = gzip.compress(good, mtime=0)
            where = self.write(
                f"ehr/fuzz/files/Patient.cut{self._next()}.ndjson.gz",
                compressed[: self.rng.randint(20, len(compressed) - 9)],
            )
            self._plant("truncated gzip", where, None, "gzip_readable")

    def avro(self, count: int, messages: list[dict[str, Any]]) -> None:
        for number in range(count):
            buffer = io.BytesIO()
            records = [self._as_avro(self.rng.choice(messages)) for _ in range(8)]
            codec = self.rng.choice(["null", "deflate"])
            fastavro.writer(buffer, fastavro.parse_schema(AVRO_SCHEMA), records, codec=codec, sync_interval=1)
            data = buffer.getvalue()
            damage = number % 4
            where = f"device/fuzz/2/2023/01/01/01/{number:02d}.avro"
            if damage == 0:  # the header
                self.write(where, data[: self.rng.randint(5, 40)])
                self._plant(
                    "avro header", where, 0, frozenset({"avro_container_readable", "avro_block_readable"})
                )
            elif damage == 1:  # a block in the middle: the blocks before it load (superseded)
                cut = len(data) - self.rng.randint(30, len(data) // 3)
                self.write(where, data[:cut] + self._random_bytes(16))
                self._plant("avro block", where, None, frozenset({"avro_block_readable"}))
            elif damage == 2:  # a codec that does not exist
                self.write(
                    where, data.replace(codec.encode(), b"zzzz"[: len(codec)].ljust(len(codec), b"z"), 1)
                )
                self._plant(
                    "avro codec", where, 0, frozenset({"avro_container_readable", "avro_block_readable"})
                )
            else:  # a foreign schema: records without Body
                foreign = io.BytesIO()
                schema = {"type": "record", "name": "X", "fields": [{"name": "reading", "type": "long"}]}
                fastavro.writer(foreign, fastavro.parse_schema(schema), [{"reading": i} for i in range(3)])
                self.write(where, foreign.getvalue())
                for index in range(3):
                    self._plant("avro foreign schema", where, index, "device_body_present")

    @staticmethod
    def _as_avro(message: dict[str, Any]) -> dict[str, Any]:
        return {
            "EnqueuedTimeUtc": message["EnqueuedTimeUtc"],
            "Properties": {k: str(v) for k, v in (message.get("Properties") or {}).items()},
            "SystemProperties": {k: str(v) for k, v in message["SystemProperties"].items()},
            "Body": orjson.dumps(message["Body"]),
        }

    # ------------------------------------------------------------------ device messages

    def device_messages(self, files: int, per_file: int, messages: list[dict[str, Any]]) -> None:
        body_fields = {
            "value": ["string-not-number", "object", "list", "bool"],
            "udiDi": ["number", "object", "list", "bool"],
            "unit": ["number", "object", "list", "bool"],
            "eventType": ["number", "object", "list", "bool"],
            "caseId": ["object", "list", "bool"],
            "firmware": ["object", "list", "bool"],
        }
        for number in range(files):
            lines: list[bytes] = []
            expected: dict[int, str | None] = {}
            kinds: dict[int, str] = {}
            for index in range(per_file):
                n = self._next()
                message = dict(self.rng.choice(messages))
                message["Body"] = {**message["Body"], "caseId": f"FUZZ-{n}"}  # held if it ever loaded
                mutation = self.rng.choice(
                    ["envelope", "envelope", "body", "body", "body", "json", "deep", "shape"]
                )
                if mutation == "envelope":
                    name, rule = self.rng.choice(
                        [
                            ("Properties", "iothub_message_shape"),
                            ("SystemProperties", "iothub_message_shape"),
                            ("EnqueuedTimeUtc", "iothub_field_type"),
                        ]
                    )
                    message[name] = (
                        self.rng.choice([n, [n], True])
                        if name == "EnqueuedTimeUtc"
                        else self.rng.choice([f"{CANARY}", [n], n])
                    )
                    lines.append(orjson.dumps(message))
                    expected[index] = rule
                elif mutation == "body":
                    field = self.rng.choice(sorted(body_fields))
                    kind = self.rng.choice(body_fields[field])
                    value = {
                        "string-not-number": f"{CANARY}-{n}",
                        "number": n,
                        "object": {"v": n},
                        "list": [n],
                        "bool": True,
                    }[kind]
                    message["Body"] = {**message["Body"], field: value}
                    lines.append(orjson.dumps(message))
                    expected[index] = None
                    kinds[index] = f"device body {field} as {kind}"
                elif mutation == "json":
                    lines.append(orjson.dumps(message)[: self.rng.randint(5, 60)])
                    expected[index] = "json_well_formed"
                elif mutation == "deep":
                    depth = self.rng.randint(300, 900)
                    body = b'{"x":' * depth + b"1" + b"}" * depth
                    lines.append(b'{"EnqueuedTimeUtc":"2023-01-01T00:00:00Z","Body":' + body + b"}")
                    expected[index] = "json_nesting_depth"
                else:
                    lines.append(self.rng.choice([b"[1, 2]", b"42", b'"x"']))
                    expected[index] = "iothub_message_shape"
            where = self.write(f"device/fuzz/3/2023/01/01/02/{number:02d}.json", b"\n".join(lines) + b"\n")
            for index, rule in expected.items():
                self._plant(kinds.get(index, "device message"), where, index, rule)

    # ------------------------------------------------------------------ REDCap and the registry

    def redcap(self, rows: int) -> None:
        source = self.landing / "outcomes" / "redcap"
        shutil.copy(source / "prom_dictionary.csv", source / "fuzzrows_dictionary.csv")
        header, first = (source / "prom_records.csv").read_text().splitlines()[:2]
        columns = len(header.split(","))
        lines, expected = [header], []
        for number in range(rows):
            cells = first.split(",")
            cells[0] = f"F{number}"
            if number % 2:
                cells = cells + [f"{CANARY}"] * self.rng.randint(1, 4)
            else:
                cells = cells[: self.rng.randint(1, columns - 1)]
            lines.append(",".join(cells))
            expected.append(len(lines))
        where = self.write("outcomes/redcap/fuzzrows_records.csv", ("\n".join(lines) + "\n").encode())
        for line in expected:
            self._plant("redcap row", where, line, None)

    def registry(self, rows: int) -> None:
        database = sqlite3.connect(self.landing / "outcomes" / "registry.sqlite")
        registry_id, updated = database.execute(
            "SELECT registry_id, updated_at FROM complication LIMIT 1"
        ).fetchone()
        for number in range(rows):
            key = 900_000 + number
            mutation = number % 4
            values: dict[str, Any] = {
                "complication_id": key,
                "registry_id": registry_id,
                "occurred_on": "2023-05-01",
                "description": f"{CANARY} note",
                "code": "433202001",
                "clavien_dindo_grade": 2,
                "updated_at": updated,
            }
            if mutation == 0:
                values["clavien_dindo_grade"] = f"{CANARY}-{number}"
            elif mutation == 1:
                values["occurred_on"] = 20230501
            elif mutation == 2:
                values["occurred_on"] = None
            else:
                values["clavien_dindo_grade"] = self.rng.choice([0, 9, -1])  # outside Clavien-Dindo
            names = ", ".join(values)
            marks = ", ".join("?" for _ in values)
            database.execute(f"INSERT INTO complication ({names}) VALUES ({marks})", list(values.values()))
            self._plant("registry row", "complication", str(key), None)
        database.commit()
        database.close()


def _routed_messages(landing: Path) -> list[dict[str, Any]]:
    messages = []
    for path in sorted((landing / "device").rglob("*.json")):
        messages += [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]
    messages = [m for m in messages if isinstance(m.get("Body"), dict)]  # bodies embedded as JSON
    assert messages
    return messages


def _run(settings: JourneySettings, run_id: str) -> pipeline.BuildReport:
    for source in pipeline.SOURCES:
        pipeline.ingest(settings, source, run_id)
    report = pipeline.build_silver(settings, run_id)
    pipeline.build_gold(settings, run_id)
    return report


def test_malformed_inputs_are_each_quarantined_and_the_good_data_loads_as_without_them(
    generated: GenerationResult, tmp_path: Path
) -> None:
    clean_landing, fuzzed_landing = tmp_path / "clean", tmp_path / "fuzzed"
    shutil.copytree(generated.out / "landing", clean_landing)
    shutil.copytree(generated.out / "landing", fuzzed_landing)
    rng = random.Random(SEED)
    corpus = Corpus(fuzzed_landing, rng)
    messages = _routed_messages(fuzzed_landing)
    corpus.fhir_files(files=12, lines_per_file=25)
    corpus.bundles(12)
    corpus.files()
    corpus.avro(16, messages)
    corpus.device_messages(files=6, per_file=20, messages=messages)
    corpus.redcap(20)
    corpus.registry(12)
    tried = len(corpus.planted)
    seed = f"FUZZ_SEED={SEED}, {tried} malformed inputs"
    assert tried >= 500, seed

    clean, fuzzed = (
        settings_for(tmp_path / name, landing=landing)
        for name, landing in (("c", clean_landing), ("f", fuzzed_landing))
    )
    expected_report = _run(clean, "run-1")
    report = _run(fuzzed, "run-1")  # completes: nothing raised

    quarantine = Lake(fuzzed).read(pipeline.QUARANTINE)
    assert quarantine is not None
    by_place: dict[tuple[str, int], set[str]] = {}
    by_file: dict[str, set[str]] = {}
    by_key: dict[tuple[str, str], set[str]] = {}
    for row in quarantine.to_pylist():
        rules = set((row["rule"] or "").split("; ")) - {""}
        uri = row["source_uri"] or ""
        relative = uri[len(str(fuzzed_landing)) + 1 :] if uri.startswith(str(fuzzed_landing)) else uri
        by_place.setdefault((relative, row["source_offset"]), set()).update(rules)
        by_file.setdefault(relative, set()).update(rules)
        by_key.setdefault((row["table_name"], row["record_id"]), set()).update(rules)
        assert CANARY not in (row["detail"] or ""), (seed, row["rule"], row["detail"])
    missed = []
    for planted in corpus.planted:
        if planted.kind == "registry row":
            found = by_key.get((planted.where, str(planted.position)), set())
        elif planted.position is None:
            found = by_file.get(planted.where, set())
        else:
            found = by_place.get((planted.where, int(planted.position)), set())
        if not found or (planted.rules is not None and not found & planted.rules):
            missed.append((planted, sorted(found)))
    assert missed == [], (
        f"{seed}: {len(missed)} not quarantined as expected: {[(p.kind, f) for p, f in missed]}"
    )

    for table in report.tables:
        assert table.balanced, (seed, table)
    loaded = {t.table: t.loaded for t in report.tables if t.loaded}
    assert loaded == {t.table: t.loaded for t in expected_report.tables if t.loaded}, seed
    for name in ("patient", "encounter", "procedure", "observation", "device_event", "prom_score"):
        ours, theirs = (Lake(s).read(silver(name)) for s in (fuzzed, clean))
        assert ours is not None and theirs is not None
        assert ours.num_rows == theirs.num_rows, (seed, name)

    again = [pipeline.ingest(fuzzed, source, "run-2") for source in pipeline.SOURCES]
    assert [(r.source, r.records, r.rejects) for r in again] == [(s, 0, 0) for s in pipeline.SOURCES], seed
    print(f"fuzz suite: {seed}, every one quarantined at its position")


# ---------------------------------------------------------------------- properties of one record

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
FHIR_FIELDS = ["id", "meta", "subject", "identifier", "entry", "request", "resource", "code", "period"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    resource_type=st.sampled_from(["Patient", "Observation", "Bundle"]),
    fields=st.dictionaries(st.sampled_from(FHIR_FIELDS), JSON_VALUES, max_size=5),
    noise=st.binary(max_size=40),
)
def test_any_ndjson_line_is_one_record_or_a_named_reject_and_never_stops_the_file(
    resource_type: str, fields: dict[str, Any], noise: bytes
) -> None:
    resource = {"resourceType": resource_type, **fields}
    ok = {"resourceType": "Patient", "id": "ok"}
    last = (
        {"resourceType": "Bundle", "entry": [{"resource": ok}]}
        if resource_type == "Bundle"
        else {**ok, "resourceType": resource_type}
    )
    lines = [orjson.dumps(resource), noise.replace(b"\n", b" "), orjson.dumps(last)]
    out = Extraction("fhir", "prop")
    fhir.extract_ndjson(out, FileInfo(f"/l/{resource_type}.000.ndjson", 1, "v", NOW), b"\n".join(lines))
    records, rejects = out.records().to_pylist(), out.rejects().to_pylist()
    assert all(r["rule"] for r in rejects)
    assert any(r["record_id"] == "ok" for r in records)  # the line after it still loads
    if resource_type != "Bundle":
        for line in (1, 2):
            produced = [r for r in records if r["source_offset"] == line] + [
                r for r in rejects if r["source_offset"] == line
            ]
            blank = not lines[line - 1].removeprefix(b"\xef\xbb\xbf").strip()  # a BOM alone is blank
            assert len(produced) == (0 if blank else 1)


def _by_line(data: bytes, url: str) -> Extraction:
    """The reference: every line through ``_read_line``, one by one."""
    out = Extraction("fhir", "prop")
    for number, line in enumerate(data.split(b"\n"), start=1):
        fhir._read_line(out, url, fhir.resource_type_of_file(url), "Observation", number, line)
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lines=st.lists(
        st.one_of(
            st.fixed_dictionaries(
                {"resourceType": st.sampled_from(["Observation", "Patient", 7])},
                optional={"id": JSON_VALUES | st.text(max_size=5), "meta": JSON_VALUES},
            ).map(orjson.dumps),
            st.binary(max_size=30),
            st.sampled_from([b"", b"\r", b"\xef\xbb\xbf{}", b'{"resourceType":"Observation","id":"a"}\r']),
        ),
        max_size=8,
    ),
    chunk=st.integers(min_value=1, max_value=200),
)
def test_the_batched_ndjson_reader_gives_what_the_line_reader_gives(lines: list[bytes], chunk: int) -> None:
    data = b"\n".join(line.replace(b"\n", b" ") for line in lines)
    url = "/l/Observation.000.ndjson"
    out = Extraction("fhir", "prop")
    fhir.stream_ndjson(
        out, FileInfo(url, len(data), "v", NOW), iter(data[i : i + chunk] for i in range(0, len(data), chunk))
    )
    reference = _by_line(data, url)
    assert out.records().drop_columns(["ingested_at"]) == reference.records().drop_columns(["ingested_at"])
    assert out.rejects().to_pylist() == reference.rejects().to_pylist()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    envelope=st.dictionaries(
        st.sampled_from(["EnqueuedTimeUtc", "Properties", "SystemProperties", "Body"]),
        JSON_VALUES,
        max_size=4,
    ),
    body=st.dictionaries(
        st.sampled_from(["deviceType", "serial", "caseId", "value", "timestamp", "eventType"]), JSON_VALUES
    ),
)
def test_any_routed_message_maps_to_records_or_one_named_reject(
    envelope: dict[str, Any], body: dict[str, Any]
) -> None:
    templates = _templates()
    message = (
        {**envelope, "Body": {"deviceType": "tourniquet", **body}} if "Body" not in envelope else envelope
    )
    out = Extraction("device", "prop")
    device.map_blob(out, templates, "/l/device/0/2023/01/01/00/00.json", orjson.dumps(message) + b"\n")
    rejects = out.rejects().to_pylist()
    assert (out.record_count > 0) != (len(rejects) == 1)
    assert all(r["rule"] for r in rejects)


_TEMPLATES: list[Any] = []


def _templates() -> Any:
    if not _TEMPLATES:
        _TEMPLATES.append(load_templates(Path(__file__).resolve().parents[1] / "catalog" / "devices"))
    return _TEMPLATES[0]


@pytest.mark.parametrize("size", [0, 1, 7, 64])
def test_random_bytes_under_every_extension_never_raise(size: int) -> None:
    rng = random.Random(SEED + size)
    data = bytes(rng.randrange(256) for _ in range(size))
    for name in ("Patient.000.ndjson", "Patient.000.ndjson.gz", "b.json"):
        out = Extraction("fhir", "prop")
        info = FileInfo(f"/l/{name}", size, "v", NOW)
        if name.endswith((".ndjson", ".gz")):
            fhir.extract_ndjson(out, info, data)
        else:
            fhir.extract_bundle_or_resource(out, info, data)
        assert out.record_count == 0
    for name in ("a.avro", "a.json"):
        out = Extraction("device", "prop")
        device.map_blob(out, _templates(), f"/l/device/{name}", data)
        assert out.record_count == 0
