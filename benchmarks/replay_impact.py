"""Redirect latency with and without a replay running, side by side in one run.

    python benchmarks/replay_impact.py --bootstrap 127.0.0.1:9092 [--records 200000]

Runs ``redirect-logger serve`` (the real CLI) twice against the same broker,
driven by ``wrk`` (keep-alive, loopback) for --seconds each: first with an
empty spill journal, then with --records records journaled beforehand, which
the service replays in the background from its start. Prints requests/s and
latency for both runs, their ratios, and how many records the replay
delivered meanwhile. Bounded: wrk stops after --seconds; each service after
its drain.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import orjson

from redirect_logger.hits import Encoded, message_headers
from redirect_logger.spill import Journal
from served import Served, write_config

WRK_RE = {
    "rps": re.compile(r"Requests/sec:\s+([\d.]+)"),
    "p50": re.compile(r"50%\s+([\d.]+)(us|ms|s)"),
    "p99": re.compile(r"99%\s+([\d.]+)(us|ms|s)"),
}
UNIT = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def run(config: Path, seconds: int, connections: int) -> tuple[dict[str, float], dict[str, int]]:
    service = Served(config)
    report = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{seconds}s",
            "--latency",
            f"{service.url}/docs/a?x=1",
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
    ).stdout
    ledger = service.stop()
    figures: dict[str, float] = {}
    for name, pattern in WRK_RE.items():
        found = pattern.search(report)
        if found is None:
            raise RuntimeError(report)
        figures[name] = float(found.group(1)) * (UNIT[found.group(2)] if name != "rps" else 1)
    return figures, ledger


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--connections", type=int, default=64)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="replay-impact-"))
    topic = f"bench-{uuid.uuid4().hex[:8]}"
    results = []
    for label, journaled in (("no replay", 0), ("replaying", args.records)):
        spill = work / label.replace(" ", "-")
        if journaled:
            journal = Journal(spill / "slot-0", max_bytes=1 << 31, segment_bytes=64 << 20)
            value = orjson.dumps({"id": "x" * 36, "path": "/docs/a", "pad": "p" * 300})
            headers = message_headers("redirect", "docs")
            batch = [Encoded(topic, b"k", value, 1_700_000_000_000, headers)] * 10_000
            for _ in range(journaled // len(batch)):
                journal.append(batch)
            journal.close()
        config = write_config(work / f"{label}.toml", args.bootstrap, topic, spill)
        results.append((label, *run(config, args.seconds, args.connections)))
    print(f"{'run':<10} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'replayed':>9}")
    for label, figures, ledger in results:
        print(
            f"{label:<10} {figures['rps']:8.0f} {figures['p50']:8.2f} {figures['p99']:8.2f} "
            f"{ledger['replayed']:9d}"
        )
    if not all(ledger["delivered"] for _, _, ledger in results):
        print(f"error: nothing was delivered to {args.bootstrap}: is the broker up?")
        return 1
    base, busy = results[0][1], results[1][1]
    print(
        f"replaying / no replay: req/s {busy['rps'] / base['rps']:.2f}, "
        f"p50 {busy['p50'] / base['p50']:.2f}, p99 {busy['p99'] / base['p99']:.2f}"
    )
    shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
