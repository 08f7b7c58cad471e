"""The README's runbook, followed end to end: a planned switchover to a
streaming standby and a major-version upgrade with pg_upgrade (same major
here: the procedure is what is tested). Before 17 PostgreSQL carries logical
slots across neither, so the procedure is: stop the writers, drain, switch,
and let the relay create its slot on the new server; from 17 on pg_upgrade
keeps the slot (the switchover here uses no failover slot: test_failover.py
covers that)."""

import json
import subprocess

import rig
from helpers import insert_dead_letter
from test_relay_limits import emit


def cluster(name: str, port_offset: int) -> rig.Postgres:
    return rig.Postgres(run_dir=rig.RUN / name, port=rig.PG_PORT + port_offset)


def start_primary(name: str, port_offset: int) -> rig.Postgres:
    p = cluster(name, port_offset)
    p.init()
    p.start()
    p.create_database()
    with p.connect() as c:
        c.execute("CREATE EXTENSION outbox")
    rig.wait_for_relay(p)
    return p


def values(msgs):
    return [json.loads(m["value"])["n"] for m in msgs]


def test_planned_switchover_to_a_standby_loses_nothing(broker):
    topic = rig.unique_topic("switchover")
    primary = start_primary("switch_primary", 3)
    standby = cluster("switch_standby", 4)
    try:
        with primary.connect() as c:
            for n in range(3):
                emit(c, topic, "k", {"n": n})
        # A streaming standby, as any HA setup has.
        standby.init_standby_of(primary)
        standby.start()
        with standby.connect() as s:
            assert s.execute("SELECT pg_is_in_recovery()").fetchone()[0]
            # The relay runs only on a primary.
            assert s.execute("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'outbox relay'").fetchone()[0] == 0
        with primary.connect() as c:
            for n in range(3, 6):
                emit(c, topic, "k", {"n": n})
        # The runbook: 1. stop the writers (nothing emits below), 2. drain.
        rig.drain(primary)
        with primary.connect() as c:
            flushed = c.execute("SELECT pg_current_wal_flush_lsn()").fetchone()[0]
            assert c.execute("SELECT lag_bytes FROM outbox_status").fetchone()[0] < 64 * 1024
        # 3. the standby has replayed everything, 4. stop the old primary, promote.
        with standby.connect() as s:
            rig.wait_for("the standby to replay", lambda: s.execute(
                "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (flushed,)).fetchone()[0], timeout=30)
        primary.stop()
        standby.pg_ctl("promote", "-w")
        # 5. the relay starts on the new primary and creates its slot.
        rig.wait_for_relay(standby, timeout=60)
        with standby.connect() as s:
            for n in range(6, 8):
                rig.wait_for("the new slot to accept events", lambda n=n: emit(s, topic, "k", {"n": n}), timeout=30)
        rig.drain(standby)
        got = broker.consume(topic, expect=8, timeout=30, linger=1)
        assert values(got) == list(range(8)), "every event, once, in order, across the switchover"
    finally:
        standby.stop(mode="immediate", check=False)
        primary.stop(mode="immediate", check=False)


def test_upgrade_with_pg_upgrade_loses_nothing(broker):
    topic = rig.unique_topic("upgrade")
    old = start_primary("upgrade_old", 5)
    new = cluster("upgrade_new", 6)
    try:
        with old.connect() as c:
            for n in range(3):
                emit(c, topic, "k", {"n": n})
            # A dead letter is data and must survive the upgrade.
            insert_dead_letter(c, "0190b3c4-0000-7000-8000-0000000000aa", topic, "k", "T", {"n": 3})
        # The runbook: stop the writers, drain, stop cleanly.
        rig.drain(old)
        old.stop()
        new.init()
        old_bin = new_bin = str(rig.PG_BIN)
        rig.as_postgres(
            [str(rig.PG_BIN / "pg_upgrade"), "-b", old_bin, "-B", new_bin, "-d", str(old.data), "-D", str(new.data),
             "-p", str(old.port), "-P", str(new.port)],
            cwd=str(new.dir), stdout=subprocess.DEVNULL,
        )
        new.start()
        rig.wait_for_relay(new, timeout=60)
        # From 17 on pg_upgrade carries the caught-up slot over; before, the
        # relay creates a new one on the new server.
        created = "created logical replication slot" in new.log_text()
        assert created == (int(rig.PG_MAJOR) < 17), new.log_tail()
        with new.connect() as c:
            assert c.execute("SELECT count(*) FROM outbox_dead_letter").fetchone()[0] == 1
            rig.wait_for("the new slot to accept events", lambda: emit(c, topic, "k", {"n": 4}), timeout=30)
            assert c.execute("SELECT outbox_dead_letter_republish()").fetchone()[0] == 1
        rig.drain(new)
        got = broker.consume(topic, expect=5, timeout=30, linger=1)
        assert values(got) == [0, 1, 2, 4, 3]
    finally:
        new.stop(mode="immediate", check=False)
        old.stop(mode="immediate", check=False)
