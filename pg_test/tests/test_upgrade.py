"""ALTER EXTENSION outbox UPDATE from 0.1.0 as released (its install script
is kept in pg_test/fixtures), with events in flight across it, and the
extension's own table in schema outbox, beside a user's table named outbox."""

import json

import rig
from helpers import sqlstate_of

ROWS = "INSERT INTO {table} (aggregatetype, aggregateid, type, payload) VALUES (%s, 'k', 'T', %s::jsonb)"


def emit(c, agg, n):
    c.execute("SELECT outbox_emit(%s, 'k', 'T', %s::jsonb, '{}', %s)", (agg, json.dumps({"n": n}), f"outbox.event.{agg}"))


def extension_catalog(pg: rig.Postgres, dbname: str) -> dict:
    """Everything the extension's scripts made, by name: its member objects
    and, for each, the definition, options, grants and comment PostgreSQL
    keeps (OIDs aside), plus the tables' columns, constraints, indexes and
    triggers."""
    q = {
        "members": """
            SELECT pg_describe_object(classid, objid, 0) FROM pg_depend
             WHERE refclassid = 'pg_extension'::regclass AND deptype = 'e'
               AND refobjid = (SELECT oid FROM pg_extension WHERE extname = 'outbox')""",
        "functions": """
            SELECT p.oid::regprocedure::text, pg_get_functiondef(p.oid), p.prosecdef, p.proconfig::text,
                   p.proacl::text, obj_description(p.oid, 'pg_proc')
              FROM pg_proc p JOIN pg_depend d ON d.objid = p.oid AND d.classid = 'pg_proc'::regclass AND d.deptype = 'e'
              JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'outbox'""",
        "relations": """
            SELECT c.oid::regclass::text, c.relkind::text, c.relacl::text, obj_description(c.oid, 'pg_class'),
                   CASE WHEN c.relkind = 'v' THEN pg_get_viewdef(c.oid) END
              FROM pg_class c JOIN pg_depend d ON d.objid = c.oid AND d.classid = 'pg_class'::regclass AND d.deptype = 'e'
              JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'outbox'""",
        "columns": """
            SELECT a.attrelid::regclass::text, a.attnum, a.attname::text, format_type(a.atttypid, a.atttypmod),
                   a.attnotnull, pg_get_expr(ad.adbin, ad.adrelid)
              FROM pg_attribute a LEFT JOIN pg_attrdef ad ON ad.adrelid = a.attrelid AND ad.adnum = a.attnum
             WHERE a.attrelid IN ('outbox.outbox'::regclass, 'outbox_dead_letter'::regclass, 'outbox_status'::regclass)
               AND a.attnum > 0 AND NOT a.attisdropped""",
        "constraints": """
            SELECT conrelid::regclass::text, conname::text, pg_get_constraintdef(oid) FROM pg_constraint
             WHERE conrelid IN ('outbox.outbox'::regclass, 'outbox_dead_letter'::regclass)""",
        "indexes": """
            SELECT indexrelid::regclass::text, pg_get_indexdef(indexrelid) FROM pg_index
             WHERE indrelid IN ('outbox.outbox'::regclass, 'outbox_dead_letter'::regclass)""",
        "triggers": """
            SELECT tgname::text, pg_get_triggerdef(oid) FROM pg_trigger
             WHERE tgrelid IN ('outbox.outbox'::regclass, 'outbox_dead_letter'::regclass)""",
        "schemas": """
            SELECT nspname::text, nspacl::text, obj_description(oid, 'pg_namespace'), nspowner::regrole::text FROM pg_namespace
             WHERE nspname IN ('outbox', 'public')""",
        "owners": """
            SELECT pg_describe_object(d.classid, d.objid, 0),
                   coalesce((SELECT proowner FROM pg_proc WHERE oid = d.objid AND d.classid = 'pg_proc'::regclass),
                            (SELECT relowner FROM pg_class WHERE oid = d.objid AND d.classid = 'pg_class'::regclass),
                            (SELECT nspowner FROM pg_namespace WHERE oid = d.objid AND d.classid = 'pg_namespace'::regclass))::regrole::text
              FROM pg_depend d JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'outbox'
             WHERE d.refclassid = 'pg_extension'::regclass AND d.deptype = 'e'""",
        "init_privs": """
            SELECT pg_describe_object(classoid, objoid, objsubid), privtype::text, initprivs::text FROM pg_init_privs
             WHERE (classoid, objoid) IN (SELECT d.classid, d.objid FROM pg_depend d JOIN pg_extension e ON e.oid = d.refobjid
                                           WHERE e.extname = 'outbox' AND d.refclassid = 'pg_extension'::regclass AND d.deptype = 'e')""",
        "dumped": "SELECT extconfig::regclass[]::text, extcondition::text FROM pg_extension WHERE extname = 'outbox'",
    }
    with pg.connect(dbname) as c:
        return {k: sorted(tuple(map(str, r)) for r in c.execute(sql).fetchall()) for k, sql in q.items()}


