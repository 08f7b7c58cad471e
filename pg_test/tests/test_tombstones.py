"""Tombstones from outbox_emit() (outbox.tombstones): a NULL payload is
published as a Kafka record with a null value and the event's key, for
compacted topics; refused while the setting is off. (Adopted tables have the
router's own option: tests/test_adopted_tables.py.)"""

import json

import rig
from helpers import decoded, scratch_slot, sqlstate_of, with_relay_restarted


def emit(c, topic, key, payload):
    return str(c.execute("SELECT outbox_emit('Customer', %s, 'CustomerForgotten', %s::jsonb, '{}'::jsonb, %s)",
                         (key, None if payload is None else json.dumps(payload), topic)).fetchone()[0])


def test_a_null_payload_is_refused_unless_tombstones_are_on(db):
    with db.connect() as c:
        e = sqlstate_of(c, "SELECT outbox_emit('Customer', 'c1', 'CustomerForgotten', NULL)")
        assert e.sqlstate == "22004" and "must not be NULL" in str(e) and "outbox.tombstones" in (e.diag.message_hint or "")


def test_tombstones_are_null_values_with_the_key_and_the_headers(db, broker):
    topic = rig.unique_topic("tomb")
    try:
        with_relay_restarted(db, tombstones="on", cloudevents="binary")
        with db.connect() as c, scratch_slot(c) as slot:
            live = emit(c, topic, "c1", {"name": "Ada"})
            gone = emit(c, topic, "c1", None)
            rows = decoded(c, slot)
        assert [(r["id"], r["payload"], r.get("tombstone")) for r in rows] == [
            (live, {"name": "Ada"}, None), (gone, None, True)]
        rig.drain(db)
        first, second = broker.consume(topic, expect=2, timeout=30, linger=0.5)
        assert (first["key"], json.loads(first["value"])) == (b"c1", {"name": "Ada"})
        assert first["headers"]["ce_id"] == live, "CloudEvents applies to events with a payload"
        assert (second["key"], second["value"]) == (b"c1", None), "a tombstone: the key, a null value"
        assert (second["headers"]["id"], second["headers"]["type"]) == (gone, "CustomerForgotten")
        assert not [h for h in second["headers"] if h.startswith("ce_") or h == "content-type"], \
            "a tombstone carries no CloudEvent"
    finally:
        with_relay_restarted(db, tombstones=None, cloudevents=None)


def test_a_dead_lettered_tombstone_is_published_again_as_one(db, broker):
    topic = rig.unique_topic("tombdl")
    try:
        with_relay_restarted(db, tombstones="on", topic_creation="off")
        with db.connect() as c:
            gone = emit(c, topic, "c2", None)
        rig.drain(db)
        with db.connect() as c:
            payload, aggregateid, reason = c.execute(
                "SELECT payload, aggregateid, reason FROM outbox_dead_letter WHERE id = %s", (gone,)).fetchone()
            assert (payload, aggregateid) == (None, "c2") and topic in reason
        with_relay_restarted(db, topic_creation=None)
        with db.connect() as c:
            assert c.execute("SELECT outbox_dead_letter_republish(%s)", (gone,)).fetchone()[0] == 1
        rig.drain(db)
        (m,) = broker.consume(topic, expect=1, timeout=30, linger=0.5)
        assert (m["key"], m["value"], m["headers"]["id"]) == (b"c2", None, gone)
    finally:
        with_relay_restarted(db, tombstones=None, topic_creation=None)
