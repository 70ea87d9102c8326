"""patient-journey: surgical device telemetry, FHIR EHR data and outcomes, linked into one warehouse.

The library never imports Prefect; the Prefect layer lives in ``flows/`` and ``tasks/``.
"""

__version__ = "0.1.0"
