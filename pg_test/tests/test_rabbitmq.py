"""The RabbitMQ sink against a real RabbitMQ server (Debian's package, a
node the rig starts): what a consumer receives, rejections, and faults under
a steady load compared like the Kafka faults (0 lost, per-aggregate order of
first occurrences, duplicates counted)."""

import json
import signal
import time
import uuid

import pytest

import rig
from helpers import alter_system, with_relay_restarted
from load import Load, compare

pytestmark = pytest.mark.one_major

EXCHANGE = "outbox_events"


@pytest.fixture(scope="module")
def rabbit():
    r = rig.RabbitMQ()
    r.reset()
    r.start()
    yield r
    r.stop()


@pytest.fixture(scope="module")
def rdb(pg, rabbit):
    """A server of its own whose relay publishes to RabbitMQ."""
    settings = {
        "outbox.sink": "rabbitmq",
        "outbox.amqp_url": f"'{rabbit.url()}'",
        "outbox.amqp_exchange": EXCHANGE,
    }
    with rig.other_server("on_rabbitmq", 16, settings) as p:
        yield p


def set_and_reload(pg, restart=False, **settings):
    """ALTER SYSTEM and reload; with `restart`, waits until a new worker
    (the relay restarts for new sink settings) is streaming."""
    old = rig.relay_pid(pg)
    with pg.connect() as c:
        alter_system(c, **settings)
        c.execute("SELECT pg_reload_conf()")
    if restart:
        rig.wait_for("the relay to restart with the new settings",
                     lambda: (pid := rig.relay_pid(pg)) and pid != old and rig.relay_status(pg)["state"] == "streaming")


def finish(rdb, rabbit, q, load, label):
    """Everything committed is in the queue: 0 lost, nothing that did not
    commit, per-aggregate order of first occurrences; duplicates printed."""
    rig.drain(rdb, timeout_ms=120_000)
    got = rabbit.consume(q, expect=len(load.committed), timeout=60, linger=1.5)
    dups = compare(load, got)
    print(f"\n[{label}] committed={len(load.committed)} published={len(got)} duplicates={dups}")


def key():
    return f"k.{uuid.uuid4().hex[:12]}"


def test_committed_events_arrive_with_their_properties_and_rollbacks_do_not(rdb, rabbit):
    etype = f"Placed{uuid.uuid4().hex[:8]}"
    q = rabbit.bind_queue(EXCHANGE, etype)  # the default routing key is the event type
    with rdb.connect(autocommit=False) as c:
        ids = [str(c.execute("SELECT outbox_emit('Order', %s, %s, %s::jsonb, %s::jsonb)",
                             (f"o{i}", etype, json.dumps({"n": i}), json.dumps({"tenant": "t1"}))).fetchone()[0])
               for i in range(3)]
        committed_at = c.execute("SELECT now()").fetchone()[0]
        c.commit()
        c.execute("SELECT outbox_emit('Order', 'ghost', %s, '{}'::jsonb)", (etype,))
        c.rollback()
    rig.drain(rdb)
    got = rabbit.consume(q, expect=3, timeout=30, linger=1.5)
    assert [m["headers"]["id"] for m in got] == ids, "exactly the committed events, in commit order"
    for i, m in enumerate(got):
        p = m["props"]
        assert json.loads(m["value"]) == {"n": i}
        assert m["routing_key"] == etype
        assert p.message_id == ids[i] and p.type == etype
        assert p.content_type == "application/json" and p.delivery_mode == 2 and p.app_id == "outbox"
        assert abs(p.timestamp - int(committed_at.timestamp())) <= 1, (p.timestamp, committed_at)
        assert m["headers"] == {"id": ids[i], "type": etype, "aggregatetype": "Order",
                                "aggregateid": f"o{i}", "tenant": "t1"}
    st = rig.relay_status(rdb)
    assert st["sink"] == "rabbitmq" and st["state"] == "streaming" and st["events_published"] >= 3


