"""Two ``serve`` instances behind HAProxy (config/haproxy/haproxy.cfg, run as
it is): a rolling restart under load fails no request and loses or doubles no
record. Also what the recipe relies on: its check arithmetic, and an instance
never handling a request it then leaves unanswered as its idle connections
close. The recipe is docs/deployment.md#many-instances-behind-a-load-balancer.
"""

from __future__ import annotations

import csv
import re
import shutil
import socket
from collections import Counter
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import trio

from brokers import Broker, free_port
from support import (
    BIND_RE,
    ROOT,
    ServiceProcess,
    read_messages,
    service_config,
    start_service,
    unique_topic,
    unreachable_config,
    write_config,
)

pytestmark = [pytest.mark.integration, pytest.mark.faults]

HAPROXY_CFG = ROOT / "config" / "haproxy" / "haproxy.cfg"
BACKEND = "redirect_logger"
SHUTDOWN_DELAY = 4.0  # s, as docs/deployment.md recommends for this haproxy.cfg
KEEP_ALIVE_CLIENTS = 4  # each on one keep-alive connection to HAProxy
NEW_CONNECTION_CLIENTS = 2  # each opening a new connection per request
RATE = 60.0  # requests/s per client, at most
SETTLE = 2.0  # s of load before the first restart and after the last one


def _seconds(value: str) -> float:
    number, unit = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s)", value).groups()  # type: ignore[union-attr]
    return float(number) / (1000 if unit == "ms" else 1)


def test_shutdown_delay_outlasts_the_checks_that_take_an_instance_out() -> None:
    """The arithmetic of docs/deployment.md, on the file's own numbers: once
    /readyz answers 503, the next check comes within ``inter``, each further
    one ``fastinter`` after the last, each takes at most ``timeout check``,
    and the ``fall``-th failed check marks the instance DOWN. Its listeners
    must stay open that long."""
    text = HAPROXY_CFG.read_text()
    server = dict(re.findall(r"\b(inter|fastinter|fall) (\S+)", text))
    timeout_check = _seconds(re.search(r"timeout check (\S+)", text).group(1))  # type: ignore[union-attr]
    fall = int(server["fall"])
    worst = _seconds(server["inter"]) + (fall - 1) * _seconds(server["fastinter"])
    worst += fall * timeout_check
    assert worst == 3.25
    assert worst < SHUTDOWN_DELAY
    assert "retry-on conn-failure\n" in text  # never a retry of a request sent


