"""The same benchmarks under several CPython interpreters, interleaved, in one run.

    nice -n 10 python benchmarks/pythons.py PYTHON [PYTHON ...] [--bootstrap HOST:PORT]
        [--rounds 3] [--records 200000] [--connections 64 256] [--seconds 8]

Each PYTHON is an interpreter with the project installed (a virtualenv's
``bin/python``: ``python3.13 -m venv v13 && v13/bin/pip install -e .``).
Every round runs, for each interpreter in turn (the order rotates from
round to round), ``benchmarks/pipeline_capacity.py`` (records/s from the
channel to Kafka, without HTTP) and ``benchmarks/compare.py --systems AC
--rounds 1`` (the service, A, and the bare ASGI app on Hypercorn's trio
worker, C, both under that interpreter, keep-alive, at each of
--connections). It prints, per interpreter, the medians over the rounds and
the ratio of each to the first interpreter's, and the exact checks: every
record delivered in pipeline_capacity (its ledger), and for A the records
in Kafka = the redirects answered. Without --bootstrap it starts Apache
Kafka itself (tests/brokers.py). Bounded: each benchmark run is given at
most --seconds x 20 + 120 s.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from compare import _broker

HERE = Path(__file__).resolve().parent
ROW = re.compile(
    r"^\| (\d+) \| ([AC]) \| ([\d,]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) "
    r"\| ([\d.]+) \| ([\d,]*)(?: / ([\d,]+))? \|$",
    re.M,
)
CAPACITY = re.compile(r"pipeline capacity: ([\d,]+) records/s")
LEDGER = re.compile(r"ledger \{.*'delivered': (\d+).*\}")


@dataclass
class Figures:
    version: str
    capacity: list[float] = field(default_factory=list)
    http: dict[tuple[int, str, str], list[float]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)


def _run(command: list[str], budget: float) -> str:
    done = subprocess.run(command, capture_output=True, text=True, timeout=budget, check=False)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} exited {done.returncode}: {done.stderr[-2000:]}")
    return done.stdout


def one_round(python: str, figures: Figures, args: argparse.Namespace, bootstrap: str) -> None:
    budget = args.seconds * 20 + 120
    capacity = [python, str(HERE / "pipeline_capacity.py"), "--bootstrap", bootstrap]
    out = _run([*capacity, "--records", str(args.records)], budget)
    found, ledger = CAPACITY.search(out), LEDGER.search(out)
    if found is None or ledger is None:
        figures.failures.append(f"pipeline_capacity printed no figure: {out[-500:]}")
    else:
        figures.capacity.append(float(found.group(1).replace(",", "")))
        if int(ledger.group(1)) != args.records:
            figures.failures.append(f"pipeline_capacity delivered {ledger.group(1)}")
    command = [python, str(HERE / "compare.py"), "--bootstrap", bootstrap, "--systems", "AC"]
    command += ["--rounds", "1", "--seconds", str(args.seconds), "--connections"]
    out = _run([*command, *map(str, args.connections)], budget)
    rows = ROW.findall(out)
    if len(rows) != 2 * len(args.connections):
        figures.failures.append(f"compare.py printed {len(rows)} rows: {out[-500:]}")
    for conns, system, rps, _p50, p99, peak, cpu, _rss, records, answered in rows:
        for name, value in (("req/s", rps), ("p99 ms", p99), ("max ms", peak), ("CPU", cpu)):
            key = (int(conns), system, name)
            figures.http.setdefault(key, []).append(float(value.replace(",", "")))
        if system == "A" and records.replace(",", "") != answered.replace(",", ""):
            figures.failures.append(f"A at {conns}: {records} records for {answered} answers")


def _http(key: tuple[int, str, str]) -> Callable[[Figures], list[float]]:
    return lambda figures: figures.http.get(key, [])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pythons", nargs="+", help="interpreters with the project installed")
    parser.add_argument("--bootstrap", help="an existing broker (default: start Apache Kafka)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--connections", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--seconds", type=int, default=8)
    args = parser.parse_args()
    versions = [
        _run([python, "-c", "import sys; print(sys.version.split()[0])"], 30).strip()
        for python in args.pythons
    ]
    every = {
        python: Figures(version) for python, version in zip(args.pythons, versions, strict=True)
    }
    with (
        tempfile.TemporaryDirectory(prefix="pythons-") as work,
        _broker(args.bootstrap, Path(work)) as bootstrap,
    ):
        for index in range(args.rounds):
            turn = index % len(args.pythons)
            order = args.pythons[turn:] + args.pythons[:turn]
            for python in order:
                print(f"round {index + 1}: {every[python].version}", file=sys.stderr, flush=True)
                one_round(python, every[python], args, bootstrap)
    first = every[args.pythons[0]]
    print(f"medians over {args.rounds} rounds; ratio to {first.version} in brackets")
    print("| figure | " + " | ".join(f.version for f in every.values()) + " |")
    print("| --- |" + " --- |" * len(every))

    def row(label: str, get: Callable[[Figures], list[float]]) -> None:
        values = [statistics.median(get(f)) if get(f) else None for f in every.values()]
        base = values[0]
        cells = []
        for value in values:
            if value is None:
                cells.append("-")
                continue
            cell = f"{value:,.3g}" if value < 10 else f"{value:,.0f}"
            cells.append(cell if not base or value is base else f"{cell} ({value / base:.2f})")
        print(f"| {label} | " + " | ".join(cells) + " |")

    row("pipeline records/s", lambda f: f.capacity)
    for conns in args.connections:
        for system in "AC":
            for name in ("req/s", "p99 ms", "max ms", "CPU"):
                label = f"{system} {conns} conns {name}" + (" s/1k req" if name == "CPU" else "")
                row(label, _http((conns, system, name)))
        for f in every.values():
            a = f.http.get((conns, "A", "req/s"), [])
            c = f.http.get((conns, "C", "req/s"), [])
            if a and c:
                ratio = statistics.median(a) / statistics.median(c)
                print(f"  A/C req/s at {conns} under {f.version}: {ratio:.2f}")
    failed = [f"{f.version}: {text}" for f in every.values() for text in f.failures]
    print("\n".join(["checks:", *(failed or ["  ok   every record delivered, records = answers"])]))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
