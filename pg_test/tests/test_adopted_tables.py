"""Adopted tables (outbox.tables): an application's own Debezium-style outbox
table, which the test creates as the application would and outbox did not,
published with nothing configured but the connector's router block,
translated line by line (`transforms.outbox.<option>=<value>;`).

The first two tests run the same rows through Debezium 3.6's Outbox Event
Router (PostgreSQL connector, Kafka Connect, converters that pass bytes
through) on a broker of its own, and compare record by record: topic, key,
value bytes, partition, timestamp and headers. What Debezium cannot show
here is checked against the router's documented behaviour: `traceparent`
from the span-context column (Debezium injects one only with OpenTelemetry
on its classpath), rows that cannot become events (dead-lettered with the
reason), and bad mappings (refused when set)."""

import datetime
import json
import threading
import time
import uuid

from psycopg import sql
import pytest

import rig
from helpers import sqlstate_of, with_relay_restarted

TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.fixture
def app(db):
    """The application's schema; outbox.tables reset afterwards."""
    with db.connect() as c:
        c.execute("DROP SCHEMA IF EXISTS app CASCADE")
        c.execute("CREATE SCHEMA app")
    yield db
    adopt(db, None, None)
    with_relay_restarted(db, on_rejected_event=None)
    with db.connect() as c:
        c.execute("DROP SCHEMA app CASCADE")


def adopt(db, tables, table_options):
    """Sets outbox.table_options and outbox.tables, each checked against
    the other's value in force: the mapping first when adopting, the tables
    first when letting go."""
    if tables:
        with_relay_restarted(db, table_options=table_options)
        with_relay_restarted(db, tables=tables)
    else:
        with_relay_restarted(db, tables=tables)
        with_relay_restarted(db, table_options=table_options)


def options(router: dict[str, str]) -> str:
    """The connector's router block as outbox.table_options: each line of
    the .properties block (a backslash written as two, as the rig writes
    Debezium's) becomes `line;`, Connect's own list of transforms included."""
    esc = lambda v: v.replace("\\", "\\\\")  # noqa: E731
    return "transforms=outbox; " + "".join(f"transforms.outbox.{k}={esc(v)}; " for k, v in router.items())


def run_both(db, broker, dbz_broker, table, router, topics: dict[str, int], write, worker=None):
    """Debezium (router `router` on `table`, the worker's properties
    `worker` over pass-through converters) and outbox (the same router block
    and the worker's converter lines as outbox.table_options) publish the
    rows `write` commits, `topics[t]` records to topic t; returns the
    (ours, theirs) records paired by their `id` header."""
    for b in (broker, dbz_broker):
        for t in topics:
            b.create_topic(t, partitions=3)
    converter_lines = "".join(f"{k}={v}; " for k, v in (worker or {}).items() if ".converter" in k)
    adopt(db, table, options(router) + converter_lines)
    dbz = rig.DebeziumConnect(db, dbz_broker, table=table, converters="string", router=router, worker=worker,
                              slot=f"dbz_adopt_{uuid.uuid4().hex[:6]}")
    dbz.start()
    try:
        with db.connect() as c:
            write(c)
        rig.drain(db)
        # linger: a delete or an update must not become a record.
        ours = [m | {"topic": t} for t, n in topics.items() for m in broker.consume(t, expect=n, timeout=30, linger=1)]
        theirs = [m | {"topic": t} for t, n in topics.items() for m in dbz_broker.consume(t, expect=n, timeout=90, linger=3)]
    finally:
        dbz.stop()
    n = sum(topics.values())
    assert len(ours) == n, f"outbox published {len(ours)} records for {n} inserted rows"
    assert len(theirs) == n, f"Debezium published {len(theirs)} records for {n} inserted rows"
    by_id = lambda ms: {m["headers"]["id"]: m for m in ms}  # noqa: E731
    o, t = by_id(ours), by_id(theirs)
    assert set(o) == set(t)
    return [(o[i], t[i]) for i in o]


def same_record(ours, theirs):
    assert ours["topic"] == theirs["topic"]
    assert ours["key"] == theirs["key"]
    assert ours["value"] == theirs["value"], (ours["value"], theirs["value"])
    if ours["key"] is not None:
        # A null key's partition is the partitioner's free choice.
        assert ours["partition"] == theirs["partition"]
    assert ours["timestamp"] == theirs["timestamp"]
    dbz_headers = {k: v for k, v in theirs["headers"].items() if not k.startswith("__debezium")}
    our_headers = {k: v for k, v in ours["headers"].items() if k != "traceparent"}
    assert our_headers == dbz_headers


