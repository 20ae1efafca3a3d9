"""Ordinary load beside each attack on the connection limits, with and without the limits.

    python benchmarks/attack.py [--bootstrap HOST:PORT] [--seconds 10] [--rounds 2]
        [--isolate | --no-isolate]

Each run starts ``redirect-logger serve`` (the real CLI, one process) afresh
and loads it twice with ``wrk -t1 -c64 --latency`` (keep-alive, from
127.0.0.1, on the redirect ``/docs/bench``) for --seconds: first with no
attack (the run's baseline), then beside one attack of tests/attackers.py,
run in a process of its own from 0.5 s after wrk's start until its end
(with ``--repeat``: a connection the server closes is opened again). Each
attack's ratios are to the baseline just before it, on the same process, so
that the machine's drift between runs cancels out. The attacks, each from
its own loopback addresses:

- ``idle``: 4,000 connections that send nothing;
- ``slowloris``: 2,000 connections sending a request head a byte a second;
- ``never_read``: 100 connections with a 4 KB receive buffer asking for 22
  answers of 48 KB each (the largest the service gives) and never reading;
- ``one_address``: 1,000 connections from one address, each one request;
- ``h2_flood``: 10 clients opening 1,000 HTTP/2 streams per connection;
- ``rapid_reset``: 4 clients opening and resetting HTTP/2 streams as fast
  as they can (CVE-2023-44487).

CPU isolation (``--isolate``, the default on a machine with 2 cores or
more): the service (``taskset``: its process and every thread it starts)
runs on the upper half of the CPUs this script may use, and this script,
wrk, the attacker and the Apache Kafka it starts on the others, in the
baseline and the attacked run alike, so that what the attack takes from
the ordinary clients is the work it makes the service do, as when the
attackers are other machines, not CPU its own processes take from the
service's core. The pinning is printed, and checked on each run (every
thread of the service, wrk and the attacker); a broker given with
--bootstrap is not pinned. Other work on the machine is not pinned
either: the script reads how busy the service's CPUs were beyond the
service itself (``others on its CPU``), and /proc/loadavg.

Two configurations: ``limits``
(``max_connections = 2000``, ``max_connections_per_ip = 256``,
``idle_timeout = 5``, ``send_timeout = 2``, ``h2_max_concurrent_streams =
100``, ``h2_max_resets_per_second = 200``) and ``no limits`` (each set as
high as it goes, ``max_connections_per_ip = 0``). Cases are interleaved,
round after round. It prints wrk's req/s and p99 per run, then per
configuration and attack the medians over the rounds of the baseline's and
the attacked load's figures and of the ratios; the target is at least 0.7
times the baseline's req/s and at most twice its p99.
It also reads the CPU time of the service, wrk and the attacker, and
splits each loss of req/s into CPU the service did not get beside the
attack ("CPU taken": the attacker's and the machine's other work) and
CPU it spent beyond what its requests cost in the baseline ("service's
own"); docs/benchmarks.md#where-the-time-goes-under-attack. The "req/s per
CPU s ratio" is the ordinary req/s per second of the service's CPU beside
the attack over the baseline's: what the req/s ratio would have been had
the service got as much CPU in both runs, the machine's other work aside
(it is 1 - service's own x baseline CPU / attacked CPU). --configs
runs only the configurations named.
Every run must add up (ledger received = delivered, nothing failed or lost,
the topic holding as many records as delivered), or the script exits 1.
Without --bootstrap it starts Apache Kafka itself (tests/brokers.py).
Bounded: each run stops after --seconds (the attacker within 60 s more).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from statistics import median

import httpx
from prometheus_client.parser import text_string_to_metric_families

import served
from compare import _broker, _records, wrk_figures
from served import ROOT, Served

CONNECTIONS = 64
ATTACKS = {  # attack: connections (or HTTP/2 clients)
    "idle": 4000,
    "slowloris": 2000,
    "never_read": 100,
    "one_address": 1000,
    "h2_flood": 10,
    "rapid_reset": 4,
}
CONFIGS = {
    "limits": {
        "max_connections": 2000,
        "max_connections_per_ip": 256,
        "idle_timeout": 5.0,
        "send_timeout": 2.0,
        "h2_max_concurrent_streams": 100,
        "h2_max_resets_per_second": 200,
    },
    "no limits": {
        "max_connections": 1_000_000,
        "max_connections_per_ip": 0,
        "idle_timeout": 3600.0,
        "send_timeout": 3600.0,
        "h2_max_concurrent_streams": 10_000,
        "h2_max_resets_per_second": 1_000_000,
    },
}
REQ_RATIO, P99_RATIO = 0.7, 2.0  # the targets
# Of /proc/stat's per-CPU times, those a CPU is busy (all but idle and iowait)
BUSY_FIELDS = (0, 1, 2, 5, 6, 7)  # user, nice, system, irq, softirq, steal


@dataclass(frozen=True)
class Pinning:
    """Which CPUs the service runs on, and which the load (this script, wrk,
    the attacker, the broker it starts); both empty: no pinning."""

    service: frozenset[int] = frozenset()
    load: frozenset[int] = frozenset()

    @classmethod
    def split(cls, cpus: set[int]) -> Pinning:
        """The upper half of ``cpus`` (rounded down, at least one) for the service."""
        ordered = sorted(cpus)
        cut = len(ordered) - max(1, len(ordered) // 2)
        return cls(frozenset(ordered[cut:]), frozenset(ordered[:cut]))

    def __str__(self) -> str:
        if not self.service:
            return "no pinning: the service, wrk, the attacker and the broker share every CPU"
        return (
            f"the service on CPU {_cpu_list(self.service)}; this script, wrk, the attacker"
            f" and the broker it starts on CPU {_cpu_list(self.load)}"
        )

    def check(self, pid: int, cpus: frozenset[int], what: str) -> None:
        """Raise unless every thread of process ``pid`` may run on ``cpus`` only."""
        if not self.service:
            return
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(ProcessLookupError, FileNotFoundError):
                allowed = os.sched_getaffinity(int(task.name))
                if allowed != cpus:
                    raise RuntimeError(
                        f"{what} thread {task.name} may run on CPU {_cpu_list(allowed)},"
                        f" not {_cpu_list(cpus)}"
                    )


def _cpu_list(cpus: set[int] | frozenset[int]) -> str:
    return ",".join(map(str, sorted(cpus)))


def _busy(cpus: frozenset[int]) -> float:
    """The time (s) CPUs ``cpus`` have been busy since boot, all processes'."""
    total = 0
    for line in Path("/proc/stat").read_text().splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            total += sum(int(fields[index]) for index in BUSY_FIELDS)
    return total / os.sysconf("SC_CLK_TCK")


