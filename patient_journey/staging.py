"""Staging: bronze records -> typed tables, one per entity, still in the restricted zone.

Each staged table is declared once below as the SQL that flattens its bronze payloads (DuckDB's
JSON functions, vectorised). Every staged row keeps its lineage (source URI, offset, run id) and
two columns the quality gate uses: ``_row`` (a row id) and ``_first_of_id`` (false for a later
record that repeats an earlier record's id). Exact re-reads of the same physical record (same
URI, offset and content, e.g. after a crash between bronze and ledger writes) are collapsed.
"""

from __future__ import annotations

from dataclasses import dataclass

import duckdb
import pyarrow as pa

MRN_SYSTEM = "http://hospital.example.org/fhir/mrn"
OR_CASE_SYSTEM = "http://hospital.example.org/fhir/or-case"


@dataclass(frozen=True)
class StagedTable:
    """One staged table: its bronze source, which entity, and the flattening select list."""

    name: str
    bronze: str
    entity: str
    columns: str
    order_by: str = "source_uri, source_offset"


def _ts(path: str) -> str:
    return f"try_cast(payload->>'$.{path}' AS TIMESTAMPTZ)"


def _identifier(where: str) -> str:
    """The value of the first ``identifier[]`` element for which ``where`` (over ``i``) holds."""
    return f"list_filter(json_extract(payload, '$.identifier[*]'), lambda i: {where})[1]->>'$.value'"


# The MRN: the identifier with the hospital's MRN system, else the one typed MR (as Synthea writes it).
_MRN_BY_SYSTEM = _identifier(f"i->>'$.system' = '{MRN_SYSTEM}'")
_MRN_BY_TYPE = _identifier("i->>'$.type.coding[0].code' = 'MR'")
MRN = f"coalesce({_MRN_BY_SYSTEM}, {_MRN_BY_TYPE})"
OR_CASE_ID = _identifier(f"i->>'$.system' = '{OR_CASE_SYSTEM}'")


def _ref_id(path: str) -> str:
    return f"nullif(split_part(payload->>'$.{path}', '/', -1), '')"


