"""The sources, registered in one place: name -> plug-in (patient_journey.sources.source).

Adding a source kind is a module with its ``Source`` subclass (which declares its staged tables,
links, identity relations, silver tables and journey parts), one line here, and its staged tables'
suites (docs/adding-a-source.md).
"""

from __future__ import annotations

from patient_journey.contracts import TableContract
from patient_journey.errors import ConfigurationError
from patient_journey.journey import JourneyParts
from patient_journey.linkage import IdentityRelation, LinkSpec
from patient_journey.sources.device import DeviceSource
from patient_journey.sources.fhir import FhirSource
from patient_journey.sources.hl7v2 import Hl7v2Source
from patient_journey.sources.redcap import RedcapSource
from patient_journey.sources.registry import RegistrySource
from patient_journey.sources.source import Source
from patient_journey.staging import StagedTable

PLUGINS: dict[str, Source] = {
    source.name: source
    for source in (FhirSource(), DeviceSource(), RegistrySource(), RedcapSource(), Hl7v2Source())
}
# What the plug-ins declare, in plug-in order.
STAGED_TABLES: tuple[StagedTable, ...] = tuple(
    table for source in PLUGINS.values() for table in source.staged
)
STAGED_BY_NAME: dict[str, StagedTable] = {table.name: table for table in STAGED_TABLES}
LINKS: tuple[LinkSpec, ...] = tuple(spec for source in PLUGINS.values() for spec in source.links)
IDENTITY: tuple[IdentityRelation, ...] = tuple(
    relation for source in PLUGINS.values() for relation in source.identity
)
SILVER_CONTRACTS: tuple[TableContract, ...] = tuple(
    contract for source in PLUGINS.values() for contract in source.silver
)
JOURNEY_PARTS: tuple[JourneyParts, ...] = tuple(source.journey for source in PLUGINS.values())


def source_named(name: str) -> Source:
    try:
        return PLUGINS[name]
    except KeyError:
        raise ConfigurationError(f"Unknown source {name!r}; sources are {', '.join(PLUGINS)}.") from None
