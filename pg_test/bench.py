"""Benchmarks: relay throughput, commit-to-Kafka latency and the cost of
outbox_emit() to the producing transaction, each beside a baseline measured
in the same run on the same server and broker. Prints one table.

Run: ./pg_test/bench.sh   (see README.md, "Benchmarks")

Load comes from pgbench with custom scripts (~200-byte payloads). Scenarios:
  ceiling     the same load with the relay switched off: how fast Postgres
              alone commits the events
  relay-1     one event per transaction, relay on
  relay-100   100 events per transaction, relay on
  light       1,000 events/s at a fixed rate, for latency
  broker      the broker alone: a producer with the relay's settings at full
              speed, and at 1,000 events/s (ack latency)
  polling     a polling relay as users write it (SELECT ... FOR UPDATE SKIP
              LOCKED LIMIT 100, produce, mark published, poll every 100 ms)
  emit-cost   the producing transaction with outbox_emit() against the same
              transaction inserting into an outbox table (relay off)
Throughput is counted at the broker (sum of the topic's high watermarks),
not at the producer; tansu 0.6 cannot serve a consumer large partitions
fast enough to count there.
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

import rig

PGBENCH = str(rig.PG_BIN / "pgbench")
DURATION = int(os.environ.get("BENCH_SECONDS", "10"))
CLIENTS = int(os.environ.get("BENCH_CLIENTS", "4"))
PAYLOAD = json.dumps({"order": 1, "customer": "c" * 40, "items": [{"sku": "sku-123456", "qty": 2, "price": 1999}] * 2, "note": "x" * 40})


def pgbench(pg, script: str, duration=DURATION, clients=CLIENTS, rate=None, extra=()):
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
    os.unlink(path)
    return tps, lat


def set_conf(pg, **kv):
    with pg.connect() as c:
        for k, v in kv.items():
            c.execute(f"ALTER SYSTEM SET {k} = '{v}'")
    pg.reload()


def relay_off(pg):
    set_conf(pg, **{"outbox.relay_enabled": "off"})
    rig.wait_for_relay(pg, state="disabled")


def relay_on(pg):
    set_conf(pg, **{"outbox.relay_enabled": "on"})
    rig.wait_for_relay(pg)


def worker_cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def emit_script(topic, per_txn):
    body = f"SELECT count(outbox_emit('Order', (:aid + g)::text, 'OrderPlaced', '{PAYLOAD}'::jsonb, '{{}}', '{topic}')) FROM generate_series(1, {per_txn}) g;" \
        if per_txn > 1 else f"SELECT outbox_emit('Order', :aid::text, 'OrderPlaced', '{PAYLOAD}'::jsonb, '{{}}', '{topic}');"
    return f"""\\set aid random(1, 100000)
BEGIN;
INSERT INTO orders (customer, payload) VALUES (:aid, '{PAYLOAD}');
{body}
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


