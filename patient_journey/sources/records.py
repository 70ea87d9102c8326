"""The bronze record contract shared by every source adapter.

A bronze record is one source record as received (``payload``, a JSON text) plus lineage: the
source URI, the line or record offset inside it, a content hash and the run that read it. A
record that cannot even be read as a record becomes a reject with the rule it broke; its content
is never kept outside the restricted landing zone.
"""

from __future__ import annotations

import functools
import hashlib
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.compute as pc

from patient_journey.errors import StorageError
from patient_journey.storage import (
    LISTING_SCHEMA,
    FileInfo,
    InputChangedError,
    Storage,
    listed_files,
)

BRONZE_SCHEMA = pa.schema(
    [
        ("entity", pa.string()),
        ("record_id", pa.string()),
        ("payload", pa.string()),
        ("source_uri", pa.string()),
        ("source_offset", pa.int64()),
        ("content_hash", pa.string()),
        ("run_id", pa.string()),
        ("ingested_at", pa.timestamp("us", tz="UTC")),
    ]
)

# The bronze columns a record brings; the rest (run_id, ingested_at) are its run's.
RECORD_COLUMNS = 6

REJECT_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("entity", pa.string()),
        ("record_id", pa.string()),
        ("source_uri", pa.string()),
        ("source_offset", pa.int64()),
        ("rule", pa.string()),
        ("detail", pa.string()),
        ("run_id", pa.string()),
    ]
)

LEDGER_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("uri", pa.string()),
        ("version", pa.string()),
        ("size", pa.int64()),
        ("content_hash", pa.string()),
        ("records", pa.int64()),
        ("rejects", pa.int64()),
        ("watermark", pa.string()),
        ("run_id", pa.string()),
        ("processed_at", pa.timestamp("us", tz="UTC")),
    ]
)
# What deciding which inputs are new needs of a ledger.
LEDGER_KEYS = ["uri", "version", "content_hash"]
# The version of a ledger entry that `journey reprocess` invalidated: its input is read again as new.
FORGOTTEN = "forgotten"


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# An extraction hands its bronze rows to its sink in parts of about this many rows or bytes.
FLUSH_ROWS = 200_000
FLUSH_BYTES = 64 * 2**20
PartSink = Callable[[pa.Table], str]


