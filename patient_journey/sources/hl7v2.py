"""HL7 v2 ADT feeds: admissions, discharges and transfers as the hospital's interface engine sends them.

The feed lands as files of messages under ``JOURNEY_SOURCES__HL7V2_PREFIX`` (default ``adt``):
MLLP-framed (``0x0B`` message ``0x1C 0x0D``, as a listener writes what it received) or one message
after another, segments ending in carriage returns (or newlines), messages starting at ``MSH``.
A message with the standard delimiters and no escape sequence in the fields read is split with
str.split (about 30 us a message in all); any other is parsed by python-hl7 (about 330 us), whose
results the split is tested against, on every generated message and on random field values.

Each ADT message of a supported trigger becomes one bronze record (entity ``adt``, record id its
control id MSH-10, offset its number in the file) holding only what staging reads: the trigger,
the event and message times, the MRN (PID-3, the identifier typed MR, else the first), the visit
number (PV1-19), the patient class (PV1-2) and the admit and discharge times (PV1-44, PV1-45).
Names, addresses and phone numbers in PID are never copied out of the landing zone.

Triggers: A01 admit, A02 transfer, A03 discharge, A04 register, A08 update, A11 cancel admit,
A13 cancel discharge. Rules: ``hl7_message_parsable`` (no MSH segment, or python-hl7 cannot
parse it), ``hl7_adt_trigger_supported`` (another message type or trigger: an ORU on the ADT
feed, an A05), ``hl7_control_id_present`` (MSH-10 empty). The source is optional: without a
feed under its prefix it reads nothing and preflight does not fail.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import hl7
import orjson
from pydantic import BaseModel, Field

from patient_journey.contracts import TableContract, silver_contract
from patient_journey.journey import JourneyParts
from patient_journey.linkage import LinkSpec
from patient_journey.settings import JourneySettings
from patient_journey.sources.records import Extraction, InputSelection, read_new_files
from patient_journey.sources.source import ExtractJob, Source, source_options
from patient_journey.staging import StagedTable, declared, json_fields, timestamp
from patient_journey.storage import FileInfo, Storage

if TYPE_CHECKING:
    from patient_journey.generate.model import Cohort

SOURCE = "hl7v2"
ENTITY = "adt"
SUFFIXES = (".hl7",)
TRIGGERS = ("A01", "A02", "A03", "A04", "A08", "A11", "A13")
MLLP_START, MLLP_END = b"\x0b", b"\x1c"

RULE_PARSABLE = "hl7_message_parsable"
RULE_TRIGGER = "hl7_adt_trigger_supported"
RULE_CONTROL_ID = "hl7_control_id_present"
_CODE = re.compile(r"[A-Z0-9]{1,4}\^[A-Z0-9]{1,4}")


class _Unreadable(Exception):
    def __init__(self, rule: str, detail: str) -> None:
        super().__init__(detail)
        self.rule = rule
        self.detail = detail


def split_messages(data: bytes) -> Iterator[bytes]:
    """The messages of a file (MLLP frames, or else segments from one ``MSH`` to the next), each
    with its segments ending in carriage returns whatever line ends the sender wrote."""
    if MLLP_START in data:
        for frame in data.split(MLLP_START)[1:]:
            yield b"\r".join(_segments(frame.split(MLLP_END, 1)[0]))
        return
    message: list[bytes] = []
    for segment in _segments(data):
        if segment.startswith(_BATCH_SEGMENTS):
            continue  # the HL7 batch protocol's file and batch headers and trailers frame messages
        if segment.startswith(b"MSH") and message:
            yield b"\r".join(message)
            message = []
        if segment.strip():
            message.append(segment)
    if message:
        yield b"\r".join(message)


# The batch protocol's headers and trailers (FHS/BHS ... BTS/FTS) around the messages of a file.
_BATCH_SEGMENTS = (b"FHS", b"BHS", b"BTS", b"FTS")


def _segments(data: bytes) -> list[bytes]:
    """Segments end in a carriage return; many senders write CR LF or LF: all three are read."""
    return data.replace(b"\r\n", b"\r").replace(b"\n", b"\r").split(b"\r")


def _text(
    message: hl7.Message, segment: str, field: int, repetition: int = 0, component: int = 1
) -> str | None:
    """One component of a field (1-based, as HL7 numbers them), or None where it is absent."""
    try:
        value = message.extract_field(segment, 1, field, repetition + 1, component)
    except (KeyError, IndexError):
        return None
    text = str(value).strip()
    return text or None


def _time(raw: str | None) -> str | None:
    """An HL7 DTM as ISO 8601 (no offset: UTC, as the rest of the warehouse), or None."""
    if raw is None:
        return None
    try:
        moment: datetime | None = hl7.parse_datetime(raw)
        if moment is None:
            return None
        # an offset python-hl7 reads but datetime refuses (beyond a day) raises only here
        return (moment if moment.tzinfo is None else moment.astimezone(UTC)).replace(tzinfo=None).isoformat()
    except (ValueError, OverflowError):
        return None


def _mrn(message: _Split | _Parsed) -> str | None:
    """PID-3's identifier typed MR (PID-3.5), else its first identifier."""
    typed = [r for r in range(message.repetitions("PID", 3)) if message.text("PID", 3, r, 5) == "MR"]
    return message.text("PID", 3, (typed or [0])[0], 1)


