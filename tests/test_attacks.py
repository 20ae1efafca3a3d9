"""Attacks on the connection limits (docs/http.md#under-attack), from raw
sockets and real HTTP/2 clients on loopback, each bounded in count and time,
against ``redirect-logger serve`` in a process of its own, on Apache Kafka.

Beside each attack, ordinary clients (keep-alive connections opened before
it, and a client that opens a new connection per request) ask for
redirects: each request must be answered 301 within the latency bound that
docs/http.md states, read from there. Every answered hit is in the
topic, by its id; the topic holds each record once, as many as the ledger
delivered, and the ledger adds up. The counts of /metrics are checked
exactly against what the attackers saw.

Marked ``attacks``: CI runs them once, on Apache Kafka.
"""

from __future__ import annotations

import json
import re
import resource
import sys
import time
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h2.errors
import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from brokers import Broker, free_port
from support import (
    ROOT,
    ServiceProcess,
    explain_missing,
    read_topic,
    service_config,
    unique_topic,
    write_config,
)

pytestmark = pytest.mark.attacks

_BOUND = re.compile(r"ordinary client's request is answered within ([\d.]+) s")


def documented_bound() -> float:
    """The latency bound under attack that docs/http.md states (s)."""
    found = _BOUND.search((ROOT / "docs" / "http.md").read_text())
    assert found is not None, "docs/http.md states no latency bound under attack"
    return float(found.group(1))


BOUND = documented_bound()
HIT_ID = re.compile(rb"x-hit-id: ([0-9a-f-]+)", re.IGNORECASE)
KEEPALIVE = 4  # ordinary keep-alive connections
PACE = 0.02  # s between an ordinary client's requests


def raise_descriptor_limit(needed: int) -> None:
    """Raise this process's soft RLIMIT_NOFILE (which the service and the
    attackers inherit) to ``needed``; fails when the hard limit is lower."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        assert hard == resource.RLIM_INFINITY or hard >= needed, (
            f"the attack tests need {needed} file descriptors; the hard limit is {hard}"
        )
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


async def attack(attacked: Attacked, kind: str, count: int, seconds: float) -> dict[str, Any]:
    """Run attack ``kind`` of tests/attackers.py (in a process of its own) on
    the service: what the attackers saw."""
    command = [sys.executable, str(ROOT / "tests" / "attackers.py"), kind, attacked.host]
    command += [str(attacked.port), "--count", str(count), "--seconds", str(seconds)]
    with trio.fail_after(seconds + 60):
        done = await trio.run_process(command, capture_stdout=True, capture_stderr=True)
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def counters(text: str, name: str) -> dict[str, int]:
    """The samples of counter ``name`` (with ``_total``) by their reason label."""
    return {
        sample.labels["reason"]: int(sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    }


def gauge(text: str, name: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    raise AssertionError(f"{name} not exported")


@dataclass
class Attacked:
    """A service under attack: its public and admin URLs, what its ordinary
    clients saw, and the hit ids the attackers were answered."""

    service: ServiceProcess
    host: str
    port: int
    admin: str
    latencies: list[float] = field(default_factory=list)
    ordinary: set[str] = field(default_factory=set)
    attackers: set[str] = field(default_factory=set)

    async def metrics(self) -> str:
        async with httpx.AsyncClient(base_url=self.admin, timeout=10) as client:
            return (await client.get("/metrics")).text


async def request(stream: trio.SocketStream, path: str) -> str:
    """One GET on ``stream``: the hit id of its 301 (the answer has no body)."""
    await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(65536)
        assert chunk, f"{path}: closed unanswered after {data!r}"
        data += chunk
    assert data.startswith(b"HTTP/1.1 301 "), data
    found = HIT_ID.search(data)
    assert found is not None, data
    return found.group(1).decode()


async def ordinary_load(attacked: Attacked, done: trio.Event, *, fresh: bool) -> None:
    """Ordinary clients from 127.0.0.2 until ``done``: KEEPALIVE keep-alive
    connections opened first, and with ``fresh`` one client that opens a
    connection per request. Each request's latency and hit id are kept."""
    host, port = attacked.host, attacked.port

    async def timed(stream: trio.SocketStream, path: str) -> None:
        started = time.perf_counter()
        attacked.ordinary.add(await request(stream, path))
        attacked.latencies.append(time.perf_counter() - started)

    async def keepalive(stream: trio.SocketStream, index: int) -> None:
        async with stream:
            n = 0
            while not done.is_set():
                n += 1
                await timed(stream, f"/docs/k{index}-{n}")
                await trio.sleep(PACE)

    async def new_connections() -> None:
        n = 0
        while not done.is_set():
            n += 1
            started = time.perf_counter()
            stream = await trio.open_tcp_stream(host, port, local_address="127.0.0.2")
            async with stream:
                attacked.ordinary.add(await request(stream, f"/docs/f{n}"))
            attacked.latencies.append(time.perf_counter() - started)
            await trio.sleep(PACE)

    streams = [
        await trio.open_tcp_stream(host, port, local_address="127.0.0.2") for _ in range(KEEPALIVE)
    ]
    async with trio.open_nursery() as nursery:
        for index, stream in enumerate(streams):
            nursery.start_soon(keepalive, stream, index)
        if fresh:
            nursery.start_soon(new_connections)


