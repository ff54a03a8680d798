#!/bin/sh
# /init of the mirrorfs test guest (busybox-static initramfs built by tests/guest/build.py).
# Mounts the pseudo filesystems, loads the virtio modules shipped in /lib/modules (file names
# carry their load order), waits for /dev/vda and the virtio-serial control port, then runs
# the mode named by mirrorfs.mode= on the kernel command line and powers off, so that QEMU
# (started with -no-reboot) exits. Every mirrorfs.KEY=VALUE argument reaches guestrec as
# KEY=VALUE. Lines starting MIRRORFS-GUEST are for the host to wait on.
/bin/busybox mkdir -p /proc /sys /dev /tmp /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

for m in /lib/modules/*.ko; do
    insmod "$m" || echo "MIRRORFS-GUEST insmod failed: $m"
done

args=""
mode=""
for a in $(cat /proc/cmdline); do
    case "$a" in
        mirrorfs.mode=*) mode="${a#mirrorfs.mode=}"; args="$args ${a#mirrorfs.}" ;;
        mirrorfs.*) args="$args ${a#mirrorfs.}" ;;
    esac
done

# Device probing finishes asynchronously after insmod: poll for up to 10 s.
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
port=""
i=0
while [ -z "$port" ] && [ $i -lt 30 ]; do
    for p in /sys/class/virtio-ports/*; do
        [ -e "$p/name" ] && [ "$(cat "$p/name")" = mirrorfs.ctl ] && port="/dev/${p##*/}"
    done
    [ -n "$port" ] || { sleep 0.1; i=$((i + 1)); }
done
i=0
while [ -n "$port" ] && [ ! -c "$port" ] && [ $i -lt 30 ]; do sleep 0.1; i=$((i + 1)); done

echo "MIRRORFS-GUEST ready mode=$mode disk=$([ -b /dev/vda ] && echo /dev/vda || echo none) port=${port:-none}"
rc=0
case "$mode" in
    writer|verify|write-marker)
        # shellcheck disable=SC2086  # word splitting of $args is wanted
        /bin/guestrec dev=/dev/vda port="$port" $args
        rc=$?
        ;;
    shell)
        setsid cttyhack sh
        ;;
    *)
        echo "MIRRORFS-GUEST unknown mode '$mode'"
        rc=2
        ;;
esac
sync
echo "MIRRORFS-GUEST exit rc=$rc"
poweroff -f
