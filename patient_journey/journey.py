"""The journey: gold tables built from silver with DuckDB SQL.

* ``surgical_episode``: one row per index procedure (a patient's first total knee or hip
  arthroplasty), with the admission, the OR time the devices recorded, the devices used, length
  of stay, complications and readmissions within 30 and 90 days, and PROM scores. Complications
  and readmissions come from every source that reports them (``JourneyParts``: the registry, EHR
  Conditions whose code is in catalog/complications.csv, EHR inpatient encounters, a feed's
  inpatient admissions); one that more than one reports (same code / same admission day) counts
  once.
* ``journey_event``: one row per event per patient, as each source reports its events
  (``JourneyParts.events``), with its phase relative to the index procedure (pre / intra / post;
  null for a patient with no index procedure).
* ``device_clock``: one row per device, the skew of its clock seen against IoT Hub's enqueued
  time (median and largest), and whether it exceeds the skew tolerance (a quality metric).

Device events belong to a procedure when their device time is within the procedure's start and
end widened by the skew tolerance (JOURNEY_SOURCES__DEVICE_SKEW_TOLERANCE_SECONDS).

Grain and columns are documented in docs/warehouse.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv

from patient_journey.engine import connect
from patient_journey.scoring import Catalog, load_catalog
from patient_journey.settings import shipped

INDEX_PROCEDURE_CODES = ("609588000", "52734007")  # SNOMED CT total knee / total hip replacement
# SNOMED CT codes of an EHR Condition that count as a post-operative complication.
COMPLICATION_CODES = shipped("catalog", "complications.csv")


def load_complication_codes(path: Path = COMPLICATION_CODES) -> pa.Table:
    options = pacsv.ConvertOptions(column_types={"code": pa.string(), "display": pa.string()})
    return pacsv.read_csv(path, convert_options=options).select(["code", "display"])


def _reaches_mcid(timepoint: str) -> str:
    """Did the change from baseline reach the instrument's MCID, in its better direction? (on the
    scores themselves, not the rounded change; as :func:`scoring.change_reaches_mcid` does)"""
    change = f"(pc.prom_{timepoint} - pc.prom_baseline)"
    return (
        f"CASE WHEN pc.higher_is_better THEN {change} >= pc.mcid - 1e-9 ELSE -{change} >= pc.mcid - 1e-9 END"
    )


def instrument_mcid(catalog: Catalog) -> pa.Table:
    """Per instrument, the MCID and direction of its first (primary) score."""
    rows = [
        {
            "instrument": i.id,
            "mcid": i.primary_score.mcid.value,
            "higher_is_better": i.primary_score.higher_is_better,
        }
        for i in catalog.instruments.values()
    ]
    schema = pa.schema(
        [("instrument", pa.string()), ("mcid", pa.float64()), ("higher_is_better", pa.bool_())]
    )
    return pa.Table.from_pylist(rows, schema=schema)


# {admissions} and {complications} are the plug-ins' parts (build_journey puts them in).
EPISODE_SQL = f"""
WITH idx AS (
    SELECT * FROM procedure WHERE code IN {INDEX_PROCEDURE_CODES}
    QUALIFY row_number() OVER (PARTITION BY patient_key ORDER BY performed_start, procedure_id) = 1
), adm AS (
    SELECT idx.episode_key, e.encounter_id, e.period_start, e.period_end
    FROM idx JOIN encounter e ON e.encounter_id = idx.encounter_id
), dev AS (
    SELECT d.episode_key,
           min(d.event_time) FILTER (WHERE d.event_type = 'session_start') AS session_start,
           max(d.event_time) FILTER (WHERE d.event_type = 'session_stop') AS session_stop,
           list_sort(list_distinct(list(d.udi_di) FILTER (WHERE d.udi_di IS NOT NULL))) AS devices_used,
           bool_or(d.device_type = 'robotic-arm') AS robotic,
           count(*) AS device_events
    FROM device_event d JOIN idx USING (episode_key)
    WHERE d.event_time BETWEEN idx.performed_start - to_seconds($tolerance)
                           AND idx.performed_end + to_seconds($tolerance)
    GROUP BY d.episode_key
), readmit AS (
    {{admissions}}
), readmit_days AS (
    -- DISTINCT: an admission that more than one source reports (same day) counts once
    SELECT DISTINCT idx.episode_key, r.admitted_on,
           date_diff('day', CAST(adm.period_end AS DATE), r.admitted_on) AS days
    FROM idx JOIN adm USING (episode_key) JOIN readmit r ON r.patient_key = idx.patient_key
    WHERE r.encounter_id IS DISTINCT FROM adm.encounter_id
), comp_event AS (
    {{complications}}
), comp_days AS (
    -- GROUP BY: a complication both the registry and the EHR report (same code and day) counts
    -- once, with the registry's Clavien-Dindo grade (the EHR has none)
    SELECT idx.episode_key, c.code, c.occurred_on, max(c.grade) AS grade,
           date_diff('day', CAST(idx.performed_start AS DATE), c.occurred_on) AS days
    FROM idx JOIN comp_event c ON c.patient_key = idx.patient_key
    GROUP BY ALL
), comp AS (
    SELECT episode_key, bool_or(days BETWEEN 0 AND 30) AS within_30d, bool_or(days BETWEEN 0 AND 90) AS within_90d,
           max(grade) FILTER (WHERE days BETWEEN 0 AND 90) AS max_grade_90d,
           count(*) FILTER (WHERE days BETWEEN 0 AND 90) AS count_90d
    FROM comp_days GROUP BY episode_key
), readm AS (
    SELECT episode_key, bool_or(days BETWEEN 0 AND 30) AS within_30d, bool_or(days BETWEEN 0 AND 90) AS within_90d,
           count(*) FILTER (WHERE days BETWEEN 0 AND 90) AS count_90d
    FROM readmit_days GROUP BY episode_key
), prom_timed AS (
    SELECT idx.episode_key, p.instrument, p.prom_source, p.score, p.collected_on,
           coalesce(p.timepoint, CASE
               WHEN d BETWEEN -90 AND 0 THEN 'baseline' WHEN d BETWEEN 21 AND 63 THEN '6w'
               WHEN d BETWEEN 120 AND 240 THEN '6m' WHEN d BETWEEN 300 AND 450 THEN '12m' END) AS timepoint
    FROM idx JOIN prom_score p ON p.patient_key = idx.patient_key,
         LATERAL (SELECT date_diff('day', CAST(idx.performed_start AS DATE), p.collected_on) AS d)
    WHERE p.score IS NOT NULL
), prom AS (
    SELECT * FROM prom_timed WHERE timepoint IS NOT NULL
    QUALIFY row_number() OVER (PARTITION BY episode_key, timepoint ORDER BY collected_on DESC) = 1
), prom_wide AS (
    SELECT episode_key, any_value(instrument) AS prom_instrument, any_value(prom_source) AS prom_source,
           max(score) FILTER (WHERE timepoint = 'baseline') AS prom_baseline,
           max(score) FILTER (WHERE timepoint = '6w') AS prom_6w,
           max(score) FILTER (WHERE timepoint = '6m') AS prom_6m,
           max(score) FILTER (WHERE timepoint = '12m') AS prom_12m
    FROM prom GROUP BY episode_key
), prom_change AS (
    SELECT w.*, m.mcid, m.higher_is_better,
           round(w.prom_6w - w.prom_baseline, 1) AS prom_change_6w,
           round(w.prom_6m - w.prom_baseline, 1) AS prom_change_6m,
           round(w.prom_12m - w.prom_baseline, 1) AS prom_change_12m
    FROM prom_wide w LEFT JOIN instrument_mcid m ON m.instrument = w.prom_instrument
)
SELECT idx.episode_key, idx.patient_key,
       CASE idx.code WHEN '609588000' THEN 'knee' WHEN '52734007' THEN 'hip' END AS joint,
       idx.code AS procedure_code, idx.display AS procedure_display,
       coalesce(dev.robotic, false) AS robotic_assisted,
       adm.period_start AS admission_time, adm.period_end AS discharge_time,
       idx.performed_start AS surgery_start, idx.performed_end AS surgery_end,
       round(date_diff('second', dev.session_start, dev.session_stop) / 60.0, 1) AS or_minutes,
       coalesce(dev.devices_used, []) AS devices_used,
       date_diff('day', CAST(adm.period_start AS DATE), CAST(adm.period_end AS DATE)) AS length_of_stay_days,
       coalesce(comp.within_30d, false) AS complication_30d,
       coalesce(comp.within_90d, false) AS complication_90d,
       comp.max_grade_90d AS max_complication_grade_90d,
       coalesce(readm.within_30d, false) AS readmission_30d,
       coalesce(readm.within_90d, false) AS readmission_90d,
       coalesce(comp.count_90d, 0) AS complications_90d,
       coalesce(readm.count_90d, 0) AS readmissions_90d,
       pc.prom_instrument, pc.prom_source, pc.prom_baseline, pc.prom_6w, pc.prom_6m, pc.prom_12m,
       pc.prom_change_6w, pc.prom_change_6m, pc.prom_change_12m,
       {_reaches_mcid("6w")} AS prom_mcid_6w,
       {_reaches_mcid("6m")} AS prom_mcid_6m,
       {_reaches_mcid("12m")} AS prom_mcid_12m,
       coalesce(dev.device_events, 0) AS device_events,
       idx.input_key, idx.source_offset
