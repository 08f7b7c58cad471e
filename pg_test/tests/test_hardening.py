"""Issue 9, hardening: one test per defect, named after it (d<N>_...).
Each fails on 0.1.0 and passes with the fix; the closing note maps them."""

import datetime
import json
import os
import shutil
import socket
import threading
import time
import uuid

import rig
from helpers import decoded, first_occurrences, lsn_int, scratch_slot, sqlstate_of, with_relay_restarted
from test_relay_limits import emit, set_conf


def is_superuser(db, role):
    with db.connect() as c:
        return c.execute("SELECT rolsuper FROM pg_roles WHERE rolname = %s", (role,)).fetchone()[0]


def fresh_role(c, role, *grants):
    """A new login role (one left by an interrupted run is dropped first)."""
    if c.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone():
        c.execute(f"DROP OWNED BY {role}")
        c.execute(f"DROP ROLE {role}")
    c.execute(f"CREATE ROLE {role} LOGIN")
    for g in grants:
        c.execute(g)


def assert_properties_refused(conn, values, message):
    """Each value of outbox.kafka_properties is refused at ALTER SYSTEM
    (invalid_parameter_value) with `message` in the error."""
    for value in values:
        e = sqlstate_of(conn, f"ALTER SYSTEM SET outbox.kafka_properties = '{value}'")
        assert e.sqlstate == "22023" and message in str(e), (value, str(e))


# ------------------------------------------------------------ security


def test_d1_row_trigger_runs_casts_with_the_writers_rights_not_the_owners(db):
    """An outbox_producer member gives its enum a cast to json that tries to
    make it superuser, and attaches outbox_row_trigger() to its table. The
    row's JSON is built as the writer: the cast runs as mallory (or as the
    plain writer it granted INSERT to), never as the function's owner."""
    with db.connect() as c:
        c.execute("DROP SCHEMA IF EXISTS mallory CASCADE")
        fresh_role(c, "mallory", "GRANT outbox_producer TO mallory")
        fresh_role(c, "table_writer")
        c.execute("CREATE SCHEMA mallory AUTHORIZATION mallory")
        c.execute("GRANT USAGE ON SCHEMA mallory TO table_writer")
    m = db.connect(user="mallory")
    try:
        m.execute("CREATE TYPE mallory.mood AS ENUM ('ok')")
        m.execute(
            """CREATE FUNCTION mallory.mood_json(mallory.mood) RETURNS json LANGUAGE plpgsql AS $$
               BEGIN
                   BEGIN
                       EXECUTE 'ALTER ROLE mallory SUPERUSER';
                   EXCEPTION WHEN insufficient_privilege THEN NULL;
                   END;
                   RETURN pg_catalog.to_json(current_user::text);
               END $$"""
        )
        m.execute("CREATE CAST (mallory.mood AS json) WITH FUNCTION mallory.mood_json(mallory.mood)")
        m.execute("CREATE TABLE mallory.t (id int PRIMARY KEY, m mallory.mood)")
        m.execute("CREATE TRIGGER t_outbox AFTER INSERT ON mallory.t FOR EACH ROW EXECUTE FUNCTION outbox_row_trigger('Mood', 'id')")
        m.execute("GRANT INSERT ON mallory.t TO table_writer")
        with db.connect() as c, scratch_slot(c) as slot:
            m.execute("INSERT INTO mallory.t VALUES (1, 'ok')")
            w = db.connect(user="table_writer")
            w.execute("INSERT INTO mallory.t VALUES (2, 'ok')")  # no outbox_producer: published through the trigger
            w.close()
            events = decoded(c, slot)
        assert not is_superuser(db, "mallory")
        assert [(e["aggregateid"], e["type"], e["payload"]) for e in events] == [
            ("1", "MoodCreated", {"id": 1, "m": "mallory"}),
            ("2", "MoodCreated", {"id": 2, "m": "table_writer"}),
        ]
    finally:
        m.close()
        with db.connect() as c:
            c.execute("DROP SCHEMA mallory CASCADE")
            c.execute("DROP ROLE mallory")
            c.execute("DROP ROLE table_writer")


