#!/usr/bin/env bash
# What the doorbell trigger costs a writer while the relay is awake, with nothing else on
# the machine: pgbench commits single-row outbox INSERTs from 16 connections against a
# throwaway PostgreSQL, with no relay and no broker running (no relay holds the sleeper
# lock, which is the writers' path while a relay is awake), in rounds of windows that
# alternate between
#   none     no trigger;
#   when     the doorbell `outbox-relay migrate` installs (migration 11): the sleeper's lock
#            tried in the trigger's WHEN clause, so no function is called;
#   no-when  the doorbell before migration 11: the same function, called at every insert,
#            which tries the lock itself.
# Prints each window's commits/s and, per variant, the median and its change against none.
#
#   bench/trigger-cost.sh                  8 rounds of 8 s windows, 16 connections
#   ROUNDS=4 SECONDS_PER=5 CLIENTS=4 bench/trigger-cost.sh
#   SYNCHRONOUS_COMMIT=off bench/trigger-cost.sh
# With synchronous_commit=off the commits no longer wait for the disk, so the windows vary
# far less on a host whose fsync times wander, and the trigger's CPU is a larger share of
# each commit: its relative cost there bounds the cost under durable commits from above.
#
#   MEASURE=primitives bench/trigger-cost.sh
# measures instead what each check a doorbell could make costs on its own, read-only
# statements from 16 connections that keep the cores busy, in rounds that alternate
#   select    SELECT 1, what every statement costs anyway;
#   lock      migration 11's WHEN clause: the sleeper's lock tried shared (and released at
#             commit);
#   sequence  a flag read from a sequence (pg_sequence_last_value), the check a relay-set
#             flag would need (tried in 467df6d, reverted);
#   insert    the writer's single-row INSERT transaction, no trigger, commits not waited on;
#   doorbell  the same with the doorbell `migrate` installs (no relay: the lock is tried);
# and prints per variant the median statements/s and the machine's CPU µs per statement
# (cores / rate), so that a check's extra µs over `select` can be set against an insert's.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

ROUNDS=${ROUNDS:-8}
SECONDS_PER=${SECONDS_PER:-8}
CLIENTS=${CLIENTS:-16}
MEASURE=${MEASURE:-trigger}
if [ "$MEASURE" = primitives ]; then SYNCHRONOUS_COMMIT=off; fi
SYNCHRONOUS_COMMIT=${SYNCHRONOUS_COMMIT:-on}

ensure_postgres
log "building outbox-relay (release)"
flock /tmp/outbox-relay-cargo.lock cargo build --locked --release --quiet -p outbox-relay
RELAY=$PWD/target/release/outbox-relay

WORK=$(mktemp -d "${BENCH_WORK_DIR:-/tmp}/outbox-relay-trigger-cost.XXXXXX")
chmod 755 "$WORK"
if [ "$(id -u)" -eq 0 ]; then AS_PG=(runuser -u postgres --); chown postgres "$WORK"; else AS_PG=(); fi
PG_BIN=$(postgres_bin)
PG_PORT=$(free_port)
PG_PID=""
cleanup() {
    if [ -n "$PG_PID" ]; then
        "${AS_PG[@]}" "$PG_BIN/pg_ctl" -D "$WORK/pg" -m fast -w stop >/dev/null 2>&1 \
            || kill "$PG_PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

"${AS_PG[@]}" "$PG_BIN/initdb" -D "$WORK/pg" -U postgres --auth=trust -E UTF8 >/dev/null
# Durable commits as in production (as bench/run.sh runs it) unless told otherwise.
"${AS_PG[@]}" "$PG_BIN/postgres" -D "$WORK/pg" -p "$PG_PORT" -k "$WORK" \
    -c listen_addresses=127.0.0.1 -c fsync=on -c synchronous_commit="$SYNCHRONOUS_COMMIT" \
    -c shared_buffers=1GB -c max_wal_size=32GB -c checkpoint_timeout=30min \
    >"$WORK/postgres.log" 2>&1 &
PG_PID=$!
wait_for_postgres "$PG_PID" "$PG_PORT" "$WORK/postgres.log"
URL="postgres://postgres@127.0.0.1:$PG_PORT/postgres"
OUTBOX_RELAY_DATABASE__URL=$URL "$RELAY" migrate --notify-trigger off >/dev/null

cat >"$WORK/insert.sql" <<'SQL'
\set n random(1, 10000)
INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
VALUES ('order', 'agg-' || :n, 'created', '{"amount": 42, "note": "a small event"}');
SQL

psql_() { "$PG_BIN/psql" -q -X -v ON_ERROR_STOP=1 "$URL" "$@"; }

install() {
    case $1 in
        none) OUTBOX_RELAY_DATABASE__URL=$URL "$RELAY" migrate --notify-trigger off >/dev/null ;;
        when) OUTBOX_RELAY_DATABASE__URL=$URL "$RELAY" migrate --notify-trigger on >/dev/null ;;
        no-when)
            psql_ -c "SET client_min_messages = warning" \
                -c "DROP TRIGGER IF EXISTS outbox_notify ON outbox" \
                -c "CREATE TRIGGER outbox_notify AFTER INSERT ON outbox FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify('outbox_relay')"
            ;;
    esac
    # The same start for every window: the table emptied, no checkpoint due inside it.
    psql_ -c "TRUNCATE outbox" -c "CHECKPOINT"
}

