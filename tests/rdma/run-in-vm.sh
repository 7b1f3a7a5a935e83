#!/usr/bin/env bash
# run-in-vm.sh - the project's RDMA test bed: runs one command inside a throw-away QEMU guest
# that has a real Soft-RoCE device (rdma_rxe), as root, and returns the command's exit status.
# The host kernel needs no RDMA support at all.
#
# Usage: tests/rdma/run-in-vm.sh [options] [--] COMMAND [ARG...]
#   -w DIR    share host DIR read-write at the same path in the guest (repeatable); the only way
#             to get files back to the host (everything else the guest writes is discarded)
#   -C DIR    working directory in the guest (default: the current directory)
#   -t SECS   overall timeout, boot included (default 900)
#   -m MEM    guest RAM (default 2G)         -s N    guest vCPUs (default 2; keep 2 - with 1,
#                                                    busy-polling RDMA programs crawl)
#   -M MTU    MTU of rdma0 (default 1500 -> RDMA active_mtu 1024; 9000 -> 4096)
#   -a ACCEL  kvm | tcg | auto (default auto, or $RDMAVM_ACCEL): KVM only when it is real
#             hardware KVM, else TCG
#   -v        show the guest kernel log, setup timings and the exit marker
#   -k        keep the job directory (debugging)
#   -h        this help
# Exit status: COMMAND's own; 124 = timeout; 125 = VM or setup failure (missing host package,
# kernel download failed, guest setup failed); 2 = bad usage.
#
# The guest: Debian's own kernel (linux-image-amd64, which has rdma_rxe), a static busybox
# initramfs, and the HOST's / shared read-only over virtio-9p with a tmpfs overlay on top, so the
# host's rdma-core and the build tree's binaries run unchanged (writes are discarded at power-off,
# except under -w DIRs). COMMAND runs as root with `ulimit -l unlimited`, HOME=/root,
# stdin=/dev/null; its stdout and stderr both arrive on this script's stdout.
#
# Two "hosts" for two sidecars, in ONE network namespace (rxe in Debian's 6.1 works only in the
# initial one): the dummy netdev rdma0 carries 192.168.77.1/24 AND 192.168.77.2/24, and rxe0 sits
# on rdma0 (one GID per address; rdma_cm between the two addresses works). Exported to COMMAND:
#   RDMAVM_IP_A=192.168.77.1  RDMAVM_IP_B=192.168.77.2  RDMAVM_IP=$RDMAVM_IP_A
#   RDMAVM_DEV=rxe0  RDMAVM_NETDEV=rdma0
#   RDMAVM_GID_INDEX    RoCEv2 GID index of IP_A (ibv_rc_pingpong -g N, perftest -x N);
#   RDMAVM_GID_INDEX_B  the same for IP_B. rdma_cm and rsocket users need neither.
#   IBV_CONFIG_DIR      a directory holding only rxe.driver (saves ~0.3 s per verbs process under
#                       TCG); RDMAVM_ALL_PROVIDERS=1 turns that off
#   PATH also holds `rdmavm-wait-listen PORT [SECS=30]`: returns once an rdma_cm listener is up
#                       on PORT (fails after SECS). Use it between server and client, never sleep.
# Host variables passed through: every GTEST_* variable, CI, and those named in
# RDMAVM_ENV="VAR1 VAR2 ...".
#
# Host needs (Debian 12; tests/bootstrap.sh installs them): qemu-system-x86 busybox-static kmod
# cpio xz-utils, the RDMA userland under test (rdma-core ibverbs-providers rdmacm-utils ...) and
# apt lists (the kernel is fetched with `apt-get download`; or set RDMAVM_KERNEL_DEB=/path/to/
# linux-image-*.deb). The kernel and the initramfs are built once into $RDMAVM_CACHE (default
# /var/tmp/dmm-rdma-vm; ~15-25 s on a fresh machine) and reused; job directories go to
# $RDMAVM_JOBDIR (default ${TMPDIR:-/tmp}). See tests/rdma/README.md.
set -euo pipefail

