"""Replication faults on a three-broker Apache Kafka cluster (plus a KRaft
controller of its own): topics with replication factor 3 and
min.insync.replicas=2 under a steady load. The leader of the partitions
being written is killed with SIGKILL, then a second broker: with one broker
left no partition has enough in-sync replicas, the broker refuses every
write (NOT_ENOUGH_REPLICAS, retried by the producer) and the relay must wait
in a visible state, skip nothing, and deliver everything once the brokers
are back."""

import time
from collections import Counter

import pytest

import rig
from load import Load, compare

pytestmark = pytest.mark.one_major


@pytest.fixture(scope="module")
def cluster(pg):
    c = rig.KafkaCluster(rig.RUN / "cluster", base_port=rig.KAFKA_PORT + 300)
    c.reset()
    c.start()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def cpg(cluster):
    with rig.other_server("on_cluster", 10, {"outbox.kafka_bootstrap_servers": f"'{cluster.bootstrap}'"}) as pg:
        yield pg


def published(pg) -> int:
    return rig.relay_status(pg)["events_published"]


def test_leader_killed_then_a_second_broker_the_relay_waits_and_loses_nothing(cpg, cluster):
    topic = rig.unique_topic("ha")
    cluster.create_topic(topic, partitions=3, replication_factor=3, config={"min.insync.replicas": "2"})
    assert all(len(isr) == 3 for _, isr in cluster.partitions(topic).values())
    with Load(cpg, topic, pause=0.005) as load:
        load.wait_for(200)
        rig.drain(cpg)

        # 1. kill -9 the broker leading most of the partitions being written.
        first = Counter(leader for leader, _ in cluster.partitions(topic).values()).most_common(1)[0][0]
        cluster.broker(first).kill()
        t0 = time.monotonic()
        rig.wait_for("new leaders for every partition",
                     lambda: all(leader not in (-1, first) for leader, _ in cluster.partitions(topic).values()), timeout=60)
        elected = time.monotonic() - t0
        # Everything committed so far is acknowledged by the two brokers left.
        rig.drain(cpg, timeout_ms=120_000)
        after_first = len(load.committed)

        # 2. kill -9 a second broker: one left, fewer in-sync replicas than
        # min.insync.replicas on every partition, so every write is refused.
        second = Counter(leader for leader, _ in cluster.partitions(topic).values()).most_common(1)[0][0]
        cluster.broker(second).kill()
        t1 = time.monotonic()
        rig.wait_for("the last broker to be alone in every in-sync set",
                     lambda: all(len(isr) == 1 for _, isr in cluster.partitions(topic).values()), timeout=60)
        waiting = rig.wait_for_relay(cpg, state="waiting for broker", timeout=60)
        stalled_at = published(cpg)
        load.wait_for(len(load.committed) + 200)
        time.sleep(2)
        status = rig.relay_status(cpg)
        assert status["state"] == "waiting for broker", status
        assert status["events_in_flight"] > 0 and status["broker_reachable"] is False, status
        assert published(cpg) == stalled_at, "a write was acknowledged with one in-sync replica of min 2"
        stall = time.monotonic() - t1

        # 3. both brokers back: everything arrives.
        t2 = time.monotonic()
        for b in (first, second):
            cluster.broker(b).launch()
        rig.wait_for_relay(cpg, timeout=120)
        recovered = time.monotonic() - t2
    rig.drain(cpg, timeout_ms=180_000)
    got = cluster.consume(topic, expect=len(load.committed), timeout=120, linger=2)
    dups = compare(load, got)
    print(f"\n[3 brokers, RF 3, min.insync 2] killed broker {first} (leaders re-elected in {elected:.1f} s), "
          f"then broker {second} after {after_first} commits: relay '{waiting['state']}' with "
          f"{status['events_in_flight']} in flight for {stall:.1f} s, streaming {recovered:.1f} s after the restarts; "
          f"committed={len(load.committed)} uncertain={len(load.uncertain)} published={len(got)} duplicates={dups}")
