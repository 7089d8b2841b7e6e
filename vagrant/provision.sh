#!/usr/bin/env bash
# Vagrant provisioner (runs as root in the guest): install build/test deps,
# load the conntrack modules and run `make test` in the synced /vagrant tree.
# Set PCT_SKIP_TESTS=1 to only install.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

pkgs=(make gcc pkg-config clang llvm python3-dev python3-venv python3-pip
      python3-cffi python3-pytest python3-hypothesis python3-pyroute2
      libnetfilter-conntrack-dev libmnl-dev libbpf-dev
      conntrack nftables iproute2 kmod libcap2-bin)

apt-get update -q
apt-get install -y -q --no-install-recommends "${pkgs[@]}"
# Debian ships bpftool as its own package; Ubuntu only in linux-tools-<kernel>.
apt-get install -y -q --no-install-recommends bpftool 2>/dev/null ||
    apt-get install -y -q --no-install-recommends linux-tools-common "linux-tools-$(uname -r)" ||
    echo "provision: bpftool not available, continuing"

for m in nf_conntrack nf_conntrack_netlink nf_tables nft_ct veth; do
    modprobe "$m" || echo "provision: modprobe $m failed"
done
mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf

echo "provision: $(. /etc/os-release && echo "$PRETTY_NAME"), kernel $(uname -r), $(python3 --version)"
[ "${PCT_SKIP_TESTS:-0}" = 1 ] && exit 0
export PYCONNTRACK_REQUIRE_KERNEL=${PYCONNTRACK_REQUIRE_KERNEL:-1}
cd /vagrant
make test
