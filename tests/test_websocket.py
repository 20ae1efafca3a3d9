"""WebSocket upgrades, from a real WebSocket client (wsproto) over a real
socket: answered like a GET (the redirect, or a 404), never accepted, and
recorded like one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
    unique_topic,
    unreachable_config,
    write_config,
)

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
