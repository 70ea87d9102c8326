"""The analysts' tables, each declared once: grain, key, typed columns and what they mean.

From these declarations come the check before every write of a warehouse table (``Lake`` refuses
a table whose columns or types are not the declared ones, naming the table and the columns that
differ), the column tables of docs/warehouse.md (``render_markdown``; a test keeps the page equal
to it) and ``journey tables``. A table's SQL (linkage's projections, the journey's SQL) must give
exactly its declared columns; changing a column is changing its declaration here.

Columns are written ``name type  description``, one a line; types are Arrow's: ``string``,
``int32``, ``int64``, ``double``, ``bool``, ``date``, ``timestamp`` (microseconds, UTC) and
``list<string>``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import pyarrow as pa

from patient_journey.errors import JourneyError

TYPES: dict[str, pa.DataType] = {
    "string": pa.string(),
    "int32": pa.int32(),
    "int64": pa.int64(),
    "double": pa.float64(),
    "bool": pa.bool_(),
    "date": pa.date32(),
    "timestamp": pa.timestamp("us", tz="UTC"),
    "list<string>": pa.list_(pa.string()),
}


class ContractError(JourneyError):
    """A table does not have the columns its declaration names (raised before it is written)."""


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    description: str

    @property
    def arrow_type(self) -> pa.DataType:
        return TYPES[self.type]


@dataclass(frozen=True)
class TableContract:
    layer: str
    name: str
    grain: str
    key: tuple[str, ...]
    columns: tuple[Column, ...]

    @property
    def label(self) -> str:
        return f"{self.layer}.{self.name}"

    @property
    def schema(self) -> pa.Schema:
        return pa.schema([(c.name, c.arrow_type) for c in self.columns])

    @property
    def bucketed(self) -> bool:
        """Whether the table is partitioned by patient bucket (it has a patient key)."""
        return any(c.name == BUCKET for c in self.columns)

    def check(self, table: pa.Table | pa.Schema) -> None:
        """Raise ContractError unless ``table`` has exactly the declared columns, in order, of the
        declared types; the message names the table and each column that differs."""
        actual = table if isinstance(table, pa.Schema) else table.schema
        declared = self.schema
        if actual.names == declared.names and all(
            a.type.equals(d.type) for a, d in zip(actual, declared, strict=True)
        ):
            return
        problems = [f"missing {name}" for name in declared.names if name not in actual.names]
        problems += [f"undeclared {name}" for name in actual.names if name not in declared.names]
        problems += [
            f"{field.name} is {actual.field(field.name).type}, declared {field.type}"
            for field in declared
            if field.name in actual.names and not actual.field(field.name).type.equals(field.type)
        ]
        if not problems:
            problems = [
                f"columns in the order {', '.join(actual.names)}, declared {', '.join(declared.names)}"
            ]
        raise ContractError(
            f"Table {self.label} does not match its declared columns (`journey tables` shows them): "
            f"{'; '.join(problems)}. Nothing was written."
        )


def _columns(text: str) -> tuple[Column, ...]:
    columns = []
    for line in text.splitlines():
        if not line.strip():
            continue
        name, kind, *words = line.split()
        if kind not in TYPES:
            raise ValueError(f"column {name}: unknown type {kind!r}")
        columns.append(Column(name, kind, " ".join(words)))
    return tuple(columns)


LINEAGE = """
input_key string  lineage: an opaque key of the input (a keyed hash of its URI; `journey lineage` names it, restricted)
source_offset int64  lineage: the line, Bundle entry or Avro record in the input; a registry row's key
"""
RUN = "run_id string  the run that read the record\n"
# The layout column of every silver and gold table with a patient key: the tables are partitioned
# by it. The Delta writer derives it from patient_key (``patient_journey.lake.patient_buckets``);
# no SQL names it.
BUCKET = "patient_bucket"
LAYOUT = (
    f"{BUCKET} int32  layout: the patient's bucket (patient_key's first four hex digits modulo "
    "JOURNEY_STORAGE__PATIENT_BUCKETS; -1 without a patient); the table is partitioned by it\n"
)


def _table(layer: str, name: str, grain: str, key: tuple[str, ...], columns: str) -> TableContract:
    declared = _columns(columns)
    if any(column.name == "patient_key" for column in declared):
        declared += _columns(LAYOUT)
    return TableContract(layer, name, grain, key, declared)


def silver_contract(name: str, grain: str, key: tuple[str, ...], columns: str) -> TableContract:
    """A silver table: its own columns, then lineage and the run that read it."""
    return _table("silver", name, grain, key, columns + LINEAGE + RUN)


# The gold tables and the silver tables more than one source feeds. A silver table that one source
# alone feeds is declared by that source (``Source.silver``, beside its staged tables and links).
CONTRACTS: tuple[TableContract, ...] = (
    _table(
        "gold",
        "surgical_episode",
        "one row per index procedure: a patient's first total knee (SNOMED CT 609588000) or total hip "
        "(52734007) replacement",
        ("episode_key",),
        """
