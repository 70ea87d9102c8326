"""patient-journey: surgical device telemetry, FHIR EHR data and outcomes, linked into one warehouse.

The library never imports Prefect; the Prefect layer lives in ``flows/`` and ``tasks/``.
"""

import os

import pyarrow as pa

__version__ = "0.1.0"

# Arrow allocates through the C library's malloc, as NumPy, pandas and the Python heap do, unless
# ARROW_DEFAULT_MEMORY_POOL says otherwise: with Arrow's own mimalloc pool beside them, a build at
# M kept about 0.35 GiB more resident at its end and peaked 0.3 GiB higher (two allocators each
# holding the pages it freed), in the same time.
if not os.environ.get("ARROW_DEFAULT_MEMORY_POOL"):
    pa.set_memory_pool(pa.system_memory_pool())
