#!/usr/bin/env bash
# Run the pyconntrack test suite inside a throwaway qemu (TCG) VM booting a
# Debian cloud kernel, so it runs against a real 6.1 or 6.12 conntrack.
#
#   vagrant/qemu/vm-test.sh 6.1|6.12
#
# Environment:
#   PYCONNTRACK_VM_CACHE  cache dir (default /var/cache/pyconntrack-vm)
#   VM_TIMEOUT            overall qemu timeout in seconds (default 1500)
#   VM_PYTEST_ARGS        pytest arguments used by the default guest command (default: tests)
#   VM_GUEST_CMD          replace the whole guest command (run by bash in /project)
#   VM_EXTRA_FILES        space-separated host files/dirs copied to /extra in the guest
#   VM_PROJECT_DIR        tree shared as /project (default: the repo root, ../.. of this script)
#   VM_KERNEL_PKG         exact kernel package to use instead of the newest for the series
#   VM_DEBIAN_MIRROR      mirror for debootstrap/private apt (default: the one serving
#                         bookworm in this machine's apt sources, vagrant/apt-sources.sh)
#   VM_SECURITY_MIRROR    the same for bookworm-security (default: from the apt sources)
#   VM_SMP, VM_MEM        guest CPUs (default 2) and memory in MiB (default 2048)
#   VM_QEMU_ARGS          extra qemu arguments (word-split)
#   PYCONNTRACK_*, HYPOTHESIS_*  forwarded into the guest environment
#
# Exit status: the guest command's exit status; 124 on timeout; 125 when the
# guest never printed its VMTEST-RC marker; 2 on usage/setup errors.
set -euo pipefail

KERNEL=${1:-}
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PROJECT_DIR=$(cd "${VM_PROJECT_DIR:-$SCRIPT_DIR/../..}" && pwd)
CACHE=${PYCONNTRACK_VM_CACHE:-/var/cache/pyconntrack-vm}
VM_TIMEOUT=${VM_TIMEOUT:-1500}
SUITE=bookworm
# shellcheck source=../apt-sources.sh
. "$SCRIPT_DIR/../apt-sources.sh"
MIRROR=${VM_DEBIAN_MIRROR:-$(host_debian_mirror "$SUITE")}
SECURITY=${VM_SECURITY_MIRROR:-$(host_security_mirror "$SUITE")}
PKG_FILE=$SCRIPT_DIR/guest-packages.txt
# Bump when the way the rootfs is built changes (it is part of the cache key).
ROOTFS_FORMAT=3
# The rootfs is a GPT image whose partition has this fixed PARTUUID: the kernel
# needs no initramfs for root=PARTUUID=, while /dev/nvme0nN names are not stable
# (6.12 scans namespaces asynchronously). The other disks are mounted by label.
ROOT_PARTUUID=8d1e3c2a-1f39-4c6b-9c59-7063746b7673

log() { printf '[vm-test %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "ERROR: $*"; exit 2; }

case "$KERNEL" in
    6.1|6.12) ;;
    *) echo "usage: $0 6.1|6.12" >&2; exit 2 ;;
esac
[ -n "$MIRROR" ] || die "no '$SUITE' entry in this machine's apt sources; set VM_DEBIAN_MIRROR"

if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || die "must run as root (debootstrap, apt-get)"
    exec sudo -E bash "$0" "$@"
fi

export DEBIAN_FRONTEND=noninteractive LC_ALL=C

# ---------------------------------------------------------------- host deps
ensure_host_packages() {
    local missing=() want
    declare -A bin=( [qemu-system-x86]=qemu-system-x86_64 [debootstrap]=debootstrap
                     [e2fsprogs]=mkfs.ext4 [kmod]=depmod [util-linux]=flock [fdisk]=sfdisk )
    for want in "${!bin[@]}"; do
        command -v "${bin[$want]}" >/dev/null 2>&1 || missing+=("$want")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    log "installing host packages: ${missing[*]}"
    if ! apt-get install -y -q --no-install-recommends "${missing[@]}" >&2; then
        apt-get update -q >&2
        apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
    fi
}

