"""The collect endpoint under load: events/s by batch size, against redirects/s.

    python benchmarks/collect_load.py [--bootstrap HOST:PORT] [--seconds 10]
        [--rounds 3] [--connections 64] [--batches 1 10 100] [--gzip-batches 100]
        [--protobuf-batches 1 100] [--pad BYTES] [--collect-toml LINES]
        [--kafka-toml LINES]

Every run starts ``redirect-logger serve`` (the real CLI) afresh with
``[collect] enabled = true`` (``max_events = 1000``, the events in a topic of
their own, ``[collect.protobuf]`` with tests/protos/gps.binpb) and loads it
with ``wrk -t1 --latency`` (keep-alive, loopback) for --seconds. A case is a
batch size, a form and a content coding: ``POST /collect`` with
``{"events": [...]}`` of N events (one case per --batches entry), the same
gzipped, ``Content-Encoding: gzip`` (one per --gzip-batches entry), or N
``tutorial.REALTIMEGPS`` messages, delimited (one per --protobuf-batches
entry); or ``GET /docs/a?x=1``, the redirect, on the same config. --pad adds
that many bytes to each JSON event (protobuf messages keep their size), and
--collect-toml and --kafka-toml add lines to those tables (say, a smaller
``max_bytes_in_flight``). The report sets each case's events/s, and its
events per CPU second, beside plain JSON's at the same batch size. The cases
are interleaved, in a rotating order, round after round. While wrk runs,
``redirect_logger_bytes_in_flight`` is sampled every 0.2 s for its peak.
Before SIGTERM it reads the service's peak RSS (``VmHWM``) and its
``/metrics``; after, the ledger it logs at exit. Every run must add up: every
answer the expected status (202 without ``dropped``, or 301), no socket
errors, ledger received = delivered, events in Kafka = events accepted, hits
in Kafka = the other records received. The script exits 1 if one does not.
Without --bootstrap it starts Apache Kafka itself (tests/brokers.py, through
compare.py). Bounded: every run stops after --seconds; broker, service and
wrk are stopped on the way out, also on errors.
"""

from __future__ import annotations

import argparse
import gzip
import http.client
import json
import os
import re
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.internal.encoder import _VarintBytes

from compare import _broker, _peak_rss, _records, run_wrk, wrk_figures
from served import Served, write_config

REDIRECT = "/docs/a?x=1"
LOCATION = "https://docs.example.com/a?x=1"
COLLECT = "/collect"
MAX_EVENTS = 1000  # collect.max_events: above the largest batch asked for by default
GPS_SCHEMA = Path(__file__).resolve().parent.parent / "tests" / "protos" / "gps.binpb"
GPS = "tutorial.REALTIMEGPS"
PROTOBUF = f"application/x-protobuf; messageType={GPS}; delimited=true"

# Counts every answer by status, and 202s whose body says some events were dropped.
LUA = """
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) statuses = {}; dropped = 0 end
function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
  if body and string.find(body, "dropped", 1, true) then dropped = dropped + 1 end
end
function done(summary, latency, requests)
  for _, thread in ipairs(threads) do
    for status, n in pairs(thread:get("statuses")) do
      io.write(string.format("status %d %d\\n", status, n))
    end
    io.write(string.format("dropped %d\\n", thread:get("dropped")))
  end
end
"""


@dataclass(frozen=True)
class Case:
    """What wrk sends: ``batch`` events a request (0: the redirect) in
    ``form`` ("json" or "protobuf"), with ``coding`` as its
    ``Content-Encoding`` ("" for none)."""

    batch: int
    form: str = "json"
    coding: str = ""

    @property
    def name(self) -> str:
        if self.batch == 0:
            return "redirect"
        form = "batch" if self.form == "json" else self.form
        return f"{self.coding} {form} {self.batch}".strip()

    @property
    def content_type(self) -> str:
        return PROTOBUF if self.form == "protobuf" else "application/json"

    @property
    def plain(self) -> Case:
        """Plain JSON at the same batch size: what the other forms are set beside."""
        return Case(self.batch)

    def body(self, pad: int = 0) -> bytes:
        """A request's body, encoded by ``coding``; ``pad``: bytes added to each JSON event."""
        data = _protobuf_body(self.batch) if self.form == "protobuf" else _body(self.batch, pad)
        return gzip.compress(data) if self.coding == "gzip" else data