async def under_attack(
    attacked: Attacked, attack: Callable[[], Awaitable[None]], *, fresh: bool = True
) -> None:
    """Ordinary load from before ``attack`` starts until it has ended; then
    every ordinary request was answered within BOUND."""
    done = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: ordinary_load(attacked, done, fresh=fresh))
        await trio.sleep(0.5)
        await attack()
        done.set()
    assert len(attacked.latencies) > 100, len(attacked.latencies)
    worst = max(attacked.latencies)
    assert worst <= BOUND, f"an ordinary request took {worst * 1000:.0f} ms (bound {BOUND} s)"
    print(
        f"ordinary requests: {len(attacked.latencies)}, max {worst * 1000:.1f} ms,"
        f" p99 {sorted(attacked.latencies)[int(len(attacked.latencies) * 0.99)] * 1000:.1f} ms"
    )


def launch(broker: Broker, tmp_path: Path, topic: str, **server: Any) -> Attacked:
    """``redirect-logger serve`` with these ``[server]`` keys, an admin port
    (not held to the limits), ready."""
    port, admin_port = free_port(), free_port()
    settings = {
        "bind": [f"127.0.0.1:{port}"],
        "admin_bind": [f"127.0.0.1:{admin_port}"],
        **server,
    }
    config = service_config(broker.bootstrap, topic, server=settings)
    service = ServiceProcess.cli(write_config(tmp_path / "attack.toml", config))
    admin = f"http://127.0.0.1:{admin_port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with suppress(httpx.TransportError):
            if httpx.get(f"{admin}/readyz", timeout=5).status_code == 200:
                return Attacked(service, "127.0.0.1", port, admin)
        if service.process.poll() is not None:
            break
        time.sleep(0.2)
    service.kill()
    raise AssertionError(f"not ready within 60 s:\n{service.output}")


async def stopped_and_recorded(attacked: Attacked, broker: Broker, topic: str) -> None:
    """SIGTERM: exit 0 with a clean ledger; the topic holds each delivered
    record once, among them every hit answered to an ordinary client or an
    attacker."""
    service = attacked.service
    code = await trio.to_thread.run_sync(service.terminate)
    assert code == 0, service.output
    [ledger] = service.ledgers()
    assert ledger["received"] == ledger["delivered"], ledger
    assert ledger["failed"] == ledger["dropped"] == ledger["shed"] == ledger["in_flight"] == 0
    answered = attacked.ordinary | attacked.attackers

    def explained(what: str) -> str:
        return f"{what}; {ledger}\n" + explain_missing(broker, topic, answered, service.output)

    try:
        records = await trio.to_thread.run_sync(
            lambda: read_topic(broker.bootstrap, topic, timeout=60, expected=ledger["delivered"])
        )
    except AssertionError as exc:
        raise AssertionError(await trio.to_thread.run_sync(explained, str(exc))) from None
    ids = [record["id"] for record in records]
    if not (len(ids) == len(set(ids)) == ledger["delivered"]) or answered - set(ids):
        raise AssertionError(
            await trio.to_thread.run_sync(explained, f"{len(ids)} records, {len(set(ids))} ids")
        )


