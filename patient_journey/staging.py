"""Staging: bronze records -> typed tables, one per entity, still in the restricted zone.

Each staged table is declared once below as the SQL that flattens its bronze payloads (DuckDB's
JSON functions, vectorised). Every staged row keeps its lineage (source URI, offset, run id) and
two more columns: ``_row`` (the row's number in the table's order, which linkage keeps) and
``_first_of_id`` (false for a later record that repeats an earlier record's id, which the suites
test). Exact re-reads of the same physical record (same URI, offset and content, e.g. after a
crash between bronze and ledger writes) are collapsed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TypedDict

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from patient_journey.prom import score_prom_tables

MRN_SYSTEM = "http://hospital.example.org/fhir/mrn"
OR_CASE_SYSTEM = "http://hospital.example.org/fhir/or-case"


UNVERSIONED = "CAST(NULL AS TIMESTAMPTZ)"


@dataclass(frozen=True)
class StagedTable:
    """One staged table: its bronze source, which entity, and the flattening select list."""

    name: str
    bronze: str
    entity: str
    columns: str
    order_by: str = "source_uri, source_offset"  # only these two: the windows see no other columns
    # Versioned sources: the version of a record (later replaces earlier) and whether the record
    # is a deletion. Without a version, records of one id are all current.
    version: str = UNVERSIONED
    deleted: str = "false"
    # The JSON fields the columns read and the JSON kind each must have when present (see
    # FIELD_KINDS); a record with another kind there is quarantined under ``<source>_field_type``
    # instead of loading a NULL (or the wrong text) as if valid.
    fields: tuple[tuple[str, str], ...] = ()
    text_paths: tuple[str, ...] = ()  # what ``_at`` holds (see JsonText)


# JSON kinds as DuckDB's json_type names them.
FIELD_KINDS = {
    "string": ("VARCHAR",),
    "number": ("BIGINT", "UBIGINT", "DOUBLE"),
    "scalar": ("VARCHAR", "BIGINT", "UBIGINT", "DOUBLE"),
    "object": ("OBJECT",),
    "array": ("ARRAY",),
}
FIELD_ERROR = "_field_error"  # the first field of the wrong kind, as "path is X, expected Y"
_JSON_KIND = (
    "CASE _types[{n}] WHEN 'VARCHAR' THEN 'a string' WHEN 'OBJECT' THEN 'an object' "
    "WHEN 'ARRAY' THEN 'an array' WHEN 'BOOLEAN' THEN 'a boolean' ELSE 'a number' END"
)


def _field_error(fields: tuple[tuple[str, str], ...]) -> str:
    """SQL naming the first of ``fields`` whose kind is wrong, over ``_types`` (their json_type)."""
    if not fields:
        return "CAST(NULL AS VARCHAR)"
    cases = []
    for n, (path, kind) in enumerate(fields, start=1):
        allowed = ", ".join(f"'{name}'" for name in FIELD_KINDS[kind])
        article = "an" if kind[0] in "aeiou" else "a"
        cases.append(
            f"WHEN _types[{n}] IS NOT NULL AND _types[{n}] NOT IN ({allowed}) "
            f"THEN '{path} is ' || {_JSON_KIND.format(n=n)} || ', expected {article} {kind}'"
        )
    return f"CASE {' '.join(cases)} END"


def _fields(*specs: str) -> tuple[tuple[str, str], ...]:
    """``"path:kind"`` items as (path, kind) pairs."""
    pairs = tuple(tuple(spec.rsplit(":", 1)) for spec in specs)
    assert all(len(pair) == 2 and pair[1] in FIELD_KINDS for pair in pairs), specs
    return pairs  # type: ignore[return-value]


class JsonText:
    """The JSON paths a staged table reads as text. Each is extracted once per record, by one
    ``json_extract_string(payload, [paths])`` (``_at``), and the table's SQL names it ``_at[n]``
    (DuckDB parses the JSON again for every ``->>``: Observation's nine columns at M, 580k rows,
    took 1.5 s one by one and 0.3 s parsed once)."""

    def __init__(self) -> None:
        self.paths: list[str] = []

    def __call__(self, path: str) -> str:
        if path not in self.paths:
            self.paths.append(path)
        return f"_at[{self.paths.index(path) + 1}]"


def _declared(build: Callable[[JsonText], StagedTable]) -> StagedTable:
    """A staged table whose SQL reads payload text through ``at`` (a JsonText of its own)."""
    at = JsonText()
    table = build(at)
    return replace(table, text_paths=tuple(at.paths))


def _ts(at: JsonText, path: str) -> str:
    return f"try_cast({at('$.' + path)} AS TIMESTAMPTZ)"


def _identifier(where: str) -> str:
    """The value of the first ``identifier[]`` element for which ``where`` (over ``i``) holds."""
    return f"list_filter(json_extract(payload, '$.identifier[*]'), lambda i: {where})[1]->>'$.value'"


# The MRN: the identifier with the hospital's MRN system, else the one typed MR (as Synthea writes it).
_MRN_BY_SYSTEM = _identifier(f"i->>'$.system' = '{MRN_SYSTEM}'")
_MRN_BY_TYPE = _identifier("i->>'$.type.coding[0].code' = 'MR'")
MRN = f"coalesce({_MRN_BY_SYSTEM}, {_MRN_BY_TYPE})"
OR_CASE_ID = _identifier(f"i->>'$.system' = '{OR_CASE_SYSTEM}'")


def _ref_id(at: JsonText, path: str) -> str:
    """The id of a reference: the last segment of ``Type/id`` or of an absolute URL, its
    ``_history/<version>`` dropped (references a Bundle resolves are relative by now)."""
    return f"nullif(regexp_extract({at('$.' + path)}, '([^/]+)(/_history/[^/]*)?$', 1), '')"


# FHIR: meta.lastUpdated orders versions; the FHIR reader writes a deletion (bulk export
# ``deleted`` entries, DELETE entries of a Bundle) as a record marked "_deleted".
class Versions(TypedDict, total=False):
    """How a versioned source's records order (``version``) and which are deletions."""

    version: str
    deleted: str


