"""Helpers shared by the tests: config files, reading a topic, running the service."""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zlib
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import jsonschema
import pytest
import trio
from confluent_kafka import Consumer, KafkaException, TopicPartition

from brokers import Broker
from redirect_logger.cli import serve_service
from redirect_logger.config import parse_settings
from redirect_logger.ledger import OUTCOMES
from redirect_logger.service import Service

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``redirect-logger ARGS`` run to its end (at most 120 s) from the
    repository's root, with ``env`` added to the environment."""
    return subprocess.run(
        [sys.executable, "-m", "redirect_logger.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


def unique_topic(prefix: str = "hits") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, Mapping):  # an inline table ([[rules.routes]] entries, say)
        items = (f"{json.dumps(key)} = {_toml_value(item)}" for key, item in value.items())
        return "{ " + ", ".join(items) + " }"
    raise TypeError(f"no TOML for {value!r}")


def toml_text(config: Mapping[str, Any]) -> str:
    """TOML for our config shape: tables of scalars, and [[rules]] (whose
    nested tables are written inline)."""
    lines: list[str] = []
    for table, body in config.items():
        entries = body if isinstance(body, list) else [body]
        for entry in entries:
            lines.append(f"[[{table}]]" if isinstance(body, list) else f"[{table}]")
            lines.extend(
                f"{json.dumps(key)} = {_toml_value(value)}" for key, value in entry.items()
            )
            lines.append("")
    return "\n".join(lines)


def service_config(bootstrap: str, topic: str, **tables: Mapping[str, Any]) -> dict[str, Any]:
    """A complete config: two rules, 404 fallback, fast drain, a fresh spill
    directory; ``tables`` override per table."""
    config: dict[str, Any] = {
        "server": {"bind": ["127.0.0.1:0"], "graceful_timeout": 5.0},
        "rules": [
            {"name": "home", "path": "/", "target": "https://example.com/", "status": 302},
            {
                "name": "docs",
                "path": "/docs/*",
                "target": "https://docs.example.com/",
                "status": 301,
                "forward_path": True,
            },
        ],
        "fallback": {"status": 404},
        "records": {"topic": topic, "workers": 2, "batch_size": 200, "batch_linger": 0.01},
        "kafka": {"bootstrap.servers": bootstrap, "linger.ms": 5},
        "shutdown": {"flush_timeout": 10.0},
        "spill": {"directory": tempfile.mkdtemp(prefix="spill-")},
    }
    for table, body in tables.items():
        if isinstance(body, Mapping) and isinstance(config.get(table), dict):
            config[table] = {**config[table], **body}
        else:
            config[table] = body
    return config


UUID7 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
RFC3339_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")

RECORD_SCHEMA = json.loads((ROOT / "docs" / "record.schema.json").read_text())


def check_record_schema(record: dict[str, Any]) -> None:
    """Fails unless ``record`` satisfies docs/record.schema.json."""
    jsonschema.validate(record, RECORD_SCHEMA)


def ledger_counts(**counts: int) -> dict[str, int]:
    """A ledger snapshot at a clean exit: the given counts, every other outcome 0."""
    zero = dict.fromkeys(OUTCOMES, 0)
    return {**zero, **counts, "in_flight": 0}


UNREACHABLE = "127.0.0.1:9"  # discard port: nothing listens, connections are refused


def unreachable_config(**tables: Mapping[str, Any]) -> dict[str, Any]:
    """A config whose Kafka cannot be reached, with a 1 s drain; ``tables`` override."""
    return service_config(
        UNREACHABLE,
        unique_topic(),
        **{"shutdown": {"flush_timeout": 1.0}, **tables},
    )


def write_config(path: Path, config: Mapping[str, Any]) -> Path:
    path.write_text(toml_text(config))
    return path


class Read(NamedTuple):
    """One message read back from a topic."""

    record: dict[str, Any]  # the JSON value
    key: bytes | None
    timestamp_ms: int
    headers: list[tuple[str, bytes | None]]  # [] when the message has none


def read_topic(
    bootstrap: str, topic: str, timeout: float = 30.0, expected: int = 0
) -> list[dict[str, Any]]:
    """Every record in the topic (see ``read_messages``)."""
    return [read.record for read in read_messages(bootstrap, topic, timeout, expected)]


def read_messages(
    bootstrap: str, topic: str, timeout: float = 30.0, expected: int = 0
) -> list[Read]:
    """Every message in the topic, from the beginning to each partition's end.

    Reads until the partitions' end offsets stop moving and at least
    ``expected`` messages are in; fails after ``timeout`` s.
    """
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"test-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "log_level": 0,
        }
    )
    deadline = time.monotonic() + timeout
    try:
        partitions = _partitions(consumer, topic, deadline)
        consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
        messages: list[Read] = []
        positions = dict.fromkeys(partitions, 0)
        ends: dict[int, int] = {}
        while True:
            previous, ends = ends, _ends(consumer, topic, partitions, deadline)
            if previous == ends and len(messages) >= expected:
                return messages
            while any(positions[p] < ends[p] for p in partitions):
                if time.monotonic() > deadline:
                    raise AssertionError(f"read {len(messages)} records; the topic ends at {ends}")
                for message in consumer.consume(1000, 0.5):
                    if message.error():
                        raise AssertionError(str(message.error()))
                    positions[message.partition()] = message.offset() + 1
                    messages.append(
                        Read(
                            json.loads(message.value()),
                            message.key(),
                            message.timestamp()[1],
                            list(message.headers() or []),
                        )
                    )
            if time.monotonic() > deadline:
                raise AssertionError(f"read {len(messages)} of {expected} records; ends {ends}")
            time.sleep(0.2)
    finally:
        consumer.close()


