"""Identity linkage: every staged record to one pseudonymous patient key, or held for later.

Each source declares how its staged tables link (``Source.links``, ``LinkSpec``) and the identity
relations it adds (``Source.identity``, ``IdentityRelation``); the plug-ins' declarations are
gathered in ``patient_journey.sources.plugins``. Links, in the order they are derived:

* FHIR Patient -> patient key = HMAC("mrn:" + MRN);
* EHR records -> their Patient reference;
* OR case id (Procedure identifier) -> the Procedure's patient; device telemetry -> its case id;
* registry patient -> EHR patient with the same MRN *and* birth date; registry rows -> registry id;
* REDCap record -> EHR patient with the same MRN (given on the record's baseline event).
* FHIR QuestionnaireResponse -> its Patient reference, like the other EHR records.

A device's serial number (a direct identifier under HIPAA Safe Harbor) reaches silver only as
``device_key`` = HMAC("device-serial:" + serial): the same device keeps the same key.

A record whose link is missing is held with the rule it could not satisfy; held records stay in
the staged store and are linked again by every build after which the identities grew, so they
load as soon as their patient arrives.
The crosswalk (source identifier -> patient key) is written to the restricted zone only.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
from duckdb.func import PythonUDFType

from patient_journey.engine import connect
from patient_journey.identity import KeyMaker

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


@dataclass(frozen=True)
class IdentityRelation:
    """One relation from a source's identifiers to patient keys: a temporary table ``name`` made
    by ``sql`` (over ``staged_<table>`` and the relations declared before it) before any table
    links, and its rows of the crosswalk (``identifier_type, identifier, patient_key``).

    A relation's rows that a link joins to must follow from its crosswalk rows (its other columns
    being functions of the identifier, like an episode key, or read by relations declared after
    it): a build compares crosswalks to know whether any linked row may link otherwise now
    (``increments.identity_change``)."""

    name: str
    sql: str
    crosswalk: str


@dataclass(frozen=True)
class LinkResult:
    silver: dict[str, pa.Table]
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


class Linker:
    """Links staged rows to patients: the identity relations are built once, from the whole of
    the tables they read (``identity_tables``: every passed row of patient, procedure, ...), and
    then any set of staged rows links against them (``link``): a build links only the rows that
    changed, or whose link could have."""

    def __init__(
        self,
        keys: KeyMaker,
        identity: Sequence[IdentityRelation],
        identity_tables: dict[str, pa.Table],
    ) -> None:
        self.identity = identity
        self.connection = connect(private=True)  # its own: the pseudonym function
        _register_pseudonym(self.connection, keys)
        for name, table in identity_tables.items():
            self.connection.register(f"staged_{name}", table)
        for relation in identity:
            self.connection.execute(f"CREATE TEMP TABLE {relation.name} AS {relation.sql}")
        for name in identity_tables:  # the relations are made: the connection lets go of the rows
            self.connection.unregister(f"staged_{name}")

    def relations(self) -> dict[str, pa.Table]:
        """Each identity relation's rows, in a stable order."""
        return {
            relation.name: self.connection.sql(f"SELECT * FROM {relation.name} ORDER BY ALL").to_arrow_table()
            for relation in self.identity
        }

    def crosswalk(self) -> pa.Table:
        return self.connection.sql(
            " UNION ".join(relation.crosswalk for relation in self.identity)
            + " ORDER BY identifier_type, identifier"
        ).to_arrow_table()

    def link(self, staged: dict[str, pa.Table], run_id: str, links: Sequence[LinkSpec]) -> LinkResult:
        """Link the staged rows given (tables absent from ``staged`` link no rows) by the sources'
        declarations; returns their silver rows, held records and the crosswalk."""
        connection = self.connection
        silver_parts: dict[str, list[pa.Table]] = {}
        held_parts: list[pa.Table] = []
        loaded: dict[str, int] = {}
        held_counts: dict[str, int] = {}
        for spec in links:
            if spec.staged not in staged:
                continue
            source = f"linking_{spec.staged}"
            connection.register(source, staged[spec.staged])
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
            connection.unregister(source)
            loaded[spec.staged] = linked.num_rows
            held_counts[spec.staged] = held.num_rows
            held_parts.append(held)
            if spec.silver is not None:
                silver_parts.setdefault(spec.silver, []).append(linked)
        silver = {name: pa.concat_tables(parts) for name, parts in silver_parts.items()}
        held_rows = pa.concat_tables(held_parts) if held_parts else HELD_SCHEMA.empty_table()
        return LinkResult(silver, held_rows, loaded, held_counts)

    def close(self) -> None:
        self.connection.close()


def identity_inputs(identity: Sequence[IdentityRelation]) -> list[str]:
    """The staged tables the identity relations read (``staged_<name>`` in their SQL)."""
    return sorted({name for relation in identity for name in re.findall(r"\bstaged_(\w+)", relation.sql)})


def link(
    staged: dict[str, pa.Table],
    keys: KeyMaker,
    run_id: str,
    links: Sequence[LinkSpec],
    identity: Sequence[IdentityRelation],
) -> LinkResult:
    """Link whole validated staged tables in one step: identity relations from them, then every
    row of them linked (``Linker``); returns silver tables and held records."""
    linker = Linker(
        keys, identity, {name: staged[name] for name in identity_inputs(identity) if name in staged}
    )
    try:
        return linker.link(staged, run_id, links)
    finally:
        linker.close()
