"""A real headless Chromium (Debian's, driven by Playwright) uses the collect endpoint.

A page on another origin (a small HTTP server here, on its own port) beacons
an event with ``navigator.sendBeacon`` from a link's click handler while the
link navigates through a redirect rule of the service; it also posts with
``fetch`` and credentials (a CORS preflight). The same page from an origin
that is not allowed is refused by the browser. Kafka then holds exactly the
two events and the redirect hit.
"""

from __future__ import annotations

import shutil
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import trio
from playwright.sync_api import sync_playwright

from brokers import Broker
from support import (
    check_record_schema,
    ledger_counts,
    read_topic,
    service_config,
    start_service,
    unique_topic,
)

# Nothing leaves loopback: other hosts resolve to nothing and would go to a
# proxy where nothing listens.
CHROMIUM_ARGS = [
    "--proxy-server=http://127.0.0.1:9",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--no-default-browser-check",
]

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>shop</title></head>
<body>
<a id="buy" href="{service}/go/checkout?c=1">buy</a>
<script>
const collect = "{service}/collect";
document.getElementById("buy").addEventListener("click", () => {{
  const sent = navigator.sendBeacon(
    collect, JSON.stringify({{type: "click", token: "{token}", link: "buy"}}));
  if (!sent) throw new Error("beacon not queued");
}});
async function post() {{
  try {{
    const response = await fetch(collect, {{
      method: "POST",
      credentials: "include",
      headers: {{"content-type": "application/json"}},
      body: JSON.stringify({{type: "fetch", token: "{token}", origin: location.origin}}),
    }});
    return [response.status, await response.json()];
  }} catch (error) {{
    return [error.name];
  }}
}}
</script>
</body></html>
"""


@contextmanager
def page_server(html: dict[str, bytes]) -> Iterator[tuple[int, list[str]]]:
    """Serve ``html`` by path on 127.0.0.1 (any other path: 404); yields the
    port and the paths requested."""
    requested: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            requested.append(self.path)
            body = html.get(self.path.partition("?")[0])
            self.send_response(200 if body is not None else 404)
            self.send_header("content-type", "text/html; charset=utf-8")
            self.send_header("content-length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], requested
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def drive_chromium(chromium: str, page_url: str, landed_url: str, other_url: str) -> dict[str, Any]:
    """In the browser: fetch from the allowed page, click the link (beacon and
    navigation), then fetch from the page of the other origin."""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium, args=CHROMIUM_ARGS, timeout=60_000
        )
        try:
            page = browser.new_page()
            page.set_default_timeout(30_000)
            page.goto(page_url)
            fetched = page.evaluate("post()")
            user_agent = page.evaluate("navigator.userAgent")
            page.click("#buy")
            page.wait_for_url(landed_url)
            other = browser.new_page()
            other.set_default_timeout(30_000)
            other.goto(other_url)
            refused = other.evaluate("post()")
        finally:
            browser.close()
    return {"fetched": fetched, "refused": refused, "user_agent": user_agent}


async def test_a_page_in_chromium_beacons_an_event_and_follows_a_redirect(broker: Broker) -> None:
    chromium = shutil.which("chromium")
    assert chromium is not None, "Debian's chromium is required: apt-get install chromium"
    token = uuid.uuid4().hex
    topic = unique_topic()
    stop = trio.Event()
    pages: dict[str, bytes] = {}
    with page_server(pages) as (port, requested), trio.fail_after(150):
        page_origin = f"http://127.0.0.1:{port}"
        config = service_config(
            broker.bootstrap,
            topic,
            rules=[
                {
                    "name": "checkout",
                    "path": "/go/*",
                    "target": f"{page_origin}/landed",
                    "status": 302,
                }
            ],
            collect={"enabled": True, "cors_origins": [page_origin]},
        )
        async with trio.open_nursery() as nursery:
            service, codes = await start_service(nursery, config, stop)
            page = PAGE.format(service=service.binds[0], token=token).encode()
            pages.update({"/": page, "/landed": b"<!doctype html><title>landed</title>"})
            seen = await trio.to_thread.run_sync(
                drive_chromium,
                chromium,
                f"{page_origin}/",
                f"{page_origin}/landed?c=1",
                f"http://localhost:{port}/",  # another origin, not in cors_origins
            )
            while service.ledger.received < 3:  # noqa: ASYNC110 - the beacon may trail
                await trio.sleep(0.05)
            stop.set()
    assert codes == [0]
    assert seen["fetched"] == [202, {"accepted": 1}]
    assert seen["refused"] == ["TypeError"]  # the preflight got no Access-Control-Allow-Origin
    assert requested.count("/landed?c=1") == 1
    assert service.ledger_snapshot() == ledger_counts(received=3, delivered=3)
    registry = service.metrics.registry
    assert (
        registry.get_sample_value("redirect_logger_collect_rejected_total", {"reason": "origin"})
        == 1
    )

    records = await trio.to_thread.run_sync(read_topic, broker.bootstrap, topic, 30.0, 3)
    assert len(records) == 3
    for record in records:
        check_record_schema(record)
        assert (record["client_ip"], record["user_agent"]) == ("127.0.0.1", seen["user_agent"])
        assert record["referer"] == f"{page_origin}/"  # strict-origin-when-cross-origin
    events = sorted((r for r in records if r["kind"] == "event"), key=lambda r: r["data"]["type"])
    assert [(r["method"], r["path"], r["status"], r["data"]) for r in events] == [
        ("POST", "/collect", 202, {"type": "click", "token": token, "link": "buy"}),
        ("POST", "/collect", 202, {"type": "fetch", "token": token, "origin": page_origin}),
    ]
    (hit,) = (r for r in records if r["kind"] == "redirect")
    assert (hit["method"], hit["path"], hit["query"], hit["status"], hit["rule"]) == (
        "GET",
        "/go/checkout",
        "c=1",
        302,
        "checkout",
    )
    assert hit["location"] == f"{page_origin}/landed?c=1"
