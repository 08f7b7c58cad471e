"""A steady, concurrent load of committed events for the fault tests, that
survives the faults it is exposed to (reconnects after a server crash) and
knows exactly what committed.

Client i owns aggregates a{i}-{k} and numbers its events per aggregate, so
the committed order per aggregate is known. An event whose COMMIT failed
without an answer (the server crashed under it) is *uncertain*: it may or may
not have committed, so it may or may not be published."""

import json
import threading
import time

import psycopg


class Load:
    def __init__(self, db, topic, clients=3, aggs_per_client=4, rollback_every=7, pause=0.002, witness=None):
        """witness: a table (id uuid) each transaction also inserts its
        event's id into, so a server can later say which events it has."""
        self.db, self.topic, self.witness = db, topic, witness
        self.clients, self.aggs, self.rollback_every, self.pause = clients, aggs_per_client, rollback_every, pause
        self.committed: dict[str, tuple[str, int]] = {}
        self.uncertain: dict[str, tuple[str, int]] = {}
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.threads: list[threading.Thread] = []
        self.errors: list[Exception] = []

    def __enter__(self):
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(self.clients)]
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def stop(self):
        self.stop_event.set()
        for t in self.threads:
            t.join(60)
        if self.errors:
            raise self.errors[0]

    def wait_for(self, n, timeout=60):
        deadline = time.monotonic() + timeout
        while len(self.committed) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"load committed only {len(self.committed)} of {n}")
            time.sleep(0.05)

    def _emit(self, conn, agg, typ, payload):
        return conn.execute(
            "SELECT outbox_emit('Order', %s, %s, %s::jsonb, '{}', %s)", (agg, typ, json.dumps(payload), self.topic)
        ).fetchone()[0]

    def _client(self, i):
        seq: dict[str, int] = {}
        n = 0
        conn = None
        while not self.stop_event.is_set():
            try:
                if conn is None or conn.closed:
                    conn = self.db.connect(autocommit=False)
                agg = f"a{i}-{n % self.aggs}"
                s = seq.get(agg, 0)
                eid = str(self._emit(conn, agg, "Placed", {"seq": s, "agg": agg}))
                if self.witness:
                    conn.execute(f"INSERT INTO {self.witness} VALUES (%s)", (eid,))
                n += 1
                if n % self.rollback_every == 0:
                    conn.rollback()
                    continue
                conn.execute("SAVEPOINT sp")
                self._emit(conn, agg, "Ghost", {"ghost": True})
                conn.execute("ROLLBACK TO SAVEPOINT sp")
                try:
                    conn.commit()
                except psycopg.OperationalError:
                    # No answer to COMMIT: it may or may not have committed.
                    # Later events of this aggregate must come after it either way.
                    with self.lock:
                        self.uncertain[eid] = (agg, s)
                    seq[agg] = s + 1
                    raise
                seq[agg] = s + 1
                with self.lock:
                    self.committed[eid] = (agg, s)
                if self.pause:
                    time.sleep(self.pause)
            except psycopg.OperationalError:
                conn = None
                time.sleep(0.2)
            except psycopg.Error as e:
                # e.g. "terminating connection" arriving as another class, or
                # the server in recovery refusing the statement.
                if conn is not None and not conn.closed:
                    try:
                        conn.rollback()
                    except psycopg.Error:
                        conn = None
                if "terminating connection" not in str(e) and "recovery" not in str(e) and "shutting down" not in str(e):
                    self.errors.append(e)
                    return
                conn = None
                time.sleep(0.2)


def compare(load: Load, got: list[dict]) -> int:
    """0 lost; nothing published that did not commit; per-aggregate order of
    first occurrences; returns the number of duplicates."""
    committed, uncertain = load.committed, load.uncertain
    ids = [m["headers"]["id"] for m in got]
    assert all(m["headers"]["type"] != "Ghost" for m in got), "a rolled-back savepoint was published"
    unknown = set(ids) - set(committed) - set(uncertain)
    assert not unknown, f"{len(unknown)} published events were never committed"
    missing = set(committed) - set(ids)
    assert not missing, f"{len(missing)} of {len(committed)} committed events lost"
    known = {**uncertain, **committed}
    seen = set()
    per_agg: dict[str, list[int]] = {}
    for m in sorted(got, key=lambda m: (m["partition"], m["offset"])):
        i = m["headers"]["id"]
        if i in seen:
            continue
        seen.add(i)
        agg, s = known[i]
        assert m["key"].decode() == agg
        per_agg.setdefault(agg, []).append(s)
    for agg, seqs in per_agg.items():
        assert seqs == sorted(seqs), f"aggregate {agg} out of order: {seqs}"
    return len(ids) - len(set(ids))
