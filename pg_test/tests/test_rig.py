"""The rig itself: the broker accepts a produce and serves it back, keeps it
across its own restart, and the server helpers work."""

import rig


def test_broker_round_trip_survives_broker_restart(broker):
    topic = rig.unique_topic("rig")
    broker.create_topic(topic, partitions=3)
    msgs = [(f"k{i % 7}".encode(), f"v{i}".encode()) for i in range(50)]
    broker.produce(topic, msgs, headers=[("id", b"x")])
    got = broker.consume(topic, expect=50)
    assert sorted(m["value"] for m in got) == sorted(v for _, v in msgs)
    assert all(m["headers"] == {"id": "x"} for m in got)
    # Same key, same partition, in order (the murmur2 partitioner).
    by_key = {}
    for m in sorted(got, key=lambda m: (m["partition"], m["offset"])):
        by_key.setdefault(m["key"], []).append(m)
    for key, ms in by_key.items():
        assert len({m["partition"] for m in ms}) == 1
        nums = [int(m["value"][1:]) for m in ms]
        assert nums == sorted(nums), key

    broker.stop()
    broker.start()
    again = broker.consume(topic, expect=50)
    assert sorted(m["value"] for m in again) == sorted(v for _, v in msgs)


def test_server_crash_and_backend_kill_helpers(db):
    with db.connect() as c:
        c.execute("CREATE TABLE IF NOT EXISTS rig_probe(x int)")
        c.execute("INSERT INTO rig_probe VALUES (1)")
    db.crash()
    db.start()
    with db.connect() as c:
        assert c.execute("SELECT count(*) FROM rig_probe").fetchone()[0] >= 1
        victim = db.connect()
        pid = victim.info.backend_pid
    db.kill_backend(pid)
    with db.connect() as c:
        assert c.execute("SELECT count(*) FROM rig_probe").fetchone()[0] >= 1