class _Split:
    """A message with the standard delimiters (``|^~\\&``), carriage returns between segments and no
    escape sequence in a field this source reads, split with str.split: what python-hl7 gives for
    such a message (tests compare both), at a tenth of the cost per message read (python-hl7
    builds every field and component of every segment: 330 us a message). Any other message is
    parsed by python-hl7."""

    def __init__(self, text: str) -> None:
        self.segments: dict[str, list[str]] = {}
        for segment in text.split("\r"):
            name = segment[:3]
            if name not in self.segments:
                fields = segment.split("|")
                # MSH-1 is the field separator itself: MSH-n is the n-1th item, as python-hl7 numbers it
                self.segments[name] = ["MSH", "|", *fields[1:]] if name == "MSH" else fields

    @classmethod
    def of(cls, text: str) -> _Split | None:
        if not text.startswith("MSH|^~\\&|"):
            return None
        return cls(text)

    def text(self, segment: str, field: int, repetition: int = 0, component: int = 1) -> str | None:
        fields = self.segments.get(segment)
        if fields is None or field >= len(fields):
            return None
        repetitions = fields[field].split("~")
        if repetition >= len(repetitions):
            return None
        components = repetitions[repetition].split("^")
        # the first subcomponent, as python-hl7's extract_field gives it
        value = components[component - 1].split("&")[0].strip() if component <= len(components) else ""
        if "\\" in value:
            raise _NotPlain
        return value or None

    def repetitions(self, segment: str, field: int) -> int:
        fields = self.segments.get(segment)
        return 0 if fields is None or field >= len(fields) else len(fields[field].split("~"))


class _NotPlain(Exception):
    """A field holds an escape sequence: python-hl7 reads the message."""


class _Parsed:
    """A message as python-hl7 parses it, read through the same three methods as ``_Split``."""

    def __init__(self, message: hl7.Message) -> None:
        self.message = message

    def text(self, segment: str, field: int, repetition: int = 0, component: int = 1) -> str | None:
        return _text(self.message, segment, field, repetition, component)

    def repetitions(self, segment: str, field: int) -> int:
        try:
            return len(self.message.segment(segment)[field])
        except (KeyError, IndexError):
            return 0


@functools.cache
def _quiet_python_hl7() -> None:
    """python-hl7 logs the values it cannot unescape (patient data must not reach the logs), on
    loggers named after its files (``logging.getLogger(__file__)``): silence them all."""
    folder = str(Path(hl7.__file__).parent)
    for name in [*logging.root.manager.loggerDict, *(str(p) for p in Path(folder).glob("*.py"))]:
        if name.startswith(("hl7", folder)):
            logging.getLogger(name).disabled = True