RESULTS="$WORK/results"
# Per second, what $CLIENTS connections running pgbench script $1 for $SECONDS_PER s get
# through (further arguments go to pgbench).
rate() {
    local script=$1
    shift
    "$PG_BIN/pgbench" -n -h 127.0.0.1 -p "$PG_PORT" -U postgres -c "$CLIENTS" -j 2 \
        -T "$SECONDS_PER" "$@" -f "$script" postgres 2>/dev/null | awk '/^tps/ {print $3; exit}'
}
# The variants after $1, rotated by round $1, so drift falls on all of them alike.
rotated() {
    local round=$1
    shift
    local i k
    for ((i = 0; i < $#; i++)); do
        k=$(((round - 1 + i) % $# + 1))
        printf '%s ' "${!k}"
    done
}
log "PostgreSQL $("$PG_BIN/postgres" --version | awk '{print $3}') (synchronous_commit=$SYNCHRONOUS_COMMIT), $CLIENTS connections, $ROUNDS rounds of ${SECONDS_PER} s windows, $(nproc) cores"
if [ "$MEASURE" = primitives ]; then
    psql_ -c "CREATE SEQUENCE doorbell_probe MINVALUE 0" -c "SELECT setval('doorbell_probe', 0)" >/dev/null
    echo 'SELECT 1;' >"$WORK/select.sql"
    echo "SELECT NOT pg_catalog.pg_try_advisory_xact_lock_shared(1868722808, pg_catalog.hashtext('outbox_relay'));" >"$WORK/lock.sql"
    echo "SELECT pg_catalog.pg_sequence_last_value('doorbell_probe'::regclass) IS DISTINCT FROM 0;" >"$WORK/sequence.sql"
    for round in $(seq 1 "$ROUNDS"); do
        for variant in $(rotated "$round" select lock sequence insert doorbell); do
            script="$WORK/$variant.sql"
            case $variant in
                insert) install none ;;
                doorbell) install when; script="$WORK/insert.sql" ;;
            esac
            tps=$(rate "$script" -M prepared)
            printf 'round %d  %-8s %s statements/s\n' "$round" "$variant" "$tps"
            echo "$variant $tps" >>"$RESULTS"
        done
    done
    python3 - "$RESULTS" "$(nproc)" <<'PY'
import statistics, sys
rates, cores = {}, int(sys.argv[2])
for line in open(sys.argv[1]):
    variant, tps = line.split()
    rates.setdefault(variant, []).append(float(tps))
us = {v: cores * 1e6 / statistics.median(r) for v, r in rates.items()}
print("\n| statement | windows | median per s | CPU µs each | over SELECT 1 (insert: over one without trigger) | share of an insert |\n|---|---:|---:|---:|---:|---:|")
for v in ("select", "lock", "sequence", "insert", "doorbell"):
    base = us["insert"] if v == "doorbell" else us["select"]
    extra = us[v] - base
    share = f"{extra / us['insert'] * 100:+.1f} %" if v in ("lock", "sequence", "doorbell") else "–"
    print(f"| {v} | {len(rates[v])} | {statistics.median(rates[v]):.0f} | {us[v]:.1f} | {extra:+.1f} | {share} |")
PY
    exit 0
fi
for round in $(seq 1 "$ROUNDS"); do
    for variant in $(rotated "$round" none when no-when); do
        install "$variant"
        tps=$(rate "$WORK/insert.sql")
        printf 'round %d  %-8s %s commits/s\n' "$round" "$variant" "$tps"
        echo "$variant $tps" >>"$RESULTS"
    done
done

python3 - "$RESULTS" <<'PY'
import statistics, sys
rates = {}
for line in open(sys.argv[1]):
    variant, tps = line.split()
    rates.setdefault(variant, []).append(float(tps))
base = statistics.median(rates["none"])
print("\n| trigger | windows | median commits/s | against no trigger |\n|---|---:|---:|---:|")
for variant in ("none", "when", "no-when"):
    med = statistics.median(rates[variant])
    print(f"| {variant} | {len(rates[variant])} | {med:.0f} | {(med / base - 1) * 100:+.1f} % |")
PY