@pytest.mark.one_major
def test_quarkus_style_table_gives_the_routers_records(app, broker, dbz_broker):
    """Quarkus' outbox extension's table with a jsonb payload: rows inserted
    and deleted in one transaction (remove-after-insert), a NULL payload as a
    tombstone, a NULL aggregate id as a null key, the type as an aliased
    header, the timestamp column as the record's timestamp."""
    prefix = f"shop{uuid.uuid4().hex[:6]}"
    with app.connect() as c:
        c.execute("""CREATE TABLE app.outboxevent (
                         id uuid PRIMARY KEY, aggregatetype varchar(255) NOT NULL, aggregateid varchar(255),
                         type varchar(255) NOT NULL, timestamp timestamp NOT NULL, payload jsonb,
                         tracingspancontext varchar(256))""")
    router = {
        "table.fields.additional.placement": "type:header:eventType",
        "table.field.event.timestamp": "timestamp",
        "route.topic.replacement": prefix + ".${routedByValue}",
        "route.tombstone.on.empty.payload": "true",
    }
    payloads = [{"total": 4200, "lines": [{"sku": "a-1", "qty": 2}], "note": None},
                {"text": 'quotes " \\ tab\t', "unicode": "zürich 東京"}, [1, "two"], {}]
    rows = []

    def write(c):
        with c.transaction():
            for i, p in enumerate(payloads):
                rid = str(uuid.uuid4())
                rows.append(rid)
                c.execute("INSERT INTO app.outboxevent VALUES (%s, 'Order', %s, 'OrderPlaced', "
                          "timestamp '2026-01-15 10:00:00' + %s * interval '1.5 second', %s::jsonb, %s)",
                          (rid, f"order-{i}", i, json.dumps(p), f"#Tue Nov 24 10:00:00 UTC 2026\ntraceparent={TP}\n"))
                c.execute("DELETE FROM app.outboxevent WHERE id = %s", (rid,))
        with c.transaction():
            for key, payload in (("order-0", None), (None, '{"anonymous": true}')):
                rid = str(uuid.uuid4())
                rows.append(rid)
                c.execute("INSERT INTO app.outboxevent (id, aggregatetype, aggregateid, type, timestamp, payload) "
                          "VALUES (%s, 'Customer', %s, 'CustomerSeen', timestamp '2026-01-15 11:00:00', %s::jsonb)",
                          (rid, key, payload))
        # An update is not an event (the router warns and skips it).
        c.execute("UPDATE app.outboxevent SET type = 'Changed' WHERE id = %s", (rows[-1],))

    pairs = run_both(app, broker, dbz_broker, "app.outboxevent", router, {f"{prefix}.Order": 4, f"{prefix}.Customer": 2}, write)
    ours = {o["headers"]["id"]: o for o, _ in pairs}
    for o, t in pairs:
        same_record(o, t)
    # Against the documentation as well as against Debezium:
    for i, rid in enumerate(rows[:4]):
        m = ours[rid]
        assert m["topic"] == f"{prefix}.Order" and m["key"] == f"order-{i}".encode()
        assert m["headers"] == {"id": rid, "eventType": "OrderPlaced", "traceparent": TP}, "no type/aggregatetype headers"
        assert json.loads(m["value"]) == payloads[i]
        ten = datetime.datetime(2026, 1, 15, 10, tzinfo=datetime.timezone.utc).timestamp() * 1000
        assert m["timestamp"] == ten + 1500 * i, "the timestamp column, read as UTC"
    tomb, anon = ours[rows[4]], ours[rows[5]]
    assert (tomb["topic"], tomb["key"], tomb["value"]) == (f"{prefix}.Customer", b"order-0", None), "a tombstone"
    assert (anon["key"], anon["value"]) == (None, b'{"anonymous": true}'), "a null key"
    with app.connect() as c:
        assert c.execute("SELECT count(*) FROM app.outboxevent").fetchone()[0] == 2, "the application's rows stay"