def write_config(
    path: Path, bootstrap: str, topic: str, admin: int, limits: dict[str, float]
) -> Path:
    """The benchmarks' config (served.py) with an admin port and ``limits``."""
    server = "\n".join(f"{key} = {value}" for key, value in limits.items())
    return served.write_config(
        path,
        bootstrap,
        topic,
        path.parent / ("spill-" + topic),
        server=f'admin_bind = ["127.0.0.1:{admin}"]\n{server}',
    )


@dataclass
class Run:
    config: str
    attack: str
    base_rps: float  # the baseline just before, with no attack
    base_p99: float  # ms
    rps: float  # beside the attack
    p99: float  # ms
    errors: str  # wrk's socket errors lines, "" if none
    seen: dict[str, object]  # what the attacker reported (counts only)
    counted: dict[str, int]  # the service's refusals and closes by reason
    base_cpu: float  # the service's CPU time during the baseline, s per s
    cpu: float  # the service's CPU time beside the attack, s per s
    attacker_cpu: float  # the attacker process's CPU time, s per s of its life
    wrk_cpu: float  # wrk's CPU time beside the attack, s per s
    base_core: float  # how busy the service's CPUs were in the baseline, s per s
    core: float  # and beside the attack (both: 0 with no pinning)
    load: str  # /proc/loadavg's 1-minute figure at the start and the end of the run

    @property
    def taken(self) -> float:
        """The share of the baseline's req/s lost because the service got less
        CPU than in the baseline (the attacker's CPU, the machine's other work)."""
        return (self.base_cpu - self.cpu) / self.base_cpu

    @property
    def own(self) -> float:
        """The share of the baseline's req/s lost to the service's own work on
        the attack: its CPU beside the attack beyond what its requests cost at
        the baseline's CPU per request, over the baseline's CPU."""
        per_request = self.base_cpu / self.base_rps
        return (self.cpu - self.rps * per_request) / self.base_cpu

    @property
    def per_cpu(self) -> float:
        """The ordinary req/s per second of the service's CPU beside the
        attack over the baseline's: the req/s ratio had the service got the
        same CPU in both runs, whatever the machine's other work took."""
        return (self.rps / self.cpu) / (self.base_rps / self.base_cpu)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _counted(admin: str) -> dict[str, int]:
    text = httpx.get(f"{admin}/metrics", timeout=10).text
    counted: dict[str, int] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in (
                "redirect_logger_connections_refused_total",
                "redirect_logger_connections_closed_total",
            ) and int(sample.value):
                counted[sample.labels["reason"]] = int(sample.value)
            elif sample.name == "redirect_logger_h2_streams_refused_total" and sample.value:
                counted["h2_streams_refused"] = int(sample.value)
    return counted


