"""Hunts for answered hits that are neither in Kafka nor counted: load and broker faults.

    nice -n 5 python benchmarks/shortfall.py [--runs 12] [--seconds 30]
        [--faults freeze starve none] [--freeze 4 12 20] [--starve 10 20]
        [--busy 8] [--producer default short] [--connections 16]
        [--session-timeout MS] [--debug eos] [--keep-logs] [--bootstrap HOST:PORT]
        [--direct [--rate 20000]]

Starts Apache Kafka, one KRaft node (tests/brokers.py; its server.log and
state-change.log in its own directory), unless --bootstrap names one. Then
--runs runs, each on a fresh topic: ``redirect-logger serve`` (the real CLI,
``benchmarks/served.py``) loaded by ``wrk -t1`` (keep-alive, loopback) for
--seconds, wrk writing down the ``X-Hit-Id`` of every 301 it is answered.
A quarter into the load, one fault, taken in turn from --faults:

- ``freeze``: the broker's JVM stopped (SIGSTOP) for a length taken in turn
  from --freeze (s), then continued (SIGCONT);
- ``starve``: --busy busy processes at nice 0 (a CPU-bound loop each) for a
  length from --starve (s), then killed;
- ``none``: load alone.

The service's producer settings, in turn from --producer: ``default`` (the
service's own), or ``short``: ``message.timeout.ms`` 5000,
``request.timeout.ms`` 2000, ``socket.timeout.ms`` 3000, so that librdkafka
times out and retries requests and expires records during a fault (the
expired ones go to the spill journal); ``batch4``: ``batch.num.messages``
4 and ``linger.ms`` 0, batches of up to 4 records as under a light load (4
keep-alive clients), but a produce request for every few hits; or
``small``: ``short`` and ``batch4`` together. --session-timeout sets the broker's
``broker.session.timeout.ms`` (default Kafka's 9000; with 2000 a short
freeze makes the controller fence its own broker). --debug passes
librdkafka's ``debug`` contexts (``eos``: the idempotent producer's state
changes) into the service's log.

After the load: SIGTERM, the ledger, and the checks. Every answered id
must be in the topic or in the spill journal, and the topic's distinct ids
must be at least the ledger's ``received`` less what it counts elsewhere
(``failed``, ``dropped``, ``shed``, ``excluded``, and ``spilled`` less
``replayed``). Surplus and records twice are counted, not failed: a record
librdkafka expired while its request was in flight may be in the topic and
in the journal too, and then replayed (docs/records.md, "Duplicates").
Each run prints a line: records, ledger, the broker's notable log lines
of that run (fencing, leadership, truncation, producer sequence and epoch
errors) by kind, and the service's librdkafka lines about sequences,
epochs and timeouts. A run that breaks a check
prints the evidence (tests/support.py ``explain_missing``), and the
broker's data and log are kept.

--direct runs a bare confluent-kafka producer instead of the service (its
settings, records keyed by 4 client addresses, at most --rate records/s)
and checks each delivery report by offset: the record stored at the offset
a report gave must be the record reported. The broker answers a batch it
takes for a duplicate of one of the producer's last 5 (same producer id,
epoch and sequence range) with that batch's offsets and logs nothing; a
report pointing at another record is that, or offsets reused after a
truncation. Bounded: every run stops after --seconds
(wrk's duration), every fault after its length; the busy processes are
killed by process id.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from itertools import cycle
from pathlib import Path

from confluent_kafka import KafkaError, Message, Producer, TopicPartition

from compare import _ends, _kept, reader
from served import ROOT, Served, write_config

sys.path.insert(0, str(ROOT / "tests"))
from brokers import Broker, KafkaBroker
from redirect_logger.config import KAFKA_DEFAULTS
from redirect_logger.spill import read_segment
from support import explain_missing

PATH = "/docs/a?x=1"
# The producer settings of each --producer choice, beyond the service's own.
VARIANTS: dict[str, dict[str, int]] = {
    "default": {},
    "short": {"message.timeout.ms": 5000, "request.timeout.ms": 2000, "socket.timeout.ms": 3000},
    # batches of up to 4 records, sent at once
    "batch4": {"batch.num.messages": 4, "linger.ms": 0},
}
VARIANTS["small"] = {**VARIANTS["short"], **VARIANTS["batch4"]}
# wrk: the id of every 301, one a line, into the file given after "--".
WRK_SCRIPT = """
local out
init = function(args) out = io.open(args[1], "w") end
response = function(status, headers, body)
  if status == 301 and headers["x-hit-id"] then out:write(headers["x-hit-id"], "\\n") end
