"""Device access brokering (OpenPath, CheckPathAccess, ChownDevice leases).

  record.py     a device's udev record, read from sysfs and udev's database
  hid.py        HID report descriptors: the usages of their applications
  rules/        one small class per rule; the chain's verdicts
  chain.py      how the rules' answers combine into one decision
  safe_open.py  reaching a node beneath the dev root without symlinks
  usbdevfs.py   lockdown and driver detach on a usbfs fd
  leases.py     ChownDevice leases and their fsync'd journal
  config.py     the [devices] section of broker.toml
  core.py       the four operations, one log line per decision

Nothing here imports D-Bus (tests/test_device_core.py checks).
"""
