#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs PostgreSQL and the pinned tansu
# broker where missing, checks the deployment files with their own tools
# (scripts/check-deploy.sh) and the dependencies (cargo deny: licences, sources, bans, and
# RustSec advisories where GitHub answers), builds the Debian package and checks it
# (scripts/check-package.sh: dpkg-deb, lintian, an install into a scratch root), then
# `cargo test --workspace` (the relay and the bench). The tests start their own throwaway
# PostgreSQL and tansu on free loopback ports (or use DATABASE_URL / KAFKA_BOOTSTRAP when set).
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
ensure_cargo_deny
log "dependencies: licences, sources and bans (cargo deny, deny.toml)"
"$CARGO_DENY_BIN" --locked check licenses bans sources
# RustSec's advisory database is a git repository on GitHub: checked where it answers.
if timeout 20 git ls-remote https://github.com/rustsec/advisory-db HEAD >/dev/null 2>&1; then
    log "dependencies: RustSec advisories (cargo deny)"
    "$CARGO_DENY_BIN" --locked check advisories
else
    log "RustSec's advisory database (github.com) does not answer from here: advisories not checked"
fi
log "Debian package: build and check (scripts/check-package.sh)"
scripts/check-package.sh
log "cargo test"
cargo test --locked --workspace "$@"
