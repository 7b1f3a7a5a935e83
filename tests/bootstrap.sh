#!/usr/bin/env bash
# Installs what a fresh Debian 12 machine needs, builds, and runs the demo or the test suite.
#
#   tests/bootstrap.sh demo    the two-host demo (tests/demo/two-hosts.sh)
#   tests/bootstrap.sh test    the whole test suite (ctest), then again under sanitizers
#   tests/bootstrap.sh build   only install and build
#   tests/bootstrap.sh bench [ARGS]   the benchmark (bench/run.py ARGS, e.g. --quick)
#
# Runs as root (network namespaces and iptables need it). BUILD_DIR (default: build) and JOBS
# (default: nproc) may be set. Set DMM_SKIP_APT=1 to skip the package installation.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
what=${1:-test}
build=${BUILD_DIR:-build}
jobs=${JOBS:-$(nproc)}

if [ "$(id -u)" -ne 0 ]; then
  echo "bootstrap.sh: run as root (network namespaces, iptables, package installation)" >&2
  exit 1
fi

# Build and test dependencies, all from Debian 12.
build_deps=(build-essential cmake ninja-build pkg-config git
  libevent-dev libssl-dev libtoml11-dev prometheus-cpp-dev libcli11-dev libspdlog-dev
  libgtest-dev libsystemd-dev
  dpdk-dev libdpdk-dev dpkg-dev
  libibverbs-dev librdmacm-dev
  libbpf-dev clang-14)  # the kernel relay's BPF program: compiled by clang, loaded with libbpf
# prometheus: promtool lints the /metrics page, and a real Prometheus server scrapes a sidecar
# (tests/integration/metrics_integration_test.cc); the tests start their own, never the service.
run_deps=(iproute2 iptables curl python3 procps prometheus ethtool)
# The benchmark's peers, load generators and chart drawing.
bench_deps=(util-linux iperf3 wrk haproxy nginx libnginx-mod-stream redis-server redis-tools
  python3-matplotlib)
# The package test (tests/package): a Debian root filesystem booted with systemd-nspawn, and
# CPack's DEB (dpkg-shlibdeps, file) and RPM (rpmbuild) generators.
package_deps=(debootstrap systemd-container zstd dpkg-dev file rpm)
# The preload shim's end-to-end tests run real programs under it (curl and python3 are in
# run_deps); clang builds the libFuzzer target for the preamble parser (skipped without it).
preload_deps=(redis-server redis-tools nginx clang-14 libclang-rt-14-dev)
# The RDMA test bed (tests/rdma): the host kernel needs no RDMA, each test boots a QEMU guest
# (Debian's kernel, fetched with apt-get download; a busybox-static initramfs built with kmod's
# modprobe, cpio and xz-utils) with Soft-RoCE, sharing the host's / - so the RDMA userland the
# tests use (rdma-core, the rxe provider in ibverbs-providers, rping/rstream, perftest,
# ibv_devinfo) is installed here, on the host. busybox-static replaces busybox if present.
rdma_deps=(qemu-system-x86 busybox-static kmod cpio xz-utils
  rdma-core ibverbs-providers rdmacm-utils perftest ibverbs-utils)
wanted=("${build_deps[@]}" "${run_deps[@]}")
[ "$what" = bench ] && wanted+=("${bench_deps[@]}")
[ "$what" = test ] && wanted+=("${package_deps[@]}" "${preload_deps[@]}" "${rdma_deps[@]}")
if [ "${DMM_SKIP_APT:-0}" != 1 ]; then
  missing=()
  for p in "${wanted[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "== installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # prometheus, nginx and redis-server would start system-wide daemons on install: the tests
    # and the benchmark run their own (on ports and in namespaces of their own). policy-rc.d
    # tells the packages not to start services; both invoke-rc.d (no systemd) and
    # deb-systemd-invoke (systemd) obey it. It is removed again even if the installation fails.
    # A policy-rc.d the machine already has is left alone.
    added_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
      printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
      chmod +x /usr/sbin/policy-rc.d
      added_policy=1
      trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    if [ "$added_policy" = 1 ]; then
      rm -f /usr/sbin/policy-rc.d
      trap - EXIT
    fi
  fi
  # The RDMA test bed downloads the guest kernel's package once (apt-get download), which needs
  # the package lists even when nothing above had to be installed.
  if [ "$what" = test ] && ! apt-cache show linux-image-amd64 >/dev/null 2>&1; then
    apt-get update -qq
  fi
fi

# lwIP, the dpdk stack kind's TCP/IP engine, from Debian's source package (not committed).
stacks/dpdk/fetch-lwip.sh

echo "== building in $build"
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build "$build" -j "$jobs"

case "$what" in
  build) ;;
  demo) exec "$here/tests/demo/two-hosts.sh" "$build/proxy/dmm-sidecar" ;;
  test)
    # Integration tests each make their own namespaces, so they can run side by side; two at a
    # time keeps a 2-core machine responsive.
    status=0
    (cd "$build" && ctest --output-on-failure -j 2 --timeout 300) || status=$?
    # Then the same tests under ASan+UBSan and under TSan, each in a build of its own
    # (tests/README.md#sanitizers). DMM_SANITIZERS=0 skips them.
    if [ "${DMM_SANITIZERS:-1}" != 0 ]; then
      for kind in asan tsan; do
        JOBS=$jobs BUILD_ROOT="$here/build-sanitize" "$here/tests/sanitize.sh" "$kind" || status=1
      done
    fi
    exit $status
    ;;
  bench) shift; exec /usr/bin/python3 "$here/bench/run.py" --build "$build" "$@" ;;
  *) echo "usage: $0 demo|test|build|bench" >&2; exit 2 ;;
esac
