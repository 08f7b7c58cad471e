"""outbox_emit(), the outbox table and the ready trigger refuse bad input
before commit, with a SQLSTATE and a hint; privileges; settings."""

from contextlib import contextmanager


import pytest

import rig
from helpers import sqlstate_of

EMIT = "SELECT outbox_emit(%s, %s, %s, %s::jsonb, %s::jsonb, %s)"


def args(**over):
    a = {"at": "Order", "aid": "1", "typ": "Placed", "payload": "{}", "headers": "{}", "topic": None}
    a.update(over)
    return (a["at"], a["aid"], a["typ"], a["payload"], a["headers"], a["topic"])


@pytest.mark.parametrize(
    "over, sqlstate, message",
    [
        ({"at": None}, "22004", "aggregate type must not be NULL"),
        ({"aid": None}, "22004", "aggregate id must not be NULL"),
        ({"typ": None}, "22004", "event type must not be NULL"),
        ({"at": ""}, "22023", "aggregate type must not be empty"),
        ({"aid": ""}, "22023", "aggregate id must not be empty"),
        ({"typ": ""}, "22023", "event type must not be empty"),
        ({"payload": None}, "22004", "payload must not be NULL"),
        ({"headers": "[1]"}, "22023", "headers must be a JSON object, not an array"),
        ({"headers": '{"n": 1}'}, "22023", 'header "n" must be a JSON string, not a number'),
        ({"headers": '{"id": "x"}'}, "22023", 'header "id" is reserved'),
        ({"topic": "bad topic"}, "22023", "contains the character ' '"),
        ({"topic": "x" * 250}, "22023", "more than Kafka's 249"),
        ({"at": "Order Line"}, "22023", "which Kafka rejects"),
        ({"payload": '{"big": "' + "x" * 1_000_000 + '"}'}, "54000", "more than outbox.max_event_bytes"),
    ],
)
def test_emit_rejects_bad_input(db, over, sqlstate, message):
    with db.connect() as c:
        e = sqlstate_of(c, EMIT, args(**over))
        assert e.sqlstate == sqlstate, e
        assert message in str(e), str(e)
        assert e.diag.message_hint, "every refusal carries a hint"


def test_emit_accepts_json_null_and_returns_distinct_uuid_v7(db):
    with db.connect() as c:
        a = c.execute(EMIT, args(payload="null")).fetchone()[0]
        b = c.execute(EMIT, args(headers=None)).fetchone()[0]
        assert a != b and a.version == 7 and b.version == 7


def test_non_json_payload_is_refused_by_the_type(db):
    with db.connect() as c:
        e = sqlstate_of(c, EMIT, args(payload="{not json"))
        assert e.sqlstate == "22P02"


def test_read_only_transaction_is_refused(db):
    with db.connect(autocommit=False) as c:
        c.execute("SET TRANSACTION READ ONLY")
        e = sqlstate_of(c, EMIT, args())
        assert e.sqlstate == "25006" and "read-only transaction" in str(e)


def test_other_database_is_refused(db):
    db.create_database("elsewhere")
    with db.connect("elsewhere") as c:
        c.execute("CREATE EXTENSION IF NOT EXISTS outbox")
        e = sqlstate_of(c, EMIT, args())
        assert e.sqlstate == "55000"
        assert 'only be written in database "outbox_test", not "elsewhere"' in str(e)
        e = sqlstate_of(c, "INSERT INTO outbox.outbox (aggregatetype, aggregateid, type, payload) VALUES ('A', '1', 'T', '{}')")
        assert e.sqlstate == "55000"


@contextmanager
def other_cluster(name, port_offset, settings):
    """A second, short-lived cluster with the extension created; a connection to it."""
    with rig.other_server(name, port_offset, settings, relay=False) as other, other.connect() as c:
        yield c