FROM idx
LEFT JOIN adm USING (episode_key)
LEFT JOIN dev USING (episode_key)
LEFT JOIN comp USING (episode_key)
LEFT JOIN readm USING (episode_key)
LEFT JOIN prom_change pc USING (episode_key)
ORDER BY idx.performed_start, idx.episode_key
"""

EVENT_SQL = """
WITH events AS (
    {events}
)
SELECT ev.patient_key, ep.episode_key, ev.event_time,
       CASE WHEN ep.episode_key IS NULL THEN NULL
            WHEN ev.event_time < ep.surgery_start THEN 'pre'
            WHEN ev.event_time <= ep.surgery_end THEN 'intra'
            ELSE 'post' END AS phase,
       ev.source, ev.event_type, ev.code, ev.detail, ev.value, ev.unit, ev.input_key, ev.source_offset
FROM events ev LEFT JOIN surgical_episode ep USING (patient_key)
WHERE ev.event_time IS NOT NULL
ORDER BY ev.patient_key, ev.event_time, ev.source, ev.event_type, ev.input_key, ev.source_offset
"""


DEVICE_CLOCK_SQL = """
SELECT device_type, device_key, count(*) AS messages,
       round(median(epoch(event_time) - epoch(enqueued_time))) AS median_skew_seconds,
       round(max(abs(epoch(event_time) - epoch(enqueued_time)))) AS max_abs_skew_seconds,
       abs(median(epoch(event_time) - epoch(enqueued_time))) > $tolerance AS beyond_tolerance