def test_d2_worker_sql_ignores_functions_and_operators_planted_on_its_search_path(db, broker):
    """A role with CREATE on public (every database upgraded from PG 14
    defaults) plants quote_ident(name) and *(bigint, interval), exact matches
    for what the worker's SQL called, each trying to make it superuser. The
    worker deletes a published table row and writes a dead letter: neither
    reaches the planted code."""
    with db.connect() as c:
        fresh_role(c, "planter", "GRANT outbox_producer TO planter", "GRANT CREATE ON SCHEMA public TO planter")
        c.execute("DELETE FROM outbox_dead_letter")
    p = db.connect(user="planter")
    topic = rig.unique_topic("planted")
    try:
        p.execute(
            """CREATE FUNCTION public.quote_ident(name) RETURNS text LANGUAGE plpgsql AS $$
               BEGIN EXECUTE 'ALTER ROLE planter SUPERUSER'; RETURN pg_catalog.quote_ident($1::text); END $$"""
        )
        p.execute(
            """CREATE FUNCTION public.planted_mul(bigint, interval) RETURNS interval LANGUAGE plpgsql AS $$
               BEGIN EXECUTE 'ALTER ROLE planter SUPERUSER'; RETURN $1::float8 * $2; END $$"""
        )
        p.execute("CREATE OPERATOR public.* (LEFTARG = bigint, RIGHTARG = interval, FUNCTION = public.planted_mul)")
        # The restart makes the worker look its schema up again; the
        # producer's size limit makes the big event a dead letter.
        set_conf(db, "outbox.kafka_properties", "message.max.bytes=20000", restarts_relay=True)
        row_id = str(uuid.uuid4())
        p.execute(
            "INSERT INTO outbox.outbox (id, aggregatetype, aggregateid, type, payload) VALUES (%s, 'Order', 'k', 'T', '{}')", (row_id,)
        )
        big = emit(p, topic, "k", {"blob": "x" * 30000})
        rig.drain(db)
        assert not is_superuser(db, "planter")
        with db.connect() as c:
            assert c.execute("SELECT count(*) FROM outbox.outbox WHERE id = %s", (row_id,)).fetchone()[0] == 0, "row deleted"
            dl = c.execute("SELECT id, committed_at > now() - interval '1 hour' FROM outbox_dead_letter").fetchall()
        assert [(str(i), recent) for i, recent in dl] == [(str(big), True)]
    finally:
        p.close()
        set_conf(db, "outbox.kafka_properties", None, restarts_relay=True)
        with db.connect() as c:
            c.execute("DROP OPERATOR IF EXISTS public.* (bigint, interval)")
            c.execute("DROP FUNCTION IF EXISTS public.planted_mul(bigint, interval)")
            c.execute("DROP FUNCTION IF EXISTS public.quote_ident(name)")
            c.execute("DELETE FROM outbox_dead_letter")
            c.execute("REVOKE CREATE ON SCHEMA public FROM planter")
            c.execute("DROP ROLE planter")


def test_d3_code_loading_properties_are_refused_in_a_delegated_setting(db):
    """GRANT ALTER SYSTEM ON PARAMETER outbox.kafka_properties hands a role
    the setting; it must not hand it a way to load a library or run a
    command as the server's OS user."""
    with db.connect() as c:
        fresh_role(c, "kafka_admin", "GRANT ALTER SYSTEM ON PARAMETER outbox.kafka_properties TO kafka_admin")
    d = db.connect(user="kafka_admin")
    try:
        assert_properties_refused(d, [
            "plugin.library.paths=/tmp/evil.so",
            "sasl.kerberos.kinit.cmd=touch /tmp/pwned",
            "sasl.kerberos.principal=x$(touch /tmp/pwned)",
            "ssl.engine.location=/tmp/engine.so",
            "ssl.providers=legacy",
            "ssl.key.location=/etc/ssl/private/ssl-cert-snakeoil.key",
        ], "only in outbox.kafka_properties_file")
        # What the grant is for still works.
        d.execute("ALTER SYSTEM SET outbox.kafka_properties = 'compression.type=lz4'")
        d.execute("ALTER SYSTEM RESET outbox.kafka_properties")
    finally:
        d.close()
        with db.connect() as c:
            c.execute("REVOKE ALTER SYSTEM ON PARAMETER outbox.kafka_properties FROM kafka_admin")
            c.execute("DROP ROLE kafka_admin")