_SERVICE_NOTABLE = re.compile(
    r"WARNING|ERROR|CRITICAL|fatal|rebuilt|purge|retr|sequence|producer id|replicas", re.I
)
# In a broker's log: anything about the topic, and these about any.
_BROKER_NOTABLE = re.compile(
    r"WARN|ERROR|FATAL|[Ff]enc|Truncat|OutOfOrder|UnknownProducer|Duplicate|InvalidProducerEpoch"
)


def broker_log_lines(broker: Broker, topic: str, tail: int = 60) -> list[str]:
    """From an Apache Kafka broker's log files (``log_files``), the lines
    that mention ``topic`` or are notable for any (warnings and errors,
    fencing, truncation, producer sequence and epoch errors): the last
    ``tail`` of each file, under its name; [] for a broker without them."""
    log_files = getattr(broker, "log_files", None)
    if log_files is None:
        return []
    lines: list[str] = []
    for path in log_files():
        text = path.read_text(errors="replace").splitlines()
        notable = [line for line in text if topic in line or _BROKER_NOTABLE.search(line)]
        lines.append(f"broker {path} ({len(text)} lines): {len(notable)} notable, the last {tail}:")
        lines += notable[-tail:]
    return lines


def explain_missing(
    broker: Broker, topic: str, wanted: set[str], service_output: str = "", tail: int = 60
) -> str:
    """Why ids answered (``wanted``) are not in ``topic``: each missing id and
    every topic on the broker it is in (or "nowhere"), each partition's end
    offset, the service's notable log lines and the broker's (the last
    ``tail`` of each). For a failing assertion's message."""
    lines: list[str] = []
    found: dict[str, list[str]] = {}
    consumer = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": "explain"})
    try:
        names = sorted(
            name for name in consumer.list_topics(timeout=10).topics if not name.startswith("__")
        )
    finally:
        consumer.close()
    lines.append(f"topics on the broker: {names}")
    for name in names:
        try:
            reads = read_messages(broker.bootstrap, name, timeout=20)
        except AssertionError as exc:
            lines.append(f"{name}: unreadable: {exc}")
            continue
        ids = Counter(str(read.record.get("id")) for read in reads)
        twice = sum(1 for count in ids.values() if count > 1)
        lines.append(f"{name}: {len(reads)} records, {len(ids)} ids, {twice} more than once")
        for record_id in ids:
            found.setdefault(record_id, []).append(name)
    missing = sorted(wanted - {i for i, where in found.items() if topic in where})
    lines.append(f"{len(missing)} answered ids missing from {topic}:")
    lines += [f"  {i}: in {found.get(i) or 'nowhere'}" for i in missing[:50]]
    consumer = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": "explain"})
    try:
        metadata = consumer.list_topics(topic, timeout=10).topics.get(topic)
        partitions = sorted(metadata.partitions) if metadata is not None else []
        marks = {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            for p in partitions
        }
        lines.append(f"{topic} (low, high) offsets: {marks}")
    except KafkaException as exc:
        lines.append(f"{topic} offsets: {exc}")
    finally:
        consumer.close()
    workdir = getattr(broker, "workdir", None)
    if isinstance(workdir, Path):
        times = sorted(_uuid7_ms(i) for i in missing if UUID7.match(i))
        lines += _batch_anomalies(workdir / "kafka-data", topic, times)
    notable = [line for line in service_output.splitlines() if _SERVICE_NOTABLE.search(line)]
    lines.append(f"service: {len(notable)} notable lines, the last {tail}:")
    lines += notable[-tail:]
    lines += broker_log_lines(broker, topic, tail)
    return "\n".join(lines)


