"""The demo behind pg_test/demo.sh. See README.md, "Quick start"."""

import json
import sys

import rig


def main() -> int:
    keep = "--keep" in sys.argv
    rig.install_extension()
    broker = rig.KafkaBroker()
    broker.reset()
    broker.start()
    pg = rig.Postgres()
    pg.init()
    pg.start()
    pg.create_database()
    rig.log(f"PostgreSQL on 127.0.0.1:{pg.port} (database {rig.DATABASE}), Apache Kafka on {broker.bootstrap}")
    try:
        with pg.connect() as c:
            c.execute("CREATE EXTENSION outbox")
            c.execute("CREATE TABLE orders (id bigint PRIMARY KEY, total int)")
        status = rig.wait_for_relay(pg)
        rig.log(f"outbox relay running inside the server (pid {status['pid']}, {status['state']}); no relay process")
        app = pg.connect(autocommit=False)
        print("\nBEGIN;\n  INSERT INTO orders VALUES (42, 4200);\n"
              "  SELECT outbox_emit('Order', '42', 'OrderPlaced', '{\"total\": 4200}');\nCOMMIT;")
        app.execute("INSERT INTO orders VALUES (42, 4200)")
        app.execute("SELECT outbox_emit('Order', '42', 'OrderPlaced', '{\"total\": 4200}')")
        app.commit()
        print("\nBEGIN;\n  INSERT INTO orders VALUES (43, 99);\n"
              "  SELECT outbox_emit('Order', '43', 'OrderPlaced', '{\"total\": 99}');\nROLLBACK;")
        app.execute("INSERT INTO orders VALUES (43, 99)")
        app.execute("SELECT outbox_emit('Order', '43', 'OrderPlaced', '{\"total\": 99}')")
        app.rollback()
        app.close()
        rig.drain(pg)
        got = broker.consume("outbox.event.Order", expect=1, timeout=15, linger=1.0)
        print(f"\nConsumed from Kafka topic outbox.event.Order: {len(got)} message(s) (the rolled-back one is not there)")
        for m in got:
            print(json.dumps({
                "topic": "outbox.event.Order",
                "partition": m["partition"],
                "offset": m["offset"],
                "key": m["key"].decode(),
                "headers": m["headers"],
                "timestamp_ms": m["timestamp"],
                "value": json.loads(m["value"]),
            }, indent=2))
        return 0 if len(got) == 1 else 1
    finally:
        if keep:
            rig.log("--keep: server and broker left running")
        else:
            pg.stop(check=False)
            broker.stop()


if __name__ == "__main__":
    sys.exit(main())
