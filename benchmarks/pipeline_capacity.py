"""Records/s from the channel to delivered-by-broker, without HTTP.

    python benchmarks/pipeline_capacity.py --bootstrap 127.0.0.1:9092 [--records 200000]
        [--distinct-agents] [--no-bot-detection]

Hands the intake as many hits as the channel has room for (made before the
clock starts), looks for room again every millisecond, and stops the clock
when the broker has acknowledged the last one.
Every hit carries the same User-Agent, or with --distinct-agents one that no
other hit carries (browser-shaped, made before the clock starts), so that the
bot flag's per-agent cache never helps. records.bot_detection is on unless
--no-bot-detection. Bounded: exits after --records records or --timeout
seconds.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
import uuid

import trio
from uuid_utils import uuid7

from redirect_logger.config import parse_settings
from redirect_logger.hits import Hit
from redirect_logger.service import Service

HEADERS = [(b"host", b"bench.local"), (b"user-agent", b"bench/1"), (b"referer", b"https://r/")]

CHROME = "Mozilla/5.0 (%s) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/%s Safari/537.36"
SAFARI_IOS = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS %s like Mac OS X) AppleWebKit/605.1.15"
    " (KHTML, like Gecko) Version/%s Mobile/15E%d Safari/604.1"
)
FIREFOX = "Mozilla/5.0 (%s; rv:%d.0) Gecko/20100101 Firefox/%d.%d"


def distinct_agents(count: int) -> list[bytes]:
    """``count`` different browser-shaped User-Agents (Chrome, Safari on iOS,
    Firefox), each with a build number no other one has."""
    rng = random.Random(5)
    systems = [
        "Windows NT 10.0; Win64; x64",
        "Macintosh; Intel Mac OS X 10_15_7",
        "X11; Linux x86_64",
    ]
    agents = []
    for n in range(count):
        system = systems[n % 3]
        if n % 3 == 0:
            agent = CHROME % (system, f"{100 + n % 40}.0.{n}.{rng.randint(0, 250)}")
        elif n % 3 == 1:
            ios = f"{15 + n % 4}_{rng.randint(0, 7)}"
            agent = SAFARI_IOS % (ios, ios.replace("_", "."), n)
        else:
            agent = FIREFOX % (system, 100 + n % 40, 100 + n % 40, n)
        agents.append(agent.encode())
    return agents


async def run(bootstrap: str, records: int, budget: float, distinct: bool, bots: bool) -> None:
    settings = parse_settings(
        {
            "records": {
                "topic": f"bench-{uuid.uuid4().hex[:8]}",
                "queue_size": 20_000,
                "bot_detection": bots,
            },
            "kafka": {"bootstrap.servers": bootstrap},
            "shutdown": {"flush_timeout": budget, "grace_period": budget + 10},
            "spill": {"directory": tempfile.mkdtemp(prefix="bench-spill-")},
        }
    )
    service = Service(settings)
    target, _ = service.rules.match("/")
    headers = (
        [[*HEADERS[:1], (b"user-agent", agent), *HEADERS[2:]] for agent in distinct_agents(records)]
        if distinct
        else [HEADERS] * records
    )
    # Made before the clock starts (and before the service's start-up freezes
    # the heap's objects), so that the clock times the pipeline, not this loop.
    hits = [
        Hit(
            str(uuid7()),
            time.time(),
            "GET",
            "http",
            "/",
            b"n=%d" % n,
            headers[n],
            ("127.0.0.1", 40000 + n % 20000),
            target.status,
            None,
            None,
        )
        for n in range(records)
    ]
    with trio.fail_after(budget):
        async with service.running():
            pipeline = service.pipeline
            assert pipeline is not None
            while service.readiness() is not None:  # noqa: ASYNC110 - polled state
                await trio.sleep(0.05)
            start = time.perf_counter()
            # As many hits as the channel has room for, then a look every
            # millisecond for room: a hit that found the channel full would
            # otherwise wait in it alone, a wake-up per hit that is this
            # loop's cost, not the pipeline's.
            submitted_count = 0
            while submitted_count < records:
                channel = pipeline.send.statistics()
                room = channel.max_buffer_size - channel.current_buffer_used
                if not room:
                    await trio.sleep(0.001)
                    continue
                chunk = hits[submitted_count : submitted_count + room]
                taken, _ = await pipeline.intake.submit_all(chunk)
                assert taken == len(chunk), "the channel had room for the chunk"
                submitted_count += taken
            submitted = time.perf_counter() - start
            while service.ledger.delivered + service.ledger.failed < records:  # noqa: ASYNC110
                await trio.sleep(0.01)
            elapsed = time.perf_counter() - start
    ledger = service.ledger_snapshot()
    print(f"records {records}: submitted in {submitted:.2f} s, delivered in {elapsed:.2f} s")
    agents = "each with its own User-Agent" if distinct else "one User-Agent"
    agents += ", bot detection " + ("on" if bots else "off")
    print(f"pipeline capacity: {records / elapsed:,.0f} records/s (acks=all, idempotent, {agents})")
    print(f"ledger {ledger}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument(
        "--distinct-agents", action="store_true", help="a different User-Agent on every hit"
    )
    parser.add_argument("--no-bot-detection", action="store_true", help="records.bot_detection off")
    args = parser.parse_args()
    trio.run(
        run,
        args.bootstrap,
        args.records,
        args.timeout,
        args.distinct_agents,
        not args.no_bot_detection,
    )


if __name__ == "__main__":
    main()
