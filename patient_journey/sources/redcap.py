"""REDCap exports: a data dictionary CSV and a flat records CSV per project.

Files are paired by name: ``<project>_dictionary.csv`` with ``<project>_records.csv``. Each
records row becomes one bronze record (entity ``redcap:<project>``); its offset is the CSV line.
Columns that the dictionary does not define are rejected as a whole file, naming the column.
"""

from __future__ import annotations

import csv
import io

import orjson

from patient_journey.errors import SourceError
from patient_journey.sources.records import Extraction, InputSelection, new_files
from patient_journey.storage import Storage

SOURCE = "redcap"
DICTIONARY_SUFFIX = "_dictionary.csv"
RECORDS_SUFFIX = "_records.csv"
SYSTEM_COLUMNS = {
    "redcap_event_name",
    "redcap_repeat_instrument",
    "redcap_repeat_instance",
    "redcap_data_access_group",
}


def dictionary_columns(data: bytes) -> tuple[str, set[str]]:
    """The record id field (first field) and every column a records export may hold."""
    rows = list(csv.DictReader(io.StringIO(data.decode("utf-8-sig"))))
    if not rows:
        return "", set()
    name_key = next(iter(rows[0]))  # "Variable / Field Name"
    form_key = "Form Name"
    type_key = "Field Type"
    columns: set[str] = set()
    forms: set[str] = set()
    for row in rows:
        field = row[name_key]
        forms.add(row.get(form_key, ""))
        if row.get(type_key) == "checkbox":
            choices = row.get("Choices, Calculations, OR Slider Labels", "")
            for choice in choices.split("|"):
                code = choice.split(",", 1)[0].strip()
                columns.add(f"{field}___{code}")
        elif row.get(type_key) != "descriptive":
            columns.add(field)
    columns |= {f"{form}_complete" for form in forms if form}
    return rows[0][name_key], columns | SYSTEM_COLUMNS


def extract_project(out: Extraction, project: str, dictionary: bytes, records_url: str, data: bytes) -> None:
    entity = f"redcap:{project}"
    id_field, allowed = dictionary_columns(dictionary)
    reader = csv.reader(io.StringIO(data.decode("utf-8-sig"), newline=""))
    header = next(reader, None)
    if header is None:
        return
    unknown = [column for column in header if column not in allowed]
    if unknown:
        out.add_reject(entity, records_url, 1, "redcap_columns_in_dictionary", f"unknown column {unknown[0]}")
        return
    for row in reader:
        line = reader.line_num
        if len(row) != len(header):
            out.add_reject(
                entity, records_url, line, "redcap_row_width", f"{len(row)} of {len(header)} fields"
            )
            continue
        values = dict(zip(header, row, strict=True))
        record_id = "|".join(
            [
                values.get(id_field, ""),
                values.get("redcap_event_name", ""),
                values.get("redcap_repeat_instrument", ""),
                values.get("redcap_repeat_instance", ""),
            ]
        )
        raw = orjson.dumps(values)
        out.add_record(entity, record_id, raw.decode(), records_url, line, raw)


def extract(landing: Storage, prefix: str, seen: InputSelection, run_id: str) -> Extraction:
    """Read every records export under ``prefix`` not seen yet, with the dictionary beside it."""
    out = Extraction(SOURCE, run_id)
    for file, data in new_files(out, landing, prefix, (RECORDS_SUFFIX,), seen):
        project = file.url.rsplit("/", 1)[-1][: -len(RECORDS_SUFFIX)]
        dictionary_url = file.url[: -len(RECORDS_SUFFIX)] + DICTIONARY_SUFFIX
        try:
            dictionary = landing.read_bytes(dictionary_url)
        except SourceError:
            out.add_reject(
                f"redcap:{project}", file.url, 0, "redcap_dictionary_present", "no data dictionary beside it"
            )
            continue
        extract_project(out, project, dictionary, file.url, data)
    return out
