"""Unique ids for decisions and reservations, cheap enough for every request.

An id is a prefix, 16 random hex digits drawn once per process (again after a fork) and a
16-digit counter: unique across processes and hosts like a random UUID, without reading the
system's random source for each one.
"""

from __future__ import annotations

import itertools
import os

__all__ = ["new_id"]


_base = ""
_counter = itertools.count()


def _reseed() -> None:
    global _base, _counter
    _base = os.urandom(8).hex()
    _counter = itertools.count()


_reseed()
os.register_at_fork(after_in_child=_reseed)


def new_id(prefix: str) -> str:
    """``{prefix}_`` and 32 hex digits, never the same twice."""
    return f"{prefix}_{_base}{next(_counter):016x}"