def test_an_explicit_topic_names_the_routing_key(rdb, rabbit):
    rk = key()
    q = rabbit.bind_queue(EXCHANGE, rk)
    with rdb.connect() as c:
        eid = str(c.execute("SELECT outbox_emit('Order', 'o1', 'Shipped', '{}'::jsonb, '{}'::jsonb, %s)", (rk,)).fetchone()[0])
    rig.drain(rdb)
    got = rabbit.consume(q, expect=1, timeout=30)
    assert [(m["headers"]["id"], m["routing_key"]) for m in got] == [(eid, rk)]


def test_an_unroutable_event_is_dead_lettered_and_publishing_goes_on(rdb, rabbit):
    rk = key()
    q = rabbit.bind_queue(EXCHANGE, rk)
    nowhere = key()
    with rdb.connect() as c:
        lost = str(c.execute("SELECT outbox_emit('Order', 'o1', 'Lost', '{\"x\":1}'::jsonb, '{\"h\":\"v\"}'::jsonb, %s)",
                             (nowhere,)).fetchone()[0])
        after = str(c.execute("SELECT outbox_emit('Order', 'o1', 'After', '{}'::jsonb, '{}'::jsonb, %s)", (rk,)).fetchone()[0])
    rig.drain(rdb)
    assert [m["headers"]["id"] for m in rabbit.consume(q, expect=1, timeout=30, linger=1)] == [after]
    with rdb.connect() as c:
        dl = c.execute("SELECT id::text, topic, aggregateid, type, payload, headers, reason FROM outbox_dead_letter "
                       "WHERE id = %s", (lost,)).fetchall()
    assert len(dl) == 1, dl
    _, topic, agg, typ, payload, headers, reason = dl[0]
    assert (topic, agg, typ, payload, headers) == (nowhere, "o1", "Lost", {"x": 1}, {"h": "v"})
    assert "unroutable" in reason and "312" in reason and nowhere in reason, reason


def test_rabbitmq_stopped_and_restarted_under_load_loses_nothing(rdb, rabbit):
    rk = key()
    q = rabbit.bind_queue(EXCHANGE, rk)
    with Load(rdb, rk) as load:
        load.wait_for(300)
        rabbit.stop()
        t0 = time.monotonic()
        rig.wait_for_relay(rdb, "waiting for broker", timeout=30)
        st = rig.relay_status(rdb)
        assert "RabbitMQ" in (st["last_error"] or ""), st
        time.sleep(2)
        rabbit.start()
        rig.wait_for_relay(rdb, timeout=60)
        print(f"\n[rabbitmq restart] streaming again {time.monotonic() - t0:.1f} s after the stop")
        n = len(load.committed)
        load.wait_for(n + 300)
    finish(rdb, rabbit, q, load, "rabbitmq restart")


def test_kill_9_of_the_worker_under_load_loses_nothing(rdb, rabbit):
    rk = key()
    q = rabbit.bind_queue(EXCHANGE, rk)
    with Load(rdb, rk) as load:
        load.wait_for(300)
        pid = rig.relay_pid(rdb)
        rdb.kill_backend(pid, signal.SIGKILL)  # the postmaster then resets the whole cluster
        rig.wait_for_relay(rdb)
        n = len(load.committed)
        load.wait_for(n + 300)
    finish(rdb, rabbit, q, load, "rabbitmq kill -9 relay")
    assert rig.relay_pid(rdb) != pid