def test_d3_a_delegated_properties_file_must_be_the_servers_and_writable_by_no_one_else(db):
    """The file is where code-loading properties are accepted, and its path
    can be delegated too (GRANT ALTER SYSTEM ON PARAMETER
    outbox.kafka_properties_file): a file that another OS user owns or can
    write is refused, as PostgreSQL refuses such a TLS key file."""
    path = rig.RUN / "delegated-kafka.conf"
    path.write_text("plugin.library.paths = /tmp/evil.so\n")
    with db.connect() as c:
        fresh_role(c, "file_admin", "GRANT ALTER SYSTEM ON PARAMETER outbox.kafka_properties_file TO file_admin")
    d = db.connect(user="file_admin")
    try:
        for owner, mode, why in (("nobody", 0o644, "is owned by uid"), ("postgres", 0o664, "writable by its group or others (mode 0664)"),
                                 ("root", 0o646, "writable by its group or others (mode 0646)")):
            rig.run(["chown", f"{owner}:nogroup", str(path)])
            path.chmod(mode)
            e = sqlstate_of(d, f"ALTER SYSTEM SET outbox.kafka_properties_file = '{path}'")
            assert e.sqlstate == "22023" and why in str(e) and "may name code for librdkafka to load" in str(e), (owner, str(e))
        # The server's own file, or root's, writable only by its owner: the
        # place such properties belong (a library that does not exist is
        # then librdkafka's error, at the relay's start, not ours to test).
        rig.run(["chown", "postgres:postgres", str(path)])
        path.chmod(0o600)
        path.write_text("sasl.username = outbox\n")
        d.execute(f"ALTER SYSTEM SET outbox.kafka_properties_file = '{path}'")
        d.execute("ALTER SYSTEM RESET outbox.kafka_properties_file")
    finally:
        d.close()
        path.unlink()
        with db.connect() as c:
            c.execute("ALTER SYSTEM RESET outbox.kafka_properties_file")
            c.execute("REVOKE ALTER SYSTEM ON PARAMETER outbox.kafka_properties_file FROM file_admin")
            c.execute("DROP ROLE file_admin")


def test_d9_relay_owned_producer_settings_are_refused_under_every_name(db):
    """An alias (delivery.timeout.ms for message.timeout.ms, acks or
    topic.acks for request.required.acks) or a delivery-report switch would
    undo what the confirmation depends on: refused when set, in the setting
    and in the file."""
    with db.connect() as c:
        assert_properties_refused(c, [
            "delivery.timeout.ms=1000",
            "topic.message.timeout.ms=1000",
            "acks=1",
            "topic.acks=0",
            "request.required.acks=1",
            "enable.idempotence=false",
            "delivery.report.only.error=true",
            "partitioner=random",
            "allow.auto.create.topics=true",
            "transactional.id=outbox",
        ], "cannot be set")
        path = rig.RUN / "relay-owned.conf"
        path.write_text("sasl.username = outbox\ndelivery.report.only.error = true\n")
        rig.run(["chown", "postgres:postgres", str(path)])
        try:
            e = sqlstate_of(c, f"ALTER SYSTEM SET outbox.kafka_properties_file = '{path}'")
            assert e.sqlstate == "22023" and '"delivery.report.only.error" cannot be set' in str(e), str(e)
        finally:
            path.unlink()


def test_d4_forged_messages_are_counted_and_logged_at_most_once_a_minute(db):
    """Any role can write messages with our prefix: 200 garbage ones in a
    transaction and one non-transactional are all counted in outbox_status,
    and the log gets one line for them, not 201 (from a relay started
    afresh, whose limit has said nothing yet)."""
    with db.connect() as c:
        fresh_role(c, "forger")
    with_relay_restarted(db)
    log_from = len(db.log_text())
    before = rig.relay_status(db)["forged_messages"]
    f = db.connect(user="forger", autocommit=False)
    for i in range(200):
        f.execute("SELECT pg_logical_emit_message(true, 'outbox', %s)", (f"forged {i}",))
    f.commit()
    f.execute("SELECT pg_logical_emit_message(false, 'outbox', 'non-transactional')")
    f.commit()
    f.close()
    rig.drain(db)
    assert rig.relay_status(db)["forged_messages"] - before == 201
    lines = [l for l in db.log_text()[log_from:].splitlines() if "that is not an outbox event" in l]
    assert len(lines) == 1, lines
    with db.connect() as c:
        c.execute("DROP ROLE forger")


