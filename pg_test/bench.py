"""Benchmarks: outbox's relay beside its baselines and its peer, all in one
run on the same server and the same Apache Kafka broker, in interleaved
rounds. Prints the tables of docs/benchmarks.md.

Run: ./pg_test/bench.sh   (see README.md, "Benchmarks")

Load comes from pgbench with custom scripts (~200-byte payloads). Each round
runs, in this order:
  ceiling-1/-100  the relay switched off, one or 100 outbox_emit() per
                  transaction: how fast Postgres alone commits the events
  relay-1/-100    the same load, relay on
  table           one INSERT into the outbox table per transaction (the
                  Debezium-style path), relay on: full speed, then 1,000/s
  debezium        the same table load, the relay off, Debezium's PostgreSQL
                  connector with the Outbox Event Router in Kafka Connect
                  (standalone) publishing: full speed, then 1,000/s
  polling         a polling relay as users write it (SELECT ... FOR UPDATE
                  SKIP LOCKED LIMIT 100, produce, mark published, poll every
                  100 ms): full speed, then 1,000/s
  start           seconds from starting the relay (ours: relay_enabled on,
                  fresh slot; Debezium: the Connect JVM, fresh slot) to the
                  first event in Kafka, an outbox row inserted as soon as
                  the slot exists
Ratios are taken within a round and reported as the median and the range
over the rounds. Once per run: the broker alone (a producer with the
relay's settings), the cost of outbox_emit() to the producing transaction,
and a profile of the relay worker.

Latency, the same method for every publisher: an outside consumer reading
the topic, receive time minus the time the row was written (a `ts` field in
the payload, clock_timestamp() in the transaction, the same clock).
Throughput: records in Kafka over load + drain time.
"""

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import psycopg

import rig