@pytest.mark.one_major
def test_bytea_payload_renamed_columns_regex_route_and_partition(app, broker, dbz_broker):
    """A table with other names and types: bigint id, bytea payload sent as
    raw bytes, routing by a regex with a named group, a partition column."""
    prefix = f"ev{uuid.uuid4().hex[:6]}"
    with app.connect() as c:
        c.execute("""CREATE TABLE app.events (
                         event_id bigint PRIMARY KEY, agg_type text NOT NULL, agg_id text NOT NULL, kind text NOT NULL,
                         body bytea, shard integer, created timestamp NOT NULL DEFAULT now())""")
    router = {
        "table.field.event.id": "event_id",
        "table.field.event.key": "agg_id",
        "table.field.event.payload": "body",
        "route.by.field": "agg_type",
        "route.topic.regex": "(?<kind>[a-z]+)\\.v1",
        "route.topic.replacement": prefix + ".${kind}",
        "table.fields.additional.placement": "kind:header:eventType,shard:partition,agg_type:header",
        "table.field.event.timestamp": "created",
    }
    bodies = [b"\x00\xff\xfe binary \x80", b"", "plain text é".encode(), bytes(range(256))]
    # The regex's \. is a literal dot on both sides (a .properties value
    # unescaped): this value does not match, so it is its own topic.
    no_dot = "".join(chr(ord("a") + int(h, 16)) for h in uuid.uuid4().hex[:8]) + "Xv1"

    def write(c):
        with c.transaction():
            for i, body in enumerate(bodies):
                c.execute("INSERT INTO app.events (event_id, agg_type, agg_id, kind, body, shard) VALUES (%s, %s, %s, 'Stored', %s, %s)",
                          (100 + i, "invoice.v1" if i % 2 else "payment.v1", f"k{i}", body, i % 3))
            c.execute("INSERT INTO app.events (event_id, agg_type, agg_id, kind, body, shard) VALUES (99, %s, 'k', 'Stored', 'x', 0)",
                      (no_dot,))

    worker = {"value.converter": "org.apache.kafka.connect.converters.ByteArrayConverter"}
    pairs = run_both(app, broker, dbz_broker, "app.events", router, {f"{prefix}.invoice": 2, f"{prefix}.payment": 2, no_dot: 1},
                     write, worker=worker)
    for o, t in pairs:
        same_record(o, t)
    ours = {o["headers"]["id"]: o for o, _ in pairs}
    for i, body in enumerate(bodies):
        m = ours[str(100 + i)]
        assert m["value"] == body and m["partition"] == i % 3
        assert m["topic"] == f"{prefix}.{'invoice' if i % 2 else 'payment'}"
        assert m["headers"] == {"id": str(100 + i), "eventType": "Stored", "agg_type": "invoice.v1" if i % 2 else "payment.v1"}
    assert ours["99"]["topic"] == no_dot, "no whole match (the dot is literal): the value itself is the topic"


@pytest.mark.one_major
def test_json_converter_keys_and_values_are_debeziums_bytes(app, broker, dbz_broker):
    """The guides' converter (JsonConverter) in the connector's lines: the
    key without schemas, as the seed configuration has it, and the value
    with them (JsonConverter's default), so both encodings are compared in
    one run: the same key bytes (and so the same partition) and value bytes
    as Debezium's, a tombstone still a null value."""
    prefix = f"js{uuid.uuid4().hex[:6]}"
    with app.connect() as c:
        c.execute("""CREATE TABLE app.outboxevent (id uuid PRIMARY KEY, aggregatetype text NOT NULL,
                         aggregateid text NOT NULL, type text NOT NULL, payload jsonb,
                         created timestamp NOT NULL DEFAULT '2026-01-15 10:00:00')""")
    router = {"route.topic.replacement": prefix + ".${routedByValue}", "route.tombstone.on.empty.payload": "true",
              "table.field.event.timestamp": "created"}
    worker = {"key.converter": "org.apache.kafka.connect.json.JsonConverter", "key.converter.schemas.enable": "false",
              "value.converter": "org.apache.kafka.connect.json.JsonConverter", "value.converter.schemas.enable": "true"}
    payloads = [{"total": 4200, "note": None}, {"text": 'quotes " \\ tab\t ctl\u0001', "unicode": "zürich 東京"}, None]
    rows = [str(uuid.uuid4()) for _ in payloads]

    def write(c):
        with c.transaction():
            for i, (rid, p) in enumerate(zip(rows, payloads)):
                c.execute("INSERT INTO app.outboxevent (id, aggregatetype, aggregateid, type, payload) VALUES (%s, 'Order', %s, 'Placed', %s::jsonb)",
                          (rid, f'order "{i}"', None if p is None else json.dumps(p)))

    pairs = run_both(app, broker, dbz_broker, "app.outboxevent", router, {f"{prefix}.Order": 3}, write, worker=worker)
    for o, t in pairs:
        same_record(o, t)
    ours = {o["headers"]["id"]: o for o, _ in pairs}
    for i, rid in enumerate(rows):
        m = ours[rid]
        assert json.loads(m["key"]) == f'order "{i}"', "the key as a JSON string"
        if payloads[i] is None:
            assert m["value"] is None, "a tombstone"
        else:
            v = json.loads(m["value"])
            assert v["schema"] == {"type": "string", "optional": True, "name": "io.debezium.data.Json", "version": 1}
            assert json.loads(v["payload"]) == payloads[i], "the payload's JSON inside a JSON string"


