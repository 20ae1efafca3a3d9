"""WebSocket upgrades, from a real WebSocket client (wsproto) over a real
socket: answered like a GET (the redirect, or a 404), never accepted, and
recorded like one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import httpx
import pytest
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, RejectConnection, RejectData, Request

from brokers import Broker
from redirect_logger.app import create_app
from redirect_logger.config import parse_settings
from redirect_logger.service import Service
from support import (
    ServiceProcess,
    check_record_schema,
    ledger_counts,
    read_topic,
    service_config,
    start_service,
    unique_topic,
    unreachable_config,
    write_config,
)
from test_hostile import Response

AGENT = "Mozilla/5.0 (X11; Linux x86_64) Firefox/140.0"
# Headers every answer from Hypercorn has whatever the app sends
SERVER_HEADERS = {b"date", b"server"}


async def upgrade(url: str, target: str) -> tuple[int, dict[bytes, bytes], bytes]:
    """Ask for a WebSocket at ``target``: the status, headers (one each) and
    body of the answer, which must be a denial."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    client = WSConnection(ConnectionType.CLIENT)
    request = Request(host=f"{host}:{port}", target=target, extra_headers=[(b"user-agent", AGENT)])
    status, headers, body, done = 0, dict[bytes, bytes](), b"", False
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream(host, int(port))
        async with stream:
            await stream.send_all(client.send(request))
            while not done:
                data = await stream.receive_some(65536)
                client.receive_data(data or None)
                for event in client.events():
                    assert not isinstance(event, AcceptConnection), "upgrade accepted"
                    if isinstance(event, RejectConnection):
                        status = event.status_code
                        for name, value in event.headers:
                            assert name not in headers, name
                            headers[name] = value
                        done = not event.has_body
                    elif isinstance(event, RejectData):
                        body += event.data
                        done = event.body_finished
                assert data or done, "closed before the answer ended"
    return status, headers, body


@pytest.mark.parametrize("mode", ["cli", "hypercorn"])
async def test_an_upgrade_is_answered_and_recorded_as_a_get(
    kafka_broker: Broker, tmp_path: Path, mode: str
) -> None:
    """On a rule's path: the rule's redirect; elsewhere: the 404. Each with
    its X-Hit-Id, and that id's record in Kafka, as a GET's would be. An
    admin path keeps its behaviour (Quart's 400, no hit)."""
    topic = unique_topic()
    config = write_config(tmp_path / "c.toml", service_config(kafka_broker.bootstrap, topic))
    service = ServiceProcess.cli(config) if mode == "cli" else ServiceProcess.hypercorn(config, 0)
    try:
        url = await trio.to_thread.run_sync(service.url)
        redirect = await upgrade(url, "/docs/start?utm_source=ws")
        miss = await upgrade(url, "/nothing/here?x=1")
        admin = await upgrade(url, "/healthz")
        async with httpx.AsyncClient(base_url=url, headers={"user-agent": AGENT}) as client:
            get = await client.get("/docs/start?utm_source=ws")
        code = await trio.to_thread.run_sync(service.terminate)
    finally:
        service.kill()
    assert code == 0, service.output
    assert service.ledgers() == [ledger_counts(received=3, delivered=3)]

    status, headers, body = redirect
    assert status == 301 and body == b""
    hit_id = headers[b"x-hit-id"].decode()
    assert headers == {
        b"x-hit-id": hit_id.encode(),
        b"location": b"https://docs.example.com/start?utm_source=ws",
        b"cache-control": get.headers["cache-control"].encode(),
        b"content-length": b"0",
        **{name: headers[name] for name in SERVER_HEADERS},
    }
    assert {k.encode() for k in get.headers} == set(headers)  # the GET's headers, no more

    status, headers, body = miss
    assert (status, body) == (404, b"not found\n")
    miss_id = headers[b"x-hit-id"].decode()
    assert headers == {
        b"x-hit-id": miss_id.encode(),
        b"cache-control": b"no-store",
        b"content-length": b"10",
        b"content-type": b"text/plain; charset=utf-8",
        **{name: headers[name] for name in SERVER_HEADERS},
    }

    status, headers, _ = admin
    assert status == 400 and b"x-hit-id" not in headers  # Quart's, as before

    records = {r["id"]: r for r in read_topic(kafka_broker.bootstrap, topic, expected=3)}
    assert len(records) == 3
    as_get = records[get.headers["x-hit-id"]]
    for record in records.values():
        check_record_schema(record)
    same = {"method": "GET", "scheme": "http", "user_agent": AGENT, "bot": False}
    varying = {"id", "ts", "logged_at", "remote_address"}
    assert {k: v for k, v in records[hit_id].items() if k not in varying} == {
        k: v for k, v in as_get.items() if k not in varying
    }
    assert records[hit_id].items() >= {**same, "status": 301, "kind": "redirect"}.items()
    assert (
        records[miss_id].items()
        >= {
            **same,
            "path": "/nothing/here",
            "query": "x=1",
            "status": 404,
            "location": None,
            "rule": None,
            "kind": "miss",
        }.items()
    )


