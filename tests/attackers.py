"""Attacks on a service's connection limits, each bounded in count and time,
from raw sockets and HTTP/2 clients (h2), run in a process of their own so
that their work does not slow the ordinary clients measured beside them
(tests/test_attacks.py, benchmarks/attack.py).

    python tests/attackers.py KIND HOST PORT --count N --seconds S [--repeat]

prints one JSON object: what the attackers saw (see each attack). Loopback
only: the attackers' source addresses are 127.x.y.z.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import socket
import sys
from collections.abc import Awaitable, Callable
from contextlib import suppress
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import trio

HIT_ID = re.compile(rb"x-hit-id: ([0-9a-f-]+)", re.IGNORECASE)
Result = dict[str, Any]


def raise_descriptor_limit(needed: int) -> None:
    """Raise this process's soft RLIMIT_NOFILE to ``needed`` (as far as the
    hard limit allows: past it, connections fail with EMFILE and say so)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(needed, hard), hard))


async def connect(host: str, port: int, source: str, receive_buffer: int = 0) -> trio.SocketStream:
    """A TCP connection from ``source`` (with a receive buffer of
    ``receive_buffer`` bytes, set before the connect, so its window stays small)."""
    sock = trio.socket.socket()
    try:
        if receive_buffer:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        await sock.bind((source, 0))
        await sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


async def request(stream: trio.SocketStream, path: str) -> str | None:
    """One GET on ``stream``: the hit id of its 301, or None when the
    connection was closed or reset unanswered."""
    try:
        await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some(65536)
            if not chunk:
                return None
            data += chunk
    except trio.BrokenResourceError:
        return None
    if not data.startswith(b"HTTP/1.1 301 "):
        raise AssertionError(data)
    found = HIT_ID.search(data)
    if found is None:
        raise AssertionError(data)
    return found.group(1).decode()


async def _many(count: int, at_once: int, one: Callable[[int], Awaitable[None]]) -> None:
    limiter = trio.CapacityLimiter(at_once)

    async def limited(index: int) -> None:
        async with limiter:
            await one(index)

    async with trio.open_nursery() as nursery:
        for index in range(count):
            nursery.start_soon(limited, index)


async def idle(host: str, port: int, count: int, seconds: float, repeat: bool) -> Result:
    """``count`` connections from 16 addresses that send nothing, held until
    the server closes them or ``seconds`` have passed (with ``repeat``, each
    closed one is opened again until then). ``attempted``: connections
    tried; ``connected``: those whose connect returned (a refused one may be
    reset only after that)."""
    attempted = connected = 0
    end = trio.current_time() + seconds

    async def one(index: int) -> None:
        nonlocal attempted, connected
        attempted += 1
        try:
            stream = await connect(host, port, f"127.0.1.{index % 16 + 1}")
        except OSError:
            stream = None
        else:
            connected += 1
        nursery.start_soon(hold, index, stream)

    async def hold(index: int, stream: trio.SocketStream | None) -> None:
        if stream is not None:
            async with stream:
                with suppress(trio.BrokenResourceError):
                    while await stream.receive_some(65536):
                        pass
        if repeat and trio.current_time() < end:
            await trio.sleep(0.1)
            await one(index)

    with trio.move_on_after(seconds):
        async with trio.open_nursery() as nursery:
            await _many(count, 200, one)
    return {"attempted": attempted, "connected": connected}


SLOW_HEAD = b"GET /docs/slow HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: a\r\n" * 1000


