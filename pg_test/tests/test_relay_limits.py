"""Rejections that retrying cannot fix, a very large transaction, and WAL
retention with no outbox traffic."""

import json
import time

import rig
from psycopg import sql


def emit(conn, topic, agg, payload=None, typ="T"):
    return conn.execute(
        "SELECT outbox_emit('Order', %s, %s, %s::jsonb, '{}', %s)", (agg, typ, json.dumps(payload or {}), topic)
    ).fetchone()[0]


def set_conf(db, name, value, restarts_relay=False):
    """ALTER SYSTEM + reload; with restarts_relay, waits for the relay's
    restart (producer settings changed, or resuming a stopped relay)."""
    pid = rig.relay_pid(db)
    with db.connect() as c:
        if value is None:
            c.execute(sql.SQL("ALTER SYSTEM RESET {}").format(sql.SQL(name)))
        else:
            c.execute(sql.SQL("ALTER SYSTEM SET {} = {}").format(sql.SQL(name), sql.Literal(value)))
    db.reload()
    if restarts_relay:
        rig.wait_for("the relay to restart", lambda: rig.relay_pid(db) not in (None, pid), timeout=30)
        rig.wait_for_relay(db)


def test_event_too_large_for_the_producer_stops_then_resumes_in_order(db, broker):
    """A real rejection: the producer's own size limit (message.max.bytes set
    below the event's size, which outbox.max_event_bytes allows)."""
    topic = rig.unique_topic("toolarge")
    with db.connect() as c:
        emit(c, topic, "k", {"n": 0})
    rig.drain(db)
    set_conf(db, "outbox.on_rejected_event", "stop")
    set_conf(db, "outbox.kafka_properties", "message.max.bytes=20000", restarts_relay=True)
    try:
        with db.connect() as c:
            big = emit(c, topic, "k", {"blob": "x" * 30000, "n": 1})
            after = [emit(c, topic, "k", {"n": i}) for i in range(2, 5)]
        status = rig.wait_for_relay(db, state="stopped on bad event", timeout=30)
        assert status["events_in_flight"] >= 1, "the refused event is held, never settled"
        log = db.log_text()
        assert f"Kafka rejected event {big}" in log and topic in log and "too large" in log.lower()
        with db.connect() as c:
            assert not c.execute("SELECT outbox_drain(1000)").fetchone()[0], "held behind the rejected event"
        assert [json.loads(m["value"])["n"] for m in broker.consume(topic, expect=1, timeout=5, linger=1)] == [0]
    finally:
        set_conf(db, "outbox.kafka_properties", None, restarts_relay=True)  # the fix + SIGHUP: resume
        set_conf(db, "outbox.on_rejected_event", None)
    rig.drain(db)
    got = broker.consume(topic, expect=5, timeout=30, linger=1)
    assert [json.loads(m["value"])["n"] for m in got] == [0, 1, 2, 3, 4]
    assert [m["headers"]["id"] for m in got[1:]] == [str(big)] + [str(a) for a in after]


def test_missing_topic_with_creation_off_stops_then_resumes(db, broker):
    topic = rig.unique_topic("nocreate")
    set_conf(db, "outbox.on_rejected_event", "stop")
    set_conf(db, "outbox.topic_creation", "off")
    try:
        rig.wait_for("reload", lambda: db.connect().execute("SHOW outbox.topic_creation").fetchone()[0] == "off")
        with db.connect() as c:
            first = emit(c, topic, "k", {"n": 1})
            second = emit(c, topic, "k", {"n": 2})
        status = rig.wait_for_relay(db, state="stopped on bad event", timeout=30)
        reason = f'topic "{topic}" does not exist and outbox.topic_creation is off'
        assert reason in db.log_text()
        assert str(first) in status["last_error"] and reason in status["last_error"]
        assert status["last_error_at"] is not None
        broker.create_topic(topic, partitions=2)  # the operator's fix
        pid = rig.relay_pid(db)
        with db.connect() as c:
            assert c.execute("SELECT outbox_relay_resume()").fetchone()[0] is True
        rig.wait_for("the relay to restart", lambda: rig.relay_pid(db) not in (None, pid), timeout=30)
        rig.wait_for_relay(db)
        rig.drain(db)
    finally:
        set_conf(db, "outbox.topic_creation", None)
        set_conf(db, "outbox.on_rejected_event", None)
    got = broker.consume(topic, expect=2, timeout=30, linger=1)
    assert [m["headers"]["id"] for m in got] == [str(first), str(second)]


