"""Limits for the open internet (docs/configuration.md#connection-limits), over
real sockets on loopback, in every launch mode.

- ``server.max_connections`` and ``server.max_connections_per_ip``: a
  connection past them is reset before Hypercorn reads it, counted in
  ``redirect_logger_connections_refused_total{reason}`` and logged; the
  connections admitted are answered and their hits recorded.
- ``server.idle_timeout``: an idle keep-alive connection is closed after it.
- ``server.send_timeout``: a client that does not read its answers is reset.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import inspect
import re
import signal
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

import httpx
import hypercorn.trio.run
import hypercorn.trio.tcp_server
import hypercorn.trio.worker_context
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from brokers import Broker, free_port
from support import (
    ServiceProcess,
    read_topic,
    service_config,
    start_service,
    unique_topic,
    write_config,
)

# The Hypercorn code server.py overrides, as it was when the overrides were
# written: a change to it fails this test, to be read before the pins move.
PINNED = {
    "TCPServer": "5593e38b83d3e22e6576f2cdf8faa5a265d8e0e3bd28d97bdacfbe8d781a90b3",
    "worker_serve": "8dc8347a9fc357ca334f8c3e4bcf0368176510a96d434f21a5eb4c9ec4103726",
    "WorkerContext": "45885f0c0bd5bc9d518c227f36f400e069f481c26a5ac6d1744f179d5a55ddbd",
}

GET = b"GET /docs/p HTTP/1.1\r\nHost: x\r\n\r\n"
HIT_ID = re.compile(rb"x-hit-id: ([0-9a-f-]+)", re.IGNORECASE)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples_of(text: str) -> Samples:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def refusals(samples: Samples) -> dict[str, int]:
    """``redirect_logger_connections_refused_total`` by reason."""
    return {
        dict(labels)["reason"]: int(value)
        for (name, labels), value in samples.items()
        if name == "redirect_logger_connections_refused_total"
    }


async def answered(url: str, local_address: str | None = None) -> tuple[trio.SocketStream, bytes]:
    """A new keep-alive connection whose first request was answered 301: the
    stream, still open, and the answer's hit id."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port), local_address=local_address)
    await stream.send_all(GET)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(65536)
        assert chunk, f"closed unanswered: {data!r}"
        data += chunk
    assert data.startswith(b"HTTP/1.1 301 "), data
    found = HIT_ID.search(data)
    assert found is not None, data
    return stream, found.group(1)


