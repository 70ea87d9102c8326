"""REDCap exports read through the project's data dictionary: pure functions over bytes.

A REDCap project is described by its data dictionary (one row per field: form, type, choices,
validation, range, identifier flag). A records export is a wide CSV of raw codes: one row per
record, event (longitudinal projects), repeating instrument and instance, one column per field, one
column per checkbox choice (``field___code``) and one ``<form>_complete`` status column per form.

:func:`parse_records` turns that wide CSV into a long table, one row per non-blank value (grain:
one record x event x repeat instance x field x checked code), plus a small table of form statuses
and a table of rejects. Nothing here touches storage or Prefect; the adapter around it does.

Conventions worth knowing:

- ``source_line`` is the physical line where a CSV row starts, the header being line 1. Quoted
  values may span lines (addresses, notes), so it is not the row number.
- The record id column (the dictionary's first field) is the key of every row, not a value of its
  own; it never appears as a ``field``.
- Unchecked boxes (``0``) and blank cells produce no row; a checked box produces a row whose
  ``value`` and ``checkbox_code`` are the dictionary's code (export columns lowercase it).
- Rejects name the line, the export column and the rule, never the offending value. A bad cell is
  rejected alone: the other values of its row still load. A row whose keys are unusable (blank
  record id, malformed instance, unknown event, wrong number of columns) is rejected as a whole.
- Validation follows REDCap: raw exports write every date as Y-M-D whatever its display format;
  validation types not listed in ``VALIDATION_PATTERNS`` are not checked.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from patient_journey.errors import SourceError

RULE_FIELD_IN_DICTIONARY = "redcap_field_in_dictionary"
RULE_CHOICE_VALID = "redcap_choice_valid"
RULE_VALUE_VALID = "redcap_value_valid"
RULE_ROW_WELL_FORMED = "redcap_row_well_formed"
RULE_EVENT_DEFINED = "redcap_event_defined"

EVENT_COLUMN = "redcap_event_name"
ARM_COLUMN = "redcap_arm"
REPEAT_INSTRUMENT_COLUMN = "redcap_repeat_instrument"
REPEAT_INSTANCE_COLUMN = "redcap_repeat_instance"
DATA_ACCESS_GROUP_COLUMN = "redcap_data_access_group"
# Survey metadata that an export may carry; recognised so it is not rejected, but not a value.
SURVEY_COLUMNS = frozenset({"redcap_survey_identifier"})

# Where a value or a completion status sits: record x event x repeat instance x form.
_FORM_KEY = [
    pa.field("record_id", pa.string(), nullable=False),
    pa.field("event", pa.string()),
    pa.field("arm", pa.int32()),
    pa.field("repeat_instrument", pa.string()),
    pa.field("repeat_instance", pa.int32()),
    pa.field("data_access_group", pa.string()),
    pa.field("form", pa.string(), nullable=False),
]

VALUES_SCHEMA = pa.schema(
    [
        *_FORM_KEY,
        pa.field("field", pa.string(), nullable=False),
        pa.field("value", pa.string(), nullable=False),
        pa.field("value_label", pa.string()),
        pa.field("checkbox_code", pa.string()),
        pa.field("source_line", pa.int64(), nullable=False),
    ]
)
"""One row per non-blank value: record x event x repeat instance x field (x checked code)."""

COMPLETION_SCHEMA = pa.schema(
    [
        *_FORM_KEY,
        pa.field("status", pa.int8()),
        pa.field("state", pa.string(), nullable=False),
        pa.field("filled_count", pa.int32(), nullable=False),
        pa.field("source_line", pa.int64(), nullable=False),
    ]
)
"""One row per record x event x form x repeat instance that has a status or any filled cell.

