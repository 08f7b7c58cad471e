"""The library as its own output plugin, read through throwaway slots: only
outbox events, only committed ones, in commit order, each with its
transaction's commit LSN and commit time."""

import struct
import threading

import psycopg

from helpers import decoded, lsn_int, scratch_slot


def emit(conn, agg_id, typ="Placed", payload='{"n": 1}', **kw):
    headers = kw.get("headers", "{}")
    topic = kw.get("topic")
    return conn.execute(
        "SELECT outbox_emit('Order', %s, %s, %s::jsonb, %s::jsonb, %s)", (agg_id, typ, payload, headers, topic)
    ).fetchone()[0]


def test_committed_events_in_commit_order_with_commit_lsn_and_time(db):
    with db.connect() as admin, scratch_slot(admin) as slot, scratch_slot(admin, "test_decoding") as td_slot:
        t1 = db.connect(autocommit=False)
        t2 = db.connect(autocommit=False)
        # t1 writes first but commits last: output follows commits, not writes.
        a = emit(t1, "A1")
        b = emit(t2, "B1")
        b2 = emit(t2, "B2")
        xid2 = t2.execute("SELECT pg_current_xact_id()::text").fetchone()[0]
        t2.commit()
        xid1 = t1.execute("SELECT pg_current_xact_id()::text").fetchone()[0]
        t1.commit()

        evs = decoded(admin, slot)
        assert [e["id"] for e in evs] == [str(b), str(b2), str(a)]
        assert [e["xid"] for e in evs] == [int(xid2), int(xid2), int(xid1)]
        assert all(e["source"] == "emit" for e in evs)

        # Commit LSN = the transaction's end LSN, exactly what test_decoding
        # reports for its COMMIT record; never the message's own position.
        commits = dict(
            (xid, lsn)
            for lsn, xid in admin.execute(
                "SELECT lsn::text, xid::text FROM pg_logical_slot_get_binary_changes(%s, NULL, NULL) "
                "WHERE data LIKE 'COMMIT%%'::bytea",
                (td_slot,),
            )
        )
        assert evs[0]["commit_lsn"] == evs[1]["commit_lsn"] == commits[xid2]
        assert evs[2]["commit_lsn"] == commits[xid1]
        for e in evs:
            assert lsn_int(e["lsn"]) < lsn_int(e["commit_lsn"])
        # The earlier-written event has the earlier record LSN but the later commit.
        assert lsn_int(evs[2]["lsn"]) < lsn_int(evs[0]["lsn"])
        assert lsn_int(evs[2]["commit_lsn"]) > lsn_int(evs[0]["commit_lsn"])

        # Commit time = the transaction's commit timestamp (track_commit_timestamp).
        for e in evs:
            ts = admin.execute(
                "SELECT to_char(pg_xact_commit_timestamp(%s::xid) AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
                (str(e["xid"]),),
            ).fetchone()[0]
            assert e["commit_time"] == ts
        assert evs[0]["payload"] == {"n": 1}
        assert evs[0]["aggregatetype"] == "Order" and evs[0]["aggregateid"] == "B1" and evs[0]["type"] == "Placed"


def test_rollbacks_and_rolled_back_savepoints_publish_nothing(db):
    with db.connect() as admin, scratch_slot(admin) as slot:
        c = db.connect(autocommit=False)
        emit(c, "rolled-back")
        c.rollback()
        keep1 = emit(c, "kept-1")
        c.execute("SAVEPOINT s1")
        emit(c, "in-rolled-back-savepoint")
        c.execute("SAVEPOINT s2")
        emit(c, "in-nested-savepoint")
        c.execute("ROLLBACK TO SAVEPOINT s1")
        c.execute("SAVEPOINT s3")
        keep2 = emit(c, "in-released-savepoint")
        c.execute("RELEASE SAVEPOINT s3")
        c.commit()
        # A failed statement aborts the whole transaction.
        emit(c, "aborted-by-error")
        try:
            c.execute("SELECT 1/0")
        except psycopg.errors.DivisionByZero:
            pass
        c.commit()  # turns into a rollback
        evs = decoded(admin, slot)
        assert [e["aggregateid"] for e in evs] == ["kept-1", "in-released-savepoint"]
        assert [e["id"] for e in evs] == [str(keep1), str(keep2)]


