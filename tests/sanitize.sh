#!/usr/bin/env bash
# The test suite under sanitizers (tests/README.md#sanitizers): a second build of the sidecar
# and its tests with
#   asan   -fsanitize=address,undefined   the unit and integration tests (ASan, LeakSanitizer,
#                                          UBSan), the sidecars they start included
#   tsan   -fsanitize=thread              the threaded parts: the unit tests (the dpdk stack's
#                                          rings), and the integration tests of the sidecar's
#                                          workers, stacks, faults, reloads and metrics
# Every process writes its reports to one directory (log_path); the run fails if any test fails
# or if any report was written - also one written at exit (leaks), after the test had passed.
#
#   tests/sanitize.sh asan|tsan [extra ctest args...]
#
# BUILD_ROOT (default: build-sanitize) is where the builds go; JOBS as for bootstrap.sh.
# Left out, and why: the preload shim's end-to-end tests (the shim runs inside uninstrumented
# programs - curl, redis, nginx, python - which an instrumented shim cannot be loaded into; its
# parsers are fuzzed and its core is in the unit tests), the RDMA tests (a QEMU guest each, too
# slow under a sanitizer), a test of RSS bounds (shadow memory and quarantine make RSS
# meaningless under ASan), and the two descriptor-exhaustion tests (see `slow`).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
kind=${1:?usage: tests/sanitize.sh asan|tsan [ctest args...]}
shift
root=${BUILD_ROOT:-$here/build-sanitize}
jobs=${JOBS:-$(nproc)}
# The descriptor-exhaustion tests cannot run under UBSan: its vptr check tests whether memory
# is readable with a pipe(), which fails once the process is out of descriptors, and it then
# reports every virtual call it checks ("invalid vptr", "memory cannot be printed") and, halting
# on error, kills the sidecar under test. They exercise no memory or threading of their own.
slow='Transfers256MiB|SlowReaderPausesItsWriterAndMemoryStaysBounded|ResourcePair\.(OutOf|Accept)'
case $kind in
  asan)
    flags="address,undefined"
    targets=(dmm-sidecar unit_tests dpdk_unit_tests rdma_unit_tests integration_tests)
    select=(-L 'unit|integration' -E "Preload|^preload\\.|$slow")
    ;;
  tsan)
    flags="thread"
    targets=(dmm-sidecar unit_tests dpdk_unit_tests rdma_unit_tests integration_tests)
    # (The policy matcher's randomised cross-check is single-threaded and outlasts its 120 s
    # timeout under TSan's slowdown; the ASan run covers it.)
    select=(-R '^unit\.|^integration\.(SidecarPair|FaultPair|Faults/|PolicyPair|ServicePair|DpdkPair|MetricsAfterTraffic)'
            -E "$slow|ClassifyAgreesWithExplainOnRandomRuleSets")
    ;;
  *) echo "usage: tests/sanitize.sh asan|tsan [ctest args...]" >&2; exit 2 ;;
esac
build=$root/$kind
reports=$build/sanitizer-reports
echo "== $kind: building in $build (-fsanitize=$flags)"
# The sanitizers' inlined checks draw warnings GCC does not give otherwise (-Wconversion); the
# normal build keeps -Werror. No fuzzers here (they are built with their own sanitizers).
cmake -S "$here" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DDMM_SANITIZE=$flags \
  -DDMM_WERROR=OFF -DDMM_FUZZ=OFF >/dev/null
cmake --build "$build" -j "$jobs" --target "${targets[@]}"
rm -rf "$reports"
mkdir -p "$reports"
common="halt_on_error=1:log_path=$reports/report"
export ASAN_OPTIONS="$common:detect_leaks=1:abort_on_error=1"
export UBSAN_OPTIONS="$common:print_stacktrace=1"
export TSAN_OPTIONS="$common:second_deadlock_stack=1:suppressions=$here/tests/tsan.supp"
status=0
(cd "$build" && ctest --output-on-failure -j 2 --timeout 600 "${select[@]}" "$@") || status=$?
found=$(grep -l -E "ERROR: AddressSanitizer|ERROR: LeakSanitizer|runtime error:|WARNING: ThreadSanitizer" \
  "$reports"/* 2>/dev/null || true)
if [ -n "$found" ]; then
  echo "== $kind: sanitizer reports:"
  for f in $found; do
    echo "---- $f"
    head -60 "$f"
  done
  status=1
else
  echo "== $kind: no sanitizer reports"
fi
exit $status
