"""CloudEvents 1.0 on Kafka (outbox.cloudevents = binary | structured),
read back with the CloudEvents Python SDK's Kafka binding: attributes from
the event, the payload as data, the outbox headers kept. (RabbitMQ's modes
are in test_rabbitmq.py.)"""

import datetime
import json
import time

from cloudevents.core.bindings.kafka import KafkaMessage, from_binary, from_structured
from cloudevents.core.formats.json import JSONFormat
from psycopg import sql
import pytest

import rig
from helpers import sqlstate_of, with_relay_restarted

pytestmark = pytest.mark.one_major

TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def emit_one(pg, topic, key, payload, traceparent=None, headers=None):
    with pg.connect(autocommit=False) as c:
        if traceparent:
            c.execute("SELECT set_config('outbox.traceparent', %s, true)", (traceparent,))
        i = c.execute("SELECT outbox_emit('Order', %s, 'OrderPlaced', %s::jsonb, %s::jsonb, %s)",
                      (key, json.dumps(payload), json.dumps(headers or {"tenant": "t1"}), topic)).fetchone()[0]
        c.commit()
    return str(i)


def kafka_message(m) -> KafkaMessage:
    return KafkaMessage(headers={k: v.encode() for k, v in m["headers"].items()}, key=m["key"], value=m["value"])


def commit_time_ms(ev) -> int:
    return (ev.get_time() - datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)) // datetime.timedelta(milliseconds=1)


def dead_letter(pg, event_id):
    with pg.connect() as c:
        return c.execute("SELECT payload, headers, reason FROM outbox_dead_letter WHERE id = %s", (event_id,)).fetchone()


def test_kafka_binary_and_structured_modes(db, broker):
    topic = rig.unique_topic("ce")
    payload = {"total": 4200, "note": "say \"hi\"", "lines": [1, None]}
    try:
        with_relay_restarted(db, cloudevents="binary", cloudevents_source="https://shop.example/orders")
        a = emit_one(db, topic, "order-1", payload, traceparent=TP)
        rig.drain(db)
        (m,) = broker.consume(topic, expect=1, linger=0.5)
        ev = from_binary(kafka_message(m), JSONFormat())
        assert (ev.get_specversion(), ev.get_id(), ev.get_source(), ev.get_type(), ev.get_subject()) == (
            "1.0", a, "https://shop.example/orders", "OrderPlaced", "order-1")
        assert ev.get_datacontenttype() == "application/json" and ev.get_data() == payload
        assert ev.get_extension("partitionkey") == "order-1" and ev.get_extension("traceparent") == TP
        assert ev.get_time().tzinfo is not None and commit_time_ms(ev) == m["timestamp"], "time is the commit time"
        # The value is the payload itself; the key and the outbox headers stay.
        assert json.loads(m["value"]) == payload and m["key"] == b"order-1"
        h = m["headers"]
        assert (h["id"], h["type"], h["aggregatetype"], h["tenant"], h["traceparent"]) == (a, "OrderPlaced", "Order", "t1", TP)
        assert h["content-type"] == "application/json" and h["ce_time"].endswith("Z")
        assert h["ce_partitionkey"] == "order-1" and h["ce_traceparent"] == TP
        # An event header that would read as CloudEvents' is refused, in any case.
        bad = [emit_one(db, topic, "order-1", payload, headers={"CE_Tenant": "x"}),
               emit_one(db, topic, "order-1", payload, headers={"Content-Type": "text/plain"})]
        rig.drain(db)
        for i, name in zip(bad, ["CE_Tenant", "Content-Type"]):
            reason = dead_letter(db, i)[2]
            assert f'header "{name}" collides with CloudEvents' in reason, reason

        with_relay_restarted(db, cloudevents="structured", cloudevents_source=None)
        b = emit_one(db, topic, "order-1", payload)
        rig.drain(db)
        m = broker.consume(topic, expect=2, linger=0.5)[1]
        assert m["headers"]["content-type"] == "application/cloudevents+json; charset=UTF-8"
        assert not [k for k in m["headers"] if k.startswith("ce_")], "structured mode sends no attribute headers"
        ev = from_structured(kafka_message(m), JSONFormat())
        assert (ev.get_id(), ev.get_source(), ev.get_type(), ev.get_subject()) == (b, f"/outbox/{rig.DATABASE}", "OrderPlaced", "order-1")
        assert ev.get_data() == payload and commit_time_ms(ev) == m["timestamp"]
        assert ev.get_extension("traceparent") is None
        # data is the payload as a JSON value, not a string.
        assert json.loads(m["value"])["data"] == payload
        assert m["key"] == b"order-1" and m["headers"]["id"] == b
    finally:
        with_relay_restarted(db, cloudevents=None, cloudevents_source=None)
    # Off again: the value is the payload, no CloudEvents header.
    c = emit_one(db, topic, "order-1", payload)
    rig.drain(db)
    m = broker.consume(topic, expect=3, linger=0.5)[2]
    assert m["headers"]["id"] == c and json.loads(m["value"]) == payload
    assert "content-type" not in m["headers"] and not [k for k in m["headers"] if k.startswith("ce_")]