def test_d10_drain_waits_for_asynchronous_commits(db, broker):
    """synchronous_commit = off returns before the commit's WAL is flushed;
    outbox_drain() must still cover it (the switchover and upgrade runbooks
    rely on it). The WAL writer is slowed so the flush does not happen by
    itself while the test looks."""
    topic = rig.unique_topic("async")
    set_conf(db, "wal_writer_delay", "10s")
    try:
        with db.connect() as c:
            c.execute("SET synchronous_commit = off")
            before = lsn_int(c.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()[0])
            event_id = emit(c, topic, "k", {"n": 1})
            assert c.execute("SELECT outbox_drain(30000)").fetchone()[0]
            confirmed = c.execute("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = 'outbox'").fetchone()[0]
        assert lsn_int(confirmed) > before, (confirmed, before)
        got = broker.consume(topic, expect=1, timeout=10)
        assert [m["headers"]["id"] for m in got] == [str(event_id)]
    finally:
        set_conf(db, "wal_writer_delay", None)


def test_d16_extension_is_refused_in_a_database_that_is_not_utf8(db):
    """The table path would convert rows lossily where outbox_emit() refuses:
    one behaviour, at CREATE EXTENSION."""
    with db.connect("postgres") as c:
        c.execute("DROP DATABASE IF EXISTS outbox_latin1")
        c.execute("CREATE DATABASE outbox_latin1 ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0")
    try:
        with db.connect("outbox_latin1") as c:
            e = sqlstate_of(c, "CREATE EXTENSION outbox")
            assert e.sqlstate == "0A000" and 'requires a UTF8 database; database "outbox_latin1" uses LATIN1' in str(e), str(e)
            assert c.execute("SELECT count(*) FROM pg_extension WHERE extname = 'outbox'").fetchone()[0] == 0
    finally:
        with db.connect("postgres") as c:
            c.execute("DROP DATABASE outbox_latin1")


# ------------------------------------------------------------ loss


def key_path(pg):
    return pg.data / "outbox.key"


def confirmed_lsn(c):
    return c.execute("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = 'outbox'").fetchone()[0]