end
"""
# What a broker logs that matters here, by kind.
BROKER_EVENTS = {
    "fenced": re.compile(r"Fencing broker"),
    "leader": re.compile(r"\] Leader \S+ with topic id"),
    "truncation": re.compile(r"Truncat"),
    "out of order": re.compile(r"OutOfOrderSequence"),
    "duplicate": re.compile(r"DuplicateSequence|[Dd]uplicate batch"),
    "producer epoch": re.compile(r"InvalidProducerEpoch|ProducerFenced|UnknownProducerId"),
    "append error": re.compile(r"Error processing append"),
    "error": re.compile(r"\bERROR\b"),
    "warning": re.compile(r"\bWARN\b"),
}
# The kinds whose lines each run shows (the first few).
SHOWN = ("fenced", "truncation", "out of order", "duplicate", "producer epoch", "append error")
# What librdkafka logs through the service about its idempotent producer.
CLIENT_EVENTS = re.compile(
    r"librdkafka.*(?:ERRSEQ|bumped epoch|Epoch:[1-9]|OutOfOrder|DUPLICATE|Duplicate|ersisted"
    r"|timed out|Timed out|TIMED_OUT|[Ff]atal|Inconsistent)"
)


class Busy:
    """``count`` CPU-bound processes at nice 0, until ``stop``."""

    def __init__(self, count: int) -> None:
        def nice0() -> None:
            os.setpriority(os.PRIO_PROCESS, 0, 0)  # root may lower it to 0

        self.processes = [
            subprocess.Popen([sys.executable, "-c", "while True: pass"], preexec_fn=nice0)
            for _ in range(count)
        ]

    def stop(self) -> None:
        for process in self.processes:
            process.kill()
        for process in self.processes:
            process.wait(10)


def fault(kind: str, length: float, broker: Broker, busy: int) -> None:
    """The fault, for ``length`` s; undone before returning, whatever happens."""
    if kind == "freeze":
        assert broker.process is not None
        pid = broker.process.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            time.sleep(length)
        finally:
            os.kill(pid, signal.SIGCONT)
    elif kind == "starve":
        hogs = Busy(busy)
        try:
            time.sleep(length)
        finally:
            hogs.stop()
    else:
        time.sleep(0)


class LogTail:
    """The lines added to a broker's log files since the last ``read``."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.sizes: dict[Path, int] = {}
        self.read()

    def read(self) -> list[str]:
        files = getattr(self.broker, "log_files", lambda: [])()
        lines: list[str] = []
        for path in files:
            if path.name == "kafka.log" or re.search(r"\.\d+$", path.name):
                continue  # the JVM's own output; rolled files were read before rolling
            size = path.stat().st_size
            start = self.sizes.get(path, 0)
            if size < start:  # rolled since: the new file from its start
                start = 0
            with path.open("rb") as stream:
                stream.seek(start)
                lines += stream.read(size - start).decode(errors="replace").splitlines()
            self.sizes[path] = size
        return lines


def journal_ids(spill: Path) -> set[str]:
    """The ids of every record in the spill journal's segments (each slot's
    ``segment-*.log``), replayed or not."""
    ids: set[str] = set()
    for segment in spill.rglob("segment-*.log"):
        for record in read_segment(segment).records:
            try:
                found = json.loads(record.value).get("id")
            except ValueError:
                continue
            if isinstance(found, str):
                ids.add(found)
    return ids


