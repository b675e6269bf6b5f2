#!/usr/bin/env bash
# Builds the Debian package (scripts/package.sh) and checks it with Debian's own tools:
#
#   dpkg-deb --info       package, version, architecture, dependencies, maintainer; the
#                         conffiles, md5sums and maintainer scripts (the unit is never
#                         enabled or started by the package)
#   dpkg-deb --contents   exactly the expected files, with their modes, owned by root; the
#                         copyright file has a text for every licence deny.toml admits
#   lintian               no error and no warning; deploy/debian/lintian-overrides names and
#                         justifies each tag accepted; info tags are shown
#   dpkg --root           a real install into a scratch root (dpkg's own database there, the
#                         dependencies' entries copied from this host's): the binary, unit,
#                         config (a registered conffile), completions and man pages where the
#                         FHS and systemd expect them; `dpkg --verify`; the installed binary's
#                         --version, its man pages (each one a page names among them) and
#                         completions equal to what it writes;
#                         the unit disabled (systemctl --root) and clean (systemd-analyze
#                         verify); a reinstall keeps an edited config; remove keeps the
#                         config, purge removes it.
#
# The maintainer scripts run as dpkg runs them for --root (chrootless, DPKG_ROOT set), inside
# a mount namespace whose /run is empty, so that nothing can reach this host's systemd; the
# host's systemd state is compared before and after. The tools (lintian, systemd-analyze)
# come from apt when missing; root (or sudo) is needed only for that.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

