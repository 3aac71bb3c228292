//! The daemon through a VM-less vhost-user frontend: hostile descriptor chains, a second
//! frontend, reconnects, many requests in flight, discard and write-zeroes.

mod common;

use std::time::Duration;

use common::daemon::Daemon;
use common::TestDir;
use cormorant_frontend::{BlkClient, BlkRequest, ClientOptions, DiscardRange, Error, Malformed};

const RAW_TIMEOUT: Duration = Duration::from_secs(3);
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

fn connect(daemon: &Daemon, image: &str, queues: u16) -> BlkClient {
    let opts = ClientOptions {
        num_queues: queues,
        ..ClientOptions::default()
    };
    BlkClient::connect(daemon.socket(image), &opts).expect("connect to the daemon")
}

/// Every malformed chain is answered on one connection, which keeps serving after each: the
/// guest gets IOERR or UNSUPP (or nothing to write a status into), never a stalled queue.
#[test]
fn malformed_chains_are_answered_and_the_queue_keeps_serving() {
    let dir = TestDir::new();
    let daemon = Daemon::start(dir.path());
    daemon.cli(&["image", "create", "d", "--size", "16M", "--tier", "volume"]);
    let mut client = connect(&daemon, "d", 1);
    let capacity = client.config().capacity;
    let q = client.queue(0).unwrap();
    q.write(0, &[0x5a; 4096]).unwrap();
    for case in Malformed::ALL {
        let chain = q.malformed(case, capacity).unwrap();
        let reply = match q.run_raw(&chain, RAW_TIMEOUT) {
            Ok(reply) => reply,
            Err(Error::Timeout { .. }) => {
                // The ring itself was unusable (a bad head or a loop the queue library ends
                // early): the chain cannot be completed, but the queue must go on.
                eprintln!("{case:?}: not completed");
                q.abandon_raw().unwrap();
                assert_serves(q, case);
                continue;
            }
            Err(e) => panic!("{case:?}: {e:?}\n{}", daemon.log()),
        };
        eprintln!(
            "{case:?}: status {:?} used {}",
            reply.status, reply.used.len
        );
        // Zero-length buffers carry nothing and are skipped (the read is of 0 bytes); a NEXT
        // flag beside INDIRECT is ignored, as QEMU does.
        if !matches!(case, Malformed::IndirectWithNext | Malformed::ZeroLenData) {
            // With no device-writable byte there is nowhere to put a status: the chain comes
            // back with a used length of 0 and the guest's buffer untouched.
            let unwritable = reply.used.len == 0 && reply.status != Some(S_OK);
            assert!(
                matches!(reply.status, Some(S_IOERR | S_UNSUPP)) || unwritable,
                "{case:?}: status {:?} used {}",
                reply.status,
                reply.used.len
            );
        }
        assert_serves(q, case);
    }
    // A guest's mistakes are logged, but not one line per bad request.
    let log = daemon.log();
    assert!(!log.contains("panicked"), "{log}");
}

fn assert_serves(q: &mut cormorant_frontend::BlkQueue, after: Malformed) {
    let (status, data) = q
        .read(0, 4096)
        .unwrap_or_else(|e| panic!("after {after:?}: {e:?}"));
    assert_eq!(status, S_OK, "after {after:?}");
    assert!(data.iter().all(|&b| b == 0x5a), "after {after:?}");
}

/// Blocks of 64 KiB: requests cross block boundaries and whole-block frees are easy to aim.
fn small_block_image(daemon: &Daemon, name: &str, tier: &str) {
    daemon.cli(&[
        "image",
        "create",
        name,
        "--size",
        "4M",
        "--tier",
        tier,
        "--block-size",
        "64K",
    ]);
}