def test_missing_or_foreign_slot_is_refused_with_the_fix():
    """A second cluster whose relay is switched off, so the test owns the slot."""
    with other_cluster("no_relay", 2, {"outbox.relay_enabled": "off"}) as c:
        e = sqlstate_of(c, EMIT, args())
        assert e.sqlstate == "55000" and 'slot "outbox" does not exist' in str(e)
        assert "pg_create_logical_replication_slot('outbox', 'outbox')" in e.diag.message_hint
        e = sqlstate_of(c, "INSERT INTO outbox.outbox (aggregatetype, aggregateid, type, payload) VALUES ('A', '1', 'T', '{}')")
        assert 'slot "outbox" does not exist' in str(e)
        c.execute("SELECT pg_create_logical_replication_slot('outbox', 'test_decoding')")
        e = sqlstate_of(c, EMIT, args())
        assert "is not an outbox slot of this database" in str(e)
        c.execute("SELECT pg_drop_replication_slot('outbox')")
        c.execute("SELECT pg_create_logical_replication_slot('outbox', 'outbox')")
        assert c.execute(EMIT, args()).fetchone()[0]


BAD_ROWS = [
    # values, SQLSTATE from the guard trigger, message, constraint that also refuses it
    ("('', '1', 'T', '{}', '{}')", "22023", "aggregate type must not be empty", "outbox_aggregatetype_not_empty"),
    ("('A', '', 'T', '{}', '{}')", "22023", "aggregate id must not be empty", "outbox_aggregateid_not_empty"),
    ("('A', '1', '', '{}', '{}')", "22023", "event type must not be empty", "outbox_type_not_empty"),
    ("('A', '1', 'T', NULL, '{}')", "22004", "payload must not be NULL", "payload"),
    ("('A', '1', 'T', '{}', '[]')", "22023", "must be a JSON object", "outbox_headers_valid"),
    ("('A', '1', 'T', '{}', '{\"n\": 1}')", "22023", "must be a JSON string", "outbox_headers_valid"),
    ("('A', '1', 'T', '{}', '{\"type\": \"x\"}')", "22023", "is reserved", "outbox_headers_valid"),
    ("('A b', '1', 'T', '{}', '{}')", "22023", "which Kafka rejects", None),
    ("('A', '1', 'T', jsonb_build_object('b', repeat('x', 1000000)), '{}')", "54000", "outbox.max_event_bytes", None),
]


@pytest.mark.parametrize("values, sqlstate, message, constraint", BAD_ROWS)
def test_table_rejects_bad_rows(db, values, sqlstate, message, constraint):
    insert = f"INSERT INTO outbox.outbox (aggregatetype, aggregateid, type, payload, headers) VALUES {values}"
    with db.connect() as c:
        e = sqlstate_of(c, insert)
        assert e.sqlstate == sqlstate, e
        assert message in str(e), str(e)
        if constraint:
            # Without triggers (session_replication_role = replica, as in a
            # logical replica or a restore), the constraints still refuse it.
            c.execute("SET session_replication_role = replica")
            e = sqlstate_of(c, insert)
            c.execute("RESET session_replication_role")
            assert e.sqlstate in ("23514", "23502") and constraint in str(e), str(e)


def test_ready_trigger_refuses_bad_setups_at_first_row(db):
    with db.connect() as c:
        c.execute("CREATE TABLE IF NOT EXISTS trg_bad (id int, v text)")
        cases = [
            ("BEFORE INSERT", "('Order', 'id')", "39P01", "must be fired AFTER"),
            ("AFTER INSERT", "('Order')", "22023", "takes 2 to 5 arguments"),
            ("AFTER INSERT", "('Order', 'nope')", "42703", 'has no column "nope"'),
        ]
        for when, fargs, sqlstate, message in cases:
            c.execute("DROP TRIGGER IF EXISTS t ON trg_bad")
            c.execute(f"CREATE TRIGGER t {when} ON trg_bad FOR EACH ROW EXECUTE FUNCTION outbox_row_trigger{fargs}")
            e = sqlstate_of(c, "INSERT INTO trg_bad VALUES (1, 'x')")
            assert e.sqlstate == sqlstate and message in str(e), str(e)
        c.execute("DROP TRIGGER IF EXISTS t ON trg_bad")
        c.execute("CREATE TRIGGER t AFTER INSERT ON trg_bad FOR EACH STATEMENT EXECUTE FUNCTION outbox_row_trigger('Order', 'id')")
        e = sqlstate_of(c, "INSERT INTO trg_bad VALUES (1, 'x')")
        assert e.sqlstate == "39P01"
        c.execute("DROP TRIGGER t ON trg_bad")
        # A NULL key is an empty aggregate id: refused.
        c.execute("CREATE TRIGGER t AFTER INSERT ON trg_bad FOR EACH ROW EXECUTE FUNCTION outbox_row_trigger('Order', 'v')")
        e = sqlstate_of(c, "INSERT INTO trg_bad VALUES (1, NULL)")
        assert e.sqlstate == "22004" and "aggregate id must not be NULL" in str(e)
        c.execute("DROP TRIGGER t ON trg_bad")


