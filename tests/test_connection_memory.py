"""A connection's memory goes when the connection does (issue 12, memory that
stays flat; docs/benchmarks.md#an-hours-soak).

While the service runs, the cyclic garbage collector's full collections are
rare (``heap.py``). Hypercorn's protocol object holds its connection's
``protocol_send``, a bound method of the connection's server object: a
reference cycle, so every closed connection's objects (server, protocol,
h11's state and buffers, task group, locks) waited for a full collection. In
an hour at 256 keep-alive connections, whose every connection Hypercorn
closes after 1,000 requests, that was up to 1,500 closed connections at a
time. The guard (``server.py``) breaks the cycle when a connection ends.
Here the collector is off, so only reference counting frees anything: a
closed connection's objects must be gone all the same, however it closed.
"""

from __future__ import annotations

import gc
import re
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import hypercorn.protocol.h11
import trio

from brokers import Broker
from redirect_logger.server import _GuardedTCPServer
from support import read_topic, service_config, start_service, unique_topic

HEAD = b"Host: x\r\n"
HIT_ID = re.compile(rb"x-hit-id: ([0-9a-f-]+)", re.IGNORECASE)


@contextmanager
def collector_off() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def alive() -> Counter[str]:
    """The connections' objects alive now, by type."""
    kinds = (_GuardedTCPServer, hypercorn.protocol.h11.H11Protocol)
    return Counter(type(o).__name__ for o in gc.get_objects() if isinstance(o, kinds))


async def exchange(url: str, requests: list[bytes]) -> tuple[trio.SocketStream, list[bytes]]:
    """Send each request on one new connection and read its answer's head."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    heads = []
    data = b""
    for request in requests:
        await stream.send_all(request)
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some(65536)
            assert chunk, f"closed unanswered: {data!r}"
            data += chunk
        head, data = data.split(b"\r\n\r\n", 1)
        heads.append(head)
    return stream, heads


async def until_closed_by_server(stream: trio.SocketStream) -> None:
    while await stream.receive_some(65536):
        pass
    await stream.aclose()


async def until_gone(before: Counter[str]) -> Counter[str]:
    """The connections' objects, once the server has ended the connections'
    tasks (at most 5 s), as a change from ``before``."""
    with trio.move_on_after(5):
        while alive() != before:  # noqa: ASYNC110 - polled state
            await trio.sleep(0.05)
    return alive() - before


async def test_a_closed_connection_is_freed_by_reference_counting(broker: Broker) -> None:
    """With the collector off: connections closed by the client (after two
    keep-alive requests), by the server after ``Connection: close``, and by
    the server's idle timeout (0.5 s) leave none of their objects behind,
    and each of their 5 hits is in Kafka."""
    topic = unique_topic()
    config = service_config(broker.bootstrap, topic, server={"idle_timeout": 0.5})
    with trio.fail_after(60), collector_off():
        async with trio.open_nursery() as nursery:
            stop = trio.Event()
            service, codes = await start_service(nursery, config, stop)
            url = service.binds[0]
            before = alive()
            assert before == Counter(), before  # no connection yet
            get = b"GET /docs/a?n=%d HTTP/1.1\r\n" + HEAD + b"\r\n"

            stream, heads = await exchange(url, [get % 1, get % 2])
            assert len(alive()) == 2  # held while open: a server and its protocol
            await stream.aclose()
            assert await until_gone(before) == Counter()

            close = b"GET /docs/a?n=3 HTTP/1.1\r\n" + HEAD + b"Connection: close\r\n\r\n"
            stream, more = await exchange(url, [close])
            heads += more
            await until_closed_by_server(stream)
            assert await until_gone(before) == Counter()

            stream, more = await exchange(url, [get % 4, get % 5])
            heads += more
            await until_closed_by_server(stream)  # idle for 0.5 s
            assert await until_gone(before) == Counter()

            assert [head.split(b"\r\n")[0] for head in heads] == [b"HTTP/1.1 301 "] * 5
            stop.set()
    assert codes == [0]
    ids = [found.group(1).decode() for head in heads if (found := HIT_ID.search(head))]
    assert len(ids) == 5, heads
    records = read_topic(broker.bootstrap, topic, expected=5)
    assert sorted((record["id"], record["query"]) for record in records) == sorted(
        zip(ids, [f"n={n}" for n in range(1, 6)], strict=True)
    )