SLOT_ACTIVE = "SELECT active FROM pg_replication_slots WHERE slot_name = 'outbox'"


def server_with_0_1_0(name: str, port_offset: int) -> rig.Postgres:
    """A server of its own (started after the `pg` fixture installed the
    library) with 0.1.0 installed and its relay holding its slot."""
    pg = rig.Postgres(run_dir=rig.RUN / name, port=rig.PG_PORT + port_offset)
    pg.init()
    pg.start()
    try:
        pg.create_database()
        with pg.connect() as c:
            c.execute("CREATE EXTENSION outbox VERSION '0.1.0'")
            rig.wait_for("the relay's slot", lambda: c.execute(SLOT_ACTIVE).fetchone() == (True,))
    except BaseException:
        pg.stop(mode="immediate", check=False)
        raise
    return pg


def relay_off(c):
    """The relay off, its slot released: what commits now waits in WAL."""
    c.execute("ALTER SYSTEM SET outbox.relay_enabled = off")
    c.execute("SELECT pg_reload_conf()")
    rig.wait_for("the relay to release its slot", lambda: c.execute(SLOT_ACTIVE).fetchone() == (False,))


def relay_on(c):
    c.execute("ALTER SYSTEM RESET outbox.relay_enabled")
    c.execute("SELECT pg_reload_conf()")


