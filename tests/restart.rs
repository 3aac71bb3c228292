//! The daemon killed with -9 under a guest that writes and verifies, several times: QEMU
//! reconnects (chardev `reconnect-ms`, libvirt's `<reconnect>`), the restarted daemon replays
//! the requests its predecessor left in flight (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD), and the
//! guest sees no I/O error and loses nothing.
//!
//! One kill is made certain to catch writes in flight: the image has a second copy on node b,
//! which is stopped (SIGSTOP) first, so the guest's writes wait on a for b's answer when a is
//! killed. The other kills land wherever the workload happens to be.
//!
//! The same with the VM-less frontend, where the rings can be arranged exactly: a write left in
//! flight behind a read that completed (completions out of order, which QEMU's own rewind to
//! the used index cannot recover) is replayed once, and the read is not completed again.

mod common;

use std::io::{Seek, SeekFrom, Write};
use std::time::Duration;

use common::daemon::Daemon;
use common::guest::{Disk, Guest, GuestOpts};
use common::{tools_available, wait_until};
use cormorant_frontend::{BlkClient, BlkRequest, ClientOptions, Error};

/// Two writers, eight 256 KiB slots each, over the first 4 MiB of vda; each write is flushed,
/// read back and compared, and its checksum kept; at the end every slot is checked again. vdb
/// is the host's stop sign: "STOP" in its first bytes.
const SCRIPT: &str = r#"
md5() { md5sum | cut -d' ' -f1; }
dd if=/dev/zero of=/dev/vdb bs=4k count=1 oflag=direct 2>/dev/null
stopped() { [ "$(dd if=/dev/vdb bs=4k count=1 iflag=direct 2>/dev/null | head -c 4)" = STOP ]; }
writer() {
    n=0
    while ! stopped; do
        slot=$(( $1 + n % 8 ))
        dd if=/dev/urandom of=/tmp/w$1 bs=64k count=4 2>/dev/null
        dd if=/tmp/w$1 of=/dev/vda bs=64k seek=$((slot * 4)) oflag=direct conv=fsync 2>/dev/null ||
            echo "WRITE-ERROR slot $slot"
        want=$(md5 </tmp/w$1)
        got=$(dd if=/dev/vda bs=64k skip=$((slot * 4)) count=4 iflag=direct 2>/dev/null | md5)
        [ "$got" = "$want" ] || echo "READ-BACK-DIFFERS slot $slot"
        echo $want >/tmp/sum.$slot
        n=$((n + 1))
    done
    echo "RESULT writes$1=$n"
}
writer 0 &
writer 8 &
echo READY
wait
bad=0
for slot in $(seq 0 15); do
    [ ! -e /tmp/sum.$slot ] ||
    [ "$(dd if=/dev/vda bs=64k skip=$((slot * 4)) count=4 iflag=direct 2>/dev/null | md5)" = "$(cat /tmp/sum.$slot)" ] ||
        bad=$((bad + 1))
done
echo "RESULT bad=$bad"
echo "RESULT final=$(dd if=/dev/vda bs=1M count=4 iflag=direct 2>/dev/null | md5)"
"#;

fn in_use(daemon: &Daemon, image: &str) -> bool {
    daemon.cli_raw(&["image", "info", image]).status.success()
        && daemon.cli(&["image", "info", image])["in_use"] == true
}

/// Kills a with -9 and starts it again; returns once QEMU is connected to the new one.
fn kill_and_restart(a: &mut Daemon) {
    a.kill9();
    a.start_again();
    assert!(
        wait_until(Duration::from_secs(30), || in_use(a, "g")),
        "QEMU did not reconnect to the restarted daemon"
    );
}

fn replays(a: &Daemon) -> usize {
    a.log().matches("requests left in flight").count()
}