def _uuid7_ms(record_id: str) -> int:
    """The Unix time in ms a UUIDv7 id was made (its first 48 bits)."""
    return int(record_id.replace("-", "")[:12], 16)


def _batch_anomalies(data: Path, topic: str, times: list[int]) -> list[str]:
    """From the broker's log segments of ``topic`` (record batch v2 headers):
    each partition's batches, producer ids and epochs, every batch whose
    sequence does not follow its producer's previous one, and the batches
    around each of ``times`` (ms; a missing id's creation)."""
    lines: list[str] = []
    for directory in sorted(data.glob(f"{topic}-*")):
        batches: list[tuple[int, int, int, int, int, int]] = []
        for segment in sorted(directory.glob("*.log")):
            raw, pos = segment.read_bytes(), 0
            while pos + 61 <= len(raw):
                base, length = struct.unpack_from(">qi", raw, pos)
                if length <= 0:
                    break
                first_ms, pid, epoch, seq, count = struct.unpack_from(">q8xqhii", raw, pos + 27)
                batches.append((base, count, pid, epoch, seq, first_ms))
                pos += 12 + length
        producers = sorted({(pid, epoch) for _, _, pid, epoch, _, _ in batches})
        lines.append(f"{directory.name}: {len(batches)} batches, (pid, epoch) {producers}")
        # Leader epochs and the offsets they start at: more than one means the
        # partition changed leaders (on one node: the broker was fenced).
        epochs = directory / "leader-epoch-checkpoint"
        if epochs.exists():
            lines.append(f"  leader-epoch-checkpoint: {epochs.read_text().split()}")
        following: dict[tuple[int, int], int] = {}
        for base, count, pid, epoch, seq, _ in batches:
            expected = following.get((pid, epoch))
            if expected is not None and seq != expected:
                lines.append(f"  offset {base}: pid {pid} epoch {epoch} seq {seq}, not {expected}")
            following[(pid, epoch)] = seq + count
        for when in times:
            near = [b for b in batches if abs(b[5] - when) < 200]
            lines.append(f"  batches (offset, count, pid, epoch, seq, ms) near {when}: {near[:8]}")
    return lines


def _partitions(consumer: Consumer, topic: str, deadline: float) -> list[int]:
    while True:
        metadata = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if metadata is not None and metadata.error is None and metadata.partitions:
            return sorted(metadata.partitions)
        if time.monotonic() > deadline:
            raise AssertionError(f"topic {topic} does not exist")
        time.sleep(0.2)


def _ends(consumer: Consumer, topic: str, partitions: list[int], deadline: float) -> dict[int, int]:
    """Each partition's end offset; retried while a just-(re)started broker
    has no leader for a partition yet."""
    while True:
        try:
            return {
                p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                for p in partitions
            }
        except KafkaException:  # e.g. NOT_LEADER_FOR_PARTITION right after a start
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def v1_frame(topic: str, key: bytes | None, value: bytes, timestamp_ms: int) -> bytes:
    """A journal frame in format 1, as the journal wrote it before messages had
    headers: ``length | crc32 | timestamp_ms | topic length | key length |
    topic | key | value``, big-endian, the CRC over what follows it."""
    body = struct.pack(">qHi", timestamp_ms, len(topic.encode()), -1 if key is None else len(key))
    body += topic.encode() + (key or b"") + value
    return struct.pack(">II", len(body), zlib.crc32(body)) + body


