"""Faults under a steady load, each ending with a full comparison of what
committed against what Kafka holds: 0 lost, per-aggregate order kept,
duplicates only of commits after the last persisted confirmed position."""

import json
import re
import signal
import time
import uuid

import rig
from helpers import lsn_int, sqlstate_of
from load import Load, compare


def finish(db, broker, load, topic, label, witness=None, log_from=0):
    rig.drain(db, timeout_ms=120_000)
    got = broker.consume(topic, expect=len(load.committed), timeout=60, linger=1.5)
    dups = compare(load, got)
    print(f"\n[{label}] committed={len(load.committed)} uncertain={len(load.uncertain)} "
          f"published={len(got)} duplicates={dups}")
    if witness:
        check_duplicates_after_resume_point(db, witness, got, log_from)
    return dups


def check_duplicates_after_resume_point(db, witness, got, log_from):
    """Every duplicate belongs to a transaction that committed after the
    position the relay resumed from (its last persisted confirmation, which
    it logs at start); the witness slot, never consumed, gives each event's
    commit LSN."""
    with db.connect() as c:
        rows = c.execute("SELECT data FROM pg_logical_slot_get_changes(%s, NULL, NULL)", (witness,)).fetchall()
        c.execute("SELECT pg_drop_replication_slot(%s)", (witness,))
    commit_lsn = {}
    for (data,) in rows:
        ev = json.loads(data)
        commit_lsn[ev["id"]] = lsn_int(ev["commit_lsn"])
    starts = re.findall(r'outbox relay: streaming slot "outbox" from ([0-9A-F]+/[0-9A-F]+)', db.log_text()[log_from:])
    assert starts, "the relay logged no resume position after the fault"
    resumed_from = lsn_int(starts[0])
    seen, dup_ids = set(), set()
    for m in got:
        i = m["headers"]["id"]
        (dup_ids if i in seen else seen).add(i)
    for i in dup_ids:
        assert commit_lsn[i] > resumed_from, f"event {i} duplicated though committed before the resume point"
    print(f"  duplicates all committed after the resume point {starts[0]} ({len(dup_ids)} events)")


def witness_slot(db):
    name = f"witness_{uuid.uuid4().hex[:8]}"
    with db.connect() as c:
        c.execute("SELECT pg_create_logical_replication_slot(%s, 'outbox')", (name,))
    return name


def test_kill_9_of_the_worker_mid_stream(db, broker):
    topic = rig.unique_topic("kill9")
    witness = witness_slot(db)
    with Load(db, topic) as load:
        load.wait_for(300)
        pid = rig.relay_pid(db)
        t0 = time.monotonic()
        log_from = len(db.log_text())
        db.kill_backend(pid, signal.SIGKILL)  # the postmaster then resets the whole cluster
        rig.wait_for_relay(db)
        print(f"\n[kill -9 relay] streaming again {time.monotonic() - t0:.1f} s after the kill")
        n = len(load.committed)
        load.wait_for(n + 300)
    finish(db, broker, load, topic, "kill -9 relay", witness, log_from)
    assert rig.relay_pid(db) != pid


def test_server_immediate_stop_and_start_mid_stream(db, broker):
    topic = rig.unique_topic("crash")
    witness = witness_slot(db)
    with Load(db, topic) as load:
        load.wait_for(300)
        log_from = len(db.log_text())
        db.crash()
        time.sleep(0.5)
        t0 = time.monotonic()
        db.start()
        rig.wait_for_relay(db)
        print(f"\n[immediate stop] streaming again {time.monotonic() - t0:.1f} s after pg_ctl start")
        n = len(load.committed)
        load.wait_for(n + 300)
    finish(db, broker, load, topic, "pg_ctl stop -m immediate", witness, log_from)


def test_broker_down_longer_than_message_timeout(db, broker):
    """The relay forces message.timeout.ms=0 (never expire): a user's 2 s,
    under either of its names, is refused when set, and an outage far longer
    than 2 s loses nothing."""
    topic = rig.unique_topic("outage")
    with db.connect() as c:
        for name in ("message.timeout.ms", "delivery.timeout.ms", "topic.delivery.timeout.ms"):
            e = sqlstate_of(c, f"ALTER SYSTEM SET outbox.kafka_properties = '{name}=2000'")
            assert e.sqlstate == "22023" and "cannot be set" in str(e), str(e)
    try:
        rig.wait_for_relay(db)
        with Load(db, topic) as load:
            load.wait_for(200)
            broker.stop()
            time.sleep(2)
            n = len(load.committed)
            load.wait_for(n + 100)
            status = rig.wait_for_relay(db, state="waiting for broker", timeout=30)
            assert status["events_in_flight"] > 0 and not status["broker_reachable"]
            time.sleep(5)
            broker.start()
            rig.wait_for_relay(db, timeout=60)
            n = len(load.committed)
            load.wait_for(n + 100)
        finish(db, broker, load, topic, "broker down 8 s")
    finally:
        with db.connect() as c:
            c.execute("ALTER SYSTEM RESET outbox.kafka_properties")
        db.reload()
        broker.start()
        rig.wait_for_relay(db)
