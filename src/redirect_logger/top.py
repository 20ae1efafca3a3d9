"""``redirect-logger top``: a live terminal view of a running service's /metrics.

Three parts: ``parse`` and ``build_view`` turn two scrapes into a ``View``
(pure, no I/O); ``render`` lays a view out with rich; ``run`` scrapes once per
interval and redraws until Ctrl+C.
"""

from __future__ import annotations

import http.client
import math
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime

from prometheus_client.parser import text_string_to_metric_families
from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from .ledger import OUTCOMES, SETTLED

PREFIX = "redirect_logger_"
RECORDS = f"{PREFIX}records_total"
HITS = f"{PREFIX}hits_total"
LATENCY = f"{PREFIX}delivery_latency_seconds"
ALWAYS_RATED = ("received", "delivered", "spilled", "replayed")
RATED_WHEN_NONZERO = ("failed", "dropped", "shed")
TOP_RULES = 10
MISSING = "-"  # a gauge the service does not export

Labels = frozenset[tuple[str, str]]


class ScrapeError(Exception):
    """The metrics URL could not be fetched, or did not hold this service's metrics."""


@dataclass(frozen=True)
class Scrape:
    """One parsed exposition: each sample's value by sample name and labels."""

    at: float  # seconds on a monotonic clock
    samples: dict[str, dict[Labels, float]]
    families: frozenset[str]

    def value(self, name: str, **labels: str) -> float | None:
        """The sum of the samples of ``name`` carrying ``labels``; None when there are none."""
        wanted = set(labels.items())
        found = [v for key, v in self.samples.get(name, {}).items() if wanted <= key]
        return sum(found) if found else None


def parse(text: str, at: float) -> Scrape:
    """Parse a Prometheus text exposition; raises ScrapeError if it is not one of ours."""
    samples: dict[str, dict[Labels, float]] = defaultdict(dict)
    families = set()
    try:
        for family in text_string_to_metric_families(text):
            families.add(family.name)
            for sample in family.samples:
                key = frozenset(sample.labels.items())
                samples[sample.name][key] = samples[sample.name].get(key, 0.0) + sample.value
    except ValueError as exc:
        raise ScrapeError(f"not a Prometheus exposition: {exc}") from exc
    if RECORDS not in samples:
        raise ScrapeError(f"no {RECORDS} in the exposition: not a redirect_logger service")
    return Scrape(at, dict(samples), frozenset(families))


@dataclass(frozen=True)
class RuleRow:
    rule: str
    total: int
    rate: float | None  # hits/s over the interval; None on the first scrape
    by_status: tuple[tuple[str, float], ...]  # (status, hits/s, or total on the first scrape)


@dataclass(frozen=True)
class View:
    """What the screen shows, from the latest scrape and the one before it."""

    interval: float | None  # seconds between the two scrapes; None on the first
    ledger: dict[str, int]  # outcome -> total, every outcome of OUTCOMES
    in_flight: int
    rates: dict[str, float]  # outcome -> records/s; empty on the first scrape
    workers: int
    queue_depth: int | None
    queue_capacity: int | None
    producer_queue: int | None
    spill_bytes: int | None
    broker_reachable: int | None  # workers with a broker connection
    ready: int | None  # workers answering /readyz with 200
    latency_count: int  # deliveries in the interval
    latency_p50: float | None  # seconds, estimated from the histogram buckets
    latency_p99: float | None
    rules: tuple[RuleRow, ...] | None  # None: the service exports no per-rule counts
    rule_count: int = 0  # rules with hits; ``rules`` holds the busiest of them

    @property
    def imbalance(self) -> int:
        """received - (delivered + spilled + failed + dropped + shed + excluded + in_flight)."""
        settled = sum(self.ledger[outcome] for outcome in SETTLED)
        return self.ledger["received"] - settled - self.in_flight


def _increase(now: float, before: float | None) -> float:
    """A counter's increase; a counter that went down was reset (the service restarted)."""
    if before is None or now < before:
        return now
    return now - before