@pytest.mark.one_major
def test_cutover_from_a_running_connector_publishes_each_row_once(app, broker, dbz_broker):
    """The README's cut-over, done while the application writes (insert and
    delete, a transaction per row): every row is published exactly once,
    by Debezium before the pause or by outbox after it."""
    prefix = f"cut{uuid.uuid4().hex[:6]}"
    topic = f"{prefix}.Order"
    router = {"route.topic.replacement": prefix + ".${routedByValue}"}
    with app.connect() as c:
        c.execute("CREATE TABLE app.outboxevent (id uuid PRIMARY KEY, aggregatetype varchar(255) NOT NULL, "
                  "aggregateid varchar(255) NOT NULL, type varchar(255) NOT NULL, payload varchar(8000))")
    for b in (broker, dbz_broker):
        b.create_topic(topic, partitions=3)
    with_relay_restarted(app, table_options=options(router))  # step 1
    dbz = rig.DebeziumConnect(app, dbz_broker, table="app.outboxevent", converters="string", router=router,
                              slot=f"dbz_cut_{uuid.uuid4().hex[:6]}")
    dbz.start()
    committed: list[str] = []
    stop = threading.Event()

    def writer():
        with app.connect() as w:
            n = 0
            while not stop.is_set():
                rid = str(uuid.uuid4())
                with w.transaction():
                    w.execute("INSERT INTO app.outboxevent VALUES (%s, 'Order', %s, 'Placed', %s)", (rid, f"k{n % 7}", f"row {n}"))
                    w.execute("DELETE FROM app.outboxevent WHERE id = %s", (rid,))
                committed.append(rid)
                n += 1
                time.sleep(0.005)

    t = threading.Thread(target=writer)
    t.start()
    try:
        time.sleep(2)
        with app.connect(autocommit=False) as lock:  # step 2
            lock.execute("LOCK TABLE app.outboxevent IN SHARE ROW EXCLUSIVE MODE")
            cut = lock.execute("SELECT pg_current_wal_lsn()::text").fetchone()[0]
            time.sleep(0.5)  # the writer is now blocked in its INSERT
            before = list(committed)
            assert before and t.is_alive()
            theirs = dbz_broker.consume(topic, expect=len(before), timeout=90, linger=1)  # step 3
            dbz.stop()
            with app.connect() as c:  # step 4
                assert c.execute("SELECT outbox_drain(60000, %s::pg_lsn)", (cut,)).fetchone()[0]
                with_relay_restarted(app, tables="app.outboxevent")
            lock.commit()  # step 5
        time.sleep(2)
    finally:
        stop.set()
        t.join()
        if dbz.proc:
            dbz.stop()
    rig.drain(app)
    after = committed[len(before):]
    assert after, "the writer went on after the pause"
    ours = broker.consume(topic, expect=len(after), timeout=30, linger=1)
    theirs_ids = [m["headers"]["id"] for m in theirs]
    ours_ids = [m["headers"]["id"] for m in ours]
    assert sorted(theirs_ids) == sorted(before), "Debezium published each row before the pause once"
    assert sorted(ours_ids) == sorted(after), "outbox published each row after the pause once, and none before it"
    print(f"\n[cut-over] {len(before)} rows by Debezium, {len(after)} by outbox, none twice, none missing")