def test_transaction_with_100k_events_is_published_with_bounded_memory(db, broker):
    topic = rig.unique_topic("big")
    broker.create_topic(topic, partitions=8)
    before = rig.relay_status(db)
    with db.connect() as c:
        ids = c.execute(
            "SELECT array_agg(outbox_emit('Big', (i %% 100)::text, 'T', jsonb_build_object('i', i), '{}', %s) ORDER BY i) "
            "FROM generate_series(1, 100000) AS i",
            (topic,),
        ).fetchone()[0]
    t0 = time.monotonic()
    rig.drain(db, timeout_ms=300_000)
    elapsed = time.monotonic() - t0
    after = rig.relay_status(db)
    got = broker.consume(topic, expect=100_000, timeout=180, linger=1)
    # Every event back, under its id, with its payload; per key in order.
    by_id = {m["headers"]["id"]: json.loads(m["value"])["i"] for m in got}
    assert len(by_id) == 100_000, f"{100_000 - len(by_id)} of 100000 events missing"
    assert {str(e): i for i, e in enumerate(ids, 1)} == by_id
    # Per key, first occurrences in partition order follow commit order
    # (a re-sent duplicate may come later; it does not count).
    per_key: dict[bytes, list[int]] = {}
    seen = set()
    for m in sorted(got, key=lambda m: (m["partition"], m["offset"])):
        if m["headers"]["id"] not in seen:
            seen.add(m["headers"]["id"])
            per_key.setdefault(m["key"], []).append(json.loads(m["value"])["i"])
    assert len(per_key) == 100
    for k, seq in per_key.items():
        assert seq == sorted(seq), f"key {k!r} out of order"
        assert all(i % 100 == int(k) for i in seq)
    assert after["events_published"] - before["events_published"] == len(got)
    print(f"\n[100k events in one transaction] drained in {elapsed:.1f} s "
          f"({100_000 / elapsed:.0f} events/s), {len(got)} records read back ({len(got) - 100_000} duplicates); "
          f"worker peak RSS {after['peak_rss_kb'] / 1024:.0f} MiB (before: {before['peak_rss_kb'] / 1024:.0f} MiB)")
    # 100k events of ~150 bytes is ~15 MB: the worker must not hold the
    # transaction, only librdkafka's bounded queue.
    assert after["peak_rss_kb"] - before["peak_rss_kb"] < 64 * 1024


def test_no_outbox_traffic_retains_bounded_wal(db):
    """Other writes only: the slot keeps confirming as it reads, so the WAL it
    retains (pg_current_wal_lsn() - restart_lsn) stays bounded."""
    with db.connect() as c:
        c.execute("CREATE TABLE IF NOT EXISTS busy (id serial, pad text)")
        start = c.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
        for _ in range(20):
            c.execute("INSERT INTO busy (pad) SELECT repeat('x', 500) FROM generate_series(1, 5000)")
        c.execute("CHECKPOINT")  # logs a running-xacts record: restart_lsn can move past it
        written = float(c.execute("SELECT pg_current_wal_lsn() - %s::pg_lsn", (start,)).fetchone()[0])
        c.execute("INSERT INTO busy (pad) VALUES ('tick')")
        rig.drain(db)

        def retained():
            c.execute("INSERT INTO busy (pad) VALUES ('tick')")
            c.execute("CHECKPOINT")
            return float(c.execute(
                "SELECT pg_current_wal_lsn() - restart_lsn FROM pg_replication_slots WHERE slot_name = 'outbox'"
            ).fetchone()[0])

        r = rig.wait_for("restart_lsn to catch up", lambda: (v := retained()) < 2 * 1024 * 1024 and v, timeout=30, interval=0.5)
        print(f"\n[no outbox traffic] wrote {written / 1e6:.1f} MB of WAL; slot retains {r / 1e3:.0f} kB")