def read_message(raw: bytes, *, split: bool = True) -> tuple[str, dict[str, str | None]]:
    """(control id, the fields staging reads) of one message (segments ending in carriage
    returns, as ``split_messages`` gives them), or ``_Unreadable``. ``split=False`` parses every
    message with python-hl7 (the reference the split is tested against)."""
    text = raw.decode("utf-8", errors="replace").strip().removeprefix("\ufeff")
    if not text.startswith("MSH"):
        raise _Unreadable(RULE_PARSABLE, "no MSH segment at the start of the message")
    plain = _Split.of(text) if split else None
    if plain is not None:
        try:
            return _fields(plain)
        except _NotPlain:
            pass
    _quiet_python_hl7()
    try:
        message = hl7.parse(text)
        message.segment("MSH")
    except Exception as exc:  # python-hl7 raises many types for malformed input
        raise _Unreadable(RULE_PARSABLE, f"python-hl7 cannot parse it ({type(exc).__name__})") from None
    return _fields(_Parsed(message))


def _fields(message: _Split | _Parsed) -> tuple[str, dict[str, str | None]]:
    kind, trigger = message.text("MSH", 9, 0, 1), message.text("MSH", 9, 0, 2)
    if kind != "ADT" or trigger not in TRIGGERS:
        # named only when it is a code: a sender can write anything in MSH-9
        found = (
            f"{kind}^{trigger}" if _CODE.fullmatch(f"{kind}^{trigger}") else "not an HL7 message type code"
        )
        raise _Unreadable(RULE_TRIGGER, f"message type {found}; this feed reads ADT^{'/'.join(TRIGGERS)}")
    control_id = message.text("MSH", 10)
    if control_id is None:
        raise _Unreadable(RULE_CONTROL_ID, "MSH-10 (message control id) is empty")
    return control_id, {
        "trigger": trigger,
        "eventTime": _time(message.text("EVN", 2)) or _time(message.text("MSH", 7)),
        "messageTime": _time(message.text("MSH", 7)),
        "mrn": _mrn(message),
        "visitNumber": message.text("PV1", 19),
        "patientClass": message.text("PV1", 2),
        "admitTime": _time(message.text("PV1", 44)),
        "dischargeTime": _time(message.text("PV1", 45)),
    }


def read_file(out: Extraction, file: FileInfo, data: bytes) -> None:
    """Every message of one feed file: a record, or a reject with its rule at its number."""
    for number, raw in enumerate(split_messages(data), start=1):
        try:
            control_id, fields = read_message(raw)
        except _Unreadable as exc:
            out.add_reject(ENTITY, file.url, number, exc.rule, exc.detail)
            continue
        payload = orjson.dumps(fields)
        out.add_record(ENTITY, control_id, payload.decode(), file.url, number, raw)


def extract(
    landing: Storage, prefix: str, seen: InputSelection, run_id: str, out: Extraction | None = None
) -> Extraction:
    """Read every feed file under ``prefix`` that the ledger has not seen."""
    out = out if out is not None else Extraction(SOURCE, run_id)
    read_new_files(
        out, landing, prefix, SUFFIXES, seen, lambda file, data: read_file(out, file, data), ENTITY
    )
    return out


# --------------------------------------------------------------------------- staged tables and links

STAGED: tuple[StagedTable, ...] = (
    declared(
        lambda at: StagedTable(
            "adt_event",
            "hl7v2_message",
            ENTITY,
            f"""record_id AS message_id, {at("$.trigger")} AS trigger_event,
            {timestamp(at, "eventTime")} AS event_time, {at("$.mrn")} AS mrn,
            {at("$.visitNumber")} AS visit_number, {at("$.patientClass")} AS patient_class,
            {timestamp(at, "admitTime")} AS admit_time, {timestamp(at, "dischargeTime")} AS discharge_time""",
            fields=json_fields("trigger:string", "mrn:string", "visitNumber:string", "patientClass:string"),
        )
    ),
)

LINKS: tuple[LinkSpec, ...] = (
    LinkSpec(
        "adt_event",
        "adt_event",
        SOURCE,
        "message_id",
        "s LEFT JOIN mrn_link k USING (mrn)",
        "mrn_links_to_patient",
        "k.patient_key, s.trigger_event, s.event_time, s.patient_class, "
        "pseudonym('visit', s.visit_number) AS visit_key, s.admit_time, s.discharge_time",
    ),
)


