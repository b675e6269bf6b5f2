#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs PostgreSQL and the pinned tansu
# broker where missing, checks the deployment files with their own tools
# (scripts/check-deploy.sh), then `cargo test --workspace` (the relay and the bench). The tests start their own throwaway PostgreSQL
# and tansu on free loopback ports (or use DATABASE_URL / KAFKA_BOOTSTRAP when set).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

ensure_postgres
ensure_pgbouncer
ensure_tls_tools
ensure_tansu
export TANSU_BIN
log "deployment and monitoring files (scripts/check-deploy.sh)"
scripts/check-deploy.sh
log "cargo test"
cargo test --locked --workspace "$@"
