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

import gzip
import hashlib
import importlib.metadata
import inspect
import re
import signal
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import httpx
import hypercorn.protocol
import hypercorn.protocol.h2
import hypercorn.trio.run
import hypercorn.trio.tcp_server
import hypercorn.trio.worker_context
import pytest
import trio
from hyperframe.frame import DataFrame, Frame, RstStreamFrame
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from brokers import Broker, free_port
from redirect_logger.app import create_app
from redirect_logger.config import parse_settings
from redirect_logger.hits import FIELD_LIMITS
from redirect_logger.http2 import _FrameScan, _H2Connection
from redirect_logger.limits import HEAVY_BYTES, HeavyLane
from redirect_logger.service import Service
from support import (
    ServiceProcess,
    never_read_until_reset,
    read_topic,
    service_config,
    start_service,
    unique_topic,
    unreachable_config,
    write_config,
)

# The Hypercorn (and h2) code server.py overrides or relies on, as it was when
# the overrides were written: a change to it fails this test, to be read
# before the pins move.
PINNED = {
    "TCPServer": "5593e38b83d3e22e6576f2cdf8faa5a265d8e0e3bd28d97bdacfbe8d781a90b3",
    "worker_serve": "8dc8347a9fc357ca334f8c3e4bcf0368176510a96d434f21a5eb4c9ec4103726",
    "WorkerContext": "45885f0c0bd5bc9d518c227f36f400e069f481c26a5ac6d1744f179d5a55ddbd",
    "ProtocolWrapper": "caf949187e9b4a816ad4a5f0229773ec01190a6051f6205807de599870c16c17",
    "H2Protocol": "7257f8bafccaa2e5677c63696eef2777854fd65f2721f3408c6c963398a15145",
    "H2Connection._receive_headers_frame": (
        "4a014e7d795a15a583ef2172f88dc19a9bac01edff850fd91eb69c5611b19fa5"
    ),
    "H2Connection.open_inbound_streams": (
        "1a867741031a252348b5a5ff4b50e3484f7c775e5404855c36a8574002a41eb1"
    ),
    # what http2.py does for a refused stream in h2's stead
    "H2Connection._begin_new_stream": (
        "de40fc0b03dfa4434922e6b06f37843398eaabab8035a66a873239ea08d546c0"
    ),
    "H2Connection._receive_frame": (
        "39b2e16b4fd74ed014ca144a0c6e388aef3dc51f116d6f0a874b70d92bd92873"
    ),
    "H2Connection.receive_data": (
        "4470c8fafce8153ac77aedb1a8daff284ed7691cd7650c986fd608a5f723a69e"
    ),
    "H2Connection._stream_closed_by": (
        "e5e734d023f1734faf38e4ebc7e96188516cd87ea887fb8dfda55af6052017b3"
    ),
    "_decode_headers": "ee1b71503327698a66c61ea6c66898b5d9c973de637aeebe7abfbd6e7c292e7e",
}

REFUSED = h2.errors.ErrorCodes.REFUSED_STREAM
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