PGBENCH = str(rig.PG_BIN / "pgbench")
DURATION = int(os.environ.get("BENCH_SECONDS", "10"))
CLIENTS = int(os.environ.get("BENCH_CLIENTS", "4"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
PAYLOAD = json.dumps({"order": 1, "customer": "c" * 40, "items": [{"sku": "sku-123456", "qty": 2, "price": 1999}] * 2, "note": "x" * 40})
# The payload with the write time in it, for latency (ms since the epoch).
PAYLOAD_TS = f"('{PAYLOAD}'::jsonb || jsonb_build_object('ts', (extract(epoch FROM clock_timestamp()) * 1000)::bigint))"
# Debezium at its documented low-latency knob: poll.interval.ms (default 500)
# is how long the connector waits for more changes before it hands a batch
# on; and the producer lingers as long as ours (linger.ms 1).
DEBEZIUM_CONNECTOR = {"poll.interval.ms": "10"}
DEBEZIUM_WORKER = {"producer.linger.ms": "1"}


def pgbench(pg, script: str, duration=DURATION, clients=CLIENTS, rate=None, extra=()):
    """Returns (transactions per second, average latency ms, transactions)."""
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False, dir="/tmp") as f:
        f.write(script)
        path = f.name
    os.chmod(path, 0o644)
    cmd = [PGBENCH, "-n", "-h", "127.0.0.1", "-p", str(pg.port), "-U", "postgres", "-c", str(clients), "-j", str(min(clients, 2)),
           "-T", str(duration), "-f", path, "-M", "prepared", *extra, rig.DATABASE]
    if rate:
        cmd[1:1] = ["-R", str(rate)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    tps = next(float(l.split("=")[1].split()[0]) for l in out.splitlines() if l.startswith("tps"))
    lat = next((float(l.split("=")[1].split()[0]) for l in out.splitlines() if l.startswith("latency average")), None)
    n = next(int(l.split(":")[1].split()[0]) for l in out.splitlines() if l.startswith("number of transactions actually processed"))
    os.unlink(path)
    return tps, lat, n


def set_conf(pg, **kv):
    with pg.connect() as c:
        for k, v in kv.items():
            c.execute(f"ALTER SYSTEM SET {k} = '{v}'")
    pg.reload()


def relay_off(pg):
    set_conf(pg, **{"outbox.relay_enabled": "off"})
    rig.wait_for_relay(pg, state="disabled")


def start_ours(pg):
    """On, on a new slot: the backlog written while it was off (ceiling,
    Debezium and polling runs) is not ours to measure."""
    with pg.connect() as c:
        c.execute("SELECT pg_drop_replication_slot('outbox')")
    set_conf(pg, **{"outbox.relay_enabled": "on"})


def relay_on(pg):
    start_ours(pg)
    rig.wait_for_relay(pg)


def cpu_seconds(*pids):
    total = 0.0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def peak_rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return None


def emit_script(topic, per_txn):
    body = f"SELECT count(outbox_emit('Order', (:aid + g)::text, 'OrderPlaced', '{PAYLOAD}'::jsonb, '{{}}', '{topic}')) FROM generate_series(1, {per_txn}) g;" \
        if per_txn > 1 else f"SELECT outbox_emit('Order', :aid::text, 'OrderPlaced', '{PAYLOAD}'::jsonb, '{{}}', '{topic}');"
    return f"""\\set aid random(1, 100000)
BEGIN;
INSERT INTO orders (customer, payload) VALUES (:aid, '{PAYLOAD}');
{body}
COMMIT;
"""


def table_script(aggregatetype, table="outbox.outbox"):
    """The application of a Debezium user: the business row and an outbox
    row in one transaction (the payload carries its write time)."""
    return f"""\\set aid random(1, 100000)
BEGIN;
INSERT INTO orders (customer, payload) VALUES (:aid, '{PAYLOAD}');
INSERT INTO {table} (aggregatetype, aggregateid, type, payload) VALUES ('{aggregatetype}', :aid, 'OrderPlaced', {PAYLOAD_TS});
COMMIT;
"""


class Profile:
    """`perf record` (software clock, call graphs) of one process while a
    scenario runs; `top()` gives the heaviest symbols. Skipped when perf is
    missing or not permitted."""

    def __init__(self, name, pid):
        self.path = f"/tmp/outbox-bench-{name}.perf"
        self.proc = None
        if not shutil.which("perf"):
            return
        self.proc = subprocess.Popen(["perf", "record", "-q", "-e", "cpu-clock", "-F", "499", "-g", "-o", self.path, "-p", str(pid)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self):
        if self.proc:
            self.proc.send_signal(2)
            self.proc.wait(60)

    def top(self, n=12):
        if not self.proc or not os.path.exists(self.path):
            return []
        cmd = ["perf", "report", "-i", self.path, "--stdio", "--no-children", "--sort", "dso,sym", "-g", "none", "--percent-limit", "0.5"]
        out = subprocess.run(cmd, capture_output=True, text=True).stdout
        rows = []
        for line in out.splitlines():
            parts = line.split()
            if len(parts) >= 4 and parts[0].endswith("%"):
                rows.append((float(parts[0][:-1]), parts[1], " ".join(parts[3:])))
        return rows[:n]


class Reader:
    """An outside consumer of one topic, assigned every partition from the
    start (no group to join): counts records and, for payloads with `ts`,
    receive time minus write time."""

    def __init__(self, broker, topic, partitions):
        from confluent_kafka import Consumer, TopicPartition, OFFSET_BEGINNING

        self.c = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": f"bench-{uuid.uuid4()}",
                           "enable.auto.commit": False, "fetch.wait.max.ms": 5})
        self.c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
        self.lat: list[float] = []
        self.n = 0
        self.first_at = None
        self.stop_event = threading.Event()
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self):
        while not self.stop_event.is_set():
            m = self.c.poll(0.05)
            if m is None or m.error():
                continue
            now = time.time() * 1000
            self.first_at = self.first_at or time.monotonic()
            self.n += 1
            try:
                self.lat.append(now - json.loads(m.value())["ts"])
            except (ValueError, KeyError, TypeError):
                pass

    def wait(self, n, timeout):
        rig.wait_for(f"{n} records at the outside consumer", lambda: self.n >= n, timeout=timeout, interval=0.02)

    def close(self):
        self.stop_event.set()
        self.t.join(10)
        self.c.close()
        lat = sorted(self.lat)
        q = lambda f: lat[min(len(lat) - 1, int(f * len(lat)))] if lat else None  # noqa: E731
        return {"n_lat": len(lat), "p50_ms": q(0.5), "p95_ms": q(0.95), "p99_ms": q(0.99)}