``status`` is ``<form>_complete`` as exported (0 incomplete, 1 unverified, 2 complete; null when
blank, absent or invalid). ``filled_count`` counts the form's non-blank cells in that row (checked
boxes only; rejected values included). ``state`` reads both: ``not_started`` (status 0, nothing
filled), ``incomplete`` (status 0, something filled), ``unverified`` (1), ``complete`` (2), or
``no_status`` (the status is blank, absent or invalid).
"""

REJECTS_SCHEMA = pa.schema(
    [
        pa.field("source_line", pa.int64(), nullable=False),
        pa.field("field", pa.string()),
        pa.field("rule", pa.string(), nullable=False),
        pa.field("detail", pa.string(), nullable=False),
    ]
)
"""One row per broken rule: where (line, export column) and why; never the value itself."""

CHOICE_TYPES = frozenset({"radio", "dropdown", "checkbox", "yesno", "truefalse"})
IMPLIED_CHOICES: Mapping[str, Mapping[str, str]] = {
    "yesno": {"1": "Yes", "0": "No"},
    "truefalse": {"1": "True", "0": "False"},
}
VALIDATION_ALIASES: Mapping[str, str] = {
    "int": "integer",
    "float": "number",
    "date": "date_ymd",
    "datetime": "datetime_ymd",
    "datetime_seconds": "datetime_seconds_ymd",
}
_NUMBER = r"[-+]?[0-9]*\.?[0-9]+([eE][-+]?[0-9]+)?"
_NUMBER_COMMA = r"[-+]?[0-9]*[.,]?[0-9]+([eE][-+]?[0-9]+)?"
_DATE = r"[0-9]{4}-[0-9]{2}-[0-9]{2}"
_DATETIME = _DATE + r" [0-9]{2}:[0-9]{2}"
_DATETIME_SECONDS = _DATETIME + r":[0-9]{2}"
# REDCap's own North American phone rule (area code, exchange, number, optional extension).
_PHONE = (
    r"\(?([2-9]0[1-9]|[2-9]1[02-9]|[2-9][2-9][0-9])\)?\s*([.-]\s*)?"
    r"([2-9]1[02-9]|[2-9][02-9]1|[2-9][02-9]{2})\s*([.-]\s*)?[0-9]{4}"
    r"(\s*(#|x\.?|ext\.?|extension)\s*[0-9]+)?"
)
VALIDATION_PATTERNS: Mapping[str, str] = {
    "integer": r"[-+]?[0-9]+",
    "number": _NUMBER,
    "number_comma_decimal": _NUMBER_COMMA,
    **{f"number_{n}dp": rf"[-+]?[0-9]+\.[0-9]{{{n}}}" for n in range(1, 5)},
    **{f"number_{n}dp_comma_decimal": rf"[-+]?[0-9]+[.,][0-9]{{{n}}}" for n in range(1, 5)},
    **{f"date_{order}": _DATE for order in ("ymd", "mdy", "dmy")},
    **{f"datetime_{order}": _DATETIME for order in ("ymd", "mdy", "dmy")},
    **{f"datetime_seconds_{order}": _DATETIME_SECONDS for order in ("ymd", "mdy", "dmy")},
    "time": r"([01][0-9]|2[0-3]):[0-5][0-9]",
    "time_hh_mm_ss": r"([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]",
    "time_mm_ss": r"[0-5][0-9]:[0-5][0-9]",
    "email": r"[^\s@]+@[^\s@]+\.[^\s@]+",
    "phone": _PHONE,
    "zipcode": r"[0-9]{5}(-[0-9]{4})?",
    "alpha_only": r"[A-Za-z]+",
    # Not REDCap validation names: the kinds given to sliders and calculated fields.
    "slider": _NUMBER,
    "calc": _NUMBER,
}
"""Validation type -> the raw export's format (RE2, matched in full)."""

_CALENDAR_FORMATS: Mapping[str, str] = {
    **{f"date_{order}": "%Y-%m-%d" for order in ("ymd", "mdy", "dmy")},
    **{f"datetime_{order}": "%Y-%m-%d %H:%M" for order in ("ymd", "mdy", "dmy")},
    **{f"datetime_seconds_{order}": "%Y-%m-%d %H:%M:%S" for order in ("ymd", "mdy", "dmy")},
}
_NUMERIC_KINDS = frozenset(
    kind for kind in VALIDATION_PATTERNS if kind in {"integer", "slider", "calc"} or kind.startswith("number")
)
_ORDERED_TEXT_KINDS = frozenset(kind for kind in VALIDATION_PATTERNS if kind.startswith(("date", "time")))
_SLIDER_RANGE = ("0", "100")  # REDCap's default when the dictionary gives none

# Data dictionary headers, REDCap's download form and the API's snake_case form, to one name.
_DICTIONARY_HEADERS: Mapping[str, str] = {
    "variable / field name": "field_name",
    "form name": "form_name",
    "section header": "section_header",
    "field type": "field_type",
    "field label": "field_label",
    "choices, calculations, or slider labels": "select_choices_or_calculations",
    "field note": "field_note",
    "text validation type or show slider number": "text_validation_type_or_show_slider_number",
    "text validation min": "text_validation_min",
    "text validation max": "text_validation_max",
    "identifier?": "identifier",
    "branching logic (show field only if...)": "branching_logic",
    "required field?": "required_field",
    "custom alignment": "custom_alignment",
    "question number (surveys only)": "question_number",
    "matrix group name": "matrix_group_name",
    "matrix ranking?": "matrix_ranking",
    "field annotation": "field_annotation",
}
_REQUIRED_DICTIONARY_COLUMNS = ("field_name", "form_name", "field_type")
# R's write.csv writes missing cells as NA (simple/metadata.csv); REDCap itself never does. In the
# records export, too, a cell holding exactly NA is missing (_na_as_blank).
_MISSING = frozenset({"", "NA"})


@dataclass(frozen=True)
class FieldDefinition:
    """One row of a REDCap data dictionary."""

    name: str
    form: str
    field_type: str
    label: str = ""
    choices: Mapping[str, str] = field(default_factory=dict)
    """Code -> label, in dictionary order: radio, dropdown, checkbox, and yesno/truefalse implied."""
    validation: str | None = None
    """Text validation type (``date_ymd``, ``integer``, ``number``, ...), aliases normalised."""
    minimum: str | None = None
    maximum: str | None = None
    identifier: bool = False
    calculation: str | None = None
    """The formula of a calc field (REDCap keeps it in the choices column)."""

    @property
    def checkbox_columns(self) -> dict[str, str]:
        """Export column -> choice code, for a checkbox field (empty otherwise)."""
        if self.field_type != "checkbox":
            return {}
        return {f"{self.name}___{checkbox_column_code(code)}": code for code in self.choices}

    @property
    def kind(self) -> str:
        """How values are checked: ``checkbox``, ``choice``, a key of ``VALIDATION_PATTERNS``, or ``free``."""
        if self.field_type == "checkbox":
            return "checkbox"
        if self.field_type in CHOICE_TYPES and self.choices:
            return "choice"
        if self.field_type in ("slider", "calc"):
            return self.field_type
        if (
            self.field_type == "text"
            and self.validation is not None
            and self.validation in VALIDATION_PATTERNS
        ):
            return self.validation
        return "free"

    @property
    def has_column(self) -> bool:
        """Whether the field has a column of its own in a records export."""
        return self.field_type not in ("checkbox", "descriptive")