def test_a_bad_url_or_bad_credentials_show_in_the_status_and_nothing_is_lost(rdb, rabbit):
    rk = key()
    q = rabbit.bind_queue(EXCHANGE, rk)
    with rdb.connect() as c:
        err = None
        try:
            c.execute("ALTER SYSTEM SET outbox.amqp_url = 'http://127.0.0.1/'")
        except Exception as e:  # refused when set, with the reason
            err = str(e)
        assert err and "amqp://" in err, err
    try:
        set_and_reload(rdb, amqp_url=f"amqp://guest:guest@127.0.0.1:{rig.PG_PORT + 99}/%2f")
        st = rig.wait_for(
            "the refused connection in the status",
            lambda: (s := rig.relay_status(rdb))["state"] == "waiting for broker" and "refused" in (s["last_error"] or "").lower() and s)
        assert "guest:***@" in st["last_error"] and not st["broker_reachable"], st
        with rdb.connect() as c:
            first = str(c.execute("SELECT outbox_emit('Order', 'o1', 'X', '{}'::jsonb, '{}'::jsonb, %s)", (rk,)).fetchone()[0])
        rabbit.add_user("app", "right-password")
        set_and_reload(rdb, amqp_url=f"amqp://app:wrong-password@127.0.0.1:{rabbit.port}/%2f")
        st = rig.wait_for("the refused login in the status",
                          lambda: "ACCESS" in ((s := rig.relay_status(rdb))["last_error"] or "") and s)
        assert st["state"] == "waiting for broker" and "wrong-password" not in st["last_error"], st
        # The password from the properties file replaces the URL's.
        f = rdb.dir / "amqp.properties"
        f.write_text("# RabbitMQ login\npassword=right-password\n")
        rig.run(["chown", "postgres:postgres", str(f)])
        f.chmod(0o600)
        set_and_reload(rdb, amqp_properties_file=str(f))
        rig.wait_for_relay(rdb, timeout=30)
        with rdb.connect() as c:
            second = str(c.execute("SELECT outbox_emit('Order', 'o1', 'Y', '{}'::jsonb, '{}'::jsonb, %s)", (rk,)).fetchone()[0])
        rig.drain(rdb)
        assert [m["headers"]["id"] for m in rabbit.consume(q, expect=2, timeout=30, linger=1)] == [first, second]
    finally:
        set_and_reload(rdb, restart=True, amqp_url=rabbit.url(), amqp_properties_file=None)


def test_a_missing_exchange_is_refused_when_declaring_is_off(rdb, rabbit):
    try:
        missing = f"absent_{uuid.uuid4().hex[:8]}"
        set_and_reload(rdb, restart=True, amqp_exchange=missing, amqp_exchange_declare="off")
        with rdb.connect() as c:
            eid = str(c.execute("SELECT outbox_emit('Order', 'o1', 'X', '{}'::jsonb)").fetchone()[0])
        rig.drain(rdb)
        with rdb.connect() as c:
            reason = c.execute("SELECT reason FROM outbox_dead_letter WHERE id = %s", (eid,)).fetchone()[0]
        assert missing in reason and "does not exist" in reason, reason
    finally:
        set_and_reload(rdb, restart=True, amqp_exchange=None, amqp_exchange_declare=None)


def test_returns_are_matched_to_their_events_among_many_in_flight(rdb, rabbit):
    """One transaction interleaving routable and unroutable events: the
    server confirms them with multiple acks, and lapin hands each return to
    whichever confirm completes next; every unroutable event must still be
    the one dead-lettered, and every routable one delivered."""
    rk = key()
    q = rabbit.bind_queue(EXCHANGE, rk)
    nowhere = key()
    with rdb.connect(autocommit=False) as c:
        routed, lost = [], []
        for i in range(600):
            dest = nowhere if i % 3 == 0 else rk
            eid = str(c.execute("SELECT outbox_emit('Order', %s, 'Mixed', %s::jsonb, '{}'::jsonb, %s)",
                                (f"o{i % 7}", json.dumps({"i": i}), dest)).fetchone()[0])
            (lost if dest == nowhere else routed).append(eid)
        c.commit()
    rig.drain(rdb)
    got = [m["headers"]["id"] for m in rabbit.consume(q, expect=len(routed), timeout=60, linger=1)]
    assert got == routed, "every routable event, once, in commit order"
    with rdb.connect() as c:
        dl = [str(r[0]) for r in c.execute("SELECT id FROM outbox_dead_letter WHERE topic = %s ORDER BY commit_lsn, id",
                                           (nowhere,)).fetchall()]
    assert sorted(dl) == sorted(lost), f"{len(dl)} dead letters for {len(lost)} unroutable events"


