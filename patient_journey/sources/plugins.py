"""The sources, registered in one place: name -> plug-in (patient_journey.sources.source).

Adding a source kind is a module with its ``Source`` subclass, one line here, its staged tables
(patient_journey.staging) and their suites.
"""

from __future__ import annotations

from patient_journey.errors import ConfigurationError
from patient_journey.sources.device import DeviceSource
from patient_journey.sources.fhir import FhirSource
from patient_journey.sources.redcap import RedcapSource
from patient_journey.sources.registry import RegistrySource
from patient_journey.sources.source import Source

PLUGINS: dict[str, Source] = {
    source.name: source for source in (FhirSource(), DeviceSource(), RegistrySource(), RedcapSource())
}


def source_named(name: str) -> Source:
    try:
        return PLUGINS[name]
    except KeyError:
        raise ConfigurationError(f"Unknown source {name!r}; sources are {', '.join(PLUGINS)}.") from None