def test_debezium_style_table_insert_is_decoded(db):
    with db.connect() as admin, scratch_slot(admin) as slot:
        c = db.connect(autocommit=False)
        c.execute(
            "INSERT INTO outbox.outbox (aggregatetype, aggregateid, type, payload, headers) "
            "VALUES ('Customer', 'c-7', 'CustomerCreated', '{\"name\": \"Ada\"}', '{\"trace\": \"t-1\"}') RETURNING id"
        )
        row_id = c.execute("SELECT id FROM outbox.outbox WHERE aggregateid = 'c-7'").fetchone()[0]
        c.execute("INSERT INTO outbox.outbox (id, aggregatetype, aggregateid, type, payload) VALUES (gen_random_uuid(), 'X', 'rb', 'T', '1')")
        c.commit()
        c.execute("INSERT INTO outbox.outbox (aggregatetype, aggregateid, type, payload) VALUES ('X', 'rolled', 'T', '1')")
        c.rollback()
        # Updates and deletes of outbox rows are not events.
        c.execute("UPDATE outbox.outbox SET type = 'Changed' WHERE aggregateid = 'c-7'")
        c.execute("DELETE FROM outbox.outbox WHERE aggregateid = 'rb'")
        c.commit()
        evs = decoded(admin, slot)
        assert [e["aggregateid"] for e in evs] == ["c-7", "rb"]
        e = evs[0]
        assert e["source"] == "table" and e["id"] == str(row_id)
        assert e["type"] == "CustomerCreated" and e["payload"] == {"name": "Ada"} and e["headers"] == {"trace": "t-1"}


def test_a_table_named_outbox_elsewhere_is_not_ours(db):
    """A user's own table named outbox, in public (beside the extension's
    functions) or any other schema, is not the extension's table: the
    plugin goes by extension membership, not by name or schema."""
    with db.connect() as admin, scratch_slot(admin) as slot:
        admin.execute("CREATE SCHEMA IF NOT EXISTS other")
        try:
            for table in ("other.outbox", "public.outbox"):
                admin.execute(f"CREATE TABLE IF NOT EXISTS {table} (LIKE outbox.outbox)")
                admin.execute(f"INSERT INTO {table} VALUES (gen_random_uuid(), 'A', '1', 'T', '{{}}', '{{}}', now())")
            assert admin.execute("SELECT count(*) FROM outbox").fetchone()[0] == 1, "public.outbox, by the path"
            assert decoded(admin, slot) == []
        finally:
            admin.execute("DROP TABLE IF EXISTS public.outbox")


def test_ready_trigger_publishes_inserts_updates_deletes(db):
    with db.connect() as admin, scratch_slot(admin) as slot:
        admin.execute("CREATE TABLE orders_trg (id bigint PRIMARY KEY, status text, total int)")
        admin.execute(
            "CREATE TRIGGER orders_outbox AFTER INSERT OR UPDATE OR DELETE ON orders_trg "
            "FOR EACH ROW EXECUTE FUNCTION outbox_row_trigger('Order', 'id')"
        )
        admin.execute(
            "CREATE TABLE shipments_trg (sid text PRIMARY KEY, state text)"
        )
        admin.execute(
            "CREATE TRIGGER s_outbox AFTER INSERT OR UPDATE OR DELETE ON shipments_trg "
            "FOR EACH ROW EXECUTE FUNCTION outbox_row_trigger('Shipment', 'sid', 'Created', 'Moved')"
        )
        admin.execute("INSERT INTO orders_trg VALUES (1, 'new', 4200), (2, 'new', 10)")
        admin.execute("UPDATE orders_trg SET status = 'paid' WHERE id = 1")
        admin.execute("DELETE FROM orders_trg WHERE id = 2")
        admin.execute("INSERT INTO shipments_trg VALUES ('s1', 'packed')")
        admin.execute("UPDATE shipments_trg SET state = 'sent'")
        admin.execute("DELETE FROM shipments_trg")
        evs = decoded(admin, slot)
        got = [(e["aggregatetype"], e["aggregateid"], e["type"], e["payload"]) for e in evs]
        assert got == [
            ("Order", "1", "OrderCreated", {"id": 1, "status": "new", "total": 4200}),
            ("Order", "2", "OrderCreated", {"id": 2, "status": "new", "total": 10}),
            ("Order", "1", "OrderUpdated", {"id": 1, "status": "paid", "total": 4200}),
            ("Order", "2", "OrderDeleted", {"id": 2, "status": "new", "total": 10}),
            ("Shipment", "s1", "Created", {"sid": "s1", "state": "packed"}),
            ("Shipment", "s1", "Moved", {"sid": "s1", "state": "sent"}),
            ("Shipment", "s1", "ShipmentDeleted", {"sid": "s1", "state": "sent"}),
        ]


