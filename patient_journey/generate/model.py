"""In-memory model of synthetic surgical patient journeys (deterministic for a seed).

Everything here is drawn from one ``random.Random(seed)``; the writers only serialise it.
Surgeries are spread over 2023 so that every follow-up (up to ~12 months later) happened
before the fixed export time (2025-03-01), like a real extract would see it.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from functools import cache

import pyarrow as pa

from patient_journey.scoring import Catalog, load_catalog, score_responses

EXPORT_TIME = datetime(2025, 3, 1, tzinfo=UTC)
SURGERY_FIRST_DAY = date(2023, 1, 1)
SURGERY_DAYS = 365

TIMEPOINTS: tuple[str, ...] = ("baseline", "6w", "6m", "12m")
INSTRUMENTS: dict[str, str] = {"knee": "KOOS JR", "hip": "HOOS JR"}
INSTRUMENT_IDS: dict[str, str] = {"knee": "koos_jr", "hip": "hoos_jr"}  # catalog/instruments ids
# Where a patient's PROMs are collected, with cumulative shares: 45% / 35% / 20%.
PROM_SOURCES: tuple[tuple[str, float], ...] = (("registry", 0.45), ("redcap", 0.80), ("fhir", 1.0))
# Item-level questionnaires (REDCap, FHIR) left with an item unanswered, hence not scored.
PARTIAL_RESPONSE_RATE = 0.04


def new_uuid(rng: random.Random) -> str:
    """A version-4 UUID drawn from ``rng`` (deterministic, unlike uuid4())."""
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def iso(ts: datetime) -> str:
    """ISO 8601 with a UTC offset, seconds precision: 2024-03-04T08:12:00+00:00."""
    return ts.astimezone(UTC).replace(microsecond=0).isoformat()


def add_years(day: date, years: int) -> date:
    try:
        return day.replace(year=day.year + years)
    except ValueError:  # 29 February
        return day.replace(year=day.year + years, day=28)


@dataclass(frozen=True)
class EventSpec:
    event_type: str
    unit: str
    low: float
    high: float


@dataclass(frozen=True)
class DeviceModel:
    device_type: str
    udi_di: str
    name: str
    serial_prefix: str
    firmwares: tuple[str, ...]
    events: tuple[EventSpec, ...]


OR_DEVICE_MODELS: dict[str, DeviceModel] = {
    "robotic-arm": DeviceModel(
        "robotic-arm",
        "00812345000011",
        "OrthoBot Robotic Arm System",
        "RA",
        ("4.2.1", "4.3.0"),
        (
            EventSpec("registration_complete", "mm", 0.1, 1.0),
            EventSpec("resection_complete", "mm", 6.0, 12.0),
            EventSpec("arm_force", "N", 5.0, 40.0),
        ),
    ),
    "powered-saw": DeviceModel(
        "powered-saw",
        "00812345000028",
        "SagittaCut Powered Saw",
        "PS",
        ("2.0.7", "2.1.0"),
        (
            EventSpec("saw_speed", "rpm", 8000.0, 18000.0),
            EventSpec("blade_temperature", "Cel", 25.0, 45.0),
        ),
    ),
    "tourniquet": DeviceModel(
        "tourniquet",
        "00812345000035",
        "PneumaCuff Tourniquet",
        "TQ",
        ("1.5.3",),
        (EventSpec("tourniquet_pressure", "mm[Hg]", 200.0, 300.0),),
    ),
}

IMPLANT_MODELS: dict[str, tuple[str, str]] = {
    "knee": ("00898765000012", "TriFlex Total Knee System"),
    "hip": ("00898765000029", "StemLine Total Hip System"),
}

PROCEDURES: dict[str, tuple[str, str]] = {
    "knee": ("609588000", "Total knee replacement"),
    "hip": ("52734007", "Total hip replacement"),
}
CONDITIONS: dict[str, tuple[str, str]] = {
    "knee": ("239873007", "Osteoarthritis of knee"),
    "hip": ("239872002", "Osteoarthritis of hip"),
}

_GIVEN = {
    "female": (
        "Mary",
        "Linda",
        "Susan",
        "Karen",
        "Nancy",
        "Carol",
        "Ruth",
        "Joan",
        "Ellen",
        "Grace",
    ),
    "male": (
        "James",
        "Robert",
        "John",
        "David",
        "Thomas",
        "Paul",
        "Mark",
        "George",
        "Frank",
        "Henry",
    ),
}
_FAMILY = (
    "Smith",
    "Johnson",
    "Brown",
    "Miller",
    "Davis",
    "Wilson",
    "Moore",
    "Taylor",
    "Clark",
    "Lewis",
    "Walker",
    "Hall",
    "Young",
    "King",
    "Wright",
    "Scott",
    "Green",
    "Baker",
    "Adams",
    "Nelson",
)
_STREETS = (
    "Oak St",
    "Maple Ave",
    "Pine Rd",
    "Cedar Ln",
    "Elm St",
    "Lake Dr",
    "Hill Rd",
)
_CITIES = ("Springfield", "Riverton", "Fairview", "Lakewood", "Georgetown")
_SITES = ("SITE-01", "SITE-02", "SITE-03")
# (display, SNOMED CT concept id): the registry records the description and its code.
_COMPLICATIONS = (
    ("Superficial wound infection", "433202001"),  # Surgical site infection (disorder)
    ("Deep vein thrombosis", "128053003"),  # Deep venous thrombosis (disorder)
    ("Periprosthetic joint infection", "213121005"),  # Prosthetic joint infection (disorder)
    ("Postoperative anaemia requiring transfusion", "271737000"),  # Anemia (disorder)
    ("Stiffness requiring manipulation under anaesthesia", "84445001"),  # Joint stiffness (finding)
    ("Dislocation", "108367008"),  # Dislocation of joint (disorder)
)
EHR_REPORTS_REGISTRY_COMPLICATION = 0.6
EHR_ONLY_COMPLICATION_RATE = 0.04
_READMISSION_REASONS = (
    "Wound complication",
    "Pain control",
    "Infection",
    "Thromboembolism",
    "Fall",
)


@dataclass
class PhysicalDevice:
    resource_id: str
    model: DeviceModel
    serial: str
    firmware: str
    generation_id: str
    busy_until: datetime
    clock_skew_s: int = 0  # how far the device's clock runs ahead of true time (negative: behind)

    @property
    def iot_id(self) -> str:
        return f"{self.model.device_type}-{self.serial}"


@dataclass(frozen=True)
class DeviceEvent:
    case_id: str
    device: PhysicalDevice
    event_type: str
    timestamp: datetime  # as the device's clock reports it (true time + the device's skew)
    value: float | None
    unit: str | None
    enqueued: datetime  # IoT Hub's clock: true time + transport latency


@dataclass(frozen=True)
class Encounter:
    id: str
    purpose: str  # preop | surgical-admission | follow-up | readmission
    class_code: str  # AMB | IMP
    start: datetime
    end: datetime


@dataclass(frozen=True)
class Observation:
    id: str
    encounter_id: str
    code: str
    display: str
    unit: str
    value: float
    effective: datetime


@dataclass(frozen=True)
class Prom:
    """One completed (or partly completed) questionnaire at one timepoint."""

    timepoint: str
    score: float | None  # the catalog score of ``items``; None when the catalog does not score them
    collected_on: date
    # catalog item id -> response code; an item left unanswered is absent
    items: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Complication:
    occurred_on: date
    grade: int
    description: str
    code: str  # SNOMED CT


@dataclass(frozen=True)
class EhrComplication:
    condition_id: str
    occurred_on: date
    description: str
    code: str


@dataclass(frozen=True)
class RegistryReadmission:
    admitted_on: date
    discharged_on: date
    reason: str


@dataclass
class Journey:
    """One patient and their single episode (index procedure)."""

    index: int
    registry_id: int
    patient_id: str
    mrn: str
    given: str
    family: str
    gender: str
    birth_date: date
    address_line: str
    city: str
    postal_code: str
    phone: str
    site: str
    joint: str
    robotic: bool
    condition_id: str
    onset: datetime
    recorded: datetime
    procedure_id: str
    case_id: str
    surgery_start: datetime
    surgery_end: datetime
    implant_id: str
    implant_serial: str
    encounters: list[Encounter]
    admission: Encounter
    readmission: Encounter | None
    observations: list[Observation]
    complications: list[Complication]
    registry_readmissions: list[RegistryReadmission]
    proms: list[Prom]
    prom_source: str  # registry | redcap | fhir
    devices: list[PhysicalDevice] = field(default_factory=list)
    events: list[DeviceEvent] = field(default_factory=list)
    # Complications the EHR records as Conditions (encounter diagnoses, no grade): most registry
    # complications again (same code and day), and now and then one the registry missed.
    ehr_complications: list[EhrComplication] = field(default_factory=list)

    @property
    def instrument(self) -> str:
        return INSTRUMENTS[self.joint]

    @property
    def instrument_id(self) -> str:
        """The instrument's id in catalog/instruments (koos_jr, hoos_jr)."""
        return INSTRUMENT_IDS[self.joint]

    def or_minutes(self) -> float:
        starts = [e.timestamp for e in self.events if e.event_type == "session_start"]
        stops = [e.timestamp for e in self.events if e.event_type == "session_stop"]
        # Half-up, as SQL's round() does: 74.35 minutes is 74.4, not Python's 74.3.
        minutes = Decimal(int((max(stops) - min(starts)).total_seconds())) / Decimal(60)
        return float(minutes.quantize(Decimal("0.1"), rounding=ROUND_HALF_UP))


