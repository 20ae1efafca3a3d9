"""Records/s from the channel to delivered-by-broker, without HTTP.

    python benchmarks/pipeline_capacity.py --bootstrap 127.0.0.1:9092 [--records 200000]

Submits hits to the intake as fast as the channel takes them (policy
"block") and stops the clock when the broker has acknowledged the last one.
Bounded: exits after --records records or --timeout seconds.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid

import trio
from uuid_utils import uuid7

from redirect_logger.config import parse_settings
from redirect_logger.hits import Hit
from redirect_logger.service import Service

HEADERS = [(b"host", b"bench.local"), (b"user-agent", b"bench/1"), (b"referer", b"https://r/")]


async def run(bootstrap: str, records: int, budget: float) -> None:
    settings = parse_settings(
        {
            "records": {"topic": f"bench-{uuid.uuid4().hex[:8]}", "queue_size": 20_000},
            "kafka": {"bootstrap.servers": bootstrap},
            "shutdown": {"flush_timeout": budget, "grace_period": budget + 10},
            "spill": {"directory": tempfile.mkdtemp(prefix="bench-spill-")},
        }
    )
    service = Service(settings)
    target, _ = service.rules.match("/")
    with trio.fail_after(budget):
        async with service.running():
            pipeline = service.pipeline
            assert pipeline is not None
            while service.readiness() is not None:  # noqa: ASYNC110 - polled state
                await trio.sleep(0.05)
            start = time.perf_counter()
            for n in range(records):
                hit = Hit(
                    str(uuid7()),
                    time.time(),
                    "GET",
                    "http",
                    "/",
                    b"n=%d" % n,
                    HEADERS,
                    ("127.0.0.1", 40000 + n % 20000),
                    target.status,
                    None,
                    None,
                )
                await pipeline.intake.submit(hit)
            submitted = time.perf_counter() - start
            while service.ledger.delivered + service.ledger.failed < records:  # noqa: ASYNC110
                await trio.sleep(0.01)
            elapsed = time.perf_counter() - start
    ledger = service.ledger_snapshot()
    print(f"records {records}: submitted in {submitted:.2f} s, delivered in {elapsed:.2f} s")
    print(f"pipeline capacity: {records / elapsed:,.0f} records/s (acks=all, idempotent)")
    print(f"ledger {ledger}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args()
    trio.run(run, args.bootstrap, args.records, args.timeout)


if __name__ == "__main__":
    main()