@dataclass(frozen=True)
class DataDictionary:
    """A project's fields in dictionary order; the first one is the record id."""

    fields: tuple[FieldDefinition, ...]
    _by_name: Mapping[str, FieldDefinition] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.fields:
            raise SourceError("REDCap data dictionary: it defines no field; export it again with its fields.")
        object.__setattr__(self, "_by_name", {f.name: f for f in self.fields})

    @property
    def record_id_field(self) -> str:
        return self.fields[0].name

    @property
    def forms(self) -> tuple[str, ...]:
        """Form (instrument) names in dictionary order."""
        return tuple(dict.fromkeys(f.form for f in self.fields))

    def field_named(self, name: str) -> FieldDefinition:
        try:
            return self._by_name[name]
        except KeyError:
            raise SourceError(f"REDCap data dictionary: no field named {name!r}.") from None

    def __contains__(self, name: object) -> bool:
        return name in self._by_name


@dataclass(frozen=True)
class EventDefinition:
    """One event of a longitudinal project (an ``events`` export: event.csv)."""

    unique_event_name: str
    arm: int
    event_name: str = ""
    event_id: int | None = None


@dataclass(frozen=True)
class RedcapRecords:
    """A parsed records export: values (``VALUES_SCHEMA``), form statuses, rejects."""

    values: pa.Table
    completion: pa.Table
    rejects: pa.Table
    rows_read: int
    """Data rows in the export, malformed ones included, blank lines not."""


def checkbox_column_code(code: str) -> str:
    """A checkbox code as REDCap writes it in ``field___code`` export column names.

    ``-`` and ``.`` become ``_``, letters are lowercased, anything outside ``[a-z0-9_]`` is
    dropped (as REDCap's ``Project::getExtendedCheckboxCodeFormatted`` does).
    """
    return re.sub(r"[^a-z0-9_]", "", code.replace("-", "_").replace(".", "_").lower())


def parse_choices(text: str) -> dict[str, str]:
    """``"1, Yes | 0, No"`` -> ``{"1": "Yes", "0": "No"}``; a choice without a comma is its own code."""
    choices: dict[str, str] = {}
    for part in text.split("|"):
        if not part.strip():
            continue
        code, comma, label = part.partition(",")
        choices[code.strip()] = label.strip() if comma else code.strip()
    return choices


def parse_dictionary(data: bytes | str) -> DataDictionary:
    """Parse a data dictionary CSV, REDCap's download headers or the API's snake_case ones."""
    rows = _csv_rows(data, "data dictionary")
    header = [_DICTIONARY_HEADERS.get(name.strip().lower(), name.strip().lower()) for name in rows[0]]
    missing = [name for name in _REQUIRED_DICTIONARY_COLUMNS if name not in header]
    if missing:
        raise SourceError(
            f"REDCap data dictionary: no {', '.join(missing)} column. Expected REDCap's headers "
            "('Variable / Field Name', 'Form Name', 'Field Type', ...) or the API's (field_name, "
            "form_name, field_type, ...); check that the file is a data dictionary."
        )
    position = {name: index for index, name in reversed(list(enumerate(header)))}
    fields: list[FieldDefinition] = []
    seen: set[str] = set()
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise SourceError(
                f"REDCap data dictionary: line {line} has {len(row)} columns where the header has "
                f"{len(header)}; export the dictionary again."
            )

        def cell(name: str, row: list[str] = row) -> str:
            index = position.get(name)
            value = row[index].strip() if index is not None else ""
            return "" if value in _MISSING else value

        name = row[position["field_name"]].strip()
        if not name or name in seen:
            problem = "has no field name" if not name else f"repeats field {name!r}"
            raise SourceError(f"REDCap data dictionary: line {line} {problem}; fix the dictionary.")
        seen.add(name)
        field_type = cell("field_type").lower()
        choices_text = cell("select_choices_or_calculations")
        validation = cell("text_validation_type_or_show_slider_number").lower() or None
        if field_type == "slider":
            validation = None  # that column only says whether to show the number
        elif validation is not None:
            validation = VALIDATION_ALIASES.get(validation, validation)
        if field_type in IMPLIED_CHOICES:
            choices = dict(IMPLIED_CHOICES[field_type])
        elif field_type in CHOICE_TYPES:
            choices = parse_choices(choices_text)
        else:
            choices = {}
        fields.append(
            FieldDefinition(
                name=name,
                form=row[position["form_name"]].strip(),
                field_type=field_type,
                label=row[position["field_label"]].strip() if "field_label" in position else "",
                choices=choices,
                validation=validation,
                minimum=cell("text_validation_min") or None,
                maximum=cell("text_validation_max") or None,
                identifier=cell("identifier").lower() in ("y", "yes", "1", "true"),
                calculation=(choices_text or None) if field_type == "calc" else None,
            )
        )
    return DataDictionary(tuple(fields))


