"""IoT Hub's blob names, and a listing of the recent ones.

An IoT Hub routing endpoint writes each batch of messages to a blob named by its file name
format, by default ``{iothub}/{partition}/{YYYY}/{MM}/{DD}/{HH}/{mm}`` (the time the batch was
written, UTC). A landing zone holds every minute the hub ever routed (hundreds of thousands of
blobs a year), while new blobs only ever appear in the latest folders: listing everything to find
a few new blobs was most of a device-only run (6.4 of 20 s at 52,000 patients).

So a run lists only the time folders from the newest one already read, less a lookback (a
routing batch is written up to 12 minutes after it opens, and a blob still settling is left for
the next run), and lists everything when it must: on a first run, on a backfill or re-read, when
``journey reprocess`` forgot inputs not read again since, when the format's time folders cannot
be pruned (its time tokens are not whole folders in year-to-hour order), and on the first run of
each full-listing period (a day by default), which finds anything that landed in an older folder
by other means (a copy or a restore).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, Field, field_validator

from patient_journey.sources.records import FORGOTTEN
from patient_journey.storage import LISTING_SCHEMA, Storage

DEFAULT_FORMAT = "{iothub}/{partition}/{YYYY}/{MM}/{DD}/{HH}/{mm}"
TIME_TOKENS = ("YYYY", "MM", "DD", "HH", "mm")  # in the order they make a time
NAME_TOKENS = ("iothub", "partition")
_TOKEN = re.compile(r"\{([A-Za-z]+)\}")


class IotHubListingOptions(BaseModel):
    """How the device source finds new blobs (JOURNEY_SOURCES__DEVICE_...)."""

    device_blob_name_format: str = Field(
        default=DEFAULT_FORMAT,
        description=(
            "The routing endpoint's blob file name format, below the device prefix (IoT Hub: "
            "custom endpoint, 'Blob file name format'); it must hold every one of {iothub}, "
            "{partition}, {YYYY}, {MM}, {DD}, {HH} and {mm}."
        ),
    )
    device_listing_lookback_seconds: int = Field(
        default=3600,
        ge=0,
        description=(
            "A run lists the time folders from the newest one already read, less this many "
            "seconds (at least the endpoint's batch frequency plus the settle window)."
        ),
    )
    device_full_listing_hours: int = Field(
        default=24,
        ge=0,
        description=(
            "The first run of each period this long (UTC) lists every blob under the prefix, "
            "finding blobs that landed in older folders; 0: every run lists everything."
        ),
    )

    @field_validator("device_blob_name_format")
    @classmethod
    def _all_tokens(cls, value: str) -> str:
        found = _TOKEN.findall(value)
        missing = [t for t in (*NAME_TOKENS, *TIME_TOKENS) if t not in found]
        unknown = sorted(set(found) - {*NAME_TOKENS, *TIME_TOKENS})
        if missing or unknown:
            raise ValueError(f"missing {missing}, unknown {unknown} (tokens are case-sensitive)")
        return value.strip("/")


@dataclass(frozen=True)
class BlobNameFormat:
    """A routing endpoint's file name format: where each time token sits in a blob's name."""

    text: str

    @property
    def folders(self) -> list[str]:
        """The folder segments (the last segment names the blob itself)."""
        return self.text.split("/")[:-1]

    def pattern(self) -> str:
        """A regular expression of a blob URL ending in this format (and an extension), with a
        named group per time token."""
        parts, at = [], 0
        for match in _TOKEN.finditer(self.text):
            parts.append(re.escape(self.text[at : match.start()]))
            name = match.group(1)
            if name in TIME_TOKENS:
                digits = 4 if name == TIME_TOKENS[0] else 2
                parts.append(f"(?P<{name}>\\d{{{digits}}})")
            else:
                parts.append("[^/]+")
            at = match.end()
        parts.append(re.escape(self.text[at:]))
        return "/" + "".join(parts) + r"(?:\.[^/]*)?$"

    def prunable(self) -> bool:
        """Whether folders can be skipped by time: each of YYYY, MM, DD, HH is a whole folder
        segment, in that order, and no other folder segment holds a time token."""
        timed = [t for s in self.folders for t in _TOKEN.findall(s) if t in TIME_TOKENS]
        whole = [s[1:-1] for s in self.folders if _TOKEN.fullmatch(s) and s[1:-1] in TIME_TOKENS]
        return timed == whole == list(TIME_TOKENS[:4])

    def newest(self, uris: pa.Array | pa.ChunkedArray, not_after: datetime) -> datetime | None:
        """The latest time named by any of these blob URLs, ignoring times after ``not_after`` (a
        folder dated in the future must not hide the present ones); None if none matches."""
        if len(uris) == 0:
            return None
        parts = pc.extract_regex(uris, self.pattern())  # null where a URL does not match
        keys = pc.binary_join_element_wise(*(pc.struct_field(parts, t) for t in TIME_TOKENS), "")
        keys = keys.filter(pc.less_equal(keys, f"{not_after:%Y%m%d%H%M}"))
        latest = pc.max(keys).as_py()
        if latest is None:
            return None
        try:
            return datetime.strptime(latest, "%Y%m%d%H%M").replace(tzinfo=UTC)
        except ValueError:  # digits that are no time (a month 13): no cut-off from them
            return None


def listing_cutoff(ledger: pa.Table | None, options: IotHubListingOptions, now: datetime) -> datetime | None:
    """The time from which folders are listed, or None when this run lists everything (see the
    module's docstring). ``ledger``: the source's ledger (``uri``, ``version``, ``processed_at``)."""
    layout = BlobNameFormat(options.device_blob_name_format)
    if ledger is None or ledger.num_rows == 0 or not layout.prunable():
        return None
    period = options.device_full_listing_hours * 3600
    last = pc.max(ledger.column("processed_at")).as_py()
    if period == 0 or last is None or int(last.timestamp()) // period != int(now.timestamp()) // period:
        return None  # the first run of this period lists everything
    forgotten = pc.equal(ledger.column("version"), FORGOTTEN)
    if pc.any(forgotten).as_py():
        uris = ledger.column("uri")
        waiting = pc.is_in(
            pc.unique(uris.filter(forgotten)), value_set=pc.unique(uris.filter(pc.invert(forgotten)))
        )
        if not pc.all(waiting).as_py():
            return None  # `journey reprocess` forgot inputs that were not read again since
    newest = layout.newest(ledger.column("uri"), now)
    return None if newest is None else newest - timedelta(seconds=options.device_listing_lookback_seconds)


def recent_folders(landing: Storage, prefix: str, layout: BlobNameFormat, since: datetime) -> Iterator[str]:
    """The deepest folders under ``prefix`` whose time (by the format's folders) is not before
    the hour of ``since``. A folder whose name is not the number its token needs is kept."""
    cutoff = {"YYYY": since.year, "MM": since.month, "DD": since.day, "HH": since.hour}
    segments = layout.folders

    def walk(path: str, depth: int, on_edge: bool) -> Iterator[str]:
        # on_edge: every time folder so far equals the cut-off's, so this level is compared too
        if depth == len(segments):
            yield path
            return
        token = segments[depth][1:-1] if _TOKEN.fullmatch(segments[depth]) else None
        for name in sorted(landing.list_dirs(path)):
            child, edge = f"{path}/{name}", False
            if on_edge and token in cutoff:
                if not name.isdigit():
                    edge = False  # not a time: listed, not pruned
                elif int(name) < cutoff[token]:
                    continue
                else:
                    edge = int(name) == cutoff[token]
            elif token not in cutoff:
                edge = on_edge
            yield from walk(child, depth + 1, edge)

    yield from walk(prefix.strip("/"), 0, True)


def list_recent(
    landing: Storage,
    prefix: str,
    suffixes: tuple[str, ...],
    options: IotHubListingOptions,
    since: datetime | None,
) -> pa.Table:
    """The device blobs to consider this run (``LISTING_SCHEMA``): under the recent time folders,
    or every blob under ``prefix`` when ``since`` is None or the format cannot be pruned."""
    layout = BlobNameFormat(options.device_blob_name_format)
    if since is None or not layout.prunable():
        return landing.list_table(prefix, suffixes)
    parts = [
        landing.list_table(folder, suffixes) for folder in recent_folders(landing, prefix, layout, since)
    ]
    return pa.concat_tables(parts) if parts else LISTING_SCHEMA.empty_table()
