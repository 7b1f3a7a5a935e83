# %post: $1 is 1 on a first install, 2 or more on an upgrade.
/usr/lib/dmm-sidecar/host-setup
if [ -d /run/systemd/system ]; then
  systemctl daemon-reload >/dev/null 2>&1 || :
fi