@dataclass
class Run:
    case: Case
    rps: float
    p50: float  # ms
    p99: float
    answered: int  # wrk's count; the check request before wrk is one more
    statuses: dict[int, int]  # wrk's answers by status
    dropped: int  # 202 answers that said some events were dropped
    socket_errors: str  # wrk's line, "" if none
    peak_rss: float  # MiB
    accepted: int  # events, from /metrics before SIGTERM
    received: int  # records, from /metrics before SIGTERM
    ledger: dict[str, int]
    hits_in_kafka: int
    events_in_kafka: int
    cpu: float  # s of CPU the service used from wrk's start until its counts settled
    peak_bytes: float  # MiB, the peak of redirect_logger_bytes_in_flight sampled

    @property
    def batch(self) -> int:
        return self.case.batch

    @property
    def cpu_per_record(self) -> float:
        """µs of the service's CPU (all its threads) per record received."""
        return self.cpu / max(self.ledger["received"], 1) * 1e6

    @property
    def events_per_s(self) -> float:
        """Records/s: events for a batch, one per redirect."""
        return self.rps * max(self.batch, 1)

    def checks(self, connections: int) -> list[tuple[str, bool]]:
        expected = 301 if self.batch == 0 else 202
        ledger = self.ledger
        checks = [
            (
                f"every answer {expected}: {self.statuses}",
                set(self.statuses) <= {expected}
                and sum(self.statuses.values()) == self.answered
                and not self.dropped,
            ),
            (f"no socket errors {self.socket_errors}".strip(), not self.socket_errors),
            (
                f"ledger received {ledger['received']:,} = delivered {ledger['delivered']:,}",
                ledger["received"] == ledger["delivered"],
            ),
            (
                f"/metrics before SIGTERM: received {self.received:,} = ledger at exit",
                self.received == ledger["received"],
            ),
            (
                f"events in Kafka {self.events_in_kafka:,} = accepted {self.accepted:,}",
                self.events_in_kafka == self.accepted,
            ),
            (
                f"hits in Kafka {self.hits_in_kafka:,} = received - accepted "
                f"{ledger['received'] - self.accepted:,}",
                self.hits_in_kafka == ledger["received"] - self.accepted,
            ),
        ]
        if self.batch:
            # Whole requests only. wrk leaves out those in flight when it stops.
            requests, left = divmod(self.accepted, self.batch)
            requests -= 1  # the check request
            checks.append(
                (
                    f"accepted = {self.batch} x (1 + {requests:,}) requests "
                    f"({self.answered:,} answered to wrk)",
                    not left and 0 <= requests - self.answered <= connections,
                )
            )
        else:
            checks.append(
                (
                    f"received {ledger['received']:,} = 1 + answered {self.answered:,} "
                    "+ those in flight",
                    0 <= ledger["received"] - 1 - self.answered <= connections,
                )
            )
        return checks


@dataclass(frozen=True)
class Setup:
    """What every run shares: --pad, --collect-toml and --kafka-toml."""

    pad: int = 0  # bytes added to each JSON event
    collect: str = ""  # TOML lines added to [collect]
    kafka: str = ""  # TOML lines added to [kafka]


def _body(batch: int, pad: int = 0) -> bytes:
    """``{"events": [...]}`` with ``batch`` beacon-like events (about 110
    bytes each, and ``pad`` more)."""
    session = uuid.uuid4().hex[:16]
    events = [
        {
            "type": "click",
            "page": "/pricing",
            "target": "signup",
            "session": session,
            "seq": seq,
            "props": {"variant": "b", "viewport": [1280, 720]},
            **({"pad": "p" * pad} if pad else {}),
        }
        for seq in range(batch)
    ]
    return json.dumps({"events": events}, separators=(",", ":")).encode()


def _gps_class() -> type:
    files = descriptor_pb2.FileDescriptorSet.FromString(GPS_SCHEMA.read_bytes())
    pool = descriptor_pool.DescriptorPool()
    for file in files.file:
        pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(GPS))


def _protobuf_body(batch: int) -> bytes:
    """``batch`` GPS reports of one tracker, delimited (about 100 bytes each,
    about 330 as JSON): a position, a fix time, three satellites."""
    message_class = _gps_class()
    body = b""
    for seq in range(batch):
        message = message_class(
            device_id="tracker-0042", sequence=1_000_000 + seq, fix=2, odometer=123_456_789
        )
        message.fix_time.seconds = 1_790_000_000 + seq
        message.fix_time.nanos = 250_000_000
        position = message.position
        position.latitude, position.longitude = 52.520008 + seq * 1e-5, 13.404954
        position.altitude, position.speed, position.heading = 34.5, 42.25, 270
        for prn in (3, 7, 12):
            message.satellites.add(prn=prn, snr=30.5 + prn, used=prn != 12)
        message.battery = 87
        data = message.SerializeToString()
        body += _VarintBytes(len(data)) + data
    return body


