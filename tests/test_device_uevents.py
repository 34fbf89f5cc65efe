"""The uevent monitor (broker/devices/uevents.py) on the real kernel, and
what the device core does with it: decisions that read only what the kernel
announces are remembered until any uevent arrives; decisions that read what
it does not announce (udev's database, live attributes) never are."""
from __future__ import annotations

import dataclasses
import errno
import os
import socket

from broker.devices import uevents
from broker.devices.rules import ALLOW, Rule
from broker.devices.uevents import UeventMonitor
from test_device_core import Caller, core, make
from udev_tree import kernel_uevent


def test_a_real_uevent_is_seen_once():
    m = UeventMonitor()
    try:
        assert m.watching, m.why_not
        assert m.changed() is False
        kernel_uevent()
        assert m.changed() is True            # queued before the write returned
        assert m.changed() is False           # drained
    finally:
        m.close()


def _overflowed(sock) -> bool:
    while True:
        try:
            sock.recv(8192)
        except BlockingIOError:
            return False
        except OSError as e:
            return e.errno == errno.ENOBUFS


def test_lost_uevents_count_as_a_change():
    m, probe = UeventMonitor(), UeventMonitor()
    try:
        for s in (m.sock, probe.sock):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)   # the kernel's minimum
        for _ in range(64):
            kernel_uevent()
        assert _overflowed(probe.sock)        # the queue did overflow (the same for m)
        assert m.changed() is True and m.watching
        assert m.changed() is False
    finally:
        m.close()
        probe.close()


def test_a_broken_socket_stops_the_watch():
    m = UeventMonitor()
    os.close(m.sock.detach())                 # the fd gone under it: EBADF
    assert m.changed() is True
    assert not m.watching and "failed" in m.why_not
    assert m.changed() is True                # and stays "changed": nothing remembered


def test_old_kernels_are_not_watched():
    m = UeventMonitor("4.13.0")
    assert not m.watching and "4.14" in m.why_not and m.changed() is True
    assert not uevents._kernel_announces_bindings("garbage")
    assert uevents._kernel_announces_bindings("6.1.0-28-amd64")


class _Counting(Rule):
    """A rule that counts how often the chain asks it, reading one thing."""
    reads = ""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def check(self, dev):
        self.calls += 1
        if self.reads == "db":
            dev.record.db                       # udev's database: the kernel does not announce it
        elif self.reads == "live":
            dev.record.attribute_live("authorized")
        else:
            dev.record.driver                   # announced: bind/unbind uevents
        return ALLOW


def _core_with(tmp_path, reads: str):
    rule = type(f"Reads_{reads}", (_Counting,), {"type": f"reads_{reads}", "reads": reads})()
    c = core(tmp_path)
    c.config = dataclasses.replace(c.config, rules=(rule,))
    return c, rule


def test_what_the_kernel_does_not_announce_is_read_every_time(tmp_path):
    hid = make(tmp_path, "hidraw0")
    for reads in ("db", "live"):
        c, rule = _core_with(tmp_path, reads)
        for _ in range(3):
            assert c.check_path_access(Caller(), hid)[0]
        assert rule.calls == 3, reads


def test_what_the_kernel_announces_is_remembered_until_it_does(tmp_path):
    hid = make(tmp_path, "hidraw0")
    c, rule = _core_with(tmp_path, "driver")
    for _ in range(3):
        assert c.check_path_access(Caller(), hid)[0]
    assert rule.calls == 1
    kernel_uevent()
    for _ in range(3):
        assert c.check_path_access(Caller(), hid)[0]
    assert rule.calls == 2