@dataclass
class Extraction:
    """What one adapter read in one run: bronze records, rejects and the ledger entries."""

    source: str
    run_id: str
    # The buffered records' columns but the run's own (run_id, ingested_at: the same for every
    # row, filled when a table is made).
    _records: dict[str, list[object]] = field(
        default_factory=lambda: {name: [] for name in BRONZE_SCHEMA.names[:RECORD_COLUMNS]}
    )
    _rejects: dict[str, list[object]] = field(
        default_factory=lambda: {name: [] for name in REJECT_SCHEMA.names}
    )
    _ledger: dict[str, list[object]] = field(
        default_factory=lambda: {name: [] for name in LEDGER_SCHEMA.names}
    )
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    # Inputs seen but not read this run: still settling (or changed while read), and inputs read
    # again because their content changed under the same URI after an earlier run.
    pending_inputs: int = 0
    changed_inputs: int = 0
    # Rows of a tabular input with nothing to load (a REDCap row holding only its record id, form
    # statuses or unchecked boxes): counted, so that no row read goes unaccounted.
    blank_rows: int = 0
    # Where bronze rows go once enough are buffered (``flush``): a sink writes a part and returns
    # its URL; ``discard`` removes a part again (an input that failed half read). Without a sink
    # every row stays in memory until ``records``.
    sink: PartSink | None = field(default=None, repr=False)
    discard: Callable[[str], None] | None = field(default=None, repr=False)
    parts: list[tuple[str, int]] = field(default_factory=list)  # (URL, rows) written by the sink
    _spilled: int = 0
    _buffered_bytes: int = 0

    def add_record(
        self,
        entity: str,
        record_id: str,
        payload: str,
        source_uri: str,
        source_offset: int,
        raw: bytes,
    ) -> None:
        columns = self._records
        columns["entity"].append(entity)
        columns["record_id"].append(record_id)
        columns["payload"].append(payload.encode())
        columns["source_uri"].append(source_uri)
        columns["source_offset"].append(source_offset)
        columns["content_hash"].append(content_hash(raw))
        self._buffered_bytes += len(raw)

    def add_records(
        self,
        entity: str,
        source_uri: str,
        record_ids: list[str],
        payloads: list[bytes],
        offsets: list[int],
        hashes: list[str],
        raw_bytes: int,
    ) -> None:
        """Records of one entity and input at once, as ``add_record`` adds them one by one (an
        adapter's fast path: ``payloads`` are UTF-8, ``hashes`` ``content_hash`` of each
        record's raw bytes)."""
        columns = self._records
        columns["entity"].extend([entity] * len(record_ids))
        columns["record_id"].extend(record_ids)
        columns["payload"].extend(payloads)
        columns["source_uri"].extend([source_uri] * len(record_ids))
        columns["source_offset"].extend(offsets)
        columns["content_hash"].extend(hashes)
        self._buffered_bytes += raw_bytes

    def _table(self) -> pa.Table:
        """The buffered records with their run's columns. Payloads are kept as UTF-8 bytes: an
        Arrow string array made from Python strings took 2.9 us a row at M (FHIR Encounter), from
        bytes 0.2 us, plus the cast's UTF-8 check."""
        rows = len(self._records["entity"])
        arrays = [
            pa.array(values, pa.binary()).cast(pa.string())
            if name == "payload"
            else pa.array(values, type=BRONZE_SCHEMA.field(name).type)
            for name, values in self._records.items()
        ]
        arrays.append(pa.repeat(pa.scalar(self.run_id, pa.string()), rows))
        arrays.append(pa.repeat(pa.scalar(self.started_at, BRONZE_SCHEMA.field("ingested_at").type), rows))
        return pa.Table.from_arrays(arrays, schema=BRONZE_SCHEMA)

    def flush(self) -> None:
        """Hand the buffered bronze rows to the sink as one part (nothing without a sink)."""
        buffered = len(self._records["entity"])
        if self.sink is None or buffered == 0:
            return
        self.parts.append((self.sink(self._table()), buffered))
        self._spilled += buffered
        for column in self._records.values():
            column.clear()
        self._buffered_bytes = 0

    def flush_if_full(self) -> None:
        """``flush`` once FLUSH_ROWS rows or FLUSH_BYTES of records are buffered: called between
        inputs, and between the chunks of a streamed one, so memory stays bounded."""
        if len(self._records["entity"]) >= FLUSH_ROWS or self._buffered_bytes >= FLUSH_BYTES:
            self.flush()

    def add_reject(
        self,
        entity: str,
        source_uri: str,
        source_offset: int,
        rule: str,
        detail: str,
        record_id: str | None = None,
    ) -> None:
        values = (self.source, entity, record_id, source_uri, source_offset, rule, detail, self.run_id)
        for name, value in zip(REJECT_SCHEMA.names, values, strict=True):
            self._rejects[name].append(value)

    def add_input(
        self,
        uri: str,
        version: str,
        size: int,
        digest: str,
        records: int,
        rejects: int,
        watermark: str | None = None,
    ) -> None:
        values = (
            self.source,
            uri,
            version,
            size,
            digest,
            records,
            rejects,
            watermark,
            self.run_id,
            datetime.now(UTC),
        )
        for name, value in zip(LEDGER_SCHEMA.names, values, strict=True):
            self._ledger[name].append(value)

    def mark(self) -> tuple[int, int]:
        """Where the records and rejects stand now, for ``rollback``."""
        return self.record_count, self.reject_count

    def rollback(self, mark: tuple[int, int]) -> None:
        """Forget the records and rejects added since ``mark`` (an input that failed half read),
        parts the sink wrote since then included (a mark taken right after a ``flush`` ends a part)."""
        records, rejects = mark
        popped = False
        while self.parts and self._spilled > records:
            url, rows = self.parts.pop()
            self._spilled -= rows
            popped = True
            if self.discard is not None:
                self.discard(url)
        # a part that began before the mark cannot be taken back in part: flush before marking
        assert not popped or self._spilled == records, "a mark inside a part"
        for column in self._records.values():
            del column[records - self._spilled :]
        for column in self._rejects.values():
            del column[rejects:]

    @property
    def record_count(self) -> int:
        """Records read so far, those handed to the sink included."""
        return self._spilled + len(self._records["entity"])

    @property
    def reject_count(self) -> int:
        return len(self._rejects["entity"])

    @property
    def input_count(self) -> int:
        """Ledger entries: inputs read (or recorded unchanged) in this extraction."""
        return len(self._ledger["uri"])

    def records(self) -> pa.Table:
        """The buffered records (with a sink, those not handed to it yet; see ``parts``)."""
        return self._table()

    def rejects(self) -> pa.Table:
        return pa.table(self._rejects, schema=REJECT_SCHEMA)

    def ledger(self) -> pa.Table:
        return pa.table(self._ledger, schema=LEDGER_SCHEMA)


