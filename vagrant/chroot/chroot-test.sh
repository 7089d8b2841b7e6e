#!/usr/bin/env bash
# Prove pyconntrack on a fresh minimal Debian 12 that shares this machine's
# kernel: a debootstrap chroot in a private mount namespace.
#
#   vagrant/chroot/chroot-test.sh fresh   # clone HEAD into the chroot's /root;
#                                         # make test (PYCONNTRACK_REQUIRE_KERNEL=1)
#                                         # and make demo, nothing installed by hand
#   vagrant/chroot/chroot-test.sh wheel   # runtime libraries only (no compiler,
#                                         # no -dev, no clang): pip install the
#                                         # wheel from dist/, probe, clean a zone
#
# The base system (debootstrap --variant=minbase, plus python3 make git for
# "fresh") is cached as a tarball; downloaded .debs and pip wheels are cached
# too, so a rerun only pays for the installs and the run itself. The mirror
# is the one this machine's apt configuration uses (vagrant/apt-sources.sh).
#
# Environment:
#   PYCONNTRACK_CHROOT_CACHE  cache dir (default /var/cache/pyconntrack-chroot)
#   PYCONNTRACK_CHROOT_DIR    where the chroot is unpacked (default
#                             /var/tmp/pct-<mode>-chroot; removed afterwards
#                             unless PYCONNTRACK_CHROOT_KEEP=1)
#   CHROOT_WHEEL              the wheel to test (default: newest dist/pyconntrack-*.whl)
#   CHROOT_TIMEOUT            seconds for the run inside the chroot (default 3600)
#
# Safety: everything mounted for the chroot lives in a private mount
# namespace and disappears with it; the chroot gets its own /run (so its
# named netns are its own), its own /tmp and its own bpffs instance (its
# index pins are invisible to, and cannot collide with, the host's). Kernel
# tests still run only in scratch network namespaces they create and remove.
set -euo pipefail

MODE=${1:-}
case "$MODE" in fresh|wheel) ;; *) echo "usage: $0 fresh|wheel" >&2; exit 2 ;; esac

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PROJECT_DIR=$(cd "$SCRIPT_DIR/../.." && pwd)
CACHE=${PYCONNTRACK_CHROOT_CACHE:-/var/cache/pyconntrack-chroot}
WORK=${PYCONNTRACK_CHROOT_DIR:-/var/tmp/pct-$MODE-chroot}
SUITE=bookworm
BASE_FORMAT=1   # bump when the way the base is built changes (part of the cache key)
# what "fresh minimal Debian 12" means here: minbase + what one needs to clone and type make
case "$MODE" in
    fresh) INCLUDE=python3,make,git ;;
    wheel) INCLUDE=python3 ;;
esac
# the wheel's runtime dependencies (README: "Installing the wheel")
RUNTIME_PACKAGES="libnetfilter-conntrack3 libmnl0 libbpf1 python3 python3-venv iproute2"

