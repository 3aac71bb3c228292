//! A real guest under QEMU (TCG) on disks served by `cormorant serve`.

mod common;

use common::daemon::Daemon;
use common::guest::{Disk, Guest, GuestOpts};
use common::{md5_prefix, tools_available, TestDir};

const TOOLS: &[&str] = &["qemu-system-x86_64"];

/// Writes `mib` MiB of random data at byte offset `seek_kib` KiB of `dev` with O_DIRECT,
/// reads it back with O_DIRECT, and prints the md5 and whether the two matched.
fn write_verify(dev: &str, key: &str, seek_kib: u64, mib: u64) -> String {
    format!(
        r#"
dd if=/dev/urandom of=/tmp/{key} bs=1M count={mib} 2>/dev/null
dd if=/tmp/{key} of={dev} bs=64k seek={seek} oflag=direct conv=fsync 2>/dev/null || echo "RESULT {key}_write=failed"
dd if={dev} of=/tmp/{key}.back bs=64k skip={seek} count={count} iflag=direct 2>/dev/null
a=$(md5sum < /tmp/{key} | cut -d' ' -f1)
b=$(md5sum < /tmp/{key}.back | cut -d' ' -f1)
echo "RESULT {key}_md5=$a"
[ "$a" = "$b" ] && echo "RESULT {key}_match=yes" || echo "RESULT {key}_match=no"
"#,
        seek = seek_kib / 64,
        count = mib * 16,
    )
}

/// md5 of `len` bytes at `offset` of an image, read on the host through `image export`.
fn exported_md5(daemon: &Daemon, dir: &TestDir, image: &str, offset: u64, len: usize) -> String {
    let raw = dir.join(&format!("{image}.export"));
    daemon.cli(&["image", "export", image, raw.to_str().unwrap()]);
    let bytes = std::fs::read(&raw).unwrap();
    let part = dir.join(&format!("{image}.part"));
    std::fs::write(&part, &bytes[offset as usize..offset as usize + len]).unwrap();
    md5_prefix(&part, len)
}

/// Two images at once, one per tier, the volume one with two queues and 1 MiB blocks so the
/// writes cross block boundaries; the data reads back in the guest and on the host.
#[test]
fn guest_round_trip_on_both_tiers() {
    if !tools_available(TOOLS) {
        return;
    }
    let dir = TestDir::new();
    let daemon = Daemon::start(dir.path());
    daemon.cli(&["image", "create", "ramdisk", "--size", "64M"]);
    daemon.cli(&[
        "image",
        "create",
        "voldisk",
        "--size",
        "48M",
        "--tier",
        "volume",
        "--block-size",
        "1M",
    ]);
    let script = [
        write_verify("/dev/vda", "ram", 4032, 8),
        write_verify("/dev/vdb", "vol", 960, 6),
        "echo RESULT vdb_queues=$(ls /sys/block/vdb/mq | wc -l)\n".to_string(),
        "echo RESULT vdb_serial=$(cat /sys/block/vdb/serial)\n".to_string(),
    ]
    .concat();
    let out = Guest::run(
        &GuestOpts::new(dir.path(), &script)
            .cpus(2)
            .disk(Disk::new(daemon.socket("ramdisk")))
            .disk(Disk::new(daemon.socket("voldisk")).queues(2)),
    );
    out.expect_ok();
    assert_eq!(out.value("ram_match"), Some("yes"), "{}", out.console);
    assert_eq!(out.value("vol_match"), Some("yes"), "{}", out.console);
    assert_eq!(out.value("vdb_queues"), Some("2"));
    assert_eq!(out.value("vdb_serial"), Some("voldisk"));
    assert_eq!(
        exported_md5(&daemon, &dir, "ramdisk", 4032 << 10, 8 << 20),
        out.expect_value("ram_md5")
    );
    assert_eq!(
        exported_md5(&daemon, &dir, "voldisk", 960 << 10, 6 << 20),
        out.expect_value("vol_md5")
    );
    // 4032 KiB .. +8 MiB touches blocks 0..=2 of the 4 MiB RAM image; nothing else exists.
    assert!(daemon.block_file("ram", "ramdisk", 2).exists());
    assert!(!daemon.block_file("ram", "ramdisk", 3).exists());
    assert!(daemon.block_file("volume", "voldisk", 0).exists());
    assert!(!daemon.block_file("volume", "voldisk", 7).exists());
}