def fhir_versions(at: JsonText) -> Versions:
    return {"version": _ts(at, "meta.lastUpdated"), "deleted": f"{at('$._deleted')} = 'true'"}


def registry_versions(at: JsonText) -> Versions:
    return {"version": _ts(at, "updated_at")}


# PROM tables: placeholders that patient_journey.prom fills from the items (see there).
PROM_SCORE_COLUMNS = (
    "CAST(NULL AS DOUBLE) AS score, CAST(NULL AS VARCHAR) AS scoring_status, "
    "CAST(NULL AS VARCHAR) AS score_name, CAST(NULL AS INTEGER) AS items_answered"
)
# A QuestionnaireResponse's answers as a JSON object linkId -> first answer (top-level items and
# items one group deep); an answer of another type than integer or coding is kept as its JSON.
_QR_ITEM_LIST = "list_concat(json_extract(payload, '$.item[*]'), json_extract(payload, '$.item[*].item[*]'))"
_QR_ANSWER = (
    "coalesce(i->>'$.answer[0].valueInteger', i->>'$.answer[0].valueCoding.code', "
    "CAST(i->'$.answer[0]' AS VARCHAR))"
)
QR_ITEMS = (
    f"'{{' || array_to_string(list_transform(list_filter({_QR_ITEM_LIST}, "
    f"lambda i: (i->>'$.linkId') IS NOT NULL AND (i->'$.answer[0]') IS NOT NULL), "
    f"lambda i: to_json(i->>'$.linkId') || ':' || to_json({_QR_ANSWER})), ',') || '}}'"
)