def one_run(
    number: int,
    kind: str,
    length: float,
    producer: str,
    args: argparse.Namespace,
    broker: Broker,
    work: Path,
    tail: LogTail,
) -> tuple[bool, int, Counter[str]]:
    """One run: whether every check held, the hits answered, the broker's
    notable lines by kind."""
    topic = f"shortfall-{number}-{uuid.uuid4().hex[:8]}"
    spill = work / f"spill-{number}"
    spill.mkdir()
    kafka = "".join(f'"{key}" = {value}\n' for key, value in VARIANTS[producer].items())
    if args.debug:
        kafka += f'"debug" = "{args.debug}"\n'
    config = write_config(work / f"run-{number}.toml", broker.bootstrap, topic, spill, kafka=kafka)
    # librdkafka's debug lines reach the service's log at DEBUG
    served = Served(config, env={"REDIRECT_LOGGER_LOG_LEVEL": "DEBUG"} if args.debug else None)
    ids_file = work / f"ids-{number}.txt"
    script = work / "ids.lua"
    script.write_text(WRK_SCRIPT)
    started = time.monotonic()
    wrk = subprocess.Popen(
        [
            "wrk",
            "-t1",
            f"-c{args.connections}",
            f"-d{args.seconds}s",
            "-s",
            str(script),
            served.url + PATH,
            "--",
            str(ids_file),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    time.sleep(args.seconds / 4)
    fault(kind, length, broker, args.busy)
    output, _ = wrk.communicate(timeout=args.seconds + 60)
    ledger = served.stop()
    took = time.monotonic() - started
    answered = set(ids_file.read_text().split()) if ids_file.exists() else set()
    kept = _kept(broker.bootstrap, topic)
    journal = journal_ids(spill)
    missing = answered - kept.ids - journal
    broker_lines = tail.read()
    events = Counter(
        name
        for line in broker_lines
        for name, pattern in BROKER_EVENTS.items()
        if pattern.search(line)
    )
    client = [line.rstrip() for line in served.lines if CLIENT_EVENTS.search(line)]
    if args.keep_logs:
        (work / f"service-{number}.log").write_text("".join(served.lines))
    # Records not in the topic by the ledger: in the journal, failed, dropped, ...
    elsewhere = sum(ledger[k] for k in ("failed", "dropped", "shed", "excluded"))
    elsewhere += ledger["spilled"] - ledger["replayed"]
    # More is no loss: a record expired in flight may be stored and journaled both.
    short = len(kept.ids) < ledger["received"] - elsewhere
    ok = not missing and not short
    print(
        f"run {number}: {kind} {length:g} s, producer {producer}: {len(answered):,} answered, "
        f"{len(kept.ids):,} ids in the topic ({kept.duplicates} twice), {len(journal)} in the "
        f"journal, {len(missing)} missing; ledger {ledger}; {took:.0f} s; broker: "
        f"{dict(events) or 'nothing notable'}; client lines: {len(client)}"
        + ("" if ok else "  <== CHECK FAILED"),
        flush=True,
    )
    interesting = [
        line for line in broker_lines if any(BROKER_EVENTS[k].search(line) for k in SHOWN)
    ]
    for line in interesting[:8]:
        print(f"    broker: {line[:300]}")
    for line in client[:8]:
        print(f"    client: {line[:300]}")
    if not ok:
        print(explain_missing(broker, topic, answered - journal, "".join(served.lines)))
        if "Requests/sec" not in output:
            print(output)
    return ok, len(answered), events


def direct_run(
    number: int,
    kind: str,
    length: float,
    producer: str,
    args: argparse.Namespace,
    broker: Broker,
    tail: LogTail,
) -> tuple[bool, int, Counter[str]]:
    """One run of a bare idempotent producer (the service's defaults and the
    variant's), records keyed as 4 clients would be, as fast as librdkafka
    takes them (--rate at most) for --seconds, the fault a quarter in. Then every record
    reported delivered must be in the topic at the offset its report gave:
    a report that points at another record's offset is a batch the broker
    took for a duplicate (or offsets reused after a truncation)."""
    topic = f"direct-{number}-{uuid.uuid4().hex[:8]}"
    config: dict[str, str | int | bool] = {
        "bootstrap.servers": broker.bootstrap,
        **KAFKA_DEFAULTS,
        "statistics.interval.ms": 0,
        **VARIANTS[producer],
    }
    delivered: dict[bytes, tuple[int, int]] = {}
    failed: Counter[str] = Counter()
    failed_ids: set[bytes] = set()

    def report(error: KafkaError | None, message: Message) -> None:
        value = message.value() or b""
        if error is None:
            delivered[value] = (message.partition() or 0, message.offset() or 0)
        else:
            failed[error.name()] += 1
            failed_ids.add(value)

    producer_ = Producer({**config, "on_delivery": report})
    keys = [f"127.0.0.{n}".encode() for n in range(2, 6)]
    faulted = threading.Thread(
        target=lambda: (time.sleep(args.seconds / 4), fault(kind, length, broker, args.busy))
    )
    produced = 0
    started = time.monotonic()
    faulted.start()
    while time.monotonic() - started < args.seconds:
        value = uuid.uuid4().hex.encode()
        while True:
            try:
                producer_.produce(topic, value, keys[produced % 4])
                break
            except BufferError:
                producer_.poll(0.05)
        produced += 1
        if produced % 1000 == 0:
            producer_.poll(0)
            ahead = produced / args.rate - (time.monotonic() - started)
            if ahead > 0:  # at most --rate records/s
                time.sleep(ahead)
    faulted.join()
    left = producer_.flush(120)
    stored = _offsets(broker.bootstrap, topic)
    where = {value: place for place, value in stored.items()}
    elsewhere = {v: p for v, p in delivered.items() if stored.get(p) != v}
    lost = [v for v in elsewhere if v not in where]
    moved = len(elsewhere) - len(lost)
    persisted = len(failed_ids & set(where))
    broker_lines = tail.read()
    events = Counter(
        name
        for line in broker_lines
        for name, pattern in BROKER_EVENTS.items()
        if pattern.search(line)
    )
    ok = not elsewhere and left == 0
    print(
        f"direct {number}: {kind} {length:g} s, producer {producer}: {produced:,} produced, "
        f"{len(delivered):,} reported delivered, {sum(failed.values()):,} failed "
        f"{dict(failed) or ''} ({persisted:,} of them in the topic), {left} unreported; "
        f"{len(stored):,} in the topic; {len(lost)} reported delivered and missing, {moved} "
        f"found at another offset than reported; broker: {dict(events) or 'nothing notable'}"
        + ("" if ok else "  <== CHECK FAILED"),
        flush=True,
    )
    for value in list(elsewhere)[:10]:
        print(
            f"    {value.decode()}: reported at {elsewhere[value]}, stored at {where.get(value)};"
            f" that offset holds {stored.get(elsewhere[value], b'nothing').decode()}"
        )
    for line in [
        line for line in broker_lines if any(BROKER_EVENTS[k].search(line) for k in SHOWN)
    ][:8]:
        print(f"    broker: {line[:300]}")
    return ok, len(delivered), events


def _offsets(bootstrap: str, topic: str) -> dict[tuple[int, int], bytes]:
    """Every record of ``topic``: (partition, offset) -> value, read to each
    partition's end offset."""
    consumer = reader(bootstrap)
    try:
        ends = _ends(consumer, topic) or {}
        partitions = sorted(ends)
        consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
        stored: dict[tuple[int, int], bytes] = {}
        positions = dict.fromkeys(partitions, 0)
        give_up = time.monotonic() + 300
        while any(positions[p] < ends[p] for p in partitions) and time.monotonic() < give_up:
            for message in consumer.consume(10_000, 0.5):
                if message.error():
                    continue
                partition, offset = message.partition() or 0, message.offset() or 0
                positions[partition] = offset + 1
                stored[(partition, offset)] = message.value() or b""
        return stored
    finally:
        consumer.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", help="an existing broker (no freeze: not ours)")
    parser.add_argument("--runs", type=int, default=12)
    parser.add_argument("--seconds", type=int, default=30)
    parser.add_argument("--faults", nargs="+", default=["freeze", "starve", "none"])
    parser.add_argument("--freeze", type=float, nargs="+", default=[4, 12, 20])
    parser.add_argument("--starve", type=float, nargs="+", default=[10, 20])
    parser.add_argument("--busy", type=int, default=8, help="busy processes while starving")
    parser.add_argument("--producer", nargs="+", default=["default", "short"])
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--session-timeout", type=int, help="broker.session.timeout.ms")
    parser.add_argument("--debug", help="librdkafka debug contexts for the service, e.g. eos")
    parser.add_argument("--keep-logs", action="store_true", help="keep every run's service log")
    parser.add_argument(
        "--direct", action="store_true", help="a bare producer, its reports checked by offset"
    )
    parser.add_argument("--rate", type=int, default=20_000, help="--direct: records/s at most")
    args = parser.parse_args()
    if shutil.which("wrk") is None and not args.direct:
        print("wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 2
    if args.bootstrap and "freeze" in args.faults:
        print("--bootstrap: a broker not started here cannot be frozen", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="shortfall-"))
    properties = []
    if args.session_timeout:
        properties = [
            f"broker.session.timeout.ms={args.session_timeout}",
            f"broker.heartbeat.interval.ms={max(100, args.session_timeout // 4)}",
        ]
    if args.bootstrap:
        broker = Broker(args.bootstrap)
    else:
        (work / "kafka").mkdir()
        broker = KafkaBroker(work / "kafka", properties=properties)
    failed = answered = 0
    faults: Counter[str] = Counter()
    events: Counter[str] = Counter()
    try:
        tail = LogTail(broker)
        kinds = cycle(args.faults)
        lengths = {"freeze": cycle(args.freeze), "starve": cycle(args.starve), "none": cycle([0])}
        producers = cycle(args.producer)
        for number in range(1, args.runs + 1):
            kind = next(kinds)
            if args.direct:
                ok, hits, seen = direct_run(
                    number, kind, next(lengths[kind]), next(producers), args, broker, tail
                )
            else:
                ok, hits, seen = one_run(
                    number, kind, next(lengths[kind]), next(producers), args, broker, work, tail
                )
            failed += not ok
            answered += hits
            faults[kind] += 1
            events += seen
    finally:
        broker.stop()
        if failed or args.keep_logs:
            print(f"kept: {work} (the broker's data and log in {work / 'kafka'})")
        else:
            shutil.rmtree(work, ignore_errors=True)
    what = "records reported delivered" if args.direct else "hits answered"
    print(
        f"{args.runs} runs ({dict(faults)}), {answered:,} {what}, {failed} with a check "
        f"failed; the broker logged {dict(events) or 'nothing notable'}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