def parse_events(data: bytes | str) -> tuple[EventDefinition, ...]:
    """Parse an events export (``event_name, arm_num, unique_event_name, ..., event_id``)."""
    rows = _csv_rows(data, "events export")
    header = [name.strip().lower() for name in rows[0]]
    for required in ("unique_event_name", "arm_num"):
        if required not in header:
            raise SourceError(f"REDCap events export: no {required} column; export the project's events.")
    events: list[EventDefinition] = []
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        values = dict(zip(header, (cell.strip() for cell in row), strict=False))
        arm = values.get("arm_num", "")
        event_id = values.get("event_id", "")
        if not arm.isdigit() or (event_id and not event_id.isdigit()):
            raise SourceError(f"REDCap events export: line {line} has a non-numeric arm_num or event_id.")
        events.append(
            EventDefinition(
                unique_event_name=values["unique_event_name"],
                arm=int(arm),
                event_name=values.get("event_name", ""),
                event_id=int(event_id) if event_id else None,
            )
        )
    return tuple(events)


def parse_arms(data: bytes | str) -> dict[int, str]:
    """Parse an arms export (``arm_num, name``) into arm number -> name."""
    rows = _csv_rows(data, "arms export")
    header = [name.strip().lower() for name in rows[0]]
    if "arm_num" not in header or "name" not in header:
        raise SourceError("REDCap arms export: expected the columns arm_num and name.")
    arms: dict[int, str] = {}
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        values = dict(zip(header, (cell.strip() for cell in row), strict=False))
        if not values.get("arm_num", "").isdigit():
            raise SourceError(f"REDCap arms export: line {line} has a non-numeric arm_num.")
        arms[int(values["arm_num"])] = values.get("name", "")
    return arms


def parse_records(
    data: bytes | str,
    dictionary: DataDictionary,
    events: Iterable[EventDefinition] | None = None,
) -> RedcapRecords:
    """Parse a records export (raw codes) into long values, form statuses and rejects.

    ``events`` (from :func:`parse_events`) is optional: with it, each row's arm comes from the
    event definitions and an event not among them is rejected (``redcap_event_defined``); without
    it, the arm is ``redcap_arm`` or the ``_arm_N`` suffix of the unique event name.
    """
    raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    raw = raw.removeprefix(b"\xef\xbb\xbf")
    header = _header(raw)
    layout = _Layout.build(header, dictionary)
    rejects = _Rejects()
    for column, rule, detail in layout.header_rejects:
        rejects.add(np.array([1], dtype=np.int64), column, rule, detail)

    table, lines, invalid = _read_table(raw, len(header))
    for line, actual in invalid:
        rejects.add(
            np.array([line], dtype=np.int64),
            None,
            RULE_ROW_WELL_FORMED,
            f"{actual} columns where the header has {len(header)}; the row is not loaded",
        )
    body = table.slice(1)
    body_lines = lines[1:]
    blank = _all_blank(body)
    rows_read = int((~blank).sum()) + len(invalid)
    keys, keep = _row_keys(body, body_lines, blank, layout, dictionary, events, rejects)
    body = body.filter(pa.array(keep))
    body_lines = body_lines[keep]
    keys = {name: array.filter(pa.array(keep)) for name, array in keys.items()}

    cells = _Cells.unpivot(body, layout.slots)
    values = _values(cells, layout.slots, keys, body_lines, rejects)
    completion = _completion(cells, body, layout, dictionary, keys, body_lines, rejects)
    return RedcapRecords(values=values, completion=completion, rejects=rejects.table(), rows_read=rows_read)


# --- reading -------------------------------------------------------------------------------------


def _csv_rows(data: bytes | str, what: str) -> list[list[str]]:
    try:
        text = data.decode("utf-8-sig") if isinstance(data, bytes) else data.removeprefix("\ufeff")
        rows = list(csv.reader(io.StringIO(text, newline="")))
    except (UnicodeDecodeError, csv.Error) as error:
        raise SourceError(f"REDCap {what}: the file is not a UTF-8 CSV ({error}); export it again.") from None
    if not rows or not any(cell.strip() for cell in rows[0]):
        raise SourceError(f"REDCap {what}: the file is empty or has no header line.")
    return rows


def _header(raw: bytes) -> list[str]:
    end = raw.find(b"\n")
    first = raw if end < 0 else raw[: end + 1]
    try:
        header = next(csv.reader(io.StringIO(first.decode("utf-8"), newline="")), [])
    except (UnicodeDecodeError, csv.Error) as error:
        raise SourceError(f"REDCap records export: the header line does not parse ({error}).") from None
    if not any(name.strip() for name in header):
        raise SourceError("REDCap records export: the file is empty or has no header line.")
    return [name.strip() for name in header]


