#!/bin/busybox sh
# The VM's first process (tests/vm/harness.py builds the initramfs around
# it): the host's root file system, shared read-only over 9p, becomes the
# lower layer of an overlay whose upper layer is a tmpfs, so the guest may
# write anywhere and the host sees none of it. Then switch_root and run the
# Python script named by vm.init= on the kernel command line
# (tests/vm/guest_init.py) as pid 1.
/bin/busybox --install -s /bin
export PATH=/bin
mkdir -p /proc /sys /dev /lower /rw /newroot
mount -t proc proc /proc
mount -t devtmpfs dev /dev
for m in $(cat /modules.order); do insmod "/modules/$m" || echo "vm: insmod $m failed"; done
fail() { echo "vm: initramfs: $*"; poweroff -f; }
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=512000 hostroot /lower \
    || fail "cannot mount the host root (9p)"
mount -t tmpfs -o mode=0755 rw /rw
mkdir -p /rw/upper /rw/work
mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work overlay /newroot \
    || fail "cannot mount the overlay"
init=$(sed -n 's/.*vm\.init=\([^ ]*\).*/\1/p' /proc/cmdline)
[ -n "$init" ] || fail "no vm.init= on the kernel command line"
umount /proc
mount --move /dev /newroot/dev
exec switch_root /newroot /usr/bin/python3 -I "$init"