# ------------------------------------------------------------------- kernel
APT_PRIVATE=$CACHE/apt
apt_private() {  # apt with a private sources list (bookworm + security + backports)
    apt-get -o Dir::Etc::SourceList="$APT_PRIVATE/sources.list" \
            -o Dir::Etc::SourceParts=- \
            -o Dir::State::Lists="$APT_PRIVATE/lists" \
            -o Dir::Cache="$APT_PRIVATE/cache" \
            -o APT::Get::List-Cleanup=0 "$@"
}
apt_cache_private() {
    apt-cache -o Dir::Etc::SourceList="$APT_PRIVATE/sources.list" \
              -o Dir::Etc::SourceParts=- \
              -o Dir::State::Lists="$APT_PRIVATE/lists" \
              -o Dir::Cache="$APT_PRIVATE/cache" "$@"
}
setup_apt_private() {
    mkdir -p "$APT_PRIVATE/lists/partial" "$APT_PRIVATE/cache/archives/partial"
    local key=/usr/share/keyrings/debian-archive-keyring.gpg
    {
        printf 'deb [signed-by=%s] %s %s main\n' "$key" "$MIRROR" bookworm "$key" "$MIRROR" \
            bookworm-updates "$key" "$MIRROR" bookworm-backports
        [ -z "$SECURITY" ] || printf 'deb [signed-by=%s] %s bookworm-security main\n' "$key" "$SECURITY"
    } > "$APT_PRIVATE/sources.list"
    apt_private update -q >&2
}

# Print the newest kernel package name of the series known to apt ($1 = apt-cache cmd).
newest_kernel_pkg() {
    local cache_cmd=$1 meta re
    if [ "$KERNEL" = 6.1 ]; then
        meta=linux-image-cloud-amd64; re='^linux-image-6\.1\.0-[0-9]+-cloud-amd64$'
    else
        meta=linux-image-6.12-cloud-amd64; re='^linux-image-6\.12\.[0-9]+\+(deb12(\.[0-9]+)?|bpo)-cloud-amd64$'
    fi
    # the meta package points at the current ABI; fall back to a name search
    $cache_cmd depends "$meta" 2>/dev/null | awk '/Depends: linux-image-/{print $2}' \
        | grep -E "$re" | head -n1 && return 0
    $cache_cmd search --names-only "$re" 2>/dev/null | awk '{print $1}' | sort -V | tail -n1
}