def _stats(path: Path) -> dict[str, dict[str, str]]:
    """HAProxy's ``show stat`` for the backend's servers, by server name."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(str(path))
        sock.sendall(b"show stat\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    lines = b"".join(chunks).decode().removeprefix("# ").splitlines()
    return {row["svname"]: row for row in csv.DictReader(lines) if row["pxname"] == BACKEND}


@dataclass
class Balancer:
    process: ServiceProcess
    stats_socket: Path

    async def stats(self) -> dict[str, dict[str, str]]:
        return await trio.to_thread.run_sync(_stats, self.stats_socket)

    async def wait_status(self, server: str, up: bool) -> float:
        """Waits until HAProxy has ``server`` UP (checked) or DOWN; returns when
        (trio time). The caller sets the time limit."""
        while True:
            assert self.process.process.poll() is None, self.process.output
            try:
                row = (await self.stats())[server]
            except (FileNotFoundError, ConnectionRefusedError):  # HAProxy still starting
                row = {"status": "", "check_status": ""}
            if up and row["status"] == "UP" and row["check_status"] == "L7OK":
                return trio.current_time()
            if not up and row["status"].startswith("DOWN"):
                return trio.current_time()
            await trio.sleep(0.05)


@dataclass
class Load:
    """What the clients saw."""

    sent: int = 0
    answered: dict[str, str] = field(default_factory=dict)  # X-Hit-Id -> path
    failures: list[str] = field(default_factory=list)


async def _client(url: str, name: str, keep_alive: bool, load: Load, stop: trio.Event) -> None:
    """Requests at up to RATE per second until ``stop``; every failure is noted."""
    limits = httpx.Limits(max_keepalive_connections=None if keep_alive else 0)
    async with httpx.AsyncClient(base_url=url, timeout=5.0, limits=limits) as client:
        n = 0
        slot = trio.current_time()
        while not stop.is_set():
            n += 1
            path = f"/docs/{name}-{n}"
            load.sent += 1
            try:
                response = await client.get(path)
            except httpx.HTTPError as exc:
                load.failures.append(f"{path}: {exc!r}")
                continue
            hit_id = response.headers.get("x-hit-id")
            if response.status_code != 301 or hit_id is None or hit_id in load.answered:
                load.failures.append(f"{path}: {response.status_code} {hit_id}")
            else:
                load.answered[hit_id] = path
            slot += 1 / RATE
            await trio.sleep_until(slot)


@dataclass
class Instance:
    name: str
    config: Path
    lives: list[ServiceProcess] = field(default_factory=list)

    def start(self) -> None:
        self.lives.append(ServiceProcess.cli(self.config))

    async def listening(self) -> None:
        """Both its listeners (public, admin) are bound."""
        life = self.lives[-1]
        await trio.to_thread.run_sync(lambda: life.wait_for(BIND_RE, 2, 60))


@dataclass
class Restart:
    down: float  # s from SIGTERM until HAProxy had the instance DOWN
    exit: float  # s from SIGTERM until the process had exited
    up: float  # s from the new start until HAProxy had it UP


async def _restart(instance: Instance, balancer: Balancer) -> Restart:
    """SIGTERM, wait for the exit (code 0), start again, wait until HAProxy has it UP."""
    life = instance.lives[-1]
    sigterm = trio.current_time()
    life.process.terminate()
    with trio.fail_after(10):
        down = await balancer.wait_status(instance.name, up=False)
    code = await trio.to_thread.run_sync(life.wait, 30.0)
    exited = trio.current_time()
    assert code == 0, life.output
    started = trio.current_time()
    instance.start()
    with trio.fail_after(60):
        up = await balancer.wait_status(instance.name, up=True)
    return Restart(down - sigterm, exited - sigterm, up - started)


async def test_a_rolling_restart_under_load_fails_no_request_and_loses_no_hit(
    kafka_broker: Broker, tmp_path: Path
) -> None:
    haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
    topic = unique_topic()
    env = {
        "HAPROXY_BIND": f"127.0.0.1:{free_port()}",
        "HAPROXY_STATS_SOCKET": str(tmp_path / "haproxy.sock"),
    }
    instances = []
    for name in ("app1", "app2"):
        port, admin = free_port(), free_port()
        env[f"{name.upper()}_ADDR"] = f"127.0.0.1:{port}"
        env[f"{name.upper()}_ADMIN_PORT"] = str(admin)
        server = {
            "bind": [f"127.0.0.1:{port}"],
            "admin_bind": [f"127.0.0.1:{admin}"],
            "shutdown_delay": SHUTDOWN_DELAY,
            "trusted_proxies": ["127.0.0.1/32"],
        }
        config = service_config(kafka_broker.bootstrap, topic, server=server)
        instances.append(Instance(name, write_config(tmp_path / f"{name}.toml", config)))
    balancer = Balancer(
        ServiceProcess([haproxy, "-f", str(HAPROXY_CFG), "-db"], env=env),
        tmp_path / "haproxy.sock",
    )
    load = Load()
    restarts = []
    try:
        with trio.fail_after(150):
            for instance in instances:
                instance.start()
            for instance in instances:
                await instance.listening()
            for instance in instances:
                await balancer.wait_status(instance.name, up=True)
            stop = trio.Event()
            async with trio.open_nursery() as nursery:
                url = f"http://{env['HAPROXY_BIND']}"
                for index in range(KEEP_ALIVE_CLIENTS + NEW_CONNECTION_CLIENTS):
                    keep_alive = index < KEEP_ALIVE_CLIENTS
                    name = f"{'k' if keep_alive else 'n'}{index}"
                    nursery.start_soon(_client, url, name, keep_alive, load, stop)
                await trio.sleep(SETTLE)
                for instance in instances:
                    restarts.append(await _restart(instance, balancer))
                await trio.sleep(SETTLE)
                stop.set()
            stats = await balancer.stats()
            for instance in instances:  # both drain at once
                instance.lives[-1].process.terminate()
            for instance in instances:
                assert await trio.to_thread.run_sync(instance.lives[-1].wait, 30.0) == 0
    finally:
        for instance in instances:
            for life in instance.lives:
                life.kill()
        balancer.process.kill()
    counters = ("stot", "econ", "eresp", "wretr", "wredis", "hrsp_5xx")
    print(f"\nsent {load.sent}, answered {len(load.answered)}, failed {len(load.failures)}")
    print("restarts (s):", restarts)
    print("haproxy:", {name: {key: row[key] for key in counters} for name, row in stats.items()})
    assert load.failures == [], (load.failures[:20], balancer.process.output)
    assert load.sent == len(load.answered) > 0
    # HAProxy never met a refused connection or a cut response, so retried nothing.
    assert [stats["BACKEND"][key] for key in counters[1:]] == ["0"] * 5, balancer.process.output

    ledgers = []
    for instance in instances:
        for life in instance.lives:
            [ledger] = life.ledgers()
            assert ledger["received"] == ledger["delivered"] > 0, (instance.name, ledger)
            assert ledger["in_flight"] == ledger["failed"] == ledger["spilled"] == 0
            ledgers.append(ledger)
    delivered = sum(ledger["delivered"] for ledger in ledgers)
    records = await trio.to_thread.run_sync(
        lambda: read_messages(kafka_broker.bootstrap, topic, expected=delivered)
    )
    ids = Counter(read.record["id"] for read in records)
    assert [hit for hit, count in ids.items() if count > 1] == []  # no duplicate
    assert set(load.answered) - set(ids) == set()  # no answered hit missing
    assert set(ids) - set(load.answered) == set()  # no record of an unanswered hit
    assert len(records) == delivered == len(load.answered)
    assert all(read.record["path"] == load.answered[read.record["id"]] for read in records)
    for restart in restarts:
        assert restart.down < SHUTDOWN_DELAY  # out of the pool before its listeners closed


REQUEST = b"GET /docs/x HTTP/1.1\r\nHost: a\r\n\r\n"
CONNECTIONS = 40


async def _read(stream: trio.SocketStream, until_closed: bool) -> bytes:
    """The answer's head (a redirect has no body), or everything until the
    server closes (b"" when it closed unanswered)."""
    answer = b""
    with suppress(trio.BrokenResourceError):
        while chunk := await stream.receive_some():
            answer += chunk
            if not until_closed and answer.endswith(b"\r\n\r\n"):
                break
    return answer


async def _requests_meet_the_shutdown() -> tuple[int, int, int]:
    """One in-process instance (Kafka unreachable: hits are journaled).
    CONNECTIONS keep-alive connections, each answered once and idle; then a
    second request on each, the shutdown starting after half of them were
    sent. Returns (requests sent, answers read, hits received)."""
    stop = trio.Event()
    answers = []
    async with trio.open_nursery() as nursery:
        service, codes = await start_service(nursery, unreachable_config(), stop)
        host, port = service.binds[0].removeprefix("http://").rsplit(":", 1)
        streams = [await trio.open_tcp_stream(host, int(port)) for _ in range(CONNECTIONS)]
        for stream in streams:
            await stream.send_all(REQUEST)
            answers.append(await _read(stream, until_closed=False))
        for index, stream in enumerate(streams):
            await stream.send_all(REQUEST)
            if index == CONNECTIONS // 2:
                stop.set()
        for stream in streams:
            answers.append(await _read(stream, until_closed=True))
            await stream.aclose()
    assert codes == [0]
    answered = sum(answer.startswith(b"HTTP/1.1 301") for answer in answers)
    return 2 * CONNECTIONS, answered, service.ledger.received


async def test_a_request_that_meets_the_idle_close_is_answered_or_not_handled() -> None:
    """Hypercorn closes idle connections when its graceful shutdown begins; a
    request read meanwhile was handled (its hit recorded) and its answer sent
    to a closed socket: 13 hits in 10 rounds before server.py settled the race.
    Now every hit received was answered."""
    with trio.fail_after(60):
        rounds = [await _requests_meet_the_shutdown() for _ in range(5)]
    sent, answered, received = (sum(counts) for counts in zip(*rounds, strict=True))
    assert received == answered, rounds
    assert CONNECTIONS * 5 < answered < sent  # the shutdown closed some connections unanswered
