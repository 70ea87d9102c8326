"""REDCap exports, read through each project's data dictionary (``redcap_export``).

Files are paired by project name under the REDCap prefix:

- ``<project>_records.csv``: the records export (raw codes, flat); the input this adapter reads;
- ``<project>_dictionary.csv``: the data dictionary, required beside it;
- ``<project>_events.csv`` and ``<project>_arms.csv``: the events and arms exports of a
  longitudinal project, optional. With the events, each row's arm comes from its event and an
  event outside them is rejected; without them, the arm is the ``_arm_<n>`` suffix of the event.

Grain: one bronze record per form instance with at least one value, i.e. per (record, event,
repeat instrument, repeat instance, form); a blank form (only its ``<form>_complete`` status) has
none. Entity ``redcap:<project>``; record id ``record|event|repeat instrument|instance|form``;
offset = the CSV line where the row starts (quoted notes may span lines). The payload:

    {"record_id": "12", "event": "baseline_arm_1", "arm": 1, "arm_name": "Knee arthroplasty",
     "repeat_instrument": null, "repeat_instance": null, "data_access_group": null,
     "form": "koos_jr", "form_status": 0, "form_state": "incomplete",
     "values": {"koos_jr_date": "2023-01-09", "koos_jr_1": "3", "comorbid": ["1", "4"]}}

``values`` holds raw codes as exported, in dictionary order; a checkbox field is the list of its
checked codes. Cells the parser rejects (a code that is not a choice, a value failing its
validation or range, a column outside the dictionary, a malformed row) become extraction rejects
with the parser's rule and the export column, never the value; the rest of the row still loads.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc

from patient_journey.errors import SourceError
from patient_journey.linkage import IdentityRelation, LinkSpec
from patient_journey.settings import JourneySettings
from patient_journey.sources.records import Extraction, InputSelection, read_new_files
from patient_journey.sources.redcap_export import (
    DataDictionary,
    EventDefinition,
    parse_arms,
    parse_dictionary,
    parse_events,
    parse_records,
)
from patient_journey.sources.source import ExtractJob, Source
from patient_journey.staging import PROM_SCORE_COLUMNS, StagedTable, declared
from patient_journey.storage import FileInfo, Storage

SOURCE = "redcap"
RECORDS_SUFFIX = "_records.csv"
DICTIONARY_SUFFIX = "_dictionary.csv"
EVENTS_SUFFIX = "_events.csv"
ARMS_SUFFIX = "_arms.csv"

RULE_DICTIONARY_PRESENT = "redcap_dictionary_present"
RULE_DICTIONARY_VALID = "redcap_dictionary_valid"
RULE_EVENTS_VALID = "redcap_events_valid"
RULE_EXPORT_READABLE = "redcap_export_readable"

_KEYS = ("record_id", "event", "arm", "repeat_instrument", "repeat_instance", "data_access_group")


def _optional(landing: Storage, url: str) -> bytes | None:
    try:
        return landing.read_bytes(url)
    except SourceError:
        return None


def form_records(
    records: pa.Table, completion: pa.Table, dictionary: DataDictionary, arm_names: dict[int, str]
) -> Iterator[tuple[str, int, dict[str, Any]]]:
    """(record id, line, payload) per form instance with a status or any value, in reading order."""
    checkbox = {f.name for f in dictionary.fields if f.field_type == "checkbox"}
    status: dict[tuple[int, str], tuple[int | None, str]] = {
        (line, form): (code, state)
        for line, form, code, state in zip(
            completion.column("source_line").to_pylist(),
            completion.column("form").to_pylist(),
            completion.column("status").to_pylist(),
            completion.column("state").to_pylist(),
            strict=True,
        )
    }
    forms: dict[tuple[int, str], dict[str, Any]] = {}
    columns = {
        name: records.column(name).to_pylist() for name in (*_KEYS, "form", "field", "value", "source_line")
    }
    for row in range(records.num_rows):
        line, form = columns["source_line"][row], columns["form"][row]
        payload = forms.get((line, form))
        if payload is None:
            keys = {name: columns[name][row] for name in _KEYS}
            code, state = status.get((line, form), (None, "no_status"))
            payload = {
                **keys,
                "arm_name": arm_names.get(keys["arm"]) if keys["arm"] is not None else None,
                "form": form,
                "form_status": code,
                "form_state": state,
                "values": {},
            }
            forms[(line, form)] = payload
        name, value = columns["field"][row], columns["value"][row]
        if name in checkbox:
            payload["values"].setdefault(name, []).append(value)
        else:
            payload["values"][name] = value
    # A form saved as unverified or complete with nothing in it is a form too: it loads blank (and
    # scores as incomplete). Status 0 with nothing filled is how REDCap exports a form never
    # started, so that is no form.
    for row in completion.filter(
        pc.is_in(completion.column("state"), pa.array(["unverified", "complete"]))
    ).to_pylist():
        line, form = row["source_line"], row["form"]
        if (line, form) not in forms:
            keys = {name: row.get(name) for name in _KEYS}
            forms[(line, form)] = {
                **keys,
                "arm_name": arm_names.get(keys["arm"]) if keys["arm"] is not None else None,
                "form": form,
                "form_status": row["status"],
                "form_state": row["state"],
                "values": {},
            }
    order = {form: index for index, form in enumerate(dictionary.forms)}
    field_order = {f.name: index for index, f in enumerate(dictionary.fields)}
    for line, form in sorted(forms, key=lambda key: (key[0], order[key[1]])):
        payload = forms[(line, form)]
        payload["values"] = dict(sorted(payload["values"].items(), key=lambda item: field_order[item[0]]))
        record_id = "|".join(
            "" if payload[name] is None else str(payload[name])
            for name in ("record_id", "event", "repeat_instrument", "repeat_instance", "form")
        )
        yield record_id, line, payload


def extract_project(
    out: Extraction,
    project: str,
    records_url: str,
    data: bytes,
    dictionary: bytes,
    events: bytes | None = None,
    arms: bytes | None = None,
) -> None:
    """One records export into bronze records and rejects (see the module docstring)."""
    entity = f"redcap:{project}"
    try:
        parsed_dictionary = parse_dictionary(dictionary)
    except SourceError as error:
        out.add_reject(entity, records_url, 0, RULE_DICTIONARY_VALID, str(error))
        return
    event_definitions: tuple[EventDefinition, ...] | None = None
    arm_names: dict[int, str] = {}
    try:
        if events is not None:
            event_definitions = parse_events(events)
        if arms is not None:
            arm_names = parse_arms(arms)
    except SourceError as error:
        out.add_reject(entity, records_url, 0, RULE_EVENTS_VALID, str(error))
        return
    try:
        parsed = parse_records(data, parsed_dictionary, event_definitions)
    except SourceError as error:
        out.add_reject(entity, records_url, 1, RULE_EXPORT_READABLE, str(error))
        return
    for line, column, rule, detail in zip(
        parsed.rejects.column("source_line").to_pylist(),
        parsed.rejects.column("field").to_pylist(),
        parsed.rejects.column("rule").to_pylist(),
        parsed.rejects.column("detail").to_pylist(),
        strict=True,
    ):
        out.add_reject(entity, records_url, line, rule, f"column {column}: {detail}" if column else detail)
    lines_loaded: set[int] = set()
    for record_id, line, payload in form_records(
        parsed.values, parsed.completion, parsed_dictionary, arm_names
    ):
        raw = orjson.dumps(payload)
        out.add_record(entity, record_id, raw.decode(), records_url, line, raw)
        lines_loaded.add(line)
    # Rows with no form instance and no reject (which counts them as quarantined): blank.
    rejected = set(parsed.rejects.column("source_line").to_pylist())
    out.blank_rows += parsed.rows_read - len(lines_loaded | rejected)


def extract(
    landing: Storage, prefix: str, seen: InputSelection, run_id: str, out: Extraction | None = None
) -> Extraction:
    """Read every records export under ``prefix`` not seen yet, with the files beside it."""
    out = out if out is not None else Extraction(SOURCE, run_id)

    def read_file(file: FileInfo, data: bytes) -> None:
        project = file.url.rsplit("/", 1)[-1][: -len(RECORDS_SUFFIX)]
        base = file.url[: -len(RECORDS_SUFFIX)]
        dictionary = _optional(landing, base + DICTIONARY_SUFFIX)
        if dictionary is None:
            out.add_reject(
                f"redcap:{project}",
                file.url,
                0,
                RULE_DICTIONARY_PRESENT,
                f"no data dictionary {project}{DICTIONARY_SUFFIX} beside the records export",
            )
            return
        events = _optional(landing, base + EVENTS_SUFFIX)
        arms = _optional(landing, base + ARMS_SUFFIX)
        extract_project(out, project, file.url, data, dictionary, events, arms)

    read_new_files(out, landing, prefix, (RECORDS_SUFFIX,), seen, read_file, "redcap")
    return out


# --------------------------------------------------------------------------- staged tables and links

STAGED: tuple[StagedTable, ...] = (
    declared(
        lambda at: StagedTable(
            "redcap_prom",
            "redcap_record",
            "redcap:prom",
            # One row per form instance of the REDCap project "prom"; patient_journey.prom keeps the
            # PROM forms (form name = catalog instrument id) and scores them. The MRN is on the
            # record's enrolment form (resolved over the record's rows); the timepoint is the event (baseline/week_6/month_6/month_12).
            f"""record_id AS redcap_row_id, {at("$.record_id")} AS redcap_record_id,
           {at("$.values.mrn")} AS mrn,
           {at("$.event")} AS event_name, try_cast({at("$.arm")} AS INTEGER) AS arm,
           try_cast({at("$.repeat_instance")} AS INTEGER) AS repeat_instance,
           {at("$.form")} AS instrument,
           CASE regexp_replace({at("$.event")}, '_arm_[0-9]+$', '') WHEN 'baseline' THEN 'baseline'
                WHEN 'week_6' THEN '6w' WHEN 'month_6' THEN '6m' WHEN 'month_12' THEN '12m' END AS timepoint,
           try_cast(json_extract_string(payload, '$.values.' || ({at("$.form")}) || '_date') AS DATE)
               AS collected_on,
           try_cast({at("$.form_status")} AS INTEGER) AS form_status,
           {PROM_SCORE_COLUMNS}, CAST(payload->'$.values' AS VARCHAR) AS items""",
            across_rows="max(mrn) OVER (PARTITION BY redcap_record_id) AS mrn",
            across_key="redcap_record_id",
        )
    ),
)

LINKS: tuple[LinkSpec, ...] = (
    LinkSpec(
        "redcap_prom",
        "prom_score",
        "redcap",
        "redcap_row_id",
        "s LEFT JOIN redcap_link k USING (redcap_record_id)",
        "mrn_links_to_patient",
        "k.patient_key, s.instrument, s.timepoint, s.score, s.collected_on, 'redcap' AS prom_source",
    ),
)

IDENTITY = (
    IdentityRelation(
        "redcap_link",
        """SELECT DISTINCT r.redcap_record_id, k.patient_key
        FROM staged_redcap_prom r JOIN mrn_link k USING (mrn)""",
        "SELECT 'redcap-record', redcap_record_id, patient_key FROM redcap_link",
    ),
)


class RedcapSource(Source):
    """REDCap records exports, read through their data dictionaries."""

    staged = STAGED
    kind = "outcome"
    links = LINKS
    identity = IDENTITY
    name = SOURCE
    bronze_table = "redcap_record"
    suffixes = (RECORDS_SUFFIX,)

    def prefix(self, settings: JourneySettings) -> str:
        return settings.sources.redcap_prefix

    def extract(self, job: ExtractJob) -> Extraction:
        return extract(job.landing, self.prefix(job.settings), job.seen, job.run_id, job.out)