CACHE=${RDMAVM_CACHE:-/var/tmp/dmm-rdma-vm}
IP_A=192.168.77.1
IP_B=192.168.77.2
MEM=2G; SMP=2; TIMEOUT=900; MTU=1500; VERBOSE=0; KEEP=0; ACCEL=${RDMAVM_ACCEL:-auto}
WORKDIR=$PWD; RWDIRS=()
while getopts "w:C:m:s:t:M:a:vkh" o; do
  case $o in
    w) RWDIRS+=("$(realpath "$OPTARG")");;
    C) WORKDIR=$OPTARG;;  m) MEM=$OPTARG;;  s) SMP=$OPTARG;;
    t) TIMEOUT=$OPTARG;;  M) MTU=$OPTARG;;  a) ACCEL=$OPTARG;;
    v) VERBOSE=1;;  k) KEEP=1;;
    h) awk 'NR>1 && /^#/ {sub(/^# ?/, ""); print; next} NR>1 {exit}' "$0"; exit 0;;
    *) exit 2;;
  esac
done
shift $((OPTIND-1))
[ $# -gt 0 ] || { echo "usage: $0 [opts] [--] COMMAND [ARG...]  (-h for help)" >&2; exit 2; }
log() { echo "[rdma-vm] $*" >&2; }

# Modules wanted in the guest (their dependencies are resolved with modprobe at build time).
# crc32_*: rxe computes the RoCE ICRC with the "crc32" crypto shash, which the kernel would
# otherwise request_module() - there is no modprobe in the guest, and `rdma link add` would fail
# with "No such file or directory".
MODS="virtio_pci 9pnet_virtio 9p overlay rdma_rxe rdma_ucm ib_uverbs crc32_generic crc32_pclmul dummy"

# ------------------------------------------------------------------------------- guest init ---
write_init() { cat <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
V=0; grep -q rdmavm.verbose /proc/cmdline && V=1
MTU=$(sed -n 's/.*rdmavm.mtu=\([0-9]*\).*/\1/p' /proc/cmdline)
ADDRS=$(sed -n 's/.*rdmavm.addrs=\([0-9./,]*\).*/\1/p' /proc/cmdline | tr , ' ')
OUT=/dev/ttyS1   # the host's stdout; the kernel console (ttyS0) goes to a log file
st() { [ $V = 1 ] && echo "rdmavm: $(cut -d' ' -f1 /proc/uptime)s $*" > $OUT; return 0; }
fail() { echo "RDMAVM-SETUP-FAILED: $*" | tee $OUT; poweroff -f; sleep 10; }
st "init start"
while read -r m args; do insmod /mods/$m $args || fail "insmod $m"; done < /mods/order
st "modules loaded"
O=trans=virtio,version=9p2000.L,msize=512000
mount -t 9p -o $O,ro,cache=loose host /host || fail "9p host"
mount -t 9p -o $O,rw,cache=none job /job || fail "9p job"
mount -t tmpfs -o mode=755 ovl /ovl; mkdir -p /ovl/u /ovl/w
mount -t overlay -o lowerdir=/host,upperdir=/ovl/u,workdir=/ovl/w overlay /newroot || fail overlay
R=/newroot
mount -t proc proc $R/proc; mount -t sysfs sys $R/sys; mount -t devtmpfs dev $R/dev
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts devpts $R/dev/pts; mount -t tmpfs shm $R/dev/shm
mount -t tmpfs -o mode=755 run $R/run
mkdir -p $R/run/rdmavm; mount --bind /job $R/run/rdmavm
n=0
while [ -e /job/rw$n ]; do
  p=$(cat /job/rw$n); mkdir -p "$R$p"
  mount -t 9p -o $O,rw,cache=none rw$n "$R$p" || fail "9p rw$n"
  n=$((n+1))
done
st "filesystems mounted"
ip link set lo up
ip link add rdma0 type dummy || fail "ip link add dummy"
ip link set rdma0 mtu ${MTU:-1500} || fail "mtu"
for a in $ADDRS; do ip addr add $a dev rdma0 || fail "ip addr $a"; done
ip link set rdma0 up || fail "ip link up"
# rxe on a dummy netdev, not on lo: on lo raw verbs work but rdma_cm fails with ENODEV.
chroot $R rdma link add rxe0 type rxe netdev rdma0 || fail "rdma link add (rdma tool from host iproute2)"
hostname rdmavm
st "rxe0 up, starting command"
stty -onlcr < $OUT
chroot $R /bin/bash /run/rdmavm/guest.sh < /dev/null > $OUT 2>&1
rc=$?
st "command exited with $rc"
echo $rc > /job/rc; sync
[ $V = 1 ] && echo "RDMAVM-EXIT=$rc" > $OUT
poweroff -f; sleep 10
EOF
}

# ---------------------------------------------------------------------- build the guest once ---
build() {
  local tmp kpkg kdeb kv d pos
  mkdir -p "$CACHE/debs"
  tmp=$(mktemp -d "$CACHE/build.XXXXXX")
  kdeb=${RDMAVM_KERNEL_DEB:-}
  if [ -z "$kdeb" ]; then
    kpkg=$(apt-cache depends linux-image-amd64 2>/dev/null |
           awk '/Depends: linux-image-[0-9]/{print $2; exit}')
    [ -n "$kpkg" ] || { log "cannot resolve linux-image-amd64 (run apt-get update)"; rm -rf "$tmp"; exit 125; }
    kdeb=$(ls "$CACHE"/debs/"$kpkg"_*.deb 2>/dev/null | head -1 || true)
    if [ -z "$kdeb" ]; then
      log "downloading $kpkg (once; cached in $CACHE)"
      rm -f "$CACHE"/debs/*.deb   # an older kernel's package
      ( cd "$CACHE/debs" && apt-get download "$kpkg" >/dev/null 2>&1 ) ||
        { log "apt-get download $kpkg failed"; rm -rf "$tmp"; exit 125; }
      kdeb=$(ls "$CACHE"/debs/"$kpkg"_*.deb | head -1)
    fi
  fi
  dpkg -x "$kdeb" "$tmp/k"
  kv=$(ls "$tmp/k/lib/modules")
  depmod -b "$tmp/k" "$kv"
  d=$tmp/initrd; mkdir -p "$d"/{bin,dev,proc,sys,host,ovl,newroot,job,mods}
  cp /bin/busybox "$d/bin/busybox"       # must be busybox-static (checked below)
  for m in $MODS; do
    modprobe -d "$tmp/k" -S "$kv" --show-depends "$m" | awk '/^insmod/{$1=""; print}'
  done | awk '!s[$1]++' | while read -r f args; do
    cp "$f" "$d/mods/"; echo "$(basename "$f") $args" >> "$d/mods/order"
  done
  write_init > "$d/init"; chmod 755 "$d/init"
  ( cd "$d" && find . | cpio -o -H newc --quiet ) | gzip -1 > "$tmp/initrd.gz"
  rm -rf "${CACHE:?}/$KEY.new"; mkdir -p "$CACHE/$KEY.new"
  # Boot the uncompressed ELF vmlinux through its PVH entry point: skips the real-mode setup and
  # the xz decompressor (~3 s under TCG). The bzImage is the fallback.
  pos=$(LC_ALL=C grep -aobP '\xfd7zXZ\x00' "$tmp/k/boot/vmlinuz-$kv" | head -1 | cut -d: -f1 || true)
  if [ -n "$pos" ]; then
    tail -c +$((pos+1)) "$tmp/k/boot/vmlinuz-$kv" | xz -dcq > "$CACHE/$KEY.new/vmlinux" 2>/dev/null || true
  fi
  if [ "$(head -c4 "$CACHE/$KEY.new/vmlinux" 2>/dev/null | od -An -tx1 | tr -d ' ')" != 7f454c46 ]; then
    log "vmlinux extraction failed, using the bzImage"; rm -f "$CACHE/$KEY.new/vmlinux"
    cp "$tmp/k/boot/vmlinuz-$kv" "$CACHE/$KEY.new/vmlinuz"
  fi
  mv "$tmp/initrd.gz" "$CACHE/$KEY.new/"
  rm -rf "$tmp" "${CACHE:?}/$KEY"; mv "$CACHE/$KEY.new" "$CACHE/$KEY"
  # Guests of older kernels or older versions of this script are of no further use (a VM still
  # running one has already loaded its kernel and initramfs).
  for old in "$CACHE"/guest-*; do [ "$old" = "$CACHE/$KEY" ] || rm -rf "$old"; done
  log "built the guest (kernel $kv) in $CACHE/$KEY"
}

command -v qemu-system-x86_64 >/dev/null ||
  { log "qemu-system-x86_64 not found: apt-get install qemu-system-x86 (tests/bootstrap.sh does)"; exit 125; }
if [ ! -x /bin/busybox ] || ldd /bin/busybox >/dev/null 2>&1; then
  log "/bin/busybox missing or dynamically linked: apt-get install busybox-static"; exit 125
fi
for t in cpio xz depmod modprobe; do
  command -v $t >/dev/null || { log "$t not found: apt-get install cpio xz-utils kmod"; exit 125; }
done
KEY=guest-$( { write_init; echo "$MODS"; if [ -n "${RDMAVM_KERNEL_DEB:-}" ]; then echo "$RDMAVM_KERNEL_DEB";
  else apt-cache policy linux-image-amd64 2>/dev/null | grep Candidate; fi; } | md5sum | cut -c1-12)
if [ ! -s "$CACHE/$KEY/initrd.gz" ]; then
  mkdir -p "$CACHE"; exec 9>"$CACHE/.lock"; flock 9   # parallel runs build it once
  [ -s "$CACHE/$KEY/initrd.gz" ] || build
  flock -u 9; exec 9>&-
fi

# -------------------------------------------------------------------------------------- run ---
JOB=$(mktemp -d "${RDMAVM_JOBDIR:-${TMPDIR:-/tmp}}/dmm-rdma-vm-job.XXXXXX")
QPID=
cleanup() {
  if [ -n "$QPID" ]; then kill "$QPID" 2>/dev/null || true; wait "$QPID" 2>/dev/null || true; fi
  if [ "$KEEP" = 1 ]; then log "job dir kept: $JOB"; else rm -rf "$JOB"; fi
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM HUP

# guest.sh: the environment, then COMMAND.
{
  echo 'export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/run/rdmavm/bin HOME=/root LANG=C.UTF-8'
  echo "export RDMAVM_IP_A=$IP_A RDMAVM_IP_B=$IP_B RDMAVM_IP=$IP_A RDMAVM_DEV=rxe0 RDMAVM_NETDEV=rdma0"
  for v in $(compgen -e | grep -E '^(GTEST_[A-Za-z0-9_]*|CI)$' || true) ${RDMAVM_ENV:-}; do
    [ -n "${!v+x}" ] && printf 'export %s=%q\n' "$v" "${!v}"
  done
  cat <<'EOF'
# The RoCEv2 GID that holds ::ffff:IP (rxe: index 0 is the link-local one).
gid_index() {
  local want i g t
  want=0000:0000:0000:0000:0000:ffff:$(printf '%02x%02x:%02x%02x' ${1//./ })
  for i in 0 1 2 3 4 5 6 7; do
    read -r g < /sys/class/infiniband/rxe0/ports/1/gids/$i 2>/dev/null || continue
    read -r t < /sys/class/infiniband/rxe0/ports/1/gid_attrs/types/$i 2>/dev/null || continue
    if [ "$g" = "$want" ] && [ "$t" = "RoCE v2" ]; then echo $i; return 0; fi
  done
  return 1
}
RDMAVM_GID_INDEX=$(gid_index $RDMAVM_IP_A) && export RDMAVM_GID_INDEX
RDMAVM_GID_INDEX_B=$(gid_index $RDMAVM_IP_B) && export RDMAVM_GID_INDEX_B
unset -f gid_index
ulimit -l unlimited
EOF
  if [ "${RDMAVM_ALL_PROVIDERS:-0}" != 1 ]; then
    echo 'mkdir -p /run/ibv.d && echo "driver rxe" > /run/ibv.d/rxe.driver && export IBV_CONFIG_DIR=/run/ibv.d'
  fi
  printf 'cd %q || exit 126\n' "$WORKDIR"
  printf 'exec'; printf ' %q' "$@"; echo
} > "$JOB/guest.sh"

# rdmavm-wait-listen: block until an rdma_cm listener (rping -s, rstream, rlisten, a sidecar...)
# is up on PORT. Process start-up is slow and uneven under TCG, so any fixed sleep races.
mkdir -p "$JOB/bin"
cat > "$JOB/bin/rdmavm-wait-listen" <<'EOF'
#!/bin/bash
# usage: rdmavm-wait-listen PORT [TIMEOUT_SECS=30]   (polls `rdma res show cm_id`)
[ $# -ge 1 ] || { echo "usage: rdmavm-wait-listen PORT [SECS]" >&2; exit 2; }
end=$((SECONDS + ${2:-30}))
until rdma res show cm_id 2>/dev/null | grep -q "state LISTEN .*:$1 "; do
  [ $SECONDS -lt $end ] || { echo "rdmavm-wait-listen: nothing listening on port $1 after ${2:-30}s" >&2; exit 1; }
  sleep 0.1
done
EOF
chmod +x "$JOB/bin/rdmavm-wait-listen"
i=0; VIRTFS=()
for d in "${RWDIRS[@]}"; do
  echo "$d" > "$JOB/rw$i"
  VIRTFS+=(-virtfs "local,path=$d,mount_tag=rw$i,security_model=none,multidevs=remap")
  i=$((i+1))
done

# KVM only where it is real hardware-assisted KVM. A nested/paravirtual /dev/kvm ("kvm_pvm", as
# in some Firecracker sandboxes, and on the machine this was written on) opens fine but cannot
# run an unmodified guest kernel: QEMU aborts with -cpu host, or the boot stalls.
if [ "$ACCEL" = auto ]; then
  ACCEL=tcg
  if [ -w /dev/kvm ] && [ ! -d /sys/module/kvm_pvm ] &&
     { [ -d /sys/module/kvm_intel ] || [ -d /sys/module/kvm_amd ]; }; then ACCEL=kvm; fi
fi
case $ACCEL in
  kvm) AOPT=(-accel kvm -cpu host);;
  # shellcheck disable=SC2054  # tcg,thread=multi is one argument
  tcg) AOPT=(-accel tcg,thread=multi -cpu max);;
  *) log "bad accel $ACCEL (kvm, tcg or auto)"; exit 2;;
esac
KERNEL=$CACHE/$KEY/vmlinux; [ -s "$KERNEL" ] || KERNEL=$CACHE/$KEY/vmlinuz
# ttyS0 = kernel console -> $JOB/console.log (stdout with -v); ttyS1 = COMMAND's output -> stdout
APPEND="panic=-1 rdinit=/init rdmavm.mtu=$MTU rdmavm.addrs=$IP_A/24,$IP_B/24"
if [ "$VERBOSE" = 1 ]; then APPEND="console=ttyS1 $APPEND rdmavm.verbose"; SERIAL0=null
else APPEND="console=ttyS0 $APPEND quiet"; SERIAL0=file:$JOB/console.log; fi
[ "$VERBOSE" = 1 ] && log "accel=$ACCEL mem=$MEM smp=$SMP kernel=$KERNEL"

timeout -k 5 "$TIMEOUT" qemu-system-x86_64 "${AOPT[@]}" -m "$MEM" -smp "$SMP" \
  -kernel "$KERNEL" -initrd "$CACHE/$KEY/initrd.gz" -append "$APPEND" \
  -display none -serial "$SERIAL0" -serial stdio -monitor none -no-reboot -nic none \
  -virtfs "local,path=/,mount_tag=host,security_model=none,readonly=on,multidevs=remap" \
  -virtfs "local,path=$JOB,mount_tag=job,security_model=none" \
  "${VIRTFS[@]}" < /dev/null &
QPID=$!
st=0; wait "$QPID" || st=$?
QPID=
if [ -s "$JOB/rc" ]; then exit "$(cat "$JOB/rc")"; fi
[ -s "$JOB/console.log" ] && { log "guest console (tail):"; tail -n 30 "$JOB/console.log" >&2; }
if [ "$st" = 124 ] || [ "$st" = 137 ]; then log "timeout after ${TIMEOUT}s"; exit 124; fi
log "VM exited (qemu status $st) without reporting a result"; exit 125