#[test]
fn commands_read_back_what_they_promise() {
    let dir = TestDir::new();
    let daemon = Daemon::start(dir.path());
    small_block_image(&daemon, "v", "volume");
    let mut client = connect(&daemon, "v", 1);
    assert_eq!(client.config().capacity, 8192);
    let q = client.queue(0).unwrap();
    let (status, id) = q.get_id().unwrap();
    assert_eq!((status, &id[..2], id[2]), (S_OK, &b"v\0"[..], 0));

    // 192 KiB of pattern at sector 100 spans blocks 0..=3, cutting two of them.
    let pattern: Vec<u8> = (0..192 << 10).map(|i: u32| (i % 251) as u8).collect();
    assert_eq!(q.write(100, &pattern).unwrap(), S_OK);
    assert_eq!(q.flush().unwrap(), S_OK);
    let (status, back) = q.read(100, pattern.len() as u32).unwrap();
    assert_eq!(status, S_OK);
    assert!(back == pattern, "read back differs");
    for block in 0..=3 {
        assert!(
            daemon.block_file("volume", "v", block).exists(),
            "block {block}"
        );
    }

    // Write-zeroes over block 1 and a part of block 2; discard block 3 whole.
    let zeroes = DiscardRange {
        sector: 128,
        num_sectors: 128 + 16,
        flags: DiscardRange::FLAG_UNMAP,
    };
    assert_eq!(q.write_zeroes(&[zeroes]).unwrap(), S_OK);
    let discard = DiscardRange {
        sector: 384,
        num_sectors: 128,
        flags: 0,
    };
    assert_eq!(q.discard(&[discard]).unwrap(), S_OK);
    assert!(!daemon.block_file("volume", "v", 1).exists());
    assert!(daemon.block_file("volume", "v", 2).exists());
    assert!(!daemon.block_file("volume", "v", 3).exists());
    let (_, back) = q.read(100, pattern.len() as u32).unwrap();
    let mut expect = pattern.clone();
    let zeroed = (128 - 100) * 512..(128 + 128 + 16 - 100) * 512;
    expect[zeroed].fill(0);
    expect[(384 - 100) * 512..].fill(0);
    assert!(back == expect, "zeroed ranges do not read as zeros");

    // A range past the end is refused, and the unmap flag on a discard is unsupported.
    let past = DiscardRange {
        sector: 8190,
        num_sectors: 8,
        flags: 0,
    };
    assert_eq!(q.discard(&[past]).unwrap(), S_IOERR);
    let bad = DiscardRange {
        flags: DiscardRange::FLAG_UNMAP,
        ..discard
    };
    assert_eq!(q.discard(&[bad]).unwrap(), S_UNSUPP);
}

/// A second frontend is turned away while the first is connected, which keeps working; once
/// the first goes, a new one is served and sees the first one's data.
#[test]
fn one_frontend_at_a_time_and_reconnects() {
    let dir = TestDir::new();
    let daemon = Daemon::start(dir.path());
    small_block_image(&daemon, "r", "ram");
    let mut first = connect(&daemon, "r", 1);
    assert_eq!(first.write(0, 0, &[7; 4096]).unwrap(), S_OK);

    // The second frontend may get as far as negotiating, but it is never served: its first
    // read fails (the daemon closes the connection) instead of returning data.
    let opts = ClientOptions {
        control_timeout: Duration::from_secs(4),
        io_timeout: Duration::from_secs(4),
        ..ClientOptions::default()
    };
    if let Ok(mut second) = BlkClient::connect(daemon.socket("r"), &opts) {
        assert!(
            second.read(0, 0, 4096).is_err(),
            "second frontend was served"
        );
    }
    assert!(daemon.log().contains("refusing a second frontend"));
    assert!(daemon.cli(&["image", "info", "r"])["in_use"]
        .as_bool()
        .unwrap());
    let rm = daemon.cli_raw(&["image", "rm", "r"]);
    assert!(!rm.status.success(), "an image in use cannot be removed");
    assert_eq!(first.read(0, 0, 4096).unwrap(), (S_OK, vec![7; 4096]));
    first.close().unwrap();

    for round in 0..3u8 {
        let mut again = connect(&daemon, "r", 1);
        assert_eq!(again.read(0, 0, 4096).unwrap().1, vec![7 + round; 4096]);
        assert_eq!(again.write(0, 0, &[8 + round; 4096]).unwrap(), S_OK);
        drop(again);
    }
}