async def test_without_the_denial_extension_the_socket_is_closed_and_nothing_recorded() -> None:
    """A server that cannot send an HTTP answer to an upgrade: no hit."""
    service = Service(parse_settings(unreachable_config()))
    app: Any = create_app(service, own_lifecycle=False).asgi_app
    scope = {
        "type": "websocket",
        "scheme": "ws",
        "path": "/docs/start",
        "raw_path": b"/docs/start",
        "query_string": b"",
        "headers": [(b"host", b"x")],
        "client": ("127.0.0.1", 4711),
        "server": ("127.0.0.1", 8080),
        "subprotocols": [],
    }
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "websocket.connect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    await app({**scope, "extensions": {}}, receive, send)
    assert sent == [{"type": "websocket.close", "code": 1000}] * 2
    assert service.ledger_snapshot() == ledger_counts()


async def h2_upgrades(url: str, paths: list[bytes]) -> list[Response]:
    """An HTTP/2 WebSocket (RFC 8441, extended CONNECT) asked for at each path,
    on one connection, once the server's SETTINGS allow it: the answers."""
    client = h2.connection.H2Connection(h2.config.H2Configuration(header_encoding=None))
    client.initiate_connection()
    answers: dict[int, Response] = {}
    ended: set[int] = set()
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream(host, int(port))
        async with stream:
            await stream.send_all(client.data_to_send())
            while len(ended) < len(paths):
                data = await stream.receive_some(65536)
                assert data, "connection closed"
                for event in client.receive_data(data):
                    if isinstance(event, h2.events.RemoteSettingsChanged) and not answers:
                        for path in paths:
                            stream_id = client.get_next_available_stream_id()
                            answers[stream_id] = Response(0, [], b"")
                            client.send_headers(stream_id, connect_headers(path))
                    elif isinstance(event, h2.events.ResponseReceived):
                        assert event.stream_id is not None and event.headers is not None
                        answer = answers[event.stream_id]
                        for name, value in event.headers:
                            if name == b":status":
                                answer.status = int(value)
                            else:
                                answer.headers.append((bytes(name).decode(), bytes(value)))
                    elif isinstance(event, h2.events.DataReceived):
                        assert event.stream_id is not None and event.data is not None
                        answers[event.stream_id].body += event.data
                    elif isinstance(event, h2.events.StreamEnded):
                        assert event.stream_id is not None
                        ended.add(event.stream_id)
                    assert not isinstance(event, h2.events.ConnectionTerminated), event
                await stream.send_all(client.data_to_send())
    return [answers[stream_id] for stream_id in sorted(answers)]


def connect_headers(path: bytes) -> list[tuple[bytes, bytes]]:
    return [
        (b":method", b"CONNECT"),
        (b":protocol", b"websocket"),
        (b":scheme", b"http"),
        (b":authority", b"x"),
        (b":path", path),
        (b"sec-websocket-version", b"13"),
        (b"user-agent", AGENT.encode()),
    ]


async def test_an_http2_upgrade_is_answered_and_recorded_as_a_get(broker: Broker) -> None:
    """HTTP/2's WebSocket (RFC 8441: an extended CONNECT) gets the same
    answers; the records say GET, as the hit was a GET's."""
    stop = trio.Event()
    topic = unique_topic()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            service, codes = await start_service(
                nursery, service_config(broker.bootstrap, topic), stop
            )
            answers = await h2_upgrades(service.binds[0], [b"/docs/a?b=1", b"/none"])
            stop.set()
    assert codes == [0]
    redirect, miss = answers
    assert (redirect.status, redirect.get("location"), redirect.body) == (
        301,
        b"https://docs.example.com/a?b=1",
        b"",
    )
    assert (miss.status, miss.get("cache-control"), miss.body) == (404, b"no-store", b"not found\n")
    records = {r["id"]: r for r in read_topic(broker.bootstrap, topic, expected=2)}
    for response, kind in ((redirect, "redirect"), (miss, "miss")):
        hit_id = response.get("x-hit-id")
        assert hit_id is not None
        record = records[hit_id.decode()]
        check_record_schema(record)
        assert (record["method"], record["scheme"], record["kind"]) == ("GET", "http", kind)
        assert record["status"] == response.status
