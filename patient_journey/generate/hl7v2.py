"""The hospital's ADT feed as HL7 v2 messages, derived from the cohort's encounters.

Every encounter the EHR export holds is also announced on the feed, as a hospital's interface
engine sends it: an inpatient stay as A01 (admit) and A03 (discharge), an outpatient visit as A04
(register) and A03. The visit number (PV1-19) is the encounter's id, so the feed and the EHR
export describe the same admissions. Some stays carry more, chosen from the encounter's id (no
random draws, so the rest of the generated data is unchanged): a patient update (A08), a
transfer to another bed (A02), a discharge sent too early and cancelled (A03, A13, then the real
A03), and an admission entered for the wrong visit and cancelled (A01, A11).

Files are ``adt/<YYYY>/<MM>/adt-<YYYYMMDD>.hl7``, one per day of messages: on odd days MLLP-framed
(``0x0B`` message ``0x1C 0x0D``), as a listener writes what it received; on even days one message
after another, segments ending in carriage returns, a newline between messages.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from patient_journey.generate.model import Cohort, Encounter, Journey

ADT_PREFIX = "adt"
MLLP_START, MLLP_END = b"\x0b", b"\x1c\x0d"


@dataclass(frozen=True)
class AdtMessage:
    at: datetime
    control_id: str
    text: str


def _dtm(moment: datetime) -> str:
    return moment.strftime("%Y%m%d%H%M%S") + "+0000"


def _choice(encounter: Encounter, salt: str, every: int) -> bool:
    """One stay in ``every``, chosen by a hash of its id."""
    digest = hashlib.sha256(f"{salt}:{encounter.id}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % every == 0


def _message(j: Journey, e: Encounter, trigger: str, at: datetime, sequence: int, visit: str) -> AdtMessage:
    control = hashlib.sha256(f"{e.id}:{trigger}:{sequence}".encode()).hexdigest()[:20].upper()
    patient_class = "I" if e.class_code == "IMP" else "O"
    discharge = _dtm(e.end) if trigger == "A03" else ""
    pv1 = ["PV1", "1", patient_class, "ORTHO^" + str(100 + sequence % 20) + "^1"] + [""] * 42
    pv1[19], pv1[44], pv1[45] = visit, _dtm(e.start), discharge
    segments = [
        f"MSH|^~\\&|EHR|HOSP|JOURNEY|HOSP|{_dtm(at)}||ADT^{trigger}^ADT_{trigger}|{control}|P|2.5.1",
        f"EVN|{trigger}|{_dtm(at)}",
        f"PID|1||{j.mrn}^^^HOSP^MR||{j.family}^{j.given}||{j.birth_date:%Y%m%d}|"
        f"{'F' if j.gender == 'female' else 'M'}|||{j.address_line}^^{j.city}^^{j.postal_code}||{j.phone}",
        "|".join(pv1),
    ]
    return AdtMessage(at, control, "\r".join(segments) + "\r")


def adt_messages(cohort: Cohort) -> list[AdtMessage]:
    """Every message of the feed, in the order the interface engine sent them."""
    messages: list[AdtMessage] = []
    for j in cohort.journeys:
        for e in j.encounters:
            inpatient = e.class_code == "IMP"
            stay: list[tuple[str, datetime, str]] = [("A01" if inpatient else "A04", e.start, e.id)]
            if inpatient and _choice(e, "wrong-visit", 17):
                stay += [("A01", e.start, e.id + "-W"), ("A11", e.start + timedelta(minutes=9), e.id + "-W")]
            if _choice(e, "update", 5):
                stay.append(("A08", e.start + (e.end - e.start) / 3, e.id))
            if inpatient and _choice(e, "transfer", 7):
                stay.append(("A02", e.start + (e.end - e.start) / 2, e.id))
            if inpatient and _choice(e, "early-discharge", 13):
                early = e.end - timedelta(hours=6)
                stay += [("A03", early, e.id), ("A13", early + timedelta(minutes=20), e.id)]
            stay.append(("A03", e.end, e.id))
            for sequence, (trigger, at, visit) in enumerate(stay):
                messages.append(_message(j, e, trigger, at, sequence, visit))
    return sorted(messages, key=lambda m: (m.at, m.control_id))


def write_adt(landing: Path, messages: list[AdtMessage]) -> int:
    """Write the feed's daily files; returns how many files."""
    by_day: dict[str, list[AdtMessage]] = defaultdict(list)
    for message in messages:
        by_day[message.at.strftime("%Y%m%d")].append(message)
    for day, day_messages in sorted(by_day.items()):
        folder = landing / ADT_PREFIX / day[:4] / day[4:6]
        folder.mkdir(parents=True, exist_ok=True)
        framed = int(day) % 2 == 1
        parts = [
            MLLP_START + m.text.encode() + MLLP_END if framed else m.text.encode() + b"\n"
            for m in day_messages
        ]
        (folder / f"adt-{day}.hl7").write_bytes(b"".join(parts))
    return len(by_day)
