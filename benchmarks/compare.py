"""Side-by-side HTTP benchmark: the service against baselines and a Go anchor, in one run.

    python benchmarks/compare.py [--bootstrap HOST:PORT] [--seconds 10]
        [--rounds 3] [--connections 16 64 256] [--plot docs/benchmarks.png]

Systems (benchmarks/apps.py has B, C and E):
  A  redirect-logger serve, records delivered to Kafka (acks=all)
  B  a stock Quart-Trio route returning the same redirect, nothing logged
  C  a raw ASGI app returning the same redirect (Hypercorn trio's ceiling)
  D  nginx `return 301` (the machine's ceiling; Debian's nginx-light)
  E  the naive design: B plus a produce and poll per request, no flush at exit
  U  the users' Go design: net/http + confluent-kafka-go, bounded pool (benchmarks/goanchor;
     in the default only when `go` is on PATH; built once per run, skipped if it cannot be)
  F  the service under `hypercorn -k trio --workers 1`   (only with --systems)
  G  the service under `hypercorn -k trio --workers 2`   (only with --systems)
  P  the service under `redirect-logger serve --workers 1` (only with --systems)
  Q  the service under `redirect-logger serve --workers 2` (only with --systems)
  J  A with records.durability = "journal" (spill.fsync "interval")   (only with --systems)
  S  A with records.durability = "journal" and spill.fsync = "always" (only with --systems)
  K  A with records.durability = "kafka"                              (only with --systems)
  T  A over HTTPS: server.certfile and server.keyfile, a certificate made for the run
     (trustme, ECDSA); wrk speaks TLS 1.3 and HTTP/1.1 to it           (only with --systems)
  V  C over HTTPS, Hypercorn's own TLS (--certfile, --keyfile), the same certificate
                                                                       (only with --systems)

Every run starts the system afresh, loads it with ``wrk -t1 --latency``
(keep-alive, loopback; with --close a new connection per request, as clicks
from many browsers arrive) for --seconds at one connection count, and reads the
server's CPU time and peak RSS from /proc. The systems are interleaved, in a
rotating order, round after round; the table shows medians over the rounds
and the ratios A/B, A/C, A/D, A/E, and A/U and C/U. For A, E and U it also
counts the records in Kafka against the redirects answered: for the service
by id, each topic read to its end, a shortfall reported with the broker's log
kept (docs/benchmarks.md, "How the records are counted"). Without
--bootstrap it starts Apache Kafka itself (tests/brokers.py). Bounded: every
run stops after --seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from confluent_kafka import Consumer, TopicPartition

from served import ROOT, Served, write_config

HERE = Path(__file__).resolve().parent
PATH = "/docs/a?x=1"
LOCATION = "https://docs.example.com/a?x=1"
SYSTEMS = "ABCDE" + ("U" if shutil.which("go") else "")  # U needs Go to build it
TICKS = os.sysconf("SC_CLK_TCK")
CLOSE = ("-H", "Connection: close")  # wrk then opens a new connection per request
SUPERVISED = {"P": 1, "Q": 2}  # serve --workers N
# Runs of the service whose topic did not hold exactly the records its ledger
# counted delivered: what was found (the broker's log is then kept).
SHORT: list[str] = []


@dataclass
class Run:
    system: str
    connections: int
    rps: float
    p50: float  # ms
    p99: float
    max: float
    cpu_per_1k: float  # CPU seconds per 1,000 requests
    peak_rss: float  # MiB
    answered: int
    records: int | None  # in Kafka, for A, E and U


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tree(root: int) -> list[int]:
    """``root`` and its descendants."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parents[int(entry.name)] = int(fields[1])
    found, frontier = [root], [root]
    while frontier:
        frontier = [pid for pid, parent in parents.items() if parent in frontier]
        found += frontier
    return found


