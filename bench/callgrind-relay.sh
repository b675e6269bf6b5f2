#!/usr/bin/env bash
# Runs the relay under callgrind, for `bench/run.sh --relay-bin bench/callgrind-relay.sh`.
# Instruction counts compare two relay builds to a fraction of a percent, where CPU
# seconds per row vary by ±10 % with the host's speed from run to run. One profile per
# relay process lands in ${CALLGRIND_DIR:-/tmp/outbox-relay-callgrind}; its `summary:`
# line is the total.
# RELAY_BIN picks the build (default: this checkout's target/release/outbox-relay).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
dir=${CALLGRIND_DIR:-/tmp/outbox-relay-callgrind}
mkdir -p "$dir"
exec valgrind --tool=callgrind --callgrind-out-file="$dir/callgrind.%p.out" \
    "${RELAY_BIN:-$repo/target/release/outbox-relay}" "$@"