def closes(samples: Samples) -> dict[str, int]:
    """``redirect_logger_connections_closed_total`` by reason."""
    return {
        dict(labels)["reason"]: int(value)
        for (name, labels), value in samples.items()
        if name == "redirect_logger_connections_closed_total"
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
    """server.py's guard overrides Hypercorn 0.18.0's trio ``TCPServer``, which
    ``worker_serve`` looks up by name, and its ``H2Protocol``, which
    ``ProtocolWrapper`` looks up by name, with h2 4.4.1's connection: any
    change there may undo a limit."""
    assert importlib.metadata.version("hypercorn") == "0.18.0"
    assert importlib.metadata.version("h2") == "4.4.1"
    connection = h2.connection.H2Connection
    objects: dict[str, Any] = {
        "TCPServer": hypercorn.trio.tcp_server.TCPServer,
        "worker_serve": hypercorn.trio.run.worker_serve,
        "WorkerContext": hypercorn.trio.worker_context.WorkerContext,
        "ProtocolWrapper": hypercorn.protocol.ProtocolWrapper,
        "H2Protocol": hypercorn.protocol.h2.H2Protocol,
        "H2Connection._receive_headers_frame": connection._receive_headers_frame,
        "H2Connection.open_inbound_streams": connection.open_inbound_streams.fget,
        "H2Connection._begin_new_stream": connection._begin_new_stream,
        "H2Connection._receive_frame": connection._receive_frame,
        "H2Connection.receive_data": connection.receive_data,
        "H2Connection._stream_closed_by": connection._stream_closed_by,
        "_decode_headers": h2.connection._decode_headers,
    }
    sources = {
        name: hashlib.sha256(inspect.getsource(obj).encode()).hexdigest()
        for name, obj in objects.items()
    }
    assert sources == PINNED
    assert "TCPServer," in inspect.getsource(hypercorn.trio.run.worker_serve)
    assert "self.protocol = H2Protocol(" in inspect.getsource(hypercorn.protocol.ProtocolWrapper)


def _frames(data: bytes) -> list[tuple[str, int, int | None]]:
    """The (type, stream id, error code of a reset) of each frame in ``data``."""
    found = []
    while data:
        frame, length = Frame.parse_frame_header(memoryview(data[:9]))
        frame.parse_body(memoryview(data[9 : 9 + length]))
        data = data[9 + length :]
        code = frame.error_code if isinstance(frame, RstStreamFrame) else None
        found.append((frame.type, frame.stream_id, code))
    return found


def _h2_pair(max_streams: int) -> tuple[_H2Connection, h2.connection.H2Connection]:
    """The service's h2 connection, advertising ``max_streams``, and a client's."""
    server = _H2Connection(h2.config.H2Configuration(client_side=False))
    server.local_settings = h2.settings.Settings(
        client=False, initial_values={h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: max_streams}
    )
    server.initiate_connection()
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    return server, client


def test_http2_streams_past_the_limit_are_refused_with_no_stream_made() -> None:
    """With 2 streams allowed, a third is refused (RST_STREAM REFUSED_STREAM)
    and h2 makes no stream for it; its header block is decoded all the same
    (the next stream's block refers to it through HPACK's table, and
    decodes); DATA sent on it afterwards gets RST_STREAM STREAM_CLOSED, and
    the connection goes on."""
    server, client = _h2_pair(max_streams=2)
    base = [(":method", "GET"), (":scheme", "http"), (":authority", "x")]
    for stream_id in (1, 3, 5):
        extra = [("x-only-in-5", "abc")] if stream_id == 5 else []
        path = [(":path", f"/{stream_id}"), *extra]
        client.send_headers(stream_id, [*base, *path], end_stream=stream_id != 5)
    events = server.receive_data(client.data_to_send())
    opened = [e.stream_id for e in events if isinstance(e, h2.events.RequestReceived)]
    assert opened == [1, 3]
    assert sorted(server.streams) == [1, 3]
    assert server.refused == 1
    assert (RstStreamFrame.type, 5, REFUSED) in _frames(server.data_to_send())
    # stream 5's DATA after the refusal: a stream error, not a connection error
    server.receive_data(DataFrame(5, data=b"x").serialize())
    assert _frames(server.data_to_send()) == [
        (RstStreamFrame.type, 5, h2.errors.ErrorCodes.STREAM_CLOSED)
    ]
    # stream 1 ends; stream 7 reuses stream 5's indexed header and is opened
    server.send_headers(1, [(":status", "301")], end_stream=True)
    client.send_headers(7, [*base, (":path", "/7"), ("x-only-in-5", "abc")], end_stream=True)
    events = server.receive_data(client.data_to_send())
    received = [e for e in events if isinstance(e, h2.events.RequestReceived)]
    assert [e.stream_id for e in received] == [7]
    assert (b"x-only-in-5", b"abc") in (received[0].headers or [])


def test_http2_a_stream_closed_between_refusals_makes_room_in_the_same_read() -> None:
    """With 2 streams allowed, in one read: streams 1 and 3 open, 5 and 7 are
    refused, the client resets stream 1, and stream 9 is opened in its room
    (the open streams are counted again after the reset), 11 refused; in
    the next read, after the server has answered stream 3, stream 13 opens."""
    server, client = _h2_pair(max_streams=2)
    base = [(":method", "GET"), (":scheme", "http"), (":authority", "x")]
    for stream_id in (1, 3, 5, 7):
        client.send_headers(stream_id, [*base, (":path", f"/{stream_id}")], end_stream=True)
    client.reset_stream(1)
    for stream_id in (9, 11):
        client.send_headers(stream_id, [*base, (":path", f"/{stream_id}")], end_stream=True)
    events = server.receive_data(client.data_to_send())
    opened = [e.stream_id for e in events if isinstance(e, h2.events.RequestReceived)]
    assert opened == [1, 3, 9]
    assert server.refused == 3
    refusals = [f[1] for f in _frames(server.data_to_send()) if f[2] == REFUSED]
    assert refusals == [5, 7, 11]
    server.send_headers(3, [(":status", "301")], end_stream=True)
    client.send_headers(13, [*base, (":path", "/13")], end_stream=True)
    events = server.receive_data(client.data_to_send())
    assert [e.stream_id for e in events if isinstance(e, h2.events.RequestReceived)] == [13]
    assert server.refused == 3


def test_the_frame_scan_counts_resets_and_new_streams_however_reads_are_cut() -> None:
    """A client's bytes: the preface, SETTINGS, streams 1, 3 and 5 (5's header
    block over 16 KiB, so in HEADERS and CONTINUATION frames), DATA whose
    payload looks like frame headers, 3's trailers (HEADERS on an open
    stream), two RST_STREAM, a PING: cut into two reads at every byte, the
    scan counts 2 resets and 3 new streams."""
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    base = [(":method", "POST"), (":scheme", "http"), (":authority", "x")]
    client.send_headers(1, [*base, (":path", "/1")])
    client.send_headers(3, [*base, (":path", "/3")])
    big = "".join(chr(33 + n * 7 % 90) for n in range(40000))  # Huffman-coded over 16 KiB
    client.send_headers(5, [*base, (":path", "/5"), ("x-big", big)])
    client.send_data(1, bytes(RstStreamFrame(1).serialize()) * 20)
    client.send_headers(3, [("x-trailer", "t")], end_stream=True)
    client.reset_stream(1)
    client.reset_stream(5)
    client.ping(b"12345678")
    data = client.data_to_send()
    assert sum(frame[0] == 0x9 for frame in _frames(data[24:])) >= 1  # CONTINUATION
    for cut in range(len(data) + 1):
        scan = _FrameScan()
        first, second = scan.read(data[:cut]), scan.read(data[cut:])
        assert (first[0] + second[0], first[1] + second[1]) == (2, 3), cut


@settings(max_examples=300, deadline=None)
@given(
    limit=st.integers(1, 6),
    before=st.integers(0, 6),
    answered=st.booleans(),
    actions=st.lists(st.sampled_from(["open", "reset", "trailers"]), max_size=30),
)
def test_the_frame_scan_never_foresees_more_refusals_than_h2_makes(
    limit: int, before: int, answered: bool, actions: list[str]
) -> None:
    """GuardedH2Protocol GOAWAYs a read undecoded when its RST_STREAM frames and
    the refusals foreseen from the scan (its new streams past the limit and
    past one room for each RST_STREAM) cross the limit: the refusals h2
    then makes of the read are never fewer than foreseen, whatever the read
    opens, resets and ends, with up to ``limit`` streams allowed and some
    opened by an earlier read, answered or not."""
    server, client = _h2_pair(max_streams=limit)
    scan = _FrameScan()
    base = [(":method", "GET"), (":scheme", "http"), (":authority", "x")]
    opened: list[int] = []

    def open_one(end: bool) -> None:
        stream_id = client.get_next_available_stream_id()
        client.send_headers(stream_id, [*base, (":path", "/")], end_stream=end)
        opened.append(stream_id)

    for _ in range(before):
        open_one(end=False)
    earlier = client.data_to_send()
    scan.read(earlier)
    for event in server.receive_data(earlier):
        if isinstance(event, h2.events.RequestReceived) and answered:
            server.send_headers(event.stream_id, [(":status", "301")], end_stream=True)
            break
    server.data_to_send()
    for action in actions:
        if action == "open":
            open_one(end=False)
        elif opened and action == "reset":
            client.reset_stream(opened.pop(0))
        elif opened and action == "trailers":
            client.send_headers(opened.pop(), [("x-t", "t")], end_stream=True)
    data = client.data_to_send()
    resets, streams = scan.read(data)
    refused = server.refused
    server.receive_data(data)
    assert server.refused - refused >= streams - limit - resets


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


async def held_or_refused(url: str) -> trio.SocketStream | None:
    """A new connection whose request was answered 301 (still open), or None
    when the server closed it unanswered."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    try:
        stream = await trio.open_tcp_stream(host, int(port))
        await stream.send_all(GET)
        data = await stream.receive_some(65536)
    except (OSError, trio.BrokenResourceError):
        return None
    if not data:
        await stream.aclose()
        return None
    assert data.startswith(b"HTTP/1.1 301 "), data
    return stream


async def test_each_worker_of_serve_workers_2_holds_its_own_max_connections(
    broker: Broker, tmp_path: Path
) -> None:
    """max_connections = 3 under serve --workers 2: of 10 held connections,
    3 to 6 are answered (however the kernel spreads them: 3 per worker at
    most), the rest are reset, and the group's /metrics counts exactly those."""
    port, admin_port = free_port(), free_port()
    public, admin = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}"
    server = {
        "bind": [f"127.0.0.1:{port}"],
        "admin_bind": [f"127.0.0.1:{admin_port}"],
        "max_connections": 3,
        "max_connections_per_ip": 0,
    }
    config = service_config(broker.bootstrap, unique_topic(), server=server)
    service = ServiceProcess.cli(write_config(tmp_path / "c.toml", config), "--workers", "2")
    try:
        await trio.to_thread.run_sync(_until_workers, admin, 2)
        with trio.fail_after(60):
            outcomes = [await held_or_refused(public) for _ in range(10)]
            held = [stream for stream in outcomes if stream is not None]
            async with httpx.AsyncClient(base_url=admin) as client:
                samples = samples_of((await client.get("/metrics")).text)
            for stream in held:
                await stream.aclose()
    finally:
        code = await trio.to_thread.run_sync(service.terminate)
    assert 3 <= len(held) <= 6
    assert refusals(samples)["max_connections"] == 10 - len(held)
    assert samples[("redirect_logger_connections", ())] == len(held)
    assert code == 0, service.output
    ledgers = service.ledgers()
    assert len(ledgers) == 2
    assert sum(ledger["delivered"] for ledger in ledgers) == len(held)
    assert all(ledger["received"] == ledger["delivered"] for ledger in ledgers), ledgers