@dataclass(frozen=True)
class InputSelection:
    """Which inputs a source reads this run: what its ledger already has, which inputs are too
    fresh to read yet, and which prefixes belong to other sources (e.g. FHIR exports at the
    landing container's root, beside the device and REDCap prefixes).

    The ledger grows with every input a source ever read (hundreds of thousands of IoT Hub
    blobs), so a selection made from it keeps it as an Arrow table (``ledger``) and compares a
    listing with it in Arrow; only the ledger facts of the inputs to read become Python sets
    (``versions``, ``hashes``, see ``narrowed``), as a planned batch carries them.
    """

    versions: frozenset[tuple[str, str]] = frozenset()  # (uri, version) already processed
    hashes: frozenset[tuple[str, str]] = frozenset()  # (uri, content hash) already processed
    settle_before: datetime | None = None  # inputs modified after this are left for later
    other_sources: tuple[str, ...] = ()  # URL prefixes of other sources' inputs
    window: tuple[datetime, datetime] | None = None  # a backfill: inputs modified in [start, end)
    # The inputs listed for this run (LISTING_SCHEMA; the source's ``list_inputs``), or a planned
    # batch's files as the plan listed them: the source is not listed again.
    listed: pa.Table | None = field(default=None, compare=False, repr=False)
    ledger: pa.Table | None = field(default=None, compare=False, repr=False)  # LEDGER_KEYS columns

    @property
    def uris(self) -> frozenset[str]:
        return frozenset(uri for uri, _ in self.versions)

    def unread_rows(self, listing: pa.Table) -> pa.Table:
        """The rows of a listing (``LISTING_SCHEMA``) whose (URI, version) the ledger does not
        have (its table, else ``versions``), in listing order."""
        if self.ledger is not None:
            known = self.ledger.select(["uri", "version"])
        else:
            known = pa.table(
                {
                    "uri": pa.array([uri for uri, _ in self.versions], pa.string()),
                    "version": pa.array([version for _, version in self.versions], pa.string()),
                }
            )
        if known.num_rows == 0 or listing.num_rows == 0:
            return listing
        numbered = listing.append_column("_listed", pa.array(range(listing.num_rows), pa.int64()))
        new = numbered.join(
            known.rename_columns(["url", "version"]), ["url", "version"], join_type="left anti"
        )
        return new.sort_by("_listed").select(LISTING_SCHEMA.names)

    def unread(self, listing: pa.Table) -> list[FileInfo]:
        """``unread_rows`` as FileInfo objects."""
        return listed_files(self.unread_rows(listing))

    def to_read(self, listing: pa.Table) -> tuple[pa.Table, int]:
        """The unread rows of a listing that belong to this selection (in the backfill window,
        not under another source's prefix) and have settled, in listing order; and how many of
        them wait for a later run. Decided in Arrow: a listing can hold hundreds of thousands of
        files, and one FileInfo object each took 5 us (half of it the time zone of ``modified``)."""
        rows = self.unread_rows(listing)
        urls, modified = rows.column("url"), rows.column("modified")
        wanted = [pc.invert(pc.starts_with(urls, prefix)) for prefix in self.other_sources]
        if self.window is not None:
            start, end = (pa.scalar(bound, modified.type) for bound in self.window)
            wanted += [pc.greater_equal(modified, start), pc.less(modified, end)]
        rows = rows.filter(functools.reduce(pc.and_, wanted)) if wanted else rows
        if self.settle_before is None:
            return rows, 0
        late = pc.greater(rows.column("modified"), pa.scalar(self.settle_before, modified.type))
        return rows.filter(pc.invert(late)), pc.sum(late).as_py() or 0

    def narrowed(self, listing: pa.Table) -> InputSelection:
        """This selection with the ledger facts of the listed files alone, as sets (and no table)."""
        if self.ledger is None:
            return self
        uris = pc.unique(listing.column("url"))
        known = self.ledger.filter(
            pc.and_(
                pc.is_in(self.ledger.column("uri"), value_set=uris),
                pc.not_equal(self.ledger.column("version"), FORGOTTEN),
            )
        )
        uri, version, digest = (known.column(name).to_pylist() for name in LEDGER_KEYS)
        return replace(
            self,
            versions=self.versions | frozenset(zip(uri, version, strict=True)),
            hashes=self.hashes | frozenset(zip(uri, digest, strict=True)),
            ledger=None,
        )

    @classmethod
    def from_ledger(
        cls,
        ledger: pa.Table | None,
        settle_before: datetime | None = None,
        other_sources: tuple[str, ...] = (),
    ) -> InputSelection:
        return cls(
            settle_before=settle_before,
            other_sources=other_sources,
            ledger=None if ledger is None else ledger.select(LEDGER_KEYS),
        )


