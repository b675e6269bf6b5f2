#!/usr/bin/env bash
# Builds the Debian package: target/debian/outbox-relay_<version>-1_<arch>.deb.
#
#   1. `cargo build --release --locked` of the relay's binary (reused when up to date);
#   2. from that binary and deploy/systemd/, into target/package/: the manual pages
#      (`outbox-relay man --dir`, one per command), the bash, zsh and fish completions (`outbox-relay completions`)
#      and the unit, whose ExecStart names /usr/bin/outbox-relay instead of /usr/local/bin;
#   3. `cargo deb --no-build` (cargo-deb, pinned in scripts/lib.sh and built once into
#      $OUTBOX_RELAY_CACHE) with the assets of [package.metadata.deb] in Cargo.toml.
#
# Prints the package's path on stdout as its last line; everything else goes to stderr.
# scripts/check-package.sh checks what comes out.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

ensure_cargo_deb

log "release build of the relay (cargo build --release --locked)"
started=$SECONDS
cargo build --release --locked -p outbox-relay --bin outbox-relay >&2
log "release build: $((SECONDS - started))s"

target_dir=$(cargo metadata --format-version 1 --no-deps --locked \
    | grep -o '"target_directory":"[^"]*"' | sed 's/^"target_directory":"\(.*\)"$/\1/')
version=$(cargo pkgid --locked -p outbox-relay | sed 's/.*[#@]//')
binary="$target_dir/release/outbox-relay"

# The packaging's changelog names the version it packages: a new crate version needs its entry.
changelog=deploy/debian/changelog
changelog_version=$(sed -n '1s/^outbox-relay (\([^)]*\)).*/\1/p' "$changelog")
if [ "$changelog_version" != "$version-1" ]; then
    echo "$changelog: the first entry is for '$changelog_version', Cargo.toml's version is $version:" \
        "add an entry for $version-1 at the top" >&2
    exit 1
fi

# cargo-deb takes these from the paths Cargo.toml names, relative to the repository root.
generated=target/package
rm -rf "$generated"
mkdir -p "$generated/completions" "$generated/man"
log "manual pages and completions from $binary --version: $("$binary" --version)"
"$binary" man --dir "$generated/man"
"$binary" completions bash >"$generated/completions/outbox-relay"
"$binary" completions zsh >"$generated/completions/_outbox-relay"
"$binary" completions fish >"$generated/completions/outbox-relay.fish"
for file in "$generated/man/outbox-relay.1" "$generated"/man/*.1 "$generated"/completions/*; do
    [ -s "$file" ] || { echo "$file is empty" >&2; exit 1; }
done

# The one difference between the unit installed by hand and the packaged one.
unit=deploy/systemd/outbox-relay.service
from='ExecStart=/usr/local/bin/outbox-relay '
to='ExecStart=/usr/bin/outbox-relay '
if [ "$(grep -c "^$from" "$unit")" -ne 1 ]; then
    echo "$unit: expected exactly one line starting with '$from'" >&2
    exit 1
fi
sed "s#^$from#$to#" "$unit" >"$generated/outbox-relay.service"

log "Debian package (cargo-deb $CARGO_DEB_VERSION)"
mkdir -p target/debian
# --strip: the release profile keeps line tables, which have no place in the installed binary.
deb=$("$CARGO_DEB_BIN" deb --no-build --locked --strip -p outbox-relay --output target/debian/ | tail -1)
[ -f "$deb" ] || { echo "cargo deb did not report a package file (got '$deb')" >&2; exit 1; }

# cargo-deb writes no md5sums control file, without which `dpkg --verify outbox-relay` and
# debsums cannot tell a changed file: add it and rebuild the archive with dpkg-deb.
work=$(mktemp -d "${TMPDIR:-/tmp}/outbox-relay-package.XXXXXX")
trap 'rm -rf "$work"' EXIT
dpkg-deb --raw-extract "$deb" "$work/root"
(cd "$work/root" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' \
    | LC_ALL=C sort -z | xargs -0 md5sum) >"$work/root/DEBIAN/md5sums"
chmod 0644 "$work/root/DEBIAN/md5sums"
# Every entry keeps cargo-deb's timestamp (the extraction touched the directories).
find "$work/root" -path "$work/root/DEBIAN" -prune -o -exec touch -h -r "$work/root/usr/bin/outbox-relay" {} +
dpkg-deb --root-owner-group -Zxz --build "$work/root" "$work/package.deb" >&2
mv "$work/package.deb" "$deb"
log "built $deb ($(du -h "$deb" | cut -f1))"
echo "$deb"