def test_forged_messages_are_not_events(db):
    """Three messages with our prefix that are not events: none decoded, and
    the decoding backend logs one line for them, not three."""
    log_from = len(db.log_text())
    with db.connect() as admin, scratch_slot(admin) as slot:
        admin.execute("DROP ROLE IF EXISTS forger")
        admin.execute("CREATE ROLE forger LOGIN")
        real = emit(admin, "real")
        f = db.connect(user="forger")
        f.execute("SELECT pg_logical_emit_message(true, 'outbox', 'forged text')")
        # Version 1 framing with a made-up tag: authentication fails.
        f.execute("SELECT pg_logical_emit_message(true, 'outbox', %s::bytea)", (b"\x01" + b"\x00" * 16 + b"\x11" * 40,))
        f.execute("SELECT pg_logical_emit_message(false, 'outbox', 'non-transactional')")
        f.execute("SELECT pg_logical_emit_message(true, 'other-prefix', 'ignored')")
        f.close()
        after = emit(admin, "after")
        evs = decoded(admin, slot)
        assert [e["id"] for e in evs] == [str(real), str(after)]
        lines = [l for l in db.log_text()[log_from:].splitlines() if "that is not an outbox event" in l]
        assert len(lines) == 1, lines


def test_binary_format_carries_the_same_event(db):
    with db.connect() as admin, scratch_slot(admin) as slot:
        eid = emit(admin, "bin-1", payload='{"x": [1, 2]}', headers='{"h": "v"}', topic="custom.topic")
        rows = admin.execute(
            "SELECT data FROM pg_logical_slot_peek_binary_changes(%s, NULL, NULL, 'format', 'binary')", (slot,)
        ).fetchall()
        js = decoded(admin, slot)
        assert len(rows) == 1 and len(js) == 1
        b = bytes(rows[0][0])
        version, source, xid, commit_lsn, commit_time, lsn = struct.unpack_from("<BBIQqQ", b)
        assert (version, source, xid) == (1, 0, js[0]["xid"])
        assert commit_lsn == lsn_int(js[0]["commit_lsn"]) and lsn == lsn_int(js[0]["lsn"])
        assert eid.bytes == b[30:46]
        assert b'{"x": [1, 2]}' in b and b"custom.topic" in b
        assert js[0]["topic"] == "custom.topic" and js[0]["headers"] == {"h": "v"}


def test_concurrent_producers_all_decoded_once(db):
    with db.connect() as admin, scratch_slot(admin) as slot:
        ids: list[str] = []
        lock = threading.Lock()

        def worker(n):
            c = db.connect(autocommit=False)
            for i in range(25):
                e = emit(c, f"w{n}-{i}")
                if i % 5 == 4:
                    c.rollback()
                else:
                    c.commit()
                    with lock:
                        ids.append(str(e))
            c.close()

        ts = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
        [t.start() for t in ts]
        [t.join() for t in ts]
        evs = decoded(admin, slot)
        assert sorted(e["id"] for e in evs) == sorted(ids)
        assert len(evs) == 80
        commit_lsns = [lsn_int(e["commit_lsn"]) for e in evs]
        assert commit_lsns == sorted(commit_lsns)


def test_unknown_plugin_option_is_an_error(db):
    with db.connect() as admin, scratch_slot(admin) as slot:
        for opts, msg in ((("format", "xml"), "unknown format"), (("colour", "red"), "unknown option")):
            try:
                admin.execute("SELECT * FROM pg_logical_slot_peek_changes(%s, NULL, NULL, %s, %s)", (slot, *opts))
            except psycopg.Error as e:
                assert msg in str(e)
            else:
                raise AssertionError("expected an error")
