# pyconntrack — `make help` lists the targets. Everything runs as root on
# Debian 12; every target installs what it needs first (idempotent).
.DELETE_ON_ERROR:
.DEFAULT_GOAL := help
SHELL := /bin/bash

PYTHON      ?= python3
VENV        := .venv
VPY         := $(VENV)/bin/python
# Build: the shim (gcc, pkg-config, -dev), the eBPF object (clang, llvm-strip,
# bpftool), the venv. Commands the suite, the demo and the benchmarks call:
# ip, tc (iproute2), nft (nftables), conntrack, sysctl (procps), setpriv and
# nsenter (util-linux), modprobe (kmod), valgrind; make, cc for tools/.
DEB_PACKAGES := libnetfilter-conntrack-dev libmnl-dev libbpf-dev clang llvm bpftool \
                conntrack nftables iproute2 pkg-config gcc make python3-venv python3-dev \
                util-linux libcap2-bin libelf-dev zlib1g-dev procps kmod valgrind
PYTEST_ARGS ?=
# make neutron-test: OpenStack Neutron in a venv of its own (~350 MB), never in .venv
NEUTRON_VERSION ?= 29.0.0
NVENV       := .venv-neutron
NVPY        := $(NVENV)/bin/python
NEUTRON_DEB_PACKAGES := iptables ipset
KERNEL      ?= 6.12
# in the qemu guest: the kernel-backed tests (benchmarks and the load/fuzz/memory
# hardening runs are sized for the host, not for software emulation)
VM_PYTEST_ARGS ?= -m kernel --ignore=tests/test_bench_smoke.py --ignore-glob=tests/test_hardening_* --ignore=tests/soak tests
export VM_PYTEST_ARGS

help: ## this list
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

deps: ## install missing Debian/Ubuntu packages (needs root)
	@missing=""; for p in $(DEB_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq; \
	  avail=""; for p in $$missing; do \
	    if apt-cache show $$p >/dev/null 2>&1; then avail="$$avail $$p"; \
	    elif [ $$p = bpftool ]; then avail="$$avail linux-tools-common linux-tools-$$(uname -r)"; \
	    else echo "package $$p not available here" >&2; exit 1; fi; \
	  done; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$avail; \
	fi

# the build requirements, then the package in place with its test and bench extras
$(VENV)/.stamp: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q cffi "setuptools>=64" wheel
	touch $@

venv: deps $(VENV)/.stamp ## Python virtualenv with the test tools

build: venv ## build the cffi shim (and its eBPF object) in place, and the traffic generator
	$(VPY) -m pip install -q --no-build-isolation -e '.[test,bench]'
	$(MAKE) -s -C tools

wheel: venv ## build dist/pyconntrack-*.whl: the shim with its eBPF object embedded
	rm -f dist/pyconntrack-*.whl
	$(VPY) -m pip wheel -q --no-build-isolation --no-deps -w dist .
	@ls dist/pyconntrack-*.whl

wheel-test: wheel ## install the wheel on a fresh Debian 12 chroot with runtime libraries only; clean a zone
	bash vagrant/chroot/chroot-test.sh wheel

fresh-test: ## clone HEAD into a fresh minimal Debian 12 chroot's /root; make test and make demo there
	bash vagrant/chroot/chroot-test.sh fresh

test: build ## run the whole suite (kernel tests need root; scratch netns only)
	$(VPY) -m pytest $(PYTEST_ARGS)

demo: build ## fill a scratch netns and clean zones every way (the main job)
	$(VENV)/bin/pyconntrack demo

$(NVENV)/.stamp: pyproject.toml setup.py
	$(PYTHON) -m venv $(NVENV)
	$(NVPY) -m pip install -q --upgrade pip
	$(NVPY) -m pip install -q "neutron==$(NEUTRON_VERSION)" cffi "setuptools>=64" wheel pytest pyroute2
	$(NVPY) -m pip install -q --no-build-isolation -e .
	touch $@

neutron-venv: deps $(NVENV)/.stamp ## venv with Neutron $(NEUTRON_VERSION) and pyconntrack (editable)
	@$(MAKE) -s deps DEB_PACKAGES="$(NEUTRON_DEB_PACKAGES)"

neutron-test: build neutron-venv ## Neutron's own managers and drivers vs the drop-in, in scratch netns
	PYCONNTRACK_REQUIRE_NEUTRON=1 PYCONNTRACK_REQUIRE_KERNEL=1 $(NVPY) -m pytest tests/with_neutron tests/test_neutron_dropin.py $(PYTEST_ARGS)

soak: build ## long hardening runs: fuzz 21k, minutes of 50k flows/s churn, 1M-entry RSS, valgrind
	$(VPY) -m pytest -m soak $(PYTEST_ARGS)

bench: build ## benchmarks vs peers in scratch netns (~6-15 min; restores nf_conntrack_max)
	$(VENV)/bin/pyconntrack bench --out bench-results

vm-test: build ## run the kernel suite in qemu: make vm-test KERNEL=6.1|6.12
	bash vagrant/qemu/vm-test.sh $(KERNEL)

vm-test-all: build ## the qemu matrix: 6.1 then 6.12
	bash vagrant/qemu/vm-test.sh 6.1 && bash vagrant/qemu/vm-test.sh 6.12

vagrant-test: ## run make test in the Vagrant boxes (needs vagrant + libvirt/virtualbox)
	cd vagrant && vagrant up --provision $(VAGRANT_VM)

clean: ## remove build products
	rm -rf build dist *.egg-info pyconntrack/_pct.c pyconntrack/*.so csrc/*.o pyconntrack/*.o

.PHONY: help deps venv build wheel wheel-test fresh-test test demo soak bench vm-test vm-test-all \
        vagrant-test clean neutron-venv neutron-test