def read_cost(case: Case, pad: int = 0) -> float:
    """µs of CPU per event to read a request's body into the events' JSON,
    as the endpoint does on the event loop (inflating it first if coded):
    the best of 7 rounds of 0.2 s, in this process (no server)."""
    from redirect_logger.collect import parse_events, written
    from redirect_logger.decoding import decoded
    from redirect_logger.protobuf import Decoder, load_schema

    body = case.body(pad)
    limit = 2**30
    if case.form == "protobuf":
        decoder = Decoder(load_schema(str(GPS_SCHEMA), [], [GPS]), [GPS], MAX_EVENTS, limit)
        events = decoder.reader(PROTOBUF.encode())
    else:

        def events(data: bytes) -> list[bytes]:
            return written(parse_events(data, "application/json", MAX_EVENTS), limit)

    def read() -> list[bytes]:
        return events(decoded(body, case.coding, limit) if case.coding else body)

    assert len(read()) == case.batch

    def best(function: Callable[[], object]) -> float:
        rounds = []
        for _ in range(7):
            count, start = 0, time.process_time()
            while time.process_time() - start < 0.2:
                function()
                count += 1
            rounds.append((time.process_time() - start) / count / case.batch * 1e6)
        return min(rounds)

    return best(read)


def _script(path: Path, case: Case, pad: int = 0) -> Path:
    lines = [LUA]
    if case.batch:
        lines += [
            'wrk.method = "POST"',
            f'wrk.headers["Content-Type"] = "{case.content_type}"',
            # every byte escaped (Lua's \ddd): gzip and protobuf bodies are binary
            'wrk.body = "' + "".join(f"\\{byte}" for byte in case.body(pad)) + '"',
        ]
        if case.coding:
            lines.append(f'wrk.headers["Content-Encoding"] = "{case.coding}"')
    path.write_text("\n".join(lines) + "\n")
    return path


def _request(
    url: str,
    method: str,
    path: str,
    body: bytes | None = None,
    content_type: str = "application/json",
    coding: str = "",
) -> tuple[int, str, str]:
    """Status, Location and body of one request (no redirect followed)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        headers = {"Content-Type": content_type} if body is not None else {}
        if coding:
            headers["Content-Encoding"] = coding
        connection.request(method, path, body, headers)
        response = connection.getresponse()
        return response.status, response.getheader("Location", ""), response.read().decode()
    finally:
        connection.close()


def _check(url: str, case: Case, pad: int = 0) -> None:
    if case.batch == 0:
        status, location, _ = _request(url, "GET", REDIRECT)
        if (status, location) != (301, LOCATION):
            raise RuntimeError(f"GET {REDIRECT} answered {status} {location!r}")
        return
    status, _, text = _request(url, "POST", COLLECT, case.body(pad), case.content_type, case.coding)
    if status != 202 or json.loads(text) != {"accepted": case.batch}:
        raise RuntimeError(f"POST {COLLECT} ({case.name}) answered {status} {text}")


def _counts(url: str) -> tuple[int, int]:
    """Events accepted and records received, from the service's /metrics."""
    status, _, text = _request(url, "GET", "/metrics")
    counts = []
    for line in (
        r'redirect_logger_collect_events_total\{outcome="accepted"\}',
        r'redirect_logger_records_total\{outcome="received"\}',
    ):
        found = re.search(rf"^{line} (\S+)$", text, re.M)
        if status != 200 or found is None:
            raise RuntimeError(f"no {line} in /metrics ({status})")
        counts.append(int(float(found.group(1))))
    return counts[0], counts[1]


def _bytes_in_flight(url: str) -> float:
    status, _, text = _request(url, "GET", "/metrics")
    found = re.search(r"^redirect_logger_bytes_in_flight (\S+)$", text, re.M)
    if status != 200 or found is None:
        raise RuntimeError(f"no redirect_logger_bytes_in_flight in /metrics ({status})")
    return float(found.group(1))


