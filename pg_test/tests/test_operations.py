"""Operations: the status view against reality, the WAL guard, dead letters
with real rejections, an invalidated slot, least privilege."""

import json
import time

import rig
from helpers import insert_dead_letter, sqlstate_of
from test_relay_limits import emit, set_conf


def status(db):
    return rig.relay_status(db)


def tick_restart_lsn(c):
    """restart_lsn moves at running-xacts records: a checkpoint logs one,
    and a write after it lets the relay read past it."""
    c.execute("CHECKPOINT")
    c.execute("SELECT txid_current()")


def retained(c) -> float:
    return float(c.execute(
        "SELECT pg_current_wal_insert_lsn() - restart_lsn FROM pg_replication_slots WHERE slot_name = 'outbox'"
    ).fetchone()[0])


def settle_restart_lsn(db, c, below: int = 512 * 1024):
    rig.drain(db)
    rig.wait_for("restart_lsn to catch up", lambda: (tick_restart_lsn(c), rig.drain(db), retained(c) < below)[-1],
                 timeout=30, interval=0.3)


def test_status_view_tracks_lag_and_counts_what_was_consumed(db, broker):
    topic = rig.unique_topic("status")
    with db.connect() as c:
        # The relay learns the topic while the broker is up, and the broker
        # learns the producer on each partition the keys below go to: until
        # it has, a partition takes one event at a time (the first-write
        # barrier), and the rest would wait in the relay, not in flight.
        for k in range(4):
            emit(c, topic, f"k{k}", {"n": -1})
    rig.drain(db)
    before = status(db)
    broker.stop()
    try:
        ids = []
        with db.connect() as c:
            for i in range(20):
                ids.append(emit(c, topic, f"k{i % 4}", {"n": i, "pad": "p" * (i * 7)}))
        time.sleep(4.5)
        during = status(db)
        assert during["events_in_flight"] == 20, during
        assert during["lag_seconds"] > 4.0, during
        assert during["lag_bytes"] > 0 and during["retained_wal_bytes"] >= during["lag_bytes"] - 8192, during
        assert during["state"] == "waiting for broker" and during["broker_reachable"] is False, during
    finally:
        broker.start()
    rig.drain(db)
    after = status(db)
    assert after["events_in_flight"] == 0 and after["lag_seconds"] == 0.0, after
    assert after["lag_bytes"] < 1024 * 1024, after
    assert after["state"] == "streaming" and after["broker_reachable"] is True
    got = [m for m in broker.consume(topic, expect=24, timeout=30, linger=1) if m["headers"]["id"] in {str(i) for i in ids}]
    assert sorted(m["headers"]["id"] for m in got) == sorted(str(i) for i in ids)
    assert after["events_published"] - before["events_published"] == len(got) == 20
    assert after["bytes_published"] - before["bytes_published"] == sum(len(m["key"]) + len(m["value"]) for m in got)
    assert after["retries"] >= before["retries"]
    assert after["slot_name"] == "outbox" and after["pid"] == rig.relay_pid(db)


def test_wal_guard_refuses_events_past_the_limit_and_recovers(db, broker):
    topic = rig.unique_topic("guard")
    with db.connect() as c:
        emit(c, topic, "warm", {"n": -1})
        settle_restart_lsn(db, c)
    set_conf(db, "outbox.max_retained_wal", "1MB")
    broker.stop()
    accepted, refused = [], None
    try:
        rig.wait_for("the reload", lambda: db.connect().execute("SHOW outbox.max_retained_wal").fetchone()[0] == "1MB")
        with db.connect() as c:
            for i in range(60):
                try:
                    accepted.append(emit(c, topic, "k", {"n": i, "blob": "x" * 100_000}))
                except Exception as e:  # noqa: BLE001 - inspected below
                    refused = e
                    break
            assert refused is not None, "the guard never refused"
            assert refused.sqlstate == "53400", refused
            msg = str(refused)
            assert "outbox.max_retained_wal allows 1.0 MB" in msg and "retains" in msg, msg
            assert "outbox_status" in refused.diag.message_hint
            # The table path is guarded the same way.
            e = sqlstate_of(c, "INSERT INTO outbox.outbox (aggregatetype, aggregateid, type, payload) VALUES ('A', '1', 'T', '{}')")
            assert e.sqlstate == "53400"
            assert 8 <= len(accepted) <= 12, len(accepted)  # ~1 MB of 100 kB events
        rig.wait_for("the relay's warning", lambda: "past outbox.max_retained_wal" in db.log_text(), timeout=10)
        assert status(db)["retained_wal_bytes"] >= 1024 * 1024
    finally:
        broker.start()
    rig.drain(db)
    with db.connect() as c:
        # Once the backlog is published (and restart_lsn has moved), events are accepted again.
        def try_emit():
            tick_restart_lsn(c)
            rig.drain(db)
            try:
                return emit(c, topic, "k", {"n": "after"})
            except Exception:  # noqa: BLE001
                return None
        after = rig.wait_for("the guard to let events through", try_emit, timeout=30, interval=0.3)
    set_conf(db, "outbox.max_retained_wal", None)
    rig.drain(db)
    got = broker.consume(topic, expect=len(accepted) + 2, timeout=60, linger=1)
    ids = [m["headers"]["id"] for m in got]
    assert ids[1:] == [str(a) for a in accepted] + [str(after)], "nothing accepted is lost, in order"


