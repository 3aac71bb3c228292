#!/bin/bash
# Build the test guest: OUTDIR/vmlinuz, OUTDIR/initramfs.cpio.gz and (if fio is installed)
# OUTDIR/fio.cpio.zst.
#
#   scripts/build-guest.sh OUTDIR     build (KVER=... to pick a kernel, default newest cloud one)
#   scripts/build-guest.sh --kver     print the kernel version that would be used
#
# The base initramfs is busybox-static plus the virtio modules of the host's Debian cloud kernel
# (virtio is modular there). Its /init runs /test.sh, which tests append as one more,
# uncompressed cpio archive (the kernel unpacks concatenated archives), so the base is built once
# and cached (see tests/common/guest.rs).
#
# fio and its shared libraries (about 80 MiB: Debian's fio links librbd, glusterfs, ...) go into
# a separate archive that is appended only for guests that run fio: unpacking it inside a TCG
# guest costs about 2 s per boot, roughly doubling a plain boot.
set -euo pipefail

newest_kver() {
    local k
    k=$(ls /boot/vmlinuz-*-cloud-amd64 2>/dev/null | sed 's|^/boot/vmlinuz-||' | sort -V | tail -n1 || true)
    [ -n "$k" ] || { echo "build-guest: no /boot/vmlinuz-*-cloud-amd64 (run scripts/setup.sh)" >&2; exit 1; }
    echo "$k"
}

if [ "${1:-}" = "--kver" ]; then
    echo "${KVER:-$(newest_kver)}"
    exit 0
fi
[ $# -eq 1 ] || { echo "usage: $0 OUTDIR | --kver" >&2; exit 2; }

OUT=$1
KVER=${KVER:-$(newest_kver)}
MODDIR=/lib/modules/$KVER
BUSYBOX=$(command -v busybox) || { echo "build-guest: busybox missing" >&2; exit 1; }
# Only a static busybox works with no libc in the image.
if ldd "$BUSYBOX" >/dev/null 2>&1; then
    echo "build-guest: $BUSYBOX is dynamically linked; install busybox-static" >&2
    exit 1
fi

mkdir -p "$OUT"
STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT
cd "$STAGE"
mkdir -p bin sbin usr/bin usr/sbin proc sys dev tmp lib/modules

# Applet symlinks at build time, so the guest does not spend time on `busybox --install`.
cp "$BUSYBOX" bin/busybox
for applet in $("$BUSYBOX" --list-full); do
    [ -e "$applet" ] || ln -s /bin/busybox "$applet"
done

# Virtio modules, decompressed: busybox insmod reads only plain .ko files.
MODULES="virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk"
for m in $MODULES; do
    if grep -qE "/$m\.ko$" "$MODDIR/modules.builtin" 2>/dev/null; then
        continue # built into the kernel
    fi
    src=$(find "$MODDIR/kernel" -name "$m.ko" -o -name "$m.ko.xz" -o -name "$m.ko.zst" -o -name "$m.ko.gz" | head -n1)
    case "$src" in
        "") echo "build-guest: note: module $m not found, assuming built in" >&2; continue ;;
        *.xz) xz -dc "$src" >"lib/modules/$m.ko" ;;
        *.zst) zstd -qdc "$src" >"lib/modules/$m.ko" ;;
        *.gz) gzip -dc "$src" >"lib/modules/$m.ko" ;;
        *) cp "$src" "lib/modules/$m.ko" ;;
    esac
done
echo "$MODULES" >lib/modules/order


cat >init <<'INIT'
#!/bin/sh
# Cormorant test guest init: mount, load virtio, run /test.sh, report, power off.
mount -t devtmpfs devtmpfs /dev
# The kernel found no /dev/console in the archive, so init has no stdio yet.
exec 0</dev/console 1>/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs tmpfs /tmp
for m in $(cat /lib/modules/order); do
    [ -f /lib/modules/$m.ko ] && insmod /lib/modules/$m.ko
done
# Wait (up to 10 s) for as many vd* disks as the host said it attached.
want=0
for arg in $(cat /proc/cmdline); do
    case "$arg" in cormorant_disks=*) want=${arg#cormorant_disks=} ;; esac
done
i=0
while [ "$(ls /sys/block | grep -c '^vd')" -lt "$want" ] && [ $i -lt 100 ]; do
    sleep 0.1
    i=$((i + 1))
done
# A missing /test.sh (say, the initrd did not fit in guest memory) must not look like success.
rc=127
# Start on a fresh line: the firmware leaves escape sequences without a newline.
echo
if [ -f /test.sh ]; then
    sh /test.sh
    rc=$?
else
    echo "cormorant-init: no /test.sh"
fi
sync
echo "CORMORANT-GUEST-EXIT $rc"
# Let the UART drain the marker before the machine goes away.
sleep 0.2
poweroff -f
INIT
chmod 755 init

cp "/boot/vmlinuz-$KVER" "$OUT/vmlinuz.tmp"
find . -mindepth 1 | cpio --quiet -o -H newc --owner=0:0 | gzip -6 >"$OUT/initramfs.cpio.gz.tmp"
mv "$OUT/vmlinuz.tmp" "$OUT/vmlinuz"
mv "$OUT/initramfs.cpio.gz.tmp" "$OUT/initramfs.cpio.gz"

# fio is optional: copy it and every library ldd names to the same paths. zstd, because the
# guest unpacks it about 0.5 s faster than gzip.
rm -f "$OUT/fio.cpio.zst"
if FIO=$(command -v fio); then
    FIOSTAGE=$STAGE/fio
    mkdir -p "$FIOSTAGE/usr/bin"
    cp "$FIO" "$FIOSTAGE/usr/bin/fio"
    for lib in $(ldd "$FIO" | awk '/=> \//{print $3} /^[[:space:]]*\//{print $1}'); do
        mkdir -p "$FIOSTAGE$(dirname "$lib")"
        cp -L "$lib" "$FIOSTAGE$lib"
    done
    (cd "$FIOSTAGE" && find . -mindepth 1 | cpio --quiet -o -H newc --owner=0:0) |
        zstd -q -3 >"$OUT/fio.cpio.zst.tmp"
    mv "$OUT/fio.cpio.zst.tmp" "$OUT/fio.cpio.zst"
else
    echo "build-guest: note: fio not installed, the guest image has no fio" >&2
fi
echo "$KVER" >"$OUT/kver"