async def slowloris(host: str, port: int, count: int, seconds: float, repeat: bool) -> Result:
    """``count`` connections from 8 addresses each send a request head one
    byte a second, never completing it, until the server closes them (or
    ``seconds``; with ``repeat``, each closed one is opened again until
    then). ``connections``: those opened; ``answered``: those that got any
    byte back; ``closed``: those the server closed, with the first and
    last time that took (s from the connect); ``reset``: connections opened
    again (``repeat``) that were reset before their connect returned (past
    ``max_connections``, the server resets them at accept), each tried
    again 0.1 s later."""
    answered = opened = reset = 0
    took: list[float] = []
    end = trio.current_time() + seconds

    async def one(index: int) -> None:
        nonlocal opened, reset
        while True:
            try:
                stream = await connect(host, port, f"127.0.2.{index % 8 + 1}")
            except ConnectionResetError:
                if not (repeat and trio.current_time() < end):
                    raise
                reset += 1
                await trio.sleep(0.1)
            else:
                break
        opened += 1
        # From the connect, as the server's idle timer: the task below may
        # start later on a loaded machine, which made the close look early.
        nursery.start_soon(slow, index, stream, trio.current_time())

    async def slow(index: int, stream: trio.SocketStream, started: float) -> None:
        nonlocal answered
        async with stream:
            try:
                for byte in SLOW_HEAD:
                    await stream.send_all(bytes([byte]))
                    with trio.move_on_after(1.0):
                        if await stream.receive_some(65536):
                            answered += 1
                        break  # closed (or, wrongly, answered)
            except trio.BrokenResourceError:
                pass
        took.append(trio.current_time() - started)
        if repeat and trio.current_time() < end:
            await one(index)

    with trio.move_on_after(seconds):
        async with trio.open_nursery() as nursery:
            await _many(count, 200, one)
    return {
        "connections": opened,
        "answered": answered,
        "closed": len(took),
        "first_closed": min(took, default=0.0),
        "last_closed": max(took, default=0.0),
        "reset": reset,
    }


# The largest answer the service gives: a redirect whose Location forwards a
# path of 16,000 '"' (a head h11 never refuses for its size), each
# percent-encoded to %22: 48 KB. 22 of them make more than 1 MB.
HEAVY = b"GET /docs/" + b'"' * 16000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"
HEAVY_REQUESTS = 22


async def never_read(host: str, port: int, count: int, seconds: float, repeat: bool) -> Result:
    """``count`` connections from 127.0.3.1 with a 4 KB receive buffer each
    send 22 requests for the largest answer (1.06 MB of answers in all) and
    never read; each waits for the server to close it (or ``seconds``; with
    ``repeat``, each closed one is opened again until then).
    ``connections``: those opened; ``ended``: those the server closed."""
    ended = opened = 0
    end = trio.current_time() + seconds

    async def one(index: int) -> None:
        while True:
            await once()
            if not repeat or trio.current_time() >= end:
                return

    async def once() -> None:
        nonlocal ended, opened
        stream = await connect(host, port, "127.0.3.1", receive_buffer=4096)
        opened += 1
        async with stream:
            with suppress(trio.BrokenResourceError):
                await stream.send_all(HEAVY * HEAVY_REQUESTS)  # ends when the server aborts
            await trio.sleep(1.0)  # then read what is left: EOF, or the reset
            with suppress(trio.BrokenResourceError):
                while await stream.receive_some(1 << 20):
                    pass
            ended += 1

    with trio.move_on_after(seconds):
        await _many(count, count, one)
    return {"connections": opened, "ended": ended}


async def one_address(host: str, port: int, count: int, seconds: float, repeat: bool) -> Result:
    """``count`` connections from 127.0.6.1, each asking for one redirect,
    the answered ones held for ``seconds`` (with ``repeat``, the refused
    ones are tried again until then). ``hits``: the ids answered;
    ``refused``: connections closed or reset unanswered."""
    hits: list[str] = []
    refused = 0
    held: list[trio.SocketStream] = []

    async def one(index: int) -> None:
        nonlocal refused
        while True:
            try:
                stream = await connect(host, port, "127.0.6.1")
            except OSError:  # reset before the connect returned
                hit = None
            else:
                hit = await request(stream, "/docs/many")
                if hit is None:
                    await stream.aclose()
                else:
                    hits.append(hit)
                    held.append(stream)
                    return
            refused += 1
            if not repeat:
                return
            await trio.sleep(0.01)

    with trio.move_on_after(seconds):
        await _many(count, 100, one)
        await trio.sleep(seconds)
    for stream in held:
        await stream.aclose()
    return {"connections": count, "hits": hits, "refused": refused}


