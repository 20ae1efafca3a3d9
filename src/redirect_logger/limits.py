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
