"""Faults under a steady load, each ending with a full comparison of what
committed against what Kafka holds: 0 lost, per-aggregate order kept,
duplicates only of commits after the last persisted confirmed position."""

import signal
import time

import rig
from load import Load, compare


def finish(db, broker, load, topic, label):
    rig.drain(db, timeout_ms=120_000)
    got = broker.consume(topic, expect=len(load.committed), timeout=60, linger=1.5)
    dups = compare(load, got)
    print(f"\n[{label}] committed={len(load.committed)} uncertain={len(load.uncertain)} "
          f"published={len(got)} duplicates={dups}")
    return dups


def test_kill_9_of_the_worker_mid_stream(db, broker):
    topic = rig.unique_topic("kill9")
    with Load(db, topic) as load:
        load.wait_for(300)
        pid = rig.relay_pid(db)
        t0 = time.monotonic()
        db.kill_backend(pid, signal.SIGKILL)  # the postmaster then resets the whole cluster
        rig.wait_for_relay(db)
        print(f"\n[kill -9 relay] streaming again {time.monotonic() - t0:.1f} s after the kill")
        n = len(load.committed)
        load.wait_for(n + 300)
    finish(db, broker, load, topic, "kill -9 relay")
    assert rig.relay_pid(db) != pid


def test_server_immediate_stop_and_start_mid_stream(db, broker):
    topic = rig.unique_topic("crash")
    with Load(db, topic) as load:
        load.wait_for(300)
        db.crash()
        time.sleep(0.5)
        t0 = time.monotonic()
        db.start()
        rig.wait_for_relay(db)
        print(f"\n[immediate stop] streaming again {time.monotonic() - t0:.1f} s after pg_ctl start")
        n = len(load.committed)
        load.wait_for(n + 300)
    finish(db, broker, load, topic, "pg_ctl stop -m immediate")


def test_broker_down_longer_than_message_timeout(db, broker):
    """The relay forces message.timeout.ms=0: a user's 2 s (applied, the
    outage would expire messages) is ignored with a warning, and an outage
    four times as long loses nothing."""
    topic = rig.unique_topic("outage")
    with db.connect() as c:
        c.execute("ALTER SYSTEM SET outbox.kafka_properties = 'message.timeout.ms=2000'")
    db.reload()
    try:
        rig.wait_for("the relay to restart with the new producer settings",
                     lambda: "ignoring \"message.timeout.ms\"" in db.log_text(), timeout=30)
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
