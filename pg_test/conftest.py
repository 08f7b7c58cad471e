"""pytest fixtures for the end-to-end suite: one server and one broker for
the whole session, started from scratch by the rig."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import rig  # noqa: E402


@pytest.fixture(scope="session")
def broker():
    b = rig.KafkaBroker()
    b.reset()
    b.start()
    yield b
    b.stop()


@pytest.fixture(scope="session")
def pg(broker):
    if not os.environ.get("OUTBOX_SKIP_INSTALL"):
        rig.install_extension()
    rig.install_released_scripts()
    p = rig.Postgres()
    p.init()
    p.start()
    p.create_database()
    yield p
    p.stop(mode="fast", check=False)


@pytest.fixture(scope="session")
def db(pg):
    """The outbox database with the extension, once the relay worker has
    created its slot and is streaming."""
    with pg.connect() as c:
        c.execute("CREATE EXTENSION IF NOT EXISTS outbox")
    rig.wait_for_relay(pg)
    return pg


@pytest.fixture(scope="module")
def dbz_broker(pg):
    """A broker of Debezium's own, beside the suite's, so that Debezium and
    outbox can publish to the same topic names at once (the tests that
    compare their records)."""
    b = rig.KafkaBroker(port=rig.KAFKA_PORT + 400)
    b.reset()
    b.start()
    yield b
    b.stop()