LEDGER_RE = re.compile(r"ledger (\{.*\})")
BIND_RE = re.compile(r"Running on (http://[0-9.]+:\d+)")


class ServiceProcess:
    """A service subprocess (either launch mode) with its stderr collected."""

    def __init__(
        self,
        command: list[str],
        env: Mapping[str, str] | None = None,
        *,
        max_file_bytes: int | None = None,
    ) -> None:
        """``max_file_bytes``: RLIMIT_FSIZE, the largest file the process may
        write (0: no file can be written to, as on a failing disk)."""

        def limit() -> None:
            if max_file_bytes is not None:
                resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))

        self.process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            cwd=ROOT,
            text=True,
            start_new_session=True,  # its own process group, as under a supervisor
            preexec_fn=limit,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @classmethod
    def cli(
        cls,
        config: Path,
        *args: str,
        env: Mapping[str, str] | None = None,
        max_file_bytes: int | None = None,
    ) -> ServiceProcess:
        command = [sys.executable, "-m", "redirect_logger.cli", "serve", "--config", str(config)]
        return cls([*command, *args], env=env, max_file_bytes=max_file_bytes)

    @classmethod
    def hypercorn(
        cls,
        config: Path,
        workers: int,
        binds: tuple[str, ...] = ("127.0.0.1:0",),
        options: tuple[str, ...] = (),
    ) -> ServiceProcess:
        """``hypercorn -k trio`` serving the app, with Hypercorn's ``options`` too."""
        command = [sys.executable, "-m", "hypercorn", "-k", "trio", "--workers", str(workers)]
        for bind in binds:
            command += ["-b", bind]
        command += ["--graceful-timeout", "5", *options, "redirect_logger.asgi:app"]
        return cls(command, env={"REDIRECT_LOGGER_CONFIG": str(config)})

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(
        self, pattern: re.Pattern[str], count: int = 1, timeout: float = 30.0
    ) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = pattern.findall(self.output)
            if len(found) >= count:
                return found
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"{pattern.pattern!r} x{count} not seen; output:\n{self.output}")

    def url(self, timeout: float = 30.0) -> str:
        return self.wait_for(BIND_RE, timeout=timeout)[0]

    def wait(self, timeout: float = 60.0) -> int:
        """The exit code, once the process has exited and all its output is read."""
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise AssertionError(f"no exit within {timeout} s; output:\n{self.output}") from None
        self._reader.join(timeout)  # EOF once every process holding the pipe has exited
        return code

    def terminate(self, timeout: float = 60.0) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> None:
        """SIGKILL the process and whatever it started (its process group):
        no worker of a failed test outlives it."""
        self.kill_group()

    def kill_leader(self) -> None:
        """SIGKILL the process alone (a supervisor or a master), not its children."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def kill_group(self) -> None:
        """SIGKILL the whole process group (Hypercorn's master and workers), as
        a container runtime or the OOM killer ends a service."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def workers(self) -> list[int]:
        """The pids of Hypercorn's worker processes: the master's children but
        multiprocessing's resource tracker."""
        found = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
                command = (stat.parent / "cmdline").read_bytes()
            except OSError:
                continue
            if int(fields[1]) == self.process.pid and b"resource_tracker" not in command:
                found.append(int(stat.parent.name))
        return sorted(found)

    def ledgers(self) -> list[dict[str, int]]:
        return [json.loads(found) for found in LEDGER_RE.findall(self.output)]


async def start_service(
    nursery: trio.Nursery, config: Mapping[str, Any], stop: trio.Event
) -> tuple[Service, list[int]]:
    """Run the CLI's lifecycle in ``nursery`` until ``stop``; its exit code lands in the list."""
    codes: list[int] = []

    async def run(*, task_status: trio.TaskStatus[Service] = trio.TASK_STATUS_IGNORED) -> None:
        settings = parse_settings(dict(config))
        codes.append(await serve_service(settings, stop=stop, task_status=task_status))

    service: Service = await nursery.start(run)
    return service, codes


SIGNAL_CLIENTS = 8


async def _load_docs(
    url: str, answered: dict[str, int], signalled: trio.Event, options: Mapping[str, Any]
) -> None:
    """Request in a loop on one keep-alive connection until the server is gone
    (``options``: httpx.AsyncClient's, e.g. ``verify`` and ``http2``)."""
    async with httpx.AsyncClient(base_url=url, timeout=10, **options) as client:
        n = 0
        while True:
            n += 1
            try:
                response = await client.get(f"/docs/p{n}?n={n}")
            except httpx.TransportError:
                if signalled.is_set():
                    return
                raise
            assert response.status_code == 301, response.text
            hit_id = response.headers["x-hit-id"]
            assert hit_id not in answered
            answered[hit_id] = response.status_code


async def sigterm_under_load(
    service: ServiceProcess,
    urls: list[str],
    signum: int = signal.SIGTERM,
    group: bool = False,
    clients: Sequence[Mapping[str, Any]] = ({},),
) -> tuple[int, dict[str, int]]:
    """Load from SIGNAL_CLIENTS keep-alive clients spread over ``urls`` (with
    httpx options taken in turn from ``clients``); after 2 s and 50 answers
    ``signum`` to the service (or its process group); the exit code and the
    answered ids, once it has exited (all within 90 s)."""
    answered: dict[str, int] = {}
    signalled = trio.Event()
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            for index in range(SIGNAL_CLIENTS):
                url, options = urls[index % len(urls)], clients[index % len(clients)]
                nursery.start_soon(_load_docs, url, answered, signalled, options)
            await trio.sleep(2.0)
            while len(answered) <= 50:  # noqa: ASYNC110 (a busy machine starts slower)
                await trio.sleep(0.1)
            signalled.set()
            if group:
                os.killpg(service.process.pid, signum)
            else:
                service.process.send_signal(signum)
            code = await trio.to_thread.run_sync(service.wait)
    return code, answered


def check_delivery(
    broker: Broker, topic: str, service: ServiceProcess, answered: dict[str, int], processes: int
) -> None:
    """Each of the ``processes`` ledger lines is clean, and the topic holds each
    delivered record once, every answered id among them."""
    ledgers = service.ledgers()
    assert len(ledgers) == processes, service.output
    for ledger in ledgers:
        assert ledger["failed"] == ledger["dropped"] == ledger["shed"] == ledger["in_flight"] == 0
        assert ledger["received"] == ledger["delivered"]  # one worker may get no connection
    delivered = sum(ledger["delivered"] for ledger in ledgers)
    assert delivered > 0
    records = read_topic(broker.bootstrap, topic, expected=delivered)
    ids = [record["id"] for record in records]
    counts = f"answered {len(answered)}, delivered {delivered}, in topic {len(ids)}"
    assert len(ids) == len(set(ids)), f"a hit was delivered twice: {counts}"
    assert not set(answered) - set(ids), f"answered hits missing: {counts}"
    assert len(ids) == delivered, counts


LOAD_CLIENTS = 12  # keep-alive clients of ``redirects``


async def redirects(
    urls: list[str],
    answered: dict[str, float],
    statuses: Counter[int] | None = None,
    seconds: float = 60.0,
    *,
    clients: int = LOAD_CLIENTS,
    sent: dict[str, float] | None = None,
    until: trio.Event | None = None,
) -> None:
    """``clients`` keep-alive clients request until the service is gone (or
    for ``seconds``, or until ``until`` is set); each answer's X-Hit-Id is
    kept with its latency (and, with ``sent``, the ``time.perf_counter()``
    its request was sent at). Only 301s are answers of a recorded hit; with
    ``statuses``, others are counted there instead of failing the test."""

    async def client(url: str) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            n = 0
            while trio.current_time() < end and not (until is not None and until.is_set()):
                n += 1
                started = time.perf_counter()
                try:
                    response = await http.get(f"/docs/p{n}")
                except httpx.TransportError:
                    return  # killed or stopped
                if statuses is not None:
                    statuses[response.status_code] += 1
                    if response.status_code != 301:
                        continue
                assert response.status_code == 301, response.text
                hit = response.headers["x-hit-id"]
                answered[hit] = time.perf_counter() - started
                if sent is not None:
                    sent[hit] = started

    end = trio.current_time() + seconds
    async with trio.open_nursery() as nursery:
        for index in range(clients):
            nursery.start_soon(client, urls[index % len(urls)])


async def wait_ready(url: str) -> None:
    """Until /readyz answers 200: a broker is known to be reachable (under
    "kafka", requests wait for acknowledgements only from then on)."""
    async with httpx.AsyncClient(base_url=url) as http:
        with trio.fail_after(30):
            while (await http.get("/readyz")).status_code != 200:  # noqa: ASYNC110
                await trio.sleep(0.1)


def latency_figures(latencies: list[float]) -> str:
    """p50, p99 and max of ``latencies`` (s), in ms."""
    ordered = sorted(latencies)
    p99 = ordered[int(len(ordered) * 0.99)]
    return (
        f"p50 {statistics.median(ordered) * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms,"
        f" max {ordered[-1] * 1000:.1f} ms"
    )


def report_ids(name: str, answered: dict[str, float], ids: list[str]) -> tuple[int, int]:
    """Prints and returns (answered ids missing from the topic, duplicates)."""
    missing = len(set(answered) - set(ids))
    duplicates = len(ids) - len(set(ids))
    print(
        f"{name}: answered {len(answered)} ({latency_figures(list(answered.values()))}),"
        f" in topic {len(ids)} ({len(set(ids))} distinct), missing {missing},"
        f" duplicates {duplicates}"
    )
    return missing, duplicates


def topic_ids(bootstrap: str, topic: str, wanted: set[str], timeout: float = 120.0) -> list[str]:
    """The record ids in the topic, once it holds every id of ``wanted`` (or at the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        ids = [record["id"] for record in read_topic(bootstrap, topic, timeout=60)]
        if wanted <= set(ids) or time.monotonic() > deadline:
            return ids
        time.sleep(1.0)


def until_replayed(spill: Path, timeout: float = 60.0) -> None:
    """Until no journal segment is left under ``spill`` (or the timeout)."""
    deadline = time.monotonic() + timeout
    while list(spill.glob("slot-*/segment-*.log")) and time.monotonic() < deadline:
        time.sleep(0.2)


def write_country_db(path: Path, countries: Mapping[str, str]) -> Path:
    """A MaxMind DB (IPv6, IPv4 mapped in, as GeoLite2's) at ``path`` that
    gives each network (CIDR) its country: ``{"country": {"iso_code": ...}}``,
    the shape of GeoLite2-Country's records. Written with mmdb-writer."""
    from mmdb_writer import MMDBWriter
    from netaddr import IPSet

    writer = MMDBWriter(6, "GeoLite2-Country", ipv4_compatible=True, description="test")
    for network, country in countries.items():
        writer.insert_network(IPSet([network]), {"country": {"iso_code": country}})
    writer.to_db_file(str(path))
    return path


async def until_loaded(
    loaded: Callable[[], int], at_least: int = 50, patience: float = 30.0
) -> None:
    """Wait until ``loaded()`` (answers so far) passes ``at_least``, for at
    most ``patience`` s, then assert it did: on a loaded machine the load may
    take longer to reach the service than a test's fixed pause."""
    for _ in range(int(patience / 0.05)):
        if loaded() > at_least:
            break
        await trio.sleep(0.05)
    assert loaded() > at_least, "no load reached the service"


# User-Agents of three OS families, as uap-core names them (routes' os)
IPHONE = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 Mobile"
ANDROID = "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 Chrome/120 Mobile Safari"
WINDOWS = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 Chrome/120 Safari/537.36"


async def never_read_until_reset(stalled: trio.abc.Stream) -> None:
    """Ask for large answers (a long forwarded path) and read none, until the
    socket buffers are full and sending blocks; then the service must reset
    the connection (``server.send_timeout`` of at most 2 s, and the kernel's
    probes), not close it as idle."""
    big = b"GET /docs/" + b"%FF" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    blocked = False
    while not blocked:
        with trio.move_on_after(0.5) as sending:
            await stalled.send_all(big)
        blocked = sending.cancelled_caught
    await trio.sleep(4)
    with pytest.raises(trio.BrokenResourceError):
        while await stalled.receive_some(1 << 20):
            pass
