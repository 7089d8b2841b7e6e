#!/usr/bin/env bash
# Run inside the wheel-test chroot (vagrant/chroot/chroot-test.sh wheel), where
# only the runtime libraries are installed: no compiler, no -dev package, no
# clang. Installs the wheel in a venv, probes, and cleans one zone of a scratch
# netns it creates and removes; the checks use the kernel's own count.
#
#   wheel-check.sh /path/to/pyconntrack-*.whl
set -euo pipefail
WHEEL=$1
VENV=/opt/pyconntrack
PCT=$VENV/bin/pyconntrack
fail() { echo "wheel-check: FAILED: $*" >&2; exit 1; }
say() { echo "wheel-check: $*"; }

# ---- nothing to build with
for tool in cc gcc clang llc bpftool pkg-config; do
    if command -v "$tool" >/dev/null; then fail "$tool is installed: not a runtime-only system"; fi
done
devs=$(dpkg-query -W -f='${Package}\n' | grep -E -- '-dev$' || true)
[ -z "$devs" ] || fail "-dev packages installed: $(echo $devs)"
say "no compiler, no clang, no -dev package"

# ---- install
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --disable-pip-version-check "$WHEEL"
so=$("$VENV/bin/python" -c 'import pyconntrack._pct as m; print(m.__file__)')
say "installed $(basename "$WHEEL"); shim $so"
if ldd "$so" | grep -q "not found"; then ldd "$so"; fail "the shim misses a shared library"; fi
ldd "$so" | awk '/=>/{print "wheel-check:   " $1 " => " $3}'
# the eBPF object travels inside the shim (bpftool skeleton): find its ELF header
"$VENV/bin/python" - "$so" <<'EOF'
import struct, sys
data = open(sys.argv[1], "rb").read()
i, found = 0, []
while (i := data.find(b"\x7fELF", i + 1)) > 0:
    if struct.unpack_from("<H", data, i + 18)[0] == 247:  # e_machine EM_BPF
        found.append(i)
if not found:
    sys.exit("wheel-check: FAILED: no eBPF object embedded in the shim")
print(f"wheel-check: eBPF object embedded in the shim at offset {found[0]}")
EOF

# ---- probe
"$PCT" probe
bpf=$("$PCT" probe --json | "$VENV/bin/python" -c 'import json,sys; print(json.load(sys.stdin)["netfilter_bpf"])')

# ---- a zone cleanup in a scratch netns
ns=pct-wheel-$$
ip netns add "$ns"
trap 'ip netns delete "$ns"' EXIT
kcount() { ip netns exec "$ns" cat /proc/sys/net/netfilter/nf_conntrack_count; }
zcount() { "$PCT" count --netns "$ns" --zone "$1" --json \
           | "$VENV/bin/python" -c 'import json,sys; print(json.load(sys.stdin)["count"])'; }
field() { "$VENV/bin/python" -c "import json,sys; print(json.load(sys.stdin)['$1'])"; }
for z in 11 12 13; do
    "$PCT" create --netns "$ns" --zone "$z" --proto udp --src "10.0.$z.1" --dst 10.9.9.9 \
        --dport 53 --count 200 >/dev/null
    "$PCT" create --netns "$ns" --zone "$z" --family ipv6 --proto tcp --src "fd00:$z::1" \
        --dst fd00:99::9 --dport 443 --count 100 >/dev/null
done
[ "$(kcount)" = 900 ] || fail "the kernel counts $(kcount) entries after creating 900"
for z in 11 12 13; do [ "$(zcount $z)" = 300 ] || fail "zone $z holds $(zcount $z), not 300"; done
deleted=$("$PCT" delete --netns "$ns" --zone 12 --json | field deleted)
[ "$deleted" = 300 ] || fail "delete --zone 12 reported $deleted, not 300"
[ "$(zcount 12)" = 0 ] || fail "zone 12 still holds $(zcount 12)"
[ "$(zcount 11)" = 300 ] && [ "$(zcount 13)" = 300 ] || fail "zones 11/13 changed"
[ "$(kcount)" = 600 ] || fail "the kernel counts $(kcount) entries, not 600"
say "zone 12 cleaned (300 entries), zones 11 and 13 intact; kernel count 900 -> 600"

# ---- the eBPF index from the wheel, where the kernel allows it
if [ "$bpf" = True ]; then
    "$PCT" index attach --netns "$ns" --json >/dev/null
    out=$("$PCT" delete --netns "$ns" --zone 13 --strategy index --json)
    "$PCT" index detach --netns "$ns" --json >/dev/null
    [ "$(echo "$out" | field strategy)" = index ] || fail "zone 13 not deleted through the index: $out"
    [ "$(echo "$out" | field deleted)" = 300 ] || fail "index delete: $out"
    [ "$(zcount 13)" = 0 ] && [ "$(zcount 11)" = 300 ] && [ "$(kcount)" = 300 ] \
        || fail "after the index delete: zone 13 $(zcount 13), zone 11 $(zcount 11), total $(kcount)"
    [ -z "$(ls -A /sys/fs/bpf/pyconntrack 2>/dev/null)" ] || fail "index pins left behind"
    say "zone 13 cleaned through the eBPF index (300 entries), zone 11 intact, index detached"
else
    say "eBPF index not available on this kernel (probe): not exercised"
fi
say "OK"
