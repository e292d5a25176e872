"""Running one test function in several fresh interpreters at once."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from typing import Any

__all__ = ["spawn"]


def spawn(
    target: Callable[..., None], args_for: Callable[[int], tuple[Any, ...]], n: int
) -> list[Any]:
    """Run ``target(*args_for(i), results)`` in ``n`` fresh interpreters; what they put.

    A worker reports a failure by putting a string (``"Error: message"``); any such string, or
    a worker that did not exit cleanly, fails the calling test.
    """
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args_for(i), results)) for i in range(n)]
    for proc in procs:
        proc.start()
    try:
        outcomes = [results.get(timeout=120) for _ in procs]
    finally:
        for proc in procs:
            proc.join(30)
    errors = [o for o in outcomes if isinstance(o, str)]
    assert not errors, errors[0]
    assert all(proc.exitcode == 0 for proc in procs)
    return outcomes