def _until_workers(admin: str, workers: int, timeout: float = 60.0) -> None:
    """Until /readyz answers 200 and a scrape sums ``workers`` workers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with suppress(httpx.TransportError):
            ready = httpx.get(f"{admin}/readyz", timeout=5).status_code == 200
            samples = samples_of(httpx.get(f"{admin}/metrics", timeout=5).text)
            if ready and samples[("redirect_logger_workers", ())] == workers:
                return
        time.sleep(0.2)
    raise AssertionError(f"{workers} ready workers not seen within {timeout} s")


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
    the 6th to 8th connections (counted in /metrics); idle_timeout = 2 s
    closes an idle connection; HTTP/2 streams past 2 are refused, and 6
    resets in a second get GOAWAY; send_timeout = 1 s resets a connection
    whose answers go unread. Each close by a timeout is counted by its
    reason. The service then stops cleanly, every answered hit delivered."""
    port, admin_port = free_port(), free_port()
    public, admin = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}"
    topic = unique_topic()
    server: dict[str, Any] = {
        "bind": [f"127.0.0.1:{port}"],
        "admin_bind": [f"127.0.0.1:{admin_port}"],
        "max_connections": 5,
        "max_connections_per_ip": 0,
        "idle_timeout": 2.0,
        "send_timeout": 1.0,
        "h2_max_concurrent_streams": 2,
        "h2_max_resets_per_second": 5,
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
            assert 1.5 < trio.current_time() - started < 4.5  # Hypercorn's own: 5 s
            await idle.aclose()

            client = await h2_connect(public)
            async with client.stream:
                streams = [client.get(f"/docs/h{n}") for n in range(4)]
                await client.flush()
                assert await client.until(lambda: len(client.ended) + len(client.resets) == 4)
                assert (client.advertised, client.statuses) == (2, dict.fromkeys(streams[:2], 301))
                assert client.resets == dict.fromkeys(streams[2:], REFUSED)
            rapid = await h2_connect(public)
            async with rapid.stream:
                for n in range(10):
                    rapid.get(f"/docs/r{n}", reset=True)
                await rapid.flush()
                with suppress(trio.BrokenResourceError):
                    assert not await rapid.until(lambda: False)
                assert rapid.goaway is not None
                assert rapid.goaway.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM

            host, _ = public.removeprefix("http://").rsplit(":", 1)
            stalled = await trio.open_tcp_stream(host, port)
            await never_read_until_reset(stalled)
            await stalled.aclose()

        async with httpx.AsyncClient(base_url=admin) as client:
            samples = samples_of((await client.get("/metrics")).text)
        assert refusals(samples) == {
            "max_connections": 3,
            "max_connections_per_ip": 0,
            "h2_resets": 1,
        }
        assert samples[("redirect_logger_h2_streams_refused_total", ())] == 2
        assert closes(samples) == {"idle_timeout": 1, "send_timeout": 1}
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


# -- HTTP/2 ------------------------------------------------------------------------------


def h2_get(path: str) -> list[tuple[bytes, bytes]]:
    return [
        (b":method", b"GET"),
        (b":scheme", b"http"),
        (b":authority", b"x"),
        (b":path", path.encode()),
    ]


class H2Client:
    """A raw HTTP/2 client (h2, prior knowledge) on one real socket."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        self.h2.initiate_connection()
        self.statuses: dict[int, int] = {}  # stream id: status of its answer
        self.ended: set[int] = set()
        self.resets: dict[int, int] = {}  # stream id: error code of the server's RST_STREAM
        self.advertised: int | None = None  # SETTINGS_MAX_CONCURRENT_STREAMS
        self.goaway: h2.events.ConnectionTerminated | None = None

    def get(self, path: str, *, reset: bool = False) -> int:
        """Queue a GET (and, with ``reset``, its RST_STREAM at once): its stream id."""
        stream_id = self.h2.get_next_available_stream_id()
        self.h2.send_headers(stream_id, h2_get(path), end_stream=True)
        if reset:
            self.h2.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
        return stream_id

    async def flush(self) -> None:
        """Send what is queued, in one write."""
        await self.stream.send_all(self.h2.data_to_send())

    async def until(self, done: Callable[[], bool]) -> bool:
        """Read until ``done()``, or until the server closes (then False)."""
        while not done():
            data = await self.stream.receive_some(65536)
            if not data:
                return False
            for event in self.h2.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    assert event.stream_id is not None and event.headers is not None
                    self.statuses[event.stream_id] = int(dict(event.headers)[b":status"])
                elif isinstance(event, h2.events.StreamEnded):
                    assert event.stream_id is not None
                    self.ended.add(event.stream_id)
                elif isinstance(event, h2.events.StreamReset):
                    assert event.stream_id is not None and event.error_code is not None
                    self.resets[event.stream_id] = event.error_code
                elif isinstance(event, h2.events.RemoteSettingsChanged):
                    changed = event.changed_settings.get(
                        h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS
                    )
                    if changed is not None:
                        self.advertised = changed.new_value
                elif isinstance(event, h2.events.ConnectionTerminated):
                    self.goaway = event
            await self.stream.send_all(self.h2.data_to_send())
        return True


async def h2_connect(url: str) -> H2Client:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return H2Client(await trio.open_tcp_stream(host, int(port)))


def h2_metrics(service: Service) -> tuple[dict[str, int], int]:
    """Connections refused by reason, and HTTP/2 streams refused."""
    samples = samples_of(service.metrics.exposition().decode())
    return refusals(samples), int(samples[("redirect_logger_h2_streams_refused_total", ())])


async def test_http2_streams_past_the_advertised_limit_are_refused_one_by_one(
    broker: Broker,
) -> None:
    """h2_max_concurrent_streams = 5, advertised in SETTINGS: 8 requests sent at
    once get 5 answers and 3 RST_STREAM REFUSED_STREAM (h2spec 5.1.2); the
    connection carries on, and only the answered requests are recorded."""
    stop = trio.Event()
    config = service_config(
        broker.bootstrap, unique_topic(), server={"h2_max_concurrent_streams": 5}
    )
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            service, codes = await start_service(nursery, config, stop)
            client = await h2_connect(service.binds[0])
            async with client.stream:
                ids = [client.get(f"/docs/{n}") for n in range(8)]
                await client.flush()
                assert await client.until(lambda: len(client.ended) + len(client.resets) == 8)
                assert client.advertised == 5
                assert client.resets == dict.fromkeys(ids[5:], h2.errors.ErrorCodes.REFUSED_STREAM)
                assert client.statuses == dict.fromkeys(ids[:5], 301)
                again = client.get("/docs/again")
                await client.flush()
                assert await client.until(lambda: again in client.ended)
                assert client.statuses[again] == 301
                assert client.goaway is None
            assert h2_metrics(service) == (
                {"max_connections": 0, "max_connections_per_ip": 0, "h2_resets": 0},
                3,
            )
            stop.set()
    assert codes == [0]
    ledger = service.ledger_snapshot()
    assert ledger["received"] == ledger["delivered"] == 6, ledger


async def test_http2_rapid_reset_gets_goaway_and_the_connection_closed(broker: Broker) -> None:
    """h2_max_resets_per_second = 20. One connection opens and resets 20 streams
    at once, then asks once more: answered. Another opens and resets 50 at
    once (CVE-2023-44487), in one write: the 21st reset gets GOAWAY
    ENHANCE_YOUR_CALM, and the connection is closed; it is counted once, as
    h2_resets. None of the write's requests reaches the app (the GOAWAY's
    last stream id is 0). A third connection asks once, then opens and
    resets 50: the GOAWAY's last stream is its first request, the only one
    of its requests recorded."""
    stop = trio.Event()
    config = service_config(
        broker.bootstrap, unique_topic(), server={"h2_max_resets_per_second": 20}
    )
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            service, codes = await start_service(nursery, config, stop)
            calm = await h2_connect(service.binds[0])
            async with calm.stream:
                for n in range(20):
                    calm.get(f"/docs/c{n}", reset=True)
                last = calm.get("/docs/last")
                await calm.flush()
                assert await calm.until(lambda: last in calm.ended)
                assert (calm.statuses[last], calm.goaway) == (301, None)

            async def reset_50(client: H2Client) -> tuple[int, int]:
                """50 streams opened and reset in one write: the first one's
                id, and the last stream id of the GOAWAY that closes it."""
                ids = [client.get(f"/docs/r{n}", reset=True) for n in range(50)]
                await client.flush()
                with suppress(trio.BrokenResourceError):
                    assert not await client.until(lambda: False)  # until closed
                assert client.goaway is not None
                assert client.goaway.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
                return ids[0], client.goaway.last_stream_id

            rapid = await h2_connect(service.binds[0])
            async with rapid.stream:
                assert (await reset_50(rapid))[1] == 0
            third = await h2_connect(service.binds[0])
            async with third.stream:
                first = third.get("/docs/first")
                await third.flush()
                assert await third.until(lambda: first in third.ended)
                assert third.statuses[first] == 301
                after, last_stream = await reset_50(third)
                assert last_stream == first < after
            while service.ledger_snapshot()["received"] < 22:  # noqa: ASYNC110
                await trio.sleep(0.05)
            assert h2_metrics(service) == (
                {"max_connections": 0, "max_connections_per_ip": 0, "h2_resets": 2},
                0,
            )
            stop.set()
    assert codes == [0]
    ledger = service.ledger_snapshot()
    assert ledger["received"] == ledger["delivered"] == 21 + 1, ledger


async def test_a_servers_end_of_graceful_shutdown_resets_only_its_own_connections(
    broker: Broker,
) -> None:
    """Two services one after the other in one process: when the first one's
    graceful timeout (1 s) runs out, the second one's connections stay open."""
    config = service_config(broker.bootstrap, unique_topic(), server={"graceful_timeout": 1.0})
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            stop = trio.Event()
            first, first_codes = await start_service(nursery, config, stop)
            stream, _ = await answered(first.binds[0])
            await stream.aclose()
            stop.set()
            while not first_codes:  # noqa: ASYNC110 (the first one's exit)
                await trio.sleep(0.05)
            stop = trio.Event()
            second, second_codes = await start_service(nursery, config, stop)
            stream, _ = await answered(second.binds[0])
            await trio.sleep(1.5)  # past the first one's graceful timeout
            await stream.send_all(GET)
            assert (await stream.receive_some(65536)).startswith(b"HTTP/1.1 301 ")
            await stream.aclose()
            stop.set()
    assert first_codes == second_codes == [0]


