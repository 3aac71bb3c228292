#!/bin/bash
# Install what building and testing Cormorant needs on a fresh Debian (run as root).
#
# Idempotent: when every package is already installed it does not touch apt at all, so re-runs
# take well under a second. It downloads nothing except through apt.
#
# Quirk: on bookworm the QEMU we need (vhost-user-blk with memfd guests, qemu-storage-daemon)
# is QEMU 10 from bookworm-backports. Mixing it with bookworm's own QEMU 7.2 breaks (qemu-utils
# 10 conflicts with qemu-system 7.2), so on bookworm every qemu package comes from backports.
set -euo pipefail

# QEMU packages. qemu-storage-daemon is in qemu-utils from QEMU 8 on (in qemu-system-common
# before), so both are listed.
QEMU_PKGS="qemu-system-x86 qemu-system-common qemu-utils"
# The test guest (scripts/build-guest.sh) and the rest of the tests; gcc/libc6-dev for linking;
# etcd-server (etcd 3.4) and etcd-client (etcdctl) for the cluster metadata tests
# (tests/common/etcd.rs starts its own members; the package starts nothing without systemd).
OTHER_PKGS="fio busybox-static linux-image-cloud-amd64 cpio kmod xz-utils zstd iproute2 gcc libc6-dev etcd-server etcd-client"
# The libvirt tests run their own libvirtd (tests/common/libvirt.rs); the unit test runs
# systemd-analyze (systemd need not be running). On bookworm libvirt stays on the stable
# release: its libvirt 9.0 drives QEMU 10 from backports (define, start, hot-plug, reconnect,
# ACPI shutdown all tested).
LIBVIRT_PKGS="libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients systemd"

missing=""
for p in $QEMU_PKGS $OTHER_PKGS $LIBVIRT_PKGS; do
    if [ "$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)" != installed ]; then
        missing="$missing $p"
    fi
done

if [ -n "$missing" ]; then
    echo "setup: installing:$missing"
    if [ "$(id -u)" -ne 0 ]; then
        echo "setup: must run as root to install packages" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
    qemu_target=()
    if [ "$codename" = bookworm ]; then
        if ! grep -rqs '^[^#]*bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
            echo "deb http://deb.debian.org/debian bookworm-backports main" \
                >/etc/apt/sources.list.d/bookworm-backports.list
        fi
        qemu_target=(-t bookworm-backports)
    fi
    apt-get update -q
    # Two installs, so that only QEMU (and what it pulls in) comes from backports: the rest,
    # the kernel above all, stays on the stable release.
    # shellcheck disable=SC2086
    apt-get install -y -q --no-install-recommends "${qemu_target[@]}" $QEMU_PKGS
    # shellcheck disable=SC2086
    apt-get install -y -q --no-install-recommends $OTHER_PKGS $LIBVIRT_PKGS
fi

# Checks that catch a half-working install early, with a clear message.
for tool in qemu-system-x86_64 qemu-storage-daemon fio busybox cpio zstd xz libvirtd virsh systemd-analyze unshare etcd etcdctl; do
    command -v "$tool" >/dev/null || { echo "setup: $tool still missing" >&2; exit 1; }
done
compgen -G '/boot/vmlinuz-*-cloud-amd64' >/dev/null ||
    { echo "setup: no /boot/vmlinuz-*-cloud-amd64 after installing linux-image-cloud-amd64" >&2; exit 1; }

# cargo comes from rustup, not apt (Debian's is older than our rust-version).
# A script cannot change its caller's PATH, so say what to do when cargo was not on it.
if ! command -v cargo >/dev/null && [ -f "$HOME/.cargo/env" ]; then
    # shellcheck disable=SC1091
    . "$HOME/.cargo/env"
    command -v cargo >/dev/null && echo "setup: note: cargo is not on PATH; run: . \"\$HOME/.cargo/env\""
fi
if ! command -v cargo >/dev/null; then
    echo "setup: cargo not found: install a Rust toolchain (>= 1.89) with rustup" >&2
    exit 1
fi
# cargo-fuzz runs the fuzz targets under fuzz/ with the nightly toolchain; without nightly
# the test script skips fuzzing and says so.
if rustup toolchain list 2>/dev/null | grep -q '^nightly' && ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "setup: installing cargo-fuzz (crates.io)"
    cargo install --locked --quiet cargo-fuzz
fi
echo "setup: ok ($(qemu-system-x86_64 --version | head -n1); $(cargo --version))"