async def refused(url: str, local_address: str | None = None) -> bool:
    """Whether a new connection is closed, its request unanswered."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    try:
        stream = await trio.open_tcp_stream(host, int(port), local_address=local_address)
    except OSError:  # reset before the connect returned
        return True
    async with stream:
        try:
            await stream.send_all(GET)
            return await stream.receive_some(65536) == b""
        except trio.BrokenResourceError:  # reset
            return True


async def until_closed(stream: trio.SocketStream) -> None:
    """Until the server closes ``stream`` (EOF or reset), reading what it sends."""
    with suppress(trio.BrokenResourceError):
        while await stream.receive_some(65536):
            pass


def test_the_overridden_hypercorn_is_the_version_pinned() -> None:
    """server.py's guard overrides Hypercorn 0.18.0's trio ``TCPServer``,
    which ``worker_serve`` looks up by name: any change there may undo a limit."""
    assert importlib.metadata.version("hypercorn") == "0.18.0"
    sources = {
        obj.__qualname__: hashlib.sha256(inspect.getsource(obj).encode()).hexdigest()
        for obj in (
            hypercorn.trio.tcp_server.TCPServer,
            hypercorn.trio.run.worker_serve,
            hypercorn.trio.worker_context.WorkerContext,
        )
    }
    assert sources == PINNED
    assert "TCPServer," in inspect.getsource(hypercorn.trio.run.worker_serve)


async def test_connections_past_max_connections_are_reset_and_counted(broker: Broker) -> None:
    """max_connections = 20: 20 held connections are answered, 5 more are
    reset unanswered and counted; the admin port is not counted; once the
    20 close, new connections are answered again. Every answer's hit is
    delivered."""
    stop = trio.Event()
    server = {"max_connections": 20, "max_connections_per_ip": 0, "admin_bind": ["127.0.0.1:0"]}
    config = service_config(broker.bootstrap, unique_topic(), server=server)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            service, codes = await start_service(nursery, config, stop)
            url = service.binds[0]
            held = [await answered(url) for _ in range(20)]
            assert service.connections.open == 20
            assert [await refused(url) for _ in range(5)] == [True] * 5
            async with httpx.AsyncClient(base_url=service.admin_binds[0]) as admin:
                samples = samples_of((await admin.get("/metrics")).text)
            assert refusals(samples) == {
                "max_connections": 5,
                "max_connections_per_ip": 0,
                "h2_resets": 0,
            }
            assert samples[("redirect_logger_connections", ())] == 20
            for stream, _ in held:
                await stream.aclose()
            while service.connections.open:  # noqa: ASYNC110 (the server sees the closes)
                await trio.sleep(0.05)
            stream, _ = await answered(url)
            await stream.aclose()
            stop.set()
    assert codes == [0]
    ledger = service.ledger_snapshot()
    assert ledger["received"] == ledger["delivered"] == 21, ledger
    assert refusals(samples_of(service.metrics.exposition().decode()))["max_connections"] == 5


async def test_connections_past_max_connections_per_ip_are_reset_per_address(
    broker: Broker,
) -> None:
    """max_connections_per_ip = 3: the fourth connection from 127.0.0.1 is
    reset, while 127.0.0.2 still gets its three."""
    stop = trio.Event()
    server = {"max_connections": 20, "max_connections_per_ip": 3}
    config = service_config(broker.bootstrap, unique_topic(), server=server)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            service, codes = await start_service(nursery, config, stop)
            url = service.binds[0]
            first = [await answered(url, "127.0.0.1") for _ in range(3)]
            assert await refused(url, "127.0.0.1")
            assert await refused(url, "127.0.0.1")
            second = [await answered(url, "127.0.0.2") for _ in range(3)]
            assert await refused(url, "127.0.0.2")
            await first[0][0].aclose()
            while service.connections.open > 5:  # noqa: ASYNC110
                await trio.sleep(0.05)
            first[0] = await answered(url, "127.0.0.1")
            samples = samples_of(service.metrics.exposition().decode())
            for stream, _ in first + second:
                await stream.aclose()
            stop.set()
    assert codes == [0]
    assert refusals(samples) == {"max_connections": 0, "max_connections_per_ip": 3, "h2_resets": 0}
    ledger = service.ledger_snapshot()
    assert ledger["received"] == ledger["delivered"] == 7, ledger


def _launch(mode: str, path: Path, public: str, admin: str) -> ServiceProcess:
    if mode == "serve --workers 1":
        return ServiceProcess.cli(path, "--workers", "1")
    binds = (public.removeprefix("http://"), admin.removeprefix("http://"))
    return ServiceProcess.hypercorn(path, 1, binds)


def _until_ready(admin: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with suppress(httpx.TransportError):
            if httpx.get(f"{admin}/readyz", timeout=5).status_code == 200:
                return
        time.sleep(0.2)
    raise AssertionError(f"not ready within {timeout} s")


def _until_no_connections(admin: str, timeout: float = 10.0) -> None:
    """Until the service counts no open connection (the admin port's are not counted)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        samples = samples_of(httpx.get(f"{admin}/metrics", timeout=5).text)
        if samples[("redirect_logger_connections", ())] == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"connections still counted after {timeout} s")


