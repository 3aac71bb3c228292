//! A guest flooding one image whose blocks are on a slow peer must not get that peer failed
//! for another image's guest: the flood is pushed back on (bounded bytes in flight per peer
//! and per image), and the peer stays off the failure list while its heartbeat answers.
//!
//! Node a serves images x and y; every block of both is held by node b only, in a network
//! namespace behind a veth link limited to 48 Mbit/s. A VM-less client floods x with 1 MiB
//! writes, 48 at once; meanwhile a real guest writes and verifies y. Before the push-back, a
//! call queued behind the flood's 32 MiB on the one connection to b (5 s at this rate) timed
//! out, which put b on the failure list: every copy of x and y was skipped, the writes of
//! both failed.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::guest::{Disk, Guest, GuestOpts};
use common::netns;
use common::{tools_available, TestDir};
use cormorant_frontend::{BlkClient, BlkRequest, ClientOptions, GuestBuf};

/// The link from a to b: slow enough that the flood queues many seconds of data on the
/// connection if nothing holds it back.
const RATE: &str = "48mbit";
/// The flood: 1 MiB writes, this many in flight.
const FLOOD_DEPTH: usize = 48;
const MIB: u32 = 1 << 20;
/// virtio-blk status of a request that succeeded.
const S_OK: u8 = 0;

/// y's guest: writes 8 chunks of 256 KiB (each with a flush), then reads every one back
/// and compares: `RESULT write_errors=N`, `RESULT bad=N`.
const GUEST_SCRIPT: &str = r#"
errors=0
for i in $(seq 0 7); do
  printf "%0262144d" $((i*1000+7)) > /tmp/c
  dd if=/tmp/c of=/dev/vda bs=256k seek=$i oflag=direct conv=fsync 2>/dev/null || errors=$((errors+1))
  echo "WROTE $i"
done
echo "RESULT write_errors=$errors"
bad=0
for i in $(seq 0 7); do
  printf "%0262144d" $((i*1000+7)) > /tmp/c
  want=$(md5sum < /tmp/c | cut -d' ' -f1)
  got=$(dd if=/dev/vda bs=256k skip=$i count=1 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
  [ "$got" = "$want" ] || bad=$((bad+1))
done
echo "RESULT bad=$bad"
"#;

/// What the flood did: bytes written, and requests that failed.
struct Flooded {
    bytes: u64,
    failed: u64,
}

/// Writes 1 MiB requests of 0x5a over x (64 MiB), [`FLOOD_DEPTH`] in flight, until `stop`.
fn flood(client: &mut BlkClient, stop: &AtomicBool) -> Flooded {
    let q = client.queue(0).unwrap();
    let mut free: Vec<GuestBuf> = (0..FLOOD_DEPTH).map(|_| q.alloc(MIB).unwrap()).collect();
    for buf in &free {
        q.memory().fill(buf.addr, MIB as usize, 0x5a).unwrap();
    }
    let mut in_flight: HashMap<u64, GuestBuf> = HashMap::new();
    let (mut next, mut bytes, mut failed) = (0u64, 0u64, 0u64);
    let mut done = Vec::new();
    loop {
        if !stop.load(Ordering::Relaxed) {
            while let Some(buf) = free.pop() {
                let sector = (next % 64) * u64::from(MIB / 512);
                next += 1;
                let token = q.submit(&BlkRequest::write(sector, buf)).unwrap();
                in_flight.insert(token.0, buf);
            }
        } else if in_flight.is_empty() {
            return Flooded { bytes, failed };
        }
        done.clear();
        q.wait_completions(&mut done, Duration::from_secs(30))
            .expect("a flood write completes within 30 s");
        for c in &done {
            free.extend(in_flight.remove(&c.token.0));
            match c.status {
                S_OK => bytes += u64::from(MIB),
                _ => failed += 1,
            }
        }
    }
}

#[test]
fn a_flooding_guest_does_not_fail_the_peer_for_another_image() {
    if !tools_available(&["qemu-system-x86_64", "etcd", "tc"]) {
        return;
    }
    let Some(ns) = netns::create_or_skip("flood") else {
        return;
    };
    let dir = TestDir::new();
    // b reaches etcd through the veth too. Its lease (10 s) outlasts any queueing on the
    // slow link by far: what is tested is the peer path, not the lease.
    let (_etcd, _proxy, cluster) = netns::cluster_across(&ns, dir.path(), 10);
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);
    a.create_image("x", "64M", "4M", &["b:ram"]);
    a.create_image("y", "8M", "1M", &["b:ram"]);
    ns.limit_rate(RATE, "300ms");

    let opts = ClientOptions {
        mem_size: (FLOOD_DEPTH as u64 + 8) << 20,
        ..ClientOptions::default()
    };
    let mut flooder = BlkClient::connect(a.socket("x"), &opts).unwrap();
    let stop = AtomicBool::new(false);
    let started = Instant::now();
    let (flooded, guest) = std::thread::scope(|s| {
        let flooding = s.spawn(|| flood(&mut flooder, &stop));
        // Let the flood fill whatever it may fill before y's guest starts.
        std::thread::sleep(Duration::from_secs(3));
        let booted = Instant::now();
        let guest = Guest::run(
            &GuestOpts::new(dir.join("y"), GUEST_SCRIPT)
                .disk(Disk::new(a.socket("y")))
                .timeout(Duration::from_secs(120)),
        );
        let ran = booted.elapsed();
        stop.store(true, Ordering::Relaxed);
        (flooding.join().unwrap(), (guest, ran))
    });
    let (guest, ran) = guest;
    eprintln!(
        "flood: {} MiB in {:?} ({} failed); y's guest (boot, 8 writes with flushes, 8 reads) ran {ran:?}",
        flooded.bytes >> 20,
        started.elapsed(),
        flooded.failed
    );

    let log = a.log();
    assert!(
        !log.contains("peer b: failed") && !log.contains("peer b: heartbeat"),
        "b must stay off the failure list:\n{log}"
    );
    assert_eq!(
        guest.value("write_errors"),
        Some("0"),
        "y's writes:\n{}",
        guest.console
    );
    assert_eq!(
        guest.value("bad"),
        Some("0"),
        "y's data:\n{}",
        guest.console
    );
    guest.expect_ok();
    assert_eq!(flooded.failed, 0, "every write of the flood completes");
    assert!(
        flooded.bytes >= 16 << 20,
        "the flood wrote {} MiB only",
        flooded.bytes >> 20
    );
    let peers = &a.cli(&["stats"])["peers"];
    assert_eq!(peers["b"]["on_failure_list"], false, "{peers}");
    // x holds the flood's bytes, on b.
    assert!(b.block_file("ram", "x", 0).exists());
    let (status, back) = flooder.read(0, 0, 4096).unwrap();
    assert_eq!(status, S_OK);
    assert!(back.iter().all(|&byte| byte == 0x5a));
}
