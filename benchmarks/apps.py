"""The baselines the service is measured against (benchmarks/compare.py).

Each answers ``GET /docs/<rest>?<query>`` with the same redirect as the
service's ``docs`` rule: ``301`` to ``https://docs.example.com/<rest>?<query>``.

- ``stock``: a Quart-Trio app with one route, nothing logged (B).
- ``raw``: a bare ASGI app (C): the ceiling of Hypercorn's trio worker.
- ``naive``: the stock route plus a Kafka produce and poll per request on the
  event loop, and no flush at exit (E): the design users run away from. Its
  broker and topic come from ``BENCH_BOOTSTRAP`` and ``BENCH_TOPIC``.

Run with ``hypercorn -k trio --workers 0 apps:<name>`` from this directory.
"""

from __future__ import annotations

import os
import time
import uuid
from typing import Any

import orjson
from confluent_kafka import Producer
from quart import Response, redirect, request
from quart_trio import QuartTrio

TARGET = "https://docs.example.com/"


def _location(rest: str, query: bytes) -> str:
    return TARGET + rest + ("?" + query.decode("latin-1") if query else "")


stock = QuartTrio("stock")


@stock.get("/docs/<path:rest>")
async def stock_docs(rest: str) -> Response:
    return redirect(_location(rest, request.query_string), 301)


async def raw(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            kind = message["type"].removeprefix("lifespan.")
            await send({"type": f"lifespan.{kind}.complete"})
            if kind == "shutdown":
                return
    path = scope["path"]
    if scope["type"] != "http" or not path.startswith("/docs/"):
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": b""})
        return
    location = _location(path.removeprefix("/docs/"), scope["query_string"])
    await send(
        {
            "type": "http.response.start",
            "status": 301,
            "headers": [(b"location", location.encode()), (b"content-length", b"0")],
        }
    )
    await send({"type": "http.response.body", "body": b""})


naive = QuartTrio("naive")
_producer: Producer | None = None


@naive.before_serving
async def _connect() -> None:
    global _producer
    _producer = Producer(
        {"bootstrap.servers": os.environ["BENCH_BOOTSTRAP"], "acks": "all", "linger.ms": 5}
    )


@naive.get("/docs/<path:rest>")
async def naive_docs(rest: str) -> Response:
    assert _producer is not None
    record = {
        "id": str(uuid.uuid4()),
        "ts": time.time(),
        "path": request.path,
        "user_agent": request.headers.get("user-agent"),
    }
    try:
        _producer.produce(os.environ["BENCH_TOPIC"], orjson.dumps(record))
    except BufferError:  # as the stock examples do: print and move on
        print("queue full, record dropped")
    _producer.poll(0)
    return redirect(_location(rest, request.query_string), 301)