@pytest.mark.parametrize("mode", ["serve --workers 1", "hypercorn"])
async def test_every_connection_limit_holds_in_both_launch_modes(
    broker: Broker, tmp_path: Path, mode: str
) -> None:
    """In a worker process of either launch mode: max_connections = 5 resets
    the 6th to 8th connections (counted in /metrics); idle_timeout = 3 s
    closes an idle connection; send_timeout = 1 s resets a connection whose
    answers go unread. The service then stops cleanly, every answered hit
    delivered."""
    port, admin_port = free_port(), free_port()
    public, admin = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}"
    topic = unique_topic()
    server: dict[str, Any] = {
        "bind": [f"127.0.0.1:{port}"],
        "admin_bind": [f"127.0.0.1:{admin_port}"],
        "max_connections": 5,
        "max_connections_per_ip": 0,
        "idle_timeout": 3.0,
        "send_timeout": 1.0,
    }
    path = write_config(tmp_path / "c.toml", service_config(broker.bootstrap, topic, server=server))
    service = _launch(mode, path, public, admin)
    ids: list[bytes] = []
    try:
        await trio.to_thread.run_sync(_until_ready, admin)
        with trio.fail_after(60):
            held = [await answered(public) for _ in range(5)]
            ids += [hit for _, hit in held]
            assert [await refused(public) for _ in range(3)] == [True] * 3
            for stream, _ in held:
                await stream.aclose()
            await trio.to_thread.run_sync(_until_no_connections, admin)

            idle, hit = await answered(public)
            ids.append(hit)
            started = trio.current_time()
            await until_closed(idle)
            assert 2.5 < trio.current_time() - started < 8
            await idle.aclose()

            host, _ = public.removeprefix("http://").rsplit(":", 1)
            stalled = await trio.open_tcp_stream(host, port)
            big = b"GET /docs/" + b"%FF" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"
            blocked = False
            while not blocked:  # until the socket buffers are full and sending blocks
                with trio.move_on_after(0.5) as sending:
                    await stalled.send_all(big)
                blocked = sending.cancelled_caught
            await trio.sleep(4)  # send_timeout, and the kernel's probes
            with pytest.raises(trio.BrokenResourceError):  # reset, not an idle close
                while await stalled.receive_some(1 << 20):
                    pass
            await stalled.aclose()

        async with httpx.AsyncClient(base_url=admin) as client:
            samples = samples_of((await client.get("/metrics")).text)
        assert refusals(samples)["max_connections"] == 3
    finally:
        code = await trio.to_thread.run_sync(service.terminate)
    assert code == 0, service.output
    [ledger] = service.ledgers()
    assert ledger["received"] == ledger["delivered"] >= 6, ledger
    assert ledger["failed"] == ledger["dropped"] == ledger["in_flight"] == 0, ledger
    records = await trio.to_thread.run_sync(
        lambda: read_topic(broker.bootstrap, topic, expected=ledger["delivered"])
    )
    assert {hit.decode() for hit in ids} <= {record["id"] for record in records}
    assert "connection refused (max_connections)" in service.output


@pytest.mark.parametrize("mode", ["serve", "hypercorn"])
async def test_a_stalled_send_cannot_hold_the_shutdown_past_the_graceful_timeout(
    broker: Broker, tmp_path: Path, mode: str
) -> None:
    """send_timeout = 60 s, and a client that never reads its answers: at SIGTERM
    its connection is reset when the graceful timeout (1 s; Hypercorn's
    --graceful-timeout 5 under hypercorn) runs out, not 60 s later, and the
    service exits 0 with every hit it received delivered."""
    port = free_port()
    server = {"bind": [f"127.0.0.1:{port}"], "graceful_timeout": 1.0, "send_timeout": 60.0}
    topic = unique_topic()
    path = write_config(tmp_path / "c.toml", service_config(broker.bootstrap, topic, server=server))
    if mode == "serve":
        service = ServiceProcess.cli(path)
        graceful = 1.0
    else:
        service = ServiceProcess.hypercorn(path, 1, (f"127.0.0.1:{port}",))
        graceful = 5.0
    try:
        await trio.to_thread.run_sync(_until_ready, f"http://127.0.0.1:{port}")
        with trio.fail_after(60):
            stalled = await trio.open_tcp_stream("127.0.0.1", port)
            big = b"GET /docs/" + b"%FF" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"
            blocked = False
            while not blocked:  # until the socket buffers are full and sending blocks
                with trio.move_on_after(0.5) as sending:
                    await stalled.send_all(big)
                blocked = sending.cancelled_caught
            started = time.monotonic()
            service.process.send_signal(signal.SIGTERM)
            code = await trio.to_thread.run_sync(service.wait)
            took = time.monotonic() - started
            with pytest.raises(trio.BrokenResourceError):  # reset
                while await stalled.receive_some(1 << 20):
                    pass
            await stalled.aclose()
    finally:
        service.kill()
    assert code == 0, service.output
    assert graceful < took < graceful + 8, f"{took:.1f} s; output:\n{service.output}"
    assert "graceful shutdown over: reset the connections still open (1)" in service.output
    [ledger] = service.ledgers()
    assert ledger["received"] == ledger["delivered"] >= 1, ledger
    assert ledger["failed"] == ledger["dropped"] == ledger["in_flight"] == 0, ledger