def test_published_rows_are_deleted_as_the_tables_owner_when_asked(app, broker):
    """delete.published.rows=true: once published, rows are deleted by their
    id (the primary key), as the table's owner: a trigger of the owner's
    runs with the owner's rights, never the relay's (a superuser's)."""
    prefix = f"del{uuid.uuid4().hex[:6]}"
    with app.connect() as c:
        c.execute("DROP ROLE IF EXISTS outbox_app_owner")
        c.execute("CREATE ROLE outbox_app_owner")
        c.execute("GRANT CREATE, USAGE ON SCHEMA app TO outbox_app_owner")
        c.execute("SET ROLE outbox_app_owner")
        c.execute("CREATE TABLE app.events (id bigint PRIMARY KEY, aggregatetype text, aggregateid text, payload jsonb)")
        c.execute("CREATE TABLE app.deleted_by (who text, superuser boolean)")
        c.execute("""CREATE FUNCTION app.note() RETURNS trigger LANGUAGE plpgsql AS $$
                     BEGIN INSERT INTO app.deleted_by SELECT current_user, rolsuper FROM pg_roles WHERE rolname = current_user;
                     RETURN OLD; END $$""")
        c.execute("CREATE TRIGGER note AFTER DELETE ON app.events FOR EACH ROW EXECUTE FUNCTION app.note()")
        c.execute("RESET ROLE")
    try:
        adopt(app, "app.events", f"route.topic.replacement={prefix}.${{routedByValue}}; delete.published.rows=true")
        with app.connect() as c:
            for i in range(3):
                c.execute("INSERT INTO app.events VALUES (%s, 'Order', 'k', %s::jsonb)", (i, json.dumps({"n": i})))
        rig.drain(app)
        got = broker.consume(f"{prefix}.Order", expect=3, timeout=30, linger=0.5)
        assert [json.loads(m["value"])["n"] for m in got] == [0, 1, 2]
        with app.connect() as c:
            rig.wait_for("the published rows to be deleted",
                         lambda: c.execute("SELECT count(*) FROM app.events").fetchone()[0] == 0, timeout=30)
            assert c.execute("SELECT who, superuser FROM app.deleted_by").fetchall() == [("outbox_app_owner", False)] * 3
    finally:
        adopt(app, None, None)
        with app.connect() as c:
            c.execute("DROP SCHEMA app CASCADE")
            c.execute("CREATE SCHEMA app")
            c.execute("DROP ROLE outbox_app_owner")


def test_an_owners_trigger_cannot_take_the_relays_rights_back_during_the_delete(app, broker):
    """The owner's trigger on the adopted table runs RESET ROLE and makes
    its owner superuser. The relay deletes as the owner, but from a
    superuser's session: a bare SET ROLE let the trigger reset to the
    superuser and succeed. The delete now runs in a security-restricted
    operation: the trigger's RESET ROLE is refused, the delete is rolled
    back and logged, the owner stays an ordinary role, and the relay (same
    process) goes on publishing."""
    prefix = f"esc{uuid.uuid4().hex[:6]}"
    with app.connect() as c:
        c.execute("DROP ROLE IF EXISTS outbox_app_owner")
        c.execute("CREATE ROLE outbox_app_owner")
        c.execute("GRANT CREATE, USAGE ON SCHEMA app TO outbox_app_owner")
        c.execute("SET ROLE outbox_app_owner")
        c.execute("CREATE TABLE app.events (id bigint PRIMARY KEY, aggregatetype text, aggregateid text, payload jsonb)")
        c.execute("""CREATE FUNCTION app.grab() RETURNS trigger LANGUAGE plpgsql AS $$
                     BEGIN RESET ROLE; ALTER ROLE outbox_app_owner SUPERUSER; RETURN OLD; END $$""")
        c.execute("CREATE TRIGGER grab BEFORE DELETE ON app.events FOR EACH ROW EXECUTE FUNCTION app.grab()")
        c.execute("RESET ROLE")
    try:
        adopt(app, "app.events", f"route.topic.replacement={prefix}.${{routedByValue}}; delete.published.rows=true")
        pid = rig.relay_pid(app)
        with app.connect() as c:
            c.execute("INSERT INTO app.events VALUES (1, 'Order', 'k', '{\"n\": 1}')")
        rig.drain(app)
        rig.wait_for("the refused delete in the log",
                     lambda: "published rows of app.events are not deleted" in app.log_text(), timeout=30)
        with app.connect() as c:
            c.execute("INSERT INTO app.events VALUES (2, 'Order', 'k', '{\"n\": 2}')")
        rig.drain(app)
        got = broker.consume(f"{prefix}.Order", expect=2, timeout=30, linger=0.5)
        assert [json.loads(m["value"])["n"] for m in got] == [1, 2]
        with app.connect() as c:
            assert c.execute("SELECT rolsuper FROM pg_roles WHERE rolname = 'outbox_app_owner'").fetchone()[0] is False
            assert c.execute("SELECT count(*) FROM app.events").fetchone()[0] == 2, "the refused deletes were rolled back"
        assert rig.relay_pid(app) == pid, "the relay was not restarted by the failed delete"
        assert 'cannot set parameter "role"' in app.log_text()
    finally:
        adopt(app, None, None)
        with app.connect() as c:
            c.execute("DROP SCHEMA app CASCADE")
            c.execute("CREATE SCHEMA app")
            c.execute("DROP ROLE outbox_app_owner")