KDIR=
ensure_kernel() {
    local pkg=${VM_KERNEL_PKG:-} src=host ver
    if [ -z "$pkg" ]; then
        pkg=$(newest_kernel_pkg apt-cache || true)
        if [ -z "$pkg" ]; then
            apt-get update -q >&2 || true
            pkg=$(newest_kernel_pkg apt-cache || true)
        fi
        if [ -z "$pkg" ]; then
            log "no $KERNEL cloud kernel in the host's apt sources; using a private apt config"
            setup_apt_private || true
            pkg=$(newest_kernel_pkg apt_cache_private || true); src=private
        fi
    fi
    if [ -n "$pkg" ]; then
        if [ "$src" = host ]; then
            ver=$(apt-cache policy "$pkg" | awk '/Candidate:/{print $2}')
            if [ -z "$ver" ] || [ "$ver" = "(none)" ]; then
                setup_apt_private; src=private
            fi
        fi
        [ "$src" = private ] && ver=$(apt_cache_private policy "$pkg" | awk '/Candidate:/{print $2}')
    fi
    if [ -z "$pkg" ] || [ -z "${ver:-}" ] || [ "$ver" = "(none)" ]; then
        # offline: reuse the newest cached kernel of the series
        KDIR=$(ls -d "$CACHE/kernels/$KERNEL/"*/ 2>/dev/null | sort -V | tail -n1 || true)
        [ -n "$KDIR" ] && [ -f "$KDIR/ok" ] || die "cannot find a $KERNEL cloud kernel package"
        KDIR=${KDIR%/}; log "apt lookup failed; using cached kernel $(basename "$KDIR")"
        return 0
    fi
    KDIR=$CACHE/kernels/$KERNEL/${pkg}_${ver//:/%}
    [ -f "$KDIR/ok" ] && return 0

    log "fetching kernel $pkg $ver"
    local t0=$SECONDS tmp kver moddir
    tmp=$(mktemp -d "$CACHE/tmp.kernel.XXXXXX")
    (cd "$tmp" && if [ "$src" = host ]; then apt-get download -q "$pkg=$ver"; \
                  else apt_private download -q "$pkg=$ver"; fi) >&2
    dpkg-deb -x "$tmp"/*.deb "$tmp/x"
    moddir=$(ls -d "$tmp"/x/lib/modules/*/ "$tmp"/x/usr/lib/modules/*/ 2>/dev/null | head -n1 || true)
    [ -n "$moddir" ] || die "no modules in $pkg"
    kver=$(basename "$moddir")
    mkdir -p "$tmp/m/lib/modules"
    mv "$moddir" "$tmp/m/lib/modules/$kver"
    depmod -b "$tmp/m" "$kver"
    mkdir -p "$tmp/out"
    cp "$tmp/x/boot/vmlinuz-$kver" "$tmp/out/vmlinuz"
    echo "$kver" > "$tmp/out/kver"
    local mb; mb=$(du -sm "$tmp/m/lib/modules" | cut -f1)
    mkfs.ext4 -q -F -L pctmods -d "$tmp/m/lib/modules" "$tmp/out/modules.ext4" "$((mb * 13 / 10 + 64))M"
    touch "$tmp/out/ok"
    rm -rf "$KDIR"; mkdir -p "$(dirname "$KDIR")"
    mv "$tmp/out" "$KDIR"; rm -rf "$tmp"
    # keep only the newest kernel of the series (unless one was pinned)
    local d; [ -n "${VM_KERNEL_PKG:-}" ] || for d in "$CACHE/kernels/$KERNEL"/*/; do
        [ "${d%/}" = "$KDIR" ] || rm -rf "$d"
    done
    log "kernel $kver ready in $((SECONDS - t0)) s"
}

# ------------------------------------------------------------------- rootfs
guest_packages() { sed -e 's/#.*//' -e 's/[[:space:]]//g' "$PKG_FILE" | grep -v '^$' | sort -u; }

# Stub /sbin/pct-init baked into the rootfs: mounts the per-run disk and hands
# over to its init.sh, so the real init can change without a rootfs rebuild.
STUB_INIT='#!/bin/sh
PATH=/usr/sbin:/usr/bin:/sbin:/bin; export PATH
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
i=0; while ! findfs LABEL=pctrun >/dev/null 2>&1 && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
if mount -t ext4 LABEL=pctrun /mnt/run && [ -x /mnt/run/vmtest/init.sh ]; then
    exec /mnt/run/vmtest/init.sh
fi
echo "pct-init: cannot mount the run disk"; echo VMTEST-RC=125
sleep 1; echo o > /proc/sysrq-trigger; sleep 10'

ROOTFS=
ensure_rootfs() {
    local key
    key=$( { echo "format=$ROOTFS_FORMAT suite=$SUITE mirror=$MIRROR"; guest_packages; echo "$STUB_INIT"; } \
           | sha256sum | cut -c1-16)
    ROOTFS=$CACHE/rootfs-$SUITE-$key.img
    [ -f "$ROOTFS" ] && return 0

    local stale; for stale in "$CACHE"/tmp.rootfs.*; do   # left by an interrupted build
        [ -d "$stale" ] || continue
        umount -l "$stale/root/proc" 2>/dev/null || true
        rm -rf --one-file-system "$stale"
    done
    log "building $SUITE rootfs (key $key) with debootstrap"
    local t0=$SECONDS tmp dir
    tmp=$(mktemp -d "$CACHE/tmp.rootfs.XXXXXX"); dir=$tmp/root
    # debootstrap cannot resolve virtual packages (python3-pycparser needs
    # python3-ply-lex-3.10), so bootstrap minbase and let apt inside it do the rest.
    debootstrap --variant=minbase "$SUITE" "$dir" "$MIRROR" >&2 \
        || { log "debootstrap failed; see $dir/debootstrap/debootstrap.log"; exit 2; }
    {
        printf 'deb %s %s main\n' "$MIRROR" "$SUITE" "$MIRROR" "$SUITE-updates"
        [ -z "$SECURITY" ] || printf 'deb %s %s-security main\n' "$SECURITY" "$SUITE"
    } > "$dir/etc/apt/sources.list"
    host_apt_conf > "$dir/etc/apt/apt.conf.d/90host"   # e.g. Check-Valid-Until for a snapshot
    # only /proc is mounted (never bind /dev: an rm -rf of a half-built tree
    # would then delete the host's device nodes); debootstrap made /dev/null etc.
    mount -t proc proc "$dir/proc"
    local rc=0
    # packages such as openvswitch-switch start services when installed:
    # refuse every service start inside the chroot
    printf '#!/bin/sh\nexit 101\n' > "$dir/usr/sbin/policy-rc.d"
    chmod 755 "$dir/usr/sbin/policy-rc.d"
    # shellcheck disable=SC2046
    { chroot "$dir" apt-get update -q &&
      chroot "$dir" apt-get dist-upgrade -y -q --no-install-recommends &&
      chroot "$dir" apt-get install -y -q --no-install-recommends $(guest_packages) &&
      chroot "$dir" apt-get clean; } >&2 || rc=$?
    umount "$dir/proc"
    rm -f "$dir/usr/sbin/policy-rc.d"
    [ $rc -eq 0 ] || die "apt-get inside the rootfs failed (rc $rc)"
    # every requested package must really be installed
    local p missing=()
    for p in $(guest_packages); do
        chroot "$dir" dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' \
            || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] || die "packages missing from the rootfs: ${missing[*]}"
    printf '%s\n' "$STUB_INIT" > "$dir/sbin/pct-init"; chmod 755 "$dir/sbin/pct-init"
    mkdir -p "$dir/project" "$dir/mnt/run" "$dir/extra" "$dir/usr/lib/modules"
    echo pct-vm > "$dir/etc/hostname"
    printf '127.0.0.1 localhost pct-vm\n::1 localhost ip6-localhost\n' > "$dir/etc/hosts"
    rm -rf "$dir"/var/cache/apt/archives/*.deb "$dir"/var/lib/apt/lists/* "$dir/debootstrap"
    local mb img=$tmp/rootfs.img; mb=$(( $(du -sm "$dir" | cut -f1) + 512 ))
    truncate -s "$((mb + 2))M" "$img"   # 1 MiB GPT + ext4 partition + 1 MiB backup GPT
    printf 'label: gpt\nstart=2048, size=%d, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, uuid=%s, name=pctroot\n' \
        "$((mb * 2048))" "$ROOT_PARTUUID" | sfdisk -q "$img"
    mkfs.ext4 -q -F -L pctroot -E offset=1048576 -d "$dir" "$img" "${mb}M"
    rm -f "$CACHE"/rootfs-*.img "$CACHE"/rootfs-*.ext4   # drop stale images
    mv "$img" "$ROOTFS"; rm -rf "$tmp"
    log "rootfs ready in $((SECONDS - t0)) s ($(du -sm "$ROOTFS" | cut -f1) MB used)"
}

# ------------------------------------------------------------- per-run disk
write_guest_init() {  # $1 = vmtest dir on the run disk
    cat > "$1/init.sh" <<'EOF'
#!/bin/bash
# Guest init (PID 1). Generated by vagrant/qemu/vm-test.sh.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C.UTF-8 TERM=dumb PYTHONUNBUFFERED=1
finish() {
    echo "VMTEST-RC=$1"
    sync; sleep 0.5
    echo o > /proc/sysrq-trigger
    sleep 30
}
trap 'finish 126' ERR
mount -t tmpfs -o mode=755 tmpfs /run
mkdir -p /run/netns /run/lock /dev/pts /dev/shm
mount -t tmpfs -o mode=755 tmpfs /run/netns   # == /var/run/netns
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /var/tmp
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t bpf bpf /sys/fs/bpf
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null || true
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null || true
mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null || true
mount -o ro LABEL=pctmods /usr/lib/modules
mount --bind /mnt/run/project /project
[ -d /mnt/run/extra ] && mount --bind /mnt/run/extra /extra
trap - ERR
hostname pct-vm
ip link set lo up
ulimit -l unlimited
# one modprobe call: each exec costs ~0.25 s under TCG
modprobe -a nf_conntrack nf_conntrack_netlink nf_tables nft_ct nf_nat nft_chain_nat \
    nf_conntrack_bridge veth dummy || echo "vm-init: some modules failed to load"
echo "vm-init: kernel $(uname -r), $(nproc) cpus, modules: $(lsmod | awk 'NR>1{print $1}' | sort | tr '\n' ' ')"
set -a; . /mnt/run/vmtest/env; set +a
cd /project
bash /mnt/run/vmtest/cmd.sh
finish $?
EOF
    chmod 755 "$1/init.sh"
}

DEFAULT_GUEST_CMD='cd /project
export PYTHONPATH=/project${PYTHONPATH:+:$PYTHONPATH}
python3 -m pyconntrack probe || echo "vm-test: pyconntrack probe failed (rc=$?), continuing"
PYCONNTRACK_REQUIRE_KERNEL=1 python3 -m pytest -q -p no:cacheprovider ${VM_PYTEST_ARGS:-tests}'

RUNDIR=
make_run_disk() {
    local stage=$RUNDIR/stage v
    mkdir -p "$stage/project" "$stage/vmtest" "$stage/extra"
    tar -C "$PROJECT_DIR" \
        --exclude=./.git --exclude=.venv --exclude=./venv --exclude=__pycache__ \
        --exclude=.pytest_cache --exclude=.hypothesis --exclude=.mypy_cache \
        --exclude=.ruff_cache --exclude=.tox --exclude=.vagrant --exclude=node_modules \
        -cf - . | tar -C "$stage/project" -xf -
    if [ -n "${VM_EXTRA_FILES:-}" ]; then
        for v in $VM_EXTRA_FILES; do cp -a "$v" "$stage/extra/"; done
    fi
    write_guest_init "$stage/vmtest"
    printf '%s\n' "${VM_GUEST_CMD:-$DEFAULT_GUEST_CMD}" > "$stage/vmtest/cmd.sh"
    {
        printf 'VM_KERNEL=%q\n' "$KERNEL"
        # the 6.12 guest has Open vSwitch: its index test must run there
        if [ "$KERNEL" = 6.12 ]; then printf 'PYCONNTRACK_REQUIRE_OVS=1\n'; fi
        [ -n "${VM_PYTEST_ARGS:-}" ] && printf 'VM_PYTEST_ARGS=%q\n' "$VM_PYTEST_ARGS"
        for v in $(compgen -e); do
            case "$v" in
                PYCONNTRACK_VM_CACHE) ;;
                PYCONNTRACK_*|HYPOTHESIS_*) printf '%s=%q\n' "$v" "${!v}" ;;
            esac
        done
    } > "$stage/vmtest/env"
    local mb; mb=$(du -sm "$stage" | cut -f1)
    mkfs.ext4 -q -F -L pctrun -d "$stage" "$RUNDIR/run.ext4" "$((mb + 256))M"
    rm -rf "$stage"
}

# --------------------------------------------------------------------- main
ensure_host_packages
mkdir -p "$CACHE"
T_START=$SECONDS
exec 9>"$CACHE/.lock"
flock 9
ensure_kernel
ensure_rootfs
flock -u 9
exec 9>&-
T_CACHE=$((SECONDS - T_START))

ls "$PROJECT_DIR"/pyconntrack/_pct*.so >/dev/null 2>&1 \
    || log "warning: no built extension pyconntrack/_pct*.so in $PROJECT_DIR (run make build first?)"

RUNDIR=$(mktemp -d "${TMPDIR:-/tmp}/pct-vm.XXXXXX")
trap 'rm -rf "$RUNDIR"' EXIT
make_run_disk

KVER=$(cat "$KDIR/kver")
log "booting $KVER (cache ready after ${T_CACHE} s, timeout ${VM_TIMEOUT} s)"
CONSOLE=$RUNDIR/console.log
T_BOOT=$SECONDS
set +e
# -snapshot: the cached images are never written (writes go to a temp overlay),
# so runs are reproducible and may run concurrently.
# shellcheck disable=SC2086
timeout -k 10 "$VM_TIMEOUT" qemu-system-x86_64 \
    -M q35 -accel tcg -m "${VM_MEM:-2048}" -smp "${VM_SMP:-2}" \
    -display none -monitor none -serial stdio -nic none -no-reboot -snapshot \
    -kernel "$KDIR/vmlinuz" \
    -append "console=ttyS0 root=PARTUUID=$ROOT_PARTUUID rootwait rootfstype=ext4 rw init=/sbin/pct-init panic=-1 quiet mitigations=off no_timer_check" \
    -device nvme,id=nvme0,serial=pctvm \
    -drive file="$ROOTFS",if=none,id=root,format=raw \
    -device nvme-ns,drive=root,bus=nvme0,nsid=1 \
    -drive file="$KDIR/modules.ext4",if=none,id=mods,format=raw,readonly=on \
    -device nvme-ns,drive=mods,bus=nvme0,nsid=2 \
    -drive file="$RUNDIR/run.ext4",if=none,id=run,format=raw \
    -device nvme-ns,drive=run,bus=nvme0,nsid=3 \
    ${VM_QEMU_ARGS:-} </dev/null 2>&1 | sed -u 's/\r$//' | tee "$CONSOLE"
QEMU_RC=${PIPESTATUS[0]}
set -e
T_RUN=$((SECONDS - T_BOOT))

RC=$(grep -a -E '^VMTEST-RC=[0-9]+$' "$CONSOLE" | tail -n1 | cut -d= -f2 || true)
if [ -z "$RC" ]; then
    if [ "$QEMU_RC" -eq 124 ] || [ "$QEMU_RC" -eq 137 ]; then
        log "TIMEOUT after ${VM_TIMEOUT} s (kernel $KVER)"; RC=124
    else
        log "guest gave no VMTEST-RC marker (qemu exit $QEMU_RC, kernel $KVER)"; RC=125
    fi
else
    log "kernel $KVER: guest exit $RC (vm ${T_RUN} s, total $((SECONDS - T_START)) s)"
fi
exit "$RC"