def relay_run(pg, broker, name, per_txn, rate=None, duration=DURATION, clients=CLIENTS, profile=False, consumer=False):
    topic = f"bench.{name}.{uuid.uuid4().hex[:6]}"
    broker.create_topic(topic, partitions=6)
    with pg.connect() as c:
        c.execute("SELECT outbox_relay_latency_reset()")
        pub0 = rig.relay_status(pg)["events_published"]
    pid = rig.relay_pid(pg)
    cpu0 = worker_cpu_seconds(pid)
    lag = {"max": 0.0}
    stop = threading.Event()

    def watch_lag():
        with pg.connect() as c:
            while not stop.is_set():
                v = c.execute("SELECT pg_current_wal_lsn() - confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = 'outbox'").fetchone()[0]
                lag["max"] = max(lag["max"], float(v or 0))
                time.sleep(0.2)

    w = threading.Thread(target=watch_lag, daemon=True)
    w.start()
    outside = {}
    reader = threading.Thread(target=consume_latency, args=(broker, topic, stop, outside), daemon=True) if consumer else None
    if reader:
        reader.start()
        time.sleep(2)  # subscribed before the load
    prof = Profile(name, pid) if profile else None
    t0 = time.monotonic()
    tps, _ = pgbench(pg, emit_script(topic, per_txn), duration=duration, clients=clients, rate=rate)
    t_load = time.monotonic() - t0
    rig.drain(pg, timeout_ms=600_000)
    t_all = time.monotonic() - t0
    if prof:
        prof.stop()
    time.sleep(2 if reader else 0)  # the consumer's last fetches
    stop.set()
    w.join()
    if reader:
        reader.join(30)
    cpu = worker_cpu_seconds(pid) - cpu0
    in_kafka = broker.topic_counts(topic)
    with pg.connect() as c:
        n, p50, p95, p99, mx = c.execute("SELECT * FROM outbox_relay_latency()").fetchone()
        linger = c.execute("SHOW outbox.linger_ms").fetchone()[0]
    status = rig.relay_status(pg)
    rig.log(f"{name}: {in_kafka} events in Kafka, load {t_load:.1f} s + drain {t_all - t_load:.1f} s")
    return {
        "name": name, "per_txn": per_txn, "commit_eps": tps * per_txn, "events": in_kafka,
        "published": status["events_published"] - pub0,
        "eps": in_kafka / t_all, "load_s": t_load, "drain_s": t_all - t_load,
        "p50_ms": p50 / 1000 if p50 else None, "p95_ms": p95 / 1000 if p95 else None, "p99_ms": p99 / 1000 if p99 else None,
        "samples": n, "max_lag_mb": lag["max"] / 1e6, "cpu_s": cpu, "cpu_pct": 100 * cpu / t_all,
        "cpu_us_per_event": 1e6 * cpu / in_kafka if in_kafka else None,
        "rss_mb": status["peak_rss_kb"] / 1024, "linger": linger,
        "profile": prof.top() if prof else [], "outside": outside,
    }


def consume_latency(broker, topic, stop, out):
    """An outside consumer: receive time minus the record's timestamp (the
    transaction's commit time, ms, same clock)."""
    from confluent_kafka import Consumer

    c = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": f"bench-{uuid.uuid4()}", "auto.offset.reset": "earliest",
                  "enable.auto.commit": False, "fetch.wait.max.ms": 5})
    c.subscribe([topic])
    lat = []
    while not stop.is_set():
        m = c.poll(0.1)
        if m is None or m.error():
            continue
        lat.append(time.time() * 1000 - m.timestamp()[1])
    c.close()
    lat.sort()
    q = lambda f: lat[min(len(lat) - 1, int(f * len(lat)))] if lat else None  # noqa: E731
    out.update(n=len(lat), p50=q(0.5), p95=q(0.95), p99=q(0.99))


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
    lat = []
    published = 0
    with pg.connect(autocommit=False) as c:
        while True:
            rows = c.execute(
                "SELECT id, aggregateid, type, payload::text, extract(epoch FROM created_at) FROM outbox_poll "
                "WHERE published_at IS NULL ORDER BY id LIMIT 100 FOR UPDATE SKIP LOCKED").fetchall()
            for _id, key, typ, payload, _ in rows:
                p.produce(topic, key=key, value=payload, headers=[("type", typ)])
            p.flush(60)
            acked = time.time()
            if rows:
                c.execute("UPDATE outbox_poll SET published_at = now() WHERE id = ANY(%s)", ([r[0] for r in rows],))
                lat.extend(acked - float(r[4]) for r in rows)
                published += len(rows)
            c.commit()
            if len(rows) < 100:
                if stop.is_set() and not rows:
                    break
                time.sleep(0.1)
    result.update(published=published, lat=lat)