def sql_round(value: float, digits: int = 1) -> float:
    """Round as DuckDB's round(DOUBLE, n) does: scale the double, round half away from zero,
    scale back. Python's round() differs on about 4% of PROM score differences (it rounds the
    exact binary value half to even), so ground truth made with it would not match the SQL."""
    scale = 10.0**digits
    return float(Decimal(value * scale).quantize(Decimal(1), rounding=ROUND_HALF_UP)) / scale


@dataclass
class Cohort:
    seed: int
    journeys: list[Journey]
    devices: list[PhysicalDevice]  # physical OR devices, in creation order


def _at(day: date, hour: int, minute: int) -> datetime:
    return datetime(day.year, day.month, day.day, hour, minute, tzinfo=UTC)


def _random_time(rng: random.Random, day: date, first_hour: int, last_hour: int) -> datetime:
    return _at(day, rng.randint(first_hour, last_hour), rng.randint(0, 59))


def _encounter(
    rng: random.Random, purpose: str, class_code: str, start: datetime, end: datetime
) -> Encounter:
    return Encounter(new_uuid(rng), purpose, class_code, start, end)


def _vitals(rng: random.Random, enc: Encounter, height_m: float, bmi: float) -> list[Observation]:
    when = enc.start + timedelta(minutes=rng.randint(5, 20))
    weight = round(bmi * height_m * height_m, 1)
    return [
        Observation(
            new_uuid(rng),
            enc.id,
            "39156-5",
            "Body mass index (BMI) [Ratio]",
            "kg/m2",
            round(bmi, 1),
            when,
        ),
        Observation(new_uuid(rng), enc.id, "29463-7", "Body weight", "kg", weight, when),
        Observation(
            new_uuid(rng),
            enc.id,
            "8867-4",
            "Heart rate",
            "/min",
            float(rng.randint(50, 110)),
            when,
        ),
    ]


