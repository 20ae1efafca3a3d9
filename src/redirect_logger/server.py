"""Hypercorn, as this service runs it: its Config for ``serve``, and the guard
of its connections (both launch modes): the connection limits, the send
timeout, a reset when a graceful shutdown runs out, and one connection's
failure kept inside that connection. The HTTP/2 limits are in ``http2.py``;
docs/architecture.md#hypercorn-overridden lists what is overridden and why.
"""

from __future__ import annotations

import errno
import logging
import math
import socket
import struct
import weakref
from collections.abc import Sequence
from contextlib import suppress
from typing import Any

import hypercorn.protocol
import hypercorn.trio.run
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.events import Closed, Event, RawData, Updated
from hypercorn.trio.task_group import TaskGroup
from hypercorn.trio.tcp_server import MAX_RECV, TCPServer
from hypercorn.trio.worker_context import WorkerContext

from .config import ServerSettings, Settings
from .http2 import ClosedAfterGoaway, GuardedH2Protocol
from .limits import ConnectionGate
from .logs import RateLimitedLog

log = logging.getLogger(__name__)


def hypercorn_config(settings: Settings, fds: Sequence[int] | None = None) -> HypercornConfig:
    """Hypercorn's Config for ``serve``; docs/http.md lists the limits it
    sets. With ``fds`` it serves those listening sockets (a supervisor's, in
    the order of ``server.bind`` then ``server.admin_bind``) instead of binding.
    With ``server.certfile`` and ``server.keyfile`` the ``bind`` sockets serve
    HTTPS (HTTP/2 or HTTP/1.1 by ALPN) and the admin ones stay plain HTTP:
    Hypercorn's secure ``bind`` and its ``insecure_bind``, secure first, so
    the order of the sockets and of the binds it reports stays the same."""
    config = HypercornConfig()
    server = settings.server
    binds = [*server.bind, *server.admin_bind] if fds is None else [f"fd://{fd}" for fd in fds]
    if server.certfile:
        config.certfile, config.keyfile = server.certfile, server.keyfile
        public = len(server.bind)
        config.bind, config.insecure_bind = binds[:public], binds[public:]
    else:
        config.bind = binds
    config.graceful_timeout = settings.server.graceful_timeout
    config.accesslog = None
    config.backlog = 1024  # Hypercorn's 100 stalls bursts of new connections
    use_limits(config, settings.server)
    return config


def use_limits(config: HypercornConfig, server: ServerSettings) -> None:
    """Map the ``[server]`` limits Hypercorn has a setting for onto its Config
    (both launch modes: under ``hypercorn`` they replace its own options)."""
    config.keep_alive_timeout = server.idle_timeout
    # A TLS handshake is a wait for the first request: Hypercorn allows 60 s
    config.ssl_handshake_timeout = server.idle_timeout
    config.h2_max_concurrent_streams = server.h2_max_concurrent_streams


class _RequestAfterIdleClose(Exception):
    """A request read on a connection whose idle close had begun: not handled."""


class _IdleTimer:
    """Hypercorn's idle timer of one connection (its ``idle_task``: ``restart``
    when the connection goes idle, ``stop`` when a request begins), as one
    task for the connection's life whose deadline moves. Hypercorn 0.18
    starts a task at each ``restart`` (``nursery.start``) and cancels it at
    each ``stop``: two task starts, a cancellation and a lock a request, some
    75 us of the Trio thread's time in a loop of the two calls, against 9 us
    for moving a deadline (docs/benchmarks.md#the-idle-timer). As Hypercorn's,
    it closes the connection once idle for ``keep_alive_timeout``, or at
    once when idle once the server's shutdown has begun."""

    def __init__(self, server: _GuardedTCPServer) -> None:
        self._server = server
        self._deadline = math.inf  # of the idle connection; inf: a request in hand
        self._scope: trio.CancelScope | None = None  # the watch's wait
        self._watching = False
        self._ended = False  # the connection's reading ended: nothing to time out

    async def restart(self, task_group: TaskGroup, action: object) -> None:
        """The connection is idle from now on (``action`` is Hypercorn's
        ``_idle_timeout``, which the watch does without a task of its own)."""
        if self._ended:
            return
        server = self._server
        timeout = 0.0 if server.context.terminated.is_set() else server.config.keep_alive_timeout
        self._move(trio.current_time() + timeout)
        if not self._watching:
            self._watching = True
            task_group.spawn(self._watch)

    async def stop(self) -> None:
        """A request is in hand, or the connection's reading has ended."""
        self._move(math.inf)
        if self._server._read_ended:
            self._ended = True
            if self._scope is not None:
                self._scope.cancel()

    def _move(self, deadline: float) -> None:
        self._deadline = deadline
        if self._scope is not None:
            self._scope.deadline = deadline

    async def _watch(self) -> None:
        terminated = self._server.context.terminated
        while True:
            with trio.CancelScope(deadline=self._deadline) as self._scope:
                if terminated.is_set():
                    await trio.sleep_forever()
                else:
                    await terminated.wait()
            self._scope = None
            if self._ended:
                return
            if self._deadline <= trio.current_time() or (
                terminated.is_set() and self._deadline < math.inf
            ):
                self._deadline = math.inf  # until the next restart
                with trio.CancelScope(shield=True):
                    await self._server._initiate_server_close()
                if self._server._closing:  # else a request was in hand: it restarts us
                    return


