#!/usr/bin/env bash
# The demo: installs what is missing, starts PostgreSQL with outbox preloaded
# and Apache Kafka (a single KRaft node) on 127.0.0.1, runs a transaction that emits an
# event (and one that rolls back), and prints what the server publishes.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
./pg_test/setup.sh
exec pg_test/.venv/bin/python pg_test/demo.py "$@"
