"""The one Delta writer, and the table layout of every zone.

Layout::

    <restricted_url>/bronze/<source>        records as received, with lineage
    <restricted_url>/staged/<table>         typed, validated, still with direct identifiers
    <restricted_url>/identity/crosswalk     source identifier -> patient key
    <restricted_url>/quarantine/...         rejected records: rule and lineage
    <restricted_url>/held/records           records that could not be linked yet
    <restricted_url>/ledger/...             inputs already processed, watermarks
    <warehouse_url>/silver/<table>          conformed entities keyed by patient key
    <warehouse_url>/gold/<table>            the journey: journey_event, surgical_episode

Every write is one Delta commit, so readers never see half a table and a failed run leaves the
previous version in place.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import pyarrow as pa
from deltalake import DeltaTable, write_deltalake
from deltalake.exceptions import TableNotFoundError

from patient_journey.settings import StorageSettings
from patient_journey.storage import Storage, join, normalise_url


class Zone(StrEnum):
    RESTRICTED = "restricted"
    WAREHOUSE = "warehouse"


@dataclass(frozen=True)
class TableRef:
    zone: Zone
    layer: str
    name: str

    @property
    def label(self) -> str:
        return f"{self.layer}.{self.name}"


def bronze(name: str) -> TableRef:
    return TableRef(Zone.RESTRICTED, "bronze", name)


def staged(name: str) -> TableRef:
    return TableRef(Zone.RESTRICTED, "staged", name)


def restricted(layer: str, name: str) -> TableRef:
    return TableRef(Zone.RESTRICTED, layer, name)


def silver(name: str) -> TableRef:
    return TableRef(Zone.WAREHOUSE, "silver", name)


def gold(name: str) -> TableRef:
    return TableRef(Zone.WAREHOUSE, "gold", name)


class Lake:
    """Reads and writes the Delta tables of all zones."""

    def __init__(self, storage: StorageSettings) -> None:
        self._roots = {
            Zone.RESTRICTED: normalise_url(storage.restricted_url),
            Zone.WAREHOUSE: normalise_url(storage.warehouse_url),
        }

    def root(self, zone: Zone) -> str:
        return self._roots[zone]

    def uri(self, ref: TableRef) -> str:
        return join(self._roots[ref.zone], ref.layer, ref.name)

    def _table(self, ref: TableRef) -> DeltaTable | None:
        try:
            return DeltaTable(self.uri(ref))
        except TableNotFoundError:
            return None

    def version(self, ref: TableRef) -> int | None:
        table = self._table(ref)
        return None if table is None else table.version()

    def read(self, ref: TableRef, columns: list[str] | None = None) -> pa.Table | None:
        table = self._table(ref)
        if table is None:
            return None
        return table.to_pyarrow_table(columns=columns)

    def overwrite(self, ref: TableRef, data: pa.Table) -> int:
        """Replace the table's content (and schema) in one commit; returns the new version."""
        write_deltalake(self.uri(ref), data, mode="overwrite", schema_mode="overwrite")
        return self._version_after_write(ref)

    def append(self, ref: TableRef, data: pa.Table) -> int:
        write_deltalake(self.uri(ref), data, mode="append")
        return self._version_after_write(ref)

    def _version_after_write(self, ref: TableRef) -> int:
        version = self.version(ref)
        assert version is not None  # we just wrote it
        return version

    def tables(self, zone: Zone, layer: str) -> list[TableRef]:
        """The Delta tables present in one layer of a zone."""
        storage = Storage(self._roots[zone])
        return [
            TableRef(zone, layer, name)
            for name in storage.list_dirs(layer)
            if storage.exists(layer, name, "_delta_log")
        ]