def _read_table(raw: bytes, width: int) -> tuple[pa.Table, npt.NDArray[np.int64], list[tuple[int, int]]]:
    """All rows (header first) as strings, the line each starts on, and the malformed rows.

    The serial reader numbers rows, malformed ones included; a row's physical lines are one plus
    the line breaks inside its quoted values, so start lines follow from a cumulative sum.
    """
    names = [f"c{index}" for index in range(width)]
    invalid: list[tuple[int, int, str]] = []

    def skip_invalid(row: Any) -> str:
        invalid.append((row.number, row.actual_columns, row.text))
        return "skip"

    try:
        table = pacsv.read_csv(
            pa.py_buffer(raw),
            read_options=pacsv.ReadOptions(column_names=names, use_threads=False),
            parse_options=pacsv.ParseOptions(
                newlines_in_values=True, ignore_empty_lines=False, invalid_row_handler=skip_invalid
            ),
            convert_options=pacsv.ConvertOptions(
                column_types=dict.fromkeys(names, pa.string()),
                strings_can_be_null=False,
                quoted_strings_can_be_null=False,
            ),
        )
    except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
        raise SourceError(f"REDCap records export: the CSV does not parse ({error}).") from None
    total = table.num_rows + len(invalid)
    numbers = np.array([number for number, _, _ in invalid], dtype=np.int64)
    if numbers.size and (numbers.min() < 2 or numbers.max() > total):
        raise SourceError("REDCap records export: malformed rows could not be placed; check the CSV.")
    is_invalid = np.zeros(total, dtype=bool)
    is_invalid[numbers - 1] = True
    physical = np.ones(total, dtype=np.int64)
    breaks = np.zeros(table.num_rows, dtype=np.int64)
    for column in table.columns:
        breaks += _line_breaks(column)
    physical[~is_invalid] += breaks
    physical[numbers - 1] += np.array([_text_line_breaks(text) for _, _, text in invalid], dtype=np.int64)
    starts = np.concatenate([[1], 1 + np.cumsum(physical)[:-1]]).astype(np.int64)
    return (
        _na_as_blank(table),
        starts[~is_invalid],
        [(int(starts[n - 1]), actual) for n, actual, _ in invalid],
    )


def _na_as_blank(table: pa.Table) -> pa.Table:
    """Data cells holding exactly ``NA`` (R's write.csv for a missing value, as REDCapR's exports
    have it) as blank, in every field: one meaning, not a rejected code here and the text "NA"
    there. The header row (row 0) is left alone."""
    data = np.arange(table.num_rows) > 0
    columns = [
        pc.if_else(pa.array(data & _mask(pc.equal(column, "NA"))), pa.scalar("", pa.string()), column)
        for column in table.columns
    ]
    return pa.table(columns, names=table.column_names)


def _line_breaks(column: pa.ChunkedArray) -> npt.NDArray[np.int64]:
    """Line breaks in each value as Python's csv module counts them (CRLF, LF or CR)."""
    counts = [pc.count_substring(column, pattern) for pattern in ("\n", "\r", "\r\n")]
    total = pc.subtract(pc.add(counts[0], counts[1]), counts[2])
    return np.asarray(total.to_numpy(), dtype=np.int64)


def _text_line_breaks(text: str | None) -> int:
    text = text or ""
    return text.count("\n") + text.count("\r") - text.count("\r\n")


def _all_blank(table: pa.Table) -> npt.NDArray[np.bool_]:
    blank = np.ones(table.num_rows, dtype=bool)
    for column in table.columns:
        blank &= _is_blank(column)
    return blank


def _is_blank(column: pa.ChunkedArray | pa.Array) -> npt.NDArray[np.bool_]:
    return np.asarray(pc.equal(column, "").to_numpy(zero_copy_only=False), dtype=bool)


def _mask(condition: Any) -> npt.NDArray[np.bool_]:
    return np.asarray(pc.fill_null(condition, False).to_numpy(zero_copy_only=False), dtype=bool)


# --- the header ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Slot:
    """A value column of the export: the field it holds and, for a checkbox column, its code."""

    column: int
    name: str
    field: FieldDefinition
    form_index: int
    code: str | None = None


@dataclass(frozen=True)
class _Layout:
    record_id: int
    system: Mapping[str, int]
    slots: tuple[_Slot, ...]
    status: Mapping[str, int]
    header_rejects: tuple[tuple[str, str, str], ...]

    @classmethod
    def build(cls, header: Sequence[str], dictionary: DataDictionary) -> _Layout:
        forms = dictionary.forms
        form_index = {form: index for index, form in enumerate(forms)}
        checkbox_columns = {
            column: (definition, code)
            for definition in dictionary.fields
            for column, code in definition.checkbox_columns.items()
        }
        status_columns = {f"{form}_complete": form for form in forms}
        timestamp_columns = {f"{form}_timestamp" for form in forms}
        system_names = {
            EVENT_COLUMN,
            ARM_COLUMN,
            REPEAT_INSTRUMENT_COLUMN,
            REPEAT_INSTANCE_COLUMN,
            DATA_ACCESS_GROUP_COLUMN,
        }
        record_id = -1
        system: dict[str, int] = {}
        slots: list[_Slot] = []
        status: dict[str, int] = {}
        rejects: list[tuple[str, str, str]] = []
        seen: set[str] = set()
        for index, name in enumerate(header):
            if name in seen:
                rejects.append(
                    (name, RULE_ROW_WELL_FORMED, "the column appears twice; the later copy is ignored")
                )
                continue
            seen.add(name)
            if name == dictionary.record_id_field:
                record_id = index
            elif name in system_names:
                system[name] = index
            elif name in dictionary and dictionary.field_named(name).has_column:
                definition = dictionary.field_named(name)
                slots.append(_Slot(index, name, definition, form_index[definition.form]))
            elif name in checkbox_columns:
                definition, code = checkbox_columns[name]
                slots.append(_Slot(index, name, definition, form_index[definition.form], code))
            elif name in status_columns:
                status[status_columns[name]] = index
            elif name in SURVEY_COLUMNS or name in timestamp_columns:
                continue
            else:
                rejects.append(
                    (
                        name,
                        RULE_FIELD_IN_DICTIONARY,
                        "the column is not a field, checkbox choice or form status of the data "
                        "dictionary; its values are not loaded",
                    )
                )
        if record_id < 0:
            raise SourceError(
                f"REDCap records export: no {dictionary.record_id_field!r} column, the first field of "
                "the data dictionary; check that the dictionary belongs to this export."
            )
        return cls(record_id, system, tuple(slots), status, tuple(rejects))