episode_key string  pseudonymous key of the surgical case (HMAC of the OR case id)
patient_key string  pseudonymous key of the patient (HMAC of the MRN)
joint string  knee or hip
procedure_code string  the Procedure's SNOMED CT code
procedure_display string  the code's display
robotic_assisted bool  a robotic-arm device reported telemetry for the case
admission_time timestamp  start of the Procedure's encounter
discharge_time timestamp  end of the Procedure's encounter
surgery_start timestamp  Procedure.performedPeriod.start
surgery_end timestamp  Procedure.performedPeriod.end
or_minutes double  latest device session_stop - earliest session_start within the procedure window, minutes, 1 decimal (half up)
devices_used list<string>  sorted UDI-DIs of the devices that sent telemetry for the case within the procedure window
length_of_stay_days int64  discharge date - admission date (UTC calendar days)
complication_30d bool  a complication 0-30 days after the surgery date (registry, or an EHR Condition in catalog/complications.csv)
complication_90d bool  a complication 0-90 days after the surgery date
max_complication_grade_90d int32  highest Clavien-Dindo grade within 90 days (registry only; null if none)
readmission_30d bool  an inpatient admission 0-30 days after discharge, other than the index admission, as any source reports one (EHR inpatient encounters, registry readmissions, an admission feed's inpatient admissions: docs/sources.md)
readmission_90d bool  the same, 0-90 days after discharge
complications_90d int64  complications 0-90 days after surgery; one reported by the registry and the EHR (same code, same day) counts once
readmissions_90d int64  readmissions 0-90 days after discharge; one that more than one source reports (same admission date) counts once
prom_instrument string  KOOS JR / HOOS JR
prom_source string  registry, redcap or fhir
prom_baseline double  interval score (0-100) at baseline, null when missing
prom_6w double  at 6 weeks
prom_6m double  at 6 months
prom_12m double  at 12 months
prom_change_6w double  change from baseline (follow-up - baseline) at 6 weeks
prom_change_6m double  at 6 months
prom_change_12m double  at 12 months
prom_mcid_6w bool  the change reached the instrument's MCID in its better direction (null without a change or an MCID)
prom_mcid_6m bool  at 6 months
prom_mcid_12m bool  at 12 months
device_events int64  device measurements of the case within the procedure, widened by the skew tolerance
"""
        + LINEAGE,
    ),
    _table(
        "gold",
        "journey_event",
        "one row per event per patient, as each source reports them (docs/sources.md): encounters, procedures, "
        "conditions, observations, device events, PROM scores, registry complications and readmissions, an "
        "admission feed's admissions, transfers and discharges (an admission the EHR export holds too is its "
        "encounter event: counted once)",
        (),
        """
patient_key string  the patient
episode_key string  the patient's index episode (null if none)
event_time timestamp  when it happened (UTC; date-only sources at midnight)
phase string  pre (before surgery_start), intra (to surgery_end), post; null without an index procedure
source string  the source that reported it: its plug-in's name (fhir, device, registry, redcap, ...)
event_type string  encounter, procedure, condition, observation, device:<eventType>, prom, complication, readmission, admission, transfer, discharge
code string  the event's code (SNOMED CT, LOINC, UDI-DI, instrument, ...)
detail string  a second descriptor (class, display, device type, timepoint)
value double  a measured value if any
unit string  its unit
"""
        + LINEAGE,
    ),
    _table(
        "gold",
        "device_clock",
        "one row per device: the skew of its clock against IoT Hub's enqueued time",
        ("device_type", "device_key"),
        """
device_type string  the template's type name
device_key string  HMAC-SHA256 of the device serial
messages int64  measurements with both times
median_skew_seconds double  median of device time - enqueued time
max_abs_skew_seconds double  largest absolute skew
beyond_tolerance bool  the median exceeds JOURNEY_SOURCES__DEVICE_SKEW_TOLERANCE_SECONDS
""",
    ),
    silver_contract(
        "prom_score",
        "one row per PROM form instance (registry, REDCap or FHIR QuestionnaireResponse), answered or not",
        (),
        """
patient_key string  the patient
instrument string  catalog instrument id
timepoint string  baseline, 6w, 6m, 12m
score double  the score (null for a blank or unscorable form)
collected_on date  when it was collected
prom_source string  registry, redcap or fhir
""",
    ),
)


@functools.cache
def all_contracts() -> tuple[TableContract, ...]:
    """Every warehouse table's contract: the gold tables, then each source's silver tables in
    plug-in order, then the shared ones."""
    # Imported here: the sources import the lake, which checks every write against these.
    from patient_journey.sources.plugins import SILVER_CONTRACTS

    gold = tuple(c for c in CONTRACTS if c.layer == "gold")
    shared = tuple(c for c in CONTRACTS if c.layer != "gold")
    return gold + SILVER_CONTRACTS + shared


@functools.cache
def _by_label() -> dict[str, TableContract]:
    return {contract.label: contract for contract in all_contracts()}


def contract_of(layer: str, name: str) -> TableContract | None:
    return _by_label().get(f"{layer}.{name}")


def render_markdown() -> str:
    """The warehouse's tables as docs/warehouse.md shows them (between its ``tables`` markers)."""
    lines: list[str] = []
    for contract in all_contracts():
        key = f" Key: {', '.join(f'`{k}`' for k in contract.key)}." if contract.key else ""
        lines += [f"### {contract.label}", "", f"Grain: {contract.grain}.{key}", ""]
        lines += ["| column | type | meaning |", "|---|---|---|"]
        lines += [f"| `{c.name}` | {c.type} | {c.description} |" for c in contract.columns]
        lines.append("")
    return "\n".join(lines)