@cache
def prom_catalog() -> Catalog:
    """The instrument catalog, read once per process."""
    return load_catalog()


def _draw_items(rng: random.Random, instrument_id: str, target: float, partial: bool) -> dict[str, int]:
    """Item answers whose catalog score is the one closest to ``target``; one item left
    unanswered when ``partial`` (the catalog then gives no score)."""
    score = prom_catalog().instrument(instrument_id).primary_score
    items = {item.id: item for item in prom_catalog().instrument(instrument_id).items}
    members = [items[item_id] for item_id in score.items]
    low = sum(item.range[0] for item in members)
    high = sum(item.range[1] for item in members)
    values = score.lookup or {raw: float(raw) for raw in range(low, high + 1)}
    raw = min(values, key=lambda r: (abs(values[r] - target), r))
    answers = {item.id: item.range[0] for item in members}
    # Spread raw - low over the items: one slot per step an item can rise above its lowest code.
    slots = [item.id for item in members for _ in range(item.range[1] - item.range[0])]
    for item_id in rng.sample(slots, raw - low):
        answers[item_id] += 1
    if partial:
        del answers[rng.choice(members).id]
    return answers


def _score_proms(journeys: list[Journey]) -> None:
    """Set every Prom's score from its items, all at once through the scoring engine."""
    proms = [(j, k, p) for j in journeys for k, p in enumerate(j.proms)]
    if not proms:
        return
    catalog = prom_catalog()
    item_ids = sorted({item_id for _, _, p in proms for item_id in p.items})
    responses = pa.table(
        {
            "response_id": [str(n) for n in range(len(proms))],
            "instrument": [j.instrument_id for j, _, _ in proms],
            **{
                item_id: pa.array([p.items.get(item_id) for _, _, p in proms], pa.int64())
                for item_id in item_ids
            },
        }
    )
    primary = {i.id: i.primary_score.name for i in catalog.instruments.values()}
    scores = {
        int(row["response_id"]): row["score"]
        for row in score_responses(responses, catalog).to_pylist()
        if row["score_name"] == primary[row["instrument"]]
    }
    for n, (j, k, p) in enumerate(proms):
        j.proms[k] = replace(p, score=scores[n])