def _gauge(scrape: Scrape, name: str) -> int | None:
    value = scrape.value(PREFIX + name)
    return None if value is None else round(value)


def _quantile(q: float, increases: list[tuple[float, float]]) -> float | None:
    """Estimate the q-quantile from cumulative bucket increases [(upper bound, count)],
    interpolating linearly inside a bucket; None when the interval saw nothing."""
    increases = sorted(increases)
    if not increases or increases[-1][1] <= 0:
        return None
    rank = q * increases[-1][1]
    lower, below = 0.0, 0.0
    for upper, count in increases:
        if count >= rank:
            if math.isinf(upper):
                return lower  # past the last finite bound: that bound is all we know
            share = (rank - below) / (count - below) if count > below else 1.0
            return lower + (upper - lower) * share
        lower, below = upper, count
    return lower


def _latency(previous: Scrape, current: Scrape) -> tuple[int, float | None, float | None]:
    """Deliveries between the scrapes, and their p50 and p99 (None without any)."""
    buckets = current.samples.get(f"{LATENCY}_bucket", {})
    before = previous.samples.get(f"{LATENCY}_bucket", {})
    total_now = current.value(f"{LATENCY}_count") or 0.0
    total_before = previous.value(f"{LATENCY}_count")
    reset = total_before is not None and total_now < total_before
    increases: dict[float, float] = defaultdict(float)
    for labels, value in buckets.items():
        bound = float(dict(labels)["le"])
        increases[bound] += value if reset else value - before.get(labels, 0.0)
    pairs = list(increases.items())
    return (
        round(_increase(total_now, None if reset else total_before)),
        _quantile(0.5, pairs),
        _quantile(0.99, pairs),
    )


def _rules(previous: Scrape | None, current: Scrape, elapsed: float | None) -> list[RuleRow]:
    totals: dict[str, float] = defaultdict(float)
    by_status: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    before = previous.samples.get(HITS, {}) if previous else {}
    for labels, value in current.samples.get(HITS, {}).items():
        named = dict(labels)
        rule, status = named.get("rule", "?"), named.get("status", "?")
        totals[rule] += value
        if elapsed:
            by_status[rule][status] += _increase(value, before.get(labels)) / elapsed
        else:
            by_status[rule][status] += value
    rows = []
    for rule, total in totals.items():
        statuses = sorted(by_status[rule].items(), key=lambda item: (-item[1], item[0]))
        rate = sum(by_status[rule].values()) if elapsed else None
        rows.append(RuleRow(rule, round(total), rate, tuple(statuses)))
    rows.sort(key=lambda row: (-(row.rate or 0.0), -row.total, row.rule))
    return rows


def build_view(previous: Scrape | None, current: Scrape, top_rules: int = TOP_RULES) -> View:
    """The view of ``current``, with rates over the time since ``previous`` (none if None)."""
    elapsed = current.at - previous.at if previous is not None else None
    if elapsed is not None and elapsed <= 0:
        elapsed = None
    ledger = {o: round(current.value(RECORDS, outcome=o) or 0.0) for o in OUTCOMES}
    rates: dict[str, float] = {}
    if elapsed is not None and previous is not None:
        for outcome in (*ALWAYS_RATED, *RATED_WHEN_NONZERO):
            increase = _increase(
                current.value(RECORDS, outcome=outcome) or 0.0,
                previous.value(RECORDS, outcome=outcome),
            )
            if outcome in ALWAYS_RATED or increase or ledger[outcome]:
                rates[outcome] = increase / elapsed
    count, p50, p99 = _latency(previous, current) if previous else (0, None, None)
    exported = "redirect_logger_hits" in current.families or HITS in current.samples
    rules = _rules(previous, current, elapsed) if exported else None
    return View(
        interval=elapsed,
        ledger=ledger,
        in_flight=_gauge(current, "in_flight") or 0,
        rates=rates,
        workers=_gauge(current, "workers") or 1,
        queue_depth=_gauge(current, "queue_depth"),
        queue_capacity=_gauge(current, "queue_capacity"),
        producer_queue=_gauge(current, "producer_queue"),
        spill_bytes=_gauge(current, "spill_bytes"),
        broker_reachable=_gauge(current, "broker_reachable"),
        ready=_gauge(current, "ready"),
        latency_count=count,
        latency_p50=p50,
        latency_p99=p99,
        rules=None if rules is None else tuple(rules[:top_rules]),
        rule_count=0 if rules is None else len(rules),
    )


