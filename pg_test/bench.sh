#!/usr/bin/env bash
# Benchmarks (see README.md, "Benchmarks"): installs what is missing, builds
# the extension in release mode, starts a fresh server and broker and prints
# one table of throughput, latency and emit cost beside their baselines.
# BENCH_SECONDS (default 10) and BENCH_CLIENTS (default 4) tune the runs.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
./pg_test/setup.sh
# The broker for benchmarks: the same tansu built with its in-memory engine
# (feature dynostore), ~10x the throughput of the tests' sqlite engine.
# Built once (many minutes) into its own root; BENCH_BROKER=sqlite skips it.
bench_root="$HOME/.cache/outbox-bench"
if [[ ${BENCH_BROKER:-memory} == memory && ! -x $bench_root/bin/tansu ]]; then
  echo "[bench] cargo install tansu 0.6.0 --features dynostore (the benchmark broker; many minutes, once)" >&2
  cargo install tansu --version 0.6.0 --locked --quiet --features dynostore --root "$bench_root"
fi
export OUTBOX_BENCH_TANSU="$bench_root/bin/tansu"
# perf profiles the relay worker and the emitting backends (optional: the
# tables print without it).
if ! command -v perf >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends linux-perf >/dev/null || true
fi
exec pg_test/.venv/bin/python pg_test/bench.py "$@"