def new_topic(broker, name):
    topic = f"bench.{name}.{uuid.uuid4().hex[:6]}"
    broker.create_topic(topic, partitions=6)
    return topic


def aggregate(broker, name):
    """An aggregate type of its own, so its topic (outbox.event.<type>, the
    router's name, ours and Debezium's) holds only this scenario's events."""
    agg = f"{name}{uuid.uuid4().hex[:6]}"
    broker.create_topic(f"outbox.event.{agg}", partitions=6)
    return agg, f"outbox.event.{agg}"


def ceiling(pg, per_txn):
    tps, _, _ = pgbench(pg, emit_script("bench.ceiling", per_txn))
    return {"commit_eps": tps * per_txn}


def ours(pg, broker, name, script_for, per_txn=1, rate=None, clients=CLIENTS, profile=False):
    """The relay on, the load of `script_for(topic or aggregate)`; the
    outside consumer reads along when rate is set (latency)."""
    if script_for is emit_script:
        topic = new_topic(broker, name)
        script = emit_script(topic, per_txn)
    else:
        agg, topic = aggregate(broker, name)
        script = script_for(agg)
    with pg.connect() as c:
        c.execute("SELECT outbox_relay_latency_reset()")
    pid = rig.relay_pid(pg)
    cpu0 = cpu_seconds(pid)
    reader = Reader(broker, topic, 6) if rate else None
    prof = Profile(name, pid) if profile else None
    t0 = time.monotonic()
    tps, _, n = pgbench(pg, script, rate=rate, clients=clients)
    rig.drain(pg, timeout_ms=600_000)
    t_all = time.monotonic() - t0
    if prof:
        prof.stop()
    cpu = cpu_seconds(pid) - cpu0
    events = broker.topic_counts(topic)
    with pg.connect() as c:
        _, p50, p95, p99, _ = c.execute("SELECT * FROM outbox_relay_latency()").fetchone()
    out = {"commit_eps": tps * per_txn, "events": events, "committed": n * per_txn, "eps": events / t_all,
           "ack_p50_ms": p50 / 1000 if p50 else None, "ack_p95_ms": p95 / 1000 if p95 else None, "ack_p99_ms": p99 / 1000 if p99 else None,
           "cpu_s": cpu, "cpu_s_per_1k": 1000 * cpu / events if events else None,
           "rss_mb": rig.relay_status(pg)["peak_rss_kb"] / 1024, "profile": prof.top() if prof else []}
    if reader:
        reader.wait(events, timeout=60)
        out.update(reader.close())
    rig.log(f"{name}: {events} of {out['committed']} events in Kafka in {t_all:.1f} s")
    return out


def use_sink(pg, sink, rabbit=None):
    """Switches the relay's sink (it restarts from its confirmed position)."""
    old = rig.relay_pid(pg)
    kv = {"outbox.sink": sink}
    if rabbit:
        kv["outbox.amqp_url"] = rabbit.url()
    set_conf(pg, **kv)
    rig.wait_for("the relay on its new sink",
                 lambda: (p := rig.relay_pid(pg)) and p != old and rig.relay_status(pg)["state"] == "streaming", timeout=60)


def rabbitmq(pg, rabbit, name, rate=None):
    """The relay publishing outbox_emit() events (1 per transaction) to
    RabbitMQ, into a durable queue bound to the events' routing key;
    commit→confirm latency from the relay's own histogram."""
    rk = f"bench.{name}.{uuid.uuid4().hex[:6]}"
    q = rabbit.bind_queue("outbox", rk)
    with pg.connect() as c:
        c.execute("SELECT outbox_relay_latency_reset()")
    pid = rig.relay_pid(pg)
    cpu0 = cpu_seconds(pid)
    t0 = time.monotonic()
    tps, _, n = pgbench(pg, emit_script(rk, 1), rate=rate, clients=2 if rate else CLIENTS)
    rig.drain(pg, timeout_ms=600_000)
    t_all = time.monotonic() - t0
    cpu = cpu_seconds(pid) - cpu0
    conn, ch = rabbit.channel()
    try:
        events = ch.queue_declare(q, passive=True).method.message_count
        ch.queue_delete(q)
    finally:
        conn.close()
    with pg.connect() as c:
        _, p50, p95, p99, _ = c.execute("SELECT * FROM outbox_relay_latency()").fetchone()
    rig.log(f"{name}: {events} of {n} events in RabbitMQ in {t_all:.1f} s")
    return {"commit_eps": tps, "events": events, "committed": n, "eps": events / t_all,
            "ack_p50_ms": p50 / 1000 if p50 else None, "ack_p95_ms": p95 / 1000 if p95 else None,
            "ack_p99_ms": p99 / 1000 if p99 else None, "cpu_s": cpu, "cpu_s_per_1k": 1000 * cpu / events if events else None,
            "rss_mb": rig.relay_status(pg)["peak_rss_kb"] / 1024}