def polling_run(pg, broker, rate=None, duration=DURATION):
    topic = f"bench.polling.{uuid.uuid4().hex[:6]}"
    broker.create_topic(topic, partitions=6)
    with pg.connect() as c:
        c.execute(POLL_TABLE)
        c.execute("TRUNCATE outbox_poll")
    script = f"""\\set aid random(1, 100000)
BEGIN;
INSERT INTO orders (customer, payload) VALUES (:aid, '{PAYLOAD}');
INSERT INTO outbox_poll (aggregatetype, aggregateid, type, payload) VALUES ('Order', :aid, 'OrderPlaced', '{PAYLOAD}');
COMMIT;
"""
    stop, result = threading.Event(), {}
    relay = threading.Thread(target=polling_relay, args=(pg, broker, topic, stop, result))
    t0 = time.monotonic()
    relay.start()
    tps, _ = pgbench(pg, script, duration=duration, rate=rate)
    stop.set()
    relay.join()
    t_all = time.monotonic() - t0
    lat = sorted(result["lat"])
    q = lambda f: lat[min(len(lat) - 1, int(f * len(lat)))] * 1000 if lat else None  # noqa: E731
    return {"name": "polling" + ("-light" if rate else ""), "commit_eps": tps, "events": broker.topic_counts(topic),
            "eps": result["published"] / t_all, "p50_ms": q(0.5), "p95_ms": q(0.95), "p99_ms": q(0.99)}


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
        c.execute("CREATE TABLE IF NOT EXISTS outbox_plain (LIKE outbox INCLUDING DEFAULTS INCLUDING INDEXES)")
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
            tps, lat = pgbench(pg, script, duration=max(4, DURATION // 2), clients=1)
            if name not in res or tps > res[name][0]:
                res[name] = (tps, lat)
    return res


def fmt(v, f="{:.0f}"):
    return "-" if v is None else f.format(v)


def main():
    rig.install_extension(release=True)
    memory = os.environ.get("BENCH_BROKER", "memory") == "memory" and os.access(os.environ.get("OUTBOX_BENCH_TANSU", ""), os.X_OK)
    broker = rig.Broker(port=rig.KAFKA_PORT, binary=os.environ["OUTBOX_BENCH_TANSU"], storage="memory://tansu/") if memory \
        else rig.Broker(port=rig.KAFKA_PORT)
    broker.reset()
    broker.start()
    pg = rig.Postgres()
    pg.init({"max_connections": "100", "shared_buffers": "'256MB'", "logical_decoding_work_mem": "'64MB'"})
    pg.start()
    pg.create_database()
    try:
        with pg.connect() as c:
            c.execute("CREATE EXTENSION outbox")
            c.execute("CREATE TABLE orders (id bigserial PRIMARY KEY, customer text, payload jsonb)")
        rig.wait_for_relay(pg)
        rows = [broker_baseline(broker), broker_baseline(broker, rate=1000)]
        # Ceiling: the relay off, the same load.
        relay_off(pg)
        tps, _ = pgbench(pg, emit_script("bench.ceiling", 1))
        rows.append({"name": "ceiling-1 (relay off)", "commit_eps": tps})
        tps100, _ = pgbench(pg, emit_script("bench.ceiling", 100))
        rows.append({"name": "ceiling-100 (relay off)", "commit_eps": tps100 * 100})
        with pg.connect() as c:
            c.execute("SELECT pg_drop_replication_slot('outbox')")  # the backlog of the ceiling runs is not ours to measure
        relay_on(pg)
        # An outside consumer reads while the relay produces: commit-to-
        # consumer latency. Only with the in-memory broker: tansu's sqlite
        # engine stalls then (fetches time out after 60 s, the producer waits).
        rows.append(relay_run(pg, broker, "light-1k-per-s", 1, rate=1000, clients=2, consumer=memory))
        rows.append(relay_run(pg, broker, "relay-1", 1))
        rows.append(relay_run(pg, broker, "relay-100", 100, profile=True))
        relay_off(pg)
        rows.append(polling_run(pg, broker))
        rows.append(polling_run(pg, broker, rate=1000))
        cost = emit_cost(pg)
        calls = call_cost(pg)
        relay_on(pg)
    finally:
        pg.stop(check=False)
        broker.stop()

    print("\n## outbox benchmark", time.strftime("%Y-%m-%d %H:%M"), f"({os.cpu_count()} cores, {DURATION} s per run, {CLIENTS} clients, "
          f"broker: tansu 0.6 {'in memory' if memory else 'sqlite'})")
    print(f"\n| scenario | committed events/s | events in Kafka | end-to-end events/s | commit→ack p50 / p95 / p99 ms | max slot lag MB | worker CPU % | worker CPU µs/event | worker peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {fmt(r.get('commit_eps'))} | {fmt(r.get('events'))} | {fmt(r.get('eps'))} | "
              f"{fmt(r.get('p50_ms'), '{:.2f}')} / {fmt(r.get('p95_ms'), '{:.2f}')} / {fmt(r.get('p99_ms'), '{:.2f}')} | "
              f"{fmt(r.get('max_lag_mb'), '{:.1f}')} | {fmt(r.get('cpu_pct'))} | {fmt(r.get('cpu_us_per_event'), '{:.1f}')} | {fmt(r.get('rss_mb'))} |")
    by = {r["name"]: r for r in rows}
    r1, c1 = by["relay-1"], by["ceiling-1 (relay off)"]
    r100, c100 = by["relay-100"], by["ceiling-100 (relay off)"]
    pol, light, pol_light = by["polling"], by["light-1k-per-s"], by["polling-light"]
    print("\n| ratio | value |\n|---|---|")
    print(f"| relay-1 end-to-end / ceiling-1 commits | {r1['eps'] / c1['commit_eps']:.2f} |")
    print(f"| relay-100 end-to-end / ceiling-100 commits | {r100['eps'] / c100['commit_eps']:.2f} |")
    print(f"| relay-1 end-to-end / polling relay | {r1['eps'] / pol['eps']:.1f}x |")
    b = by["broker alone"]
    print(f"| relay-100 end-to-end / broker alone (producer at full speed) | {r100['eps'] / b['eps']:.2f} |")
    if light.get("p50_ms") and pol_light.get("p50_ms"):
        print(f"| polling p50 / relay p50 at 1k events/s | {pol_light['p50_ms'] / light['p50_ms']:.1f}x lower latency |")
    print(f"| linger.ms | {light['linger']} |")
    o = light.get("outside") or {}
    if o.get("n"):
        print(f"| commit→outside consumer at 1k events/s, p50 / p95 / p99 ms ({o['n']} events) | "
              f"{o['p50']:.1f} / {o['p95']:.1f} / {o['p99']:.1f} |")
    base = cost["business write only"][0]
    print("\n| producing transaction (1 client) | tps | latency ms |\n|---|---|---|")
    for k, (tps, lat) in cost.items():
        print(f"| {k} | {tps:.0f} | {fmt(lat, '{:.3f}')} |")
    e, t = cost["+ outbox_emit()"], cost["+ INSERT outbox table"]
    print(f"\noutbox_emit() transaction / outbox-table INSERT transaction, throughput: {e[0] / t[0]:.2f} "
          f"(business write alone: {base:.0f} tps)")
    print("\n| one call, user CPU of the backend (least of 5 x 300k) | µs |\n|---|---|")
    for k, us in calls.items():
        print(f"| {k} | {us:.2f} |")
    if r100.get("profile"):
        print("\n| profile: the relay worker's process during relay-100 (perf, cpu-clock, all its threads) | % of samples |\n|---|---|")
        for pct, dso, sym in r100["profile"]:
            print(f"| `{sym}` ({dso}) | {pct:.1f} |")


if __name__ == "__main__":
    sys.exit(main())