def _cpu(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICKS


def _peak_rss(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def _ms(value: str, unit: str) -> float:
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def _wrk(
    url: str, connections: int, seconds: int, close: bool
) -> tuple[float, float, float, float, int]:
    """req/s, p50, p99 and max latency (ms), and answers of one wrk run
    (``close``: each request on a new connection)."""
    report = run_wrk([*CLOSE * close, url + PATH], connections, seconds)
    peak = re.search(r"Latency\s+\S+\s+\S+\s+([\d.]+)(us|ms|s)", report)
    if not peak:
        raise RuntimeError(f"cannot read wrk's report:\n{report}")
    rps, p50, p99, count = wrk_figures(report)
    return rps, p50, p99, _ms(*peak.groups()), count


def run_wrk(arguments: list[str], connections: int, seconds: int) -> str:
    """wrk's report of one bounded run (``arguments``: a script and the URL)."""
    return subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", *arguments],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
    ).stdout


def wrk_figures(report: str) -> tuple[float, float, float, int]:
    """req/s, p50 and p99 latency (ms) and answers, from a wrk --latency report."""
    rps = re.search(r"Requests/sec:\s+([\d.]+)", report)
    p50 = re.search(r"50%\s+([\d.]+)(us|ms|s)", report)
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", report)
    count = re.search(r"(\d+) requests in", report)
    if not (rps and p50 and p99 and count):
        raise RuntimeError(f"cannot read wrk's report:\n{report}")
    return float(rps.group(1)), _ms(*p50.groups()), _ms(*p99.groups()), int(count.group(1))


def reader(bootstrap: str) -> Consumer:
    """A consumer in a group of its own that commits nothing: for reading a
    topic from its start (here and in shortfall.py)."""
    return Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"bench-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "log_level": 0,
        }
    )


def _ends(consumer: Consumer, topic: str) -> dict[int, int] | None:
    """Each partition's end offset (high watermark) now; None if the topic is unknown."""
    metadata = consumer.list_topics(topic, timeout=10).topics.get(topic)
    if metadata is None or metadata.error is not None:
        return None
    return {
        p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
        for p in metadata.partitions
    }


def _stable_ends(consumer: Consumer, topic: str, wait: float = 10.0) -> dict[int, int] | None:
    """The end offsets, read again until two reads in a row agree (up to ``wait`` s)."""
    ends = _ends(consumer, topic)
    give_up = time.monotonic() + wait
    while time.monotonic() < give_up:
        time.sleep(0.2)
        again = _ends(consumer, topic)
        if again == ends:
            break
        ends = again
    return ends


