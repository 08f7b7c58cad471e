"""The demo behind pg_test/demo.sh. See README.md, "Quick start"."""

import json
import sys

import rig


def main() -> int:
    keep = "--keep" in sys.argv
    rig.install_extension()
    broker = rig.Broker()
    broker.reset()
    broker.start()
    pg = rig.Postgres()
    pg.init()
    pg.start()
    pg.create_database()
    rig.log(f"PostgreSQL on 127.0.0.1:{pg.port} (database {rig.DATABASE}), broker on {broker.bootstrap}")
    try:
        with pg.connect() as c:
            c.execute("CREATE EXTENSION outbox")
            c.execute("CREATE TABLE orders (id bigint PRIMARY KEY, total int)")
            # The relay worker will own this slot; until it does, the demo
            # reads the output plugin's stream through it directly.
            c.execute("SELECT pg_create_logical_replication_slot('outbox', 'outbox')")
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
        with pg.connect() as c:
            rows = c.execute("SELECT data FROM pg_logical_slot_peek_changes('outbox', NULL, NULL)").fetchall()
        print(f"\nThe outbox stream holds {len(rows)} event(s) (the rolled-back one is not there):")
        for (data,) in rows:
            print(json.dumps(json.loads(data), indent=2))
        if len(rows) != 1:
            print("unexpected number of events", file=sys.stderr)
            return 1
        return 0
    finally:
        if keep:
            rig.log("--keep: server and broker left running; stop with pg_ctl and kill tansu")
        else:
            pg.stop(check=False)
            broker.stop()


if __name__ == "__main__":
    sys.exit(main())