def debezium(pg, broker, dbz, name, rate=None):
    """Debezium publishing the table load (the relay off)."""
    agg, topic = aggregate(broker, name)
    pids = (dbz.pid, dbz.walsender_pid())
    cpu0 = cpu_seconds(*pids)
    reader = Reader(broker, topic, 6)
    t0 = time.monotonic()
    tps, _, n = pgbench(pg, table_script(agg), rate=rate)
    reader.wait(n, timeout=600)
    t_all = time.monotonic() - t0
    cpu = cpu_seconds(*pids) - cpu0
    out = {"commit_eps": tps, "committed": n, "events": broker.topic_counts(topic), "eps": n / t_all,
           "cpu_s": cpu, "cpu_s_per_1k": 1000 * cpu / n, "rss_mb": peak_rss_mb(dbz.pid)}
    lat = reader.close()
    if rate:
        out.update(lat)
    rig.log(f"{name}: {out['events']} of {n} events in Kafka in {t_all:.1f} s")
    return out


POLL_TABLE = """
CREATE TABLE IF NOT EXISTS outbox_poll (
    id bigserial PRIMARY KEY, aggregatetype text NOT NULL, aggregateid text NOT NULL, type text NOT NULL,
    payload jsonb NOT NULL, created_at timestamptz NOT NULL DEFAULT clock_timestamp(), published_at timestamptz)
"""


def polling_relay(pg, broker, topic, stop, result):
    """The relay users write: poll, produce, wait for acks, mark published."""
    from confluent_kafka import Producer

    p = Producer({"bootstrap.servers": broker.bootstrap, "enable.idempotence": True, "acks": "all", "linger.ms": 1,
                  "partitioner": "murmur2_random"})
    published = 0
    cpu0 = time.thread_time()
    with pg.connect(autocommit=False) as c:
        result["backend"] = c.info.backend_pid
        backend0 = cpu_seconds(c.info.backend_pid)
        while True:
            rows = c.execute(
                "SELECT id, aggregateid, type, payload::text FROM outbox_poll "
                "WHERE published_at IS NULL ORDER BY id LIMIT 100 FOR UPDATE SKIP LOCKED").fetchall()
            for _id, key, typ, payload in rows:
                p.produce(topic, key=key, value=payload, headers=[("type", typ)])
            p.flush(60)
            if rows:
                c.execute("UPDATE outbox_poll SET published_at = now() WHERE id = ANY(%s)", ([r[0] for r in rows],))
                published += len(rows)
            c.commit()
            if len(rows) < 100:
                if stop.is_set() and not rows:
                    break
                time.sleep(0.1)
        result["cpu_s"] = time.thread_time() - cpu0 + cpu_seconds(c.info.backend_pid) - backend0
    result["published"] = published


def polling(pg, broker, name, rate=None):
    topic = new_topic(broker, name)
    with pg.connect() as c:
        c.execute(POLL_TABLE)
        c.execute("TRUNCATE outbox_poll")
    stop, result = threading.Event(), {}
    relay = threading.Thread(target=polling_relay, args=(pg, broker, topic, stop, result))
    reader = Reader(broker, topic, 6) if rate else None
    t0 = time.monotonic()
    relay.start()
    tps, _, n = pgbench(pg, table_script("Order", table="outbox_poll"), rate=rate)
    stop.set()
    relay.join()
    t_all = time.monotonic() - t0
    out = {"commit_eps": tps, "committed": n, "events": broker.topic_counts(topic), "eps": result["published"] / t_all,
           "cpu_s": result["cpu_s"], "cpu_s_per_1k": 1000 * result["cpu_s"] / max(1, result["published"])}
    if reader:
        reader.wait(n, timeout=60)
        out.update(reader.close())
    return out


