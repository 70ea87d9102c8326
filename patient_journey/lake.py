"""The one Delta writer, and the table layout of every zone.

Layout::

    <restricted_url>/bronze/<source>        records as received, with lineage
    <restricted_url>/flattened/<table>      bronze flattened into each staged table's columns, every
                                            record kept (patient_journey.flattened)
    <restricted_url>/staged/<table>         typed, validated, still with direct identifiers
    <restricted_url>/identity/crosswalk     source identifier -> patient key
    <quarantine_url>/quarantine/...         rejected records: rule and lineage, no values
    <restricted_url>/held/records           records that could not be linked yet
    <restricted_url>/ledger/...             inputs already processed, watermarks
    <restricted_url>/_ingest/<source>/...   Arrow IPC files of batches read, until their commit
    <restricted_url>/_preflight/...         fingerprint of the suite set that built last (preflight)
    <warehouse_url>/silver/<table>          conformed entities keyed by patient key
    <warehouse_url>/gold/<table>            the journey: journey_event, surgical_episode

Every write is one Delta commit, so readers never see half a table and a failed run leaves the
previous version in place. Bronze tables keep a change data feed, so that a build reads only the
rows committed since the one before (``changes_since``).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import TypeVar

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
from deltalake import CommitProperties, DeltaTable, write_deltalake
from deltalake.exceptions import SchemaMismatchError, TableNotFoundError

from patient_journey.azure import AzureAccess, is_blob_url, storage_failure
from patient_journey.contracts import BUCKET, ContractError, contract_of
from patient_journey.settings import JourneySettings
from patient_journey.storage import Storage, azure_access, join, normalise_url

T = TypeVar("T")
CHANGE_FEED = {"delta.enableChangeDataFeed": "true"}


class Zone(StrEnum):
    RESTRICTED = "restricted"
    QUARANTINE = "quarantine"
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


def quarantine(name: str) -> TableRef:
    return TableRef(Zone.QUARANTINE, "quarantine", name)


def ledger_table(source: str) -> TableRef:
    """Inputs already read, per source (one table each, so sources ingest in parallel safely)."""
    return restricted("ledger", f"{source}_input")


def extraction_rejects_table(source: str) -> TableRef:
    """Records a source rejected while reading (kept across runs)."""
    return quarantine(f"{source}_rejected_at_read")


def silver(name: str) -> TableRef:
    return TableRef(Zone.WAREHOUSE, "silver", name)


def gold(name: str) -> TableRef:
    return TableRef(Zone.WAREHOUSE, "gold", name)


def patient_buckets(keys: pa.Array | pa.ChunkedArray, count: int) -> pa.Array:
    """The bucket of each patient key: its first four hex digits as a number, modulo ``count``
    (keys are HMAC-SHA256 hex digests, so buckets are even); -1 where there is no key, and for a
    key that is not hex (none is: the value only has to be stable)."""
    if isinstance(keys, pa.ChunkedArray):
        keys = keys.combine_chunks()
    prefixes = pc.utf8_slice_codeunits(keys.cast(pa.string()), 0, 4).dictionary_encode()

    def bucket(prefix: str) -> int:
        try:
            return int(prefix, 16) % count
        except ValueError:
            return -1

    numbers = pa.array([bucket(p) for p in prefixes.dictionary.to_pylist()], pa.int32())
    return pc.fill_null(numbers.take(prefixes.indices), -1)


class Lake:
    """Reads and writes the Delta tables of all zones, local or in Azure Blob Storage.

    The silver and gold tables with a patient key are partitioned by ``patient_bucket``, which
    this writer derives from ``patient_key`` (so a read or a delete of some patients' rows touches
    their buckets' files alone: ``read(buckets=...)``, ``delete_matching``)."""

    def __init__(self, settings: JourneySettings) -> None:
        urls = settings.storage
        self._roots = {
            Zone.RESTRICTED: normalise_url(urls.restricted_url),
            Zone.QUARANTINE: normalise_url(urls.quarantine_root),
            Zone.WAREHOUSE: normalise_url(urls.warehouse_url),
        }
        self._azure = azure_access(settings)
        self.bucket_count = urls.patient_buckets

    def root(self, zone: Zone) -> str:
        return self._roots[zone]

    @property
    def azure(self) -> AzureAccess | None:
        """The Azure access the lake uses (None when no zone is in blob storage): share it, so
        one run builds one blob client and one credential."""
        return self._azure

    def storage(self, url: str) -> Storage:
        """File access to a location (e.g. landing) with the lake's Azure access."""
        return Storage(url, self._azure)

    def uri(self, ref: TableRef) -> str:
        return join(self._roots[ref.zone], ref.layer, ref.name)

    def storage_options(self, uri: str) -> dict[str, str] | None:
        if self._azure is None or not is_blob_url(uri):
            return None
        return self._azure.delta_options()

    def _call(self, operation: str, ref: TableRef, action: Callable[[str, dict[str, str] | None], T]) -> T:
        """Run a delta-rs call; in blob storage, a failure becomes a StorageError naming the
        operation and container, with no secret (delta-rs messages can carry request URLs)."""
        uri = self.uri(ref)
        options = self.storage_options(uri)
        if options is None:
            return action(uri, options)
        try:
            return action(uri, options)
        except (TableNotFoundError, SchemaMismatchError):
            raise
        except Exception as exc:
            raise storage_failure(exc, f"{operation} Delta table {ref.label}", uri) from None

    def _table(self, ref: TableRef) -> DeltaTable | None:
        try:
            return self._call("open", ref, lambda uri, options: DeltaTable(uri, storage_options=options))
        except TableNotFoundError:
            return None

    def version(self, ref: TableRef) -> int | None:
        table = self._table(ref)
        return None if table is None else table.version()

    def read(
        self, ref: TableRef, columns: list[str] | None = None, buckets: Collection[int] | None = None
    ) -> pa.Table | None:
        """The table (its ``columns``, or all), or None if it does not exist; of a bucketed
        table, only the rows of ``buckets`` if given (their partitions alone are read)."""
        table = self._table(ref)
        if table is None:
            return None
        filters = None
        if buckets is not None and self.bucketed(ref):
            filters = [(BUCKET, "in", sorted(buckets))] if buckets else [(BUCKET, "=", -2)]  # -2: none
        return self._call(
            "read", ref, lambda _uri, _options: table.to_pyarrow_table(columns=columns, filters=filters)
        )

    def row_count(self, ref: TableRef) -> int | None:
        """The table's rows, from the Delta log's file statistics (no data read); None if it
        does not exist."""
        table = self._table(ref)
        if table is None:
            return None
        actions = self._call(
            "read the log of", ref, lambda _uri, _options: table.get_add_actions(flatten=True)
        )
        records = pa.table(actions).column("num_records")
        if records.null_count:  # a writer that kept no statistics: count the rows
            rows: pa.Table = self._call(
                "read", ref, lambda _uri, _options: table.to_pyarrow_table(columns=[])
            )
            return int(rows.num_rows)
        return int(pc.sum(records).as_py() or 0)

    @staticmethod
    def bucketed(ref: TableRef) -> bool:
        """Whether the table is partitioned by patient bucket (a warehouse table with a patient key)."""
        contract = contract_of(ref.layer, ref.name) if ref.zone is Zone.WAREHOUSE else None
        return contract is not None and contract.bucketed

    def buckets_of(self, keys: pa.Array | pa.ChunkedArray) -> pa.Array:
        """The bucket of each patient key (``patient_buckets`` with this lake's bucket count)."""
        return patient_buckets(keys, self.bucket_count)

    def _laid_out(
        self, ref: TableRef, data: pa.Table | pa.RecordBatchReader
    ) -> pa.Table | pa.RecordBatchReader:
        """The rows with the table's layout column (``patient_bucket``, from ``patient_key``)."""
        if not self.bucketed(ref):
            return data
        assert isinstance(data, pa.Table), "the analysts' zone is written whole"
        if BUCKET in data.column_names:
            data = data.drop_columns([BUCKET])
        return data.append_column(BUCKET, self.buckets_of(data.column("patient_key")))

    def overwrite(
        self, ref: TableRef, data: pa.Table | pa.RecordBatchReader, metadata: dict[str, str] | None = None
    ) -> int:
        """Replace the table's content in one commit; returns the new version.

        A table of the analysts' zone must have exactly its declared columns and types
        (patient_journey.contracts and the sources' ``silver``), or nothing is written: ContractError names the table and the
        columns that differ. Its Delta schema follows the declaration, so changing a declared
        column (a deliberate migration) replaces the schema with the new one in the same commit."""
        data = self._laid_out(ref, data)
        self._check_contract(ref, data)
        self._call(
            "write",
            ref,
            lambda uri, options: write_deltalake(
                uri,
                data,
                mode="overwrite",
                schema_mode="overwrite",
                partition_by=[BUCKET] if self.bucketed(ref) else None,
                storage_options=options,
                configuration=self._configuration(ref),
                commit_properties=CommitProperties(custom_metadata=metadata) if metadata else None,
            ),
        )
        return self._version_after_write(ref)

    def append(
        self, ref: TableRef, data: pa.Table | pa.RecordBatchReader, metadata: dict[str, str] | None = None
    ) -> int:
        """Append rows in one commit (a reader is streamed, never held whole); returns the new
        version. ``metadata`` is recorded with the commit (``commit_metadata``), even of no rows.
        Rows for the analysts' zone are checked against the table's declaration as in ``overwrite``."""
        data = self._laid_out(ref, data)
        self._check_contract(ref, data)
        self._call(
            "append to",
            ref,
            lambda uri, options: write_deltalake(
                uri,
                data,
                mode="append",
                partition_by=[BUCKET] if self.bucketed(ref) else None,
                storage_options=options,
                configuration=self._configuration(ref),
                commit_properties=CommitProperties(custom_metadata=metadata) if metadata else None,
            ),
        )
        return self._version_after_write(ref)

    @staticmethod
    def _check_contract(ref: TableRef, data: pa.Table | pa.RecordBatchReader) -> None:
        if ref.zone is not Zone.WAREHOUSE:
            return
        contract = contract_of(ref.layer, ref.name)
        if contract is None:
            raise ContractError(
                f"Table {ref.label} is not declared (patient_journey/contracts.py, or the silver "
                "tables of the source that feeds it): every table of the analysts' zone is. Nothing "
                "was written."
            )
        assert isinstance(data, pa.Table), "the analysts' zone is checked whole"
        contract.check(data)

    @staticmethod
    def _configuration(ref: TableRef) -> dict[str, str | None] | None:
        """Table properties a new table is created with: bronze keeps a change data feed."""
        return dict(CHANGE_FEED) if ref.layer == "bronze" else None

    def commit_metadata(self, ref: TableRef) -> dict[str, str]:
        """What the table's latest commit recorded with ``metadata`` (empty for none, or no table)."""
        table = self._table(ref)
        if table is None:
            return {}
        latest = self._call("read the history of", ref, lambda _uri, _options: table.history(1))
        return {k: v for k, v in latest[0].items() if isinstance(v, str)} if latest else {}

    def scan(
        self, ref: TableRef, version: int, columns: list[str] | None, predicate: ds.Expression | None = None
    ) -> pa.RecordBatchReader:
        """The rows (of ``columns``, or all; matching ``predicate``) of a version of the table,
        as a stream of record batches."""
        table = self._table(ref)
        if table is None:
            raise ValueError(f"{ref.label} does not exist")
        self._call("open", ref, lambda _uri, _options: table.load_as_version(version))
        dataset = self._call("read", ref, lambda _uri, _options: table.to_pyarrow_dataset())
        return dataset.scanner(columns=columns, filter=predicate).to_reader()

    def changes_since(
        self, ref: TableRef, version: int, until: int, columns: list[str], predicate: str | None = None
    ) -> pa.RecordBatchReader | None:
        """The rows (of ``columns``, matching the SQL ``predicate``) appended to an append-only
        table after ``version`` up to ``until``, streamed from its change data feed; None when
        that is not all that changed (rows were deleted or rewritten: read the table whole
        instead) or the feed does not reach back to ``version``."""
        table = self._table(ref)
        if table is None or until <= version:
            return None
        since = table.version() - version
        history = self._call("read the history of", ref, lambda _uri, _options: table.history(since))
        if table.metadata().configuration.get("delta.enableChangeDataFeed") != "true" or any(
            commit.get("operation") != "WRITE"
            or (commit.get("operationParameters") or {}).get("mode") != "Append"
            for commit in history
            if int(commit["version"]) <= until
        ):
            return None
        # The history since ``version`` holds only appends, so the feed was on all along (turning
        # it on is a commit of its own, which would be among them).
        feed = self._call(
            "read the changes of",
            ref,
            lambda _uri, _options: table.load_cdf(
                starting_version=version + 1, ending_version=until, columns=columns, predicate=predicate
            ),
        )
        rows = pa.RecordBatchReader.from_stream(feed)
        names = rows.schema.names
        keep = [names.index(c) for c in columns]
        schema = pa.schema([rows.schema.field(i) for i in keep])

        def batches() -> Iterator[pa.RecordBatch]:  # without the feed's own columns
            for batch in rows:
                yield pa.RecordBatch.from_arrays([batch.column(i) for i in keep], schema=schema)

        return pa.RecordBatchReader.from_batches(schema, batches())

    def enable_change_feed(self, ref: TableRef) -> None:
        """Turn on a table's change data feed (bronze tables made before they had one)."""
        table = self._table(ref)
        if table is not None and table.metadata().configuration.get("delta.enableChangeDataFeed") != "true":
            self._call(
                "alter", ref, lambda _uri, _options: table.alter.set_table_properties(dict(CHANGE_FEED))
            )

    def delete(self, ref: TableRef, predicate: str) -> int:
        """Delete the rows matching a SQL predicate in one commit (none when nothing matches);
        returns the number of rows deleted."""
        table = self._table(ref)
        if table is None:
            return 0
        metrics = self._call("delete from", ref, lambda _uri, _options: table.delete(predicate))
        return int(metrics["num_deleted_rows"])

    def delete_matching(self, ref: TableRef, keys: pa.Table) -> int:
        """Delete the rows equal to a row of ``keys`` on all of its columns (nulls match nothing);
        returns the number of rows deleted. The keys go to a Delta merge as a table, not into a
        predicate: an IN list of a few thousand values overflowed a stack of delta-rs' worker
        threads (a segfault at 52,000 patients). With ``patient_bucket`` among the keys of a
        bucketed table, the merge reads only those buckets' files."""
        table = self._table(ref)
        if table is None or keys.num_rows == 0:
            return 0
        on = " AND ".join(f"t.{column} = s.{column}" for column in keys.column_names)
        metrics = self._call(
            "delete from",
            ref,
            lambda _uri, _options: (
                table.merge(keys, predicate=on, source_alias="s", target_alias="t")
                .when_matched_delete()
                .execute()
            ),
        )
        return int(metrics["num_target_rows_deleted"])

    def delete_keys(self, ref: TableRef, column: str, keys: Collection[str | None]) -> int:
        """Delete the rows whose ``column`` holds one of ``keys`` (a null among them: the rows
        where it is null); returns the number of rows deleted. Patient keys of a bucketed table
        are deleted bucket by bucket (``delete_matching``)."""
        wanted = pa.table({column: pa.array(sorted({key for key in keys if key is not None}), pa.string())})
        nulls = f"{column} IS NULL"
        if column == "patient_key" and self.bucketed(ref):
            wanted = wanted.append_column(BUCKET, self.buckets_of(wanted.column(column)))
            nulls = f"{BUCKET} = -1 AND {nulls}"
        deleted = self.delete_matching(ref, wanted)
        if None in keys:
            deleted += self.delete(ref, nulls)
        return deleted

    def update(self, ref: TableRef, predicate: str, updates: dict[str, str]) -> int:
        """Set columns (SQL expressions) of the rows matching a SQL predicate in one commit;
        returns the number of rows updated."""
        table = self._table(ref)
        if table is None:
            return 0
        metrics = self._call(
            "update", ref, lambda _uri, _options: table.update(updates=updates, predicate=predicate)
        )
        return int(metrics["num_updated_rows"])

    def _version_after_write(self, ref: TableRef) -> int:
        version = self.version(ref)
        assert version is not None  # we just wrote it
        return version

    def tables(self, zone: Zone, layer: str) -> list[TableRef]:
        """The Delta tables present in one layer of a zone."""
        storage = self.storage(self._roots[zone])
        return [
            TableRef(zone, layer, name)
            for name in storage.list_dirs(layer)
            if storage.exists(layer, name, "_delta_log")
        ]
