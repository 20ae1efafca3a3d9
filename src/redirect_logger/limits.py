"""Connection limits of one process: how many connections are open, from
whom, and the count and log of the ones refused.

The guard of Hypercorn's connections (``server.py``) asks ``admit`` before a
connection reaches Hypercorn's protocol code, and ``release`` when it ends; a
refused connection is closed at once and never reaches the app, so it holds no
hit. Everything here runs on the Trio thread.
"""

from __future__ import annotations

import logging
import resource
from collections import Counter
from collections.abc import Callable

import trio

from .config import ServerSettings
from .logs import RateLimitedLog

log = logging.getLogger(__name__)

# Why a connection was refused or ended early (the ``reason`` label of
# redirect_logger_connections_refused_total; docs/configuration.md#connection-limits).
REFUSALS = ("max_connections", "max_connections_per_ip", "h2_resets")
# Why the service closed a connection it had admitted, on a timeout (the
# ``reason`` label of redirect_logger_connections_closed_total).
CLOSES = ("idle_timeout", "send_timeout")

# File descriptors a process needs besides its connections: listening
# sockets, librdkafka's broker connections, the journal, the group's sockets.
FD_MARGIN = 100


def descriptor_shortfall(server: ServerSettings) -> str | None:
    """Why this process's soft RLIMIT_NOFILE is too low for ``server.max_connections``
    (plus FD_MARGIN), or None when it is not."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = server.max_connections + FD_MARGIN
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return None
    return (
        f"the file descriptor limit (RLIMIT_NOFILE, soft) is {soft}, below "
        f"server.max_connections ({server.max_connections}) + {FD_MARGIN} = {needed}: "
        "past it new connections wait unaccepted; raise it (LimitNOFILE=, ulimit -n, "
        "see docs/deployment.md#file-descriptors) or lower server.max_connections"
    )


# A request this much larger than most takes its turn in the HeavyLane: a
# target (path and query) longer, or a collect body (as received) longer.
# A redirect's 16,000-byte target of characters its Location percent-encodes
# cost the service 0.70 to 0.73 ms, a 4 KiB one 0.42 ms, a short one 0.28 to
# 0.31 ms (docs/benchmarks.md#a-lane-for-heavy-requests-2026-12-03-issue-13).
HEAVY_BYTES = 4096


class HeavyLane:
    """Heavy requests take turns: one passes ``turn`` per pass of Trio's
    scheduler, whatever else is runnable.

    A burst of heavy requests (each costing the service up to 2.5 times an
    ordinary one: clients that open many connections at once and ask for the
    largest answers) would otherwise all run in the same passes as the
    ordinary requests beside them, each pass as long as the whole burst.
    Taking turns spreads the burst over as many passes as it has requests,
    and ordinary requests keep moving between them. A turn holds nothing
    while the request is handled: a request that then waits (for its
    record's durability, or on a client that does not read) keeps no other
    request from its turn.

    How: ``trio.Lock`` hands itself to the next waiter at each release, and
    a task woken runs in the scheduler's next pass; a free lock is taken
    with a checkpoint too.
    """

    def __init__(self, count: Callable[[], None] = lambda: None) -> None:
        self._lock = trio.Lock()
        self._count = count  # each turn taken

    async def turn(self) -> None:
        """Return on this request's turn (at once, bar one pass, when no
        other heavy request waits)."""
        async with self._lock:
            pass
        self._count()


class ConnectionGate:
    """Open connections of this process, in total and per peer address, held
    to ``server.max_connections`` and ``server.max_connections_per_ip``."""

    def __init__(
        self,
        server: ServerSettings,
        count_refusal: Callable[[str], None],
        admin_ports: frozenset[int] | None = None,
        count_refused_streams: Callable[[int], None] = lambda count: None,
        count_close: Callable[[str], None] = lambda reason: None,
    ) -> None:
        self.limits = server
        self.streams_refused = count_refused_streams  # HTTP/2 streams past the limit
        self.admin_ports = admin_ports  # connections to these are neither counted nor refused
        self.open = 0
        self._per_ip: Counter[str] = Counter()
        self._count_refusal = count_refusal
        self.closed = count_close  # of an admitted connection, by one of CLOSES
        self._log = RateLimitedLog(log)

    def admit(self, peer: str | None) -> bool:
        """Count a new connection from ``peer`` (its IP address; None: not an
        IP socket) as open and return True, or count and log its refusal and
        return False. Each True is to be followed by one ``release(peer)``."""
        limits = self.limits
        if self.open >= limits.max_connections:
            self.refused("max_connections", f"{self.open} connections are open")
            return False
        per_ip = limits.max_connections_per_ip
        if peer is not None and per_ip:
            if self._per_ip[peer] >= per_ip:
                self.refused("max_connections_per_ip", f"{per_ip} connections from {peer} are open")
                return False
            self._per_ip[peer] += 1
        self.open += 1
        return True

    def release(self, peer: str | None) -> None:
        """A connection ``admit`` let in has ended."""
        self.open -= 1
        if peer is not None and self.limits.max_connections_per_ip:
            left = self._per_ip[peer] - 1
            if left:
                self._per_ip[peer] = left
            else:
                del self._per_ip[peer]

    def refused(self, reason: str, detail: str) -> None:
        """Count a refusal (``reason`` is one of REFUSALS) and log it, at most
        once every 10 s per reason, with a count of those held back."""
        self._count_refusal(reason)
        setting = "h2_max_resets_per_second" if reason == "h2_resets" else reason
        self._log(
            logging.WARNING,
            reason,
            f"connection refused ({reason}): {detail}; server.{setting} ="
            f" {getattr(self.limits, setting)}",
        )
