//! Live migration with the disk following the guest: a guest on node a writes and verifies
//! data in a loop while QEMU migrates it to node b, whose daemon adopted the image. Ownership
//! moves to b when the migrated guest starts there; a is fenced; the blocks then move to b in
//! the background, and a ends up holding nothing. Nothing written before or during the
//! migration is lost. The nodes keep their metadata in etcd: b wins the take-over because a's
//! QEMU stopped the device at the end of the migration.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::guest::{rounds_script, Disk, Guest, GuestOpts};
use common::{tools_available, wait_until, TestDir};

const ROUNDS: u32 = 40;

/// One HMP command over a monitor socket; returns what QEMU printed.
fn hmp(socket: &std::path::Path, command: &str) -> String {
    let mut s = UnixStream::connect(socket).expect("monitor");
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    s.write_all(format!("{command}\n").as_bytes()).unwrap();
    let mut out = String::new();
    let mut reader = BufReader::new(s);
    let mut line = String::new();
    while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
        out.push_str(&line);
        line.clear();
    }
    out
}

#[test]
fn a_guest_migrates_and_its_disk_follows() {
    if !tools_available(&["qemu-system-x86_64", "etcd"]) {
        return;
    }
    let dir = TestDir::new();
    let (_etcd, cluster) = common::etcd_cluster(dir.path(), 2);
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);
    a.create_image("mig", "16M", "1M", &["a:ram"]);
    let script = rounds_script(ROUNDS);
    let monitor = dir.join("monitor.sock");
    let mut source = Guest::spawn(
        &GuestOpts::new(dir.join("src"), &script)
            .disk(Disk::new(a.socket("mig")))
            .timeout(Duration::from_secs(300))
            .qemu_args(&[
                "-monitor",
                &format!("unix:{},server=on,wait=off", monitor.display()),
            ]),
    );
    assert!(source.wait_for_console("ROUND 5", Duration::from_secs(120)));

    let adopted = b.cli(&["image", "adopt", "mig"]);
    assert_eq!(adopted["image"], "mig");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let incoming = format!("tcp:127.0.0.1:{port}");
    let target = Guest::spawn(
        &GuestOpts::new(dir.join("dst"), &script)
            .disk(Disk::new(b.socket("mig")))
            .timeout(Duration::from_secs(300))
            .qemu_args(&["-incoming", &incoming]),
    );
    std::thread::sleep(Duration::from_secs(1));
    hmp(&monitor, &format!("migrate -d {incoming}"));
    let migrated = wait_until(Duration::from_secs(120), || {
        hmp(&monitor, "info migrate").contains("completed")
    });
    assert!(
        migrated,
        "migration did not complete: {}",
        hmp(&monitor, "info migrate")
    );
    // QEMU's own figure for the switch-over (benches/ compares it with qemu-storage-daemon).
    let info = hmp(&monitor, "info migrate");
    let downtime = info
        .lines()
        .find(|l| l.contains("downtime"))
        .unwrap_or("no downtime line");
    eprintln!("migration: {}", downtime.trim());
    hmp(&monitor, "quit");
    let _ = source.kill();

    let out = {
        let deadline = Instant::now() + Duration::from_secs(240);
        while Instant::now() < deadline && !target.console().contains("CORMORANT-GUEST-EXIT") {
            std::thread::sleep(Duration::from_millis(200));
        }
        target.wait()
    };
    out.expect_ok();
    assert_eq!(out.value("done"), Some("yes"), "{}", out.console);
    assert_eq!(out.value("mismatch"), None, "{}", out.console);
    assert_eq!(out.value("write_error"), None, "{}", out.console);

    // b owns the image now; a is fenced (no longer exports it).
    let info = b.cli(&["image", "info", "mig"]);
    assert_eq!(info["name"], "mig");
    assert_eq!(
        a.cli(&["image", "info", "mig"])["owner"],
        "b",
        "the cluster's view"
    );
    // The blocks move to b in the background; a ends up holding nothing.
    let localized = wait_until(Duration::from_secs(60), || {
        let info = b.cli(&["image", "info", "mig"]);
        info["blocks"].as_array().unwrap().iter().all(|blk| {
            let l = blk["locations"].as_array().unwrap();
            l.len() == 1 && l[0]["node"] == "b" && l[0]["synced"] == true
        })
    });
    assert!(localized, "blocks did not move to b: {}", b.log());
    assert!(
        wait_until(Duration::from_secs(10), || !a
            .image_dir("ram", "mig")
            .exists()),
        "a keeps files of the image"
    );
    assert!(!a.socket("mig").exists(), "a must stop exporting the image");
}