def test_cloudevents_settings_are_checked(db):
    with db.connect() as c:
        for name, value, why in [
            ("cloudevents", "json", 'invalid value for parameter "outbox.cloudevents"'),
            ("cloudevents_source", "/a b", "URI-reference"),
            ("cloudevents_amqp_prefix", "x-", "is not one of cloudEvents_, cloudEvents:, ce-"),
        ]:
            e = sqlstate_of(c, sql.SQL("ALTER SYSTEM SET {} = {}").format(sql.SQL(f"outbox.{name}"), sql.Literal(value)).as_string(c))
            assert e.sqlstate == "22023" and why in str(e) + str(e.diag.message_detail), e
        # The relay's settings are not an application's to change.
        e = sqlstate_of(c, "SET outbox.cloudevents = binary")
        assert e.sqlstate == "55P02", e


def test_a_dead_letter_keeps_the_event_not_its_cloudevents_form(db, broker):
    """An event the broker refuses in its delivery report (older than the
    topic's timestamp window) while structured mode is on: the dead letter
    holds the event's payload and its own headers, not the envelope or the
    attribute headers, and re-publishing sends it wrapped once."""
    topic = rig.unique_topic("cedl")
    broker.create_topic(topic, partitions=1, config={"message.timestamp.before.max.ms": "15000"})
    payload = {"n": 1, "s": "x"}
    with db.connect() as c:
        c.execute("ALTER SYSTEM SET outbox.relay_enabled = off")
        c.execute("ALTER SYSTEM SET outbox.cloudevents = structured")
        c.execute("SELECT pg_reload_conf()")
    try:
        rig.wait_for_relay(db, "disabled")
        old = emit_one(db, topic, "k", payload, traceparent=TP)
        time.sleep(17)  # the backlog ages past the topic's window
        with db.connect() as c:
            c.execute("ALTER SYSTEM RESET outbox.relay_enabled")
            c.execute("SELECT pg_reload_conf()")
        rig.wait_for_relay(db, timeout=60)
        rig.drain(db, timeout_ms=120_000)
        row = dead_letter(db, old)
        assert row is not None and "timestamp" in row[2].lower(), row
        assert row[0] == payload and row[1] == {"tenant": "t1", "traceparent": TP}, row
        with db.connect() as c:
            assert c.execute("SELECT outbox_dead_letter_republish(%s)", (old,)).fetchone()[0] == 1
        rig.drain(db)
        (m,) = broker.consume(topic, expect=1, linger=0.5)
        ev = from_structured(kafka_message(m), JSONFormat())
        assert ev.get_id() == old and ev.get_data() == payload and ev.get_extension("traceparent") == TP
    finally:
        with_relay_restarted(db, cloudevents=None)
