"""A soak: the service under steady load for up to an hour, its RSS each minute.

    nice -n 10 python benchmarks/soak.py [--bootstrap HOST:PORT] [--minutes 60]
        [--connections 256] [--interval 60] [--collect N] [--warmup 10]
        [--probe DIR [--tracemalloc] [--frames 1] [--malloc-trim] [--gc-collect]]
        [--env NAME=VALUE ...] [--timeout 30]

Starts ``redirect-logger serve`` (the real CLI; ``benchmarks/served.py``)
against --bootstrap and loads it with ``wrk -t1`` (keep-alive, loopback) at
--connections for --minutes: ``GET /docs/a?x=1``, the redirect, or with
--collect N ``POST /collect`` with N events a request (``[collect]``
enabled, the events in a topic of their own). Every --interval s it prints
the RSS of the service's process tree (VmRSS, summed) and the records it
has received so far. At the end: the growth and the slope (MiB/min, a
least-squares line) over the second half of the run and after --warmup
minutes, the requests wrk got answered, and the checks: every answer 301
(or 202 without ``dropped``), no socket errors, the ledger's received =
delivered, the records in Kafka = delivered, and every record accounted
for (received = the sum of the final outcomes: this one passes when the
others fail only because ``when_full`` dropped or shed records). Exits 1 if
a check fails.

--probe DIR runs the service under ``benchmarks/soak_probe.py``, which
samples, in the service's process, the Python heap (tracemalloc, with
--tracemalloc), pymalloc's blocks, glibc's malloc statistics and the gc
object counts by type at every interval, and then reports what of it grew
over the second half: the object types, and with --tracemalloc the source
lines whose allocations grew most (snapshot of the half against the last).
--env passes variables to the service (``MALLOC_ARENA_MAX=2``, say).
Without --bootstrap it starts Apache Kafka itself (tests/brokers.py).
Bounded: wrk stops after --minutes (60 at most); the service after its drain.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tracemalloc
import uuid
from dataclasses import dataclass
from pathlib import Path

from collect_load import (
    COLLECT,
    MAX_EVENTS,
    REDIRECT,
    Case,
    _check,
    _counts,
    _script,
    _terminated,
)
from compare import _broker, _records, _tree
from redirect_logger.ledger import SETTLED
from served import Served, write_config

HERE = Path(__file__).resolve().parent
MAX_MINUTES = 60


@dataclass
class Sample:
    t: float  # s since the load began
    rss: float  # MiB, the service's process tree
    received: int  # records, from /metrics


def tree_rss(root: int) -> float:
    """VmRSS of ``root`` and its descendants, MiB."""
    total = 0
    for pid in _tree(root):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (x, y) points; 0 for fewer than two."""
    if len(points) < 2:
        return 0.0
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    if not spread:
        return 0.0
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / spread


def trend(samples: list[Sample], since: float, label: str) -> str:
    """Growth (last - first) and slope (MiB/min) of the samples from ``since`` s on."""
    part = [s for s in samples if s.t >= since]
    if len(part) < 2:
        return f"{label}: too few samples"
    per_minute = slope([(s.t / 60, s.rss) for s in part])
    return (
        f"{label} ({part[0].t / 60:.1f} to {part[-1].t / 60:.1f} min): "
        f"RSS {part[0].rss:.1f} -> {part[-1].rss:.1f} MiB, growth {part[-1].rss - part[0].rss:+.2f}"
        f" MiB, slope {per_minute:+.3f} MiB/min"
    )


def _received(url: str) -> int:
    try:
        return _counts(url)[1]
    except (OSError, RuntimeError):
        return -1


