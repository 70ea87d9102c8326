"""HL7 v2 ADT feeds: admissions, discharges and transfers as the hospital's interface engine sends them.

The feed lands as files of messages under ``JOURNEY_SOURCES__HL7V2_PREFIX`` (default ``adt``):
MLLP-framed (``0x0B`` message ``0x1C 0x0D``, as a listener writes what it received) or one message
after another, segments ending in carriage returns (or newlines), messages starting at ``MSH``.
Messages are parsed by python-hl7. Each ADT message of a supported trigger becomes one bronze
record (entity ``adt``, record id its control id MSH-10, offset its number in the file) holding
only what staging reads: the trigger, the event and message times, the MRN (PID-3, the
identifier typed MR, else the first), the visit number (PV1-19), the patient class (PV1-2) and
the admit and discharge times (PV1-44, PV1-45). Names, addresses and phone numbers in PID are
never copied out of the landing zone.

Triggers: A01 admit, A02 transfer, A03 discharge, A04 register, A08 update, A11 cancel admit,
A13 cancel discharge. Rules: ``hl7_message_parsable`` (no MSH segment, or python-hl7 cannot
parse it), ``hl7_adt_trigger_supported`` (another message type or trigger: an ORU on the ADT
feed, an A05), ``hl7_control_id_present`` (MSH-10 empty). The source is optional: without a
feed under its prefix it reads nothing and preflight does not fail.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime

import hl7
import orjson

from patient_journey.linkage import IdentityRelation, LinkSpec
from patient_journey.settings import JourneySettings
from patient_journey.sources.records import Extraction, InputSelection, read_new_files
from patient_journey.sources.source import ExtractJob, Source
from patient_journey.staging import StagedTable, declared, json_fields, timestamp
from patient_journey.storage import FileInfo, Storage

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
    """The messages of a file: MLLP frames, or else segments from one ``MSH`` to the next."""
    if MLLP_START in data:
        for frame in data.split(MLLP_START)[1:]:
            yield frame.split(MLLP_END, 1)[0]
        return
    message: list[bytes] = []
    for segment in data.replace(b"\r\n", b"\r").replace(b"\n", b"\r").split(b"\r"):
        if segment.startswith(b"MSH") and message:
            yield b"\r".join(message)
            message = []
        if segment.strip():
            message.append(segment)
    if message:
        yield b"\r".join(message)


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


def _time(message: hl7.Message, segment: str, field: int) -> str | None:
    """An HL7 DTM as ISO 8601 (no offset: UTC, as the rest of the warehouse), or None."""
    raw = _text(message, segment, field)
    if raw is None:
        return None
    try:
        moment: datetime | None = hl7.parse_datetime(raw)
    except (ValueError, OverflowError):
        return None
    if moment is None:
        return None
    return (moment if moment.tzinfo is None else moment.astimezone(UTC)).replace(tzinfo=None).isoformat()


def _mrn(message: hl7.Message) -> str | None:
    """PID-3's identifier typed MR (PID-3.5), else its first identifier."""
    try:
        repetitions = len(message.segment("PID")[3])
    except (KeyError, IndexError):
        return None
    typed = [r for r in range(repetitions) if _text(message, "PID", 3, r, 5) == "MR"]
    return _text(message, "PID", 3, (typed or [0])[0], 1)


def read_message(raw: bytes) -> tuple[str, dict[str, str | None]]:
    """(control id, the fields staging reads) of one message, or ``_Unreadable``."""
    text = raw.decode("utf-8", errors="replace").strip()
    if not text.startswith("MSH"):
        raise _Unreadable(RULE_PARSABLE, "no MSH segment at the start of the message")
    try:
        message = hl7.parse(text)
        message.segment("MSH")
    except Exception as exc:  # python-hl7 raises many types for malformed input
        raise _Unreadable(RULE_PARSABLE, f"python-hl7 cannot parse it ({type(exc).__name__})") from None
    kind, trigger = _text(message, "MSH", 9, 0, 1), _text(message, "MSH", 9, 0, 2)
    if kind != "ADT" or trigger not in TRIGGERS:
        # named only when it is a code: a sender can write anything in MSH-9
        found = (
            f"{kind}^{trigger}" if _CODE.fullmatch(f"{kind}^{trigger}") else "not an HL7 message type code"
        )
        raise _Unreadable(RULE_TRIGGER, f"message type {found}; this feed reads ADT^{'/'.join(TRIGGERS)}")
    control_id = _text(message, "MSH", 10)
    if control_id is None:
        raise _Unreadable(RULE_CONTROL_ID, "MSH-10 (message control id) is empty")
    return control_id, {
        "trigger": trigger,
        "eventTime": _time(message, "EVN", 2) or _time(message, "MSH", 7),
        "messageTime": _time(message, "MSH", 7),
        "mrn": _mrn(message),
        "visitNumber": _text(message, "PV1", 19),
        "patientClass": _text(message, "PV1", 2),
        "admitTime": _time(message, "PV1", 44),
        "dischargeTime": _time(message, "PV1", 45),
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

IDENTITY = (
    IdentityRelation(
        "mrn_link",
        "SELECT DISTINCT mrn, patient_key FROM ehr_patient WHERE mrn IS NOT NULL",
        "SELECT 'mrn', mrn, patient_key FROM mrn_link",
    ),
)


class Hl7v2Source(Source):
    """An HL7 v2 ADT feed (optional: a deployment without one reads nothing)."""

    staged = STAGED
    links = LINKS
    identity = IDENTITY
    name = SOURCE
    bronze_table = "hl7v2_message"
    suffixes = SUFFIXES
    optional = True

    def prefix(self, settings: JourneySettings) -> str:
        return settings.sources.hl7v2_prefix

    def extract(self, job: ExtractJob) -> Extraction:
        return extract(job.landing, self.prefix(job.settings), job.seen, job.run_id, job.out)