class _GuardedTCPServer(TCPServer):
    """One connection of Hypercorn's, held to the ``[server]`` limits, whose
    errors end that connection only, and whose idle close never drops a
    request the app has handled.

    Limits: a connection past ``max_connections`` or
    ``max_connections_per_ip`` is reset at once, before Hypercorn reads a
    byte of it (so before the app could see a request); connections to an
    admin port (``server.admin_bind``) are not counted. Every other one
    gets ``TCP_USER_TIMEOUT`` = ``send_timeout`` (Linux): the kernel aborts
    it when data it sent stays unacknowledged (a zero window included) that
    long. Hypercorn shields its socket writes from cancellation and has no
    write timeout, so a client that stops reading would otherwise hold its
    connection, and the graceful shutdown, for ever. When a graceful
    shutdown runs out, the connections still open are reset, so such a
    client cannot hold up the shutdown for ``send_timeout`` either.

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

    Hypercorn 0.18 also keeps a connection's task, after the client has
    closed it, until its idle timer (``keep_alive_timeout``) runs out; here
    the end of reading stops the timer, so the task, and the connection's
    count, end with the connection. The timer is ``_IdleTimer``: one task a
    connection, where Hypercorn starts one a request.

    The connections closed by ``idle_timeout`` (Hypercorn's idle close, but
    at a shutdown) and aborted by ``send_timeout`` (a send or a read fails
    with ETIMEDOUT) are counted, once each, by ``ConnectionGate.closed``: to
    see that, the socket sends and reads of Hypercorn's ``protocol_send``
    and ``_read_data`` are done here, as Hypercorn 0.18 does them.
    """

    _log = RateLimitedLog(log)
    _busy = False  # a request is in hand
    _closing = False  # the idle close has begun
    _read_ended = False  # the client closed, or the connection failed
    _timed_out = False  # the kernel aborted the connection (send_timeout)
    _counted = False  # held to the limits (not an admin port's)

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.idle_task: Any = _IdleTimer(self)

    async def protocol_send(self, event: Event) -> None:
        if isinstance(event, RawData):
            async with self.send_lock:
                try:
                    with trio.CancelScope(shield=True):
                        await self.stream.send_all(event.data)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    self._count_send_timeout(exc)
                    await self.protocol.handle(Closed())
            return
        if isinstance(event, Updated):
            if not event.idle and self._closing:
                raise _RequestAfterIdleClose
            self._busy = not event.idle
        elif isinstance(event, ClosedAfterGoaway):
            await self._linger()
        await super().protocol_send(event)

    async def _linger(self) -> None:
        """A lingering close, after a GOAWAY (``http2.py``): end our side
        (FIN after the GOAWAY), then read and drop what the client still
        sends, until it closes too, for at most ``LINGER_SECONDS`` and
        ``LINGER_BYTES``. Closing a socket with unread input makes the
        kernel send a reset, and a reset can destroy the GOAWAY in the
        client's receive buffer before the client reads it: a flood's
        client, still writing, would see its connection reset with no
        reason given. Called from the connection's reading task (the GOAWAY
        is sent while it handles a read), so nothing else reads meanwhile."""
        with suppress(
            trio.BrokenResourceError,
            trio.BusyResourceError,
            trio.ClosedResourceError,
            AttributeError,  # a TLS stream has no send_eof
        ):
            await self.stream.send_eof()
        left = LINGER_BYTES
        with trio.move_on_after(LINGER_SECONDS):
            while left > 0:
                try:
                    data = await self.stream.receive_some(MAX_RECV)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return
                if not data:
                    return
                left -= len(data)

    async def _initiate_server_close(self) -> None:
        if self._busy:
            return
        self._closing = True
        if self._counted and not self.context.terminated.is_set():  # else a shutdown's close
            _counted_gate().closed("idle_timeout")
        await super()._initiate_server_close()

    async def _read_data(self) -> None:
        try:
            timeout = self.config.read_timeout
            while True:
                try:
                    if timeout:
                        with trio.fail_after(timeout):
                            data = await self.stream.receive_some(MAX_RECV)
                    else:  # no scope per read (each byte of a slowloris client is one)
                        data = await self.stream.receive_some(MAX_RECV)
                except (trio.ClosedResourceError, trio.BrokenResourceError) as exc:
                    self._count_send_timeout(exc)
                    break
                except trio.TooSlowError:
                    break
                await self.protocol.handle(RawData(bytes(data)))
                if data == b"":
                    break
            await self.protocol.handle(Closed())
        finally:
            self._read_ended = True
            await self.idle_task.stop()

    def _count_send_timeout(self, error: Exception) -> None:
        """Count the connection as closed by ``send_timeout`` if ``error`` is
        the kernel's abort (ETIMEDOUT, TCP_USER_TIMEOUT), once."""
        cause = error.__cause__
        if isinstance(cause, OSError) and cause.errno == errno.ETIMEDOUT and not self._timed_out:
            self._timed_out = True
            if self._counted:
                _counted_gate().closed("send_timeout")

    async def run(self) -> None:
        gate = _counted_gate()
        sock: trio.socket.SocketType = getattr(self.stream, "transport_stream", self.stream).socket
        counted = gate.admin_ports is None or _local_port(sock) not in gate.admin_ports
        self._counted = counted
        peer = _peer_ip(sock)
        if counted and not gate.admit(peer):
            _reset(sock)
            return
        server = _connections_of(self.context, self.config.graceful_timeout)
        server.add(sock)
        try:
            use_limits(self.config, gate.limits)  # under ``hypercorn``: its own Config
            if peer is not None and _USER_TIMEOUT is not None:
                milliseconds = round(gate.limits.send_timeout * 1000)
                sock.setsockopt(socket.IPPROTO_TCP, _USER_TIMEOUT, milliseconds)
            await self._run_guarded()
        finally:
            server.discard(sock)
            if counted:
                gate.release(peer)
            self._unlink()

    def _unlink(self) -> None:
        """Break the reference cycle a connection leaves when it is over:
        Hypercorn's protocol holds this server's ``protocol_send``, a bound
        method, so the server, its protocol, h11's state and buffers and the
        task group would wait for a full collection of the cyclic garbage
        collector, which the service's thresholds make rare
        (docs/architecture.md#the-garbage-collector). Without the protocol,
        reference counting frees them all when the task ends."""
        attributes = vars(self)
        attributes.pop("protocol", None)
        attributes.pop("_task_group", None)
        attributes.pop("idle_task", None)  # it holds this server

    async def _run_guarded(self) -> None:
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


