#!/usr/bin/env bash
# Runs every test suite: unit (pure core, no server), in-database (#[pg_test]
# in pgrx's own test instance) and end to end (pg_test/: a real server and a
# real broker). Installs whatever is missing first, so it works on a fresh
# machine. This is the command .ci/run calls.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

./pg_test/setup.sh

echo "== unit: cargo test -p outbox-core"
cargo test -p outbox-core

echo "== in-database: cargo pgrx test pg15"
# Postgres refuses to run as root: pgrx runs its test instance as 'postgres'
# in a data directory that user can create.
# A fresh data directory each run: pgrx writes postgresql_conf_options() only at initdb.
sudo rm -rf /var/tmp/outbox-pgrx-data
cargo pgrx test pg15 --runas postgres --pgdata /var/tmp/outbox-pgrx-data

echo "== end to end: pytest pg_test"
cd pg_test
exec .venv/bin/python -m pytest -q "$@"
