#!/usr/bin/env bash
# gtest-in-vm.sh - the CROSSCOMPILING_EMULATOR of GoogleTest binaries that need real RDMA
# (set by dmm_add_rdma_vm_gtest() in tests/rdma/RdmaVm.cmake). CMake calls it as
#   gtest-in-vm.sh BINARY ARG...
# both to list the tests (gtest_discover_tests, at build time) and to run each discovered test.
#   - `--gtest_list_tests` among the arguments: BINARY runs here on the host - listing needs no
#     RDMA device, and a guest per build would cost seconds for nothing;
#   - otherwise BINARY runs in its own throw-away guest (tests/rdma/run-in-vm.sh), bounded by
#     RDMAVM_TEST_TIMEOUT seconds (default 240, below the tests' ctest TIMEOUT of 300, so that
#     the guest is stopped by its own timeout - exit status 124 - before ctest kills anything).
# `--gtest_output=xml:PATH` (or json:) works: PATH's directory is shared read-write with the guest.
# The GTEST_* environment (GTEST_FILTER, GTEST_COLOR...) and CI reach the binary in the guest.
#
#   tests/rdma/gtest-in-vm.sh build/tests/rdma_vm_selftest --gtest_filter='RdmaVm.*'   (by hand)
set -euo pipefail

[ $# -ge 1 ] || { echo "usage: $0 GTEST_BINARY [ARG...]" >&2; exit 2; }
for a in "$@"; do
  [ "$a" = --gtest_list_tests ] && exec "$@"
done

here=$(cd "$(dirname "$0")" && pwd)
opts=(-t "${RDMAVM_TEST_TIMEOUT:-240}")
for a in "$@"; do
  case $a in
    --gtest_output=xml:* | --gtest_output=json:*)
      out=${a#--gtest_output=*:}
      case $out in */) dir=$out;; *) dir=$(dirname "$out");; esac
      mkdir -p "$dir"
      opts+=(-w "$dir");;
  esac
done
exec "$here/run-in-vm.sh" "${opts[@]}" -- "$@"