def time_to_first_event(pg, broker, name, launch, slot):
    """Seconds from launch() to the first event in Kafka: an outbox row
    inserted as soon as the publisher's slot exists."""
    agg, topic = aggregate(broker, name)
    reader = Reader(broker, topic, 6)
    time.sleep(1)  # the consumer's first fetch in place
    t0 = time.monotonic()
    launch()
    with pg.connect() as c:
        rig.wait_for(f"slot {slot}", lambda: c.execute("SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", (slot,)).fetchone(),
                     timeout=120, interval=0.01)
        while True:
            try:
                c.execute("INSERT INTO outbox.outbox (aggregatetype, aggregateid, type, payload) VALUES (%s, '1', 'Started', '{}')", (agg,))
                break
            except psycopg.errors.ObjectNotInPrerequisiteState:
                time.sleep(0.01)  # the new slot is still finding its consistent point
    reader.wait(1, timeout=120)
    first = reader.first_at - t0
    reader.close()
    return {"start_s": first}


def broker_baseline(broker, rate=None, duration=DURATION, batch=1):
    """The broker alone: a librdkafka producer with the relay's delivery
    settings and the relay's records (key, value, headers, timestamp), at
    full speed or at a fixed rate. Separates what the broker costs from what
    the relay costs."""
    from confluent_kafka import Producer

    topic = f"bench.broker.{uuid.uuid4().hex[:6]}"
    broker.create_topic(topic, partitions=6)
    p = Producer({"bootstrap.servers": broker.bootstrap, "enable.idempotence": True, "acks": "all", "linger.ms": 1,
                  "partitioner": "murmur2_random", "message.timeout.ms": 0})
    lat = []
    value = PAYLOAD.encode()

    def done(err, msg, sent=None):
        if err is None:
            lat.append(time.monotonic() - sent)

    t0 = time.monotonic()
    n = 0
    while time.monotonic() - t0 < duration:
        if rate and n >= rate * (time.monotonic() - t0):
            p.poll(0.0005)
            continue
        sent = time.monotonic()
        while True:
            try:
                # The same record the relay produces: key, value, our three
                # headers and the commit timestamp.
                p.produce(topic, key=str(n % 100000), value=value, timestamp=int(time.time() * 1000),
                          headers=[("id", str(uuid.uuid4()).encode()), ("type", b"OrderPlaced"), ("aggregatetype", b"Order")],
                          on_delivery=lambda e, m, s=sent: done(e, m, s))
                break
            except BufferError:
                p.poll(0.01)
        n += 1
        p.poll(0)
    p.flush(120)
    elapsed = time.monotonic() - t0
    lat.sort()
    q = lambda f: lat[min(len(lat) - 1, int(f * len(lat)))] * 1000 if lat else None  # noqa: E731
    return {"name": "broker alone" + (" 1k/s" if rate else ""), "events": broker.topic_counts(topic),
            "eps": len(lat) / elapsed, "p50_ms": q(0.5), "p95_ms": q(0.95), "p99_ms": q(0.99)}


def call_cost(pg, n=300_000, runs=5):
    """CPU cost of one call, without the transaction around it: user CPU of
    the backend (from /proc) over n calls in one rolled-back transaction,
    the least of `runs`. outbox_emit() against pg_logical_emit_message()
    with the same payload, the floor any WAL-message outbox pays."""
    out = {}
    with pg.connect() as c:
        pid = c.execute("SELECT pg_backend_pid()").fetchone()[0]

        def user_cpu():
            with open(f"/proc/{pid}/stat") as f:
                return int(f.read().rsplit(")", 1)[1].split()[11]) / os.sysconf("SC_CLK_TCK")

        for name, sql in (
            ("outbox_emit()", f"SELECT count(outbox_emit('Order', g::text, 'OrderPlaced', %s::jsonb, '{{}}', 'bench.cost')) FROM generate_series(1, {n}) g"),
            ("pg_logical_emit_message()", f"SELECT count(pg_logical_emit_message(true, 'bench', %s)) FROM generate_series(1, {n}) g"),
        ):
            best = None
            for _ in range(runs):
                c.execute("BEGIN")
                t = user_cpu()
                c.execute(sql, (PAYLOAD,))
                us = (user_cpu() - t) / n * 1e6
                c.execute("ROLLBACK")
                best = us if best is None else min(best, us)
            out[name] = best
    return out


