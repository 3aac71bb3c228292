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
        "image", "create", "voldisk", "--size", "48M", "--tier", "volume", "--block-size", "1M",
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
