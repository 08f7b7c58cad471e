"""The relay worker end to end: committed events reach Kafka exactly as
committed, in per-aggregate order, with nothing for rolled-back work."""

import json
import threading
import time

import rig
from helpers import sqlstate_of  # noqa: F401


def emit(conn, topic, agg, typ="Placed", payload=None, headers="{}"):
    payload = payload if payload is not None else {"n": 1}
    return conn.execute(
        "SELECT outbox_emit('Order', %s, %s, %s::jsonb, %s::jsonb, %s)",
        (agg, typ, json.dumps(payload), headers, topic),
    ).fetchone()[0]


def test_event_reaches_kafka_with_key_headers_and_commit_timestamp(db, broker):
    topic = rig.unique_topic("relay")
    with db.connect(autocommit=False) as c:
        eid = emit(c, topic, "42", "OrderPlaced", {"total": 4200}, '{"traceparent": "00-abc"}')
        xid = c.execute("SELECT pg_current_xact_id()::text").fetchone()[0]
        c.commit()
        commit_ms = c.execute(
            "SELECT (extract(epoch FROM pg_xact_commit_timestamp(%s::xid)) * 1000)::bigint", (xid,)
        ).fetchone()[0]
    rig.drain(db)
    got = broker.consume(topic, expect=1)
    assert len(got) == 1
    m = got[0]
    assert m["key"] == b"42"
    assert json.loads(m["value"]) == {"total": 4200}
    assert m["headers"] == {"id": str(eid), "type": "OrderPlaced", "aggregatetype": "Order", "traceparent": "00-abc"}
    assert m["timestamp"] == commit_ms


def test_default_topic_template_and_table_rows(db, broker):
    agg = rig.unique_topic("Agg").replace(".", "_")  # a fresh aggregate type => a fresh topic
    with db.connect() as c:
        c.execute(
            "INSERT INTO outbox (aggregatetype, aggregateid, type, payload, headers) VALUES (%s, 'c-1', 'Created', '{\"a\": 1}', '{\"h\": \"v\"}')",
            (agg,),
        )
        row_id = c.execute("SELECT id FROM outbox WHERE aggregatetype = %s", (agg,)).fetchone()[0]
        c.execute("SELECT outbox_emit(%s, 'c-1', 'Renamed', '{\"a\": 2}')", (agg,))
    rig.drain(db)
    got = broker.consume(f"outbox.event.{agg}", expect=2)
    assert [(m["headers"]["type"], json.loads(m["value"])) for m in got] == [("Created", {"a": 1}), ("Renamed", {"a": 2})]
    assert got[0]["headers"]["id"] == str(row_id) and got[0]["headers"]["h"] == "v"
    with db.connect() as c:
        # Published rows are deleted by the relay (outbox.delete_published_rows).
        assert c.execute("SELECT count(*) FROM outbox WHERE aggregatetype = %s", (agg,)).fetchone()[0] == 0


def run_load(db, topic, clients, per_client, aggs_per_client, stop=None, rollback_every=7):
    """Concurrent producers. Client i owns aggregates a{i}-{k} and numbers
    its events per aggregate, so the committed order per aggregate is known.
    Returns {event id: (aggregate, seq)} of committed events."""
    committed: dict[str, tuple[str, int]] = {}
    lock = threading.Lock()
    errors = []

    def client(i):
        try:
            seq = {}
            conn = db.connect(autocommit=False)
            n = 0
            while n < per_client and not (stop and stop.is_set()):
                agg = f"a{i}-{n % aggs_per_client}"
                s = seq.get(agg, 0)
                eid = emit(conn, topic, agg, payload={"seq": s, "agg": agg})
                if n % rollback_every == rollback_every - 1:
                    conn.rollback()
                else:
                    conn.execute("SAVEPOINT sp")
                    emit(conn, topic, agg, "Ghost", {"ghost": True})
                    conn.execute("ROLLBACK TO SAVEPOINT sp")
                    conn.commit()
                    seq[agg] = s + 1
                    with lock:
                        committed[str(eid)] = (agg, s)
                n += 1
            conn.close()
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    ts = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    if errors:
        raise errors[0]
    return committed


def compare(committed, got):
    """0 lost; no event that was not committed; per-aggregate order of first
    occurrences; returns the number of duplicates."""
    ids = [m["headers"]["id"] for m in got]
    assert all(m["headers"]["type"] != "Ghost" for m in got), "a rolled-back savepoint was published"
    unknown = set(ids) - set(committed)
    assert not unknown, f"{len(unknown)} published events were never committed"
    missing = set(committed) - set(ids)
    assert not missing, f"{len(missing)} committed events lost"
    seen = set()
    per_agg: dict[str, list[int]] = {}
    for m in sorted(got, key=lambda m: (m["partition"], m["offset"])):
        i = m["headers"]["id"]
        if i in seen:
            continue
        seen.add(i)
        agg, s = committed[i]
        assert m["key"].decode() == agg
        per_agg.setdefault(agg, []).append(s)
    for agg, seqs in per_agg.items():
        assert seqs == sorted(seqs), f"aggregate {agg} out of order: {seqs}"
    return len(ids) - len(set(ids))


def test_concurrent_producers_exactly_once_in_per_aggregate_order(db, broker):
    topic = rig.unique_topic("load")
    committed = run_load(db, topic, clients=4, per_client=300, aggs_per_client=5)
    rig.drain(db)
    got = broker.consume(topic, expect=len(committed), timeout=30, linger=1.0)
    dups = compare(committed, got)
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


def test_commit_wakes_the_relay(db, broker):
    """Latency sanity: well under the 100 ms idle timeout on average (not a
    benchmark; the benchmark command measures percentiles)."""
    topic = rig.unique_topic("wake")
    with db.connect() as c:
        emit(c, topic, "warm")
    rig.drain(db)
    start = time.monotonic()
    with db.connect() as c:
        for i in range(20):
            emit(c, topic, f"k{i}")
            assert c.execute("SELECT outbox_drain(10000)").fetchone()[0]
    assert len(broker.consume(topic, expect=21)) == 21
    # Each round trip includes a Kafka acknowledgement; 20 rounds at the idle
    # timeout alone would take 2 s.
    assert time.monotonic() - start < 20
