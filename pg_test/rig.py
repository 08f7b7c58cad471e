"""The end-to-end rig: a real PostgreSQL cluster with outbox preloaded and
real Apache Kafka on 127.0.0.1 (a single KRaft node, or three brokers and a
controller for the replication faults), started and stopped by this module.
Used by the pytest suite (conftest.py), the demo and the benchmarks.

Postgres refuses to run as root, so the cluster runs as the `postgres` OS
user through sudo; its files live under pg_test/.run/.

Fault helpers for the relay's tests: stop/start the broker (it keeps its data
across restarts), kill -9 a broker of the cluster, stop the server with
`-m immediate`, kill a backend by pid, and a consumer that reads a topic back.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import psycopg

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RUN = Path(os.environ.get("OUTBOX_RUN_DIR", HERE / ".run"))
# OUTBOX_PG=15|16|17|18 picks the server (default: the newest). 15 is
# Debian's package; 16-18 are the PyPI builds setup.sh unpacks.
SUPPORTED_MAJORS = ("15", "16", "17", "18")
PG_MAJOR = os.environ.get("OUTBOX_PG", SUPPORTED_MAJORS[-1])
if PG_MAJOR not in SUPPORTED_MAJORS:
    raise SystemExit(f"OUTBOX_PG={PG_MAJOR}: supported majors are {', '.join(SUPPORTED_MAJORS)}")
PG_BIN = Path("/usr/lib/postgresql/15/bin") if PG_MAJOR == "15" else HERE / ".pg" / PG_MAJOR / "bin"
PG_CONFIG = PG_BIN / "pg_config"
# The PyPI builds' loadable modules keep their build-time RUNPATH
# (/opt/postgresql/lib): without this, the walreceiver of a standby loads
# Debian's older libpq, which refuses the options 17+'s pg_basebackup -R
# writes (sslnegotiation).
PG_ENV = [] if PG_MAJOR == "15" else ["env", f"LD_LIBRARY_PATH={PG_BIN.parent / 'lib'}"]
# Below the ephemeral port range (32768-60999 on Linux): a port in it can be
# taken by any outgoing connection, and a second cluster then cannot bind.
PG_PORT = int(os.environ.get("OUTBOX_PG_PORT", "25432"))
KAFKA_PORT = int(os.environ.get("OUTBOX_KAFKA_PORT", "19092"))
AMQP_PORT = int(os.environ.get("OUTBOX_AMQP_PORT", "15672"))
BOOTSTRAP = f"127.0.0.1:{KAFKA_PORT}"
DATABASE = "outbox_test"


def log(msg: str) -> None:
    print(f"[rig] {msg}", flush=True)


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, **kw)


def as_postgres(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return run(["sudo", "-u", "postgres", "--", *cmd], **kw)


def wait_for(what: str, cond, timeout: float = 30.0, interval: float = 0.05):
    """Polls cond() until it returns a truthy value; fails with `what` after timeout."""
    deadline = time.monotonic() + timeout
    last_exc = None
    while time.monotonic() < deadline:
        try:
            v = cond()
            if v:
                return v
        except Exception as e:  # noqa: BLE001 - reported if we time out
            last_exc = e
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}" + (f" (last error: {last_exc})" if last_exc else ""))


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


# ---------------------------------------------------------------- extension


def install_extension(release: bool = False) -> None:
    """Builds and installs the extension into the chosen server (cargo-pgrx
    turns on the feature of pg_config's major)."""
    cmd = ["cargo", "pgrx", "install", "--pg-config", str(PG_CONFIG)]
    if release:
        cmd.append("--release")
    log(f"cargo pgrx install for PostgreSQL {PG_MAJOR}" + (" --release" if release else ""))
    run(cmd, cwd=REPO, stdout=subprocess.DEVNULL)


def install_released_scripts() -> None:
    """The released 0.1.0 install script, so that a test can install 0.1.0
    and update it (cargo pgrx installs only the current version's script
    and the update scripts under sql/)."""
    shutil.copy(HERE / "fixtures" / "outbox--0.1.0.sql", Path(sharedir()) / "extension" / "outbox--0.1.0.sql")


def sharedir() -> str:
    return subprocess.run([str(PG_CONFIG), "--sharedir"], capture_output=True, text=True, check=True).stdout.strip()


def server_has_output_plugin_libraries() -> bool:
    """Since 15.19 (CVE-2026-6471) output plugins must be listed in
    output_plugin_libraries; older servers refuse that unknown setting."""
    return "output_plugin_libraries" in Path(sharedir(), "postgresql.conf.sample").read_text()


# ---------------------------------------------------------------- postgres


class Postgres:
    def __init__(self, run_dir: Path = RUN, port: int = PG_PORT):
        self.dir = run_dir / "pg"
        self.data = self.dir / "data"
        self.sock = self.dir / "sock"
        self.logfile = self.dir / "postgres.log"
        self.port = port

    def dsn(self, dbname: str = DATABASE, user: str = "postgres") -> str:
        return f"host=127.0.0.1 port={self.port} dbname={dbname} user={user}"

    def connect(self, dbname: str = DATABASE, user: str = "postgres", autocommit: bool = True) -> psycopg.Connection:
        return psycopg.connect(self.dsn(dbname, user), autocommit=autocommit)

    def pg_ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = ["sudo", "-u", "postgres", "--", *PG_ENV, str(PG_BIN / "pg_ctl"), "-D", str(self.data), *args]
        return subprocess.run(cmd, check=check, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def init(self, settings: dict[str, str] | None = None) -> None:
        """A fresh cluster configured for outbox, plus extra settings."""
        self.stop(mode="immediate", check=False)
        if self.dir.exists():
            shutil.rmtree(self.dir)
        self.sock.mkdir(parents=True)
        run(["chown", "-R", "postgres:postgres", str(self.dir)])
        as_postgres([str(PG_BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8",
                     "--locale=C.UTF-8"], stdout=subprocess.DEVNULL)
        conf = {
            "port": str(self.port),
            "listen_addresses": "'127.0.0.1'",
            "unix_socket_directories": f"'{self.sock}'",
            "shared_preload_libraries": "'outbox'",
            "wal_level": "logical",
            "max_replication_slots": "10",
            "max_wal_senders": "10",
            "max_prepared_transactions": "10",
            "fsync": "on",
            "track_commit_timestamp": "on",
            "logging_collector": "off",
            "log_min_messages": "warning",
            "outbox.database": f"'{DATABASE}'",
            "outbox.kafka_bootstrap_servers": f"'{BOOTSTRAP}'",
            "outbox.topic_partitions": "3",
            # Small, so large transactions exercise the reorder buffer's
            # spill to disk, and the worker's memory bound is visible.
            "logical_decoding_work_mem": "'8MB'",
        }
        if server_has_output_plugin_libraries():
            conf["output_plugin_libraries"] = "'pgoutput, test_decoding, outbox'"
        conf.update(settings or {})
        with open(self.data / "postgresql.conf", "a") as f:
            f.write("\n# outbox test rig\n")
            for k, v in conf.items():
                f.write(f"{k} = {v}\n")

    def init_standby_of(self, primary: "Postgres", slot: str | None = None,
                        settings: dict[str, str] | None = None) -> None:
        """A fresh streaming standby of `primary` (pg_basebackup -R), on the
        physical `slot` if given, with extra settings; not started. The
        connection string carries a dbname: pg_basebackup -R writes it into
        primary_conninfo (17+), which slot synchronisation needs."""
        if self.dir.exists():
            shutil.rmtree(self.dir)
        self.sock.mkdir(parents=True)
        run(["chown", "-R", "postgres:postgres", str(self.dir)])
        as_postgres([str(PG_BIN / "pg_basebackup"), "-D", str(self.data), "-R", "-X", "stream", "-c", "fast",
                     *(["-S", slot] if slot else []),
                     "-d", f"host=127.0.0.1 port={primary.port} user=postgres dbname={DATABASE}"],
                    stdout=subprocess.DEVNULL)
        conf = {"port": str(self.port), "unix_socket_directories": f"'{self.sock}'", **(settings or {})}
        with open(self.data / "postgresql.conf", "a") as f:
            f.write("".join(f"{k} = {v}\n" for k, v in conf.items()))

    def start(self) -> None:
        r = self.pg_ctl("start", "-w", "-t", "60", "-l", str(self.logfile), check=False)
        if r.returncode != 0:
            raise RuntimeError(f"postgres did not start: {r.stderr}\n--- log tail ---\n{self.log_tail()}")

    def stop(self, mode: str = "fast", check: bool = True) -> None:
        if not (self.data / "postmaster.pid").exists():
            return
        self.pg_ctl("stop", "-w", "-m", mode, check=check)

    def crash(self) -> None:
        """Like a power loss for the server: immediate shutdown, no checkpoint."""
        self.stop(mode="immediate")

    def restart(self) -> None:
        self.stop()
        self.start()

    def reload(self) -> None:
        self.pg_ctl("reload")

    def kill_backend(self, pid: int, sig: int = signal.SIGKILL, wait: bool = True) -> None:
        """Kills one server process. After SIGKILL the postmaster resets the
        whole cluster, as after any backend crash: with wait, returns once
        that reset is over and connections are accepted again."""
        before = self.log_text().count("all server processes terminated; reinitializing")
        os.kill(pid, sig)
        if sig == signal.SIGKILL and wait:
            wait_for("the postmaster to reset after the crash",
                     lambda: self.log_text().count("all server processes terminated; reinitializing") > before, timeout=60)
            wait_for("the server to accept connections again", lambda: self.connect("postgres").close() or True, timeout=60)

    def postmaster_pid(self) -> int:
        return int((self.data / "postmaster.pid").read_text().split()[0])

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return "(no log)"

    def log_text(self) -> str:
        return self.logfile.read_text(errors="replace") if self.logfile.exists() else ""

    def create_database(self, name: str = DATABASE) -> None:
        with self.connect("postgres") as c:
            if not c.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
                c.execute(f'CREATE DATABASE "{name}"')


# ---------------------------------------------------------------- broker


class BrokerClient:
    """What the tests do with a broker through a Kafka client (PyPI's
    confluent-kafka): create topics, produce, count and consume."""

    port: int

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def create_topic(self, name: str, partitions: int = 3, config: dict[str, str] | None = None,
                     replication_factor: int = 1) -> None:
        from confluent_kafka.admin import AdminClient, NewTopic

        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        new = NewTopic(name, num_partitions=partitions, replication_factor=replication_factor, config=config or {})
        fut = admin.create_topics([new])[name]
        try:
            fut.result(15)
        except Exception as e:  # noqa: BLE001
            if "TOPIC_ALREADY_EXISTS" not in str(e):
                raise

    def alter_topic(self, name: str, config: dict[str, str]) -> None:
        from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource

        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        entries = [ConfigEntry(k, v, incremental_operation=AlterConfigOpType.SET) for k, v in config.items()]
        res = ConfigResource(ConfigResource.Type.TOPIC, name, incremental_configs=entries)
        for fut in admin.incremental_alter_configs([res]).values():
            fut.result(15)

    proc: subprocess.Popen | None

    def _terminate(self, grace: float) -> None:
        """SIGTERM the broker's process, SIGKILL after `grace` seconds."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def topics(self) -> set[str]:
        from confluent_kafka.admin import AdminClient

        return set(AdminClient({"bootstrap.servers": self.bootstrap}).list_topics(timeout=10).topics)

    def produce(self, topic: str, messages: list[tuple[bytes | None, bytes]], headers=None) -> None:
        from confluent_kafka import Producer

        p = Producer({"bootstrap.servers": self.bootstrap, "enable.idempotence": True, "acks": "all",
                      "partitioner": "murmur2_random"})
        errors = []
        for k, v in messages:
            p.produce(topic, key=k, value=v, headers=headers,
                      on_delivery=lambda err, msg: errors.append(err) if err else None)
        remaining = p.flush(30)
        if remaining or errors:
            raise RuntimeError(f"produce to {topic} failed: {remaining} undelivered, errors {errors}")

    def topic_counts(self, topic: str) -> int:
        """Records in a topic: the sum over partitions of high - low watermark."""
        from confluent_kafka import Consumer, TopicPartition

        c = Consumer({"bootstrap.servers": self.bootstrap, "group.id": f"rig-{uuid.uuid4()}"})
        try:
            md = c.list_topics(topic, timeout=10)
            total = 0
            for p in md.topics[topic].partitions:
                lo, hi = c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
                total += hi - lo
            return total
        finally:
            c.close()

    def consume(self, topic: str, expect: int, timeout: float = 30.0, linger: float = 0.0) -> list[dict]:
        """Reads a topic from the beginning until `expect` messages arrived
        and every partition was read up to the end it had at that moment (or
        the timeout passed), then `linger` seconds more to catch extras
        (duplicates), and returns them in arrival order, each as a dict with
        key, value, headers, partition, offset, timestamp.
        Counting alone is not enough: with duplicates, `expect` records can
        arrive before a slower partition's last one has."""
        from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

        c = Consumer({
            "bootstrap.servers": self.bootstrap,
            "group.id": f"rig-{uuid.uuid4()}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        })
        out: list[dict] = []
        ends: dict[int, tuple[int, int]] | None = None  # partition -> watermarks once `expect` arrived
        read_to: dict[int, int] = {}  # partition -> next offset to read
        deadline = time.monotonic() + timeout
        try:
            # Every partition assigned from its beginning, no consumer group:
            # a group's first join on a fresh broker waits for the offsets
            # topic to be made (seen: a first test's second topic read
            # nothing within 30 s).
            while True:
                md = c.list_topics(topic, timeout=5).topics.get(topic)
                if md is not None and md.error is None and md.partitions:
                    break
                if time.monotonic() >= deadline:
                    return out
                time.sleep(0.2)
            c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in md.partitions])
            while time.monotonic() < deadline:
                if len(out) >= expect:
                    if ends is None:
                        parts = c.list_topics(topic, timeout=10).topics[topic].partitions
                        ends = {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10) for p in parts}
                    if all(read_to.get(p, lo) >= hi for p, (lo, hi) in ends.items()):
                        deadline = min(deadline, time.monotonic() + linger)
                        if linger <= 0:
                            break
                m = c.poll(0.2)
                if m is None:
                    continue
                if m.error():
                    if m.error().code() in (KafkaError._PARTITION_EOF, KafkaError.UNKNOWN_TOPIC_OR_PART):
                        continue
                    raise RuntimeError(f"consume {topic}: {m.error()}")
                read_to[m.partition()] = max(read_to.get(m.partition(), 0), m.offset() + 1)
                out.append({
                    "key": m.key(), "value": m.value(),
                    "headers": {k: (v.decode() if v is not None else None) for k, v in (m.headers() or [])},
                    "partition": m.partition(), "offset": m.offset(), "timestamp": m.timestamp()[1],
                })
        finally:
            c.close()
        return out


KAFKA_LIBS = HERE / ".kafka" / "libs"


def jar_version(libs: Path, artifact: str) -> str:
    """The version setup.sh installed, from the jar's name."""
    jars = sorted(libs.glob(f"{artifact}-*.jar"))
    return jars[0].name[len(artifact) + 1:-len(".jar")] if jars else "(not installed)"


class KafkaBroker(BrokerClient):
    """Apache Kafka (the release pg_test/kafka/pom.xml pins), a KRaft node on
    127.0.0.1 started from the jars setup.sh copied out of Maven Central,
    with its heap bounded for a 2-core machine. Alone it acts as broker and
    controller (the suite's broker: `port` for clients, `port + 1` for the
    controller); in a KafkaCluster it is a broker, or the controller.
    Its data survives its own stop and start (the fault tests need that).
    Topics are auto-created on metadata requests (the broker default), so a
    client that asks for metadata with auto-creation allowed would create
    them: the relay must not."""

    CLUSTER_ID = "b3V0Ym94LXRlc3QtY2x1c3Q"

    def __init__(self, run_dir: Path = RUN, port: int = KAFKA_PORT, node_id: int = 1,
                 roles: str = "broker,controller", voters: str | None = None,
                 extra: dict[str, str] | None = None, heap: str = "512m"):
        self.dir = run_dir / f"apache-kafka-{port}"
        self.port = port
        self.node_id = node_id
        self.roles = roles
        self.voters = voters or f"{node_id}@127.0.0.1:{port + 1}"
        self.extra = extra or {}
        self.heap = heap
        self.proc: subprocess.Popen | None = None
        self.logfile = self.dir / "kafka.log"

    def _java(self, *args: str) -> list[str]:
        return ["java", "-Xms128m", f"-Xmx{self.heap}", "-XX:+UseSerialGC",
                "-Dorg.slf4j.simpleLogger.defaultLogLevel=warn", "-cp", f"{KAFKA_LIBS}/*", *args]

    def _props(self) -> dict[str, str]:
        props = {
            "process.roles": self.roles,
            "node.id": str(self.node_id),
            "controller.quorum.voters": self.voters,
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(self.dir / "data"),
        }
        if self.roles == "controller":
            props["listeners"] = f"CONTROLLER://127.0.0.1:{self.port}"
            props.update(self.extra)
            return props
        listeners = [f"PLAINTEXT://127.0.0.1:{self.port}"]
        if "controller" in self.roles:
            listeners.append(f"CONTROLLER://127.0.0.1:{self.port + 1}")
        props.update({
            "listeners": ",".join(listeners),
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port}",
            "inter.broker.listener.name": "PLAINTEXT",
            "num.partitions": "1",
            "default.replication.factor": "1",
            "offsets.topic.replication.factor": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            "auto.create.topics.enable": "true",
        })
        props.update(self.extra)
        return props

    def reset(self) -> None:
        self.stop()
        if self.dir.exists():
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True)
        (self.dir / "server.properties").write_text("".join(f"{k}={v}\n" for k, v in self._props().items()))
        run(self._java("kafka.tools.StorageTool", "format", "-t", self.CLUSTER_ID, "-c", str(self.dir / "server.properties")),
            stdout=subprocess.DEVNULL)

    def launch(self) -> None:
        """Starts the JVM and returns at once (a cluster starts its nodes together)."""
        if self.proc and self.proc.poll() is None:
            return
        with open(self.logfile, "ab") as logf:
            self.proc = subprocess.Popen(self._java("kafka.Kafka", str(self.dir / "server.properties")),
                                         cwd=self.dir, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_serving(self) -> None:
        wait_for(f"Apache Kafka on port {self.port}", lambda: port_open(self.port) or self.proc.poll() is not None, timeout=90)
        if self.proc.poll() is not None:
            raise RuntimeError(f"Kafka exited with {self.proc.returncode}; see {self.logfile}")
        if self.roles != "controller":
            wait_for("Kafka to serve metadata", lambda: self.topics() is not None, timeout=60)

    def start(self) -> None:
        self.launch()
        self.wait_serving()

    def stop(self) -> None:
        self._terminate(grace=30)
        wait_for(f"port {self.port} to close", lambda: not port_open(self.port), timeout=30)

    def kill(self) -> None:
        """kill -9: no controlled shutdown, no leadership handed over."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


class KafkaCluster(BrokerClient):
    """Three Apache Kafka brokers (node ids 1-3 on ports base+1..base+3) and
    one KRaft controller (node 100, port base) on 127.0.0.1. The controller
    stands apart so that killing two brokers leaves the metadata quorum up:
    the last broker then shrinks its in-sync replicas and answers
    NOT_ENOUGH_REPLICAS, as in a production cluster with dedicated
    controllers, instead of losing its controller."""

    def __init__(self, run_dir: Path, base_port: int):
        voters = f"100@127.0.0.1:{base_port}"
        # The controller fences a killed broker after 3 s without a heartbeat
        # (default 9 s) and creates topics with RF 3 and min.insync 2.
        self.controller = KafkaBroker(run_dir, base_port, node_id=100, roles="controller", voters=voters, heap="256m",
                                      extra={"broker.session.timeout.ms": "3000", "default.replication.factor": "3",
                                             "min.insync.replicas": "2"})
        extra = {"broker.heartbeat.interval.ms": "500", "replica.lag.time.max.ms": "5000",
                 "offsets.topic.replication.factor": "3", "min.insync.replicas": "2"}
        self.brokers = [KafkaBroker(run_dir, base_port + i, node_id=i, roles="broker", voters=voters,
                                    extra=extra, heap="384m") for i in (1, 2, 3)]
        self.port = self.brokers[0].port
        self.proc = None

    @property
    def bootstrap(self) -> str:
        return ",".join(b.bootstrap for b in self.brokers)

    def reset(self) -> None:
        self.stop()
        for node in (self.controller, *self.brokers):
            node.reset()

    def start(self) -> None:
        self.controller.start()
        for b in self.brokers:
            b.launch()
        for b in self.brokers:
            b.wait_serving()
        wait_for("three registered brokers", lambda: len(self._admin().list_topics(timeout=10).brokers) == 3, timeout=60)

    def stop(self) -> None:
        for node in (*self.brokers, self.controller):
            node.stop()

    def _admin(self):
        from confluent_kafka.admin import AdminClient

        # Quiet: a killed broker is expected to refuse connections.
        return AdminClient({"bootstrap.servers": self.bootstrap, "log_level": 0})

    def broker(self, node_id: int) -> KafkaBroker:
        return self.brokers[node_id - 1]

    def partitions(self, topic: str) -> dict[int, tuple[int, list[int]]]:
        """partition -> (leader's node id or -1, in-sync replicas)."""
        md = self._admin().list_topics(topic, timeout=10)
        return {p: (pm.leader, sorted(pm.isrs)) for p, pm in md.topics[topic].partitions.items()}


DEBEZIUM_LIBS = HERE / ".debezium" / "libs"
CONNECT_REST_PORT = int(os.environ.get("OUTBOX_CONNECT_PORT", "18083"))


class DebeziumConnect:
    """Debezium's PostgreSQL connector (pgoutput, its own slot and
    publication) with the Outbox Event Router, in Kafka Connect's standalone
    worker, from the jars setup.sh copied out of Maven Central
    (pg_test/debezium/pom.xml). It reads `table` on `pg` and publishes to
    `broker`. `converters` is the worker's key and value converter:
    "json" as in the guides our users follow (JsonConverter, schemas off),
    or "string" (StringConverter). `router`, `connector` and `worker` add or
    override properties. The JVM gets connect-standalone.sh's own heap and GC
    options, as a user running the script would."""

    CONVERTERS = {
        "json": {"key.converter": "org.apache.kafka.connect.json.JsonConverter", "key.converter.schemas.enable": "false",
                 "value.converter": "org.apache.kafka.connect.json.JsonConverter", "value.converter.schemas.enable": "false"},
        "string": {"key.converter": "org.apache.kafka.connect.storage.StringConverter",
                   "value.converter": "org.apache.kafka.connect.storage.StringConverter"},
    }

    def __init__(self, pg: "Postgres", broker: BrokerClient, run_dir: Path = RUN, table: str = "outbox.outbox",
                 converters: str = "json", router: dict[str, str] | None = None,
                 connector: dict[str, str] | None = None, worker: dict[str, str] | None = None,
                 slot: str = "debezium"):
        self.pg, self.broker = pg, broker
        self.dir = run_dir / "debezium"
        self.logfile = self.dir / "connect.log"
        self.slot = slot
        self.worker = {
            "bootstrap.servers": broker.bootstrap,
            "offset.storage.file.filename": str(self.dir / "offsets"),
            "offset.flush.interval.ms": "1000",
            "listeners": f"http://127.0.0.1:{CONNECT_REST_PORT}",
            **self.CONVERTERS[converters],
            **(worker or {}),
        }
        self.connector = {
            "name": "outbox-connector",
            "connector.class": "io.debezium.connector.postgresql.PostgresConnector",
            "tasks.max": "1",
            "database.hostname": "127.0.0.1",
            "database.port": str(pg.port),
            "database.user": "postgres",
            "database.password": "unused",
            "database.dbname": DATABASE,
            "topic.prefix": "dbz",
            "plugin.name": "pgoutput",
            "slot.name": slot,
            "publication.name": f"{slot}_publication",
            "publication.autocreate.mode": "filtered",
            "table.include.list": table,
            "snapshot.mode": "no_data",
            "transforms": "outbox",
            "transforms.outbox.type": "io.debezium.transforms.outbox.EventRouter",
            **{f"transforms.outbox.{k}": v for k, v in (router or {}).items()},
            **(connector or {}),
        }
        self.proc: subprocess.Popen | None = None

    def launch(self) -> None:
        """Starts the worker and returns at once."""
        esc = lambda v: v.replace("\\", "\\\\")  # noqa: E731
        if self.dir.exists():
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True)
        for name, props in (("worker", self.worker), ("connector", self.connector)):
            # As .properties: a backslash is written as two.
            (self.dir / f"{name}.properties").write_text("".join(f"{k}={esc(v)}\n" for k, v in props.items()))
        cmd = ["java", "-Xms256M", "-Xmx2G", "-server", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20",
               "-XX:InitiatingHeapOccupancyPercent=35", "-XX:+ExplicitGCInvokesConcurrent", "-Djava.awt.headless=true",
               "-Dorg.slf4j.simpleLogger.defaultLogLevel=warn", "-cp", f"{DEBEZIUM_LIBS}/*",
               "org.apache.kafka.connect.cli.ConnectStandalone",
               str(self.dir / "worker.properties"), str(self.dir / "connector.properties")]
        with open(self.logfile, "ab") as logf:
            self.proc = subprocess.Popen(cmd, cwd=self.dir, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)

    def start(self) -> None:
        """Starts the worker and returns once the connector streams (its slot
        is active): an insert from now on is published."""
        self.launch()
        wait_for("Debezium's slot to be active", lambda: self._died() or self._slot_active(), timeout=120, interval=0.2)
        if self._died():
            raise RuntimeError(f"Kafka Connect exited with {self.proc.returncode}; see {self.logfile}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def walsender_pid(self) -> int | None:
        """The server process decoding for Debezium (pgoutput runs there)."""
        with self.pg.connect() as c:
            row = c.execute("SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", (self.slot,)).fetchone()
            return row[0] if row else None

    def _died(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def _slot_active(self) -> bool:
        with self.pg.connect() as c:
            row = c.execute("SELECT active FROM pg_replication_slots WHERE slot_name = %s", (self.slot,)).fetchone()
            return bool(row and row[0])

    def stop(self, drop_slot: bool = True) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if drop_slot:
            with self.pg.connect() as c:
                wait_for("Debezium's slot to be released", lambda: not c.execute(
                    "SELECT active FROM pg_replication_slots WHERE slot_name = %s", (self.slot,)).fetchone()[0], timeout=30)
                c.execute("SELECT pg_drop_replication_slot(%s)", (self.slot,))
                c.execute(f'DROP PUBLICATION IF EXISTS "{self.slot}_publication"')


class RabbitMQ:
    """Debian's RabbitMQ server (setup.sh installs rabbitmq-server), a node
    of the rig's own: its files under .run/rabbitmq-<port>, its own Erlang
    cookie, epmd and distribution ports, one scheduler thread. The Debian
    wrappers in /usr/sbin insist on the rabbitmq user, so the scripts under
    /usr/lib/rabbitmq/bin are called. `guest` may connect (from localhost);
    `add_user` makes others."""

    BIN = Path("/usr/lib/rabbitmq/bin")
    MAX_MESSAGE = 1_048_576

    def __init__(self, run_dir: Path = RUN, port: int = AMQP_PORT):
        self.port = port
        self.dir = run_dir / f"rabbitmq-{port}"
        self.node = f"outbox{port}@localhost"
        self.proc: subprocess.Popen | None = None
        self.logfile = self.dir / "rabbitmq.log"

    def url(self, user: str = "guest", password: str = "guest") -> str:
        return f"amqp://{user}:{password}@127.0.0.1:{self.port}/%2f"

    def _env(self) -> dict[str, str]:
        d = self.dir
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "RABBITMQ_ALLOW_INPUT")}
        env.update({
            "HOME": str(d / "home"),
            "RABBITMQ_CONF_ENV_FILE": str(d / "absent.env"),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.port + 1),
            "ERL_EPMD_PORT": str(self.port + 2),
            "RABBITMQ_CTL_DIST_PORT_MIN": str(self.port + 10),
            "RABBITMQ_CTL_DIST_PORT_MAX": str(self.port + 19),
            "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
            "RABBITMQ_LOG_BASE": str(d / "log"),
            "RABBITMQ_LOGS": "-",
            "RABBITMQ_PID_FILE": str(d / "rabbit.pid"),
            "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(d / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "+S 1:1 +SDcpu 1:1 +SDio 1",
            "RABBITMQ_MAX_NUMBER_OF_PROCESSES": "65536",
            "ERL_MAX_PORTS": "4096",
        })
        return env

    def ctl(self, *args: str, check: bool = True, timeout: float = 90) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.BIN / "rabbitmqctl"), "-n", self.node, *args], env=self._env(),
                              capture_output=True, text=True, check=check, timeout=timeout)

    def reset(self) -> None:
        self.stop()
        if self.dir.exists():
            shutil.rmtree(self.dir)
        for sub in ("home", "mnesia", "log"):
            (self.dir / sub).mkdir(parents=True)
        (self.dir / "enabled_plugins").write_text("[].\n")
        (self.dir / "rabbitmq.conf").write_text(
            "disk_free_limit.absolute = 50MB\n"
            # Small, so a message above it (a channel error caused by one
            # event) is cheap to provoke.
            f"max_message_size = {self.MAX_MESSAGE}\n"
            "vm_memory_high_watermark.absolute = 512MB\n"
            "log.console = true\nlog.console.level = warning\nlog.file = false\n")

    def start(self) -> None:
        if self.proc and self.proc.poll() is None:
            return
        with open(self.logfile, "ab") as logf:
            self.proc = subprocess.Popen([str(self.BIN / "rabbitmq-server")], env=self._env(), cwd=self.dir,
                                         stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        r = self.ctl("wait", str(self.dir / "rabbit.pid"), "--timeout", "90", check=False, timeout=120)
        if r.returncode != 0 or not port_open(self.port):
            raise RuntimeError(f"RabbitMQ did not start: {r.stdout}{r.stderr}; see {self.logfile}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.ctl("shutdown", check=False)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None
        # erl leaves an epmd of its own behind.
        subprocess.run(["epmd", "-port", str(self.port + 2), "-kill"], capture_output=True, env=self._env())
        wait_for(f"port {self.port} to close", lambda: not port_open(self.port), timeout=30)

    def kill(self) -> None:
        """kill -9 of the whole node (the Erlang VM and its shell)."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def version(self) -> str:
        r = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "rabbitmq-server"], capture_output=True, text=True)
        return r.stdout.strip() or "?"

    def add_user(self, user: str, password: str) -> None:
        self.ctl("add_user", user, password)
        self.ctl("set_permissions", "-p", "/", user, ".*", ".*", ".*")

    def channel(self):
        import pika
        conn = pika.BlockingConnection(pika.URLParameters(self.url()))
        return conn, conn.channel()

    def bind_queue(self, exchange: str, routing_key: str = "#") -> str:
        """A durable queue of its own bound to `exchange` (declared as the
        relay declares it); returns its name."""
        conn, ch = self.channel()
        try:
            ch.exchange_declare(exchange, exchange_type="topic", durable=True)
            q = f"q.{uuid.uuid4().hex[:12]}"
            ch.queue_declare(q, durable=True)
            ch.queue_bind(q, exchange, routing_key=routing_key)
            return q
        finally:
            conn.close()

    def consume(self, queue: str, expect: int, timeout: float = 30.0, linger: float = 0.0) -> list[dict]:
        """Reads (and acknowledges) messages until `expect` arrived and the
        queue was found empty, waiting at most `timeout`, then `linger` more
        for any extra. (With duplicates, `expect` can arrive before the
        queue's last message: the empty queue is the end.)"""
        conn, ch = self.channel()
        out: list[dict] = []
        try:
            deadline = time.monotonic() + timeout
            extra_until = None
            empty = False
            while True:
                now = time.monotonic()
                if len(out) >= expect and empty:
                    extra_until = extra_until or now + linger
                    if now >= extra_until:
                        break
                elif now >= deadline:
                    break
                method, props, body = ch.basic_get(queue, auto_ack=True)
                empty = method is None
                if method is None:
                    time.sleep(0.02)
                    continue
                headers = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in (props.headers or {}).items()}
                # Shaped like BrokerClient.consume's records (one ordered
                # queue: partition 0, offsets in arrival order), so the
                # load comparison serves both sinks.
                out.append({"value": body, "key": str(headers.get("aggregateid", "")).encode(),
                            "routing_key": method.routing_key, "props": props, "headers": headers,
                            "partition": 0, "offset": len(out)})
            return out
        finally:
            conn.close()


@contextmanager
def other_server(name: str, port_offset: int, settings: dict[str, str] | None = None, relay: bool = True):
    """A server of its own beside the session's (files under .run/<name>,
    port PG_PORT + port_offset, `settings` on top of the rig's), with the
    extension created and, with `relay`, the relay streaming. Stopped
    (immediate) afterwards."""
    p = Postgres(run_dir=RUN / name, port=PG_PORT + port_offset)
    p.init(settings)
    p.start()
    try:
        p.create_database()
        with p.connect() as c:
            c.execute("CREATE EXTENSION outbox")
        if relay:
            wait_for_relay(p)
        yield p
    finally:
        p.stop(mode="immediate", check=False)


def relay_status(pg: "Postgres") -> dict:
    with pg.connect() as c:
        cur = c.execute("SELECT * FROM outbox_status")
        row = cur.fetchone()
        return dict(zip([d.name for d in cur.description], row))


def wait_for_relay(pg: "Postgres", state: str = "streaming", timeout: float = 60.0) -> dict:
    """Waits until the relay worker reports `state` (it creates its slot first)."""
    return wait_for(f"the relay to be {state}", lambda: (s := relay_status(pg))["state"] == state and s, timeout=timeout)


def relay_pid(pg: "Postgres") -> int | None:
    with pg.connect() as c:
        row = c.execute("SELECT pid FROM pg_stat_activity WHERE backend_type = 'outbox relay'").fetchone()
        return row[0] if row else None


def drain(pg: "Postgres", timeout_ms: int = 60000) -> None:
    with pg.connect() as c:
        if not c.execute("SELECT outbox_drain(%s)", (timeout_ms,)).fetchone()[0]:
            raise TimeoutError(f"outbox_drain timed out; relay status {relay_status(pg)}")


def unique_topic(prefix: str = "t") -> str:
    return f"{prefix}.{uuid.uuid4().hex[:12]}"
