# Tidal — set-up and entry points. Run as root on a fresh Debian 12 machine:
#   make demo   build a block image, mount it lazily, run a command from it
#   make test   lint, architecture contracts, type check, and the whole test suite, with
#               TIDAL_REQUIRE_ALL=1: a test that needs a capability this machine lacks FAILS
#               instead of skipping (`make test TIDAL_REQUIRE_ALL=0` to allow skips)
# Both install what is missing (Debian packages via apt-get, Python packages into .venv),
# idempotently: a second run installs nothing.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# What the real-component tests drive, by capability (tests/conftest.py) and tool:
#   venv: python3-venv | fuse: fuse3 (fusermount3) | loop: mount, util-linux
#   (losetup, nsenter, unshare) | registry: docker-registry, apache2-utils (htpasswd), openssl
#   (TLS, tokens), skopeo | runtime: runc, crun, gcc + libc6-dev (rich-mode init), lxcfs,
#   busybox-static, debootstrap (Debian rootfs), runsc (gVisor), podman (benchmark baseline) | netns: iproute2 (ip, tc, bridge) | images:
#   e2fsprogs (mkfs.ext4, e2fsck, debugfs), attr | others: kmod procps psmisc curl quota xfsprogs
#   | snapshotter: containerd (containerd, ctr), stargz-snapshotter (ctr-remote rpull),
#   golang-github-containerd-containerd-dev (the snapshots API's .proto files the stubs are
#   generated from)
APT_PACKAGES := python3-venv runc crun e2fsprogs fuse3 docker-registry lxcfs skopeo \
	busybox-static debootstrap iproute2 attr mount util-linux kmod psmisc procps curl quota \
	xfsprogs apache2-utils gcc libc6-dev openssl runsc podman \
	containerd stargz-snapshotter golang-github-containerd-containerd-dev prometheus
# vnode: kubectl reads the fake API server's objects with Go's typed client (tests/vnode);
# Debian's kubernetes-client, unless a kubectl is installed already (another package's
# /usr/bin/kubectl would conflict with it)
KUBECTL_PACKAGE := kubernetes-client
PIP_EXTRAS := dev,sched,vnode,bench,snapshotter
STAMP_APT := .make/apt.stamp
STAMP_VENV := .make/venv.stamp
# containerd's snapshots API as Python stubs, generated from the Debian .proto files (git-ignored)
PROTO_OUT := src/tidal/snapshotter/_proto
STAMP_PROTO := $(PROTO_OUT)/snapshots_pb2_grpc.py

.PHONY: all deps demo test lint typecheck contracts unit bench clean protos

all: test

$(STAMP_APT): Makefile
	@mkdir -p .make
	@missing=""; for p in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	command -v kubectl >/dev/null || missing="$$missing $(KUBECTL_PACKAGE)"; \
	if [ -n "$$missing" ]; then \
		echo "apt-get install:$$missing"; \
		if [ "$$(id -u)" != 0 ]; then echo "run as root to install Debian packages:$$missing" >&2; exit 1; fi; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
	@touch $@

$(STAMP_VENV): pyproject.toml
	@mkdir -p .make
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/pip install -q --disable-pip-version-check -e '.[$(PIP_EXTRAS)]' 2>&1 | grep -v "^WARNING: Location" || true
	@$(BIN)/python -c "import tidal, typer, lz4, zstandard, httpx, hypothesis, numpy, matplotlib, kubernetes, atheris, grpc, grpc_tools"
	@touch $@

$(STAMP_PROTO): $(STAMP_APT) $(STAMP_VENV) src/tidal/snapshotter/protogen.py
	@$(BIN)/python -m tidal.snapshotter.protogen >/dev/null

protos: $(STAMP_PROTO)

deps: $(STAMP_APT) $(STAMP_VENV) $(STAMP_PROTO)

demo: deps
	$(BIN)/tidal demo

lint: deps
	$(BIN)/ruff check src tests benchmarks fuzz
	$(BIN)/ruff format --check src tests benchmarks fuzz

contracts: deps
	$(BIN)/lint-imports

typecheck: deps
	$(BIN)/mypy

unit: deps
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=20 $(PYTEST_ARGS)

test: export TIDAL_REQUIRE_ALL := 1
test: lint contracts typecheck unit

# only the benchmarks need these: Debian's Go and stargz-snapshotter's library, to build the
# stargz daemon bench_peers measures Tidal against (../shared/peers/stargz-grpc)
BENCH_APT_PACKAGES := golang-go golang-github-containerd-stargz-snapshotter-dev

bench: deps
	@missing=""; for p in $(BENCH_APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	command -v kubectl >/dev/null || missing="$$missing $(KUBECTL_PACKAGE)"; \
	if [ -n "$$missing" ]; then echo "apt-get install:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; fi
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf .make $(VENV) build *.egg-info src/*.egg-info $(PROTO_OUT)
