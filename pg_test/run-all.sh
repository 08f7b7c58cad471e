#!/usr/bin/env bash
# Runs every test suite on every supported PostgreSQL major: unit (pure
# core, no server), in-database (#[pg_test] in pgrx's own test instance) and
# end to end (pg_test/: a real server and Apache Kafka). Installs whatever is
# missing first, so it works on a fresh machine. This is the command .ci/run
# calls. OUTBOX_MAJORS (default "18 17 16 15") narrows the majors; extra
# arguments go to every pytest run. Tests marked one_major (sinks, brokers,
# wire formats compared with Debezium: nothing that depends on the server's
# major) run on the first major of the list only.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

./pg_test/setup.sh

echo "== unit: cargo test -p outbox-core"
cargo test -p outbox-core

only_first=()
for major in ${OUTBOX_MAJORS:-18 17 16 15}; do
  if [[ $major == 15 ]]; then
    pg_config=/usr/lib/postgresql/15/bin/pg_config
  else
    pg_config=$PWD/pg_test/.pg/$major/bin/pg_config
  fi
  echo "== in-database, PostgreSQL $major: cargo pgrx test pg$major"
  # Postgres refuses to run as root: pgrx runs its test instance as
  # 'postgres' in a data directory that user can create. A fresh one each
  # run: pgrx writes postgresql_conf_options() only at initdb.
  sudo rm -rf "/var/tmp/outbox-pgrx-data-$major"
  PGRX_PG_CONFIG_PATH=$pg_config cargo pgrx test "pg$major" --runas postgres --pgdata "/var/tmp/outbox-pgrx-data-$major"

  echo "== end to end, PostgreSQL $major: pytest pg_test"
  (cd pg_test && OUTBOX_PG=$major .venv/bin/python -m pytest -q --durations=8 "${only_first[@]}" "$@")
  only_first=(-m "not one_major")
done