def test_an_event_the_server_keeps_refusing_is_given_up_after_five_attempts(rdb, rabbit):
    """Hardening d7 end to end: RabbitMQ closes the channel over an event
    larger than its max_message_size, a failure that is not the event's
    fault as far as the relay can tell (transient). The stream restarts with
    a backoff (1, 2, 4, 8 s) and, at the fifth failure of the same event,
    handles it as a permanent rejection: dead-lettered with the count, and
    the events after it are delivered."""
    rk = key()
    q = rabbit.bind_queue(EXCHANGE, rk)
    size = rabbit.MAX_MESSAGE + 100_000
    set_and_reload(rdb, max_event_bytes=str(3 * rabbit.MAX_MESSAGE))
    try:
        with rdb.connect() as c:
            retries0 = rig.relay_status(rdb)["retries"]
            before = str(c.execute("SELECT outbox_emit('Order', 'o1', 'Before', '{}'::jsonb, '{}'::jsonb, %s)", (rk,)).fetchone()[0])
            big = str(c.execute("SELECT outbox_emit('Order', 'o1', 'Big', jsonb_build_object('x', repeat('y', %s)), '{}'::jsonb, %s)",
                                (size, rk)).fetchone()[0])
            after = str(c.execute("SELECT outbox_emit('Order', 'o1', 'After', '{}'::jsonb, '{}'::jsonb, %s)", (rk,)).fetchone()[0])
        t0 = time.monotonic()
        rig.drain(rdb, timeout_ms=120_000)
        took = time.monotonic() - t0
        with rdb.connect() as c:
            reason = c.execute("SELECT reason FROM outbox_dead_letter WHERE id = %s", (big,)).fetchone()[0]
        assert "failed 5 times in a row" in reason and "handled as a permanent rejection" in reason, reason
        assert "PRECONDITION" in reason or "max size" in reason, reason
        got = [m["headers"]["id"] for m in rabbit.consume(q, expect=2, timeout=30, linger=1)]
        assert got[0] == before and got[-1] == after and big not in got, got
        assert rig.relay_status(rdb)["retries"] - retries0 >= 4
        assert took >= 1 + 2 + 4 + 8, f"given up after {took:.1f} s: the backoff was not waited"
        print(f"\n[d7 give-up] dead-lettered after {took:.1f} s")
    finally:
        set_and_reload(rdb, restart=True, max_event_bytes=None)


