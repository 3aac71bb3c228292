#!/bin/bash
# The main job on an embedded default: build Cormorant, start a daemon, create a 1 GiB RAM-tier
# image, boot a tiny guest (TCG) whose disk is that image, write 16 MiB with O_DIRECT, read it
# back and compare, then stop the daemon with SIGTERM. Everything lives in a temporary
# directory that is removed at the end. Run scripts/setup.sh first (the README does).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${CARGO_HOME:-}" ] || [ ! -f "$HOME/.cargo/env" ] || . "$HOME/.cargo/env"

cargo build --release --locked --quiet
BIN=$PWD/target/release/cormorant
WORK=$(mktemp -d /tmp/cormorant-demo.XXXXXX)
GUEST=$PWD/target/guest/demo
DAEMON_PID=
cleanup() {
    [ -z "$DAEMON_PID" ] || kill "$DAEMON_PID" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

[ -f "$GUEST/initramfs.cpio.gz" ] || scripts/build-guest.sh "$GUEST" >/dev/null
RUN=$WORK/run
"$BIN" --run-dir "$RUN" serve --ram-dir "$WORK/ram" --volume-dir "$WORK/vol" 2>"$WORK/daemon.log" &
DAEMON_PID=$!
for _ in $(seq 100); do [ -S "$RUN/control.sock" ] && break; sleep 0.05; done

echo "== cormorant image create disk0 --size 1G"
"$BIN" --run-dir "$RUN" image create disk0 --size 1G

# The guest's script rides in a second initramfs archive appended to the base one.
mkdir -p "$WORK/extra"
cat >"$WORK/extra/test.sh" <<'GUEST'
set -e
dd if=/dev/urandom of=/tmp/data bs=1M count=16 2>/dev/null
dd if=/tmp/data of=/dev/vda bs=1M oflag=direct conv=fsync 2>/dev/null
a=$(md5sum </tmp/data | cut -d' ' -f1)
b=$(dd if=/dev/vda bs=1M count=16 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
echo "guest: wrote 16 MiB md5 $a, read back md5 $b"
[ "$a" = "$b" ] && echo "guest: DATA MATCHES"
GUEST
(cd "$WORK/extra" && echo test.sh | cpio --quiet -o -H newc) >"$WORK/extra.cpio"
# The kernel looks for the next archive only at 4-byte aligned offsets: pad the first one.
cp "$GUEST/initramfs.cpio.gz" "$WORK/initrd"
truncate -s %4 "$WORK/initrd"
cat "$WORK/extra.cpio" >>"$WORK/initrd"

echo "== booting a guest (TCG) with its disk on $RUN/disk0.sock"
timeout 120 qemu-system-x86_64 -accel tcg -cpu max -m 256 -smp 1 -nographic -no-reboot -nic none \
    -object memory-backend-memfd,id=mem,size=256M,share=on -numa node,memdev=mem \
    -kernel "$GUEST/vmlinuz" -initrd "$WORK/initrd" \
    -append "console=ttyS0 panic=-1 quiet cormorant_disks=1" \
    -chardev socket,id=c0,path="$RUN/disk0.sock" \
    -device vhost-user-blk-pci,chardev=c0,num-queues=1 </dev/null >"$WORK/console.log" 2>&1 || true
grep '^guest:' "$WORK/console.log" || { cat "$WORK/console.log"; exit 1; }

echo "== cormorant image info disk0 (first blocks)"
"$BIN" --run-dir "$RUN" image info disk0 | head -n 20
kill -TERM "$DAEMON_PID"
wait "$DAEMON_PID" || true
DAEMON_PID=
grep -q "guest: DATA MATCHES" "$WORK/console.log"
echo "== demo ok"
