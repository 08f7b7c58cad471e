"""The relay worker end to end: committed events reach Kafka exactly as
committed, in per-aggregate order, with nothing for rolled-back work."""

import json

import psycopg

import rig
from load import Load, compare


TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def emit(conn, topic, agg, typ="Placed", payload=None, headers="{}"):
    payload = payload if payload is not None else {"n": 1}
    return conn.execute(
        "SELECT outbox_emit('Order', %s, %s, %s::jsonb, %s::jsonb, %s)",
        (agg, typ, json.dumps(payload), headers, topic),
    ).fetchone()[0]


def test_event_reaches_kafka_with_key_headers_and_commit_timestamp(db, broker):
    topic = rig.unique_topic("relay")
    with db.connect(autocommit=False) as c:
        eid = emit(c, topic, "42", "OrderPlaced", {"total": 4200}, json.dumps({"traceparent": TP}))
        xid = c.execute("SELECT pg_current_xact_id()::text").fetchone()[0]
        c.commit()
        commit_ms = c.execute(
            "SELECT floor(extract(epoch FROM pg_xact_commit_timestamp(%s::xid)) * 1000)::bigint", (xid,)
        ).fetchone()[0]
    rig.drain(db)
    got = broker.consume(topic, expect=1)
    assert len(got) == 1
    m = got[0]
    assert m["key"] == b"42"
    assert json.loads(m["value"]) == {"total": 4200}
    assert m["headers"] == {"id": str(eid), "type": "OrderPlaced", "aggregatetype": "Order", "traceparent": TP}
    assert m["timestamp"] == commit_ms


def test_trace_context_from_the_transaction_or_the_headers(db, broker):
    """SET LOCAL outbox.traceparent, as an instrumented application sets it,
    travels as the traceparent header of the events the transaction writes;
    an event's own traceparent header wins; invalid values are refused when
    set or emitted."""
    topic = rig.unique_topic("trace")
    own = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    with db.connect(autocommit=False) as c:
        c.execute(f"SET LOCAL outbox.traceparent = '{TP}'")
        a = emit(c, topic, "1")
        b = emit(c, topic, "1", headers=json.dumps({"traceparent": own}))
        c.commit()
        d = emit(c, topic, "1")  # SET LOCAL ended with the transaction
        c.commit()
        for bad in ("00-abc", TP.upper(), "00-00000000000000000000000000000000-00f067aa0ba902b7-01"):
            try:
                c.execute(f"SET LOCAL outbox.traceparent = '{bad}'")
                raise AssertionError(f"{bad} accepted")
            except psycopg.errors.InvalidParameterValue as e:
                assert "invalid traceparent" in str(e.diag.message_detail), e.diag.message_detail
            c.rollback()
        try:
            emit(c, topic, "1", headers=json.dumps({"traceparent": "00-abc"}))
            raise AssertionError("an invalid traceparent header was accepted")
        except psycopg.errors.InvalidParameterValue as e:
            assert "invalid traceparent" in str(e), e
        c.rollback()
    rig.drain(db)
    got = {m["headers"]["id"]: m["headers"].get("traceparent") for m in broker.consume(topic, expect=3, linger=1)}
    assert got == {str(a): TP, str(b): own, str(d): None}


def test_default_topic_template_and_table_rows(db, broker):
    agg = rig.unique_topic("Agg").replace(".", "_")  # a fresh aggregate type => a fresh topic
    with db.connect() as c:
        c.execute(
            "INSERT INTO outbox.outbox (aggregatetype, aggregateid, type, payload, headers) VALUES (%s, 'c-1', 'Created', '{\"a\": 1}', '{\"h\": \"v\"}')",
            (agg,),
        )
        row_id = c.execute("SELECT id FROM outbox.outbox WHERE aggregatetype = %s", (agg,)).fetchone()[0]
        c.execute("SELECT outbox_emit(%s, 'c-1', 'Renamed', '{\"a\": 2}')", (agg,))
    rig.drain(db)
    got = broker.consume(f"outbox.event.{agg}", expect=2)
    assert [(m["headers"]["type"], json.loads(m["value"])) for m in got] == [("Created", {"a": 1}), ("Renamed", {"a": 2})]
    assert got[0]["headers"]["id"] == str(row_id) and got[0]["headers"]["h"] == "v"
    with db.connect() as c:
        # Published rows are deleted by the relay (outbox.delete_published_rows).
        assert c.execute("SELECT count(*) FROM outbox.outbox WHERE aggregatetype = %s", (agg,)).fetchone()[0] == 0


def test_concurrent_producers_exactly_once_in_per_aggregate_order(db, broker):
    topic = rig.unique_topic("load")
    with Load(db, topic, clients=4, aggs_per_client=5, pause=0) as load:
        load.wait_for(1000)
    rig.drain(db)
    got = broker.consume(topic, expect=len(load.committed), timeout=30, linger=1.0)
    assert not load.uncertain
    dups = compare(load, got)
    assert dups == 0, "no fault, so no duplicate"
    assert len({m["partition"] for m in got}) > 1, "spread over the topic's partitions"


def test_prepared_transaction_published_once_at_commit_prepared(db, broker):
    topic = rig.unique_topic("twopc")
    with db.connect(autocommit=False) as c:
        eid = emit(c, topic, "p-1")
        c.execute("PREPARE TRANSACTION 'outbox_2pc_test'")
    rig.drain(db)
    assert broker.consume(topic, expect=1, timeout=1.5) == []
    with db.connect() as c:
        c.execute("COMMIT PREPARED 'outbox_2pc_test'")
    rig.drain(db)
    got = broker.consume(topic, expect=1, timeout=10, linger=1.0)
    assert [m["headers"]["id"] for m in got] == [str(eid)]


def test_sequential_round_trips_through_drain(db, broker):
    """Each commit is published and confirmed before the next: drain returns
    once the worker (woken at COMMIT) has Kafka's acknowledgement. Latency is
    measured by the benchmark command, never asserted here."""
    topic = rig.unique_topic("wake")
    with db.connect() as c:
        c.execute("SELECT outbox_relay_latency_reset()")
        for i in range(20):
            emit(c, topic, f"k{i}")
            assert c.execute("SELECT outbox_drain(30000)").fetchone()[0]
        samples = c.execute("SELECT samples FROM outbox_relay_latency()").fetchone()[0]
    assert samples >= 20
    got = broker.consume(topic, expect=20, timeout=30, linger=0.5)
    assert [m["key"] for m in got if m["partition"] == got[0]["partition"]] == sorted(
        [m["key"] for m in got if m["partition"] == got[0]["partition"]], key=lambda k: int(k[1:]))
    assert len(got) == 20