def test_privileges_producer_role_only(db):
    with db.connect() as c:
        for r in ("plain_user", "producer_user"):
            c.execute(f"DROP ROLE IF EXISTS {r}")
            c.execute(f"CREATE ROLE {r} LOGIN")
        c.execute("GRANT outbox_producer TO producer_user")
        c.execute("GRANT CREATE ON SCHEMA public TO producer_user, plain_user")
    plain = db.connect(user="plain_user")
    e = sqlstate_of(plain, EMIT, args())
    assert e.sqlstate == "42501" and "permission denied for function outbox_emit" in str(e)
    e = sqlstate_of(plain, "INSERT INTO outbox.outbox (aggregatetype, aggregateid, type, payload) VALUES ('A', '1', 'T', '{}')")
    assert e.sqlstate == "42501"
    plain.execute("CREATE TABLE plain_t (id int)")
    e = sqlstate_of(plain, "CREATE TRIGGER t AFTER INSERT ON plain_t FOR EACH ROW EXECUTE FUNCTION outbox_row_trigger('A', 'id')")
    assert e.sqlstate == "42501"
    plain.close()

    prod = db.connect(user="producer_user")
    assert prod.execute(EMIT, args()).fetchone()[0]
    prod.execute("INSERT INTO outbox.outbox (aggregatetype, aggregateid, type, payload) VALUES ('A', '1', 'T', '{}')")
    # Insert only: no reading or deleting others' events, no slot access.
    assert sqlstate_of(prod, "SELECT * FROM outbox.outbox").sqlstate == "42501"
    assert sqlstate_of(prod, "DELETE FROM outbox.outbox").sqlstate == "42501"
    assert sqlstate_of(prod, "SELECT pg_drop_replication_slot('outbox')").sqlstate == "42501"
    assert sqlstate_of(prod, "SELECT * FROM pg_logical_slot_peek_changes('outbox', NULL, NULL)").sqlstate == "42501"
    assert sqlstate_of(prod, "SHOW outbox.kafka_properties").sqlstate == "42501"
    assert sqlstate_of(prod, "SELECT outbox_drain(1)").sqlstate == "42501"
    assert sqlstate_of(prod, "SELECT outbox_relay_resume()").sqlstate == "42501"
    # Operations are not the producer's: status, dead letters, re-publishing.
    assert sqlstate_of(prod, "SELECT * FROM outbox_status").sqlstate == "42501"
    assert sqlstate_of(prod, "SELECT * FROM outbox_dead_letter").sqlstate == "42501"
    assert sqlstate_of(prod, "SELECT outbox_dead_letter_republish()").sqlstate == "42501"
    assert sqlstate_of(prod, "SELECT outbox_emit_with_id(gen_random_uuid(), 'A', '1', 'T', '{}', '{}', NULL)").sqlstate == "42501"
    prod.close()