# ------------------------------------------------------------------ the heavy lane


async def test_heavy_requests_take_turns_one_a_scheduler_pass() -> None:
    """Twenty requests taking their turn at once pass in twenty passes of the
    scheduler (a task counting passes sees them apart), not all in one; the
    first one, blocked after its turn (a client that does not read), keeps
    none of the others waiting."""
    taken: list[None] = []
    lane = HeavyLane(lambda: taken.append(None))
    passes = 0
    seen: list[int] = []
    blocked = trio.Event()

    async def count_passes() -> None:
        nonlocal passes
        while True:
            passes += 1
            await trio.lowlevel.checkpoint()

    async def heavy(index: int) -> None:
        await lane.turn()
        seen.append(passes)
        if index == 0:
            await blocked.wait()

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(count_passes)
            await trio.lowlevel.checkpoint()
            for index in range(20):
                nursery.start_soon(heavy, index)
            while len(seen) < 20:
                await trio.lowlevel.checkpoint()
            nursery.cancel_scope.cancel()
    # A task runs before or after the counter within its pass: each count is
    # its pass's or the one before, so twenty passes span at least 18.
    assert seen == sorted(seen)
    assert seen[-1] - seen[0] >= 18, seen
    assert len(taken) == 20  # redirect_logger_heavy_requests_total