def _probe_report(directory: Path, half: float, end: float) -> list[str]:
    """What grew in the service's process, from the probe's samples from
    ``half`` s after its first on to the end of the load, ``end`` s
    (soak_probe.py)."""
    every = [json.loads(text) for text in (directory / "probe.jsonl").read_text().splitlines()]
    lines = [line for line in every if "error" not in line]
    failed = [f"probe: sample failed: {line['error']}" for line in every if "error" in line]
    if len(lines) < 2:
        return [*failed, "probe: too few samples"]
    start = lines[0]["t"]
    out = [
        *failed,
        "",
        "probe (in the service): t min, RSS, traced heap, pymalloc blocks, malloc in use"
        " / free / held (arena + mmapped), gc objects, resident heap / anon / file,"
        " pymalloc's arenas, threads (MiB unless counted)",
    ]
    for line in lines:
        malloc = line.get("malloc", {})
        held = malloc.get("arena", 0) + malloc.get("mmapped", 0)
        trimmed = line.get("rss_after_trim_kib")
        out.append(
            f"  {(line['t'] - start) / 60:5.1f} {line['rss_kib'] / 1024:7.1f}"
            + (
                f" (trimmed {line['rss_before_trim_kib'] / 1024:.1f} -> {trimmed / 1024:.1f})"
                if trimmed
                else ""
            )
            + (f" {line['traced'] / 2**20:7.2f}" if "traced" in line else "      -")
            + f" {line['blocks']:>9,}"
            + f" {malloc.get('in_use', 0) / 2**20:7.2f} / {malloc.get('free', 0) / 2**20:6.2f}"
            + f" / {held / 2**20:7.2f} {line['objects']:>9,}"
            + "".join(
                f" {line.get('maps', {}).get(kind, 0) / 1024:6.1f}"
                for kind in ("heap", "anon", "file")
            )
            + f" {line.get('pymalloc_arenas', 0) / 2**20:6.1f} {line.get('threads', 0):3}"
            + (
                f" collected {line['collected']:,},"
                f" RSS then {line['rss_after_collect_kib'] / 1024:.1f}"
                if "collected" in line
                else ""
            )
        )
    loaded = [line for line in lines if line["t"] - start < end - 1] or lines  # under load
    later = [index for index, line in enumerate(loaded) if line["t"] - start >= half]
    first = later[0] if later else len(loaded) // 2
    last = len(loaded) - 1
    first = min(first, last - 1)
    before, after = loaded[first], loaded[last]
    grown = {name: after["types"].get(name, 0) - count for name, count in before["types"].items()}
    for name, count in after["types"].items():
        grown.setdefault(name, count)
    top = sorted(grown.items(), key=lambda item: -abs(item[1]))[:12]
    minutes = (after["t"] - before["t"]) / 60
    out += ["", f"gc-tracked objects by type, change over the last {minutes:.1f} min:"]
    out += [f"  {change:+9,} {name}" for name, change in top if change]
    collected = [line for line in loaded if "collected" in line]
    if collected:
        every_kind: dict[str, list[int]] = {}
        for line in collected:
            for name, count in line["garbage"].items():
                every_kind.setdefault(name, []).append(count)
        counts = [line["collected"] for line in collected]
        out += [
            "",
            f"full collections: {min(counts):,} to {max(counts):,} objects unreachable each;"
            " the types, median count:",
        ]
        ranked = sorted(every_kind.items(), key=lambda item: -sorted(item[1])[len(item[1]) // 2])
        out += [f"  {sorted(c)[len(c) // 2]:9,} {name}" for name, c in ranked[:12]]
    snapshots = sorted(directory.glob("snapshot-*.tm"))
    if len(snapshots) > last:
        old = tracemalloc.Snapshot.load(str(snapshots[first]))
        new = tracemalloc.Snapshot.load(str(snapshots[last]))
        ignore = [tracemalloc.Filter(False, tracemalloc.__file__)]
        old, new = old.filter_traces(ignore), new.filter_traces(ignore)
        grouping = "traceback" if new.traceback_limit > 1 else "lineno"
        stats = new.compare_to(old, grouping)
        total = sum(stat.size_diff for stat in stats)
        out += [
            "",
            f"tracemalloc, {snapshots[first].name} -> {snapshots[last].name}: "
            f"{total / 2**20:+.2f} MiB in all; the largest changes:",
        ]
        for stat in stats[:15]:
            frames = stat.traceback.format()
            out.append(f"  {stat.size_diff / 1024:+9.1f} KiB {stat.count_diff:+8,} blocks")
            out += [f"      {frame.strip()}" for frame in frames[-2 * min(len(frames), 6) :]]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", help="an existing broker (default: start Apache Kafka)")
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--connections", type=int, default=256)
    parser.add_argument("--interval", type=float, default=60.0, help="s between samples")
    parser.add_argument("--warmup", type=float, default=10.0, help="minutes left out of a trend")
    parser.add_argument(
        "--collect", type=int, default=0, metavar="N", help="POST /collect, N events a request"
    )
    parser.add_argument("--probe", type=Path, metavar="DIR", help="run under soak_probe.py")
    parser.add_argument("--tracemalloc", action="store_true", help="the probe traces the heap")
    parser.add_argument("--frames", type=int, default=1, help="tracemalloc's traceback depth")
    parser.add_argument("--malloc-trim", action="store_true", help="the probe trims after each")
    parser.add_argument(
        "--gc-collect", action="store_true", help="the probe runs a full collection after each"
    )
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument(
        "--timeout", type=float, default=30.0, help="s: wrk counts a slower answer as a timeout"
    )
    args = parser.parse_args()
    if not 0 < args.minutes <= MAX_MINUTES:
        parser.error(f"--minutes: more than 0, at most {MAX_MINUTES}")
    if not 0 <= args.collect <= MAX_EVENTS:
        parser.error(f"--collect: 1 to {MAX_EVENTS} events")
    if args.interval < 1:
        parser.error("--interval: 1 s at least")
    if (args.tracemalloc or args.malloc_trim or args.gc_collect) and args.probe is None:
        parser.error("--tracemalloc, --malloc-trim and --gc-collect need --probe DIR")
    if any("=" not in pair for pair in args.env):
        parser.error("--env: NAME=VALUE")
    if shutil.which("wrk") is None:
        print("wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _terminated)
    env = dict(pair.split("=", 1) for pair in args.env)
    launcher: list[str] = ["-m", "redirect_logger.cli"]
    if args.probe is not None:
        if args.probe.exists() and any(args.probe.iterdir()):
            parser.error(f"--probe: {args.probe} is not empty")
        launcher = [str(HERE / "soak_probe.py"), "--dump", str(args.probe)]
        launcher += ["--every", str(args.interval), "--frames", str(args.frames)]
        launcher += [] if args.tracemalloc else ["--no-tracemalloc"]
        launcher += ["--malloc-trim"] if args.malloc_trim else []
        launcher += ["--gc-collect"] if args.gc_collect else []
        launcher.append("--")
    seconds = round(args.minutes * 60)
    work = Path(tempfile.mkdtemp(prefix="soak-"))
    try:
        with _broker(args.bootstrap, work) as bootstrap:
            return soak(args, bootstrap, work, seconds, launcher, env)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def soak(
    args: argparse.Namespace,
    bootstrap: str,
    work: Path,
    seconds: int,
    launcher: list[str],
    env: dict[str, str],
) -> int:
    topic = f"soak-{uuid.uuid4().hex[:8]}"
    collect = ""
    if args.collect:
        collect = f'enabled = true\nmax_events = {MAX_EVENTS}\ntopic = "{topic}-events"'
    config = write_config(work / "c.toml", bootstrap, topic, work / "spill", collect=collect)
    service = Served(config, launcher=launcher, env=env)
    samples: list[Sample] = []
    wrk: subprocess.Popen[str] | None = None
    try:
        _check(service.url, Case(args.collect))
        script = _script(work / "soak.lua", Case(args.collect))
        target = service.url + (COLLECT if args.collect else REDIRECT)
        what = f"POST {COLLECT}, {args.collect} events a request" if args.collect else REDIRECT
        print(
            f"soak: {what}, {args.connections} connections, {seconds / 60:g} min, "
            f"service pid {service.pid}" + (f", env {env}" if env else ""),
            flush=True,
        )
        print(f"{'t (min)':>7} {'RSS (MiB)':>10} {'received':>12} {'per s':>8}", flush=True)
        start = time.monotonic()
        wrk = subprocess.Popen(
            [
                "wrk",
                "-t1",
                f"-c{args.connections}",
                f"-d{seconds}s",
                f"--timeout={args.timeout:g}s",
                "--latency",
                "-s",
                str(script),
                target,
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        next_at = start
        while True:
            now = time.monotonic()
            sample = Sample(now - start, tree_rss(service.pid), _received(service.url))
            rate = ""
            if samples and sample.received >= 0 and samples[-1].received >= 0:
                last = samples[-1]
                rate = f"{(sample.received - last.received) / (sample.t - last.t):8,.0f}"
            samples.append(sample)
            print(
                f"{sample.t / 60:7.2f} {sample.rss:10.1f} {sample.received:12,} {rate:>8}",
                flush=True,
            )
            if wrk.poll() is not None:
                break
            next_at += args.interval
            while wrk.poll() is None and time.monotonic() < next_at:
                time.sleep(min(1.0, max(0.0, next_at - time.monotonic())))
            if wrk.poll() is not None and next_at - time.monotonic() > 1:
                continue  # wrk has ended between samples: one last sample now
        report = wrk.communicate(timeout=60)[0]
        time.sleep(1)  # the requests in flight when wrk stopped are answered
        ledger = service.stop()
    finally:
        if wrk is not None and wrk.poll() is None:
            wrk.kill()
            wrk.wait(10)
        if service.process.poll() is None:
            service.process.kill()
            service.process.wait(10)
    return summarize(args, bootstrap, topic, seconds, samples, report, ledger)


def summarize(
    args: argparse.Namespace,
    bootstrap: str,
    topic: str,
    seconds: int,
    samples: list[Sample],
    report: str,
    ledger: dict[str, int],
) -> int:
    requests = re.search(r"(\d+) requests in", report)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", report)
    statuses = {int(s): int(n) for s, n in re.findall(r"^status (\d+) (\d+)$", report, re.M)}
    dropped = sum(int(n) for n in re.findall(r"^dropped (\d+)$", report, re.M))
    errors = re.search(r"Socket errors:.*", report)
    in_kafka = _records(bootstrap, topic)
    if args.collect:
        in_kafka += _records(bootstrap, f"{topic}-events")
    expected = 202 if args.collect else 301
    answered = int(requests.group(1)) if requests else -1
    print()
    print(trend(samples, seconds / 2, "second half"))
    if args.warmup * 60 < seconds:
        print(trend(samples, args.warmup * 60, f"after {args.warmup:g} min of warm-up"))
    print(
        f"requests answered: {answered:,} ({float(rps.group(1)) if rps else 0:,.0f}/s)"
        + (f", {answered * args.collect:,} events" if args.collect else "")
    )
    latency = [
        line.strip()
        for line in report.splitlines()
        if re.match(r"\s*(Latency|Req/Sec|\d+(\.\d+)?%|Socket errors)", line)
    ]
    print(f"wrk (timeout {args.timeout:g} s): " + "; ".join(latency))
    print(f"ledger: {ledger}")
    settled = sum(ledger[outcome] for outcome in SETTLED)
    said = f", {dropped:,} of them saying some events were dropped" if args.collect else ""
    checks = [
        (
            f"every answer {expected}: {statuses}{said}",
            set(statuses) == {expected} and not dropped,
        ),
        (f"no socket errors {errors.group(0) if errors else ''}".strip(), errors is None),
        (
            f"ledger received {ledger['received']:,} = delivered {ledger['delivered']:,}",
            ledger["received"] == ledger["delivered"],
        ),
        (
            f"records in Kafka {in_kafka:,} = delivered {ledger['delivered']:,}",
            in_kafka == ledger["delivered"],
        ),
        (  # passes when records were dropped or shed by policy, where the one above fails
            f"every record accounted for: received {ledger['received']:,} = "
            f"{' + '.join(SETTLED)} {settled:,}, none in flight",
            ledger["received"] == settled and not ledger["in_flight"],
        ),
    ]
    for text, ok in checks:
        print(f"  {'ok  ' if ok else 'FAIL'} {text}")
    if args.probe is not None:
        print("\n".join(_probe_report(args.probe, seconds / 2, seconds)))
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