IDLE_MAX = 2000


async def test_idle_connections_up_to_twice_max_connections(
    kafka_broker: Broker, tmp_path: Path
) -> None:
    """max_connections = 2,000: 4,000 idle connections from 16 addresses
    (250 each, under max_connections_per_ip) fill it; the ones past it are
    reset, and the admitted ones closed after idle_timeout (8 s): each
    counted once, by its reason. The ordinary keep-alive connections, open
    before the flood, are answered throughout within the bound; once the
    flood is closed, a new connection is answered again."""
    attempts = 2 * IDLE_MAX
    raise_descriptor_limit(attempts + IDLE_MAX + 2000)
    topic = unique_topic()
    attacked = launch(kafka_broker, tmp_path, topic, max_connections=IDLE_MAX, idle_timeout=8.0)
    try:
        seen: dict[str, Any] = {}

        async def flood() -> None:
            seen.update(await attack(attacked, "idle", attempts, 30.0))

        await under_attack(attacked, flood, fresh=False)
        text = await attacked.metrics()
        refused = counters(text, "redirect_logger_connections_refused_total")
        closed = counters(text, "redirect_logger_connections_closed_total")
        assert refused["max_connections"] + closed["idle_timeout"] == attempts, (refused, closed)
        assert refused["max_connections"] >= attempts - IDLE_MAX, refused
        assert refused["max_connections_per_ip"] == 0, refused
        with trio.fail_after(10):
            stream = await trio.open_tcp_stream(attacked.host, attacked.port)
            async with stream:
                attacked.ordinary.add(await request(stream, "/docs/after"))
    finally:
        await stopped_and_recorded(attacked, kafka_broker, topic)
    print(f"idle flood: {seen}, refused {refused}, closed {closed}")


SLOW = 2000
SLOW_TIMEOUT = 6.0


async def test_slowloris_connections_sending_a_header_byte_a_second(
    kafka_broker: Broker, tmp_path: Path
) -> None:
    """2,000 connections from 8 addresses send a request head one byte a
    second, never completing it: each is closed unanswered after
    idle_timeout (6 s), counted as idle_timeout, while ordinary clients, on
    open and on new connections, are answered within the bound."""
    raise_descriptor_limit(2 * SLOW + 2000)
    topic = unique_topic()
    attacked = launch(kafka_broker, tmp_path, topic, idle_timeout=SLOW_TIMEOUT)
    try:
        seen: dict[str, Any] = {}

        async def slowloris() -> None:
            seen.update(await attack(attacked, "slowloris", SLOW, SLOW_TIMEOUT + 30))

        await under_attack(attacked, slowloris)
        closed = counters(await attacked.metrics(), "redirect_logger_connections_closed_total")
        assert closed == {"idle_timeout": SLOW, "send_timeout": 0}
        assert (seen["answered"], seen["closed"]) == (0, SLOW), seen
        assert SLOW_TIMEOUT - 0.5 < seen["first_closed"] <= seen["last_closed"] < SLOW_TIMEOUT + 10
    finally:
        await stopped_and_recorded(attacked, kafka_broker, topic)
    print(f"slowloris: {seen}")


READERS = 100


async def test_clients_that_never_read_a_megabyte_of_answers(
    kafka_broker: Broker, tmp_path: Path
) -> None:
    """100 connections with a 4 KB receive buffer each ask for 22 of the
    largest answers the service gives (48 KB each, a redirect with a long
    Location; no answer of the service has a 1 MB body), 1.06 MB in all,
    and never read: each is aborted by send_timeout (2 s) and counted as
    send_timeout; ordinary clients are answered within the bound."""
    topic = unique_topic()
    attacked = launch(kafka_broker, tmp_path, topic, send_timeout=2.0)
    try:
        seen: dict[str, Any] = {}

        async def never_read() -> None:
            seen.update(await attack(attacked, "never_read", READERS, 30.0))

        await under_attack(attacked, never_read)
        closed = counters(await attacked.metrics(), "redirect_logger_connections_closed_total")
        assert closed == {"idle_timeout": 0, "send_timeout": READERS}, closed
        assert seen["ended"] == READERS, seen
    finally:
        await stopped_and_recorded(attacked, kafka_broker, topic)