@pytest.mark.parametrize("size", [HEAVY_BYTES, HEAVY_BYTES + 1])
async def test_hits_with_a_target_past_heavy_bytes_take_a_turn(
    monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    """Redirects, misses, pixels and WebSocket upgrades whose path and query
    are longer than HEAVY_BYTES take their turn; the others do not. Collect
    requests take it for a body longer than that, or a compressed one."""
    turns: list[str] = []

    async def turn(self: HeavyLane) -> None:
        turns.append(path)

    monkeypatch.setattr(HeavyLane, "turn", turn)
    config = unreachable_config(collect={"enabled": True}, pixel={"enabled": True})
    service = Service(parse_settings(config))
    app: Any = create_app(service, own_lifecycle=False).asgi_app
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    def request(kind: str, path: str, query: bytes, body: bytes = b"", **headers: bytes) -> Any:
        scope = {
            "type": kind,
            "scheme": "http" if kind == "http" else "ws",
            "method": "POST" if body else "GET",
            "path": path,
            "raw_path": path.encode(),
            "query_string": query,
            "headers": [(b"host", b"x")]
            + [(name.replace("_", "-").encode(), value) for name, value in headers.items()],
            "client": ("127.0.0.1", 4711),
            "server": ("127.0.0.1", 8080),
            "extensions": {"websocket.http.response": {}},
        }
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict[str, Any]:
            return messages.pop(0) if messages else {"type": "http.disconnect"}

        return app(scope, receive, send)

    for path in ("/docs/", "/nothing/", "/p.gif"):
        await request("http", path, b"x" * (size - len(path)))
        await request("websocket", path, b"x" * (size - len(path)))
    path = "/collect"
    events = b'{"e":"' + b"x" * (size - 8) + b'"}'
    assert len(events) == size
    await request("http", path, b"", events, content_type=b"application/json")
    small = gzip.compress(b'{"e":1}')
    json = b"application/json"
    await request("http", path, b"", small, content_type=json, content_encoding=b"gzip")
    heavy = size > HEAVY_BYTES
    expected = ["/docs/"] * 2 + ["/nothing/"] * 2 + ["/p.gif"] * 2 if heavy else []
    assert turns == [*expected, *(["/collect"] if heavy else []), "/collect"]
    statuses = [m["status"] for m in sent if "status" in m]
    assert statuses == [503] * 6 + [503, 503]  # no pipeline started: shed, and counted


async def test_heavy_requests_are_answered_recorded_and_counted(broker: Broker) -> None:
    """Against Apache Kafka: three redirects with a 5 KB path (each taking a
    turn) among three short ones, all at once, are each answered with the
    forwarded path and recorded by id; the turns are counted in
    redirect_logger_heavy_requests_total."""
    stop = trio.Event()
    topic = unique_topic()
    config = service_config(broker.bootstrap, topic)
    paths = [f"/docs/{i}/" + "a" * 5000 for i in range(3)] + [f"/docs/{i}" for i in range(3)]
    answers: dict[str, httpx.Response] = {}
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            service, codes = await start_service(nursery, config, stop)
            async with httpx.AsyncClient(base_url=service.binds[0]) as client:

                async def get(path: str) -> None:
                    answers[path] = await client.get(path)

                async with trio.open_nursery() as requests:
                    for path in paths:
                        requests.start_soon(get, path)
            counted = samples_of(service.metrics.exposition().decode())
            stop.set()
    assert codes == [0]
    assert counted[("redirect_logger_heavy_requests_total", ())] == 3
    for path in paths:
        assert answers[path].status_code == 301
        assert answers[path].headers["location"] == "https://docs.example.com" + path[5:]
    cut = FIELD_LIMITS["path"]  # the record keeps the start of a long path
    ids = {answers[path].headers["x-hit-id"]: path[:cut] for path in paths}
    records = read_topic(broker.bootstrap, topic, expected=len(paths))
    assert {record["id"]: record["path"] for record in records} == ids
    assert (
        sorted(record.get("truncated", []) for record in records)
        == [[]] * 3 + [["path", "location"]] * 3
    )