@dataclass
class Status:
    """The scraping side of the screen: where from, and whether it still answers."""

    url: str
    interval: float  # seconds between scrapes
    scraped: datetime  # when the figures on screen were scraped
    failing_since: datetime | None = None
    error: str = ""

    def succeeded(self, now: datetime) -> None:
        self.scraped, self.failing_since, self.error = now, None, ""

    def failed(self, error: str, now: datetime) -> None:
        self.failing_since = self.failing_since or now
        self.error = error


def _count(value: int | None) -> str:
    return MISSING if value is None else f"{value:,}"


def _seconds(value: float | None) -> str:
    if value is None:
        return MISSING
    return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"


def _bytes(value: int | None) -> str:
    if value is None:
        return MISSING
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _flag(value: int | None, workers: int) -> Text:
    """A 0/1 gauge (summed over ``workers``): green when every worker says 1."""
    if value is None:
        return Text(MISSING)
    text = ("yes" if value else "no") if workers == 1 else f"{value}/{workers}"
    return Text(text, style="green" if value >= workers else "bold red")


def _header(view: View, status: Status) -> Text:
    header = Text.assemble(
        ("redirect-logger top", "bold"),
        f"  {status.url}  every {status.interval:g} s  workers {view.workers}  ",
        f"scraped {status.scraped:%H:%M:%S}",
    )
    if status.failing_since is not None:
        header.append(
            f"\nunreachable since {status.failing_since:%H:%M:%S}: {status.error}"
            f" (the figures are from {status.scraped:%H:%M:%S})",
            style="bold red",
        )
    return header


def _rate(view: View, outcome: str) -> str:
    rate = view.rates.get(outcome)
    return "" if rate is None else f"{rate:,.1f}"