def dead_letters(c):
    cur = c.execute("SELECT id::text, aggregateid, type, payload, topic, reason, commit_lsn::text, committed_at FROM outbox_dead_letter ORDER BY commit_lsn")
    return [dict(zip([d.name for d in cur.description], r)) for r in cur.fetchall()]


def test_too_large_event_is_dead_lettered_stream_goes_on_then_republished(db, broker):
    topic = rig.unique_topic("dltoolarge")
    with db.connect() as c:
        assert c.execute("SHOW outbox.on_rejected_event").fetchone()[0] == "dead_letter"
        c.execute("DELETE FROM outbox_dead_letter")
        emit(c, topic, "k", {"n": 0})
    rig.drain(db)
    before = status(db)
    # A real rejection: the producer's own size limit below the event's size.
    set_conf(db, "outbox.kafka_properties", "message.max.bytes=20000", restarts_relay=True)
    try:
        with db.connect() as c:
            big = emit(c, topic, "k", {"blob": "x" * 30000, "n": 1})
            later = emit(c, topic, "k", {"n": 2})
        rig.drain(db)  # the stream went on past the rejected event
        got = broker.consume(topic, expect=2, timeout=30, linger=1)
        assert [json.loads(m["value"])["n"] for m in got] == [0, 2]
        with db.connect() as c:
            dl = dead_letters(c)
        assert len(dl) == 1 and dl[0]["id"] == str(big) and dl[0]["topic"] == topic, dl
        assert "too large" in dl[0]["reason"].lower() and dl[0]["aggregateid"] == "k"
        assert dl[0]["payload"] == {"blob": "x" * 30000, "n": 1}
        s = status(db)
        assert s["dead_letters"] - before["dead_letters"] == 1 and str(big) in s["last_error"]
        assert s["state"] == "streaming"
    finally:
        set_conf(db, "outbox.kafka_properties", None, restarts_relay=True)  # the fix
    with db.connect() as c:
        assert c.execute("SELECT outbox_dead_letter_republish()").fetchone()[0] == 1
        assert dead_letters(c) == []
        e = sqlstate_of(c, "SELECT outbox_dead_letter_republish(%s)", (str(big),))
        assert e.sqlstate == "P0002"
    rig.drain(db)
    got = broker.consume(topic, expect=3, timeout=30, linger=1)
    assert [json.loads(m["value"])["n"] for m in got] == [0, 2, 1]
    assert got[2]["headers"]["id"] == str(big) and got[1]["headers"]["id"] == str(later)


def test_missing_topic_is_dead_lettered_other_topics_flow_then_republished(db, broker):
    missing, other = rig.unique_topic("dlmissing"), rig.unique_topic("dlother")
    set_conf(db, "outbox.topic_creation", "off")
    try:
        broker.create_topic(other, partitions=1)
        rig.wait_for("reload", lambda: db.connect().execute("SHOW outbox.topic_creation").fetchone()[0] == "off")
        with db.connect() as c:
            c.execute("DELETE FROM outbox_dead_letter")
            first = emit(c, missing, "a", {"n": 1})
            with c.transaction():
                second = emit(c, missing, "b", {"n": 2})
                flowing = emit(c, other, "a", {"n": 3})
        rig.drain(db)
        assert [m["headers"]["id"] for m in broker.consume(other, expect=1, timeout=30)] == [str(flowing)]
        with db.connect() as c:
            dl = dead_letters(c)
        assert [d["id"] for d in dl] == [str(first), str(second)]
        reason = f'topic "{missing}" does not exist and outbox.topic_creation is off'
        assert all(d["reason"] == reason and d["topic"] == missing for d in dl)
        broker.create_topic(missing, partitions=2)  # the operator's fix
        with db.connect() as c:
            assert c.execute("SELECT outbox_dead_letter_republish(%s)", (str(second),)).fetchone()[0] == 1
            assert c.execute("SELECT outbox_dead_letter_republish()").fetchone()[0] == 1
        rig.drain(db)
    finally:
        set_conf(db, "outbox.topic_creation", None)
    got = broker.consume(missing, expect=2, timeout=30, linger=1)
    assert sorted(m["headers"]["id"] for m in got) == sorted([str(first), str(second)])


