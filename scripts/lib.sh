# Shared by scripts/test.sh and scripts/demo.sh: installs what they need, once.
# shellcheck shell=bash

OUTBOX_RELAY_CACHE="${OUTBOX_RELAY_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/outbox-relay}"
TANSU_VERSION="0.6.0"
TANSU_BIN="${TANSU_BIN:-$OUTBOX_RELAY_CACHE/tansu-$TANSU_VERSION/bin/tansu}"
CARGO_DENY_VERSION="0.20.2"
CARGO_DENY_BIN="$OUTBOX_RELAY_CACHE/cargo-deny-$CARGO_DENY_VERSION/bin/cargo-deny"
CARGO_DEB_VERSION="3.8.0"
CARGO_DEB_BIN="$OUTBOX_RELAY_CACHE/cargo-deb-$CARGO_DEB_VERSION/bin/cargo-deb"

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# PostgreSQL server binaries (initdb, postgres) from Debian's packages.
ensure_postgres() {
    if compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null; then
        return
    fi
    log "installing PostgreSQL (apt-get install postgresql)"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
}

# PgBouncer, for the test that runs replicas through it in transaction mode.
ensure_pgbouncer() {
    if [ -x /usr/sbin/pgbouncer ] || command -v pgbouncer >/dev/null; then
        return
    fi
    log "installing PgBouncer (apt-get install pgbouncer)"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pgbouncer >/dev/null
}

# socat terminates TLS in front of tansu for the Kafka TLS test; openssl makes its
# throwaway certificates.
ensure_tls_tools() {
    local missing=()
    command -v socat >/dev/null || missing+=(socat)
    command -v openssl >/dev/null || missing+=(openssl)
    if [ ${#missing[@]} -eq 0 ]; then
        return
    fi
    log "installing ${missing[*]} (apt-get install)"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

postgres_bin() {
    local dir
    dir=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
    echo "$dir"
}

# `cargo install CRATE --version VERSION` once into $OUTBOX_RELAY_CACHE/CRATE-VERSION, under a
# lock so that parallel runs build it once; further arguments go to cargo install.
cached_cargo_install() {
    local crate=$1 version=$2 binary=$3 took=$4
    shift 4
    if [ -x "$binary" ]; then
        return
    fi
    mkdir -p "$OUTBOX_RELAY_CACHE"
    log "building $crate $version into $OUTBOX_RELAY_CACHE (once; $took on 2 cores)"
    (
        flock 9
        if [ ! -x "$binary" ]; then
            cargo install "$crate" --version "$version" --locked \
                --root "$OUTBOX_RELAY_CACHE/$crate-$version" "$@"
        fi
    ) 9>"$OUTBOX_RELAY_CACHE/$crate.lock"
}

# The pinned tansu broker, built once into a cache outside the checkout (~10 minutes).
ensure_tansu() {
    cached_cargo_install tansu "$TANSU_VERSION" "$TANSU_BIN" "about 10 minutes" --features dynostore
}

ensure_cargo_deny() {
    cached_cargo_install cargo-deny "$CARGO_DENY_VERSION" "$CARGO_DENY_BIN" "about 2 minutes"
}

# cargo-deb builds the Debian package (scripts/package.sh).
ensure_cargo_deb() {
    cached_cargo_install cargo-deb "$CARGO_DEB_VERSION" "$CARGO_DEB_BIN" "about a minute"
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Waits until the PostgreSQL started as PID answers on 127.0.0.1:PORT; if it exits first,
# prints its LOG and fails.
wait_for_postgres() {
    local pid=$1 port=$2 log_file=$3
    until "$(postgres_bin)/pg_isready" -q -h 127.0.0.1 -p "$port"; do
        kill -0 "$pid" 2>/dev/null || { cat "$log_file" >&2; return 1; }
        sleep 0.2
    done
}
