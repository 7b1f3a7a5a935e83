# The RDMA test bed (tests/rdma/README.md): GoogleTest binaries whose tests each run in their own
# QEMU guest with a Soft-RoCE device, via tests/rdma/gtest-in-vm.sh. Included by
# tests/CMakeLists.txt (after include(GoogleTest)).

# The RDMA userland the test binaries link to (libibverbs-dev, librdmacm-dev; bootstrap.sh
# installs them): use PkgConfig::RDMA.
pkg_check_modules(RDMA REQUIRED IMPORTED_TARGET libibverbs librdmacm)

set(DMM_RDMA_VM_DIR ${CMAKE_CURRENT_LIST_DIR})

# dmm_add_rdma_vm_gtest(<target> [gtest_discover_tests options...])
#
# Registers the tests of the GoogleTest executable <target> with ctest so that each test runs in a
# fresh RDMA guest: ctest names "rdma.<Suite>.<Test>", label "rdma", TIMEOUT 300 (the guest's
# own bound is 240 s, RDMAVM_TEST_TIMEOUT), and one guest at a time (RESOURCE_LOCK rdma_vm: each
# guest wants both cores of a 2-core CI machine). Extra arguments go to gtest_discover_tests
# (e.g. EXTRA_ARGS, DISCOVERY_TIMEOUT; not PROPERTIES or TEST_PREFIX, which are set here).
#
# How: gtest_discover_tests (CMake 3.25) runs a target's CROSSCOMPILING_EMULATOR in front of the
# binary both when listing the tests (at build time, POST_BUILD) and in every add_test() it
# generates, even when not cross-compiling. gtest-in-vm.sh runs the listing on the host and
# everything else in a guest.
function(dmm_add_rdma_vm_gtest target)
  set_property(TARGET ${target} PROPERTY CROSSCOMPILING_EMULATOR ${DMM_RDMA_VM_DIR}/gtest-in-vm.sh)
  gtest_discover_tests(${target} ${ARGN} TEST_PREFIX "rdma."
                       PROPERTIES LABELS rdma TIMEOUT 300 RESOURCE_LOCK rdma_vm)
endfunction()
