"""HTTPS (issue 14): ``server.certfile`` and ``server.keyfile``.

``serve`` and ``serve --workers 2`` with a certificate of a test CA
(trustme): redirects over HTTP/1.1 and HTTP/2 (ALPN h2) on the ``bind`` port,
verified against the CA, recorded with scheme ``https``; SIGTERM under load
over HTTPS loses no answered hit (by id, against the ledger); the admin port stays
plain HTTP; the connection limits hold over TLS (both launch modes). Every bad pair of files is
refused by ``check`` (exit 2) naming the key, and Hypercorn launch refuses a
config that sets them (its TLS is its own).
"""

from __future__ import annotations

import re
import ssl
import sys
import time
from contextlib import suppress
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import pytest
import trio
import trustme

from brokers import Broker, free_port
from support import (
    ServiceProcess,
    check_delivery,
    never_read_until_reset,
    read_topic,
    run_cli,
    service_config,
    sigterm_under_load,
    unique_topic,
    unreachable_config,
    write_config,
)

SERVING_RE = re.compile(r"serving on (https://127\.0\.0\.1:\d+)")


class Pem(NamedTuple):
    ca: trustme.CA
    cert: Path
    key: Path


@pytest.fixture
def pem(tmp_path: Path) -> Pem:
    """A test CA, and a certificate of it for 127.0.0.1 with its key, as files."""
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1", "localhost")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    issued.private_key_pem.write_to_path(str(key))
    for blob in issued.cert_chain_pems:
        blob.write_to_path(str(cert), append=True)
    return Pem(ca, cert, key)


def _client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


def _config(
    tmp_path: Path, bootstrap: str, topic: str, pem: Pem, **server: Any
) -> tuple[Path, str, str]:
    """A config file with HTTPS on a public port and a plain admin port:
    (path, public URL, admin URL)."""
    port, admin = free_port(), free_port()
    config = service_config(
        bootstrap,
        topic,
        server={
            "bind": [f"127.0.0.1:{port}"],
            "admin_bind": [f"127.0.0.1:{admin}"],
            "certfile": str(pem.cert),
            "keyfile": str(pem.key),
            **server,
        },
    )
    path = write_config(tmp_path / "tls.toml", config)
    return path, f"https://127.0.0.1:{port}", f"http://127.0.0.1:{admin}"


