"""Identity linkage: every staged record to one pseudonymous patient key, or held for later.

Links, in the order they are derived:

* FHIR Patient -> patient key = HMAC("mrn:" + MRN);
* EHR records -> their Patient reference;
* OR case id (Procedure identifier) -> the Procedure's patient; device telemetry -> its case id;
* registry patient -> EHR patient with the same MRN *and* birth date; registry rows -> registry id;
* REDCap record -> EHR patient with the same MRN (given on the record's baseline event).
* FHIR QuestionnaireResponse -> its Patient reference, like the other EHR records.

A device's serial number (a direct identifier under HIPAA Safe Harbor) reaches silver only as
``device_key`` = HMAC("device-serial:" + serial): the same device keeps the same key.

A record whose link is missing is held with the rule it could not satisfy; held records stay in
bronze and are linked again on every later build, so they load as soon as their patient arrives.
The crosswalk (source identifier -> patient key) is written to the restricted zone only.
"""

from __future__ import annotations

from dataclasses import dataclass

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
from duckdb.func import PythonUDFType

from patient_journey.identity import KeyMaker
from patient_journey.staging import connect

HELD_SCHEMA = pa.schema(
    [
        ("table_name", pa.string()),
        ("rule", pa.string()),
        ("source", pa.string()),
        ("record_id", pa.string()),
        ("source_uri", pa.string()),
        ("source_offset", pa.int64()),
        ("first_seen_run_id", pa.string()),
        ("held_in_run_id", pa.string()),
    ]
)

# Lineage in the analysts' zone: an opaque key of the input (a keyed hash of its URI, which
# stays in the restricted zone's ledgers: a file name can carry a patient's name) and the
# position in it. ``input_key`` (patient_journey.identity) turns a URI into its key.
INPUT_KEY_LENGTH = 24
LINEAGE = (
    f"left(pseudonym('input', s.source_uri), {INPUT_KEY_LENGTH}) AS input_key, s.source_offset, s.run_id"
)


@dataclass(frozen=True)
class LinkSpec:
    """How one staged table links: a join to an identity relation and the silver projection."""

    staged: str
    silver: str | None  # None: the table only feeds the crosswalk
    source: str
    id_column: str
    join: str  # LEFT JOIN of staged alias ``s`` to an identity relation ``k`` (patient_key)
    rule: str  # the rule a record that does not link is held under
    select: str
    optional_link: str | None = None  # rows matching this predicate load without a patient


LINKS: tuple[LinkSpec, ...] = (
    LinkSpec(
        "patient",
        "patient",
        "fhir",
        "patient_id",
        "s LEFT JOIN ehr_patient k USING (patient_id)",
        "mrn_present",
        "k.patient_key, year(s.birth_date) AS birth_year, s.gender",
    ),
    LinkSpec(
        "encounter",
        "encounter",
        "fhir",
        "encounter_id",
        "s LEFT JOIN ehr_patient k USING (patient_id)",
        "subject_links_to_patient",
        "s.encounter_id, k.patient_key, s.class_code, s.purpose, s.period_start, s.period_end",
    ),
    LinkSpec(
        "procedure",
        "procedure",
        "fhir",
        "procedure_id",
        "s LEFT JOIN ehr_patient k USING (patient_id)",
        "subject_links_to_patient",
        "s.procedure_id, k.patient_key, pseudonym('or-case', s.case_id) AS episode_key, s.encounter_id, "
        "s.code, s.display, s.status, s.performed_start, s.performed_end",
    ),
    LinkSpec(
        "condition",
        "condition",
        "fhir",
        "condition_id",
        "s LEFT JOIN ehr_patient k USING (patient_id)",
        "subject_links_to_patient",
        "s.condition_id, k.patient_key, s.code, s.display, s.onset_time",
    ),
    LinkSpec(
        "observation",
        "observation",
        "fhir",
        "observation_id",
        "s LEFT JOIN ehr_patient k USING (patient_id)",
        "subject_links_to_patient",
        "s.observation_id, k.patient_key, s.encounter_id, s.code, s.display, s.effective_time, s.value, s.unit",
    ),
    LinkSpec(
        "device",
        "device",
        "fhir",
        "device_id",
        "s LEFT JOIN ehr_patient k USING (patient_id)",
        "patient_links_to_patient",
        "s.device_id, k.patient_key, s.udi_di, s.device_name, s.device_type",
        optional_link="s.patient_id IS NULL",
    ),
    LinkSpec(
        "device_event",
        "device_event",
        "device",
        "measurement_id",
        "s LEFT JOIN case_link k USING (case_id)",
        "case_id_links_to_procedure",
        "s.measurement_id, k.episode_key, k.patient_key, s.device_type, "
        "pseudonym('device-serial', s.device_id) AS device_key, s.udi_di, s.firmware, "
        "s.event_type, s.event_time, s.value, s.unit, s.enqueued_time, s.measured_values",
    ),
    LinkSpec(
        "registry_patient",
        None,
        "registry",
        "registry_id",
        "s LEFT JOIN registry_link k USING (registry_id)",
        "mrn_and_birth_date_link_to_patient",
        "k.patient_key",
    ),
    LinkSpec(
        "prom_response",
        "prom_score",
        "registry",
        "response_id",
        "s LEFT JOIN registry_link k USING (registry_id)",
        "registry_id_links_to_patient",
        "k.patient_key, s.instrument, s.timepoint, s.score, s.collected_on, 'registry' AS prom_source",
    ),
    LinkSpec(
        "complication",
        "complication",
        "registry",
        "complication_id",
        "s LEFT JOIN registry_link k USING (registry_id)",
        "registry_id_links_to_patient",
        "k.patient_key, s.occurred_on, s.code, s.grade",  # the description is free text: restricted
    ),
    LinkSpec(
        "readmission",
        "readmission",
        "registry",
        "readmission_id",
        "s LEFT JOIN registry_link k USING (registry_id)",
        "registry_id_links_to_patient",
        "k.patient_key, s.admitted_on, s.discharged_on",  # the reason is free text: restricted
    ),
    LinkSpec(
        "redcap_prom",
        "prom_score",
        "redcap",
        "redcap_row_id",
        "s LEFT JOIN redcap_link k USING (redcap_record_id)",
        "mrn_links_to_patient",
        "k.patient_key, s.instrument, s.timepoint, s.score, s.collected_on, 'redcap' AS prom_source",
    ),
    LinkSpec(
        "fhir_prom",
        "prom_score",
        "fhir",
        "questionnaire_response_id",
        "s LEFT JOIN ehr_patient k USING (patient_id)",
        "subject_links_to_patient",
        "k.patient_key, s.instrument, s.timepoint, s.score, s.collected_on, 'fhir' AS prom_source",
    ),
)