def test_a_users_table_named_outbox_is_adopted_beside_the_extensions(app, broker):
    """The most common name of a Debezium outbox table is outbox: the
    application's public.outbox is adopted, and the extension's own
    outbox.outbox goes on as before, each row published once, as its own."""
    prefix = f"pub{uuid.uuid4().hex[:6]}"
    with app.connect() as c:
        c.execute("CREATE TABLE public.outbox (id uuid PRIMARY KEY, aggregatetype varchar(255), aggregateid varchar(255), "
                  "type varchar(255), payload jsonb)")
    try:
        adopt(app, "public.outbox", f"route.topic.replacement={prefix}.${{routedByValue}}")
        theirs, ours = str(uuid.uuid4()), None
        with app.connect() as c:
            c.execute("INSERT INTO public.outbox VALUES (%s, 'Order', '1', 'Placed', '{\"app\": true}')", (theirs,))
            ours = str(c.execute("INSERT INTO outbox.outbox (aggregatetype, aggregateid, type, payload) "
                                 "VALUES ('Order', '1', 'Placed', '{\"ext\": true}') RETURNING id", prepare=False).fetchone()[0])
        rig.drain(app)
        adopted = broker.consume(f"{prefix}.Order", expect=1, timeout=30, linger=0.5)
        assert [(m["headers"], m["value"]) for m in adopted] == [({"id": theirs}, b'{"app": true}')]
        own = [m for m in broker.consume("outbox.event.Order", expect=1, timeout=30, linger=0.5) if m["headers"]["id"] == ours]
        assert len(own) == 1 and own[0]["headers"]["type"] == "Placed", "the extension's table is still its own"
        with app.connect() as c:
            assert c.execute("SELECT count(*) FROM public.outbox").fetchone()[0] == 1, "the application's row stays"
    finally:
        adopt(app, None, None)
        with app.connect() as c:
            c.execute("DROP TABLE public.outbox")


def dead_letters(c):
    return c.execute("SELECT id::text, reason, adopted, source_table, payload_bytes, aggregateid, topic "
                     "FROM outbox_dead_letter WHERE adopted ORDER BY commit_lsn").fetchall()


def test_rows_that_cannot_be_events_are_dead_lettered_with_the_reason(app, broker):
    topic_prefix = f"dl{uuid.uuid4().hex[:6]}"
    with app.connect() as c:
        c.execute("DELETE FROM outbox_dead_letter")
        c.execute("""CREATE TABLE app.outboxevent (id uuid PRIMARY KEY, aggregatetype text, aggregateid text,
                         type text, payload text, tracingspancontext text)""")
    with_relay_restarted(app, on_rejected_event="dead_letter")
    adopt(app, "app.outboxevent", f"route.topic.replacement={topic_prefix}.${{routedByValue}}")
    ids = [str(uuid.uuid4()) for _ in range(5)]
    with app.connect() as c:
        c.execute("INSERT INTO app.outboxevent VALUES (%s, NULL, 'a', 'T', 'x', NULL)", (ids[0],))
        c.execute("INSERT INTO app.outboxevent VALUES (%s, 'Order', 'a', 'T', NULL, NULL)", (ids[1],))
        # An invalid traceparent is left out; the event goes.
        c.execute("INSERT INTO app.outboxevent VALUES (%s, 'Order', 'a', 'T', 'plain text', 'traceparent=nope')", (ids[2],))
        c.execute("INSERT INTO app.outboxevent VALUES (%s, 'Order', 'a', 'T', 'bare', %s)", (ids[3], TP))
    rig.drain(app)
    got = broker.consume(f"{topic_prefix}.Order", expect=2, timeout=30, linger=0.5)
    assert [(m["headers"], m["value"]) for m in got] == [
        ({"id": ids[2]}, b"plain text"), ({"id": ids[3], "traceparent": TP}, b"bare")]
    assert 'the tracing column "tracingspancontext" holds no valid traceparent (invalid traceparent "nope"' in app.log_text(), \
        "a dropped traceparent is said in the log"
    with app.connect() as c:
        dl = dead_letters(c)
        assert [d[0] for d in dl] == ids[:2]
        assert 'the route column "aggregatetype" is NULL' in dl[0][1] and dl[0][2:5] == (True, "app.outboxevent", b"x")
        assert 'the payload column "payload" is NULL and route.tombstone.on.empty.payload is off' in dl[1][1]
        assert dl[1][4] is None and dl[1][5] == "a"
        e = sqlstate_of(c, "SELECT outbox_dead_letter_republish(%s)", (ids[0],))
        assert e.sqlstate == "0A000" and "adopted table" in str(e)
        assert c.execute("SELECT outbox_dead_letter_republish()").fetchone()[0] == 0, "adopted letters are left alone"
        # The table changes after the setting was checked: its rows are
        # dead-lettered with the reason, not skipped, and the stream goes on.
        c.execute("ALTER TABLE app.outboxevent RENAME COLUMN payload TO body")
        c.execute("INSERT INTO app.outboxevent VALUES (%s, 'Order', 'a', 'T', 'late', NULL)", (ids[4],))
    rig.drain(app)
    with app.connect() as c:
        dl = dead_letters(c)
        late = [d for d in dl if "cannot be read" in d[1]]
        assert len(late) == 1 and 'has no column "payload"' in late[0][1], dl
        c.execute("DELETE FROM outbox_dead_letter")
    assert rig.relay_status(app)["state"] == "streaming"