class _Sampler(threading.Thread):
    """Samples ``redirect_logger_bytes_in_flight`` every 0.2 s until ``done``
    is set: ``peak``, in bytes."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.peak = 0.0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.2):
            try:
                self.peak = max(self.peak, _bytes_in_flight(self.url))
            except (OSError, RuntimeError):
                continue  # a scrape refused or timed out under load: the next one counts


def _settled_counts(url: str) -> tuple[int, int]:
    """``_counts`` once they stop moving: the requests wrk left in flight when it
    stopped are still read and answered after it exits."""
    counts = _counts(url)
    for _ in range(40):
        time.sleep(0.25)
        counts, before = _counts(url), counts
        if counts == before:
            break
    return counts


def _cpu_seconds(pid: int) -> float:
    """User and system CPU time of the process (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _wrk(
    target: str, script: Path, connections: int, seconds: int
) -> tuple[float, float, float, int, dict[int, int], int, str]:
    """req/s, p50 and p99 (ms), answers, answers by status, 202s with
    ``dropped``, and wrk's socket errors line ("" if none)."""
    report = run_wrk(["-s", str(script), target], connections, seconds)
    rps, p50, p99, count = wrk_figures(report)
    statuses = {int(s): int(n) for s, n in re.findall(r"^status (\d+) (\d+)$", report, re.M)}
    dropped = sum(int(n) for n in re.findall(r"^dropped (\d+)$", report, re.M))
    errors = re.search(r"Socket errors:.*", report)
    return rps, p50, p99, count, statuses, dropped, errors.group(0) if errors else ""


def measure(
    case: Case, connections: int, seconds: int, bootstrap: str, work: Path, setup: Setup
) -> Run:
    """One run of one case on a fresh service; the service is gone when it returns."""
    topic = f"bench-collect-{case.coding}{case.form}-{case.batch}-{uuid.uuid4().hex[:8]}"
    config = write_config(
        work / f"{topic}.toml",
        bootstrap,
        topic,
        work / "spill" / topic,
        # --collect-toml's lines before [collect.protobuf], so that they stay in [collect]
        collect=f'enabled = true\nmax_events = {MAX_EVENTS}\ntopic = "{topic}-events"\n'
        f"{setup.collect}\n"
        f'[collect.protobuf]\ndescriptor_set = "{GPS_SCHEMA}"\nmessages = ["{GPS}"]',
        kafka=setup.kafka,
    )
    server = Served(config)
    try:
        _check(server.url, case, setup.pad)
        script = _script(work / f"{topic}.lua", case, setup.pad)
        target = server.url + (COLLECT if case.batch else REDIRECT)
        sampler = _Sampler(server.url)
        cpu_before = _cpu_seconds(server.pid)
        sampler.start()
        try:
            rps, p50, p99, answered, statuses, dropped, errors = _wrk(
                target, script, connections, seconds
            )
        finally:
            sampler.done.set()
            sampler.join(5)
        accepted, received = _settled_counts(server.url)
        cpu = _cpu_seconds(server.pid) - cpu_before
        rss = _peak_rss([server.pid])
        ledger = server.stop()
    finally:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait(10)
    return Run(
        case,
        rps,
        p50,
        p99,
        answered,
        statuses,
        dropped,
        errors,
        rss,
        accepted,
        received,
        ledger,
        _records(bootstrap, topic),
        _records(bootstrap, f"{topic}-events"),
        cpu,
        sampler.peak / 2**20,
    )


def report(runs: list[Run], cases: list[Case], connections: int, pad: int = 0) -> str:
    def median(case: Case, field: str) -> float:
        return statistics.median(getattr(run, field) for run in runs if run.case == case)

    redirects = median(Case(0), "rps")
    lines = [
        f"{connections} connections, medians of {len(runs) // len(cases)} rounds",
        "",
        "| case | req/s | events/s | p50 ms | p99 ms | events/s ÷ redirects/s | peak RSS MiB "
        "| CPU µs/record | peak bytes in flight MiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for case in cases:
        events = median(case, "events_per_s")
        peak_bytes = max(run.peak_bytes for run in runs if run.case == case)
        lines.append(
            f"| {case.name} | {median(case, 'rps'):,.0f} | {events:,.0f} "
            f"| {median(case, 'p50'):.2f} | {median(case, 'p99'):.2f} "
            f"| {events / redirects:.2f} | {median(case, 'peak_rss'):.1f} "
            f"| {median(case, 'cpu_per_record'):.1f} | {peak_bytes:.1f} |"
        )

    # Each other body case beside plain JSON at its batch size, when both ran.
    pairs = [(c, c.plain) for c in cases if c.batch and c != c.plain and c.plain in cases]
    if pairs:
        lines += [
            "",
            "events/s ÷ plain JSON's at the same batch size: "
            + "; ".join(
                f"{case.name} ÷ {plain.name}: "
                f"{median(case, 'events_per_s') / median(plain, 'events_per_s'):.2f}"
                for case, plain in pairs
            ),
            "events per CPU second ÷ plain JSON's (the throughput ratio when CPU "
            "is what limits): "
            + "; ".join(
                f"{case.name} ÷ {plain.name}: "
                f"{median(plain, 'cpu_per_record') / median(case, 'cpu_per_record'):.2f}"
                for case, plain in pairs
            ),
        ]
        costs = []
        for batch in dict.fromkeys(plain.batch for _, plain in pairs):
            read = [c for c in cases if c.batch == batch]
            costs.append(
                f"{batch} a request: "
                + ", ".join(f"{c.name} {read_cost(c, pad):.2f}" for c in read)
            )
        lines += ["", "event loop µs per event to read a body (best of 7): " + "; ".join(costs)]
    lines += [
        "",
        "| round | case | answered (wrk) | ledger received / delivered | events accepted "
        "/ in Kafka | hits in Kafka | peak RSS MiB | peak bytes in flight MiB | checks |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    per_round = len(cases)
    for index, run in enumerate(runs):
        ledger = run.ledger
        bad = [text for text, ok in run.checks(connections) if not ok]
        lines.append(
            f"| {index // per_round + 1} | {run.case.name} | {run.answered:,} "
            f"| {ledger['received']:,} / {ledger['delivered']:,} "
            f"| {run.accepted:,} / {run.events_in_kafka:,} | {run.hits_in_kafka:,} "
            f"| {run.peak_rss:.1f} | {run.peak_bytes:.1f} "
            f"| {'; '.join(bad) if bad else 'ok'} |"
        )
    return "\n".join(lines)


def _terminated(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks that stop everything


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", help="an existing broker (default: start Apache Kafka)")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument(
        "--batches", type=int, nargs="*", default=[1, 10, 100], help="JSON events a request"
    )
    parser.add_argument(
        "--gzip-batches", type=int, nargs="*", default=[100], help="the same, gzipped"
    )
    parser.add_argument(
        "--protobuf-batches", type=int, nargs="*", default=[1, 100], help="GPS messages a request"
    )
    parser.add_argument("--pad", type=int, default=0, help="bytes added to each JSON event")
    parser.add_argument("--collect-toml", default="", help="lines added to [collect]")
    parser.add_argument("--kafka-toml", default="", help="lines added to [kafka]")
    args = parser.parse_args()
    sizes = [*args.batches, *args.gzip_batches, *args.protobuf_batches]
    if not all(0 < batch <= MAX_EVENTS for batch in sizes):
        parser.error(f"--batches, --gzip-batches, --protobuf-batches: 1 to {MAX_EVENTS} events")
    if args.pad < 0:
        parser.error("--pad: 0 or more bytes")
    if shutil.which("wrk") is None:
        print("wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 2
    setup = Setup(args.pad, args.collect_toml, args.kafka_toml)
    cases = [
        Case(0),
        *(Case(batch) for batch in args.batches),
        *(Case(batch, coding="gzip") for batch in args.gzip_batches),
        *(Case(batch, "protobuf") for batch in args.protobuf_batches),
    ]
    cases = list(dict.fromkeys(cases))  # each case once
    signal.signal(signal.SIGTERM, _terminated)
    work = Path(tempfile.mkdtemp(prefix="collect-load-"))
    runs: list[Run] = []
    failed = False
    try:
        with _broker(args.bootstrap, work) as bootstrap:
            order = list(cases)
            for round_number in range(args.rounds):
                for case in order:
                    run = measure(case, args.connections, args.seconds, bootstrap, work, setup)
                    runs.append(run)
                    checks = run.checks(args.connections)
                    bad = [text for text, ok in checks if not ok]
                    failed = failed or bool(bad)
                    print(
                        f"round {round_number + 1} {case.name}: {run.rps:,.0f} req/s, "
                        f"{run.events_per_s:,.0f} events/s, p99 {run.p99:.1f} ms, "
                        f"peak RSS {run.peak_rss:.1f} MiB, peak bytes in flight "
                        f"{run.peak_bytes:.1f} MiB; ledger {run.ledger}",
                        file=sys.stderr,
                    )
                    for text, ok in checks:
                        print(f"  {'ok  ' if ok else 'FAIL'} {text}", file=sys.stderr)
                order = order[1:] + order[:1]  # rotate who goes first
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(report(runs, cases, args.connections, args.pad))
    print()
    print("checks: " + ("FAILED (see above)" if failed else f"all {len(runs)} runs add up"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
