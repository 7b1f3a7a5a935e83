#!/bin/sh
# dmm-sidecar package setup, shared by the .deb and .rpm maintainer scripts:
# the system user (systemd-sysusers, from the package's sysusers.d file) and, on a first
# install, a random pre-shared key readable by that user only. The key must be the same on
# every host of a mesh: replace it with the mesh's key (docs/install.md).
set -e
sysusers_conf=/usr/lib/sysusers.d/dmm-sidecar.conf
if command -v systemd-sysusers >/dev/null 2>&1; then
  systemd-sysusers "$sysusers_conf"
elif ! getent passwd dmm-sidecar >/dev/null; then
  useradd --system --user-group --no-create-home --home-dir /nonexistent \
    --shell /usr/sbin/nologin --comment "DMM sidecar daemon" dmm-sidecar
fi
psk=/etc/dmm-sidecar/psk
if [ ! -e "$psk" ]; then
  umask 077
  # 32 random bytes as 64 hex digits.
  od -An -N32 -tx1 /dev/urandom | tr -d ' \n' > "$psk.new"
  echo >> "$psk.new"
  chown root:dmm-sidecar "$psk.new"
  chmod 0640 "$psk.new"
  mv "$psk.new" "$psk"
fi
