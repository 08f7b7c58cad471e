"""Small helpers shared by the end-to-end tests."""

import json
import uuid
from contextlib import contextmanager

import psycopg
from psycopg import sql

import rig


@contextmanager
def scratch_slot(conn: psycopg.Connection, plugin: str = "outbox"):
    """A throwaway logical slot on the outbox plugin (or another one), dropped afterwards."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    conn.execute("SELECT pg_create_logical_replication_slot(%s, %s)", (name, plugin))
    try:
        yield name
    finally:
        conn.execute("SELECT pg_drop_replication_slot(%s)", (name,))


def decoded(conn: psycopg.Connection, slot: str) -> list[dict]:
    """Consumes the slot's JSON output: one dict per outbox event, in commit order."""
    rows = conn.execute("SELECT lsn::text, xid::text, data FROM pg_logical_slot_get_changes(%s, NULL, NULL)", (slot,)).fetchall()
    out = []
    for lsn, xid, data in rows:
        ev = json.loads(data)
        ev["_row_lsn"] = lsn
        ev["_row_xid"] = xid
        out.append(ev)
    return out


def lsn_int(s: str) -> int:
    hi, lo = s.split("/")
    return (int(hi, 16) << 32) | int(lo, 16)


def sqlstate_of(conn: psycopg.Connection, sql: str, params=None) -> psycopg.Error:
    """Runs sql expecting an error and returns it (the connection stays usable)."""
    try:
        conn.execute(sql, params)
    except psycopg.Error as e:
        if not conn.autocommit:
            conn.rollback()
        return e
    raise AssertionError(f"expected an error from: {sql}")


def insert_dead_letter(conn: psycopg.Connection, event_id: str, topic: str, key: str, event_type: str, payload: dict) -> None:
    """A dead letter as an operator would find it (written here, not by a
    rejection), for tests of re-publishing and of its survival."""
    conn.execute(
        "INSERT INTO outbox_dead_letter (id, aggregatetype, aggregateid, type, payload, topic, reason, commit_lsn, committed_at) "
        "VALUES (%s, 'Order', %s, %s, %s::jsonb, %s, 'test', '0/1', now())",
        (event_id, key, event_type, json.dumps(payload), topic),
    )


def first_occurrences(messages: list[dict]) -> list[str]:
    """Event ids of consumed messages in order of first arrival (a re-sent
    duplicate counts where it first appeared)."""
    seen: list[str] = []
    for m in messages:
        if m["headers"]["id"] not in seen:
            seen.append(m["headers"]["id"])
    return seen


def with_relay_restarted(pg, **settings):
    """Applies outbox.<name> settings (None resets) with the relay off and
    back on, so that the stream it then starts has them: what is published
    afterwards cannot race the reload."""
    with pg.connect() as c:
        alter_system(c, relay_enabled="off", **settings)
        c.execute("SELECT pg_reload_conf()")
        rig.wait_for_relay(pg, "disabled")
        c.execute("ALTER SYSTEM RESET outbox.relay_enabled")
        c.execute("SELECT pg_reload_conf()")
    rig.wait_for_relay(pg)


def alter_system(c, **settings):
    """ALTER SYSTEM SET outbox.<name> for each setting (None: RESET)."""
    for k, v in settings.items():
        if v is None:
            c.execute(f"ALTER SYSTEM RESET outbox.{k}")
        else:
            c.execute(sql.SQL("ALTER SYSTEM SET {} = {}").format(sql.SQL(f"outbox.{k}"), sql.Literal(v)))