ensure_package_tools() {
    local missing=()
    command -v lintian >/dev/null || missing+=(lintian)
    command -v systemd-analyze >/dev/null || missing+=(systemd)
    if [ ${#missing[@]} -eq 0 ]; then
        return
    fi
    log "installing ${missing[*]} (apt-get install)"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

WORK=$(mktemp -d "${TMPDIR:-/tmp}/outbox-relay-check-package.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

fail() {
    printf '    \033[31mFAILED\033[0m: %s\n' "$*" >&2
    exit 1
}

# What the package must hold, exactly: mode and path of every file; expect_man_pages adds
# the manual pages.
EXPECTED_FILES="\
-rw-r--r-- ./etc/outbox-relay/outbox-relay.toml
-rwxr-xr-x ./usr/bin/outbox-relay
-rw-r--r-- ./usr/lib/systemd/system/outbox-relay.service
-rw-r--r-- ./usr/share/bash-completion/completions/outbox-relay
-rw-r--r-- ./usr/share/doc/outbox-relay/README.md
-rw-r--r-- ./usr/share/doc/outbox-relay/changelog.Debian.gz
-rw-r--r-- ./usr/share/doc/outbox-relay/changelog.gz
-rw-r--r-- ./usr/share/doc/outbox-relay/copyright
-rw-r--r-- ./usr/share/doc/outbox-relay/examples/least-privilege.sql
-rw-r--r-- ./usr/share/doc/outbox-relay/examples/outbox-relay.env.example
-rw-r--r-- ./usr/share/fish/vendor_completions.d/outbox-relay.fish
-rw-r--r-- ./usr/share/lintian/overrides/outbox-relay
-rw-r--r-- ./usr/share/zsh/vendor-completions/_outbox-relay"

# The documentation the README links to, docs/*.md, installed beside it.
expect_docs() {
    local doc
    for doc in docs/*.md; do
        EXPECTED_FILES+=$'\n'"-rw-r--r-- ./usr/share/doc/outbox-relay/$doc"
    done
}

# The manual pages the package's own binary writes (`outbox-relay man --dir`: the main page
# and one per command) join the expected files; they land in $WORK/pages.
expect_man_pages() {
    local deb=$1 page
    mkdir -p "$WORK/extract" "$WORK/pages"
    dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$WORK/extract" ./usr/bin/outbox-relay
    "$WORK/extract/usr/bin/outbox-relay" man --dir "$WORK/pages" || fail "outbox-relay man --dir failed"
    for page in outbox-relay.1 outbox-relay-run.1 outbox-relay-migrate.1 outbox-relay-parked-list.1; do
        [ -s "$WORK/pages/$page" ] || fail "outbox-relay man --dir wrote no $page"
    done
    for page in "$WORK"/pages/*.1; do
        EXPECTED_FILES+=$'\n'"-rw-r--r-- ./usr/share/man/man1/$(basename "$page").gz"
    done
    echo "manual pages: $(ls "$WORK/pages" | wc -l) from outbox-relay man --dir" >&2
}

check_info() {
    local deb=$1 version=$2 field value
    dpkg-deb --info "$deb" | sed 's/^/    /' >&2
    for field in Package Version Architecture Maintainer Depends Section Priority; do
        value=$(dpkg-deb --field "$deb" "$field")
        [ -n "$value" ] || fail "control: no $field"
    done
    [ "$(dpkg-deb --field "$deb" Package)" = outbox-relay ] || fail "control: Package is not outbox-relay"
    [ "$(dpkg-deb --field "$deb" Version)" = "$version-1" ] || fail "control: Version is not $version-1"
    [ "$(dpkg-deb --field "$deb" Architecture)" = "$(dpkg --print-architecture)" ] \
        || fail "control: Architecture is not $(dpkg --print-architecture)"
    dpkg-deb --field "$deb" Depends | grep -q 'libc6' || fail "control: Depends does not name libc6"
    mkdir -p "$WORK/control"
    dpkg-deb --control "$deb" "$WORK/control"
    [ "$(cat "$WORK/control/conffiles")" = /etc/outbox-relay/outbox-relay.toml ] \
        || fail "conffiles: expected /etc/outbox-relay/outbox-relay.toml alone, got: $(cat "$WORK/control/conffiles")"
    [ -s "$WORK/control/md5sums" ] || fail "no md5sums control file"
    [ "$(wc -l <"$WORK/control/md5sums")" -eq "$(echo "$EXPECTED_FILES" | wc -l)" ] \
        || fail "md5sums does not list every file"
    # Installed, never enabled or started by the package; restarted by an upgrade only if it
    # runs. (The install below checks that the unit really stays disabled.)
    grep -q 'deb-systemd-helper debian-installed outbox-relay.service' "$WORK/control/postinst" \
        || fail "postinst enables the unit on a fresh install (no debian-installed guard)"
    grep -q 'deb-systemd-invoke try-restart outbox-relay.service' "$WORK/control/postinst" \
        || fail "postinst does not try-restart the unit on upgrade"
    if grep -q 'deb-systemd-invoke start' "$WORK/control/postinst"; then
        fail "postinst starts the unit"
    fi
    echo "control: outbox-relay $version-1 $(dpkg --print-architecture), Depends: $(dpkg-deb --field "$deb" Depends); conffile /etc/outbox-relay/outbox-relay.toml; md5sums; the unit registered, not enabled or started, try-restarted on upgrade" >&2
}

# deploy/debian/copyright carries the text of every licence deny.toml admits for the crates
# compiled in (Apache-2.0 by reference to /usr/share/common-licenses).
check_copyright() {
    local licence missing=()
    for licence in $(sed -n '/^allow = \[/,/^\]/p' deny.toml | grep -o '"[^"]*"' | tr -d '"'); do
        [ "$licence" = Apache-2.0 ] && continue
        grep -qx "$licence:" deploy/debian/copyright || missing+=("$licence")
    done
    [ ${#missing[@]} -eq 0 ] \
        || fail "deploy/debian/copyright has no text for ${missing[*]}, which deny.toml admits"
    echo "copyright: a text for every licence deny.toml admits" >&2
}

check_contents() {
    local deb=$1 actual
    dpkg-deb --contents "$deb" | sed 's/^/    /' >&2
    actual=$(dpkg-deb --contents "$deb" | awk '$1 ~ /^-/ {print $1, $6}' | LC_ALL=C sort)
    if [ "$actual" != "$(echo "$EXPECTED_FILES" | LC_ALL=C sort)" ]; then
        diff <(echo "$EXPECTED_FILES" | LC_ALL=C sort) <(echo "$actual") | sed 's/^/    /' >&2 || true
        fail "the package's files differ from the expected list (< expected, > in the package)"
    fi
    if dpkg-deb --contents "$deb" | awk '$2 != "root/root"' | grep -q .; then
        fail "entries not owned by root: $(dpkg-deb --contents "$deb" | awk '$2 != "root/root"')"
    fi
    if dpkg-deb --contents "$deb" | awk '$1 ~ /^d/ && $1 != "drwxr-xr-x"' | grep -q .; then
        fail "directories not 0755"
    fi
    if dpkg-deb --contents "$deb" | awk '$1 ~ /^[^-d]/' | grep -q .; then
        fail "entries that are neither files nor directories"
    fi
    echo "contents: the $(echo "$EXPECTED_FILES" | wc -l) expected files, root-owned, and nothing else" >&2
}

check_lintian() {
    local deb=$1 rc=0
    log "lintian $(lintian --version | awk '{print $2}'): fails on any error or warning"
    # With --show-overrides lintian exits 2 for an overridden warning too, so the verdict is
    # read from its output: E: and W: lines are findings, O: lines overridden ones.
    lintian --display-info --show-overrides --tag-display-limit 0 "$deb" >"$WORK/lintian" 2>&1 || rc=$?
    # Lintian says it would rather not run as root; it only reads the package here.
    grep -v '^running with root privileges is not recommended!$' "$WORK/lintian" | sed 's/^/    /' >&2 || true
    [ "$rc" -ne 1 ] || fail "lintian itself failed (exit 1)"
    if grep -Eq '^[EW]: ' "$WORK/lintian"; then
        fail "lintian found errors or warnings (E:, W:); fix them, or override one in deploy/debian/lintian-overrides with the reason"
    fi
    echo "lintian: no error, no warning (O: lines are overridden in deploy/debian/lintian-overrides, each with its reason)" >&2
}

# Runs a command where /run is an empty tmpfs: the maintainer scripts test /run/systemd/system
# before calling systemctl, so they cannot touch this host's systemd.
ISOLATE=()
choose_isolation() {
    local candidate
    if [ "$(id -u)" -eq 0 ]; then
        candidate=(unshare --mount --propagation private)
    else
        candidate=(unshare --user --map-root-user --mount --propagation private)
    fi
    if "${candidate[@]}" sh -c 'mount -t tmpfs tmpfs /run && [ ! -e /run/systemd/system ]' 2>/dev/null; then
        ISOLATE=("${candidate[@]}" sh -c 'mount -t tmpfs tmpfs /run && exec "$@"' isolated)
        echo "maintainer scripts run in a mount namespace with an empty /run (${candidate[*]})" >&2
    elif [ ! -d /run/systemd/system ] && [ "$(id -u)" -eq 0 ]; then
        echo "no mount namespace here, and no running systemd: maintainer scripts run as they are" >&2
    else
        fail "cannot keep the maintainer scripts away from this host's systemd (no mount namespace: ${candidate[*]}); run as root, or where unshare works"
    fi
}

host_systemd_state() {
    find /etc/systemd /var/lib/systemd -name '*outbox-relay*' 2>/dev/null | LC_ALL=C sort
}

check_install() {
    local deb=$1 version=$2 root="$WORK/root"
    choose_isolation
    mkdir -p "$root/var/lib/dpkg/info" "$root/var/lib/dpkg/updates" "$root/var/lib/dpkg/triggers" \
        "$root/var/log"
    : >"$root/var/lib/dpkg/available"
    # The scratch root's dpkg database knows the dependencies as this host has them, so dpkg
    # checks Depends for real.
    local dep
    : >"$root/var/lib/dpkg/status"
    for dep in $(dpkg-deb --field "$deb" Depends | tr ',' '\n' | sed -e 's/(.*//' -e 's/|.*//' -e 's/[[:space:]]//g'); do
        dpkg-query --status "$dep" >>"$root/var/lib/dpkg/status" || fail "dependency $dep is not installed on this host"
        echo >>"$root/var/lib/dpkg/status"
        # Its files are not there, and dpkg is told so (an empty list, not a missing one).
        : >"$root/var/lib/dpkg/info/$(dpkg-query --show --showformat='${binary:Package}' "$dep").list"
    done
    local before
    before=$(host_systemd_state)
    local dpkg=(env PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        dpkg --root="$root" --force-script-chrootless --log="$root/var/log/dpkg.log")
    # run_dpkg ARGS...: dpkg in the scratch root, maintainer scripts isolated, output indented.
    run_dpkg() {
        if ! "${ISOLATE[@]}" "${dpkg[@]}" "$@" 2>&1 | sed 's/^/    /' >&2; then
            fail "dpkg $* failed"
        fi
    }
    log "install into a scratch root: dpkg --root=$root --force-script-chrootless --install"
    run_dpkg --install "$deb"

    local status
    status=$(dpkg-query --admindir="$root/var/lib/dpkg" --show --showformat='${db:Status-Abbrev}${Version}' outbox-relay)
    [ "$status" = "ii $version-1" ] || fail "dpkg status after install: '$status'"
    local out
    out=$("${dpkg[@]}" --verify outbox-relay 2>&1) || fail "dpkg --verify: $out"
    [ -z "$out" ] || fail "dpkg --verify: $out"
    echo "dpkg: outbox-relay $version-1 installed (ii); dpkg --verify finds every file as shipped" >&2

    local path
    for path in /usr/bin/outbox-relay /usr/lib/systemd/system/outbox-relay.service \
        /etc/outbox-relay/outbox-relay.toml /usr/share/man/man1/outbox-relay.1.gz \
        /usr/share/bash-completion/completions/outbox-relay \
        /usr/share/zsh/vendor-completions/_outbox-relay \
        /usr/share/fish/vendor_completions.d/outbox-relay.fish \
        /usr/share/doc/outbox-relay/copyright; do
        [ -f "$root$path" ] || fail "$path is not installed"
    done
    [ -x "$root/usr/bin/outbox-relay" ] || fail "/usr/bin/outbox-relay is not executable"
    dpkg-query --admindir="$root/var/lib/dpkg" --show --showformat='${Conffiles}\n' outbox-relay \
        | grep -q '^ /etc/outbox-relay/outbox-relay.toml [0-9a-f]\{32\}$' \
        || fail "/etc/outbox-relay/outbox-relay.toml is not a registered conffile"
    cmp -s config/outbox-relay.toml "$root/etc/outbox-relay/outbox-relay.toml" \
        || fail "/etc/outbox-relay/outbox-relay.toml differs from config/outbox-relay.toml"
    cmp -s deploy/debian/copyright "$root/usr/share/doc/outbox-relay/copyright" \
        || fail "/usr/share/doc/outbox-relay/copyright is not deploy/debian/copyright"
    local linked
    for linked in $(grep -o '](docs/[a-z-]*\.md' "$root/usr/share/doc/outbox-relay/README.md" | sed 's/^](//' | sort -u); do
        [ -f "$root/usr/share/doc/outbox-relay/$linked" ] \
            || fail "the installed README links to $linked, which is not installed"
    done

    local binary="$root/usr/bin/outbox-relay" line
    line=$("$binary" --version)
    [[ "$line" =~ ^outbox-relay\ $version\ \(git\ [^,]+,\ librdkafka\ [0-9.]+\)$ ]] \
        || fail "installed outbox-relay --version printed '$line'"
    echo "installed binary: $line" >&2
    "$binary" man | cmp -s - <(zcat "$root/usr/share/man/man1/outbox-relay.1.gz") \
        || fail "the installed man page is not what the installed binary prints"
    zcat "$root/usr/share/man/man1/outbox-relay.1.gz" | grep -q '^\.TH outbox-relay 1' \
        || fail "the man page has no .TH outbox-relay 1 header"
    local page name referenced
    for page in "$WORK"/pages/*.1; do
        name=$(basename "$page" .1)
        cmp -s "$page" <(zcat "$root/usr/share/man/man1/$name.1.gz") \
            || fail "the installed $name(1) is not what the installed binary writes"
        zcat "$root/usr/share/man/man1/$name.1.gz" | grep -q "^\.TH $name 1" \
            || fail "$name(1) has no .TH $name 1 header"
        # Every page a page refers to (a command's subcommands: outbox\-relay\-run(1)) is there.
        for referenced in $(zcat "$root/usr/share/man/man1/$name.1.gz" \
            | grep -o 'outbox\\-relay\(\\-[a-z]*\)*(1)' | sed -e 's/\\-/-/g' -e 's/(1)$//' | sort -u); do
            [ -f "$root/usr/share/man/man1/$referenced.1.gz" ] \
                || fail "$name(1) refers to $referenced(1), which is not installed"
        done
    done
    "$binary" completions bash | cmp -s - "$root/usr/share/bash-completion/completions/outbox-relay" \
        || fail "the bash completion is not what the installed binary prints"
    "$binary" completions zsh | cmp -s - "$root/usr/share/zsh/vendor-completions/_outbox-relay" \
        || fail "the zsh completion is not what the installed binary prints"
    "$binary" completions fish | cmp -s - "$root/usr/share/fish/vendor_completions.d/outbox-relay.fish" \
        || fail "the fish completion is not what the installed binary prints"
    bash -c 'source "$1" && complete -p outbox-relay' bash \
        "$root/usr/share/bash-completion/completions/outbox-relay" >/dev/null \
        || fail "sourcing the bash completion does not register a completion for outbox-relay"
    head -1 "$root/usr/share/zsh/vendor-completions/_outbox-relay" | grep -qx '#compdef outbox-relay' \
        || fail "the zsh completion does not start with #compdef outbox-relay"
    if command -v zsh >/dev/null; then
        zsh -n "$root/usr/share/zsh/vendor-completions/_outbox-relay" || fail "zsh -n rejects the zsh completion"
    fi
    grep -q '^complete -c outbox-relay ' "$root/usr/share/fish/vendor_completions.d/outbox-relay.fish" \
        || fail "the fish completion has no 'complete -c outbox-relay' line"
    if command -v fish >/dev/null; then
        fish --no-execute "$root/usr/share/fish/vendor_completions.d/outbox-relay.fish" \
            || fail "fish --no-execute rejects the fish completion"
    fi
    echo "man pages (every one a page refers to among them) and bash, zsh and fish completions: installed, equal to what the installed binary writes, the bash one registers" >&2

    local unit="$root/usr/lib/systemd/system/outbox-relay.service"
    grep -qx 'ExecStart=/usr/bin/outbox-relay --config /etc/outbox-relay/outbox-relay.toml run' "$unit" \
        || fail "the installed unit's ExecStart is not /usr/bin/outbox-relay --config /etc/outbox-relay/outbox-relay.toml run"
    diff <(grep -v '^ExecStart=' deploy/systemd/outbox-relay.service) <(grep -v '^ExecStart=' "$unit") >&2 \
        || fail "the installed unit differs from deploy/systemd/outbox-relay.service beyond ExecStart"
    local enabled
    enabled=$(systemctl --root="$root" is-enabled outbox-relay.service 2>&1 || true)
    [ "$enabled" = disabled ] || fail "systemctl --root is-enabled outbox-relay.service: '$enabled', expected disabled"
    # systemd-analyze verify needs the units the service refers to: this host's, beside it in
    # a copy of the scratch root. It runs man(1) for Documentation=man:outbox-relay(1): the
    # installed page must answer.
    local verify_root="$WORK/verify-root"
    cp -a "$root" "$verify_root"
    cp -an /usr/lib/systemd/system/. "$verify_root/usr/lib/systemd/system/"
    out=$(MANPATH="$verify_root/usr/share/man" systemd-analyze verify --root="$verify_root" \
        /usr/lib/systemd/system/outbox-relay.service 2>&1) || fail "systemd-analyze verify: $out"
    rm -rf "$verify_root"
    [ -z "$out" ] || fail "systemd-analyze verify printed: $out"
    echo "unit: /usr/lib/systemd/system/outbox-relay.service runs /usr/bin/outbox-relay, is disabled (systemctl --root), systemd-analyze verify is clean (the man page its Documentation= names included)" >&2

    log "reinstall over an edited configuration (dpkg --install again: the upgrade path)"
    echo '# edited on this host' >>"$root/etc/outbox-relay/outbox-relay.toml"
    run_dpkg --install "$deb"
    tail -1 "$root/etc/outbox-relay/outbox-relay.toml" | grep -qx '# edited on this host' \
        || fail "the reinstall replaced the edited /etc/outbox-relay/outbox-relay.toml"
    enabled=$(systemctl --root="$root" is-enabled outbox-relay.service 2>&1 || true)
    [ "$enabled" = disabled ] || fail "after the reinstall the unit is '$enabled', expected disabled"
    echo "reinstall: the edited configuration is kept, the unit stays disabled" >&2

    # In the scratch root no other package owns /etc, so dpkg says it leaves it (not empty:
    # /etc/systemd/system, which deb-systemd-helper's mask and unmask create).
    log "remove, then purge (dpkg --remove, dpkg --purge)"
    run_dpkg --remove outbox-relay
    [ ! -e "$root/usr/bin/outbox-relay" ] || fail "dpkg --remove left /usr/bin/outbox-relay"
    [ ! -e "$root/usr/lib/systemd/system/outbox-relay.service" ] || fail "dpkg --remove left the unit"
    [ -f "$root/etc/outbox-relay/outbox-relay.toml" ] || fail "dpkg --remove deleted the configuration"
    status=$(dpkg-query --admindir="$root/var/lib/dpkg" --show --showformat='${db:Status-Abbrev}' outbox-relay)
    [ "$status" = "rc " ] || fail "dpkg status after remove: '$status', expected rc"
    run_dpkg --purge outbox-relay
    [ ! -e "$root/etc/outbox-relay" ] || fail "dpkg --purge left /etc/outbox-relay"
    if find "$root" -name '*outbox-relay*' | grep -v '^'"$root"'/var/log/' | grep -q .; then
        fail "after the purge: $(find "$root" -name '*outbox-relay*')"
    fi
    echo "remove keeps /etc/outbox-relay/outbox-relay.toml (rc), purge leaves nothing of the package" >&2

    [ "$(host_systemd_state)" = "$before" ] || fail "this host's systemd state changed: $(host_systemd_state)"
    echo "this host's /etc/systemd and /var/lib/systemd: unchanged" >&2
}

main() {
    local started=$SECONDS
    ensure_package_tools
    local deb version
    version=$(sed -n '/^\[package\]/,/^\[/s/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)
    [ -n "$version" ] || fail "no version in Cargo.toml's [package]"
    deb=$(scripts/package.sh | tail -1)
    expect_man_pages "$deb"
    expect_docs
    log "dpkg-deb --info $deb"
    check_info "$deb" "$version"
    log "dpkg-deb --contents $deb"
    check_contents "$deb"
    check_copyright
    check_lintian "$deb"
    check_install "$deb" "$version"
    log "check-package: $deb passed ($((SECONDS - started))s)"
}

main "$@"