log() { printf '[chroot-test %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "ERROR: $*"; exit 2; }

[ "$(id -u)" -eq 0 ] || die "must run as root (debootstrap, chroot, mounts)"
export DEBIAN_FRONTEND=noninteractive LC_ALL=C

# shellcheck source=../apt-sources.sh
. "$SCRIPT_DIR/../apt-sources.sh"
MIRROR=${CHROOT_DEBIAN_MIRROR:-$(host_debian_mirror "$SUITE")}
SECURITY=${CHROOT_SECURITY_MIRROR:-$(host_security_mirror "$SUITE")}
[ -n "$MIRROR" ] || die "no '$SUITE' entry in this machine's apt sources; set CHROOT_DEBIAN_MIRROR"

T0=$SECONDS
if ! command -v debootstrap >/dev/null; then
    log "installing debootstrap"
    apt-get install -y -q --no-install-recommends debootstrap >&2 \
        || { apt-get update -q >&2 && apt-get install -y -q --no-install-recommends debootstrap >&2; }
fi

# --------------------------------------------------------------- base tarball
# per mode: two runs at once must not share apt's archive lock
ARCHIVES=$CACHE/archives-$MODE
mkdir -p "$ARCHIVES/partial" "$CACHE/pip"
KEY=$(printf 'format=%s suite=%s mirror=%s include=%s\n' "$BASE_FORMAT" "$SUITE" "$MIRROR" "$INCLUDE" \
      | sha256sum | cut -c1-16)
BASE=$CACHE/base-$SUITE-$KEY.tar
exec 9>"$CACHE/.lock"
flock 9
if [ ! -f "$BASE" ]; then
    log "building the $SUITE base (minbase + $INCLUDE) from $MIRROR"
    t=$SECONDS
    tmp=$(mktemp -d "$CACHE/tmp.base.XXXXXX")
    debootstrap --variant=minbase --include="$INCLUDE" --cache-dir="$ARCHIVES" \
        "$SUITE" "$tmp/root" "$MIRROR" >&2 \
        || { log "debootstrap failed; see $tmp/root/debootstrap/debootstrap.log"; exit 2; }
    rm -rf "$tmp/root/var/lib/apt/lists/"* "$tmp/root/var/cache/apt/archives/"*.deb
    tar -C "$tmp/root" -cf "$tmp/base.tar" .
    mv "$tmp/base.tar" "$BASE"
    rm -rf --one-file-system "$tmp"
    log "base ready in $((SECONDS - t)) s ($(du -sm "$BASE" | cut -f1) MB)"
fi
flock -u 9
exec 9>&-

# ------------------------------------------------------------- unpack a chroot
ROOT=$WORK/root
if [ -e "$WORK" ]; then
    # left by an interrupted run; its mounts died with its mount namespace
    grep -q " $WORK/" /proc/self/mountinfo && die "$WORK has mounts in this namespace; not removing it"
    rm -rf --one-file-system "$WORK"
fi
mkdir -p "$ROOT"
cleanup() {
    [ "${PYCONNTRACK_CHROOT_KEEP:-0}" = 1 ] && { log "kept $WORK"; return; }
    if grep -q " $WORK/" /proc/self/mountinfo; then
        log "mounts remain under $WORK; not removing it"; return
    fi
    rm -rf --one-file-system "$WORK"
}
trap cleanup EXIT
tar -C "$ROOT" -xf "$BASE"

# apt inside the chroot: this machine's mirrors and the apt settings it needs
{
    printf 'deb %s %s main\n' "$MIRROR" "$SUITE" "$MIRROR" "$SUITE-updates"
    [ -z "$SECURITY" ] || printf 'deb %s %s-security main\n' "$SECURITY" "$SUITE"
} > "$ROOT/etc/apt/sources.list"
host_apt_conf > "$ROOT/etc/apt/apt.conf.d/90host"
cp /etc/resolv.conf "$ROOT/etc/resolv.conf" 2>/dev/null || true
# pip inside the chroot: this machine's global pip configuration and the CA
# bundle it names (e.g. a site whose TLS goes through its own CA)
for conf in /etc/pip.conf /etc/xdg/pip/pip.conf; do
    [ -f "$conf" ] || continue
    mkdir -p "$ROOT$(dirname "$conf")"; cp "$conf" "$ROOT$conf"
    cert=$(sed -n 's/^[[:space:]]*cert[[:space:]]*=[[:space:]]*//p' "$conf" | tail -n1)
    if [ -n "$cert" ] && [ -f "$cert" ]; then
        # a path no package owns (ca-certificates would rewrite its own bundle)
        cp -L "$cert" "$ROOT/etc/pip-host-ca.pem"
        sed -i 's|^\([[:space:]]*cert[[:space:]]*=\).*|\1 /etc/pip-host-ca.pem|' "$ROOT$conf"
    fi
    for f in $(sed -n 's/^[[:space:]]*constraint[[:space:]]*=[[:space:]]*//p' "$conf"); do
        [ -f "$f" ] && mkdir -p "$ROOT$(dirname "$f")" && cp -L "$f" "$ROOT$f"
    done
done
mkdir -p "$ROOT/root/.cache/pip"

case "$MODE" in
fresh)
    # what a user does: clone the project into root's home (0700)
    rev=$(git -C "$PROJECT_DIR" rev-parse HEAD)
    git -C "$PROJECT_DIR" diff --quiet HEAD 2>/dev/null \
        || log "note: uncommitted changes in $PROJECT_DIR are not tested (HEAD $rev is)"
    git clone -q --no-checkout "$PROJECT_DIR" "$ROOT/root/pyconntrack"
    git -C "$ROOT/root/pyconntrack" checkout -q -B fresh-test "$rev"
    # both run whatever the first gives, so one run reports both
    INNER='cd /root/pyconntrack || exit 2
