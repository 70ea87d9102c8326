"""Patient-reported outcomes in staging: item answers -> catalog scores (no Prefect here).

Staging (the sources' ``staged`` tables) flattens each PROM source into one row per questionnaire with
``instrument`` (a catalog id), ``items`` (a JSON object: item id -> answer code, as text) and
placeholders for what this module fills in from ``catalog/instruments`` via
:func:`patient_journey.scoring.score_responses`:

- ``score`` (DOUBLE): the instrument's first score in its catalog file (KOOS JR / HOOS JR
  ``interval``); null unless scored;
- ``scoring_status``: ``scored``, ``incomplete`` (more items unanswered than the instrument allows:
  loaded, score null), ``out_of_range`` (an answer is not a valid code of its item: the staged
  suite quarantines it under ``item_in_range``) or ``unknown_instrument`` (quarantined under
  ``instrument_known``);
- ``score_name`` and ``items_answered``.

``items`` is dropped afterwards: answers stay in bronze. Which rows are PROMs:

- REDCap (``redcap_prom``): a form is a PROM form when its name is a catalog instrument id
  (``koos_jr``, ``hoos_jr``, ``oxford_knee_score``, ``promis_10``) and its item fields are named by
  the catalog's item ids; every other form (enrolment, adverse events, ...) stays in bronze only.
- FHIR (``fhir_prom``): every QuestionnaireResponse; the instrument is the last path segment of
  its ``questionnaire`` canonical, so one not in the catalog is ``unknown_instrument``.
"""

from __future__ import annotations

import pyarrow as pa

from patient_journey.engine import connect
from patient_journey.scoring import SCORES_SCHEMA, Catalog, load_catalog, score_responses

# Staged PROM table -> whether only rows whose instrument is a catalog id are PROMs (REDCap:
# a form that is no instrument is simply not a PROM; FHIR: a response to an unknown
# questionnaire is a PROM that cannot be scored).
PROM_TABLES: dict[str, bool] = {"redcap_prom": True, "fhir_prom": False}
ITEMS_COLUMN = "items"


def score_table(table: pa.Table, catalog: Catalog, catalog_forms_only: bool) -> pa.Table:
    """Fill ``score``, ``scoring_status``, ``score_name``, ``items_answered``; drop ``items``."""
    item_ids = sorted({item.id for instrument in catalog.instruments.values() for item in instrument.items})
    primary = pa.table(
        {
            "instrument": list(catalog.instruments),
            "score_name": [instrument.primary_score.name for instrument in catalog.instruments.values()],
        }
    )
    connection = connect()
    try:
        connection.register("staged", table)
        connection.register("primary_score", primary)
        where = "WHERE instrument IN (SELECT instrument FROM primary_score)" if catalog_forms_only else ""
        rows = connection.sql(f"SELECT * FROM staged {where}").to_arrow_table()
        connection.register("prom_rows", rows)
        # Every item's answer extracted by one call per row (a call per item parsed each row's
        # JSON once per catalog item).
        paths = ", ".join(f"'$.\"{i}\"'" for i in item_ids)
        answers = ", ".join(f'_answers[{n}] AS "{i}"' for n, i in enumerate(item_ids, start=1))
        wide = connection.sql(
            f"""SELECT CAST(_row AS VARCHAR) AS response_id, instrument, {answers}
            FROM (SELECT *, json_extract_string({ITEMS_COLUMN}, [{paths}]) AS _answers FROM prom_rows)"""
        ).to_arrow_table()
        scores = score_responses(wide, catalog) if wide.num_rows else SCORES_SCHEMA.empty_table()
        connection.register("scores", scores)
        result = connection.sql(
            f"""
            WITH chosen AS (
                SELECT s.* FROM scores s LEFT JOIN primary_score p USING (instrument)
                WHERE s.score_name IS NULL OR s.score_name = p.score_name
            )
            SELECT r.* EXCLUDE ({ITEMS_COLUMN}) REPLACE (
                       c.score AS score, c.status AS scoring_status, c.score_name AS score_name,
                       CAST(c.items_answered AS INTEGER) AS items_answered)
            FROM prom_rows r LEFT JOIN chosen c ON c.response_id = CAST(r._row AS VARCHAR)
            ORDER BY r._row
            """
        ).to_arrow_table()
    finally:
        connection.close()
    return result


def redcap_forms_not_loaded(records: pa.Table, catalog: Catalog | None = None) -> dict[str, int]:
    """Bronze REDCap form instances that no staged table loads (forms of the PROM project that
    are no catalog instrument, e.g. enrolment; every form of another project), per
    ``<entity>/<form>``: reported in the run summary so that nothing is dropped unseen."""
    if records.num_rows == 0:
        return {}
    instruments = pa.table({"instrument": list((catalog or load_catalog()).instruments)})
    connection = connect()
    try:
        connection.register("records", records.select(["entity", "payload"]))
        connection.register("instruments", instruments)
        rows = connection.sql(
            """
            SELECT entity || '/' || coalesce(payload->>'$.form', '?') AS form, count(*) AS n
            FROM records
            WHERE entity <> 'redcap:prom' OR (payload->>'$.form') NOT IN (SELECT instrument FROM instruments)
            GROUP BY 1 ORDER BY 1
            """
        ).fetchall()
    finally:
        connection.close()
    return {str(form): int(n) for form, n in rows}


def score_prom_tables(staged: dict[str, pa.Table], catalog: Catalog | None = None) -> dict[str, pa.Table]:
    """Score every staged PROM table present in ``staged`` (in place; also returned)."""
    present = [name for name in PROM_TABLES if name in staged]
    if not present:
        return staged
    catalog = catalog or load_catalog()
    for name in present:
        staged[name] = score_table(staged[name], catalog, PROM_TABLES[name])
    return staged