ONE_ADDRESS = 1000
PER_IP = 256


async def test_many_connections_from_one_address(kafka_broker: Broker, tmp_path: Path) -> None:
    """1,000 connections from 127.0.6.1, each asking for one redirect and
    then held: 256 (max_connections_per_ip) are answered and recorded, the
    744 others reset unanswered and counted; ordinary clients from another
    address, on open and on new connections, are answered within the bound."""
    raise_descriptor_limit(2 * ONE_ADDRESS + 2000)
    topic = unique_topic()
    attacked = launch(kafka_broker, tmp_path, topic, max_connections_per_ip=PER_IP)
    try:
        seen: dict[str, Any] = {}

        async def from_one_address() -> None:
            seen.update(await attack(attacked, "one_address", ONE_ADDRESS, 2.0))

        await under_attack(attacked, from_one_address)
        refused = counters(await attacked.metrics(), "redirect_logger_connections_refused_total")
        assert refused == {
            "max_connections": 0,
            "max_connections_per_ip": ONE_ADDRESS - PER_IP,
            "h2_resets": 0,
        }
        assert (len(seen["hits"]), seen["refused"]) == (PER_IP, ONE_ADDRESS - PER_IP)
        attacked.attackers |= set(seen["hits"])
    finally:
        await stopped_and_recorded(attacked, kafka_broker, topic)


CALM = h2.errors.ErrorCodes.ENHANCE_YOUR_CALM


async def test_http2_stream_floods(kafka_broker: Broker, tmp_path: Path) -> None:
    """For 5 s, 10 clients each open HTTP/2 connections one after the other
    and 1,000 streams on each in one write: the write would have 900
    streams refused past h2_max_concurrent_streams (100), over 200 in a
    second (h2_max_resets_per_second), so each connection gets GOAWAY
    ENHANCE_YOUR_CALM before the write is decoded. The refusals and
    GOAWAYs the flooders saw are the ones counted; the streams they were
    answered are recorded; ordinary clients are answered within the
    bound."""
    topic = unique_topic()
    attacked = launch(kafka_broker, tmp_path, topic)
    try:
        seen: dict[str, Any] = {}

        async def flood() -> None:
            seen.update(await attack(attacked, "h2_flood", 10, 5.0))

        await under_attack(attacked, flood)
        text = await attacked.metrics()
        assert seen["goaways"] == [CALM] * seen["connections"], seen["goaways"]
        resets = counters(text, "redirect_logger_connections_refused_total")["h2_resets"]
        assert resets == seen["connections"] >= 10
        assert gauge(text, "redirect_logger_h2_streams_refused_total") == seen["refused"]
        attacked.attackers |= set(seen["hits"])
    finally:
        await stopped_and_recorded(attacked, kafka_broker, topic)
    print(
        f"flood: {seen['connections']} connections, {len(seen['hits'])} streams answered,"
        f" {seen['refused']} refused"
    )


async def test_http2_rapid_resets(kafka_broker: Broker, tmp_path: Path) -> None:
    """For 8 s, 4 clients open and reset streams as fast as they can
    (CVE-2023-44487), 500 a write, on connection after connection: each
    connection gets GOAWAY ENHANCE_YOUR_CALM, counted once as h2_resets;
    ordinary clients are answered within the bound, and every request the
    service read before a GOAWAY is recorded."""
    topic = unique_topic()
    attacked = launch(kafka_broker, tmp_path, topic)
    try:
        seen: dict[str, Any] = {}

        async def rapid_reset() -> None:
            seen.update(await attack(attacked, "rapid_reset", 4, 8.0))

        await under_attack(attacked, rapid_reset)
        refused = counters(await attacked.metrics(), "redirect_logger_connections_refused_total")
        assert seen["goaways"] == [CALM] * seen["connections"], seen["goaways"]
        assert refused["h2_resets"] == seen["connections"] >= 4
    finally:
        await stopped_and_recorded(attacked, kafka_broker, topic)
    print(f"rapid reset: {seen['connections']} connections closed by GOAWAY")