# --- rows and their keys -------------------------------------------------------------------------


class _Rejects:
    def __init__(self) -> None:
        self._parts: list[pa.Table] = []

    def add(
        self, lines: npt.NDArray[np.int64], column: str | pa.Array | None, rule: str, detail: str | pa.Array
    ) -> None:
        if lines.size == 0:
            return
        count = int(lines.size)
        fields = column if isinstance(column, pa.Array) else pa.array([column] * count, pa.string())
        details = detail if isinstance(detail, pa.Array) else pa.array([detail] * count, pa.string())
        self._parts.append(
            pa.Table.from_arrays(
                [pa.array(lines, pa.int64()), fields, pa.array([rule] * count, pa.string()), details],
                schema=REJECTS_SCHEMA,
            )
        )

    def table(self) -> pa.Table:
        if not self._parts:
            return REJECTS_SCHEMA.empty_table()
        table = pa.concat_tables(self._parts)
        return table.sort_by([("source_line", "ascending"), ("rule", "ascending"), ("field", "ascending")])


def _nullable(column: pa.ChunkedArray) -> pa.Array:
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return pc.if_else(pc.equal(array, ""), pa.scalar(None, pa.string()), array)


def _row_keys(
    body: pa.Table,
    lines: npt.NDArray[np.int64],
    blank: npt.NDArray[np.bool_],
    layout: _Layout,
    dictionary: DataDictionary,
    events: Iterable[EventDefinition] | None,
    rejects: _Rejects,
) -> tuple[dict[str, pa.Array], npt.NDArray[np.bool_]]:
    """The key columns of every row, and which rows to keep (blank lines and bad keys go)."""
    rows = body.num_rows
    keep = ~blank
    dropped = "; the row is not loaded"

    def reject(bad: npt.NDArray[np.bool_], column: str, rule: str, detail: str) -> None:
        nonlocal keep
        bad = bad & ~blank
        rejects.add(lines[bad], column, rule, detail + dropped)
        keep = keep & ~bad

    record_id = body.column(layout.record_id).combine_chunks()
    reject(_is_blank(record_id), dictionary.record_id_field, RULE_ROW_WELL_FORMED, "the record id is blank")

    def system(name: str) -> pa.Array:
        if name in layout.system:
            return _nullable(body.column(layout.system[name]))
        return pa.nulls(rows, pa.string())

    event = system(EVENT_COLUMN)
    if EVENT_COLUMN in layout.system:
        reject(_mask(pc.is_null(event)), EVENT_COLUMN, RULE_ROW_WELL_FORMED, "the event name is blank")

    instance_text = system(REPEAT_INSTANCE_COLUMN)
    instance_ok = pc.match_substring_regex(instance_text, r"^[1-9][0-9]{0,8}$")
    reject(
        _mask(pc.invert(instance_ok)),
        REPEAT_INSTANCE_COLUMN,
        RULE_VALUE_VALID,
        "the repeat instance is not a whole number from 1",
    )
    instance = pc.cast(pc.if_else(instance_ok, instance_text, pa.scalar(None, pa.string())), pa.int32())

    instrument = system(REPEAT_INSTRUMENT_COLUMN)
    known_form = pc.is_in(instrument, value_set=pa.array(dictionary.forms, pa.string()))
    reject(
        _mask(pc.and_(pc.is_valid(instrument), pc.invert(known_form))),
        REPEAT_INSTRUMENT_COLUMN,
        RULE_VALUE_VALID,
        "the repeat instrument is not a form of the data dictionary",
    )

    arm_text = system(ARM_COLUMN)
    if ARM_COLUMN in layout.system:
        arm_ok = pc.match_substring_regex(arm_text, r"^[0-9]{1,9}$")
        reject(_mask(pc.invert(arm_ok)), ARM_COLUMN, RULE_VALUE_VALID, "the arm is not a whole number")
        arm = pc.cast(pc.if_else(arm_ok, arm_text, pa.scalar(None, pa.string())), pa.int32())
    elif events is not None:
        defined = list(events)
        position = pc.index_in(event, value_set=pa.array([e.unique_event_name for e in defined], pa.string()))
        reject(
            _mask(pc.and_(pc.is_valid(event), pc.is_null(position))),
            EVENT_COLUMN,
            RULE_EVENT_DEFINED,
            "the event is not among the project's events",
        )
        arm = pa.array([e.arm for e in defined], pa.int32()).take(position)
    else:
        suffix = pc.extract_regex(event, r"_arm_(?P<arm>[0-9]{1,9})$")
        arm = pc.cast(pc.struct_field(suffix, "arm"), pa.int32())

    keys = {
        "record_id": record_id,
        "event": event,
        "arm": arm,
        "repeat_instrument": instrument,
        "repeat_instance": instance,
        "data_access_group": system(DATA_ACCESS_GROUP_COLUMN),
    }
    return keys, keep


