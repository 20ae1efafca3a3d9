"""``redirect-logger top``: the view model from fixed expositions, the screen, and
the command in a real terminal (tmux) against a running service."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import httpx
import pytest
from rich.console import Console

from brokers import Broker, free_port
from redirect_logger.top import (
    ScrapeError,
    Status,
    View,
    build_view,
    metrics_url,
    parse,
    render,
    run,
)
from support import ROOT, ServiceProcess, ledger_counts, service_config, unique_topic, write_config

HEAD = """\
# HELP redirect_logger_records_total Hit records by outcome
# TYPE redirect_logger_records_total counter
"""


def exposition(
    records: dict[str, int],
    gauges: dict[str, int],
    latency: dict[str, int] | None = None,
    hits: dict[tuple[str, str], int] | None = None,
) -> str:
    """Exposition text in the form prometheus_client writes it."""
    lines = [HEAD.rstrip("\n")]
    lines += [f'redirect_logger_records_total{{outcome="{o}"}} {v}.0' for o, v in records.items()]
    for name, value in gauges.items():
        lines += [f"# TYPE redirect_logger_{name} gauge", f"redirect_logger_{name} {value}.0"]
    if latency is not None:
        lines.append("# TYPE redirect_logger_delivery_latency_seconds histogram")
        lines += [
            f'redirect_logger_delivery_latency_seconds_bucket{{le="{le}"}} {count}.0'
            for le, count in latency.items()
        ]
        lines.append(f"redirect_logger_delivery_latency_seconds_count {latency['+Inf']}.0")
    if hits is not None:
        lines += [
            "# HELP redirect_logger_hits_total Hits",
            "# TYPE redirect_logger_hits_total counter",
        ]
        lines += [
            f'redirect_logger_hits_total{{rule="{rule}",status="{status}"}} {count}.0'
            for (rule, status), count in hits.items()
        ]
    return "\n".join(lines) + "\n"


BOUNDS = ("0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1.0")
BOUNDS += ("2.5", "5.0", "10.0", "30.0", "+Inf")


def buckets(*cumulative: int) -> dict[str, int]:
    """Histogram buckets: the given cumulative counts, the last one repeated to +Inf."""
    counts = list(cumulative) + [cumulative[-1]] * (len(BOUNDS) - len(cumulative))
    return dict(zip(BOUNDS, counts, strict=True))


LEDGER_1 = dict(
    received=1000, delivered=990, spilled=0, failed=0, dropped=0, shed=2, excluded=3,
    replayed=7, journaled=0,
)  # fmt: skip
LEDGER_2 = dict(
    received=1300, delivered=1280, spilled=10, failed=0, dropped=0, shed=2, excluded=3,
    replayed=7, journaled=0,
)  # fmt: skip
GAUGES_1 = dict(
    in_flight=5, queue_depth=3, queue_capacity=10000, producer_queue=2, ready=1,
    broker_reachable=1, spill_bytes=2048,
)  # fmt: skip
GAUGES_2 = {**GAUGES_1, "in_flight": 5, "queue_depth": 40, "spill_bytes": 3 * 1024 * 1024}
HITS_1 = {("home", "302"): 500, ("home", "503"): 0, ("docs", "301"): 100, ("(fallback)", "404"): 50}
HITS_2 = {("home", "302"): 700, ("home", "503"): 4, ("docs", "301"): 110, ("(fallback)", "404"): 90}

FIRST = exposition(LEDGER_1, GAUGES_1, buckets(0, 0, 0, 10), HITS_1)
# In the 2 s between the scrapes: 50 deliveries under 2.5 ms, 150 more under
# 5 ms, 90 more under 10 ms.
SECOND = exposition(LEDGER_2, GAUGES_2, buckets(0, 50, 200, 300), HITS_2)


def two(first: str = FIRST, second: str = SECOND, seconds: float = 2.0) -> View:
    return build_view(parse(first, 100.0), parse(second, 100.0 + seconds))


def test_rates_per_second_between_two_scrapes() -> None:
    view = two()
    assert view.interval == 2.0
    # failed and dropped are 0 and stay 0: no rate; shed is not 0: a rate.
    assert view.rates == {
        "received": 150.0,
        "delivered": 145.0,
        "spilled": 5.0,
        "replayed": 0.0,
        "shed": 0.0,
    }
    assert view.ledger == LEDGER_2
    assert view.in_flight == 5


def test_the_first_scrape_has_totals_and_no_rates() -> None:
    view = build_view(None, parse(FIRST, 100.0))
    assert view.interval is None
    assert view.rates == {}
    assert view.ledger == LEDGER_1
    assert (view.latency_count, view.latency_p50, view.latency_p99) == (0, None, None)
    assert view.rules is not None
    assert [(r.rule, r.rate, r.total) for r in view.rules] == [
        ("home", None, 500),
        ("docs", None, 100),
        ("(fallback)", None, 50),
    ]


def test_a_counter_that_went_down_counts_from_zero() -> None:
    restarted = exposition({**LEDGER_1, "received": 40, "delivered": 30}, GAUGES_1)
    view = two(SECOND, restarted, seconds=4.0)
    assert view.rates["received"] == 10.0
    assert view.rates["delivered"] == 7.5


def test_identity_holds() -> None:
    view = two()
    # 1300 = 1280 + 10 + 0 + 0 + 2 + 3 + 5
    assert view.imbalance == 0


def test_identity_off_by_a_batch() -> None:
    moving = exposition(LEDGER_2, {**GAUGES_2, "in_flight": 1})
    assert two(FIRST, moving).imbalance == 4
    lost = exposition({**LEDGER_2, "failed": 6}, GAUGES_2)
    assert two(FIRST, lost).imbalance == -6


def test_latency_quantiles_over_the_interval() -> None:
    view = two()
    assert view.latency_count == 290
    # rank 145 of 290: in (2.5 ms, 5 ms], holding ranks 51..200
    assert view.latency_p50 == pytest.approx(0.0025 + 0.0025 * 95 / 150)
    # rank 287.1: in (5 ms, 10 ms], holding ranks 201..290
    assert view.latency_p99 == pytest.approx(0.005 + 0.005 * 87.1 / 90)


def test_latency_past_the_last_bound_is_that_bound() -> None:
    slow = exposition(LEDGER_2, GAUGES_2, {**buckets(0, 0, 0, 10), "+Inf": 20})
    view = two(second=slow)
    assert view.latency_count == 10
    assert view.latency_p50 == 30.0 and view.latency_p99 == 30.0


def test_no_deliveries_in_the_interval() -> None:
    view = two(FIRST, FIRST)
    assert (view.latency_count, view.latency_p50, view.latency_p99) == (0, None, None)


def test_busiest_rules_by_rate_with_their_statuses() -> None:
    view = two()
    assert view.rules is not None
    assert [(r.rule, r.rate, r.total, r.by_status) for r in view.rules] == [
        ("home", 102.0, 704, (("302", 100.0), ("503", 2.0))),
        ("(fallback)", 20.0, 90, (("404", 20.0),)),
        ("docs", 5.0, 110, (("301", 5.0),)),
    ]
    top = build_view(parse(FIRST, 0.0), parse(SECOND, 2.0), top_rules=2)
    assert top.rules is not None
    assert [r.rule for r in top.rules] == ["home", "(fallback)"]
    assert top.rule_count == 3


def test_absent_metrics() -> None:
    bare = exposition(LEDGER_2, {})
    view = two(bare, bare)
    assert view.rules is None  # no per-rule counts exported
    assert view.workers == 1
    assert (view.queue_depth, view.queue_capacity, view.producer_queue) == (None, None, None)
    assert (view.spill_bytes, view.broker_reachable, view.ready) == (None, None, None)
    assert (view.latency_count, view.latency_p50) == (0, None)
    assert view.in_flight == 0
    assert view.imbalance == 5


def test_per_rule_counts_exported_before_any_hit() -> None:
    empty = exposition(LEDGER_1, GAUGES_1, hits={})
    assert two(empty, empty).rules == ()


def test_workers_gauge() -> None:
    group = exposition(LEDGER_2, {**GAUGES_2, "workers": 3, "ready": 2, "broker_reachable": 3})
    view = two(second=group)
    assert (view.workers, view.ready, view.broker_reachable) == (3, 2, 3)
    screen = screen_text(view)
    assert re.search(r"ready\s+2/3", screen), screen
    assert re.search(r"broker reachable\s+3/3", screen), screen
    assert "workers 3" in screen


@pytest.mark.parametrize(
    "text",
    ["<html>not metrics</html>\n", "# TYPE other counter\nother_total 1.0\n"],
)
def test_not_our_metrics(text: str) -> None:
    with pytest.raises(ScrapeError):
        parse(text, 0.0)


@pytest.mark.parametrize(
    ("admin", "url"),
    [
        ("http://127.0.0.1:9001", "http://127.0.0.1:9001/metrics"),
        ("http://127.0.0.1:9001/", "http://127.0.0.1:9001/metrics"),
        ("http://127.0.0.1:9001/metrics", "http://127.0.0.1:9001/metrics"),
        ("http://127.0.0.1:9001/metrics/", "http://127.0.0.1:9001/metrics"),
        ("127.0.0.1:9001", "http://127.0.0.1:9001/metrics"),
        ("https://lb.example/admin", "https://lb.example/admin/metrics"),
    ],
)
def test_metrics_url(admin: str, url: str) -> None:
    assert metrics_url(admin) == url


def screen_text(view: View, status: Status | None = None) -> str:
    console = Console(width=160, record=True, file=open(os.devnull, "w"))  # noqa: SIM115
    console.print(render(view, status or Status("http://x/metrics", 1.0, datetime.now())))
    return console.export_text()


def test_screen() -> None:
    status = Status("http://127.0.0.1:9001/metrics", 1.0, datetime(2026, 1, 2, 3, 4, 5))
    screen = screen_text(two(), status)
    assert re.search(r"received\s+1,300\s+150\.0\s", screen), screen
    assert re.search(r"delivered\s+1,280\s+145\.0\s", screen), screen
    assert re.search(r"failed\s+0\s*│?\s*$", screen, re.M), screen  # no rate when 0
    assert re.search(r"in_flight\s+5\s", screen), screen
    assert "identity holds" in screen
    assert re.search(r"channel queue\s+40 / 10,000", screen), screen
    assert re.search(r"spill journal\s+3\.0 MiB", screen), screen
    assert re.search(r"delivery latency\s+p50 4\.1 ms  p99 9\.8 ms", screen), screen
    assert re.search(r"home\s+102\.0\s+704\s+302: 100\.0  503: 2\.0", screen), screen
    assert "unreachable" not in screen
    status.failed("[Errno 111] Connection refused", datetime(2026, 1, 2, 3, 4, 9))
    screen = screen_text(two(), status)
    assert (
        "unreachable since 03:04:09: [Errno 111] Connection refused"
        " (the figures are from 03:04:05)" in screen
    ), screen
    bare = exposition(LEDGER_2, {})
    screen = screen_text(two(bare, bare))
    assert "the service does not export per-rule counts" in screen
    assert "off by +5" in screen


def test_unreachable_at_start(capsys: pytest.CaptureFixture[str]) -> None:
    assert run("http://127.0.0.1:9", 1.0) == 1  # the discard port: refused
    assert capsys.readouterr().err.startswith(
        "error: cannot scrape http://127.0.0.1:9/metrics: [Errno 111] Connection refused"
    )


def until(what: str, check: Callable[[], str], done: Callable[[str], bool], timeout: float) -> str:
    """Call ``check`` until ``done`` accepts what it returns, and return that;
    fails after ``timeout`` s, showing the last of it."""
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if done(found):
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s; last seen:\n{found}")
        time.sleep(0.1)


@pytest.mark.parametrize("workers", [0, 2])
def test_top_in_a_terminal(broker: Broker, tmp_path: Path, workers: int) -> None:
    """Against a real service (one process, or ``serve --workers 2`` whose
    scrapes sum the group): the exact ledger after 37 hits, the unreachable
    state once it stops, and Ctrl+C ends with 0."""
    main, admin = free_port(), free_port()
    config = service_config(
        broker.bootstrap,
        unique_topic(),
        server={"bind": [f"127.0.0.1:{main}"], "admin_bind": [f"127.0.0.1:{admin}"]},
    )
    launch = ["--workers", str(workers)] if workers else []
    service = ServiceProcess.cli(write_config(tmp_path / "c.toml", config), *launch)
    tmux = ["tmux", "-L", f"top-test-{uuid.uuid4().hex[:8]}"]
    code_file = tmp_path / "code"
    top = [sys.executable, "-m", "redirect_logger.cli", "top", "--admin", f"127.0.0.1:{admin}/"]

    # the pane's own size, not one a COLUMNS of the test run's would force on rich
    terminal_env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}

    def pane() -> str:
        captured = subprocess.run(
            [*tmux, "capture-pane", "-p", "-t", "top"], capture_output=True, text=True, timeout=10
        )
        return captured.stdout + captured.stderr

    def exit_code() -> str:
        return code_file.read_text().strip() if code_file.exists() else ""

    ready = "2/2" if workers else "yes"

    def settled(screen: str) -> bool:
        """Every hit delivered, and every worker ready (readiness follows
        librdkafka's statistics, which a busy machine can delay)."""
        delivered = re.search(r"^\s*delivered\s+37\s", screen, re.M)
        flags = re.search(rf"ready\s+{ready}\s", screen) and re.search(
            rf"reachable\s+{ready}\s", screen
        )
        return delivered is not None and "identity holds" in screen and flags is not None

    try:
        service.wait_for(re.compile("admin endpoints on"), max(workers, 1), timeout=60)
        with httpx.Client(base_url=f"http://127.0.0.1:{main}", timeout=10) as client:
            for n in range(37):  # a new connection each: a group's workers share them
                assert client.get(f"/?n={n}", headers={"connection": "close"}).status_code == 302
            exposed = client.get(f"http://127.0.0.1:{admin}/metrics").text
        subprocess.run(
            [
                *tmux,
                "new-session", "-d", "-x", "160", "-y", "50", "-s", "top", "-c", str(ROOT),
                "-e", f"PYTHONPATH={os.environ.get('PYTHONPATH', '')}",
                f"{shlex.join(top)}; echo $? > {shlex.quote(str(code_file))}",
            ],
            check=True,
            timeout=10,
            env=terminal_env,
        )  # fmt: skip

        screen = until("delivered 37 on screen", pane, settled, 20)
        assert re.search(r"^\s*received\s+37\s", screen, re.M), screen
        for outcome in ("spilled", "failed", "dropped", "shed", "excluded", "in_flight"):
            assert re.search(rf"^\s*{outcome}\s+0\s", screen, re.M), screen
        assert f"http://127.0.0.1:{admin}/metrics" in screen
        assert f"workers {max(workers, 1)}" in screen
        assert "redirect_logger_hits_total" in exposed
        screen = until(
            "the busiest rule with its rate",
            pane,
            lambda s: re.search(r"^\s*home\s+0\.0\s+37\s+302: 0\.0", s, re.M) is not None,
            20,
        )

        assert service.terminate() == 0
        ledgers = service.ledgers()
        assert len(ledgers) == max(workers, 1)
        assert {key: sum(ledger[key] for ledger in ledgers) for key in ledgers[0]} == ledger_counts(
            received=37, delivered=37
        )
        screen = until("unreachable on screen", pane, lambda s: "unreachable since" in s, 10)
        assert re.search(r"^\s*delivered\s+37\s", screen, re.M), screen  # the last figures stay

        subprocess.run([*tmux, "send-keys", "-t", "top", "C-c"], check=True, timeout=10)
        assert until("top's exit code", exit_code, bool, 10) == "0"
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True, timeout=10)
        service.kill()