STAGED_TABLES: tuple[StagedTable, ...] = (
    _declared(
        lambda at: StagedTable(
            "patient",
            "fhir_resource",
            "Patient",
            f"""record_id AS patient_id, {MRN} AS mrn,
            try_cast({at("$.birthDate")} AS DATE) AS birth_date, {at("$.gender")} AS gender""",
            **fhir_versions(at),
            fields=_fields("identifier:array", "birthDate:string", "gender:string"),
        )
    ),
    _declared(
        lambda at: StagedTable(
            "encounter",
            "fhir_resource",
            "Encounter",
            f"""record_id AS encounter_id, {_ref_id(at, "subject.reference")} AS patient_id,
            {at("$.class.code")} AS class_code, {at("$.type[0].coding[0].code")} AS purpose,
            {_ts(at, "period.start")} AS period_start, {_ts(at, "period.end")} AS period_end""",
            **fhir_versions(at),
            fields=_fields(
                "subject:object",
                "subject.reference:string",
                "class:object",
                "class.code:string",
                "type:array",
                "period:object",
                "period.start:string",
                "period.end:string",
            ),
        )
    ),
    _declared(
        lambda at: StagedTable(
            "procedure",
            "fhir_resource",
            "Procedure",
            f"""record_id AS procedure_id, {_ref_id(at, "subject.reference")} AS patient_id,
            {_ref_id(at, "encounter.reference")} AS encounter_id, {OR_CASE_ID} AS case_id,
            {at("$.code.coding[0].code")} AS code, {at("$.code.coding[0].display")} AS display,
            {at("$.status")} AS status,
            {_ts(at, "performedPeriod.start")} AS performed_start, {_ts(at, "performedPeriod.end")} AS performed_end""",
            **fhir_versions(at),
            fields=_fields(
                "subject:object",
                "subject.reference:string",
                "encounter:object",
                "encounter.reference:string",
                "identifier:array",
                "code:object",
                "code.coding:array",
                "code.coding[0]:object",
                "code.coding[0].code:string",
                "code.coding[0].display:string",
                "status:string",
                "performedPeriod:object",
                "performedPeriod.start:string",
                "performedPeriod.end:string",
            ),
        )
    ),
    _declared(
        lambda at: StagedTable(
            "condition",
            "fhir_resource",
            "Condition",
            f"""record_id AS condition_id, {_ref_id(at, "subject.reference")} AS patient_id,
            {at("$.code.coding[0].code")} AS code, {at("$.code.coding[0].display")} AS display,
            coalesce({_ts(at, "onsetDateTime")}, {_ts(at, "recordedDate")}) AS onset_time""",
            **fhir_versions(at),
            fields=_fields(
                "subject:object",
                "subject.reference:string",
                "code:object",
                "code.coding:array",
                "code.coding[0]:object",
                "code.coding[0].code:string",
                "code.coding[0].display:string",
                "onsetDateTime:string",
                "recordedDate:string",
            ),
        )
    ),
    _declared(
        lambda at: StagedTable(
            "observation",
            "fhir_resource",
            "Observation",
            f"""record_id AS observation_id, {_ref_id(at, "subject.reference")} AS patient_id,
            {_ref_id(at, "encounter.reference")} AS encounter_id,
            {at("$.code.coding[0].code")} AS code, {at("$.code.coding[0].display")} AS display,
            {_ts(at, "effectiveDateTime")} AS effective_time,
            try_cast({at("$.valueQuantity.value")} AS DOUBLE) AS value,
            {at("$.valueQuantity.unit")} AS unit""",
            **fhir_versions(at),
            fields=_fields(
                "subject:object",
                "subject.reference:string",
                "encounter:object",
                "encounter.reference:string",
                "code:object",
                "code.coding:array",
                "code.coding[0]:object",
                "code.coding[0].code:string",
                "code.coding[0].display:string",
                "effectiveDateTime:string",
                "valueQuantity:object",
                "valueQuantity.value:number",
                "valueQuantity.unit:string",
            ),
        )
    ),
    _declared(
        lambda at: StagedTable(
            "device",
            "fhir_resource",
            "Device",
            f"""record_id AS device_id, {at("$.udiCarrier[0].deviceIdentifier")} AS udi_di,
            {at("$.serialNumber")} AS serial_number, {at("$.deviceName[0].name")} AS device_name,
            {at("$.type.coding[0].code")} AS device_type, {_ref_id(at, "patient.reference")} AS patient_id""",
            **fhir_versions(at),
            fields=_fields(
                "udiCarrier:array",
                "udiCarrier[0].deviceIdentifier:string",
                "serialNumber:string",
                "deviceName:array",
                "deviceName[0].name:string",
                "type:object",
                "type.coding:array",
                "patient:object",
                "patient.reference:string",
            ),
        )
    ),
    _declared(
        lambda at: StagedTable(
            "device_event",
            "device_message",
            "device_measurement",
            f"""record_id AS measurement_id, {at("$.iotDeviceId")} AS iot_device_id,
            {at("$.typeName")} AS device_type, {at("$.deviceId")} AS device_id,
            {at("$.caseId")} AS case_id, {at("$.template")} AS template,
            coalesce({at("$.values.event")}, {at("$.typeName")}) AS event_type,
            {_ts(at, "measuredAt")} AS event_time, {_ts(at, "enqueuedTime")} AS enqueued_time,
            {at("$.values.udiDi")} AS udi_di, {at("$.values.firmware")} AS firmware,
            try_cast({at("$.values.value")} AS DOUBLE) AS value, {at("$.values.unit")} AS unit,
            CAST(json_extract(payload, '$.values') AS VARCHAR) AS measured_values""",
            # What the templates mapped, of the kinds staging reads; a case id or serial may be a
            # number. A value a suite compares with numbers is checked by its device type's gate.
            fields=_fields(
                "caseId:scalar",
                "deviceId:scalar",
                "values.event:string",
                "values.udiDi:string",
                "values.firmware:scalar",
                "values.unit:string",
            ),
        )
    ),
    _declared(
        lambda at: StagedTable(
            "registry_patient",
            "registry_row",
            "registry_patient",
            f"""record_id AS registry_id, {at("$.mrn")} AS mrn,
           try_cast({at("$.birth_date")} AS DATE) AS birth_date, {at("$.site")} AS site,
           try_cast({at("$.updated_at")} AS TIMESTAMPTZ) AS updated_at""",
            **registry_versions(at),
            fields=_fields("mrn:scalar", "birth_date:string", "site:scalar", "updated_at:string"),
        )
    ),
    _declared(
        lambda at: StagedTable(
            "prom_response",
            "registry_row",
            "prom_response",
            f"""record_id AS response_id, {at("$.registry_id")} AS registry_id,
           lower(replace(trim({at("$.instrument")}), ' ', '_')) AS instrument,
           {at("$.timepoint")} AS timepoint,
           try_cast({at("$.score")} AS DOUBLE) AS score,
           try_cast({at("$.collected_on")} AS DATE) AS collected_on""",
            **registry_versions(at),
            fields=_fields(
                "registry_id:scalar",
                "instrument:string",
                "timepoint:string",
                "score:number",
                "collected_on:string",
                "updated_at:string",
            ),
        )
    ),
    _declared(
        lambda at: StagedTable(
            "complication",
            "registry_row",
            "complication",
            f"""record_id AS complication_id, {at("$.registry_id")} AS registry_id,
           try_cast({at("$.occurred_on")} AS DATE) AS occurred_on, {at("$.description")} AS description,
           {at("$.code")} AS code, try_cast({at("$.clavien_dindo_grade")} AS INTEGER) AS grade""",
            **registry_versions(at),
            fields=_fields(
                "registry_id:scalar",
                "occurred_on:string",
                "code:scalar",
                "clavien_dindo_grade:number",
                "updated_at:string",
            ),
        )
    ),
    _declared(
        lambda at: StagedTable(
            "readmission",
            "registry_row",
            "readmission",
            f"""record_id AS readmission_id, {at("$.registry_id")} AS registry_id,
           try_cast({at("$.admitted_on")} AS DATE) AS admitted_on,
           try_cast({at("$.discharged_on")} AS DATE) AS discharged_on, {at("$.reason")} AS reason""",
            **registry_versions(at),
            fields=_fields(
                "registry_id:scalar", "admitted_on:string", "discharged_on:string", "updated_at:string"
            ),
        )
    ),
    _declared(
        lambda at: StagedTable(
            "redcap_prom",
            "redcap_record",
            "redcap:prom",
            # One row per form instance of the REDCap project "prom"; patient_journey.prom keeps the
            # PROM forms (form name = catalog instrument id) and scores them. The MRN is on the
            # record's enrolment form; the timepoint is the event (baseline/week_6/month_6/month_12).
            f"""record_id AS redcap_row_id, {at("$.record_id")} AS redcap_record_id,
           max({at("$.values.mrn")}) OVER (PARTITION BY {at("$.record_id")}) AS mrn,
           {at("$.event")} AS event_name, try_cast({at("$.arm")} AS INTEGER) AS arm,
           try_cast({at("$.repeat_instance")} AS INTEGER) AS repeat_instance,
           {at("$.form")} AS instrument,
           CASE regexp_replace({at("$.event")}, '_arm_[0-9]+$', '') WHEN 'baseline' THEN 'baseline'
                WHEN 'week_6' THEN '6w' WHEN 'month_6' THEN '6m' WHEN 'month_12' THEN '12m' END AS timepoint,
           try_cast(json_extract_string(payload, '$.values.' || ({at("$.form")}) || '_date') AS DATE)
               AS collected_on,
           try_cast({at("$.form_status")} AS INTEGER) AS form_status,
           {PROM_SCORE_COLUMNS}, CAST(payload->'$.values' AS VARCHAR) AS items""",
        )
    ),
    _declared(
        lambda at: StagedTable(
            "fhir_prom",
            "fhir_resource",
            "QuestionnaireResponse",
            # One row per QuestionnaireResponse, scored by patient_journey.prom: the instrument is the
            # questionnaire canonical's last segment (catalog id), items are linkId -> answer[0].
            f"""record_id AS questionnaire_response_id, {_ref_id(at, "subject.reference")} AS patient_id,
            nullif(regexp_extract({at("$.questionnaire")}, '([^/|]*)(\\|.*)?$', 1), '') AS instrument,
            CAST(NULL AS VARCHAR) AS timepoint,
            try_cast(left({at("$.authored")}, 10) AS DATE) AS collected_on,
            {at("$.status")} AS response_status,
            {PROM_SCORE_COLUMNS}, {QR_ITEMS} AS items""",
            **fhir_versions(at),
            fields=_fields(
                "subject:object",
                "subject.reference:string",
                "questionnaire:string",
                "authored:string",
                "status:string",
                "item:array",
            ),
        )
    ),
)