def test_update_from_0_1_0_with_events_in_flight(pg, broker):
    """0.1.0 installed and publishing; the relay then off while events
    commit (in the table, then still in the extension's schema, and through
    outbox_emit()); ALTER EXTENSION outbox UPDATE moves the table; more
    events; a user's own table named outbox created beside it; the relay
    on again. Every event once, in order, the moved table's rows deleted
    once published, and the updated catalog the same as a fresh install's."""
    agg = rig.unique_topic("Up").replace(".", "_")
    topic = f"outbox.event.{agg}"
    pg = server_with_0_1_0("upgrade", 18)
    try:
        with pg.connect() as c:
            # The 0.2.0 library under 0.1.0's SQL: its status function
            # declares other columns. A clear error, not a crashed server.
            e = sqlstate_of(c, "SELECT * FROM outbox_status")
            assert e.sqlstate == "55000", e
            assert "(version 0.1.0)" in str(e) and "ALTER EXTENSION outbox UPDATE" in e.diag.message_hint
            emit(c, agg, 0)
            c.execute(ROWS.format(table="outbox"), (agg, json.dumps({"n": 1})))
            assert c.execute("SELECT to_regclass('public.outbox') IS NOT NULL").fetchone()[0], "0.1.0's layout"
            assert c.execute("SELECT outbox_drain(60000)").fetchone()[0]
            assert c.execute("SELECT count(*) FROM public.outbox").fetchone()[0] == 0, "published rows deleted"

            # The relay off: what commits now waits in WAL across the update.
            relay_off(c)
            c.execute(ROWS.format(table="outbox"), (agg, json.dumps({"n": 2})))
            emit(c, agg, 3)

            c.execute("ALTER EXTENSION outbox UPDATE")
            assert c.execute("SELECT extversion FROM pg_extension WHERE extname = 'outbox'").fetchone()[0] == "0.2.0"
            assert c.execute("SELECT to_regclass('public.outbox')").fetchone()[0] is None
            assert c.execute("SELECT count(*) FROM outbox.outbox").fetchone()[0] == 1, "the row in flight moved"
            c.execute(ROWS.format(table="outbox.outbox"), (agg, json.dumps({"n": 4})))
            emit(c, agg, 5)
            # A user's own table named outbox (Debezium's usual name) now
            # fits beside the extension; its rows are not the extension's.
            c.execute("CREATE TABLE public.outbox (LIKE outbox.outbox INCLUDING DEFAULTS)")
            c.execute(ROWS.format(table="public.outbox"), (agg, json.dumps({"n": 99})))

            relay_on(c)
        status = rig.wait_for_relay(pg)
        assert status["sink"] == "kafka"
        rig.drain(pg)
        got = broker.consume(topic, expect=6, timeout=60, linger=1.5)
        assert [json.loads(m["value"])["n"] for m in got] == [0, 1, 2, 3, 4, 5]
        with pg.connect() as c:
            assert c.execute("SELECT count(*) FROM outbox.outbox").fetchone()[0] == 0, "published rows deleted"
            assert c.execute("SELECT count(*) FROM public.outbox").fetchone()[0] == 1, "the user's row left alone"

        # A fresh install (beside a user's table named outbox) and the
        # updated one have the same catalog.
        pg.create_database("fresh")
        with pg.connect("fresh") as c:
            c.execute("CREATE TABLE public.outbox (id bigint PRIMARY KEY, payload jsonb)")
            c.execute("CREATE EXTENSION outbox")
        updated, fresh = extension_catalog(pg, rig.DATABASE), extension_catalog(pg, "fresh")
        assert updated["members"] and updated["functions"] and updated["columns"]
        for part in updated:
            assert updated[part] == fresh[part], f"{part} differ after the update:\n{updated[part]}\n{fresh[part]}"
    finally:
        pg.stop(mode="immediate", check=False)


def is_member(c, table: str) -> bool:
    return c.execute(
        "SELECT EXISTS (SELECT FROM pg_depend d JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'outbox' "
        "WHERE d.classid = 'pg_class'::regclass AND d.objid = %s::regclass AND d.deptype = 'e')", (table,)).fetchone()[0]


def fresh_database(db, name):
    with db.connect("postgres") as c:
        c.execute(f"DROP DATABASE IF EXISTS {name}")
        c.execute(f"CREATE DATABASE {name}")


def test_a_schema_named_outbox_is_refused_with_the_fix(db):
    """The extension owns schema outbox: a database that has one of its
    own gets a clear error at CREATE EXTENSION and at the update, nothing
    half made; the fix works; installed in that schema, it keeps its table
    there."""
    fresh_database(db, "schema_taken")
    try:
        with db.connect("schema_taken") as c:
            c.execute("CREATE SCHEMA outbox")
            c.execute("CREATE TABLE outbox.outbox (id uuid)")
            e = sqlstate_of(c, "CREATE EXTENSION outbox")
            assert e.sqlstate == "42P06", e
            assert 'schema "outbox" already exists' in str(e) and "ALTER SCHEMA outbox RENAME" in e.diag.message_hint
            assert c.execute("SELECT count(*) FROM pg_extension WHERE extname = 'outbox'").fetchone()[0] == 0
            # 0.1.0 did not use the schema; the update to 0.2.0 needs it.
            c.execute("CREATE EXTENSION outbox VERSION '0.1.0'")
            e = sqlstate_of(c, "ALTER EXTENSION outbox UPDATE")
            assert e.sqlstate == "42P06" and "then run ALTER EXTENSION outbox UPDATE again" in e.diag.message_hint, e
            assert c.execute("SELECT extversion FROM pg_extension WHERE extname = 'outbox'").fetchone()[0] == "0.1.0"
            assert is_member(c, "public.outbox"), "the failed update left the table where it was"
            c.execute("ALTER SCHEMA outbox RENAME TO app_outbox")
            c.execute("ALTER EXTENSION outbox UPDATE")
            assert is_member(c, "outbox.outbox") and not is_member(c, "app_outbox.outbox")
    finally:
        with db.connect("postgres") as c:
            c.execute("DROP DATABASE schema_taken")
    fresh_database(db, "in_schema_outbox")
    try:
        with db.connect("in_schema_outbox") as c:
            c.execute("CREATE SCHEMA outbox")
            c.execute("CREATE EXTENSION outbox SCHEMA outbox")
            assert is_member(c, "outbox.outbox")
            assert c.execute("SELECT pg_get_function_identity_arguments('outbox.outbox_emit'::regproc) <> ''").fetchone()[0]
            c.execute("DROP EXTENSION outbox")
            assert c.execute("SELECT count(*) FROM pg_namespace WHERE nspname = 'outbox'").fetchone()[0] == 1, \
                "the user's schema stays"
    finally:
        with db.connect("postgres") as c:
            c.execute("DROP DATABASE in_schema_outbox")