def _until_ready(admin: str, timeout: float = 60.0) -> None:
    """Until /readyz answers 200 over plain HTTP on the admin port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{admin}/readyz", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{admin}/readyz not 200 within {timeout} s")


def _records(bootstrap: str, topic: str, ids: set[str]) -> dict[str, dict[str, Any]]:
    """The records of ``ids`` in the topic, by id (waiting up to 60 s for them)."""
    deadline = time.monotonic() + 60
    while True:
        found = {r["id"]: r for r in read_topic(bootstrap, topic, timeout=30) if r["id"] in ids}
        if set(found) == ids or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def test_https_redirects_over_http1_and_http2_are_recorded(
    broker: Broker, tmp_path: Path, pem: Pem
) -> None:
    """HTTP/1.1 and HTTP/2 (ALPN h2) over TLS, verified against the test CA:
    each answered with its rule's Location and an X-Hit-Id, recorded with
    scheme https under that id; plain HTTP on the public port gets no
    answer; the admin port answers plain HTTP and no TLS; exit 0."""
    topic = unique_topic()
    path, public, admin = _config(tmp_path, broker.bootstrap, topic, pem)
    service = ServiceProcess.cli(path)
    try:
        assert service.wait_for(SERVING_RE, timeout=60) == [public]
        _until_ready(admin)
        verify = _client_context(pem.ca)
        with httpx.Client(verify=verify, http2=False, timeout=10) as client:
            one = client.get(f"{public}/?a=1")
        with httpx.Client(verify=verify, http2=True, timeout=10) as client:
            two = client.get(f"{public}/docs/guide")
        assert (one.http_version, one.status_code) == ("HTTP/1.1", 302)
        assert one.headers["location"] == "https://example.com/?a=1"
        assert (two.http_version, two.status_code) == ("HTTP/2", 301)
        assert two.headers["location"] == "https://docs.example.com/guide"
        ids = {one.headers["x-hit-id"], two.headers["x-hit-id"]}

        with pytest.raises(httpx.TransportError):  # no plain HTTP on the TLS port
            httpx.get(public.replace("https://", "http://") + "/", timeout=5)
        assert httpx.get(f"{admin}/healthz", timeout=5).status_code == 200
        with pytest.raises(httpx.TransportError):  # the admin port is plain HTTP only
            httpx.get(admin.replace("http://", "https://") + "/healthz", verify=verify, timeout=5)

        records = _records(broker.bootstrap, topic, ids)
        assert set(records) == ids
        assert {r["scheme"] for r in records.values()} == {"https"}
        assert records[one.headers["x-hit-id"]]["rule"] == "home"
        assert records[two.headers["x-hit-id"]]["rule"] == "docs"
        assert service.terminate() == 0, service.output
    finally:
        service.kill()


def test_serve_workers_with_tls(broker: Broker, tmp_path: Path, pem: Pem) -> None:
    """``serve --workers 2``: each worker serves the supervisor's public
    socket over TLS and its admin socket plain; redirects on new
    connections are answered and recorded with scheme https."""
    topic = unique_topic()
    path, public, admin = _config(tmp_path, broker.bootstrap, topic, pem)
    service = ServiceProcess.cli(path, "--workers", "2")
    try:
        service.wait_for(SERVING_RE, count=2, timeout=60)
        _until_ready(admin)
        verify = _client_context(pem.ca)
        ids = set()
        for n in range(6):  # a new connection each: either worker may answer
            with httpx.Client(verify=verify, http2=bool(n % 2), timeout=10) as client:
                answer = client.get(f"{public}/docs/{n}")
            assert answer.status_code == 301
            assert answer.headers["location"] == f"https://docs.example.com/{n}"
            ids.add(answer.headers["x-hit-id"])
        records = _records(broker.bootstrap, topic, ids)
        assert set(records) == ids
        assert {r["scheme"] for r in records.values()} == {"https"}
        assert service.terminate() == 0, service.output
    finally:
        service.kill()


async def test_sigterm_under_load_over_https_delivers_every_answered_hit(
    kafka_broker: Broker, tmp_path: Path, pem: Pem
) -> None:
    """On Apache Kafka: SIGTERM while keep-alive clients request over HTTPS,
    in turn over HTTP/1.1 and HTTP/2: exit 0, a clean ledger, and the topic
    holds each delivered record once, as many as the ledger counts
    delivered, every answered id among them."""
    broker = kafka_broker
    topic = unique_topic()
    path, public, admin = _config(tmp_path, broker.bootstrap, topic, pem)
    service = ServiceProcess.cli(path)
    try:
        await trio.to_thread.run_sync(lambda: service.wait_for(SERVING_RE, timeout=60))
        await trio.to_thread.run_sync(_until_ready, admin)
        verify = _client_context(pem.ca)
        async with httpx.AsyncClient(verify=verify, http2=True, timeout=10) as client:
            first = await client.get(f"{public}/docs/first")
        assert (first.http_version, first.status_code) == ("HTTP/2", 301)
        clients = [{"verify": verify, "http2": False}, {"verify": verify, "http2": True}]
        code, answered = await sigterm_under_load(service, [public], clients=clients)
    finally:
        service.kill()
    assert code == 0, service.output
    answered[first.headers["x-hit-id"]] = first.status_code
    await trio.to_thread.run_sync(check_delivery, broker, topic, service, answered, 1)


def _launch(mode: str, path: Path, port: int, admin: int, pem: Pem) -> ServiceProcess:
    """``serve`` with the config's TLS keys, or ``hypercorn`` with its own
    ``--certfile``/``--keyfile`` (the config then has none)."""
    if mode == "serve":
        return ServiceProcess.cli(path)
    command = [sys.executable, "-m", "hypercorn", "-k", "trio", "--workers", "1"]
    command += ["--certfile", str(pem.cert), "--keyfile", str(pem.key)]
    command += ["-b", f"127.0.0.1:{port}", "--insecure-bind", f"127.0.0.1:{admin}"]
    command += ["--graceful-timeout", "5", "redirect_logger.asgi:app"]
    return ServiceProcess(command, env={"REDIRECT_LOGGER_CONFIG": str(path)})


async def _tls(port: int, verify: ssl.SSLContext) -> trio.SSLStream[trio.SocketStream]:
    stream = await trio.open_ssl_over_tcp_stream(
        "127.0.0.1", port, ssl_context=verify, https_compatible=True
    )
    await stream.do_handshake()
    return stream


@pytest.mark.parametrize("mode", ["serve", "hypercorn"])
async def test_connection_limits_hold_over_tls(
    broker: Broker, tmp_path: Path, pem: Pem, mode: str
) -> None:
    """The guard sees the socket under the TLS stream, in both launch modes:
    with ``max_connections_per_ip = 1`` a second connection is reset before
    its handshake while the first is open; a connection that never starts
    its handshake is closed after ``idle_timeout`` (2 s, not Hypercorn's
    60 s); and one whose answers go unread is reset by ``send_timeout``
    (1 s). The service then stops cleanly."""
    port, admin = free_port(), free_port()
    server: dict[str, Any] = {
        "bind": [f"127.0.0.1:{port}"],
        "admin_bind": [f"127.0.0.1:{admin}"],
        "max_connections_per_ip": 1,
        "idle_timeout": 2.0,
        "send_timeout": 1.0,
    }
    if mode == "serve":
        server |= {"certfile": str(pem.cert), "keyfile": str(pem.key)}
    config = service_config(broker.bootstrap, unique_topic(), server=server)
    path = write_config(tmp_path / "tls.toml", config)
    service = _launch(mode, path, port, admin, pem)
    verify = _client_context(pem.ca)
    try:
        await trio.to_thread.run_sync(_until_ready, f"http://127.0.0.1:{admin}")
        with trio.fail_after(60):
            held = await _tls(port, verify)
            # reset in the handshake, or before the connect returned
            with pytest.raises((trio.BrokenResourceError, OSError)):
                await _tls(port, verify)
            await held.aclose()

            await trio.sleep(0.5)  # the first connection's count ends with its task
            silent = await trio.open_tcp_stream("127.0.0.1", port)
            started = trio.current_time()
            with suppress(trio.BrokenResourceError):
                assert await silent.receive_some(1024) == b""
            assert 1.5 < trio.current_time() - started < 4.5
            await silent.aclose()

            await trio.sleep(0.5)
            stalled = await _tls(port, verify)
            await never_read_until_reset(stalled)
            await trio.aclose_forcefully(stalled)
    finally:
        code = await trio.to_thread.run_sync(service.terminate)
    assert code == 0, service.output


def _bad(tmp_path: Path, pem: Pem, case: str) -> tuple[dict[str, str], str, str]:
    """(server keys, the key named, a part of the reason) for a bad case."""
    other = trustme.CA().issue_cert("127.0.0.1")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a PEM file\n")
    mismatched = tmp_path / "other-key.pem"
    other.private_key_pem.write_to_path(str(mismatched))
    cert, key = str(pem.cert), str(pem.key)
    cases = {
        "certfile alone": ({"certfile": cert}, "keyfile", "set both (HTTPS) or neither"),
        "keyfile alone": ({"keyfile": key}, "certfile", "set both (HTTPS) or neither"),
        "certfile missing": (
            {"certfile": str(tmp_path / "nope.pem"), "keyfile": key},
            "certfile",
            "No such file or directory",
        ),
        "keyfile missing": (
            {"certfile": cert, "keyfile": str(tmp_path / "nope.pem")},
            "keyfile",
            "No such file or directory",
        ),
        # (a file of mode 0 would be readable to root: a directory cannot be read by anyone)
        "keyfile a directory": (
            {"certfile": cert, "keyfile": str(tmp_path)},
            "keyfile",
            "cannot read",
        ),
        "certfile not PEM": (
            {"certfile": str(garbage), "keyfile": key},
            "certfile",
            "no PEM certificate",
        ),
        "certfile a key": ({"certfile": key, "keyfile": key}, "certfile", "no PEM certificate"),
        "keyfile not PEM": (
            {"certfile": cert, "keyfile": str(garbage)},
            "keyfile",
            "no PEM private key",
        ),
        "keyfile a certificate": (
            {"certfile": cert, "keyfile": cert},
            "keyfile",
            "no PEM private key",
        ),
        "key of another certificate": (
            {"certfile": cert, "keyfile": str(mismatched)},
            "keyfile",
            "does not match the certificate of server.certfile",
        ),
    }
    return cases[case]


BAD_CASES = [
    "certfile alone",
    "keyfile alone",
    "certfile missing",
    "keyfile missing",
    "keyfile a directory",
    "certfile not PEM",
    "certfile a key",
    "keyfile not PEM",
    "keyfile a certificate",
    "key of another certificate",
]


@pytest.mark.parametrize("case", BAD_CASES)
def test_check_refuses_a_bad_tls_pair(tmp_path: Path, pem: Pem, case: str) -> None:
    server, key, reason = _bad(tmp_path, pem, case)
    path = write_config(tmp_path / "bad.toml", unreachable_config(server=server))
    result = run_cli("check", "--config", str(path))
    assert result.returncode == 2, result.stderr
    assert f"server.{key}: " in result.stderr
    assert reason in result.stderr


def test_serve_refuses_a_bad_tls_pair(tmp_path: Path, pem: Pem) -> None:
    server, _, _ = _bad(tmp_path, pem, "key of another certificate")
    path = write_config(tmp_path / "bad.toml", unreachable_config(server=server))
    service = ServiceProcess.cli(path)
    try:
        assert service.wait(30) == 2
        assert "server.keyfile: " in service.output
        assert "does not match the certificate of server.certfile" in service.output
    finally:
        service.kill()


def test_hypercorn_launch_refuses_certfile(tmp_path: Path, pem: Pem) -> None:
    """Under ``hypercorn`` TLS is Hypercorn's own (--certfile, --keyfile): a
    config that sets the keys fails the import, so nothing serves plain
    HTTP where HTTPS was meant."""
    server = {"certfile": str(pem.cert), "keyfile": str(pem.key)}
    path = write_config(tmp_path / "tls.toml", unreachable_config(server=server))
    service = ServiceProcess.hypercorn(path, 0)
    try:
        assert service.wait(60) == 1
        assert "server.certfile, server.keyfile: not used under hypercorn" in service.output
        assert "--certfile and --keyfile" in service.output
    finally:
        service.kill()


def test_check_accepts_a_chain_with_text_around_it(tmp_path: Path, pem: Pem) -> None:
    """A PEM file as OpenSSL writes them from a PKCS#12 bundle (non-ASCII
    "Bag Attributes" before the certificates) is a good certfile."""
    chain = tmp_path / "bagged.pem"
    chain.write_bytes("Bag Attributes\n    friendlyName: café\n".encode() + pem.cert.read_bytes())
    server = {"certfile": str(chain), "keyfile": str(pem.key)}
    path = write_config(tmp_path / "ok.toml", unreachable_config(server=server))
    result = run_cli("check", "--config", str(path))
    assert result.returncode == 0, result.stderr