STAGED_TABLES: tuple[StagedTable, ...] = (
    StagedTable(
        "patient",
        "fhir_resource",
        "Patient",
        f"""record_id AS patient_id, {MRN} AS mrn,
            try_cast(payload->>'$.birthDate' AS DATE) AS birth_date, payload->>'$.gender' AS gender""",
    ),
    StagedTable(
        "encounter",
        "fhir_resource",
        "Encounter",
        f"""record_id AS encounter_id, {_ref_id("subject.reference")} AS patient_id,
            payload->>'$.class.code' AS class_code, payload->>'$.type[0].coding[0].code' AS purpose,
            {_ts("period.start")} AS period_start, {_ts("period.end")} AS period_end""",
    ),
    StagedTable(
        "procedure",
        "fhir_resource",
        "Procedure",
        f"""record_id AS procedure_id, {_ref_id("subject.reference")} AS patient_id,
            {_ref_id("encounter.reference")} AS encounter_id, {OR_CASE_ID} AS case_id,
            payload->>'$.code.coding[0].code' AS code, payload->>'$.code.coding[0].display' AS display,
            payload->>'$.status' AS status,
            {_ts("performedPeriod.start")} AS performed_start, {_ts("performedPeriod.end")} AS performed_end""",
    ),
    StagedTable(
        "condition",
        "fhir_resource",
        "Condition",
        f"""record_id AS condition_id, {_ref_id("subject.reference")} AS patient_id,
            payload->>'$.code.coding[0].code' AS code, payload->>'$.code.coding[0].display' AS display,
            coalesce({_ts("onsetDateTime")}, {_ts("recordedDate")}) AS onset_time""",
    ),
    StagedTable(
        "observation",
        "fhir_resource",
        "Observation",
        f"""record_id AS observation_id, {_ref_id("subject.reference")} AS patient_id,
            {_ref_id("encounter.reference")} AS encounter_id,
            payload->>'$.code.coding[0].code' AS code, payload->>'$.code.coding[0].display' AS display,
            {_ts("effectiveDateTime")} AS effective_time,
            try_cast(payload->>'$.valueQuantity.value' AS DOUBLE) AS value,
            payload->>'$.valueQuantity.unit' AS unit""",
    ),
    StagedTable(
        "device",
        "fhir_resource",
        "Device",
        f"""record_id AS device_id, payload->>'$.udiCarrier[0].deviceIdentifier' AS udi_di,
            payload->>'$.serialNumber' AS serial_number, payload->>'$.deviceName[0].name' AS device_name,
            payload->>'$.type.coding[0].code' AS device_type, {_ref_id("patient.reference")} AS patient_id""",
    ),
    StagedTable(
        "device_event",
        "device_message",
        "device_message",
        f"""record_id AS message_id, payload->>'$.connectionDeviceId' AS iot_device_id,
            payload->>'$.body.caseId' AS case_id, payload->>'$.body.deviceType' AS device_type,
            payload->>'$.body.udiDi' AS udi_di, payload->>'$.body.serial' AS serial_number,
            payload->>'$.body.firmware' AS firmware, payload->>'$.body.eventType' AS event_type,
            {_ts("body.timestamp")} AS event_time,
            try_cast(payload->>'$.body.value' AS DOUBLE) AS value, payload->>'$.body.unit' AS unit,
            {_ts("enqueuedTimeUtc")} AS enqueued_time""",
    ),
    StagedTable(
        "registry_patient",
        "registry_row",
        "registry_patient",
        """record_id AS registry_id, payload->>'$.mrn' AS mrn,
           try_cast(payload->>'$.birth_date' AS DATE) AS birth_date, payload->>'$.site' AS site,
           try_cast(payload->>'$.updated_at' AS TIMESTAMPTZ) AS updated_at""",
    ),
    StagedTable(
        "prom_response",
        "registry_row",
        "prom_response",
        """record_id AS response_id, payload->>'$.registry_id' AS registry_id,
           payload->>'$.instrument' AS instrument, payload->>'$.timepoint' AS timepoint,
           try_cast(payload->>'$.score' AS DOUBLE) AS score,
           try_cast(payload->>'$.collected_on' AS DATE) AS collected_on""",
    ),
    StagedTable(
        "complication",
        "registry_row",
        "complication",
        """record_id AS complication_id, payload->>'$.registry_id' AS registry_id,
           try_cast(payload->>'$.occurred_on' AS DATE) AS occurred_on, payload->>'$.description' AS description,
           try_cast(payload->>'$.clavien_dindo_grade' AS INTEGER) AS grade""",
    ),
    StagedTable(
        "readmission",
        "registry_row",
        "readmission",
        """record_id AS readmission_id, payload->>'$.registry_id' AS registry_id,
           try_cast(payload->>'$.admitted_on' AS DATE) AS admitted_on,
           try_cast(payload->>'$.discharged_on' AS DATE) AS discharged_on, payload->>'$.reason' AS reason""",
    ),
    StagedTable(
        "redcap_prom",
        "redcap_record",
        "redcap:prom",
        """record_id AS redcap_row_id, split_part(record_id, '|', 1) AS redcap_record_id,
           payload->>'$.redcap_event_name' AS event_name,
           max(nullif(payload->>'$.mrn', '')) OVER (PARTITION BY split_part(record_id, '|', 1)) AS mrn,
           CASE payload->>'$.prom_instrument' WHEN '1' THEN 'KOOS JR' WHEN '2' THEN 'HOOS JR' END AS instrument,
           CASE payload->>'$.redcap_event_name' WHEN 'baseline_arm_1' THEN 'baseline'
                WHEN 'week_6_arm_1' THEN '6w' WHEN 'month_6_arm_1' THEN '6m'
                WHEN 'month_12_arm_1' THEN '12m' END AS timepoint,
           try_cast(nullif(payload->>'$.prom_score', '') AS DOUBLE) AS score,
           try_cast(nullif(payload->>'$.prom_date', '') AS DATE) AS collected_on,
           nullif(payload->>'$.prom_score', '') IS NOT NULL AS answered""",
    ),
)

STAGED_BY_NAME = {table.name: table for table in STAGED_TABLES}
LINEAGE = "source_uri, source_offset, run_id"


def connect() -> duckdb.DuckDBPyConnection:
    connection = duckdb.connect()
    connection.execute("SET TimeZone = 'UTC'")
    return connection


def stage(bronze_tables: dict[str, pa.Table]) -> dict[str, pa.Table]:
    """Flatten every staged table whose bronze source is present."""
    connection = connect()
    for name, table in bronze_tables.items():
        connection.register(f"bronze_{name}", table)
    staged: dict[str, pa.Table] = {}
    for spec in STAGED_TABLES:
        if spec.bronze not in bronze_tables:
            continue
        staged[spec.name] = connection.sql(
            f"""
            WITH records AS (
                SELECT * FROM bronze_{spec.bronze} WHERE entity = '{spec.entity}'
                QUALIFY row_number() OVER (
                    PARTITION BY source_uri, source_offset, content_hash ORDER BY ingested_at) = 1
            ), flat AS (
                SELECT {spec.columns}, record_id AS _record_id, {LINEAGE} FROM records
            )
            SELECT * EXCLUDE (_record_id),
                   row_number() OVER (PARTITION BY _record_id ORDER BY {spec.order_by}) = 1 AS _first_of_id,
                   row_number() OVER (ORDER BY {spec.order_by}) AS _row
            FROM flat ORDER BY _row
            """
        ).to_arrow_table()
    connection.close()
    return staged
