"""Pseudonymous keys: HMAC-SHA256 of a namespaced source identifier with the configured key."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

import pyarrow as pa


class KeyMaker:
    """Turns source identifiers into stable pseudonymous keys.

    The namespace keeps an MRN and an OR case id with the same text from colliding.
    """

    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    def key(self, namespace: str, identifier: str) -> str:
        message = f"{namespace}:{identifier}".encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

    def patient_key(self, mrn: str) -> str:
        return self.key("mrn", mrn)

    def case_key(self, case_id: str) -> str:
        return self.key("or-case", case_id)

    def keys(self, namespace: str, identifiers: Iterable[str | None]) -> pa.Array:
        """Vector form; nulls stay null."""
        return pa.array([None if i is None else self.key(namespace, i) for i in identifiers], pa.string())