FROM device_event
WHERE event_time IS NOT NULL AND enqueued_time IS NOT NULL
GROUP BY device_type, device_key
ORDER BY device_type, device_key
"""


@dataclass(frozen=True)
class JourneyParts:
    """What one source adds to the gold tables, as SQL over the silver tables (every silver table
    is registered under its name, empty or not, so a part may read another source's tables).

    * ``views``: (name, SELECT) pairs, created as temporary views before the gold tables, in
      plug-in order (a source's reading of its own table that its other parts share).
    * ``events``: SELECTs giving journey_event's columns ``patient_key, event_time, source,
      event_type, code, detail, value, unit, input_key, source_offset``.
    * ``admissions``: SELECTs giving ``patient_key, admitted_on`` (a date) and ``encounter_id``
      (the EHR encounter, or NULL): the inpatient admissions that count as readmissions; one that
      several sources report on the same day counts once.
    * ``complications``: SELECTs giving ``patient_key, code, occurred_on, grade`` (Clavien-Dindo
      or NULL); one that several sources report (same code and day) counts once.
    """

    views: tuple[tuple[str, str], ...] = ()
    events: tuple[str, ...] = ()
    admissions: tuple[str, ...] = ()
    complications: tuple[str, ...] = ()


# The parts of silver tables more than one source feeds: PROM scores (registry, REDCap, FHIR).
SHARED_PARTS = JourneyParts(
    events=(
        """SELECT patient_key, CAST(collected_on AS TIMESTAMPTZ), prom_source, 'prom', instrument, timepoint,
           score, 'score', input_key, source_offset FROM prom_score WHERE score IS NOT NULL""",
    )
)


EVENT_COLUMNS = {
    "patient_key": "VARCHAR",
    "event_time": "TIMESTAMPTZ",
    "source": "VARCHAR",
    "event_type": "VARCHAR",
    "code": "VARCHAR",
    "detail": "VARCHAR",
    "value": "DOUBLE",
    "unit": "VARCHAR",
    "input_key": "VARCHAR",
    "source_offset": "BIGINT",
}
ADMISSION_COLUMNS = {"patient_key": "VARCHAR", "admitted_on": "DATE", "encounter_id": "VARCHAR"}
COMPLICATION_COLUMNS = {
    "patient_key": "VARCHAR",
    "code": "VARCHAR",
    "occurred_on": "DATE",
    "grade": "INTEGER",
}


def _union(selects: list[str], columns: dict[str, str]) -> str:
    """The parts' SELECTs as one, each given the columns' names and types by position."""
    typed = ", ".join(f"CAST({name} AS {kind}) AS {name}" for name, kind in columns.items())
    names = ", ".join(columns)
    if not selects:
        return (
            f"SELECT {typed} FROM (SELECT {', '.join(['NULL'] * len(columns))}) AS part({names}) WHERE false"
        )
    return "\n    UNION ALL ".join(f"SELECT {typed} FROM ({select}) AS part({names})" for select in selects)


def build_journey(
    silver: dict[str, pa.Table],
    parts: Sequence[JourneyParts],
    skew_tolerance_seconds: int = 900,
    catalog: Catalog | None = None,
    with_device_clock: bool = True,
) -> dict[str, pa.Table]:
    """Gold tables from the silver tables (all of them must be present, empty or not) and what
    each source adds (``parts``: the plug-ins' ``journey``, in plug-in order). Without
    device_clock if not ``with_device_clock``: a build of some patients' rows makes it from
    every patient's device events instead (``device_clock``)."""
    parts = [*parts, SHARED_PARTS]
    connection = connect()
    for name, table in silver.items():
        connection.register(name, table)
    connection.register("instrument_mcid", instrument_mcid(catalog or load_catalog()))
    connection.register("complication_code", load_complication_codes())
    for name, sql in (view for part in parts for view in part.views):
        connection.execute(f"CREATE TEMP VIEW {name} AS {sql}")
    admissions = _union([s for part in parts for s in part.admissions], ADMISSION_COLUMNS)
    complications = _union([s for part in parts for s in part.complications], COMPLICATION_COLUMNS)
    episode_sql = EPISODE_SQL.replace("{admissions}", admissions).replace("{complications}", complications)
    tolerance = {"tolerance": skew_tolerance_seconds}
    episode = connection.execute(episode_sql, tolerance).to_arrow_table()
    connection.register("surgical_episode", episode)
    events = _union([s for part in parts for s in part.events], EVENT_COLUMNS)
    events_table = connection.sql(EVENT_SQL.replace("{events}", events)).to_arrow_table()
    connection.close()
    tables = {"surgical_episode": episode, "journey_event": events_table}
    if with_device_clock:
        tables["device_clock"] = device_clock(silver["device_event"], skew_tolerance_seconds)
    return tables


DEVICE_CLOCK_COLUMNS = ["device_type", "device_key", "event_time", "enqueued_time"]


def device_clock(device_events: pa.Table, skew_tolerance_seconds: int = 900) -> pa.Table:
    """The device_clock gold table from silver device events (``DEVICE_CLOCK_COLUMNS`` of them
    suffice): one row per device, over all its events, whichever patients they are of."""
    connection = connect()
    try:
        connection.register("device_event", device_events)
        return connection.execute(DEVICE_CLOCK_SQL, {"tolerance": skew_tolerance_seconds}).to_arrow_table()
    finally:
        connection.close()