def test_drop_extension_drops_its_schema_and_only_it(db):
    fresh_database(db, "drop_ext")
    try:
        with db.connect("drop_ext") as c:
            c.execute("CREATE TABLE public.outbox (id bigint)")
            c.execute("CREATE EXTENSION outbox")
            c.execute("DROP EXTENSION outbox")
            assert c.execute("SELECT count(*) FROM pg_namespace WHERE nspname = 'outbox'").fetchone()[0] == 0
            assert c.execute("SELECT to_regclass('public.outbox')::text").fetchone()[0] == "outbox"
    finally:
        with db.connect("postgres") as c:
            c.execute("DROP DATABASE drop_ext")


def relay_waits_on_a_lock(c) -> bool:
    return c.execute(
        "SELECT EXISTS (SELECT FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
        "WHERE a.backend_type = 'outbox relay' AND NOT l.granted)").fetchone()[0]


def test_update_while_the_relay_deletes_rows_and_drop_with_rows_in_flight(pg, broker):
    """The relay deletes published rows while ALTER EXTENSION outbox UPDATE
    holds the table: it waits for the update and deletes under the new name
    (no error, no restart, nothing sent twice). Then rows in flight when
    the extension is dropped: published (they committed), nothing left to
    delete, the relay goes on."""
    agg = rig.unique_topic("Up").replace(".", "_")
    topic = f"outbox.event.{agg}"
    pg = server_with_0_1_0("upgrade_live", 19)
    try:
        with pg.connect() as c, pg.connect() as upd:
            relay_off(c)
            for n in range(10):
                c.execute(ROWS.format(table="outbox"), (agg, json.dumps({"n": n})))
            # The update holds the table until it commits.
            upd.execute("BEGIN")
            upd.execute("ALTER EXTENSION outbox UPDATE")
            relay_on(c)
            rig.wait_for("the relay's delete to wait for the update", lambda: relay_waits_on_a_lock(c), timeout=60)
            pid = rig.relay_pid(pg)
            upd.execute("COMMIT")
            rig.wait_for("the published rows deleted", lambda: c.execute("SELECT count(*) FROM outbox.outbox").fetchone()[0] == 0)
            rig.drain(pg)
            assert rig.relay_pid(pg) == pid, "the relay restarted"

            # Rows in flight when the extension is dropped.
            relay_off(c)
            for n in range(10, 13):
                c.execute(ROWS.format(table="outbox.outbox"), (agg, json.dumps({"n": n})))
            end = c.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
            c.execute("DROP EXTENSION outbox")
            relay_on(c)
            rig.wait_for("the relay to confirm past the rows", lambda: c.execute(
                "SELECT confirmed_flush_lsn >= %s FROM pg_replication_slots WHERE slot_name = 'outbox'", (end,)).fetchone()[0],
                timeout=60)
            pid = rig.relay_pid(pg)
        got = broker.consume(topic, expect=13, timeout=60, linger=1.5)
        assert [json.loads(m["value"])["n"] for m in got] == list(range(13)), "each event once, in order"
        assert rig.relay_pid(pg) == pid
        assert "could not delete published outbox rows" not in pg.log_text()
    finally:
        pg.stop(mode="immediate", check=False)