def test_republish_is_transactional_and_superuser_only(db, broker):
    topic = rig.unique_topic("dltx")
    with db.connect() as c:
        c.execute("DELETE FROM outbox_dead_letter")
        insert_dead_letter(c, "0190b3c4-0000-7000-8000-000000000001", topic, "9", "Placed", {"n": 1})
    with db.connect(autocommit=False) as t:
        assert t.execute("SELECT outbox_dead_letter_republish()").fetchone()[0] == 1
        t.rollback()  # nothing re-published, the letter stays
    with db.connect() as c:
        assert len(dead_letters(c)) == 1
        assert c.execute("SELECT outbox_dead_letter_republish()").fetchone()[0] == 1
    rig.drain(db)
    got = broker.consume(topic, expect=1, timeout=30, linger=1)
    assert [m["headers"]["id"] for m in got] == ["0190b3c4-0000-7000-8000-000000000001"]
    assert got[0]["key"] == b"9" and json.loads(got[0]["value"]) == {"n": 1}


def test_invalidated_slot_is_reported_and_recovered_by_dropping_it(db, broker):
    with db.connect() as c:
        c.execute("CREATE TABLE IF NOT EXISTS busy (id serial, pad text)")
    set_conf(db, "max_slot_wal_keep_size", "1MB")
    set_conf(db, "outbox.relay_enabled", "off")
    try:
        rig.wait_for_relay(db, state="disabled")
        with db.connect() as c:
            for _ in range(16):
                c.execute("INSERT INTO busy (pad) SELECT repeat('x', 500) FROM generate_series(1, 5000)")
            c.execute("SELECT pg_switch_wal()")
            c.execute("CHECKPOINT")
            rig.wait_for("the slot to be invalidated", lambda: (c.execute("CHECKPOINT"), c.execute(
                "SELECT wal_status FROM pg_replication_slots WHERE slot_name = 'outbox'").fetchone()[0] == "lost")[-1],
                timeout=30, interval=0.5)
            e = sqlstate_of(c, "SELECT outbox_emit('A', '1', 'T', '{}')")
            assert e.sqlstate == "55000" and "has been invalidated" in str(e)
        set_conf(db, "outbox.relay_enabled", None)
        s = rig.wait_for_relay(db, state="slot invalidated", timeout=30)
        assert "pg_drop_replication_slot('outbox')" in s["last_error"] and "runbook" in s["last_error"]
        starts = s["worker_starts"]
        time.sleep(2.5)
        assert status(db)["worker_starts"] == starts, "waits, does not crash-loop"
        # The runbook's recovery: drop the slot; the relay creates a new one.
        with db.connect() as c:
            c.execute("SELECT pg_drop_replication_slot('outbox')")
        rig.wait_for_relay(db, timeout=30)
    finally:
        set_conf(db, "max_slot_wal_keep_size", None)
        set_conf(db, "outbox.relay_enabled", None)
    topic = rig.unique_topic("afterinval")
    with db.connect() as c:
        new = rig.wait_for("the new slot to accept events", lambda: emit(c, topic, "k", {"n": 1}), timeout=30)
    rig.drain(db)
    assert [m["headers"]["id"] for m in broker.consume(topic, expect=1, timeout=30)] == [str(new)]


def test_forged_messages_never_reach_kafka(db, broker):
    """Any role may call pg_logical_emit_message(); a message with our prefix
    that outbox_emit() did not sign is skipped by the relay, not published."""
    topic = rig.unique_topic("forged")
    with db.connect() as admin:
        admin.execute("DROP ROLE IF EXISTS forger2")
        admin.execute("CREATE ROLE forger2 LOGIN")
        real = emit(admin, topic, "k", {"n": 1})
    rig.drain(db)
    before = status(db)
    f = db.connect(user="forger2")
    f.execute("SELECT pg_logical_emit_message(true, 'outbox', %s::bytea)", (b"\x01" + b"\x00" * 16 + b"\x11" * 40,))
    f.execute("SELECT pg_logical_emit_message(true, 'outbox', 'forged text')")
    f.close()
    with db.connect() as admin:
        after = emit(admin, topic, "k", {"n": 2})
    rig.drain(db)
    now = status(db)
    assert now["events_published"] - before["events_published"] == 1
    # Neither is an event (a made-up tag over a malformed body, and text):
    # counted, not dead-lettered, not published.
    assert now["forged_messages"] - before["forged_messages"] == 2
    assert now["dead_letters"] == before["dead_letters"] and now["unverified_events"] == before["unverified_events"]
    assert [m["headers"]["id"] for m in broker.consume(topic, expect=2, timeout=30, linger=1)] == [str(real), str(after)]