def _records(bootstrap: str, topic: str) -> int:
    """Records in ``topic``: its partitions' end offsets added up, once they
    stop moving."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "bench", "log_level": 0})
    try:
        return sum((_stable_ends(consumer, topic) or {}).values())
    finally:
        consumer.close()


@dataclass
class Kept:
    """What a topic holds, read to its end: for the record-by-id check."""

    offsets: int  # its end offsets added up (at once, and once stable)
    first_offsets: int
    ids: set[str]  # the distinct record ids read
    duplicates: int  # records read whose id was read before


def _kept(bootstrap: str, topic: str) -> Kept:
    """Every record of ``topic``, read from each partition's start to its
    (stable) end offset, by id."""
    consumer = reader(bootstrap)
    try:
        first = _ends(consumer, topic) or {}
        ends = _stable_ends(consumer, topic) or {}
        ids: set[str] = set()
        duplicates = 0
        consumer.assign([TopicPartition(topic, p, 0) for p in ends])
        positions = dict.fromkeys(ends, 0)
        give_up = time.monotonic() + 120
        while any(positions[p] < ends[p] for p in ends) and time.monotonic() < give_up:
            for message in consumer.consume(10_000, 0.5):
                if message.error():
                    continue
                positions[message.partition()] = message.offset() + 1
                found = json.loads(message.value() or b"{}").get("id")
                if found in ids:
                    duplicates += 1
                elif isinstance(found, str):
                    ids.add(found)
        return Kept(sum(ends.values()), sum(first.values()), ids, duplicates)
    finally:
        consumer.close()


class _Process:
    """A baseline server process started by a command line."""

    def __init__(
        self, command: list[str], url: str, cwd: Path, env: dict[str, str], log: Path | None = None
    ) -> None:
        self.url = url
        self.log = log
        output = log.open("w") if log is not None else subprocess.DEVNULL
        self.process = subprocess.Popen(
            command,
            cwd=cwd,
            env={**os.environ, **env},
            stdout=output,
            stderr=output,
            start_new_session=True,
        )
        self.pid = self.process.pid
        host, port = url.split("://", 1)[1].rsplit(":", 1)
        deadline = time.monotonic() + 30
        import socket

        while time.monotonic() < deadline:
            try:
                socket.create_connection((host, int(port)), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{command} did not listen on {url}")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)


def _hypercorn(
    app: str,
    env: dict[str, str],
    workers: int = 0,
    log: Path | None = None,
    tls: tuple[Path, Path] | None = None,
) -> _Process:
    """Hypercorn's trio worker serving ``app``; with ``tls`` (certificate, key)
    over HTTPS, Hypercorn's own."""
    port = _free_port()
    command = [sys.executable, "-m", "hypercorn", "-k", "trio", "--workers", str(workers)]
    command += ["-b", f"127.0.0.1:{port}", "--graceful-timeout", "5"]
    if tls is not None:
        command += ["--certfile", str(tls[0]), "--keyfile", str(tls[1])]
    scheme = "https" if tls else "http"
    return _Process([*command, app], f"{scheme}://127.0.0.1:{port}", HERE, env, log)


def _logged_ledgers(log: Path) -> dict[str, int]:
    """The ledger lines in a server's log (the service's under Hypercorn, or
    U's), summed over its workers."""
    total: dict[str, int] = {}
    for found in re.findall(r"ledger (\{.*\})", log.read_text()):
        for key, value in json.loads(found).items():
            total[key] = total.get(key, 0) + value
    return total


def build_goanchor(work: Path) -> str | None:
    """Build U (benchmarks/goanchor) into ``work``; why not, if it cannot be."""
    go = shutil.which("go")
    if go is None:
        return "go is not on PATH"
    started = time.monotonic()
    built = subprocess.run(
        [go, "build", "-o", str(work / "goanchor"), "."],
        cwd=HERE / "goanchor",
        capture_output=True,
        text=True,
        timeout=600,
    )
    if built.returncode != 0:
        return f"go build failed:\n{built.stderr}"
    print(f"U built in {time.monotonic() - started:.1f} s", file=sys.stderr)
    return None


def _goanchor(work: Path, bootstrap: str, topic: str) -> _Process:
    """U, the binary build_goanchor() left in ``work``; its ledger goes to its log."""
    port = _free_port()
    command = [str(work / "goanchor"), "-listen", f"127.0.0.1:{port}"]
    command += ["-bootstrap", bootstrap, "-topic", topic]
    return _Process(command, f"http://127.0.0.1:{port}", work, {}, work / f"{topic}.log")


def _nginx(work: Path) -> _Process:
    port = _free_port()
    conf = work / "nginx.conf"
    conf.write_text(
        f"""daemon off;
worker_processes auto;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {work}/body;
    proxy_temp_path {work}/proxy;
    fastcgi_temp_path {work}/fastcgi;
    uwsgi_temp_path {work}/uwsgi;
    scgi_temp_path {work}/scgi;
    server {{
        listen 127.0.0.1:{port};
        location ~ ^/docs/(.*)$ {{ return 301 https://docs.example.com/$1$is_args$args; }}
    }}
}}
"""
    )
    return _Process(
        ["nginx", "-c", str(conf), "-p", str(work)], f"http://127.0.0.1:{port}", work, {}
    )