def refused(c, **setting) -> str:
    """ALTER SYSTEM SET outbox.<name> expecting the check to refuse it; the DETAIL."""
    (k, v), = setting.items()
    e = sqlstate_of(c, sql.SQL("ALTER SYSTEM SET {} = {}").format(sql.SQL(f"outbox.{k}"), sql.Literal(v)))
    assert e.sqlstate == "22023", e
    return e.diag.message_detail


def test_bad_mappings_are_refused_when_set_naming_table_and_column(app):
    """Each setting is checked against the other's value in force (the
    session's): a table against the mapping, a mapping against the tables."""
    with app.connect() as c:
        c.execute("CREATE TABLE app.outboxevent (id uuid PRIMARY KEY, aggregatetype text, aggregateid text, type text, payload jsonb, n bigint)")
        c.execute("CREATE TABLE app.untyped (id uuid, aggregateid text, payload jsonb)")
        c.execute("CREATE TABLE app.nopk (id uuid, aggregatetype text, aggregateid text, payload jsonb)")
        c.execute("CREATE UNLOGGED TABLE app.scratch (id uuid, aggregatetype text, aggregateid text, payload jsonb)")
        assert refused(c, tables="app.nope") == "table app.nope does not exist"
        assert refused(c, tables="nope.outboxevent") == "table nope.outboxevent does not exist"
        assert "with its schema" in refused(c, tables="outboxevent")
        assert "unlogged or temporary" in refused(c, tables="app.scratch")
        assert refused(c, tables="app.outboxevent, app.untyped") == \
            'table app.untyped has no column "aggregatetype" (the mapping\'s route.by.field)'
        assert 'unknown outbox router option "table.field.event.idd"' in refused(c, table_options="table.field.event.idd=x")
    # From another database the tables cannot be looked up: only the syntax
    # is checked there (the relay checks each row as it decodes).
    with app.connect(dbname="postgres") as c:
        assert "with its schema" in refused(c, tables="outboxevent")
        c.execute("ALTER SYSTEM SET outbox.tables = 'app.nope, app.untyped'")
        c.execute("SELECT pg_reload_conf()")
    # The relay checks what it could not: each problem a WARNING, the last
    # one in the status.
    untyped = 'table app.untyped has no column "aggregatetype" (the mapping\'s route.by.field)'
    rig.wait_for("the relay to report the tables", lambda: untyped in (rig.relay_status(app)["last_error"] or ""), timeout=30)
    log = app.log_text()
    assert "outbox relay: outbox.tables does not fit the catalog: table app.nope does not exist; rows of a table" in log
    assert f"outbox relay: outbox.tables does not fit the catalog: {untyped}; " in log
    assert rig.relay_status(app)["state"] == "streaming"
    with app.connect(dbname="postgres") as c:
        c.execute("ALTER SYSTEM RESET outbox.tables")
        c.execute("SELECT pg_reload_conf()")
    adopt(app, "app.outboxevent", "")
    with app.connect() as c:
        assert refused(c, table_options="table.field.event.payload=body") == \
            'table app.outboxevent has no column "body" (the mapping\'s table.field.event.payload)'
        assert refused(c, table_options="table.field.event.payload=n") == \
            'column "n" of table app.outboxevent (the mapping\'s table.field.event.payload) must be jsonb, json, text, varchar or bytea'
        assert refused(c, table_options="table.fields.additional.placement=n:partition") == \
            'column "n" of table app.outboxevent (the mapping\'s table.fields.additional.placement) must be integer (int4) for a partition placement'
        c.execute("ALTER SYSTEM SET outbox.table_options = 'table.fields.additional.placement=n:header:count'")
        assert refused(c, table_options="delete.published.rows=true; table.field.event.id=n") == \
            'table app.outboxevent: delete.published.rows deletes published rows by the id column "n", which must be the ' \
            "table's primary key (it is not, alone)"
    adopt(app, "app.outboxevent", "delete.published.rows=true")
    with app.connect() as c:
        assert refused(c, tables="app.outboxevent, app.nopk") == \
            'table app.nopk: delete.published.rows deletes published rows by the id column "id", which must be the ' \
            "table's primary key (the table has none)"


