# %postun: $1 is 0 when the package is erased, 1 or more on an upgrade.
if [ -d /run/systemd/system ]; then
  systemctl daemon-reload >/dev/null 2>&1 || :
  if [ "$1" -ge 1 ]; then
    systemctl try-restart dmm-sidecar.service >/dev/null 2>&1 || :
  fi
fi
if [ "$1" -eq 0 ]; then
  rm -f /etc/dmm-sidecar/psk /etc/dmm-sidecar/psk.new
fi