def _build_journey(
    rng: random.Random, index: int, mrn: str, case_number: int, implant_serial: str
) -> Journey:
    joint = "knee" if rng.random() < 0.6 else "hip"
    robotic = rng.random() < 0.35
    gender = rng.choice(("female", "male"))
    surgery_day = SURGERY_FIRST_DAY + timedelta(days=rng.randrange(SURGERY_DAYS))
    earliest_birth = add_years(surgery_day, -86) + timedelta(days=1)
    latest_birth = add_years(surgery_day, -50)
    birth_date = earliest_birth + timedelta(days=rng.randint(0, (latest_birth - earliest_birth).days))

    surgery_start = _at(surgery_day, rng.randint(7, 14), rng.choice((0, 15, 30, 45)))
    surgery_end = surgery_start + timedelta(minutes=rng.randint(60, 150))
    admit = surgery_start - timedelta(minutes=rng.randint(60, 240))
    discharge_day = surgery_day + timedelta(days=rng.randint(1, 4))
    discharge = _random_time(rng, discharge_day, 10, 16)
    admission = _encounter(rng, "surgical-admission", "IMP", admit, discharge)

    preop_day = surgery_day - timedelta(days=rng.randint(7, 30))
    preop_start = _random_time(rng, preop_day, 8, 15)
    preop = _encounter(
        rng,
        "preop",
        "AMB",
        preop_start,
        preop_start + timedelta(minutes=rng.randint(30, 60)),
    )

    height = rng.uniform(1.50, 1.95)
    bmi = rng.uniform(20.0, 42.0)
    observations = _vitals(rng, preop, height, bmi)
    encounters = [preop, admission]
    for days, jitter in ((42, 7), (182, 14), (365, 14)):
        if rng.random() < 0.9:
            day = surgery_day + timedelta(days=days + rng.randint(-jitter, jitter))
            start = _random_time(rng, day, 8, 15)
            fu = _encounter(
                rng,
                "follow-up",
                "AMB",
                start,
                start + timedelta(minutes=rng.randint(20, 40)),
            )
            encounters.append(fu)
            bmi = min(45.0, max(18.0, bmi + rng.uniform(-1.5, 1.0)))
            observations.extend(_vitals(rng, fu, height, bmi))

    readmission: Encounter | None = None
    registry_readmissions: list[RegistryReadmission] = []
    if rng.random() < 0.08:
        r_day = discharge_day + timedelta(days=rng.randint(3, 85))
        r_start = _random_time(rng, r_day, 0, 23)
        r_end = _random_time(rng, r_day + timedelta(days=rng.randint(1, 5)), 9, 17)
        readmission = _encounter(rng, "readmission", "IMP", r_start, r_end)
        encounters.append(readmission)
        if rng.random() < 0.7:
            registry_readmissions.append(
                RegistryReadmission(r_start.date(), r_end.date(), rng.choice(_READMISSION_REASONS))
            )
    if rng.random() < 0.02:
        r_day = discharge_day + timedelta(days=rng.randint(3, 85))
        registry_readmissions.append(
            RegistryReadmission(
                r_day,
                r_day + timedelta(days=rng.randint(1, 5)),
                rng.choice(_READMISSION_REASONS),
            )
        )

    complications: list[Complication] = []
    if rng.random() < 0.10:
        for _ in range(rng.choice((1, 1, 1, 2))):
            occurred_on = surgery_day + timedelta(days=rng.randint(2, 80))
            grade = rng.choice((1, 1, 2, 2, 3, 4))
            description, code = rng.choice(_COMPLICATIONS)
            complications.append(Complication(occurred_on, grade, description, code))
        complications.sort(key=lambda c: c.occurred_on)

    baseline = rng.gauss(45.0, 12.0)
    gains = {
        "baseline": 0.0,
        "6w": rng.gauss(8.0, 10.0),
        "6m": rng.gauss(22.0, 12.0),
        "12m": rng.gauss(28.0, 12.0),
    }
    offsets = {
        "baseline": -rng.randint(1, 60),
        "6w": 42 + rng.randint(-7, 7),
        "6m": 182 + rng.randint(-14, 14),
        "12m": 365 + rng.randint(-14, 14),
    }
    present = [tp for tp in TIMEPOINTS if rng.random() < (0.95 if tp == "baseline" else 0.85)]
    source_draw = rng.random()
    prom_source = next(source for source, upto in PROM_SOURCES if source_draw < upto)
    # Item answers come from a stream of their own, derived once, so they shift no other draw.
    prom_rng = random.Random(rng.getrandbits(64))
    instrument_id = INSTRUMENT_IDS[joint]
    proms = [
        Prom(
            tp,
            None,  # scored from the items by build_cohort, with patient_journey.scoring
            surgery_day + timedelta(days=offsets[tp]),
            _draw_items(
                prom_rng,
                instrument_id,
                baseline + gains[tp],
                partial=prom_source != "registry" and prom_rng.random() < PARTIAL_RESPONSE_RATE,
            ),
        )
        for tp in present
    ]

    onset_day = surgery_day - timedelta(days=rng.randint(365, 5 * 365))
    onset = _random_time(rng, onset_day, 8, 16)
    recorded = onset + timedelta(days=rng.randint(0, 30))

    street = f"{rng.randint(1, 999)} {rng.choice(_STREETS)}"
    ehr_complications = _ehr_complications(
        random.Random(f"ehr-complications:{mrn}"), surgery_day, complications
    )
    return Journey(
        index=index,
        registry_id=index + 1,
        patient_id=new_uuid(rng),
        mrn=mrn,
        given=rng.choice(_GIVEN[gender]),
        family=rng.choice(_FAMILY),
        gender=gender,
        birth_date=birth_date,
        address_line=street,
        city=rng.choice(_CITIES),
        postal_code=f"{rng.randint(10000, 99999)}",
        phone=f"+1-555-{rng.randint(100, 999)}-{rng.randint(1000, 9999)}",
        site=rng.choice(_SITES),
        joint=joint,
        robotic=robotic,
        condition_id=new_uuid(rng),
        onset=onset,
        recorded=recorded,
        procedure_id=new_uuid(rng),
        case_id=f"CASE-{case_number:06d}",
        surgery_start=surgery_start,
        surgery_end=surgery_end,
        implant_id=new_uuid(rng),
        implant_serial=implant_serial,
        encounters=encounters,
        admission=admission,
        readmission=readmission,
        observations=observations,
        complications=complications,
        registry_readmissions=registry_readmissions,
        proms=proms,
        prom_source=prom_source,
        ehr_complications=ehr_complications,
    )