def test_a_delegated_role_adopts_only_tables_it_may_read(app):
    """ALTER SYSTEM on outbox.tables and outbox.table_options can be granted
    to a role that is not superuser. The relay reads and publishes rows with
    rights of its own, so such a role may adopt only a table it may SELECT
    from with no row-level security limiting it, and only in
    outbox.database, where that is checked; delete.published.rows (deleting
    as each table's owner) stays a superuser's."""
    with app.connect() as c:
        c.execute("DROP ROLE IF EXISTS adopter")
        c.execute("CREATE ROLE adopter LOGIN")
        c.execute("GRANT ALTER SYSTEM ON PARAMETER outbox.tables, outbox.table_options TO adopter")
        c.execute("CREATE TABLE app.secret (id uuid PRIMARY KEY, aggregatetype text, aggregateid text, payload jsonb)")
        c.execute("CREATE TABLE app.shared (id uuid PRIMARY KEY, aggregatetype text, aggregateid text, payload jsonb, tenant text)")
        c.execute("ALTER TABLE app.shared ENABLE ROW LEVEL SECURITY")
        c.execute("CREATE POLICY mine ON app.shared FOR SELECT USING (tenant = current_user)")
    try:
        with app.connect(user="adopter") as c:
            assert refused(c, tables="app.secret") == \
                "permission denied for table app.secret: publishing its rows needs SELECT on it (the relay reads them " \
                "with rights of its own)"
        with app.connect() as c:
            c.execute("GRANT USAGE ON SCHEMA app TO adopter")
            c.execute("GRANT SELECT, DELETE ON app.secret, app.shared TO adopter")
        with app.connect(user="adopter") as c:
            assert refused(c, tables="app.shared") == \
                "table app.shared has row-level security that applies to you: the relay would publish every row, not " \
                "only those you may read; only a superuser (or the table's policies' exempt roles) can adopt it"
            # Either order of the two settings: deleting as the owner is refused.
            assert "only a superuser can set outbox.tables or outbox.table_options" in \
                refused(c, table_options="delete.published.rows=true")
            c.execute("ALTER SYSTEM SET outbox.tables = 'app.secret'")
        with app.connect() as c:
            c.execute("SELECT pg_reload_conf()")
        # Each setting is checked against the other's value in force.
        with app.connect(user="adopter") as c:
            rig.wait_for("the reload", lambda: c.execute("SHOW outbox.tables").fetchone()[0] == "app.secret")
            assert "only a superuser" in refused(c, table_options="delete.published.rows=true")
            c.execute("ALTER SYSTEM SET outbox.table_options = 'route.by.field=aggregateid'")
        with app.connect(dbname="postgres", user="adopter") as c:
            assert refused(c, tables="app.secret") == \
                'only a superuser can adopt tables from another database than outbox.database ("outbox_test"): set it ' \
                "there, where the tables and your rights on them are checked"
            assert "only a superuser" in refused(c, table_options="route.by.field=aggregatetype"), \
                "nor change the mapping of tables adopted"
        with app.connect() as c:
            c.execute("ALTER SYSTEM SET outbox.table_options = 'delete.published.rows=true'")
            c.execute("SELECT pg_reload_conf()")
        with app.connect(user="adopter") as c:
            rig.wait_for("the reload", lambda: "delete" in c.execute("SHOW outbox.table_options").fetchone()[0])
            assert "only a superuser" in refused(c, tables="app.secret, app.other"), \
                "with a superuser's delete.published.rows in force, the tables are a superuser's too"
    finally:
        with app.connect() as c:
            c.execute("ALTER SYSTEM RESET outbox.tables")
            c.execute("ALTER SYSTEM RESET outbox.table_options")
            c.execute("SELECT pg_reload_conf()")
            c.execute("DROP TABLE app.secret, app.shared")
            c.execute("REVOKE ALL ON SCHEMA app FROM adopter")
            c.execute("REVOKE ALTER SYSTEM ON PARAMETER outbox.tables, outbox.table_options FROM adopter")
            c.execute("DROP ROLE adopter")