# --- values --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Cells:
    """Every non-blank cell of the value columns (unchecked boxes left out), column by column."""

    text: pa.Array
    row: npt.NDArray[np.int64]
    slot: npt.NDArray[np.int64]

    @classmethod
    def unpivot(cls, body: pa.Table, slots: Sequence[_Slot]) -> _Cells:
        texts: list[pa.Array] = []
        rows: list[npt.NDArray[np.int64]] = []
        counts: list[int] = []
        for slot in slots:
            column = body.column(slot.column).combine_chunks()
            filled = pc.not_equal(column, "")
            if slot.code is not None:
                filled = pc.and_(filled, pc.not_equal(column, "0"))
            index = pc.indices_nonzero(filled)
            texts.append(column.take(index))
            rows.append(np.asarray(index.to_numpy(), dtype=np.int64))
            counts.append(len(index))
        text = pa.concat_arrays(texts) if texts else pa.array([], pa.string())
        row = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
        slot_of = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
        return cls(text, row, slot_of)


def _strings(values: Iterable[str | None]) -> pa.Array:
    return pa.array(list(values), pa.string())


def _values(
    cells: _Cells,
    slots: Sequence[_Slot],
    keys: Mapping[str, pa.Array],
    lines: npt.NDArray[np.int64],
    rejects: _Rejects,
) -> pa.Table:
    """Check every cell against its field and return the good ones in ``VALUES_SCHEMA``."""
    count = len(cells.text)
    # Choices (and checked boxes) by one lookup of "slot<US>code": validity and label at once.
    choice_keys: list[str] = []
    choice_labels: list[str] = []
    for number, slot in enumerate(slots):
        if slot.code is not None:
            choice_keys.append(f"{number}\x1f1")
            choice_labels.append(slot.field.choices[slot.code])
        elif slot.field.kind == "choice":
            for code, label in slot.field.choices.items():
                choice_keys.append(f"{number}\x1f{code}")
                choice_labels.append(label)

    kind_names = sorted({slot.field.kind for slot in slots})
    slot_kind = np.array([kind_names.index(slot.field.kind) for slot in slots] or [0], dtype=np.int64)
    kinds = slot_kind[cells.slot]
    valid = np.ones(count, dtype=bool)
    in_range = np.ones(count, dtype=bool)
    label_position = np.full(count, -1, dtype=np.int64)
    for number, kind in enumerate(kind_names):
        where = np.flatnonzero(kinds == number)
        if where.size == 0:
            continue
        text = cells.text.take(pa.array(where, pa.int64()))
        if kind in ("choice", "checkbox"):
            slot_text = pc.cast(pa.array(cells.slot[where], pa.int64()), pa.string())
            cell_keys = pc.binary_join_element_wise(slot_text, text, "\x1f")
            found = pc.index_in(cell_keys, value_set=pa.array(choice_keys, pa.string()))
            position = np.asarray(pc.fill_null(found, -1).to_numpy(), dtype=np.int64)
            label_position[where] = position
            valid[where] = position >= 0
        elif kind in VALIDATION_PATTERNS:
            ok, ranged = _check(kind, text, cells.slot[where], slots)
            valid[where] = ok
            in_range[where] = ranged

    slot_names = [slot.name for slot in slots]
    details = {
        RULE_CHOICE_VALID: [_choice_detail(slot.field) for slot in slots],
        "format": [
            "a checkbox column holds 0 or 1"
            if slot.code is not None
            else f"not a valid {slot.field.validation or slot.field.kind} value"
            for slot in slots
        ],
        "range": [f"outside the dictionary's range {_range_text(slot.field)}" for slot in slots],
    }
    is_choice = np.array([slot.field.kind == "choice" for slot in slots] or [False])[cells.slot]
    for reason, bad, rule in (
        (RULE_CHOICE_VALID, ~valid & is_choice, RULE_CHOICE_VALID),
        ("format", ~valid & ~is_choice, RULE_VALUE_VALID),
        ("range", valid & ~in_range, RULE_VALUE_VALID),
    ):
        where = np.flatnonzero(bad)
        if where.size:
            slot_of = pa.array(cells.slot[where])
            rejects.add(
                lines[cells.row[where]],
                _strings(slot_names).take(slot_of),
                rule,
                _strings(details[reason]).take(slot_of),
            )

    good = np.flatnonzero(valid & in_range)
    # Reading order: row by row (lines grow with rows), columns in export order.
    good = good[np.argsort(cells.row[good] * max(len(slots), 1) + cells.slot[good], kind="stable")]
    take_good = pa.array(good, pa.int64())
    rows = pa.array(cells.row[good], pa.int64())
    slot_of = pa.array(cells.slot[good], pa.int64())
    codes = _strings([slot.code for slot in slots]).take(slot_of)
    columns = {
        **{name: array.take(rows) for name, array in keys.items()},
        "form": _strings([slot.field.form for slot in slots]).take(slot_of),
        "field": _strings([slot.field.name for slot in slots]).take(slot_of),
        "value": pc.coalesce(codes, cells.text.take(take_good)),
        "value_label": pa.array(choice_labels, pa.string()).take(
            pa.array(label_position[good], pa.int64(), mask=label_position[good] < 0)
        ),
        "checkbox_code": codes,
        "source_line": pa.array(lines[cells.row[good]], pa.int64()),
    }
    return pa.Table.from_arrays([columns[name] for name in VALUES_SCHEMA.names], schema=VALUES_SCHEMA)


