#!/usr/bin/env bash
# The relay's main job end to end, on this machine alone: starts a throwaway PostgreSQL
# and a tansu broker on free loopback ports, migrates, starts the relay, inserts sample
# events the way a service would, shows them arriving in Kafka, then stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

ensure_postgres
ensure_tansu
log "building outbox-relay"
cargo build --locked --quiet --bin outbox-relay --example tail
RELAY=target/debug/outbox-relay
TAIL=target/debug/examples/tail

WORK=$(mktemp -d /tmp/outbox-relay-demo.XXXXXX)
chmod 755 "$WORK"
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT

# PostgreSQL refuses to run as root: use the postgres user then.
if [ "$(id -u)" -eq 0 ]; then AS_PG=(runuser -u postgres --); chown postgres "$WORK"; else AS_PG=(); fi
PG_BIN=$(postgres_bin)
PG_PORT=$(free_port)
log "starting PostgreSQL on 127.0.0.1:$PG_PORT"
"${AS_PG[@]}" "$PG_BIN/initdb" -D "$WORK/pg" -U postgres --auth=trust -E UTF8 --no-sync >/dev/null
"${AS_PG[@]}" "$PG_BIN/postgres" -D "$WORK/pg" -p "$PG_PORT" -k "$WORK" \
    -c listen_addresses=127.0.0.1 >"$WORK/postgres.log" 2>&1 &
PIDS+=($!)
wait_for_postgres "${PIDS[-1]}" "$PG_PORT" "$WORK/postgres.log"
export DATABASE_URL="postgres://postgres@127.0.0.1:$PG_PORT/postgres"

KAFKA_PORT=$(free_port)
BOOTSTRAP="127.0.0.1:$KAFKA_PORT"
log "starting tansu $TANSU_VERSION on $BOOTSTRAP"
RUST_LOG=warn "$TANSU_BIN" broker --listener-url "tcp://$BOOTSTRAP" \
    --advertised-listener-url "tcp://$BOOTSTRAP" --storage-engine memory://tansu/ \
    >"$WORK/tansu.log" 2>&1 &
PIDS+=($!)
until (exec 3<>"/dev/tcp/127.0.0.1/$KAFKA_PORT") 2>/dev/null; do sleep 0.2; done
for topic in outbox.event.order outbox.event.payment; do
    "$TANSU_BIN" topic create "$topic" --partitions 3 --broker "tcp://$BOOTSTRAP" >/dev/null
done

export OUTBOX_RELAY_DATABASE__URL="$DATABASE_URL"
export OUTBOX_RELAY_KAFKA__BOOTSTRAP_SERVERS="$BOOTSTRAP"
export OUTBOX_RELAY_HTTP__LISTEN="127.0.0.1:$(free_port)"
export OUTBOX_RELAY_LOG__FORMAT=text

log "outbox-relay migrate (no trigger, the default: the idle relay polls every 10 ms)"
"$RELAY" migrate
log "outbox-relay check"
"$RELAY" check
log "outbox-relay run (in the background)"
"$RELAY" run >"$WORK/relay.log" 2>&1 &
RELAY_PID=$!
PIDS+=("$RELAY_PID")

log "a service writes 12 events, each in its own transaction"
for i in $(seq 1 4); do
    for step in Placed Paid Shipped; do
        psql -q "$DATABASE_URL" -v ON_ERROR_STOP=1 <<SQL
BEGIN;
-- the business change would go here, in the same transaction
INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, headers)
VALUES ('order', 'order-$i', 'Order$step',
        jsonb_build_object('order', 'order-$i', 'status', '$step'),
        '{"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}');
COMMIT;
SQL
    done
done
psql -q "$DATABASE_URL" -c "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
    SELECT 'payment', 'pay-' || g, 'PaymentCaptured', jsonb_build_object('amount', g * 10)
    FROM generate_series(1, 3) g"

log "waiting until the relay has marked all 15 rows sent"
for _ in $(seq 1 300); do
    sent=$(psql -tAq "$DATABASE_URL" -c "SELECT count(*) FROM outbox WHERE sent_at IS NOT NULL")
    [ "$sent" = 15 ] && break
    sleep 0.1
done
[ "$sent" = 15 ] || { echo "only $sent of 15 rows were marked; relay log:"; cat "$WORK/relay.log"; exit 1; }
psql "$DATABASE_URL" -c "SELECT id, aggregate_id, event_type, sent_at::time(0), kafka_partition, kafka_offset FROM outbox ORDER BY id"

log "what a Kafka consumer reads (key = aggregate id, one partition per aggregate, in order)"
"$TAIL" "$BOOTSTRAP" outbox.event.order 12
"$TAIL" "$BOOTSTRAP" outbox.event.payment 3

log "relay metrics"
curl -s "http://$OUTBOX_RELAY_HTTP__LISTEN/metrics" 2>/dev/null | grep -E '^outbox_relay_(rows_published_total|rows_marked_total|pending_rows|end_to_end_latency_seconds_count)' \
    || python3 -c "import urllib.request,sys; [print(l) for l in urllib.request.urlopen('http://$OUTBOX_RELAY_HTTP__LISTEN/metrics').read().decode().splitlines() if l.startswith(('outbox_relay_rows_published_total','outbox_relay_rows_marked_total','outbox_relay_pending_rows','outbox_relay_end_to_end_latency_seconds_count'))]"

log "stopping the relay with SIGTERM (it drains, then exits 0)"
kill -TERM "$RELAY_PID"
wait "$RELAY_PID" && echo "relay exited 0"
log "demo complete"