def emit_cost(pg):
    """Producer-side cost: the same transaction with outbox_emit() vs an
    INSERT into an outbox table (the relay off, so only the write is measured)."""
    with pg.connect() as c:
        c.execute("CREATE TABLE IF NOT EXISTS outbox_plain (LIKE outbox.outbox INCLUDING DEFAULTS INCLUDING INDEXES)")
    emit = emit_script("bench.cost", 1)
    insert = f"""\\set aid random(1, 100000)
BEGIN;
INSERT INTO orders (customer, payload) VALUES (:aid, '{PAYLOAD}');
INSERT INTO outbox_plain (aggregatetype, aggregateid, type, payload) VALUES ('Order', :aid, 'OrderPlaced', '{PAYLOAD}');
COMMIT;
"""
    only_business = f"""\\set aid random(1, 100000)
BEGIN;
INSERT INTO orders (customer, payload) VALUES (:aid, '{PAYLOAD}');
COMMIT;
"""
    # Three rounds, the scripts interleaved, the best of each kept: one
    # client's commit rate swings with whatever else the machine does.
    res = {}
    for _ in range(3):
        for name, script in (("business write only", only_business), ("+ outbox_emit()", emit), ("+ INSERT outbox table", insert)):
            tps, lat, _ = pgbench(pg, script, duration=max(4, DURATION // 2), clients=1)
            if name not in res or tps > res[name][0]:
                res[name] = (tps, lat)
    return res


def fmt(v, f="{:.0f}"):
    return "-" if v is None else f.format(v)


def spread(values, f="{:.2f}"):
    """median (min-max) of the non-missing values."""
    v = [x for x in values if x is not None]
    if not v:
        return "-"
    if len(v) == 1:
        return f.format(v[0])
    return f"{f.format(statistics.median(v))} ({f.format(min(v))}-{f.format(max(v))})"


def run_round(pg, broker, rabbit, r, last):
    """One round: every scenario once, ours beside its baseline."""
    res = {}
    # The sinks side by side: Kafka, then RabbitMQ, same load.
    res["relay-1k"] = ours(pg, broker, "relay-1k", emit_script, 1, rate=1000, clients=2)
    use_sink(pg, "rabbitmq", rabbit)
    res["rabbitmq-1"] = rabbitmq(pg, rabbit, "rabbitmq-1")
    res["rabbitmq-1k"] = rabbitmq(pg, rabbit, "rabbitmq-1k", rate=1000)
    use_sink(pg, "kafka")
    relay_off(pg)
    res["ceiling-1"] = ceiling(pg, 1)
    relay_on(pg)
    res["relay-1"] = ours(pg, broker, "relay-1", emit_script, 1, profile=last)
    relay_off(pg)
    res["ceiling-100"] = ceiling(pg, 100)
    relay_on(pg)
    res["relay-100"] = ours(pg, broker, "relay-100", emit_script, 100, profile=last)
    res["table"] = ours(pg, broker, "table", table_script, profile=last)
    res["table-1k"] = ours(pg, broker, "table-1k", table_script, rate=1000, clients=2)
    relay_off(pg)
    dbz = rig.DebeziumConnect(pg, broker, converters="string", connector=DEBEZIUM_CONNECTOR, worker=DEBEZIUM_WORKER)
    try:
        res["debezium-start"] = time_to_first_event(pg, broker, "dbzstart", dbz.launch, dbz.slot)
        res["debezium"] = debezium(pg, broker, dbz, "dbz")
        res["debezium-1k"] = debezium(pg, broker, dbz, "dbz1k", rate=1000)
    finally:
        dbz.stop()
    res["polling"] = polling(pg, broker, "polling")
    res["polling-1k"] = polling(pg, broker, "polling-1k", rate=1000)
    with pg.connect() as c:
        c.execute("TRUNCATE outbox.outbox, outbox_poll")
    res["ours-start"] = time_to_first_event(pg, broker, "start", lambda: start_ours(pg), "outbox")
    rig.wait_for_relay(pg)
    rig.log(f"round {r + 1} of {ROUNDS} done")
    return res


ROWS = [
    # (label, key in a round's results)
    ("ceiling-1 (relay off, 1 event/txn)", "ceiling-1"),
    ("relay-1 (outbox_emit, 1 event/txn)", "relay-1"),
    ("ceiling-100 (relay off)", "ceiling-100"),
    ("relay-100 (outbox_emit, 100 events/txn)", "relay-100"),
    ("outbox, table path, full speed", "table"),
    ("Debezium, table, full speed", "debezium"),
    ("polling relay, full speed", "polling"),
    ("relay-1 to RabbitMQ (outbox_emit, 1 event/txn)", "rabbitmq-1"),
    ("relay to Kafka, outbox_emit, 1k/s", "relay-1k"),
    ("relay to RabbitMQ, outbox_emit, 1k/s", "rabbitmq-1k"),
    ("outbox, table path, 1k/s", "table-1k"),
    ("Debezium, table, 1k/s", "debezium-1k"),
    ("polling relay, 1k/s", "polling-1k"),
]

RATIOS = [
    ("relay-1 end-to-end / ceiling-1 commits (target >= 0.9)", lambda x: x["relay-1"]["eps"] / x["ceiling-1"]["commit_eps"]),
    ("relay-100 end-to-end / ceiling-100 commits (target >= 0.9)", lambda x: x["relay-100"]["eps"] / x["ceiling-100"]["commit_eps"]),
    ("RabbitMQ / Kafka, end-to-end events/s, relay-1 at full speed", lambda x: x["rabbitmq-1"]["eps"] / x["relay-1"]["eps"]),
    ("RabbitMQ / Kafka, commit→confirm p50 at 1k/s", lambda x: x["rabbitmq-1k"]["ack_p50_ms"] / x["relay-1k"]["ack_p50_ms"]),
    ("outbox / polling relay, end-to-end events/s at full speed", lambda x: x["table"]["eps"] / x["polling"]["eps"]),
    ("outbox / Debezium, end-to-end events/s at full speed", lambda x: x["table"]["eps"] / x["debezium"]["eps"]),
    ("outbox p50 / Debezium p50 at 1k/s (target <= 0.1)", lambda x: x["table-1k"]["p50_ms"] / x["debezium-1k"]["p50_ms"]),
    ("outbox p99 / Debezium p99 at 1k/s", lambda x: x["table-1k"]["p99_ms"] / x["debezium-1k"]["p99_ms"]),
    ("outbox events per CPU-second / Debezium's, full speed (target >= 2)",
     lambda x: x["debezium"]["cpu_s_per_1k"] / x["table"]["cpu_s_per_1k"]),
    ("outbox peak RSS / Connect's", lambda x: x["table"]["rss_mb"] / x["debezium"]["rss_mb"]),
    ("outbox p50 / polling p50 at 1k/s", lambda x: x["table-1k"]["p50_ms"] / x["polling-1k"]["p50_ms"]),
    ("start to first event: outbox / Debezium", lambda x: x["ours-start"]["start_s"] / x["debezium-start"]["start_s"]),
]


def main():
    rig.install_extension(release=True)
    broker = rig.KafkaBroker(heap="1g")
    broker.reset()
    broker.start()
    rabbit = rig.RabbitMQ()
    rabbit.reset()
    rabbit.start()
    pg = rig.Postgres()
    pg.init({"max_connections": "100", "shared_buffers": "'256MB'", "logical_decoding_work_mem": "'64MB'"})
    pg.start()
    pg.create_database()
    t_start = time.monotonic()
    try:
        with pg.connect() as c:
            c.execute("CREATE EXTENSION outbox")
            c.execute("CREATE TABLE orders (id bigserial PRIMARY KEY, customer text, payload jsonb)")
        rig.wait_for_relay(pg)
        broker_baseline(broker, duration=5)  # warms the broker's JIT; not reported
        brokers = [broker_baseline(broker), broker_baseline(broker, rate=1000)]
        rounds = [run_round(pg, broker, rabbit, r, r == ROUNDS - 1) for r in range(ROUNDS)]
        relay_off(pg)
        cost = emit_cost(pg)
        calls = call_cost(pg)
    finally:
        pg.stop(check=False)
        broker.stop()
        rabbit.stop()
    minutes = (time.monotonic() - t_start) / 60

    print("\n## outbox benchmark", time.strftime("%Y-%m-%d %H:%M"),
          f"({os.cpu_count()} cores; Apache Kafka {rig.jar_version(rig.KAFKA_LIBS, 'kafka_2.13')}, one KRaft node; RabbitMQ {rabbit.version()}, one node; Debezium {rig.jar_version(rig.DEBEZIUM_LIBS, 'debezium-connector-postgres')}; "
          f"{ROUNDS} rounds of {DURATION} s runs, {CLIENTS} clients; {minutes:.0f} min)")
    print("\nEach cell: median over the rounds (min-max).\n")
    print("| scenario | committed events/s | end-to-end events/s | write→consumer p50 / p95 / p99 ms | "
          "relay CPU s per 1k events | relay peak RSS MB | outbox commit→ack p50 / p99 ms |")
    print("|---|---|---|---|---|---|---|")
    for label, key in ROWS:
        rs = [x[key] for x in rounds]
        g = lambda k: [r.get(k) for r in rs]  # noqa: E731
        lat = " / ".join(spread(g(k), "{:.1f}") for k in ("p50_ms", "p95_ms", "p99_ms")) if rs[0].get("p50_ms") else "-"
        ack = f"{spread(g('ack_p50_ms'))} / {spread(g('ack_p99_ms'))}" if rs[0].get("ack_p50_ms") else "-"
        print(f"| {label} | {spread(g('commit_eps'), '{:.0f}')} | {spread(g('eps'), '{:.0f}')} | {lat} | "
              f"{spread(g('cpu_s_per_1k'), '{:.3f}')} | {spread(g('rss_mb'), '{:.0f}')} | {ack} |")
    print(f"| start to first event, outbox (relay_enabled on, new slot) | | | | | | {spread([x['ours-start']['start_s'] for x in rounds])} s |")
    print(f"| start to first event, Debezium (Connect JVM started, new slot) | | | | | | {spread([x['debezium-start']['start_s'] for x in rounds])} s |")
    missing = [(k, x[k]["committed"], x[k]["events"]) for x in rounds for k in x if "committed" in x[k] and x[k]["events"] != x[k]["committed"]]
    if missing:
        print(f"\nevents in Kafka differ from events committed: {missing}")
    print("\n| ratio (within a round) | median (min-max) |\n|---|---|")
    for label, f in RATIOS:
        print(f"| {label} | {spread([f(x) for x in rounds])} |")
    print("\n| the broker alone (Python librdkafka producer, the relay's settings and records) | events/s | ack p50 / p95 / p99 ms |\n|---|---|---|")
    for b in brokers:
        print(f"| {b['name']} | {fmt(b['eps'])} | {fmt(b['p50_ms'], '{:.2f}')} / {fmt(b['p95_ms'], '{:.2f}')} / {fmt(b['p99_ms'], '{:.2f}')} |")
    base = cost["business write only"][0]
    print("\n| producing transaction (1 client, best of 3 interleaved) | tps | latency ms |\n|---|---|---|")
    for k, (tps, lat) in cost.items():
        print(f"| {k} | {tps:.0f} | {fmt(lat, '{:.3f}')} |")
    e, t = cost["+ outbox_emit()"], cost["+ INSERT outbox table"]
    print(f"\noutbox_emit() transaction / outbox-table INSERT transaction, throughput: {e[0] / t[0]:.2f} "
          f"(business write alone: {base:.0f} tps)")
    print("\n| one call, user CPU of the backend (least of 5 x 300k) | µs |\n|---|---|")
    for k, us in calls.items():
        print(f"| {k} | {us:.2f} |")
    last = rounds[-1]
    for key in ("relay-1", "relay-100", "table"):
        if last[key].get("profile"):
            print(f"\n| profile: the relay worker during {key}, last round (perf, cpu-clock, all its threads) | % of samples |\n|---|---|")
            for pct, dso, sym in last[key]["profile"]:
                print(f"| `{sym}` ({dso}) | {pct:.1f} |")
    print("\n| worker CPU µs per event (the relay's own process) | median (min-max) |\n|---|---|")
    for key in ("relay-1", "relay-100", "table"):
        print(f"| {key} | {spread([1000 * x[key]['cpu_s_per_1k'] for x in rounds], '{:.1f}')} |")


if __name__ == "__main__":
    sys.exit(main())