t=$SECONDS
make build >/dev/null; echo "fresh-test: make build (deps, venv, build) exit $? in $((SECONDS - t)) s"
t=$SECONDS
PYCONNTRACK_REQUIRE_KERNEL=1 make test; test_rc=$?
echo "fresh-test: make test exit $test_rc in $((SECONDS - t)) s"
t=$SECONDS
make demo; demo_rc=$?
echo "fresh-test: make demo exit $demo_rc in $((SECONDS - t)) s"
[ $test_rc -eq 0 ] && [ $demo_rc -eq 0 ]'
    ;;
wheel)
    WHEEL=${CHROOT_WHEEL:-$(ls -t "$PROJECT_DIR"/dist/pyconntrack-*.whl 2>/dev/null | head -n1 || true)}
    [ -n "$WHEEL" ] && [ -f "$WHEEL" ] || die "no wheel in $PROJECT_DIR/dist (make wheel)"
    mkdir -p "$ROOT/root/wheel"
    cp "$WHEEL" "$ROOT/root/wheel/"
    cp "$SCRIPT_DIR/wheel-check.sh" "$ROOT/root/wheel-check.sh"
    INNER="set -e
apt-get update -q
apt-get install -y -q --no-install-recommends $RUNTIME_PACKAGES
bash /root/wheel-check.sh /root/wheel/$(basename "$WHEEL")"
    ;;
esac

# ---------------------------------------------------------------------- run
# Mounts in a private mount namespace: they vanish when it ends, whatever
# happens. The chroot's root is bind-mounted onto itself so that
# `ip netns exec` can make / a slave and remount /sys.
log "running in $ROOT (mirror $MIRROR)"
T_RUN=$SECONDS
set +e
timeout -k 30 "${CHROOT_TIMEOUT:-3600}" \
unshare --mount --propagation private -- bash -euc '
    root=$1; cache=$2; inner=$3; archives=$4
    mount --bind "$root" "$root"
    mount -t proc proc "$root/proc"
    mount -t sysfs sysfs "$root/sys"
    mount -t bpf bpf "$root/sys/fs/bpf"
    mount --rbind /dev "$root/dev"
    mount -t tmpfs -o mode=1777 tmpfs "$root/dev/shm"
    mount -t tmpfs -o mode=755 tmpfs "$root/run"
    mkdir -p "$root/run/lock"
    mount -t tmpfs -o mode=1777 tmpfs "$root/tmp"
    mount --bind "$archives" "$root/var/cache/apt/archives"
    mount --bind "$cache/pip" "$root/root/.cache/pip"
    exec chroot "$root" /usr/bin/env -i HOME=/root LANG=C.UTF-8 TERM=dumb \
        PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 \
        /bin/bash -c "$inner"
' chroot-run "$ROOT" "$CACHE" "$INNER" "$ARCHIVES"
RC=$?
set -e
log "$MODE: exit $RC (run $((SECONDS - T_RUN)) s, total $((SECONDS - T0)) s)"
exit "$RC"