def _check(
    kind: str, text: pa.Array, slot_of: npt.NDArray[np.int64], slots: Sequence[_Slot]
) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
    """Whether each value has the kind's format, and whether it is within its field's range."""
    ok = _mask(pc.match_substring_regex(text, f"^(?:{VALIDATION_PATTERNS[kind]})$"))
    calendar = _CALENDAR_FORMATS.get(kind)
    if calendar is not None:
        # strptime rolls 2015-02-30 over to March; printing it back shows the difference.
        parsed = pc.strptime(text, format=calendar, unit="s", error_is_null=True)
        ok &= _mask(pc.equal(pc.strftime(parsed, format=calendar), text))
    in_range = np.ones(len(text), dtype=bool)
    bounds = [_bounds(kind, slot.field) for slot in slots]
    if kind in _NUMERIC_KINDS:
        number = np.full(len(text), np.nan)
        where = np.flatnonzero(ok)
        decimal = pc.replace_substring(text.take(pa.array(where)), ",", ".")
        number[where] = np.asarray(pc.cast(decimal, pa.float64()).to_numpy(zero_copy_only=False), dtype=float)
        low = np.array([_float(low) for low, _ in bounds], dtype=float)[slot_of]
        high = np.array([_float(high) for _, high in bounds], dtype=float)[slot_of]
        in_range = ~((number < low) | (number > high))
    elif kind in _ORDERED_TEXT_KINDS:
        pattern = re.compile(VALIDATION_PATTERNS[kind])
        for side, compare in ((0, pc.less), (1, pc.greater)):
            usable = [_usable_bound(pattern, b[side]) for b in bounds]
            limit = _strings(usable).take(pa.array(slot_of, pa.int64()))
            in_range &= ~_mask(compare(text, limit))
    return ok, in_range | ~ok


def _usable_bound(pattern: re.Pattern[str], bound: str | None) -> str | None:
    return bound if bound is not None and pattern.fullmatch(bound) else None


def _bounds(kind: str, definition: FieldDefinition) -> tuple[str | None, str | None]:
    if kind == "slider":
        return definition.minimum or _SLIDER_RANGE[0], definition.maximum or _SLIDER_RANGE[1]
    return definition.minimum, definition.maximum


def _float(text: str | None) -> float:
    try:
        return float(text.replace(",", ".")) if text else np.nan
    except ValueError:
        return np.nan  # "today", "now" or a typo: no bound rather than a wrong one


def _choice_detail(definition: FieldDefinition) -> str:
    codes = list(definition.choices)
    shown = ", ".join(codes[:12]) + (", ..." if len(codes) > 12 else "")
    return f"not one of the field's {len(codes)} choice codes ({shown})"


def _range_text(definition: FieldDefinition) -> str:
    low, high = _bounds(definition.kind, definition)
    return f"[{low or ''}, {high or ''}]"


# --- form status ---------------------------------------------------------------------------------


def _completion(
    cells: _Cells,
    body: pa.Table,
    layout: _Layout,
    dictionary: DataDictionary,
    keys: Mapping[str, pa.Array],
    lines: npt.NDArray[np.int64],
    rejects: _Rejects,
) -> pa.Table:
    """Per row and form: ``<form>_complete`` and how many of the form's cells are filled."""
    rows = body.num_rows
    forms = dictionary.forms
    form_of_slot = np.array([slot.form_index for slot in layout.slots] or [0], dtype=np.int64)
    filled = np.bincount(
        cells.row * len(forms) + form_of_slot[cells.slot], minlength=rows * len(forms)
    ).reshape(rows, len(forms))
    parts: list[pa.Table] = []
    for index, form in enumerate(forms):
        if form in layout.status:
            status_text = _nullable(body.column(layout.status[form]))
        else:
            status_text = pa.nulls(rows, pa.string())
        status_ok = _mask(pc.is_in(status_text, value_set=pa.array(["0", "1", "2"])))
        given = _mask(pc.is_valid(status_text))
        rejects.add(
            lines[given & ~status_ok],
            f"{form}_complete",
            RULE_VALUE_VALID,
            "a form status is 0 (incomplete), 1 (unverified) or 2 (complete)",
        )
        count = filled[:, index]
        emit = np.flatnonzero(given | (count > 0))
        if emit.size == 0:
            continue
        status = np.full(rows, -1, dtype=np.int8)
        status[status_ok] = np.asarray(
            pc.cast(status_text.filter(pa.array(status_ok)), pa.int8()).to_numpy(), dtype=np.int8
        )
        state = np.select(
            [status == 2, status == 1, (status == 0) & (count > 0), status == 0],
            ["complete", "unverified", "incomplete", "not_started"],
            "no_status",
        )
        take = pa.array(emit, pa.int64())
        columns = {
            **{name: array.take(take) for name, array in keys.items()},
            "form": pa.array([form] * emit.size, pa.string()),
            "status": pa.array(status[emit], pa.int8(), mask=status[emit] < 0),
            "state": pa.array(state[emit].tolist(), pa.string()),
            "filled_count": pa.array(count[emit], pa.int32()),
            "source_line": pa.array(lines[emit], pa.int64()),
        }
        parts.append(
            pa.Table.from_arrays([columns[n] for n in COMPLETION_SCHEMA.names], schema=COMPLETION_SCHEMA)
        )
    if not parts:
        return COMPLETION_SCHEMA.empty_table()
    order = {form: index for index, form in enumerate(forms)}
    table = pa.concat_tables(parts)
    form_order = pc.cast(
        pc.index_in(table.column("form"), value_set=pa.array(list(order), pa.string())), pa.int64()
    )
    table = table.append_column("_form_order", form_order)
    table = table.sort_by([("source_line", "ascending"), ("_form_order", "ascending")])
    return table.drop_columns(["_form_order"])