def _cpu(pid: int) -> float:
    """The CPU time (user + system, s) process ``pid`` has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children_cpu() -> float:
    """The CPU time (s) of the child processes waited for so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _ready(admin: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{admin}/readyz", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the service was not ready within 60 s")


def _loadavg() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


def one_run(
    work: Path, bootstrap: str, config: str, attack: str, seconds: int, pinning: Pinning
) -> Run:
    topic = f"attack-{uuid.uuid4().hex[:12]}"
    admin_port = _free_port()
    admin = f"http://127.0.0.1:{admin_port}"
    path = write_config(work / f"{topic}.toml", bootstrap, topic, admin_port, CONFIGS[config])
    load_start = _loadavg()
    served = Served(path, cpus=pinning.service)
    attacker = None
    try:
        _ready(admin)
        pinning.check(served.pid, pinning.service, "the service's")
        url = served.url
        host, port = url.removeprefix("http://").rsplit(":", 1)
        command = ["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{seconds}s", "--latency"]
        # CPU times: the service's from /proc, wrk's and the attacker's when
        # each is waited for (one at a time, so each delta is one process's)
        service_start, start = _cpu(served.pid), time.monotonic()
        core_start = _busy(pinning.service)
        baseline = subprocess.run(
            [*command, f"{url}/docs/base"], capture_output=True, text=True, timeout=seconds + 60
        ).stdout
        base_cpu = (_cpu(served.pid) - service_start) / (time.monotonic() - start)
        base_core = (_busy(pinning.service) - core_start) / (time.monotonic() - start)
        service_start, children_start, start = _cpu(served.pid), _children_cpu(), time.monotonic()
        core_start = _busy(pinning.service)
        wrk = subprocess.Popen([*command, f"{url}/docs/bench"], stdout=subprocess.PIPE, text=True)
        pinning.check(wrk.pid, pinning.load, "wrk's")
        time.sleep(0.5)
        attacker_start = time.monotonic()
        attacker = subprocess.Popen(
            [
                *(sys.executable, str(ROOT / "tests" / "attackers.py"), attack, host, port),
                *("--count", str(ATTACKS[attack]), "--seconds", str(seconds), "--repeat"),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        pinning.check(attacker.pid, pinning.load, "the attacker's")
        report, _ = wrk.communicate(timeout=seconds + 60)
        cpu = (_cpu(served.pid) - service_start) / (time.monotonic() - start)
        core = (_busy(pinning.service) - core_start) / (time.monotonic() - start)
        wrk_cpu = (_children_cpu() - children_start) / (time.monotonic() - start)
        children_start = _children_cpu()
        output, _ = attacker.communicate(timeout=seconds + 60)
        attacker_cpu = (_children_cpu() - children_start) / (time.monotonic() - attacker_start)
        found = json.loads(output)
        seen: dict[str, object] = {
            key: (len(value) if key == "hits" else value)
            for key, value in found.items()
            if key != "goaways"
        }
        if "goaways" in found:
            seen["goaways"] = sum(1 for code in found["goaways"] if code is not None)
        counted = _counted(admin)
    finally:
        if attacker is not None and attacker.poll() is None:
            attacker.kill()
        ledger = served.stop()
    base_rps, _, base_p99, _ = wrk_figures(baseline)
    rps, _, p99, _ = wrk_figures(report)
    errors = " ".join(
        line.strip() for line in (baseline + report).splitlines() if "Socket errors" in line
    )
    bad = [k for k in ("failed", "dropped", "shed", "in_flight") if ledger.get(k)]
    in_topic = _records(bootstrap, topic)
    if bad or ledger["received"] != ledger["delivered"] or in_topic != ledger["delivered"]:
        raise RuntimeError(f"{config}/{attack}: records do not add up: {ledger}, topic {in_topic}")
    return Run(
        *(config, attack, base_rps, base_p99, rps, p99, errors, seen, counted),
        *(base_cpu, cpu, attacker_cpu, wrk_cpu, base_core, core),
        f"{load_start} -> {_loadavg()}",
    )


def _report_broker(bootstrap: str | None, pinning: Pinning) -> None:
    """Say where the broker runs; check the pinning of the one this script started."""
    if bootstrap:
        print(f"broker: {bootstrap}, not started here, so not pinned", flush=True)
        return
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            pid, ppid = int(stat.parent.name), int(stat.read_text().rsplit(")", 1)[1].split()[1])
            command = (stat.parent / "cmdline").read_bytes().split(b"\0")
            if ppid == os.getpid() and b"kafka.Kafka" in command:
                pinning.check(pid, pinning.load, "the broker's")
                cpus = _cpu_list(os.sched_getaffinity(pid))
                print(f"broker: Apache Kafka, pid {pid}, on CPU {cpus}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", help="an existing broker (default: start Apache Kafka)")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=list(ATTACKS))
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    cpus = os.sched_getaffinity(0)
    parser.add_argument(
        "--isolate",
        action=argparse.BooleanOptionalAction,
        default=len(cpus) >= 2,
        help="the service on CPUs of its own, the load on the others"
        f" (default here: {'on' if len(cpus) >= 2 else 'off'}, {len(cpus)} CPUs)",
    )
    args = parser.parse_args()
    if args.isolate and len(cpus) < 2:
        print(f"--isolate needs 2 CPUs or more; this script may use {len(cpus)}", file=sys.stderr)
        return 2
    if shutil.which("wrk") is None:
        print("wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 2
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the service and attackers inherit it
    pinning = Pinning.split(cpus) if args.isolate else Pinning()
    if pinning.service:  # what this script starts from now on inherits it
        os.sched_setaffinity(0, pinning.load)
    print(f"pinning: {pinning}", flush=True)
    cases = [(config, attack) for config in args.configs for attack in args.attacks]
    runs: list[Run] = []
    with (
        tempfile.TemporaryDirectory(prefix="attack-") as tmp,
        _broker(args.bootstrap, Path(tmp)) as bootstrap,
    ):
        _report_broker(args.bootstrap, pinning)
        for round_ in range(args.rounds):
            shift = round_ % len(cases)
            for config, attack in cases[shift:] + cases[:shift]:
                run = one_run(Path(tmp), bootstrap, config, attack, args.seconds, pinning)
                runs.append(run)
                print(
                    f"round {round_ + 1} | {config} | {attack} | baseline {run.base_rps:,.0f}"
                    f" req/s p99 {run.base_p99:.1f} ms | attacked {run.rps:,.0f} req/s"
                    f" p99 {run.p99:.1f} ms | {run.errors or 'no socket errors'} |"
                    f" attacker {run.seen} | counted {run.counted} | CPU s/s: service"
                    f" {run.base_cpu:.2f} -> {run.cpu:.2f}, attacker {run.attacker_cpu:.2f},"
                    f" wrk {run.wrk_cpu:.2f}"
                    + (
                        f", others on its CPU {run.base_core - run.base_cpu:.2f} ->"
                        f" {run.core - run.cpu:.2f}"
                        if pinning.service
                        else ""
                    )
                    + f" | load average {run.load}",
                    flush=True,
                )
    print()
    print(
        "| configuration | attack | baseline req/s | baseline p99 ms | attacked req/s |"
        " attacked p99 ms | req/s ratio | p99 ratio | target | req/s per CPU s ratio |"
        " service CPU s/s |"
        " attacker CPU s/s | others on the service's CPU s/s | req/s lost: CPU taken |"
        " req/s lost: service's own |"
    )
    print("| --- | --- |" + " ---: |" * 6 + " --- |" + " ---: |" * 6)
    for config in args.configs:
        for attack in args.attacks:
            mine = [run for run in runs if (run.config, run.attack) == (config, attack)]
            rps_ratio = median(run.rps / run.base_rps for run in mine)
            p99_ratio = median(run.p99 / run.base_p99 for run in mine)
            met = rps_ratio >= REQ_RATIO and p99_ratio <= P99_RATIO
            print(
                f"| {config} | {attack} | {median(run.base_rps for run in mine):,.0f} |"
                f" {median(run.base_p99 for run in mine):.1f} |"
                f" {median(run.rps for run in mine):,.0f} | {median(run.p99 for run in mine):.1f} |"
                f" {rps_ratio:.2f} | {p99_ratio:.2f} | {'met' if met else 'missed'} |"
                f" {median(run.per_cpu for run in mine):.2f} |"
                f" {median(run.base_cpu for run in mine):.2f} ->"
                f" {median(run.cpu for run in mine):.2f} |"
                f" {median(run.attacker_cpu for run in mine):.2f} |"
                + (
                    f" {median(run.base_core - run.base_cpu for run in mine):.2f} ->"
                    f" {median(run.core - run.cpu for run in mine):.2f} |"
                    if pinning.service
                    else " - |"
                )
                + f" {median(run.taken for run in mine):.2f} |"
                f" {median(run.own for run in mine):.2f} |"
            )
    print(f"\ntarget: >= {REQ_RATIO}x the baseline's req/s and <= {P99_RATIO}x its p99")
    print(f"pinning: {pinning}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
