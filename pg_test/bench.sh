#!/usr/bin/env bash
# Benchmarks (see README.md, "Benchmarks"): installs what is missing, builds
# the extension in release mode, starts a fresh server and Apache Kafka broker
# and prints the tables of docs/benchmarks.md: outbox beside its baselines and
# Debezium, in interleaved rounds. BENCH_SECONDS (default 10), BENCH_CLIENTS
# (default 4) and BENCH_ROUNDS (default 3) tune the runs.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
./pg_test/setup.sh
# perf profiles the relay worker and the emitting backends (optional: the
# tables print without it).
if ! command -v perf >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends linux-perf >/dev/null || true
fi
exec pg_test/.venv/bin/python pg_test/bench.py "$@"