def _ehr_complications(
    rng: random.Random, surgery_day: date, registry: list[Complication]
) -> list[EhrComplication]:
    """The EHR's view of the complications, from a stream of its own (it shifts no other draw)."""
    seen = [c for c in registry if rng.random() < EHR_REPORTS_REGISTRY_COMPLICATION]
    found = [(c.occurred_on, c.description, c.code) for c in seen]
    if rng.random() < EHR_ONLY_COMPLICATION_RATE:
        description, code = rng.choice(_COMPLICATIONS)
        found.append((surgery_day + timedelta(days=rng.randint(2, 80)), description, code))
    return [
        EhrComplication(new_uuid(rng), day, description, code) for day, description, code in sorted(found)
    ]


def clock_skew(serial: str) -> int:
    """A device's clock skew in seconds: most clocks are close, one in five is minutes off.

    Drawn from the serial alone, so adding skew did not change any other draw of the cohort.
    """
    rng = random.Random(f"clock:{serial}")
    if rng.random() < 0.2:
        return rng.choice((-1, 1)) * rng.randint(60, 420)
    return rng.randint(-5, 5)


def _new_device(rng: random.Random, model: DeviceModel, number: int) -> PhysicalDevice:
    serial = f"{model.serial_prefix}-{number}"
    return PhysicalDevice(
        resource_id=new_uuid(rng),
        model=model,
        serial=serial,
        firmware=rng.choice(model.firmwares),
        generation_id=str(rng.randint(10**17, 10**18 - 1)),
        busy_until=datetime(2000, 1, 1, tzinfo=UTC),
        clock_skew_s=clock_skew(serial),
    )


