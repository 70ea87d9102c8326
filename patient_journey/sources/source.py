"""What a source is to the pipeline: a plug-in with one contract.

The pipeline knows only generic steps (plan, extract, commit, build); everything particular to a
source lives in its ``Source``: the bronze table it lands in, the files it lists (or none: a
database read in one batch on its watermarks), how one batch is read into an ``Extraction``, the
staged tables it feeds and how they link to a patient, the silver tables it alone feeds, what it
adds to the gold journey, the suites it requires and the gating it adds after staging (device
types), what ``journey reprocess`` forgets of it, and the synthetic inputs ``journey generate``
writes for it. Sources are registered in ``patient_journey.sources.plugins``.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypeVar

import pyarrow as pa
from pydantic import BaseModel, ValidationError

from patient_journey.contracts import TableContract
from patient_journey.errors import ConfigurationError
from patient_journey.journey import JourneyParts
from patient_journey.lake import Lake
from patient_journey.linkage import IdentityRelation, LinkSpec
from patient_journey.quality import ExpectationOutcome, QualityGate
from patient_journey.settings import JourneySettings
from patient_journey.sources.records import Extraction, InputSelection
from patient_journey.staging import StagedTable
from patient_journey.storage import Storage

if TYPE_CHECKING:
    from patient_journey.generate.model import Cohort

# The three kinds of source of the design: EHR data, device telemetry, outcomes.
SourceKind = Literal["ehr", "device", "outcome"]


OptionsT = TypeVar("OptionsT", bound=BaseModel)


def source_options(model: type[OptionsT], settings: JourneySettings) -> OptionsT:
    """A source's own settings (``Source.options``), from the ``sources`` section's fields that
    the shared settings do not declare; a ConfigurationError names each invalid one (never its value)."""
    try:
        return model.model_validate(settings.sources.model_extra or {})
    except ValidationError as exc:
        problems = "; ".join(
            f"JOURNEY_SOURCES__{'__'.join(str(part) for part in error['loc']).upper()}: {error['msg']}"
            for error in exc.errors()
        )
        raise ConfigurationError(f"Invalid source settings: {problems}.") from None


def unknown_source_settings(settings: JourneySettings, models: list[type[BaseModel]]) -> list[str]:
    """The ``sources`` section's fields that neither the shared settings nor any source declares,
    each with the declared name closest to it, if any (a misspelt JOURNEY_SOURCES__ variable)."""
    by_sources = {name for model in models for name in model.model_fields}
    declared = sorted(by_sources | set(type(settings.sources).model_fields))
    unknown = []
    for name in sorted(set(settings.sources.model_extra or {}) - by_sources):
        close = difflib.get_close_matches(name, declared, n=1)
        hint = f" (did you mean JOURNEY_SOURCES__{close[0].upper()}?)" if close else ""
        unknown.append(f"JOURNEY_SOURCES__{name.upper()}{hint}")
    return unknown


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
    # many deployments do not have (a hospital's message feed), so adding the source breaks none of them.
    optional: bool = False
    # The staged tables it feeds (each with its suite, expectations/staged/<name>.json), how each
    # links to a patient, and the identity relations it adds (built in plug-in order, so a
    # relation may use those of sources registered before it).
    staged: tuple[StagedTable, ...] = ()
    links: tuple[LinkSpec, ...] = ()
    identity: tuple[IdentityRelation, ...] = ()
    # The silver tables it alone feeds (a table several sources feed is declared in
    # patient_journey.contracts), and what it adds to the gold journey (events, admissions,
    # complications), as SQL over the silver tables.
    silver: tuple[TableContract, ...] = ()
    journey: JourneyParts = JourneyParts()
    # Its own settings, if any: a model whose fields are read from the ``sources`` section
    # (JOURNEY_SOURCES__<FIELD>, so name them after the source) and checked in preflight.
    options: type[BaseModel] | None = None
    # Which of the three kinds of source it is: the ingestion deployments read a kind each
    # (infra/prefect.yaml: ingest-ehr, ingest-device, ingest-outcomes).
    kind: SourceKind = "ehr"

    @property
    def lists_files(self) -> bool:
        return bool(self.suffixes)

    def prefix(self, settings: JourneySettings) -> str:
        """Where its inputs are under the landing zone (a file source)."""
        return ""

    def list_inputs(
        self, settings: JourneySettings, landing: Storage, ledger: pa.Table | None, everything: bool
    ) -> pa.Table:
        """The inputs a file source considers this run (``LISTING_SCHEMA``), before its ledger and
        settle window pick those to read: every file under its prefix. A source whose new inputs
        can only be in some places lists those (device telemetry: the latest time folders).
        ``ledger``: the source's ledger (``uri``, ``version``, ``processed_at``...), None before
        its first run; ``everything``: a backfill or re-read, which must list all."""
        return landing.list_table(self.prefix(settings), self.suffixes)

    def extract(self, job: ExtractJob) -> Extraction | str:
        """Read one batch into an Extraction, or say why the source is skipped (not configured)."""
        raise NotImplementedError

    def check(self, settings: JourneySettings, landing: Storage) -> None:
        """Fail in preflight, before anything is read, if the source cannot be read: its own
        settings are invalid, or a file source's prefix holds nothing (unless listed in
        JOURNEY_SOURCES__OPTIONAL)."""
        if self.options is not None:
            source_options(self.options, settings)
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

    def generate(self, cohort: Cohort, landing: Path) -> dict[str, int]:
        """Write this source's synthetic inputs for ``cohort`` under ``landing`` (``journey
        generate``), with no random draws, so that the other sources' files stay byte-identical;
        returns counts for the generation's ground truth. The sources written with planted bad
        records (FHIR, device, registry, REDCap) are written by patient_journey.generate itself."""
        return {}

    def forget_bounds(self, settings: JourneySettings, landing: Storage, prefix: str) -> tuple[str, str]:
        """The (start, end) of the ledger URIs ``journey reprocess`` forgets for ``prefix``."""
        return landing.url(self.prefix(settings), prefix), ""
