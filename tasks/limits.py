"""Global concurrency limits: two runs never write the same table at once.

An ingestion holds its sources' limits (each source's bronze, rejects and ledger belong to it
alone); a build holds the warehouse limit and every source's, so it neither overlaps another
build nor an ingestion whose bronze it reads. Each limit has one slot; the flows create any
that are missing, so a fresh server needs no set-up.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

from patient_journey.pipeline import SOURCES

WAREHOUSE_LIMIT = "patient-journey-warehouse"


def ingest_limit(source: str) -> str:
    return f"patient-journey-ingest-{source}"


ALL_LIMITS = (WAREHOUSE_LIMIT, *(ingest_limit(s) for s in SOURCES))


def ensure_limits(names: Iterable[str] = ALL_LIMITS) -> None:
    """Create the one-slot limits that do not exist yet (left as they are otherwise)."""
    with get_client(sync_client=True) as client:
        for name in names:
            try:
                client.read_global_concurrency_limit_by_name(name)
            except ObjectNotFound:
                with suppress(ObjectAlreadyExists):
                    client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))


@contextmanager
def holding(names: list[str], ensure: bool = True) -> Iterator[None]:
    """Hold one slot of each named limit (all at once, so two holders cannot deadlock)."""
    if ensure:
        ensure_limits(names)
    with concurrency(sorted(names), occupy=1, strict=True):
        yield