# The service's variants by records.durability (and spill.fsync): system -> TOML lines.
DURABILITY = {
    "A": ("", ""),
    "J": ('durability = "journal"', 'fsync = "interval"'),
    "S": ('durability = "journal"', 'fsync = "always"'),
    "K": ('durability = "kafka"', ""),
    "T": ("", ""),  # and TLS: _tls_lines()
}


def _certificate(work: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key (ECDSA P-256), made once per run."""
    cert, key = work / "tls-cert.pem", work / "tls-key.pem"
    if not cert.exists():
        import trustme

        issued = trustme.CA().issue_cert("127.0.0.1", "localhost")
        issued.private_key_pem.write_to_path(str(key))
        issued.cert_chain_pems[0].write_to_path(str(cert))
    return cert, key


def _tls_lines(work: Path) -> str:
    """``[server]`` lines for HTTPS."""
    cert, key = _certificate(work)
    return f'certfile = "{cert}"\nkeyfile = "{key}"'


def _service_config(work: Path, bootstrap: str, topic: str, system: str = "A") -> Path:
    records, spill = DURABILITY.get(system, DURABILITY["A"])
    return write_config(
        work / f"service-{topic}.toml",
        bootstrap,
        topic,
        work / "spill" / topic,
        server=_tls_lines(work) if system == "T" else "",
        records=records,
        spill_options=spill,
    )


def measure(
    system: str, connections: int, seconds: int, bootstrap: str, work: Path, close: bool = False
) -> Run:
    topic = f"bench-{system}-{uuid.uuid4().hex[:8]}"
    server: Served | _Process
    if system in DURABILITY:
        server = Served(_service_config(work, bootstrap, topic, system))
    elif system in SUPERVISED:
        server = Served(_service_config(work, bootstrap, topic), SUPERVISED[system])
    elif system == "D":
        server = _nginx(work)
    elif system == "U":
        server = _goanchor(work, bootstrap, topic)
    elif system == "V":  # C over HTTPS: Hypercorn's own TLS
        server = _hypercorn("apps:raw", {}, tls=_certificate(work))
    elif system in "FG":  # the service under hypercorn, 1 or 2 worker processes
        env = {"REDIRECT_LOGGER_CONFIG": str(_service_config(work, bootstrap, topic))}
        workers = 1 if system == "F" else 2
        log = work / f"{topic}.log"
        server = _hypercorn("redirect_logger.asgi:app", env, workers, log)
    else:
        app = {"B": "stock", "C": "raw", "E": "naive"}[system]
        server = _hypercorn(f"apps:{app}", {"BENCH_BOOTSTRAP": bootstrap, "BENCH_TOPIC": topic})
    answer = "\n%{http_code} %{redirect_url}"  # after the headers (-D -)
    head, check = subprocess.run(
        ["curl", "-sk", "-D", "-", "-o", "/dev/null", "-w", answer, server.url + PATH],
        capture_output=True,
        text=True,
        timeout=10,
    ).stdout.rsplit("\n", 1)
    if check != f"301 {LOCATION}":
        raise RuntimeError(f"{system} answered {check!r}, not 301 {LOCATION}")
    # The check's record, looked for by id in the topic (the service's answers carry it).
    check_id = re.search(r"^x-hit-id:\s*(\S+)", head, re.I | re.M)
    pids = _tree(server.pid)
    cpu_before = _cpu(pids)
    rps, p50, p99, peak, answered = _wrk(server.url, connections, seconds, close)
    answered += 1  # the check above
    cpu = _cpu(_tree(server.pid)) - cpu_before
    rss = _peak_rss(_tree(server.pid))
    records = None
    if isinstance(server, Served):
        ledger = server.stop()
        if ledger["received"] != ledger["delivered"]:
            raise RuntimeError(f"{system} did not deliver every record: {ledger}")
        kept = _kept(bootstrap, topic)
        records = len(kept.ids)
        answered = ledger["received"]  # wrk leaves out answers still in flight at its end
        missing = check_id is not None and check_id.group(1) not in kept.ids
        if records != ledger["delivered"] or kept.offsets != records or missing:
            SHORT.append(
                f"{system} ({topic}): ledger {ledger}; in the topic {records:,} distinct ids, "
                f"{kept.duplicates:,} duplicates, end offsets {kept.first_offsets:,} at once "
                f"and {kept.offsets:,} once stable; the check's record "
                f"{'missing' if missing else 'found'}"
            )
            print(f"records short: {SHORT[-1]}", file=sys.stderr)
    else:
        server.stop()
        if system == "E":
            records = _records(bootstrap, topic)
        if server.log is not None:
            ledger = _logged_ledgers(server.log)
            if not ledger or ledger["received"] != ledger["delivered"]:
                raise RuntimeError(f"{system} did not deliver every record: {ledger}")
            records = _records(bootstrap, topic)
            answered = ledger["received"]
    return Run(
        system,
        connections,
        rps,
        p50,
        p99,
        peak,
        cpu / max(answered, 1) * 1000,
        rss,
        answered,
        records,
    )


def shutdown_under_load(system: str, seconds: int, bootstrap: str, work: Path, down: bool) -> str:
    """SIGTERM in the middle of a wrk run (64 connections), with the broker up
    or unreachable (``down``): what became of the redirects wrk saw answered."""
    topic = f"bench-{system}-stop-{uuid.uuid4().hex[:8]}"
    target = "127.0.0.1:9" if down else bootstrap  # nothing listens on port 9
    server: Served | _Process
    if system == "A":
        server = Served(_service_config(work, target, topic))
    else:
        server = _hypercorn("apps:naive", {"BENCH_BOOTSTRAP": target, "BENCH_TOPIC": topic})
    wrk = subprocess.Popen(
        ["wrk", "-t1", "-c64", f"-d{seconds}s", server.url + PATH],
        stdout=subprocess.PIPE,
        text=True,
    )
    time.sleep(seconds / 2)
    ledger = server.stop()  # the ledger for A; None for E
    report = wrk.communicate(timeout=seconds + 60)[0]
    count = re.search(r"(\d+) requests in", report)
    answered = int(count.group(1)) if count else 0
    records = 0 if down else _records(bootstrap, topic)
    kept = f"{records:,} records in Kafka"
    if ledger is not None:
        kept += f", {ledger['spilled']:,} in the spill journal (ledger {ledger})"
    state = "broker unreachable" if down else "broker up"
    return f"{system}, SIGTERM under load, {state}: {answered:,} redirects answered; {kept}"


def _median(runs: list[Run], field: str) -> float:
    return statistics.median(getattr(run, field) for run in runs)


def report(runs: list[Run], connection_counts: list[int], systems: str) -> str:
    lines = [
        "| conns | system | req/s | p50 ms | p99 ms | max ms | CPU s/1k req | peak RSS MiB "
        "| records / answered |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for connections in connection_counts:
        for system in systems:
            mine = [r for r in runs if r.system == system and r.connections == connections]
            if not mine:
                continue
            kept = "" if mine[0].records is None else f"{sum(r.records or 0 for r in mine):,} / "
            kept += f"{sum(r.answered for r in mine):,}" if kept else ""
            lines.append(
                f"| {connections} | {system} | {_median(mine, 'rps'):,.0f} "
                f"| {_median(mine, 'p50'):.2f} | {_median(mine, 'p99'):.2f} "
                f"| {_median(mine, 'max'):.1f} | {_median(mine, 'cpu_per_1k'):.3f} "
                f"| {_median(mine, 'peak_rss'):.1f} | {kept} |"
            )
    if "A" in systems and any(s in systems for s in "BCDE"):
        lines += [
            "",
            "| conns | A/B req/s | A/C | A/D | A/E | A/B p99 | A/C p99 | A/C CPU |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
    for connections in connection_counts:
        of = {
            system: [r for r in runs if r.system == system and r.connections == connections]
            for system in systems
        }
        if not of.get("A") or not any(of.get(s) for s in "BCDE"):
            continue
        a = _median(of["A"], "rps")
        cells = [f"{a / _median(of[s], 'rps'):.2f}" if of.get(s) else "-" for s in "BCDE"]
        for field, base in (("p99", "B"), ("p99", "C"), ("cpu_per_1k", "C")):
            ratio = _median(of["A"], field) / _median(of[base], field) if of.get(base) else None
            cells.append("-" if ratio is None else f"{ratio:.2f}")
        lines.append(f"| {connections} | " + " | ".join(cells) + " |")
    lines += _anchored(runs, connection_counts, systems)
    variants = [s for s in "JSKT" if s in systems]
    if "A" in systems and variants:
        lines += [
            "",
            "| conns | "
            + " | ".join(f"{v}/A req/s | {v} p99 - A p99 ms | {v}/A CPU" for v in variants)
            + " |",
            "| --- |" + " --- | --- | --- |" * len(variants),
        ]
        for connections in connection_counts:
            of = {
                system: [r for r in runs if r.system == system and r.connections == connections]
                for system in "A" + "".join(variants)
            }
            if not of["A"] or not all(of[v] for v in variants):
                continue
            a_rps, a_p99 = _median(of["A"], "rps"), _median(of["A"], "p99")
            a_cpu = _median(of["A"], "cpu_per_1k")
            cells = [
                f"{_median(of[v], 'rps') / a_rps:.2f} | {_median(of[v], 'p99') - a_p99:+.1f} "
                f"| {_median(of[v], 'cpu_per_1k') / a_cpu:.2f}"
                for v in variants
            ]
            lines.append(f"| {connections} | " + " | ".join(cells) + " |")
    pairs = [
        (two, one)
        for two, one in (("G", "F"), ("Q", "P"), ("Q", "G"), ("V", "C"))
        if two in systems
    ]
    pairs = [(two, one) for two, one in pairs if one in systems]
    if pairs:
        lines += [
            "",
            "| conns | "
            + " | ".join(f"{two}/{one} req/s | {two}/{one} CPU" for two, one in pairs)
            + " |",
            "| --- |" + " --- | --- |" * len(pairs),
        ]
        for connections in connection_counts:
            of = {
                s: [r for r in runs if r.system == s and r.connections == connections]
                for s in systems
            }
            if not all(of[two] and of[one] for two, one in pairs):
                continue
            cells = [
                f"{_median(of[two], 'rps') / _median(of[one], 'rps'):.2f} "
                f"| {_median(of[two], 'cpu_per_1k') / _median(of[one], 'cpu_per_1k'):.2f}"
                for two, one in pairs
            ]
            lines.append(f"| {connections} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _anchored(runs: list[Run], connection_counts: list[int], systems: str) -> list[str]:
    """The service (A) and Hypercorn's ceiling (C) against the Go anchor (U)."""
    bases = [s for s in "AC" if s in systems]
    if "U" not in systems or not bases:
        return []
    lines = [
        "",
        "| conns | " + " | ".join(f"{s}/U req/s | {s}/U p99 | {s}/U CPU" for s in bases) + " |",
        "| --- |" + " --- | --- | --- |" * len(bases),
    ]
    for connections in connection_counts:
        of = {
            s: [r for r in runs if r.system == s and r.connections == connections]
            for s in "U" + "".join(bases)
        }
        if not all(of.values()):
            continue
        cells = [
            " | ".join(
                f"{_median(of[s], field) / _median(of['U'], field):.2f}"
                for field in ("rps", "p99", "cpu_per_1k")
            )
            for s in bases
        ]
        lines.append(f"| {connections} | " + " | ".join(cells) + " |")
    return lines


def plot(
    runs: list[Run], connection_counts: list[int], systems: str, path: Path, close: bool = False
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = {
        "A": "A service",
        "B": "B stock Quart",
        "C": "C raw ASGI",
        "D": "D nginx",
        "E": "E naive",
        "J": "A, durability journal",
        "S": "A, journal, fsync always",
        "K": "A, durability kafka",
        "F": "hypercorn --workers 1",
        "G": "hypercorn --workers 2",
        "P": "serve --workers 1",
        "Q": "serve --workers 2",
        "U": "U Go: net/http + confluent-kafka-go",
    }
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for system in systems:
        mine = [
            [r for r in runs if r.system == system and r.connections == c]
            for c in connection_counts
        ]
        if not all(mine):
            continue
        left.plot(
            connection_counts, [_median(m, "rps") for m in mine], marker="o", label=names[system]
        )
        right.plot(
            connection_counts, [_median(m, "p99") for m in mine], marker="o", label=names[system]
        )
    for axis, title in ((left, "requests/s (median)"), (right, "p99 latency, ms (median)")):
        axis.set_xscale("log", base=2)
        axis.set_xticks(connection_counts, [str(c) for c in connection_counts])
        axis.set_xlabel(f"connections (wrk, {'a new one per request' if close else 'keep-alive'})")
        axis.set_title(title)
        axis.grid(alpha=0.3)
    left.set_yscale("log")
    right.set_yscale("log")
    left.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


# The started broker's log files (server.log, state-change.log, kafka.log),
# named when records are short.
BROKER_LOGS: list[Path] = []


@contextmanager
def _broker(bootstrap: str | None, work: Path) -> Iterator[str]:
    if bootstrap:
        yield bootstrap
        return
    sys.path.insert(0, str(ROOT / "tests"))
    from brokers import KafkaBroker

    (work / "kafka").mkdir()
    broker = KafkaBroker(work / "kafka")
    try:
        yield broker.bootstrap
    finally:
        broker.stop()
        BROKER_LOGS.extend(broker.log_files())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", help="an existing broker (default: start Apache Kafka)")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--systems", default=SYSTEMS)
    parser.add_argument("--plot", type=Path, help="write the plot (PNG) here")
    parser.add_argument(
        "--close", action="store_true", help="a new connection per request (Connection: close)"
    )
    args = parser.parse_args()
    for tool in ("wrk", "curl", *(["nginx"] if "D" in args.systems else [])):
        if shutil.which(tool) is None:
            print(f"{tool} is not installed (apt-get install {tool})", file=sys.stderr)
            return 2
    work = Path(tempfile.mkdtemp(prefix="compare-"))
    runs: list[Run] = []
    systems = args.systems
    try:
        unbuilt = build_goanchor(work) if "U" in systems else None
        if unbuilt is not None:  # a benchmark, not a test: the others still run
            print(f"U skipped: {unbuilt}", file=sys.stderr)
            systems = systems.replace("U", "")
        with _broker(args.bootstrap, work) as bootstrap:
            order = list(systems)
            for round_number in range(args.rounds):
                for connections in args.connections:
                    for system in order:
                        run = measure(
                            system, connections, args.seconds, bootstrap, work, args.close
                        )
                        runs.append(run)
                        print(
                            f"round {round_number + 1} c={connections} {system}: "
                            f"{run.rps:,.0f} req/s, p99 {run.p99:.1f} ms",
                            file=sys.stderr,
                        )
                    order = order[1:] + order[:1]  # rotate who goes first
            stops = [
                shutdown_under_load(system, args.seconds, bootstrap, work, down)
                for down in (False, True)
                for system in "AE"
                if system in systems and not args.close
            ]
    finally:
        if SHORT:  # the broker's log and data, to tell a lost record from a late one
            print(f"records short: the broker's data is kept in {work / 'kafka'}", file=sys.stderr)
            for log in BROKER_LOGS:
                print(f"  its log: {log}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(report(runs, args.connections, systems))
    if SHORT:
        print("\nRecords short of the ledger:\n" + "\n".join(SHORT))
    print()
    print("\n".join(stops))
    if args.plot:
        plot(runs, args.connections, systems, args.plot, args.close)
        print(f"plot written to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