IDENTITY_SQL = """
CREATE TEMP TABLE ehr_patient AS
    SELECT patient_id, mrn, birth_date, pseudonym('mrn', mrn) AS patient_key FROM staged_patient;
CREATE TEMP TABLE case_link AS
    SELECT DISTINCT p.case_id, k.patient_key, pseudonym('or-case', p.case_id) AS episode_key
    FROM staged_procedure p JOIN ehr_patient k USING (patient_id) WHERE p.case_id IS NOT NULL;
CREATE TEMP TABLE registry_link AS
    SELECT DISTINCT r.registry_id, k.patient_key
    FROM staged_registry_patient r JOIN ehr_patient k ON k.mrn = r.mrn AND k.birth_date = r.birth_date;
CREATE TEMP TABLE redcap_link AS
    SELECT DISTINCT r.redcap_record_id, k.patient_key
    FROM staged_redcap_prom r JOIN ehr_patient k ON k.mrn = r.mrn;
"""

CROSSWALK_SQL = """
SELECT 'fhir-patient' AS identifier_type, patient_id AS identifier, patient_key FROM ehr_patient
UNION SELECT 'mrn', mrn, patient_key FROM ehr_patient
UNION SELECT 'or-case', case_id, patient_key FROM case_link
UNION SELECT 'registry-patient', registry_id, patient_key FROM registry_link
UNION SELECT 'redcap-record', redcap_record_id, patient_key FROM redcap_link
ORDER BY identifier_type, identifier
"""


@dataclass(frozen=True)
class LinkResult:
    silver: dict[str, pa.Table]
    crosswalk: pa.Table
    held: pa.Table
    loaded: dict[str, int]  # staged table -> rows linked (loaded)
    held_counts: dict[str, int]  # staged table -> rows held


def _register_pseudonym(connection: duckdb.DuckDBPyConnection, keys: KeyMaker) -> None:
    def pseudonym(namespace: pa.Array, identifier: pa.Array) -> pa.Array:
        namespaces = pc.unique(namespace).drop_null().to_pylist()
        if len(namespaces) == 1:  # the usual case: a literal namespace; hash each distinct id once
            return keys.keys(namespaces[0], identifier)
        return pa.array(
            [
                None if i is None or n is None else keys.key(n, i)
                for n, i in zip(namespace.to_pylist(), identifier.to_pylist(), strict=True)
            ],
            pa.string(),
        )

    connection.create_function(
        "pseudonym", pseudonym, ["VARCHAR", "VARCHAR"], "VARCHAR", type=PythonUDFType.ARROW
    )


def link(staged: dict[str, pa.Table], keys: KeyMaker, run_id: str) -> LinkResult:
    """Link validated staged tables; returns silver tables, the crosswalk and held records."""
    connection = connect()
    _register_pseudonym(connection, keys)
    for name, table in staged.items():
        connection.register(f"staged_{name}", table)
    connection.execute(IDENTITY_SQL)
    silver_parts: dict[str, list[pa.Table]] = {}
    held_parts: list[pa.Table] = []
    loaded: dict[str, int] = {}
    held_counts: dict[str, int] = {}
    for spec in LINKS:
        source = f"staged_{spec.staged}"
        linked_filter = "k.patient_key IS NOT NULL"
        if spec.optional_link:
            linked_filter = f"({linked_filter} OR {spec.optional_link})"
        linked = connection.sql(
            f"SELECT {spec.select}, {LINEAGE} FROM {source} {spec.join} WHERE {linked_filter} ORDER BY s._row"
        ).to_arrow_table()
        held = (
            connection.sql(
                f"""SELECT '{spec.staged}' AS table_name, '{spec.rule}' AS rule, '{spec.source}' AS source,
                       CAST(s.{spec.id_column} AS VARCHAR) AS record_id, s.source_uri, s.source_offset,
                       s.run_id AS first_seen_run_id, '{run_id}' AS held_in_run_id
                FROM {source} {spec.join} WHERE NOT {linked_filter} ORDER BY s._row"""
            )
            .to_arrow_table()
            .cast(HELD_SCHEMA)
        )
        loaded[spec.staged] = linked.num_rows
        held_counts[spec.staged] = held.num_rows
        held_parts.append(held)
        if spec.silver is not None:
            silver_parts.setdefault(spec.silver, []).append(linked)
    crosswalk = connection.sql(CROSSWALK_SQL).to_arrow_table()
    connection.close()
    silver = {name: pa.concat_tables(parts) for name, parts in silver_parts.items()}
    return LinkResult(silver, crosswalk, pa.concat_tables(held_parts), loaded, held_counts)