def test_cloudevents_binary_with_either_prefix_and_structured(rdb, rabbit):
    """outbox.cloudevents on RabbitMQ, read back with the CloudEvents SDK:
    binary mode with the AMQP binding's prefix (cloudEvents_, as AMQP 1.0
    application properties) and with ce- (the SDK's RabbitMQ binding), then
    structured mode; the AMQP content_type property is datacontenttype."""
    from cloudevents.core.bindings import amqp, rabbitmq
    from cloudevents.core.formats.json import JSONFormat

    etype = f"Ce{uuid.uuid4().hex[:8]}"
    q = rabbit.bind_queue(EXCHANGE, etype)
    payload = {"total": 4200, "lines": [1, None]}

    def one():
        with rdb.connect() as c:
            i = str(c.execute("SELECT outbox_emit('Order', 'o-1', %s, %s::jsonb)", (etype, json.dumps(payload))).fetchone()[0])
        rig.drain(rdb)
        (m,) = rabbit.consume(q, expect=1, timeout=30, linger=0.5)
        return i, m, m["props"]

    def check(ev, i, props):
        assert (ev.get_specversion(), ev.get_id(), ev.get_source(), ev.get_type(), ev.get_subject()) == (
            "1.0", i, f"/outbox/{rig.DATABASE}", etype, "o-1")
        assert ev.get_data() == payload and ev.get_extension("partitionkey") == "o-1"
        assert int(ev.get_time().timestamp()) == props.timestamp, "time is the commit time"

    try:
        with_relay_restarted(rdb, cloudevents="binary")
        i, m, props = one()
        assert props.content_type == "application/json" and m["headers"]["cloudEvents_specversion"] == "1.0"
        check(amqp.from_binary(amqp.AMQPMessage(properties={"content-type": props.content_type},
                                                application_properties=m["headers"], application_data=m["value"]),
                               JSONFormat()), i, props)
        assert m["headers"]["id"] == i and m["headers"]["type"] == etype, "the outbox headers stay"

        with_relay_restarted(rdb, cloudevents_amqp_prefix="ce-")
        i, m, props = one()
        assert not [k for k in m["headers"] if k.startswith("cloudEvents")]
        check(rabbitmq.from_binary(rabbitmq.RabbitMQMessage(headers=m["headers"], content_type=props.content_type,
                                                            body=m["value"]), JSONFormat()), i, props)

        with_relay_restarted(rdb, cloudevents="structured", cloudevents_amqp_prefix=None)
        i, m, props = one()
        assert props.content_type == "application/cloudevents+json; charset=UTF-8"
        assert not [k for k in m["headers"] if k.startswith(("cloudEvents", "ce-"))]
        check(rabbitmq.from_structured(rabbitmq.RabbitMQMessage(headers=m["headers"], content_type=props.content_type,
                                                                body=m["value"]), JSONFormat()), i, props)
        assert json.loads(m["value"])["data"] == payload
        # Returned unroutable in structured mode: the dead letter is the
        # event (its payload, its own headers), not its CloudEvents form.
        with rdb.connect() as c:
            lost = str(c.execute("SELECT outbox_emit('Order', 'o-1', %s, %s::jsonb, '{\"tenant\": \"t1\"}', %s)",
                                 (etype, json.dumps(payload), f"nobody.{uuid.uuid4().hex[:8]}")).fetchone()[0])
        rig.drain(rdb)
        with rdb.connect() as c:
            row = c.execute("SELECT payload, headers, reason FROM outbox_dead_letter WHERE id = %s", (lost,)).fetchone()
            assert row is not None and row[0] == payload and row[1] == {"tenant": "t1"}, row
            c.execute("DELETE FROM outbox_dead_letter WHERE id = %s", (lost,))
    finally:
        with_relay_restarted(rdb, cloudevents=None, cloudevents_amqp_prefix=None)


def test_an_adopted_tables_rows_are_routed_by_the_router_options(rdb, rabbit):
    """A row of an application's own outbox table (outbox.tables): the
    routed value names the routing key (Debezium Server's RabbitMQ sink
    routes by the topic the router gives), the body is the payload's bytes,
    the headers are the router's (`id`, placements) plus `aggregateid` for
    the key; a tombstone is an empty body."""
    rk = key()
    q = rabbit.bind_queue(EXCHANGE, f"{rk}.Order")
    with rdb.connect() as c:
        c.execute("DROP TABLE IF EXISTS public.outboxevent")
        c.execute("CREATE TABLE public.outboxevent (id bigint PRIMARY KEY, aggregatetype text, aggregateid text, "
                  "type text, payload bytea)")
    try:
        with_relay_restarted(rdb, table_options=f"route.topic.replacement={rk}.${{routedByValue}}; "
                                                "route.tombstone.on.empty.payload=true; "
                                                "table.fields.additional.placement=type:header:eventType")
        with_relay_restarted(rdb, tables="public.outboxevent")
        with rdb.connect() as c:
            with c.transaction():
                c.execute("INSERT INTO public.outboxevent VALUES (1, 'Order', 'o1', 'Placed', '\\x00ff41'::bytea)")
                c.execute("INSERT INTO public.outboxevent VALUES (2, 'Order', 'o1', 'Gone', NULL)")
                c.execute("DELETE FROM public.outboxevent")
        rig.drain(rdb)
        got = rabbit.consume(q, expect=2, timeout=30, linger=1)
        assert [(m["value"], m["headers"]) for m in got] == [
            (b"\x00\xffA", {"id": "1", "eventType": "Placed", "aggregateid": "o1"}),
            (b"", {"id": "2", "eventType": "Gone", "aggregateid": "o1"})]
        assert all(m["routing_key"] == f"{rk}.Order" and m["props"].delivery_mode == 2 for m in got)
    finally:
        with_relay_restarted(rdb, tables=None)
        with_relay_restarted(rdb, table_options=None)
        with rdb.connect() as c:
            c.execute("DROP TABLE public.outboxevent")