def device_stream(
    rng: random.Random,
    case_id: str,
    device: PhysicalDevice,
    start: datetime,
    stop: datetime,
    measured: int,
) -> list[DeviceEvent]:
    """session_start, ``measured`` measured events in between, session_stop (true times; each
    event carries the device clock's time and IoT Hub's enqueued time)."""
    skew = timedelta(seconds=device.clock_skew_s)

    def event(event_type: str, ts: datetime, value: float | None, unit: str | None) -> DeviceEvent:
        enqueued = ts + timedelta(milliseconds=rng.randint(0, 20_000))
        return DeviceEvent(case_id, device, event_type, ts + skew, value, unit, enqueued)

    span = int((stop - start).total_seconds())
    events = [event("session_start", start, None, None)]
    for offset in sorted(rng.randint(1, max(1, span - 1)) for _ in range(measured)):
        spec = rng.choice(device.model.events)
        value = round(rng.uniform(spec.low, spec.high), 1)
        events.append(event(spec.event_type, start + timedelta(seconds=offset), value, spec.unit))
    events.append(event("session_stop", stop, None, None))
    return events


def self_test(rng: random.Random, case_id: str, device: PhysicalDevice, after: datetime) -> DeviceEvent:
    """A self-test a device runs days after a case, still tagged with that case's id: outside the
    procedure window, so it must not count as part of the procedure."""
    ts = after + timedelta(days=rng.randint(1, 3), minutes=rng.randint(0, 600))
    enqueued = ts + timedelta(milliseconds=rng.randint(0, 20_000))
    return DeviceEvent(
        case_id, device, "self_test", ts + timedelta(seconds=device.clock_skew_s), None, None, enqueued
    )


def _assign_devices(rng: random.Random, journeys: list[Journey]) -> list[PhysicalDevice]:
    """Give every case its OR devices from a pool of physical devices (never two cases at once)."""
    pool: dict[str, list[PhysicalDevice]] = {k: [] for k in OR_DEVICE_MODELS}
    created: list[PhysicalDevice] = []
    numbers = {k: 10001 for k in OR_DEVICE_MODELS}
    for j in sorted(journeys, key=lambda x: (x.surgery_start, x.index)):
        kinds = ("robotic-arm", "powered-saw") if j.robotic else ("tourniquet", "powered-saw")
        for kind in kinds:
            start = j.surgery_start - timedelta(seconds=rng.randint(0, 300))
            stop = j.surgery_end + timedelta(seconds=rng.randint(0, 300))
            free = [d for d in pool[kind] if d.busy_until + timedelta(minutes=30) <= start]
            if free:
                device = rng.choice(free)
            else:
                device = _new_device(rng, OR_DEVICE_MODELS[kind], numbers[kind])
                numbers[kind] += rng.randint(1, 7)
                pool[kind].append(device)
                created.append(device)
            device.busy_until = stop
            j.devices.append(device)
            j.events.extend(device_stream(rng, j.case_id, device, start, stop, rng.randint(3, 10)))
    # Self-tests come from a separate stream so that they shift no other draw.
    test_rng = random.Random(f"self-test:{len(journeys)}:{len(created)}")
    for j in journeys:
        for device in j.devices:
            if test_rng.random() < 0.1:
                j.events.append(self_test(test_rng, j.case_id, device, j.surgery_end))
    return created


def build_cohort(patients: int, seed: int) -> Cohort:
    """Build ``patients`` journeys (one episode each) deterministically from ``seed``."""
    if patients < 1:
        raise ValueError("patients must be >= 1")
    rng = random.Random(seed)
    mrns = rng.sample(range(10_000_000, 100_000_000), patients)
    cases = rng.sample(range(100_000, 900_000), patients)  # CASE-9xxxxx is never a real case
    implant_serials = rng.sample(range(1_000_000, 10_000_000), patients)
    journeys = [
        _build_journey(rng, i, f"MRN{mrns[i]:08d}", cases[i], f"IMP-{implant_serials[i]}")
        for i in range(patients)
    ]
    _score_proms(journeys)
    devices = _assign_devices(rng, journeys)
    return Cohort(seed=seed, journeys=journeys, devices=devices)


@dataclass(frozen=True)
class PlantedRecord:
    """One planted bad record, as listed in ground_truth/planted_bad_records.csv."""

    kind: str
    source: str  # fhir | device | registry
    path: str  # relative to <out>/landing, with '/'
    locator: str  # NDJSON: 1-based line; device: 0-based record index; registry: table:pk
    table: str
    field: str
    expected_outcome: str  # quarantined | held