def test_d5_message_key_missing_or_replaced_never_loses_an_unpublished_event(db, broker):
    """A cluster with an event committed but not yet published (relay off).
    Key file gone at restart: no new key, the relay waits in "key missing"
    and confirms nothing; restoring the file publishes the event. Key file
    replaced by another: the event fails verification and is dead-lettered
    with the reason, counted, and re-published from there."""
    pg = rig.Postgres(run_dir=rig.RUN / "key_missing", port=rig.PG_PORT + 7)
    pg.init()
    pg.start()
    topic = rig.unique_topic("key")
    try:
        pg.create_database()
        with pg.connect() as c:
            c.execute("CREATE EXTENSION outbox")
        rig.wait_for_relay(pg)
        with pg.connect() as c:
            first = emit(c, topic, "k", {"n": 1})
        rig.drain(pg)

        def unpublished_event_then_stop(n):
            set_conf(pg, "outbox.relay_enabled", "off")
            rig.wait_for_relay(pg, state="disabled")
            with pg.connect() as c:
                eid = emit(c, topic, "k", {"n": n})
                c.execute("ALTER SYSTEM RESET outbox.relay_enabled")  # on again after the restart
                held = confirmed_lsn(c)
            pg.stop()
            return eid, held

        # Missing.
        kept, held = unpublished_event_then_stop(2)
        aside = pg.dir / "outbox.key.aside"
        shutil.move(key_path(pg), aside)
        pg.start()
        status = rig.wait_for_relay(pg, state="key missing", timeout=30)
        assert "outbox.key" in status["last_error"] and '"outbox"' in status["last_error"], status["last_error"]
        assert not key_path(pg).exists(), "no new key while an outbox slot exists"
        with pg.connect() as c:
            e = sqlstate_of(c, "SELECT outbox_emit('Order', 'k', 'T', '{}')")
            assert e.sqlstate == "55000" and "message key is missing" in str(e), str(e)
            at_start = confirmed_lsn(c)
            time.sleep(2)
            assert confirmed_lsn(c) == at_start == held, (
                "nothing confirmed while the key is missing", at_start, held)
        shutil.move(aside, key_path(pg))
        rig.wait_for_relay(pg, timeout=30)
        rig.drain(pg)
        got = broker.consume(topic, expect=2, timeout=30, linger=1)
        assert first_occurrences(got) == [str(first), str(kept)]

        # Replaced by another key.
        replaced, _ = unpublished_event_then_stop(3)
        key_path(pg).write_bytes(os.urandom(32))
        pg.start()
        rig.wait_for_relay(pg, timeout=30)
        rig.drain(pg)
        status = rig.relay_status(pg)
        assert status["unverified_events"] == 1 and status["dead_letters"] == 1, status
        with pg.connect() as c:
            (dl_id, reason, unverified), = c.execute("SELECT id, reason, unverified FROM outbox_dead_letter").fetchall()
            assert str(dl_id) == str(replaced) and reason.startswith("not verified") and unverified, reason
            # Any role could have written it: re-publishing all (which signs
            # with this server's key) leaves it alone, and by id it waits
            # for an operator to say it is the application's.
            notices = []
            c.add_notice_handler(lambda d: notices.append(d.message_primary))
            assert c.execute("SELECT outbox_dead_letter_republish()").fetchone()[0] == 0
            assert notices == ["1 unverified dead letter(s) left alone: any role can write such an event"], notices
            e = sqlstate_of(c, "SELECT outbox_dead_letter_republish(%s)", (dl_id,))
            assert e.sqlstate == "55000" and "was not verified" in str(e), str(e)
            assert f"SET unverified = false WHERE id = '{dl_id}'" in e.diag.message_hint, e.diag.message_hint
            c.execute("UPDATE outbox_dead_letter SET unverified = false WHERE id = %s", (dl_id,))
            assert c.execute("SELECT outbox_dead_letter_republish(%s)", (dl_id,)).fetchone()[0] == 1
        rig.drain(pg)
        got = broker.consume(topic, expect=3, timeout=30, linger=1)
        assert first_occurrences(got) == [str(first), str(kept), str(replaced)]
        assert len(got) == 3, "a clean stop saved the confirmed position: nothing was sent twice"

        # Replaced again, with on_rejected_event = stop: the relay stops
        # before the unverified event and confirms nothing past it, an event
        # committed after it waits, and both go once the policy dead-letters it.
        with pg.connect() as c:
            c.execute("DELETE FROM outbox_dead_letter")
            c.execute("ALTER SYSTEM SET outbox.on_rejected_event = 'stop'")
        stopped_at, held = unpublished_event_then_stop(4)
        key_path(pg).write_bytes(os.urandom(32))
        pg.start()
        status = rig.wait_for_relay(pg, state="stopped on bad event", timeout=30)
        assert "not verified" in status["last_error"] and str(stopped_at) in status["last_error"], status["last_error"]
        with pg.connect() as c:
            behind = emit(c, topic, "k", {"n": 5})
            time.sleep(1)
            assert confirmed_lsn(c) == held, "nothing confirmed past the stopped event"
            assert c.execute("SELECT count(*) FROM outbox_dead_letter").fetchone()[0] == 0
            c.execute("ALTER SYSTEM SET outbox.on_rejected_event = 'dead_letter'")
            c.execute("SELECT pg_reload_conf()")
        rig.wait_for_relay(pg, timeout=30)
        rig.drain(pg)
        with pg.connect() as c:
            assert [(str(i), u) for i, u in c.execute("SELECT id, unverified FROM outbox_dead_letter")] == [(str(stopped_at), True)]
        got = broker.consume(topic, expect=4, timeout=30, linger=1)
        assert first_occurrences(got) == [str(first), str(kept), str(replaced), str(behind)]
    finally:
        pg.stop(mode="immediate", check=False)


# ------------------------------------------------------------ stalls and resources


def test_d15_worker_closes_the_kafka_client_before_every_exit(db):
    """SIGTERM (pg_terminate_backend) and a restart for new producer
    settings both end the worker through proc_exit: the Kafka client (and its
    threads) is destroyed first, within a bounded time."""
    set_conf(db, "log_min_messages", "log")
    try:
        log_from = len(db.log_text())
        pid = rig.relay_pid(db)
        with db.connect() as c:
            c.execute("SELECT pg_terminate_backend(%s)", (pid,))
        rig.wait_for("the relay to come back", lambda: rig.relay_pid(db) not in (None, pid), timeout=30)
        rig.wait_for_relay(db)
        set_conf(db, "outbox.linger_ms", "2", restarts_relay=True)
        closed = [l for l in db.log_text()[log_from:].splitlines() if "outbox relay: Kafka client closed in" in l]
        assert len(closed) == 2, closed
        assert "did not close within" not in db.log_text()[log_from:]
    finally:
        set_conf(db, "outbox.linger_ms", None, restarts_relay=True)
        set_conf(db, "log_min_messages", None)


