"""Wire compatibility with Debezium's Outbox Event Router: the same rows of
the outbox table, published by Debezium 3.6 (PostgreSQL connector, pgoutput,
router at its defaults, in Kafka Connect) and by outbox (table path,
defaults), compared record by record. Debezium publishes to a broker of its
own so that both can use the router's topic names at once.

What must be equal, and is: the topic (`outbox.event.<aggregatetype>`), the
`id` header, and, with the converters that pass bytes through
(StringConverter), the key, the value and the partition. With the
JsonConverter the guides use (schemas off), Debezium writes the key and the
payload as JSON *strings* (quoted, the payload's JSON escaped inside): the
test pins that difference exactly, and the README lists it with the others
(headers Debezium adds, the record timestamp)."""

import json
import uuid

import pytest

import rig

pytestmark = pytest.mark.one_major

PAYLOADS = [
    {"total": 4200, "items": [{"sku": "a-1", "qty": 2}], "note": None},
    {"text": 'quotes " and \\ backslash, tab\t, newline\n', "unicode": "zürich 東京 \u2603"},
    {"n": 1.5e-7, "big": 12345678901234567890, "neg": -0.0, "flag": True},
    {},
    [1, "two", {"three": 3}],
    "just a string",
]
KEYS = ["42", "order-ä", "x" * 200, "42", "7", "order-ä"]


def publish_both(db, broker, dbz_broker, converters):
    aggregatetype = f"Wire{uuid.uuid4().hex[:8]}"
    topic = f"outbox.event.{aggregatetype}"
    for b in (broker, dbz_broker):
        b.create_topic(topic, partitions=3)
    dbz = rig.DebeziumConnect(db, dbz_broker, converters=converters, slot=f"dbz_{converters}")
    dbz.start()
    try:
        with db.connect() as c:
            with c.transaction():
                for key, payload in zip(KEYS, PAYLOADS):
                    c.execute("INSERT INTO outbox.outbox (aggregatetype, aggregateid, type, payload) VALUES (%s, %s, 'Placed', %s::jsonb)",
                              (aggregatetype, key, json.dumps(payload)))
            c.execute("INSERT INTO outbox.outbox (aggregatetype, aggregateid, type, payload) VALUES (%s, 'solo', 'Placed', '{\"own\": 1}')",
                      (aggregatetype,))
        rig.drain(db)
        n = len(PAYLOADS) + 1
        ours = broker.consume(topic, expect=n, timeout=30, linger=1)
        # linger: the relay deletes the rows it published; a delete must not
        # become a record (Debezium's router drops them).
        theirs = dbz_broker.consume(topic, expect=n, timeout=60, linger=3)
    finally:
        dbz.stop()
    assert len(ours) == n and len(theirs) == n, (len(ours), len(theirs))
    ours_by_id = {m["headers"]["id"]: m for m in ours}
    theirs_by_id = {m["headers"]["id"]: m for m in theirs}
    assert set(ours_by_id) == set(theirs_by_id)
    return [(ours_by_id[i], theirs_by_id[i]) for i in ours_by_id]


def test_same_rows_same_records_as_debezium_with_string_converters(db, broker, dbz_broker):
    pairs = publish_both(db, broker, dbz_broker, "string")
    for ours, theirs in pairs:
        assert ours["key"] == theirs["key"]
        assert ours["value"] == theirs["value"], (ours["value"], theirs["value"])
        assert ours["partition"] == theirs["partition"], "the same key must land in the same partition"
    extra = sorted({h for _, t in pairs for h in t["headers"]} - {"id"})
    print(f"\n[wire, StringConverter] {len(pairs)} records equal in key, value bytes, partition and id; "
          f"Debezium's other headers: {extra}; ours: {sorted(set(pairs[0][0]['headers']) - {'id'})}")


def test_debeziums_json_converter_quotes_key_and_payload_as_json_strings(db, broker, dbz_broker):
    pairs = publish_both(db, broker, dbz_broker, "json")
    for ours, theirs in pairs:
        assert theirs["key"] == json.dumps(ours["key"].decode(), ensure_ascii=False, separators=(",", ":")).encode()
        assert json.loads(theirs["value"]) == ours["value"].decode()
        assert theirs["value"] != ours["value"]
    print(f"\n[wire, JsonConverter] {len(pairs)} records: Debezium's key and value are ours as JSON strings")