def test_monitoring_role_reads_status_but_not_the_secrets_file(db):
    """pg_monitor reads the status. It can read every setting (through
    pg_read_all_settings), so secrets go in outbox.kafka_properties_file,
    which it cannot read."""
    secret = "s3cret-Pa55"
    path = rig.RUN / "kafka-secrets.conf"
    path.write_text(f"# relay credentials\nsasl.username = outbox\nsasl.password = {secret}\n")
    rig.run(["chown", "postgres:postgres", str(path)])
    path.chmod(0o600)
    with db.connect() as c:
        c.execute("DROP ROLE IF EXISTS monitor_user")
        c.execute("CREATE ROLE monitor_user LOGIN IN ROLE pg_monitor")
    from test_relay_limits import set_conf
    set_conf(db, "outbox.kafka_properties_file", str(path), restarts_relay=True)
    try:
        mon = db.connect(user="monitor_user")
        cur = mon.execute("SELECT * FROM outbox_status")
        row = dict(zip([d.name for d in cur.description], cur.fetchone()))
        assert row["state"] == "streaming" and row["slot_name"] == "outbox"
        assert secret not in repr(row)
        samples, = mon.execute("SELECT samples FROM outbox_relay_latency()").fetchone()
        assert isinstance(samples, int), "pg_monitor may read the latency histogram"
        settings = mon.execute("SELECT string_agg(name || '=' || coalesce(setting, ''), ' ') FROM pg_settings WHERE name LIKE 'outbox.%'").fetchone()[0]
        assert str(path) in settings and secret not in settings
        assert sqlstate_of(mon, "SELECT pg_read_file(%s)", (str(path),)).sqlstate == "42501"
        assert sqlstate_of(mon, "SELECT outbox_relay_resume()").sqlstate == "42501"
        assert sqlstate_of(mon, "SELECT * FROM outbox_dead_letter").sqlstate == "42501"
        mon.close()
        # The producer role cannot see the file's name either.
        with db.connect() as c:
            c.execute("DROP ROLE IF EXISTS producer_only")
            c.execute("CREATE ROLE producer_only LOGIN IN ROLE outbox_producer")
        prod = db.connect(user="producer_only")
        assert sqlstate_of(prod, "SHOW outbox.kafka_properties_file").sqlstate == "42501"
        prod.close()
    finally:
        set_conf(db, "outbox.kafka_properties_file", None, restarts_relay=True)
        path.unlink()


def test_settings_are_validated_and_the_prefix_is_reserved(db):
    with db.connect() as c:
        assert c.execute("SHOW outbox.topic_template").fetchone()[0] == "outbox.event.${aggregatetype}"
        assert c.execute("SHOW outbox.max_event_bytes").fetchone()[0] == "999000B"
        for name, value, message in [
            ("outbox.topic_template", "a b.${aggregatetype}", "which Kafka rejects"),
            ("outbox.topic_template", "x.${routedByValue}", "unknown placeholder"),
            ("outbox.kafka_properties", "linger.ms", "key=value"),
            ("outbox.slot_name", "Bad-Name", "lower-case"),
            ("outbox.max_event_bytes", "10", "outside the valid range"),
            ("outbox.max_retained_wal", "0", "use -1 for no limit"),
            ("outbox.on_rejected_event", "skip", "invalid value for parameter"),
            ("outbox.kafka_properties_file", "/nonexistent/kafka.conf", "cannot read"),
            ("outbox.kafka_properties_file", "relative.conf", "must be an absolute path"),
        ]:
            e = sqlstate_of(c, f"ALTER SYSTEM SET {name} = '{value}'")
            assert e.sqlstate == "22023" and message in str(e), (name, str(e))
        e = sqlstate_of(c, "SET outbox.slotname = 'x'")
        assert e.sqlstate == "42602" and ("reserved prefix" in str(e).lower() or "invalid configuration parameter" in str(e)), str(e)
        e = sqlstate_of(c, "SET outbox.topic_template = 'x'")
        assert e.sqlstate == "55P02"  # reloadable, not settable per session


def test_topic_template_reload_changes_routing_checks(db):
    with db.connect() as c:
        c.execute("ALTER SYSTEM SET outbox.topic_template = 'events.${type}'")
        db.reload()
        try:
            rig.wait_for("the reload", lambda: c.execute("SHOW outbox.topic_template").fetchone()[0] == "events.${type}")
            fresh = db.connect()
            e = sqlstate_of(fresh, EMIT, args(typ="Bad Type"))
            assert e.sqlstate == "22023" and "events.${type}" not in str(e) and "outbox.topic_template" in e.diag.message_hint
            assert fresh.execute(EMIT, args(at="Any Thing")).fetchone()[0]
            fresh.close()
        finally:
            c.execute("ALTER SYSTEM RESET outbox.topic_template")
            db.reload()


def test_wal_level_replica_is_refused():
    with other_cluster("wal_level_replica", 1, {"wal_level": "replica"}) as c:
        e = sqlstate_of(c, EMIT, args())
        assert e.sqlstate == "55000" and "wal_level = logical" in str(e)