STAGED_BY_NAME = {table.name: table for table in STAGED_TABLES}
LINEAGE = "source_uri, source_offset, run_id"
# True for a record that is not current: a later version of its id, a deletion, or the same
# record delivered again (same id and content) replaces it. The pipeline counts and drops these.
SUPERSEDED = "_superseded"


def connect() -> duckdb.DuckDBPyConnection:
    connection = duckdb.connect()
    connection.execute("SET TimeZone = 'UTC'")
    return connection


def stage(bronze_tables: dict[str, pa.Table], *, release: bool = False) -> dict[str, pa.Table]:
    """Flatten every staged table whose bronze source is present; rows that are no longer
    current are kept, flagged ``_superseded``, so that the caller can count them. Returns the
    staged tables in ``STAGED_TABLES`` order.

    The tables of one bronze table are staged together. With ``release``, each bronze table is
    taken out of ``bronze_tables`` (the caller's dict) once they are, so that it is freed (at
    52,000 patients the FHIR bronze, 0.9 GiB, is no longer held while device events are staged)."""
    connection = connect()
    for name, table in bronze_tables.items():
        connection.register(f"bronze_{name}", table)
    present = [spec for spec in STAGED_TABLES if spec.bronze in bronze_tables]
    sources = list(dict.fromkeys(spec.bronze for spec in present))
    last_of = {spec.bronze: spec.name for spec in present}
    staged: dict[str, pa.Table] = {}
    for declared in sorted(present, key=lambda spec: sources.index(spec.bronze)):
        spec = declared
        parsed = (
            f"json_extract_string(payload, [{', '.join(repr(p) for p in spec.text_paths)}]) AS _at"
            if spec.text_paths
            else "NULL AS _at"
        )
        paths = ", ".join(f"'$.{path}'" for path, _ in spec.fields)
        types = f"json_type(payload, [{paths}]) AS _types" if spec.fields else "NULL AS _types"
        # Records of one id are all current in an unversioned source: no windows to find the latest.
        versioned = (
            "NULL::TIMESTAMPTZ AS _latest, NULL::TIMESTAMPTZ AS _deleted_at"
            if spec.version == UNVERSIONED and spec.deleted == "false"
            else """max(_version) OVER (PARTITION BY _record_id) AS _latest,
                    max(coalesce(_version, 'infinity'::TIMESTAMPTZ)) FILTER (WHERE _deleted)
                        OVER (PARTITION BY _record_id) AS _deleted_at"""
        )
        # Flattened once; the windows that pick current records run over the keys alone (row
        # number, ids, hash, version, lineage), joined back to the flattened rows, which are put in
        # `_row` order in Arrow. Windows and an ORDER BY over whole rows added 2.9 GiB to the
        # process while M's device events were staged; this adds 1.6 GiB, in the same time.
        flat = connection.sql(
            f"""
            WITH flattened AS MATERIALIZED (
                SELECT {spec.columns}, {_field_error(spec.fields)} AS {FIELD_ERROR},
                       record_id AS _record_id, content_hash AS _hash,
                       ingested_at AS _ingested, {spec.version} AS _version, {spec.deleted} AS _deleted,
                       {LINEAGE}, row_number() OVER () AS _n
                FROM (SELECT *, {parsed}, {types} FROM bronze_{spec.bronze} WHERE entity = '{spec.entity}')
            ), records AS (
                SELECT _n, _record_id, _hash, _ingested, _version, _deleted, source_uri, source_offset
                FROM flattened
                QUALIFY row_number() OVER (
                    PARTITION BY source_uri, source_offset, _hash ORDER BY _ingested) = 1
            ), versions AS (
                SELECT *,
                    row_number() OVER (
                        PARTITION BY _record_id, _hash ORDER BY _ingested, {spec.order_by}) > 1 AS _again,
                    {versioned}
                FROM records
            ), flags AS (
                SELECT _n, _record_id, _ingested, source_uri, source_offset,
                       _again OR _version IS DISTINCT FROM _latest
                       OR coalesce(_deleted_at >= coalesce(_version, '-infinity'::TIMESTAMPTZ), false)
                       AS {SUPERSEDED}
                FROM versions
            ), ordered AS (
                SELECT _n, {SUPERSEDED},
                       -- of two current records of one id (same version, other content), the one
                       -- that arrived first is the record; within one read, the earlier in the listing
                       row_number() OVER (
                           PARTITION BY _record_id, {SUPERSEDED} ORDER BY _ingested, {spec.order_by}
                       ) = 1 AS _first_of_id,
                       -- a total order: one line or message can hold several records (REDCap forms,
                       -- template matches), and ties would number them differently from run to run
                       row_number() OVER (ORDER BY {spec.order_by}, _record_id) AS _row
                FROM flags
            )
            SELECT f.* EXCLUDE (_n, _record_id, _hash, _ingested, _version, _deleted, {LINEAGE}),
                   o.{SUPERSEDED}, {", ".join(f"f.{c}" for c in LINEAGE.split(", "))}, o._first_of_id, o._row
            FROM ordered o JOIN flattened f USING (_n)
            """
        ).to_arrow_table()
        staged[spec.name] = flat.take(pc.sort_indices(flat.column("_row")))
        if release and last_of[spec.bronze] == spec.name:
            connection.unregister(f"bronze_{spec.bronze}")
            del bronze_tables[spec.bronze]
    connection.close()
    return score_prom_tables({spec.name: staged[spec.name] for spec in present})
