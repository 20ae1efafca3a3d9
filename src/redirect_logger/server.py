"""Hypercorn, as this service runs it: its Config for ``serve``, and a guard
that keeps one connection's failure inside Hypercorn from stopping the server.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Sequence
from typing import Any

import hypercorn.trio.run
from hypercorn.config import Config as HypercornConfig
from hypercorn.config import Sockets
from hypercorn.events import Event, Updated
from hypercorn.trio.tcp_server import TCPServer

from .config import Settings
from .logs import RateLimitedLog

log = logging.getLogger(__name__)


class _BoundedSendConfig(HypercornConfig):
    """Hypercorn's Config; its listening sockets also bound how long a send may stall.

    Hypercorn shields its socket writes from cancellation and has no write
    timeout, so a client that stops reading would hold its connection, and
    the graceful shutdown, forever. ``TCP_USER_TIMEOUT`` (Linux), inherited
    by every accepted connection, makes the kernel abort a connection whose
    sent data stays unacknowledged (a zero window included) for
    ``send_timeout`` seconds; the blocked write then fails and Hypercorn
    closes the connection.
    """

    send_timeout: float | None = None

    def create_sockets(self) -> Sockets:
        sockets = super().create_sockets()
        option = getattr(socket, "TCP_USER_TIMEOUT", None)
        if option is not None and self.send_timeout is not None:
            for sock in [*sockets.secure_sockets, *sockets.insecure_sockets]:
                if sock.family in (socket.AF_INET, socket.AF_INET6):
                    sock.setsockopt(socket.IPPROTO_TCP, option, round(self.send_timeout * 1000))
        return sockets


def hypercorn_config(settings: Settings, fds: Sequence[int] | None = None) -> HypercornConfig:
    """Hypercorn's Config for ``serve``; docs/operations.md lists the limits it
    sets. With ``fds`` it serves those listening sockets (a supervisor's, in
    the order of ``server.bind`` then ``server.admin_bind``) instead of binding."""
    config = _BoundedSendConfig()
    binds = [*settings.server.bind, *settings.server.admin_bind]
    config.bind = binds if fds is None else [f"fd://{fd}" for fd in fds]
    config.graceful_timeout = settings.server.graceful_timeout
    # A response that cannot progress that long cannot finish within the
    # graceful shutdown either.
    config.send_timeout = settings.server.graceful_timeout
    config.accesslog = None
    config.backlog = 1024  # Hypercorn's 100 stalls bursts of new connections
    return config


class _RequestAfterIdleClose(Exception):
    """A request read on a connection whose idle close had begun: not handled."""


class _GuardedTCPServer(TCPServer):
    """One connection of Hypercorn's, whose errors end that connection only,
    and whose idle close never drops a request the app has handled.

    Hypercorn 0.18 serves each connection in a task of its server nursery and
    lets any error escape it, and some input makes its protocol code raise:
    an HTTP/2 ``:path`` with a non-ASCII byte (``UnicodeDecodeError`` where
    it decodes the path) stopped the whole server. Here such an error closes
    that connection (Hypercorn's own ``finally`` does) and is logged;
    cancellation passes through.

    Hypercorn closes a connection it holds idle when its graceful shutdown
    begins or after ``keep_alive_timeout``. A request read at that moment
    raced the close: the app could handle it (its hit recorded) and its
    answer go to a closed socket. Here whichever comes first wins: a request
    in hand keeps the connection until it is answered (Hypercorn then closes
    it, or makes it idle again), and a close begun keeps the request from the
    app (the client sees the connection closed unanswered, as for any idle
    close).
    """

    _log = RateLimitedLog(log)
    _busy = False  # a request is in hand
    _closing = False  # the idle close has begun

    async def protocol_send(self, event: Event) -> None:
        if isinstance(event, Updated):
            if not event.idle and self._closing:
                raise _RequestAfterIdleClose
            self._busy = not event.idle
        await super().protocol_send(event)

    async def _initiate_server_close(self) -> None:
        if self._busy:
            return
        self._closing = True
        await super()._initiate_server_close()

    async def run(self) -> None:
        try:
            await super().run()
        except Exception as exc:  # any error of one connection
            errors = leaf_errors(exc)
            if all(isinstance(error, _RequestAfterIdleClose) for error in errors):
                return
            self._log(
                logging.WARNING,
                type(errors[0]).__name__,
                "a connection failed inside Hypercorn and was closed: "
                + ", ".join(repr(error) for error in errors),
            )


def leaf_errors(error: BaseException) -> list[BaseException]:
    """The errors inside (nested) exception groups, or the error itself."""
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in leaf_errors(inner)]
    return [error]


def guard_connections() -> None:
    """Make Hypercorn's trio worker serve connections through the guard (both
    launch modes; idempotent). ``worker_serve`` looks ``TCPServer`` up in its
    module when it starts serving."""
    module: Any = hypercorn.trio.run
    module.TCPServer = _GuardedTCPServer