_USER_TIMEOUT: int | None = getattr(socket, "TCP_USER_TIMEOUT", None)
# A lingering close after a GOAWAY reads and drops at most this long, and this much
LINGER_SECONDS = 1.0
LINGER_BYTES = 16 << 20
# Each Hypercorn server's guarded connections (by its WorkerContext)
_open: weakref.WeakKeyDictionary[WorkerContext, set[trio.socket.SocketType]] = (
    weakref.WeakKeyDictionary()
)


def _reset(sock: trio.socket.SocketType) -> None:
    """Close ``sock`` with a reset (no TIME_WAIT, unsent data dropped); a task
    blocked on it gets ClosedResourceError."""
    with suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _connections_of(context: WorkerContext, graceful_timeout: float) -> set[trio.socket.SocketType]:
    """The open connections of the Hypercorn server of ``context``. The first
    call for a server also watches its shutdown: when its graceful timeout
    has run out, the connections still open are reset. Hypercorn then
    cancels their tasks, but a task blocked in one of its shielded sends
    would hold up the shutdown until ``send_timeout`` aborted the connection."""
    sockets = _open.get(context)
    if sockets is None:
        sockets = _open[context] = set()
        trio.lowlevel.spawn_system_task(_reset_at_the_end, context, sockets, graceful_timeout)
    return sockets


async def _reset_at_the_end(
    context: WorkerContext, sockets: set[trio.socket.SocketType], graceful_timeout: float
) -> None:
    await context.terminated.wait()
    await trio.sleep(graceful_timeout)
    left = list(sockets)
    for sock in left:
        _reset(sock)
    if left:
        log.warning("graceful shutdown over: reset the connections still open (%d)", len(left))


def _local_port(sock: trio.socket.SocketType) -> int | None:
    try:
        return int(sock.getsockname()[1]) if sock.family != socket.AF_UNIX else None
    except OSError:
        return None


def _peer_ip(sock: trio.socket.SocketType) -> str | None:
    """The peer's IP address; None for a socket that is not TCP/IP, or is gone."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    try:
        return str(sock.getpeername()[0])
    except OSError:
        return None


def leaf_errors(error: BaseException) -> list[BaseException]:
    """The errors inside (nested) exception groups, or the error itself."""
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in leaf_errors(inner)]
    return [error]


_gate: ConnectionGate | None = None  # this process's, from the last guard_connections()


def _counted_gate() -> ConnectionGate:
    assert _gate is not None  # set with the guard, by guard_connections()
    return _gate


def guard_connections(gate: ConnectionGate) -> None:
    """Make Hypercorn's trio worker serve connections through the guard, held
    to ``gate`` (both launch modes; one gate per process: the last call's
    applies to connections accepted from then on). ``worker_serve`` looks
    ``TCPServer`` up in its module when it starts serving, and Hypercorn's
    ``ProtocolWrapper`` ``H2Protocol`` in its own for each HTTP/2 connection."""
    global _gate
    _gate = gate
    module: Any = hypercorn.trio.run
    module.TCPServer = _GuardedTCPServer
    GuardedH2Protocol.gate = gate
    protocols: Any = hypercorn.protocol  # ``ProtocolWrapper`` looks H2Protocol up there
    protocols.H2Protocol = GuardedH2Protocol