#[test]
fn kill_9_under_guest_writes_loses_nothing() {
    if !tools_available(&["qemu-system-x86_64", "etcd"]) {
        return;
    }
    let dir = common::TestDir::new();
    let (_etcd, mut cluster) = common::etcd_cluster(dir.path(), 2);
    let [a, b] = &mut cluster.nodes[..] else {
        unreachable!("two nodes")
    };
    a.create_image("g", "32M", "1M", &["a:volume", "b:ram"]);
    a.cli(&["image", "create", "ctl", "--size", "1M", "--at", "a:ram"]);
    let opts = GuestOpts::new(dir.join("guest"), SCRIPT)
        .disk(Disk::new(a.socket("g")).reconnect_ms(100))
        .disk(Disk::new(a.socket("ctl")).reconnect_ms(100))
        .timeout(Duration::from_secs(300));
    let stop_sign = a.block_file("ram", "ctl", 0);
    let mut guest = Guest::spawn(&opts);
    assert!(
        guest.wait_for_console("READY", Duration::from_secs(120)),
        "{}",
        guest.console()
    );

    // Writes wait on a for the stopped b: kill a under them.
    std::thread::sleep(Duration::from_millis(500));
    b.pause();
    std::thread::sleep(Duration::from_millis(1000));
    a.kill9();
    b.resume();
    a.start_again();
    assert!(
        wait_until(Duration::from_secs(30), || in_use(a, "g")),
        "QEMU did not reconnect"
    );
    assert!(
        wait_until(Duration::from_secs(10), || replays(a) > 0),
        "the requests left in flight were not replayed:\n{}",
        a.log()
    );
    // Three more, wherever they land.
    for i in 0..3u64 {
        std::thread::sleep(Duration::from_millis(300 + i * 450));
        kill_and_restart(a);
    }
    std::thread::sleep(Duration::from_millis(500));
    let mut sign = std::fs::OpenOptions::new()
        .write(true)
        .open(&stop_sign)
        .unwrap();
    sign.seek(SeekFrom::Start(0)).unwrap();
    sign.write_all(b"STOP").unwrap();
    drop(sign);

    let out = guest.wait();
    out.expect_ok();
    eprintln!(
        "writes: {:?} {:?}; replays logged: {}",
        out.value("writes0"),
        out.value("writes8"),
        replays(a)
    );
    for failure in [
        "WRITE-ERROR",
        "READ-BACK-DIFFERS",
        "I/O error",
        "not a head",
    ] {
        assert!(
            !out.console.contains(failure),
            "{failure}:\n{}",
            out.console
        );
    }
    assert_eq!(out.value("bad"), Some("0"), "{}", out.console);

    // What the guest read last is what both copies hold, once b caught up.
    std::thread::sleep(Duration::from_secs(3));
    a.cli(&["sync", "g"]);
    let mut on_a = Vec::new();
    for block in 0..4 {
        let mut a_copy = std::fs::read(a.block_file("volume", "g", block)).unwrap();
        let mut b_copy = std::fs::read(b.block_file("ram", "g", block)).unwrap();
        // Block files are thin: what was never written reads as zeros.
        a_copy.resize(1 << 20, 0);
        b_copy.resize(1 << 20, 0);
        assert!(a_copy == b_copy, "block {block}: the copies differ");
        on_a.extend(a_copy);
    }
    let path = dir.join("first-4m");
    std::fs::write(&path, &on_a).unwrap();
    assert_eq!(
        common::md5_prefix(&path, 4 << 20),
        out.expect_value("final")
    );
}

#[test]
fn a_write_left_in_flight_behind_a_completed_read_is_replayed_once() {
    if !tools_available(&["etcd"]) {
        return;
    }
    let dir = common::TestDir::new();
    let (_etcd, mut cluster) = common::etcd_cluster(dir.path(), 2);
    let [a, b] = &mut cluster.nodes[..] else {
        unreachable!("two nodes")
    };
    a.create_image("g", "4M", "1M", &["a:ram", "b:ram"]);
    let opts = ClientOptions {
        inflight: true,
        ..ClientOptions::default()
    };
    let mut client = BlkClient::connect(a.socket("g"), &opts).expect("connect");
    assert_eq!(client.write(0, 0, &[1; 4096]).unwrap(), 0);

    // b stopped: the write to block 1 waits on a for b; the read of block 0, behind it on the
    // same ring, completes.
    b.pause();
    let q = client.queue(0).unwrap();
    let data = q.alloc(4096).unwrap();
    q.memory().write(data.addr, &[7; 4096]).unwrap();
    let write = q.submit(&BlkRequest::write(2048, data)).unwrap();
    let buf = q.alloc(4096).unwrap();
    let read = q.submit(&BlkRequest::read(0, buf)).unwrap();
    assert_eq!(q.wait_for(read, Duration::from_secs(2)).unwrap().status, 0);
    assert!(
        matches!(
            q.wait_for(write, Duration::from_millis(300)),
            Err(Error::Timeout { .. })
        ),
        "the write should still be waiting for b"
    );

    a.kill9();
    b.resume();
    a.start_again();
    client.reconnect(a.socket("g"), &opts).expect("reconnect");
    let q = client.queue(0).unwrap();
    let done = q
        .wait_for(write, Duration::from_secs(10))
        .expect("the write is replayed");
    assert_eq!(done.status, 0);
    // Nothing is completed twice (the frontend would fail on a used element it did not
    // expect), and both copies have the write.
    assert_eq!(client.read(0, 2048, 4096).unwrap(), (0, vec![7; 4096]));
    assert_eq!(client.read(0, 0, 4096).unwrap(), (0, vec![1; 4096]));
    assert!(
        a.log().contains("replaying 1 requests left in flight"),
        "{}",
        a.log()
    );
    let on_b = std::fs::read(b.block_file("ram", "g", 1)).unwrap();
    assert_eq!(&on_b[..4096], &[7; 4096][..]);
}
