"""The cyclic garbage collector, tuned for serving (docs/architecture.md#the-garbage-collector).

With CPython's default thresholds (700, 10, 10) the collector ran about 100
times a second under load at 256 connections, and took 12 % of the Trio
thread: each young collection scanned the state of every request in flight,
and each full one (20-40 ms, a pause for every request) the rule table and
the bot flag's patterns. While the service runs, what start-up built is
frozen (``gc.freeze``: never scanned again), and a young collection waits
for ``YOUNG_THRESHOLD`` more container objects than were freed. Objects in
reference cycles are still collected; there are few (the request path makes
none, and the guard in server.py breaks the one a closed connection left).
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

YOUNG_THRESHOLD = 50_000  # CPython's default: 700


@contextmanager
def settled() -> Iterator[None]:
    """Freeze what is alive now and raise the young generation's threshold
    for the body; on exit, unfreeze and restore the thresholds (so that a
    process which runs the service more than once, a test session, still
    frees what it leaves behind)."""
    thresholds = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, *thresholds[1:])
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()