/// Data a guest flushed survives a `kill -9` of the daemon: after a restart, a new guest
/// reads the same bytes, and QEMU's reconnect to a restarted daemon works.
#[test]
fn flushed_data_survives_kill_9() {
    if !tools_available(TOOLS) {
        return;
    }
    let dir = TestDir::new();
    let mut daemon = Daemon::start(dir.path());
    daemon.cli(&["image", "create", "d", "--size", "32M", "--tier", "volume"]);
    daemon.cli(&["image", "create", "r", "--size", "32M"]);
    let write = r#"
dd if=/dev/urandom of=/tmp/v bs=1M count=5 2>/dev/null
dd if=/tmp/v of=/dev/vda bs=1M seek=3 oflag=direct conv=fsync 2>/dev/null
dd if=/tmp/v of=/dev/vdb bs=1M seek=1 oflag=direct conv=fsync 2>/dev/null
echo RESULT md5=$(md5sum < /tmp/v | cut -d' ' -f1)
"#;
    let (sock_d, sock_r) = (daemon.socket("d"), daemon.socket("r"));
    let disks = |opts: GuestOpts| opts.disk(Disk::new(&sock_d)).disk(Disk::new(&sock_r));
    let first = Guest::run(&disks(GuestOpts::new(dir.join("g1"), write)));
    first.expect_ok();
    let md5 = first.expect_value("md5").to_string();

    daemon.restart();
    let read = r#"
echo RESULT vda=$(dd if=/dev/vda bs=1M skip=3 count=5 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
echo RESULT vdb=$(dd if=/dev/vdb bs=1M skip=1 count=5 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
"#;
    let second = Guest::run(&disks(GuestOpts::new(dir.join("g2"), read)));
    second.expect_ok();
    assert_eq!(
        second.value("vda"),
        Some(md5.as_str()),
        "{}",
        second.console
    );
    assert_eq!(
        second.value("vdb"),
        Some(md5.as_str()),
        "{}",
        second.console
    );
}

/// Discard frees the block files' space; discarded ranges read back as zeros.
#[test]
fn discard_frees_space() {
    if !tools_available(TOOLS) {
        return;
    }
    let dir = TestDir::new();
    let daemon = Daemon::start(dir.path());
    daemon.cli(&[
        "image",
        "create",
        "d",
        "--size",
        "32M",
        "--tier",
        "volume",
        "--block-size",
        "1M",
    ]);
    let fill = r#"
dd if=/dev/urandom of=/dev/vda bs=1M count=8 oflag=direct conv=fsync 2>/dev/null
echo RESULT written=yes
"#;
    Guest::run(&GuestOpts::new(dir.join("g1"), fill).disk(Disk::new(daemon.socket("d"))))
        .expect_ok();
    let used_before = daemon.cli(&["image", "info", "d"])["used_size"]
        .as_u64()
        .unwrap();
    assert!(used_before >= 8 << 20, "used {used_before}");
    // Whole blocks 0..4 go; half of block 5 becomes a hole.
    let discard = r#"
blkdiscard -o 0 -l 4194304 /dev/vda
blkdiscard -o 5242880 -l 524288 /dev/vda
z=$(dd if=/dev/zero bs=64k count=64 2>/dev/null | md5sum | cut -d' ' -f1)
echo RESULT head=$(dd if=/dev/vda bs=64k count=64 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
echo RESULT zero=$z
echo RESULT half=$(dd if=/dev/vda bs=64k skip=80 count=8 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
echo RESULT zerohalf=$(dd if=/dev/zero bs=64k count=8 2>/dev/null | md5sum | cut -d' ' -f1)
"#;
    let out =
        Guest::run(&GuestOpts::new(dir.join("g2"), discard).disk(Disk::new(daemon.socket("d"))));
    out.expect_ok();
    assert_eq!(out.value("head"), out.value("zero"), "{}", out.console);
    assert_eq!(out.value("half"), out.value("zerohalf"), "{}", out.console);
    for block in 0..4 {
        assert!(!daemon.block_file("volume", "d", block).exists());
    }
    assert!(daemon.block_file("volume", "d", 5).exists());
    let used_after = daemon.cli(&["image", "info", "d"])["used_size"]
        .as_u64()
        .unwrap();
    assert!(
        used_after <= used_before - (4 << 20) - (512 << 10),
        "used {used_before} -> {used_after}"
    );
}

/// A read-only image shows up read-only in the guest and refuses writes.
#[test]
fn read_only_image_refuses_writes() {
    if !tools_available(TOOLS) {
        return;
    }
    let dir = TestDir::new();
    let daemon = Daemon::start(dir.path());
    daemon.cli(&["image", "create", "ro", "--size", "16M", "--read-only"]);
    let script = r#"
echo RESULT ro=$(cat /sys/block/vda/ro)
if dd if=/dev/zero of=/dev/vda bs=4k count=1 oflag=direct 2>/dev/null; then echo RESULT write=ok; else echo RESULT write=refused; fi
echo RESULT read=$(dd if=/dev/vda bs=4k count=1 iflag=direct 2>/dev/null | wc -c)
"#;
    let out = Guest::run(&GuestOpts::new(dir.path(), script).disk(Disk::new(daemon.socket("ro"))));
    out.expect_ok();
    assert_eq!(out.value("ro"), Some("1"), "{}", out.console);
    assert_eq!(out.value("write"), Some("refused"), "{}", out.console);
    assert_eq!(out.value("read"), Some("4096"), "{}", out.console);
    assert!(!daemon.block_file("ram", "ro", 0).exists());
}