class Blackhole:
    """A TCP listener that accepts connections and never answers: a broker
    that hangs (a network partition with the port still open)."""

    def __init__(self, port):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(64)
        self.port = port
        self.accepted = 0
        self.conns = []
        self.stop = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        self.sock.settimeout(0.2)
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted += 1
            self.conns.append(conn)  # held open, never read from or written to

    def close(self):
        self.stop.set()
        for c in self.conns:
            c.close()
        self.sock.close()


def test_d13_a_hanging_broker_does_not_make_the_worker_deaf_to_sigterm(pg):
    """The broker accepts connections and never answers, and an event waits
    for its topic to be checked (an admin request that only times out after
    seconds, then is retried). Every wait of the worker serves interrupts:
    pg_terminate_backend ends it at once instead of after the admin
    timeout (10 s per try in 0.1.0, inside decoding)."""
    hole = Blackhole(rig.PG_PORT + 13)
    try:
        with rig.other_server("hanging_broker", 14, {"outbox.kafka_bootstrap_servers": f"'127.0.0.1:{hole.port}'"},
                              relay=False) as other:
            rig.wait_for("the relay's slot", lambda: rig.relay_status(other)["state"] in ("streaming", "waiting for broker"),
                         timeout=60)
            with other.connect() as c:
                emit(c, rig.unique_topic("hang"), "k", {"n": 1})
            rig.wait_for("the relay to connect to the broker", lambda: hole.accepted > 0, timeout=30)
            time.sleep(3)  # well inside its topic check by now
            pid = rig.relay_pid(other)
            assert pid
            with other.connect() as c:
                sent = c.execute("SELECT clock_timestamp(), pg_terminate_backend(%s)", (pid,)).fetchone()[0]
            rig.wait_for("the relay to exit", lambda: not os.path.exists(f"/proc/{pid}"), timeout=30, interval=0.02)
            # The moment the worker served the signal: its FATAL line.
            line = next(l for l in other.log_text().splitlines()
                        if f"[{pid}] FATAL:  terminating background worker" in l)
            served = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S.%f").replace(tzinfo=datetime.timezone.utc)
            delay = (served - sent).total_seconds()
            print(f"\n[d13] SIGTERM served {delay * 1000:.0f} ms after it was sent while the broker hung")
            # A topic check waits up to 10 s per try; its wait polls
            # interrupts every 100 ms.
            assert delay < 1, line
    finally:
        hole.close()


def test_d14_an_error_inside_the_wal_page_reader_ends_the_worker_cleanly(pg, broker):
    """read_local_xlog_page raises an ERROR when a WAL segment is missing. It
    runs behind the FFI guard, so that ERROR becomes an orderly worker exit
    (logged with the segment, restarted by the postmaster) and never a
    crash of the server: no process killed by a signal, no reset of the
    cluster. Written for d14, this test found a worse defect: an ERROR
    unwinds through the relay's frames and freed the Kafka client, and the
    exit callback then closed it again (SIGSEGV in rd_kafka_purge, the
    whole cluster reset, every second). Sink's Drop now closes it."""
    with rig.other_server("missing_wal", 15) as other:
        topic = rig.unique_topic("missingwal")
        with other.connect() as c:
            emit(c, topic, "k", {"n": 1})
        rig.drain(other)
        set_conf(other, "outbox.relay_enabled", "off")
        rig.wait_for_relay(other, state="disabled")
        with other.connect() as c:
            # An event in a segment of its own, which then goes missing.
            c.execute("SELECT pg_switch_wal()")
            emit(c, topic, "k", {"n": 2})
            segment = c.execute("SELECT pg_walfile_name(pg_current_wal_lsn())").fetchone()[0]
            c.execute("SELECT pg_switch_wal()")
            c.execute("CHECKPOINT")
        (other.data / "pg_wal" / segment).unlink()
        log_from = len(other.log_text())
        set_conf(other, "outbox.relay_enabled", "on")
        rig.wait_for("the worker to report the missing segment",
                     lambda: f"requested WAL segment pg_wal/{segment} has already been removed" in other.log_text()[log_from:], timeout=30)
        time.sleep(2)  # a restart or two of the worker
        log = other.log_text()[log_from:]
        assert "terminated by signal" not in log and "reinitializing" not in log, log[-2000:]
        with other.connect() as c:  # the server is up and serving
            assert c.execute("SELECT 1").fetchone()[0] == 1
