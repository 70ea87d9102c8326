"""What a source is to the pipeline: a plug-in with one contract.

The pipeline knows only generic steps (plan, extract, commit, build); everything particular to a
source lives in its ``Source``: the bronze table it lands in, the files it lists (or none: a
database read in one batch on its watermarks), how one batch is read into an ``Extraction``, the
staged tables it feeds and how they link to a patient, the suites it requires and the gating it
adds after staging (device types), and what ``journey reprocess`` forgets of it. Sources are
registered in ``patient_journey.sources.plugins``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa

from patient_journey.errors import ConfigurationError
from patient_journey.lake import Lake
from patient_journey.linkage import IdentityRelation, LinkSpec
from patient_journey.quality import ExpectationOutcome, QualityGate
from patient_journey.settings import JourneySettings
from patient_journey.sources.records import Extraction, InputSelection
from patient_journey.staging import StagedTable
from patient_journey.storage import Storage


@dataclass(frozen=True)
class ExtractJob:
    """One batch of one source to read: where, what the ledger knows, and where rows go."""

    settings: JourneySettings
    lake: Lake
    landing: Storage
    seen: InputSelection
    run_id: str
    watermarks: dict[str, str] = field(default_factory=dict)  # a database source's, per table
    out: Extraction | None = None  # with a sink, bronze rows are put aside as they are read


@dataclass(frozen=True)
class Gated:
    """Rows a source's own gate quarantined after staging, and the outcomes of its suites."""

    quarantined: pa.Table  # QUARANTINE_SCHEMA
    outcomes: list[ExpectationOutcome]


class Source:
    """A source plug-in. Subclasses set the class attributes and implement ``extract``."""

    name: str = ""
    bronze_table: str = ""
    suffixes: tuple[str, ...] = ()  # the files it lists and reads; () for a database source
    # Whether reading compares rows with bronze (a database source skips rows it already has), so
    # that rows a crashed commit left must be removed before it reads.
    reads_bronze: bool = False
    # Whether its inputs may be absent without being listed in JOURNEY_SOURCES__OPTIONAL: a feed
    # many deployments do not have (HL7 v2 ADT), so adding the source breaks none of them.
    optional: bool = False
    # The staged tables it feeds (each with its suite, expectations/staged/<name>.json), how each
    # links to a patient, and the identity relations it adds (built in plug-in order, so a
    # relation may use those of sources registered before it).
    staged: tuple[StagedTable, ...] = ()
    links: tuple[LinkSpec, ...] = ()
    identity: tuple[IdentityRelation, ...] = ()

    @property
    def lists_files(self) -> bool:
        return bool(self.suffixes)

    def prefix(self, settings: JourneySettings) -> str:
        """Where its inputs are under the landing zone (a file source)."""
        return ""

    def extract(self, job: ExtractJob) -> Extraction | str:
        """Read one batch into an Extraction, or say why the source is skipped (not configured)."""
        raise NotImplementedError

    def check(self, settings: JourneySettings, landing: Storage) -> None:
        """Fail in preflight, before anything is read, if the source cannot be read: a file
        source whose prefix holds nothing (unless listed in JOURNEY_SOURCES__OPTIONAL)."""
        if not self.lists_files or self.optional or self.name in settings.sources.optional:
            return
        prefix = self.prefix(settings)
        if not landing.exists(prefix):
            raise ConfigurationError(
                f"Nothing under {landing.url(prefix)} for the {self.name} source "
                f"(JOURNEY_SOURCES__{self.name.upper()}_PREFIX): land its inputs there, set the prefix, or "
                f"list the source as optional (JOURNEY_SOURCES__OPTIONAL='[\"{self.name}\"]')."
            )

    def require_suites(self, settings: JourneySettings, gate: QualityGate) -> None:
        """Fail in preflight if a suite this source's own gate needs is missing."""

    def gate_staged(
        self, settings: JourneySettings, gate: QualityGate, passed: dict[str, pa.Table], run_id: str
    ) -> Gated | None:
        """After the staged tables' suites: quarantine more rows of ``passed`` (updated in place)."""
        return None

    def forget_bounds(self, settings: JourneySettings, landing: Storage, prefix: str) -> tuple[str, str]:
        """The (start, end) of the ledger URIs ``journey reprocess`` forgets for ``prefix``."""
        return landing.url(self.prefix(settings), prefix), ""