def candidate_files(
    landing: Storage, prefix: str, suffixes: tuple[str, ...], seen: InputSelection
) -> tuple[pa.Table, int]:
    """The files under ``prefix`` to read now, as a listing (by listing alone: not in the
    ledger under their current version, settled, in the selection; a planned batch's own
    files), and how many wait for a later run."""
    listing = seen.listed if seen.listed is not None else landing.list_table(prefix, suffixes)
    return seen.to_read(listing)


# Blobs are read ahead of the adapter by a few threads (each read waits on the network and
# releases the GIL), at most this many files or bytes in flight.
READ_AHEAD_FILES = 16
READ_AHEAD_BYTES = 64 * 2**20


def read_ahead(landing: Storage, files: Sequence[FileInfo]) -> Iterator[tuple[FileInfo, bytes | None]]:
    """Each file with its content, in listing order, or None if it changed since it was listed.

    From blob storage, up to ``READ_AHEAD_FILES`` later files (and ``READ_AHEAD_BYTES`` by
    their listed sizes; always one) are being read while the caller works on the current one.
    Local files are read one by one: a read takes microseconds, and threads made a batch of
    5,000 IoT Hub blobs slower (0.61 -> 0.79 s warm, 1.01 -> 1.41 s cold)."""

    def read(file: FileInfo) -> bytes | None:
        try:
            return landing.read_bytes(file.url, file.version)
        except InputChangedError:
            return None

    if not landing.is_blob:
        yield from ((file, read(file)) for file in files)
        return
    pool = ThreadPoolExecutor(min(READ_AHEAD_FILES, max(len(files), 1)), "read-ahead")
    in_flight: deque[tuple[FileInfo, Future[bytes | None]]] = deque()
    queued_bytes = 0
    try:
        for file in files:
            # Wait for the oldest read while the window is full (one file may exceed the bytes).
            while in_flight and (len(in_flight) >= READ_AHEAD_FILES or queued_bytes >= READ_AHEAD_BYTES):
                done, reading = in_flight.popleft()
                queued_bytes -= done.size
                yield done, reading.result()
            in_flight.append((file, pool.submit(read, file)))
            queued_bytes += file.size
        while in_flight:
            done, reading = in_flight.popleft()
            yield done, reading.result()
    finally:  # the reader stopped early or failed: reads not started yet are dropped
        pool.shutdown(wait=True, cancel_futures=True)


# The rule of an input that an adapter failed on in a way no narrower rule names (a programming
# error met on hostile input, say): the input is quarantined whole and recorded as read.
RULE_INPUT_READABLE = "input_readable"
# A zero-byte input: nothing to load, but usually a transfer that failed, so it is reported.
RULE_INPUT_EMPTY = "input_not_empty"
FileReader = Callable[[FileInfo, bytes], None]
# A reader of one input as a stream of chunks (bytes in order, of any sizes).
StreamReader = Callable[[FileInfo, Iterator[bytes]], None]
# Inputs larger than this are read as a stream (by adapters that can), in chunks of the other.
STREAM_BYTES = 64 * 2**20
STREAM_CHUNK_BYTES = 16 * 2**20


