# %preun: $1 is 0 when the package is erased, 1 or more on an upgrade.
if [ "$1" -eq 0 ] && [ -d /run/systemd/system ]; then
  systemctl stop dmm-sidecar.service >/dev/null 2>&1 || :
  systemctl --no-reload disable dmm-sidecar.service >/dev/null 2>&1 || :
fi