class H2Attacker:
    """An HTTP/2 client (h2, prior knowledge) on one connection, keeping what
    the server did with its streams."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        self.h2.initiate_connection()
        self.hits: list[str] = []  # x-hit-id of each 301
        self.refused = 0  # RST_STREAM REFUSED_STREAM received
        self.goaway: int | None = None  # the GOAWAY's error code
        self.closed = False  # the server closed the connection
        self._sending = trio.Lock()

    def get(self, path: str, *, reset: bool = False) -> None:
        stream_id = self.h2.get_next_available_stream_id()
        headers = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"x")]
        self.h2.send_headers(stream_id, [*headers, (b":path", path.encode())], end_stream=True)
        if reset:
            self.h2.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)

    async def flush(self) -> None:
        """Send what is queued (nothing once the server has closed)."""
        async with self._sending:
            with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await self.stream.send_all(self.h2.data_to_send())

    async def read_until_closed(self) -> None:
        """Read what the server sends until it closes the connection."""
        with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while data := await self.stream.receive_some(65536):
                for event in self.h2.receive_data(data):
                    if isinstance(event, h2.events.ResponseReceived):
                        headers = dict(event.headers or [])
                        if headers[b":status"] != b"301":
                            raise AssertionError(headers)
                        self.hits.append(headers[b"x-hit-id"].decode())
                    elif isinstance(event, h2.events.StreamReset):
                        if event.error_code == h2.errors.ErrorCodes.REFUSED_STREAM:
                            self.refused += 1
                    elif isinstance(event, h2.events.ConnectionTerminated):
                        self.goaway = event.error_code
                await self.flush()
        self.closed = True


def _h2_result(clients: list[H2Attacker]) -> Result:
    return {
        "connections": len(clients),
        "goaways": [client.goaway for client in clients],
        "refused": sum(client.refused for client in clients),
        "hits": [hit for client in clients for hit in client.hits],
    }


FLOOD_STREAMS = 1000


async def h2_flood(host: str, port: int, count: int, seconds: float, repeat: bool) -> Result:
    """For ``seconds``, ``count`` clients each open HTTP/2 connections one
    after the other, with 1,000 streams on each sent in one write, and read
    each until the server closes it (``repeat`` changes nothing).
    ``goaways``: each connection's GOAWAY error code (None: none came);
    ``refused``: REFUSED_STREAM resets seen; ``hits``: the ids answered."""
    clients: list[H2Attacker] = []

    async def one(index: int) -> None:
        end = trio.current_time() + seconds
        while trio.current_time() < end:
            client = H2Attacker(await connect(host, port, "127.0.4.1"))
            clients.append(client)
            async with client.stream:
                for n in range(FLOOD_STREAMS):
                    client.get(f"/docs/flood{index}-{n}")
                await client.flush()
                with trio.move_on_after(30):
                    await client.read_until_closed()

    await _many(count, count, one)
    return _h2_result(clients)


async def rapid_reset(host: str, port: int, count: int, seconds: float, repeat: bool) -> Result:
    """For ``seconds``, ``count`` clients each open HTTP/2 connections one
    after the other and on each open and reset streams as fast as they can
    (CVE-2023-44487), 500 a write, until the server closes it (or 10 s;
    the last one may end after ``seconds``; ``repeat`` changes nothing).
    Results as for ``h2_flood``."""
    clients: list[H2Attacker] = []

    async def one(index: int) -> None:
        end = trio.current_time() + seconds
        while trio.current_time() < end:
            client = H2Attacker(await connect(host, port, "127.0.5.1"))
            clients.append(client)
            async with client.stream, trio.open_nursery() as nursery:
                nursery.start_soon(client.read_until_closed)
                # Every connection opened is reset until the server ends it,
                # even past ``end``: stopping at ``end`` left a connection
                # opened just before it with no resets sent, hence no GOAWAY
                # (what CI saw as one None in ``goaways``).
                with trio.move_on_after(10):
                    while not client.closed and client.goaway is None:
                        for n in range(500):
                            client.get(f"/docs/rapid{index}-{n}", reset=True)
                        await client.flush()
                nursery.cancel_scope.deadline = trio.current_time() + 10

    await _many(count, count, one)
    return _h2_result(clients)


ATTACKS: dict[str, Callable[[str, int, int, float, bool], Awaitable[Result]]] = {
    "idle": idle,
    "slowloris": slowloris,
    "never_read": never_read,
    "one_address": one_address,
    "h2_flood": h2_flood,
    "rapid_reset": rapid_reset,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=sorted(ATTACKS))
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("--count", type=int, required=True, help="connections, or clients")
    parser.add_argument("--seconds", type=float, required=True, help="how long, at most")
    parser.add_argument(
        "--repeat", action="store_true", help="open a connection again once it is closed"
    )
    args = parser.parse_args()
    raise_descriptor_limit(args.count + 1000)
    attack = ATTACKS[args.kind]
    result = trio.run(attack, args.host, args.port, args.count, args.seconds, args.repeat)
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