# The silver tables it feeds, each declared once (patient_journey.contracts).
SILVER: tuple[TableContract, ...] = (
    silver_contract(
        "adt_event",
        "one row per HL7 v2 ADT message of the hospital's feed (admit, transfer, discharge, register, update, "
        "and the cancellations of an admission or a discharge)",
        (),
        """
patient_key string  the patient
trigger_event string  the ADT trigger: A01 admit, A02 transfer, A03 discharge, A04 register, A08 update, A11 cancel admit, A13 cancel discharge
event_time timestamp  EVN-2, else MSH-7 (UTC)
patient_class string  PV1-2: I inpatient, O outpatient, E emergency, ...
visit_key string  pseudonymous key of the visit (HMAC of the visit number, PV1-19)
admit_time timestamp  PV1-44
discharge_time timestamp  PV1-45
""",
    ),
)

# The feed's admissions, transfers and discharges that stand: an admission (A01) or registration
# (A04) cancelled by a later A11 of the same visit is gone, and so is a discharge (A03) cancelled
# by a later A13 (a discharge sent too early is cancelled, then sent again).
ADT_VISIT_EVENT_SQL = """
SELECT a.patient_key, a.event_time, a.patient_class, a.visit_key, a.admit_time, a.input_key, a.source_offset,
       CASE a.trigger_event WHEN 'A01' THEN 'admission' WHEN 'A04' THEN 'admission'
            WHEN 'A02' THEN 'transfer' WHEN 'A03' THEN 'discharge' END AS event_type,
       a.trigger_event
FROM adt_event a
WHERE a.trigger_event IN ('A01', 'A02', 'A03', 'A04')
  AND NOT EXISTS (
      SELECT 1 FROM adt_event c
      WHERE c.visit_key = a.visit_key AND c.patient_key = a.patient_key AND c.event_time >= a.event_time
        AND ((a.trigger_event IN ('A01', 'A04') AND c.trigger_event = 'A11')
             OR (a.trigger_event = 'A03' AND c.trigger_event = 'A13')))
"""

# What the feed adds to the gold journey: its transfers and discharges as events, and its
# admissions the EHR export does not hold (one it holds, same patient and admission time, is its
# encounter event already: counted once); its inpatient admissions count as readmissions (one the
# EHR or the registry reports on the same day counts once).
JOURNEY = JourneyParts(
    views=(("adt_visit_event", ADT_VISIT_EVENT_SQL),),
    events=(
        """SELECT a.patient_key, a.event_time, 'hl7v2', a.event_type, a.trigger_event, a.patient_class,
           NULL, NULL, a.input_key, a.source_offset FROM adt_visit_event a
        WHERE a.event_type <> 'admission' OR NOT EXISTS (
            SELECT 1 FROM encounter e WHERE e.patient_key = a.patient_key AND e.period_start = a.admit_time)""",
    ),
    admissions=(
        "SELECT patient_key, CAST(event_time AS DATE), NULL FROM adt_visit_event "
        "WHERE event_type = 'admission' AND patient_class = 'I'",
    ),
)


class Hl7v2Options(BaseModel):
    """The feed's own settings (JOURNEY_SOURCES__HL7V2_PREFIX)."""

    hl7v2_prefix: str = Field(
        default="adt", description="HL7 v2 ADT feed files (optional: absent, nothing is read)."
    )


class Hl7v2Source(Source):
    """An HL7 v2 ADT feed (optional: a deployment without one reads nothing)."""

    staged = STAGED
    silver = SILVER
    journey = JOURNEY
    links = LINKS
    name = SOURCE
    bronze_table = "hl7v2_message"
    suffixes = SUFFIXES
    optional = True
    options = Hl7v2Options

    def prefix(self, settings: JourneySettings) -> str:
        return source_options(Hl7v2Options, settings).hl7v2_prefix

    def extract(self, job: ExtractJob) -> Extraction:
        return extract(job.landing, self.prefix(job.settings), job.seen, job.run_id, job.out)

    def generate(self, cohort: Cohort, landing: Path) -> dict[str, int]:
        from patient_journey.generate.hl7v2 import adt_messages, write_adt  # the generator, when asked

        messages = adt_messages(cohort)
        return {"adt_messages": len(messages), "adt_files": write_adt(landing, messages)}