def _records(view: View) -> RenderableType:
    table = Table(title="records", title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("outcome")
    table.add_column("total", justify="right")
    table.add_column("/s", justify="right")
    for outcome in ("received", *SETTLED):
        lost = outcome == "failed" and view.ledger[outcome] > 0
        table.add_row(
            outcome,
            _count(view.ledger[outcome]),
            _rate(view, outcome),
            style="bold red" if lost else None,
        )
    table.add_row("in_flight", _count(view.in_flight), "", end_section=True)
    for outcome in ("replayed", "journaled"):
        table.add_row(outcome, _count(view.ledger[outcome]), _rate(view, outcome))
    if view.imbalance == 0:
        identity = Text("identity holds", style="green")
    else:
        identity = Text(
            f"identity off by {view.imbalance:+,} (a batch in motion, unless it lasts)",
            style="yellow",
        )
    formula = "received = delivered + spilled + failed\n  + dropped + shed + excluded + in_flight"
    return Group(table, identity, Text(formula, style="dim"))


def _pipeline(view: View) -> RenderableType:
    table = Table.grid(padding=(0, 2))
    table.title, table.title_justify = "pipeline", "left"
    table.add_column()
    table.add_column(justify="right")
    queue = _count(view.queue_depth)
    if view.queue_capacity:
        queue += f" / {view.queue_capacity:,}"
    table.add_row("channel queue", queue)
    table.add_row("producer queue", _count(view.producer_queue))
    table.add_row("spill journal", _bytes(view.spill_bytes))
    table.add_row("ready", _flag(view.ready, view.workers))
    table.add_row("broker reachable", _flag(view.broker_reachable, view.workers))
    if view.latency_count:
        latency = f"p50 {_seconds(view.latency_p50)}  p99 {_seconds(view.latency_p99)}"
    else:
        latency = "no deliveries" if view.interval else MISSING
    table.add_row("delivery latency", latency)
    return table


def _rule_table(view: View) -> RenderableType:
    if view.rules is None:
        return Text("the service does not export per-rule counts (redirect_logger_hits_total)")
    if not view.rules:
        return Text("no hits by rule yet")
    over = f"/s over the last {view.interval:.1f} s" if view.interval else "totals so far"
    shown = (
        f"top {len(view.rules)} of {view.rule_count}" if view.rule_count > len(view.rules) else ""
    )
    table = Table(
        title=f"busiest rules {shown}".rstrip(), title_justify="left", box=box.SIMPLE_HEAD
    )
    table.add_column("rule", no_wrap=True, overflow="ellipsis", max_width=40)
    table.add_column("/s", justify="right")
    table.add_column("total", justify="right")
    table.add_column(f"by status ({over})", no_wrap=True, overflow="ellipsis")
    for row in view.rules:
        statuses = "  ".join(
            f"{status}: {value:,.1f}" if view.interval else f"{status}: {value:,.0f}"
            for status, value in row.by_status
        )
        rate = "" if row.rate is None else f"{row.rate:,.1f}"
        table.add_row(row.rule, rate, _count(row.total), statuses)
    return table


def render(view: View, status: Status) -> RenderableType:
    """The whole screen: a header, the records and the pipeline side by side, the rules."""
    middle = Table.grid(padding=(0, 6))
    middle.add_row(_records(view), _pipeline(view))
    return Group(_header(view, status), Text(""), middle, Text(""), _rule_table(view))


def metrics_url(admin: str) -> str:
    """``admin`` as the URL of its /metrics: the scheme defaults to http, and
    ``/metrics`` is added unless the path ends with it already."""
    text = admin.strip()
    if "://" not in text:
        text = f"http://{text}"
    parts = urllib.parse.urlsplit(text)
    path = parts.path.rstrip("/")
    if not path.endswith("/metrics"):
        path += "/metrics"
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


def scrape(url: str, timeout: float) -> Scrape:
    """GET ``url`` and parse it; raises ScrapeError, within ``timeout`` s per socket operation."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            body: bytes = response.read()
    except urllib.error.HTTPError as exc:
        raise ScrapeError(f"HTTP {exc.code} {exc.reason}") from exc
    except urllib.error.URLError as exc:
        raise ScrapeError(str(exc.reason)) from exc
    except (OSError, http.client.HTTPException) as exc:
        raise ScrapeError(str(exc) or type(exc).__name__) from exc
    return parse(body.decode("utf-8", "replace"), time.monotonic())


def run(admin: str, interval: float, console: Console | None = None) -> int:
    """Show the live view until Ctrl+C (then 0). Returns 1, with a message on
    stderr, when the first scrape fails; later failures are shown on screen."""
    url = metrics_url(admin)
    timeout = interval * 0.8  # a scrape that hangs must not stall the screen
    try:
        try:
            current = scrape(url, timeout)
        except ScrapeError as exc:
            print(f"error: cannot scrape {url}: {exc}", file=sys.stderr)
            return 1
        status = Status(url, interval, datetime.now())
        view = build_view(None, current)
        console = console or Console()
        with Live(render(view, status), console=console, screen=True, auto_refresh=False) as live:
            tick = current.at
            while True:
                tick = max(tick + interval, time.monotonic())
                time.sleep(tick - time.monotonic())
                try:
                    latest = scrape(url, timeout)
                except ScrapeError as exc:
                    status.failed(str(exc), datetime.now())
                else:
                    view, current = build_view(current, latest), latest
                    status.succeeded(datetime.now())
                live.update(render(view, status), refresh=True)
    except KeyboardInterrupt:
        return 0
