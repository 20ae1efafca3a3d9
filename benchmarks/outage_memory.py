"""Memory while Kafka is unreachable: RSS under saturating load, sampled.

    python benchmarks/outage_memory.py [--seconds 60] [--connections 64] [--bootstrap HOST:PORT]

Starts ``redirect-logger serve`` (the real CLI) with Kafka pointed at a port
where nothing listens (or, with --bootstrap, at a real broker: a soak), a
fresh spill directory and the given records settings, drives it with ``wrk``
(keep-alive, loopback) and prints the service's RSS every 5 s, the
redirects answered and the final ledger. With the broker down the bounded
queues fill (the channel, librdkafka's queue) and the rest goes to the
journal on disk, so RSS must level off. Bounded: wrk stops after --seconds,
the service after its drain.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from served import Served, write_config


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--queue-size", type=int, default=10_000)
    parser.add_argument("--librdkafka-queue", type=int, default=100_000)
    parser.add_argument("--when-full", default="block")
    parser.add_argument(
        "--bootstrap",
        default="127.0.0.1:9",
        help="a real broker, for a soak with Kafka up (default: port 9, where nothing listens)",
    )
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="outage-memory-"))
    config = write_config(
        work / "c.toml",
        args.bootstrap,
        "outage",
        work / "spill",
        records=f'queue_size = {args.queue_size}\nwhen_full = "{args.when_full}"',
        kafka=f'"queue.buffering.max.messages" = {args.librdkafka_queue}',
        shutdown="flush_timeout = 2.0",
    )
    service = Served(config)
    wrk = subprocess.Popen(
        ["wrk", "-t1", f"-c{args.connections}", f"-d{args.seconds}s", f"{service.url}/docs/a?x=1"],
        stdout=subprocess.PIPE,
        text=True,
    )
    print(f"{'t (s)':>6} {'RSS (MiB)':>10}")
    start = time.monotonic()
    while wrk.poll() is None:
        print(f"{time.monotonic() - start:6.0f} {rss_mib(service.pid):10.1f}", flush=True)
        time.sleep(5)
    print(f"{time.monotonic() - start:6.0f} {rss_mib(service.pid):10.1f}")
    report = wrk.communicate()[0]
    requests = re.search(r"(\d+) requests in", report)
    ledger = service.stop()
    spilled = sum(p.stat().st_size for p in (work / "spill").rglob("segment-*"))
    print(f"redirects answered: {requests.group(1) if requests else '?'}")
    print(f"ledger: {ledger}")
    print(f"journal on disk: {spilled / 2**20:.1f} MiB")
    shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
