"""The Quart-Trio app: redirects at the ASGI edge, admin routes in Quart, lifecycle.

Redirect hits never enter Quart's routing: ``Frontend`` answers them straight
from the rule table (werkzeug's routing would merge slashes and redirect on its
own, which is not what a faithful redirector may do), and hands requests for
``collect.path`` to the collect endpoint (collect.py). A WebSocket upgrade is a
hit too, answered through ASGI's WebSocket denial response. Quart serves the
admin endpoints ``/healthz``, ``/readyz`` and ``/metrics``.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import os
import signal
import time
from typing import Any

import trio
from quart import Response, request
from quart_trio import QuartTrio
from uuid_utils import uuid7
from werkzeug.exceptions import HTTPException

from .collect import Collector
from .hits import Hit
from .limits import HEAVY_BYTES, HeavyLane
from .metrics import CONTENT_TYPE
from .pipeline import Admission
from .pixel import PIXEL_METHODS, Pixel
from .server import guard_connections
from .service import EXIT_OK, Service

log = logging.getLogger(__name__)

Scope = dict[str, Any]
ASGIApp = Any

_NOT_FOUND = b"not found\n"
_OVERLOADED = b"overloaded, retry later\n"
# The body of an answer without a Location, by status
_BODIES = {404: _NOT_FOUND, 410: b"gone\n", 400: b"redirect target not allowed\n"}

# The ASGI messages of an answer: to an HTTP request, and to a WebSocket
# upgrade that is denied (the "websocket.http.response" extension)
_HTTP = ("http.response.start", "http.response.body")
_DENIAL = ("websocket.http.response.start", "websocket.http.response.body")


def _heavy(scope: Scope) -> bool:
    """A hit whose target takes its turn in the heavy lane."""
    return len(scope["raw_path"]) + len(scope["query_string"]) > HEAVY_BYTES


def _head(status: int, headers: list[tuple[bytes, bytes]], kind: str = _HTTP[0]) -> dict[str, Any]:
    return {"type": kind, "status": status, "headers": headers}


class Frontend:
    """ASGI middleware in front of Quart: answers every non-admin HTTP request
    and WebSocket upgrade.

    With ``own_lifecycle`` (the ``hypercorn`` launch mode) it also runs the
    service's lifecycle from the ASGI lifespan.
    """

    def __init__(self, quart: QuartTrio, service: Service, *, own_lifecycle: bool) -> None:
        self._quart = quart
        self._inner: ASGIApp = quart.asgi_app
        self._service = service
        self._own_lifecycle = own_lifecycle
        collect = service.settings.collect
        self._lane = HeavyLane(service.metrics.heavy_requests.inc)
        self._collector = (
            Collector(
                collect, service.settings.kafka, service.admit_all, service.metrics, self._lane
            )
            if collect.enabled
            else None
        )
        self._collect_path = collect.path if collect.enabled else None
        self._count_hit = service.metrics.rule_hits.count
        self._count_choice = service.metrics.choices.count
        self._pixel = Pixel(service.admit)

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        kind = scope["type"]
        if kind == "http" and not self._service.is_admin(scope):
            if scope["path"] == self._collect_path and self._collector is not None:
                await self._collector(scope, receive, send)  # every method: collect.path wins
                return
            if _heavy(scope):
                await self._lane.turn()
            if scope["path"] == self._service.pixel_path and scope["method"] in PIXEL_METHODS:
                await self._pixel(scope, send)
            else:
                await self._hit(scope, send)
        elif kind == "websocket" and not self._service.is_admin(scope):
            if _heavy(scope):
                await self._lane.turn()
            await self._upgrade(scope, send)
        elif kind == "lifespan" and self._own_lifecycle:
            await self._lifespan(receive, send)
        elif kind == "http":
            await self._admin(scope, receive, send)
        else:
            await self._inner(scope, receive, send)

    async def _admin(self, scope: Scope, receive: Any, send: Any) -> None:
        """Quart answers; this makes sure of two things Quart does not.

        - Each message reaches Hypercorn whole. quart-trio cancels its response
          task as soon as it receives ``http.disconnect``, which Hypercorn
          delivers from inside the last ``send``. Cancelled there, Hypercorn
          would neither close nor recycle the connection, and no timeout would
          ever close it.
        - A request that Quart fails before its error handling (werkzeug's
          router raises ``BadHost`` for a ``Host`` it cannot encode as IDNA)
          gets that error's status, not a 500 and a logged traceback.
        """
        started = False

        async def send_whole(message: dict[str, Any]) -> None:
            nonlocal started
            started = True
            with trio.CancelScope(shield=True):
                await send(message)

        try:
            await self._inner(scope, receive, send_whole)
        except* HTTPException as group:
            if started:
                raise
            error: BaseException = group
            while isinstance(error, BaseExceptionGroup):
                error = error.exceptions[0]
            status = error.code if isinstance(error, HTTPException) and error.code else 400
            await send(_head(status, [(b"content-length", b"0")]))
            await send({"type": "http.response.body", "body": b""})

    async def _upgrade(self, scope: Scope, send: Any) -> None:
        """A WebSocket upgrade is never accepted: it is answered as a GET of
        its URL would be by the rules (the collect endpoint takes none), with
        the denial response. A server without that extension can only be
        told to close the socket (Hypercorn would answer 403): no answer of
        ours, so no hit and no record."""
        if "websocket.http.response" in (scope.get("extensions") or {}):
            await self._hit(scope, send, _DENIAL)
        else:
            await send({"type": "websocket.close", "code": 1000})

    async def _hit(self, scope: Scope, send: Any, messages: tuple[str, str] = _HTTP) -> None:
        """Match, build the response, hand the hit to the channel, answer: at
        once, or once its record is durable (``records.durability``).
        ``messages``: the ASGI messages that answer (an HTTP request's, or a
        WebSocket upgrade's denial)."""
        now = time.time()
        hit_id = str(uuid7())
        service = self._service
        rules = service.rules
        host = None
        if rules.by_host:  # only then is the Host header looked up; the last one, as recorded
            host = next((v for k, v in reversed(scope["headers"]) if k == b"host"), None)
        target, location, detail, route, variant, cookie = rules.answer(
            scope, host, service.clients, hit_id, now
        )
        status = target.status
        admission = await service.admit(
            Hit.from_scope(
                scope, hit_id, now, status, location, target.name, None, detail, route, variant
            )
        )
        headers = [(b"x-hit-id", hit_id.encode())]
        if admission is Admission.SHED:
            status, body = 503, _OVERLOADED
            headers += [(b"retry-after", b"1"), (b"cache-control", b"no-store")]
        else:
            if location is None:
                body = _BODIES.get(status, _NOT_FOUND)
                headers.append((b"cache-control", b"no-store"))  # a 404 is not an answer to keep
            else:
                body = b""
                headers += [
                    (b"location", location.encode("ascii")),
                    (b"cache-control", target.cache_control),
                ]
                if cookie is not None:  # a split's variant, drawn for this client
                    headers.append((b"set-cookie", cookie))
            if target.vary is not None:  # a routed rule's: what the answer depends on
                headers.append((b"vary", target.vary))
            if route is not None or variant is not None:
                self._count_choice(target.name, route, variant)
        self._count_hit(target.name, status)
        headers.append((b"content-length", str(len(body)).encode()))
        if body:
            headers.append((b"content-type", b"text/plain; charset=utf-8"))
        await send(_head(status, headers, messages[0]))
        if messages is _HTTP and scope["method"] == "HEAD":
            body = b""
        await send({"type": messages[1], "body": body})

    async def _lifespan(self, receive: Any, send: Any) -> None:
        """The ASGI lifespan when no CLI owns the lifecycle (``hypercorn`` mode).

        Startup runs the service; shutdown (after Hypercorn has finished the
        in-flight requests) drains and flushes it, in our own nursery and time
        budget, never in ``app.nursery``. Losing records fails the shutdown, so
        the worker process exits non-zero.
        """
        await receive()  # lifespan.startup
        service = self._service
        try:
            service.create_sink()
        except Exception as exc:
            await send({"type": "lifespan.startup.failed", "message": str(exc)})
            return
        # The SIGTERM guard stays up until the drain below has finished.
        started = False
        try:
            async with trio.open_nursery() as guard:
                await guard.start(_mark_draining_on_sigterm, service)
                async with service.running(), trio.open_nursery() as quart_nursery:
                    self._quart.nursery = quart_nursery
                    await self._quart.startup()
                    await send({"type": "lifespan.startup.complete"})
                    started = True
                    await receive()  # lifespan.shutdown
                    service.draining = True
                    await self._quart.shutdown()
                guard.cancel_scope.cancel()
            # Drained: from here to exit a late SIGTERM must not turn a clean
            # exit into a kill (nor hide an exit code of 3).
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        except Exception as exc:
            if started:
                raise
            # Hypercorn would go on serving without a pipeline: refuse to start.
            await send({"type": "lifespan.startup.failed", "message": repr(exc)})
            return
        code = service.exit_code()
        if code == EXIT_OK:
            await send({"type": "lifespan.shutdown.complete"})
            return
        # Hypercorn 0.18 ignores a failed lifespan shutdown and its worker
        # exits 0; the process exit code is set at interpreter exit instead.
        atexit.register(_exit_with, code)
        message = f"records lost: {service.ledger_snapshot()}"
        await send({"type": "lifespan.shutdown.failed", "message": message})


def _exit_with(code: int) -> None:
    logging.shutdown()
    os._exit(code)


async def _mark_draining_on_sigterm(
    service: Service, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Under ``hypercorn --workers N`` the master coordinates shutdown.

    A worker that gets SIGTERM itself (a process-group kill, or the master's
    ``terminate()`` of the workers still draining) must not die mid-drain: it
    turns not-ready and carries on until the master's shutdown reaches it. A
    single-process Hypercorn (``--workers 0``) has no master, so SIGTERM becomes
    its Ctrl+C, which Hypercorn handles as a graceful shutdown. SIGHUP, which
    would kill the process undrained, is ignored: the master (if any) reloads.
    """
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGHUP) as signals:
        task_status.started()
        async for signum in signals:
            if signum == signal.SIGHUP:  # by default it would kill the worker, undrained
                if multiprocessing.parent_process() is None:
                    log.warning("SIGHUP ignored: reloading needs hypercorn --workers 1 or more")
                continue  # with a master, the master reloads
            first = not service.draining
            service.draining = True
            log.info("SIGTERM: not ready; draining when the server stops")
            if first and multiprocessing.parent_process() is None:
                _interrupt_main_task()


@trio.lowlevel.enable_ki_protection
def _interrupt_main_task() -> None:
    """Ctrl+C for Hypercorn: KI-protected here, so Trio delivers it to the main task."""
    signal.raise_signal(signal.SIGINT)


def create_app(service: Service, *, own_lifecycle: bool) -> QuartTrio:
    """The ASGI app. ``own_lifecycle``: run the service from the ASGI lifespan.

    Also guards Hypercorn's connections (``server.guard_connections``).
    """
    guard_connections(service.connections)
    app = QuartTrio(__name__)

    @app.get("/healthz")
    async def healthz() -> Response:
        return Response("ok\n", content_type="text/plain")

    @app.get("/readyz")
    async def readyz() -> Response:
        # ?exclude=kafka, as Kubernetes' own /readyz?exclude=<check>: ready for
        # traffic even while no broker is reachable (hits are journaled).
        reason = service.readiness(kafka="kafka" not in request.args.getlist("exclude"))
        if reason is None:
            return Response("ready\n", content_type="text/plain")
        return Response(f"not ready: {reason}\n", status=503, content_type="text/plain")

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(await service.exposition(), content_type=CONTENT_TYPE)

    app.asgi_app = Frontend(app, service, own_lifecycle=own_lifecycle)  # type: ignore[method-assign,assignment]
    return app