/// Many requests in flight on two queues at once complete, each exactly once.
#[test]
fn many_requests_in_flight_on_two_queues() {
    let dir = TestDir::new();
    let daemon = Daemon::start(dir.path());
    small_block_image(&daemon, "vol", "volume");
    small_block_image(&daemon, "ram", "ram");
    for image in ["vol", "ram"] {
        let mut client = connect(&daemon, image, 2);
        std::thread::scope(|s| {
            for (qi, q) in client.queues_mut().iter_mut().enumerate() {
                s.spawn(move || {
                    let mut bufs = Vec::new();
                    for i in 0..64u64 {
                        let buf = q.alloc(4096).unwrap();
                        q.memory()
                            .fill(buf.addr, 4096, (qi as u8) << 4 | i as u8)
                            .unwrap();
                        bufs.push(BlkRequest::write((qi as u64 * 64 + i) * 8, buf));
                    }
                    q.submit_batch(&bufs).unwrap();
                    let mut done = Vec::new();
                    while done.len() < 64 {
                        q.wait_completions(&mut done, Duration::from_secs(10))
                            .unwrap();
                    }
                    assert_eq!(done.len(), 64);
                    assert!(done.iter().all(|c| c.status == S_OK));
                    let mut tokens: Vec<u64> = done.iter().map(|c| c.token.0).collect();
                    tokens.sort();
                    tokens.dedup();
                    assert_eq!(tokens.len(), 64, "every request completed once");
                });
            }
        });
        for (qi, i) in [(0u64, 0u64), (1, 63), (0, 31)] {
            let (_, back) = client.read(0, (qi * 64 + i) * 8, 4096).unwrap();
            assert!(
                back.iter().all(|&b| b == ((qi as u8) << 4 | i as u8)),
                "{image}"
            );
        }
    }
}

/// The in-flight region (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD): a frontend that asks for one,
/// as QEMU does, gets a region sized for its queues and is served with it; regions that do not
/// match what they claim, a region while the queues run, or requests for none, are refused,
/// and the connection keeps serving.
#[test]
fn inflight_region_requests_are_checked() {
    use vhost::vhost_user::message::VhostUserInflight;
    use vhost::vhost_user::VhostUserProtocolFeatures;

    let dir = TestDir::new();
    let daemon = Daemon::start(dir.path());
    daemon.cli(&["image", "create", "d", "--size", "16M"]);
    let opts = ClientOptions {
        num_queues: 2,
        inflight: true,
        ..ClientOptions::default()
    };
    let mut client = BlkClient::connect(daemon.socket("d"), &opts).expect("connect");
    assert!(client
        .negotiated()
        .protocol_acked
        .contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD));
    // Two queues of 256 entries: a 16-byte header and 16 bytes per entry each.
    let region = client
        .inflight_region()
        .expect("a region")
        .metadata()
        .unwrap();
    assert!(
        region.len() >= 2 * (16 + 256 * 16),
        "{} bytes",
        region.len()
    );
    let serves = |client: &mut BlkClient, byte: u8| {
        for queue in 0..2 {
            assert_eq!(client.write(queue, 8, &[byte; 4096]).unwrap(), S_OK);
            assert_eq!(
                client.read(queue, 8, 4096).unwrap(),
                (S_OK, vec![byte; 4096])
            );
        }
    };
    serves(&mut client, 1);

    let (info, file) = client.get_inflight(1, 128).expect("a second region");
    assert_eq!(info.num_queues, 1);
    assert_eq!(info.queue_size, 128);
    for bad in [
        // Smaller than its queues need.
        VhostUserInflight::new(64, 0, 1, 128),
        // Past the end of the file.
        VhostUserInflight::new(info.mmap_size, 1 << 20, 1, 128),
        // Not a power-of-two queue size.
        VhostUserInflight::new(info.mmap_size, 0, 1, 100),
    ] {
        assert!(
            client.set_inflight(&bad, &file).is_err(),
            "accepted {} bytes at {} for a queue of {}",
            bad.mmap_size,
            bad.mmap_offset,
            bad.queue_size
        );
    }
    // A sound region, but the queues run: taking it would reset their place in the ring.
    assert!(client.set_inflight(&info, &file).is_err());
    // No region for a queue size no ring can have: an empty answer, no descriptor.
    assert!(client.get_inflight(1, 100).is_err());
    serves(&mut client, 2);
    assert!(daemon.log().contains("SET_INFLIGHT_FD"));
}