def read_new_files(
    out: Extraction,
    landing: Storage,
    prefix: str,
    suffixes: tuple[str, ...],
    seen: InputSelection,
    read_file: FileReader,
    entity: str,
    read_stream: StreamReader | None = None,
) -> None:
    """Read each file under ``prefix`` that the ledger has not processed yet with ``read_file``.

    Listing alone decides most files: a (URI, version) the ledger has is skipped unread. A file
    modified within the settle window may still be being written and waits for the next run;
    so does one that changes between listing and reading (the read is conditional on the listed
    version). A known URI under a new version with the same content is only recorded; with new
    content it is read again whole and counted as changed. After ``read_file`` has read a file
    into ``out``, its ledger entry (with the records and rejects it produced) is added, so every
    adapter keeps the ledger the same way. Files are read ahead by a few threads
    (``read_ahead``).

    No input stops a load: adapters reject what they cannot read record by record, and if
    ``read_file`` still raises (anything but a storage error, which fails the batch), what it
    added for that file is dropped and the file becomes one reject (``input_readable``, entity
    ``entity``, naming the exception's type, never its message, which may quote the input),
    recorded as read so that the next run moves on.

    With ``read_stream``, an input larger than STREAM_BYTES is read as a stream instead
    (``_read_streamed``): a bulk export's NDJSON file of several GB never sits in memory.
    """
    listing, pending = candidate_files(landing, prefix, suffixes, seen)
    seen = seen.narrowed(listing)
    known = seen.uris
    out.pending_inputs += pending
    files = listed_files(listing)
    streamed = [f for f in files if read_stream is not None and f.size > STREAM_BYTES]
    whole = [f for f in files if read_stream is None or f.size <= STREAM_BYTES]
    for file, data in read_ahead(landing, whole):
        if data is None:
            out.pending_inputs += 1
            continue
        digest = content_hash(data)
        if (file.url, digest) in seen.hashes:
            out.add_input(file.url, file.version, file.size, digest, 0, 0)
            continue
        if file.url in known:
            out.changed_inputs += 1
        if not data:
            out.add_reject(entity, file.url, 0, RULE_INPUT_EMPTY, "the input is empty (zero bytes)")
            out.add_input(file.url, file.version, file.size, digest, 0, 1)
            continue
        mark = out.mark()
        _isolated(out, mark, entity, file, functools.partial(read_file, file, data))
        out.add_input(file.url, file.version, file.size, digest, *_since(out, mark))
        out.flush_if_full()
    for file in streamed:
        assert read_stream is not None
        _read_streamed(out, landing, file, seen, entity, read_stream)


def _since(out: Extraction, mark: tuple[int, int]) -> tuple[int, int]:
    """Records and rejects added since ``mark``."""
    return out.record_count - mark[0], out.reject_count - mark[1]


def _isolated(
    out: Extraction, mark: tuple[int, int], entity: str, file: FileInfo, read: Callable[[], None]
) -> None:
    """Run one input's reader; if it raises (anything but a storage error, which fails the batch),
    what it added is dropped and the input becomes one ``input_readable`` reject."""
    try:
        read()
    except StorageError:
        raise
    except Exception as exc:  # isolating one input is the point
        out.rollback(mark)
        out.add_reject(
            entity,
            file.url,
            0,
            RULE_INPUT_READABLE,
            f"the adapter failed on this input ({type(exc).__name__})",
        )


def _read_streamed(
    out: Extraction,
    landing: Storage,
    file: FileInfo,
    seen: InputSelection,
    entity: str,
    read_stream: StreamReader,
) -> None:
    """One input larger than STREAM_BYTES, read in chunks of STREAM_CHUNK_BYTES (ranged reads from
    blob storage) with its content hash computed as it streams: the reader never holds the whole
    file, and ``out`` hands its rows to its sink between chunks. An input whose content turns out
    to be one the ledger has is taken back and recorded unchanged."""
    out.flush()  # parts written from here on are this input's alone, so that it can be taken back
    mark = out.mark()
    digest = hashlib.sha256()

    def chunks() -> Iterator[bytes]:
        for chunk in landing.read_chunks(file.url, file.version, STREAM_CHUNK_BYTES):
            digest.update(chunk)
            yield chunk

    stream = chunks()

    def read() -> None:
        read_stream(file, stream)
        for _ in stream:  # the hash covers the whole input, whatever the reader consumed
            pass

    try:
        _isolated(out, mark, entity, file, read)
    except InputChangedError:
        out.rollback(mark)
        out.pending_inputs += 1
        return
    hexdigest = digest.hexdigest()
    if (file.url, hexdigest) in seen.hashes:
        out.rollback(mark)
        out.add_input(file.url, file.version, file.size, hexdigest, 0, 0)
        return
    if file.url in seen.uris:
        out.changed_inputs += 1
    out.add_input(file.url, file.version, file.size, hexdigest, *_since(out, mark))
    out.flush_if_full()
