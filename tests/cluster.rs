//! Several daemons on loopback addresses: remote reads and writes, replicas, a peer killed
//! and resynced, a wrong cluster key, and a disk moved between nodes under writes.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::daemon::Daemon;
use common::TestDir;
use cormorant_frontend::{BlkClient, ClientOptions};

const S_OK: u8 = 0;

fn client(node: &Daemon, image: &str) -> BlkClient {
    BlkClient::connect(node.socket(image), &ClientOptions::default()).expect("connect")
}

fn pattern(block: u64, round: u8) -> Vec<u8> {
    (0..64 << 10)
        .map(|i: u32| (i as u8) ^ (block as u8) ^ round)
        .collect()
}

#[test]
fn blocks_on_another_node_are_read_and_written_remotely() {
    let dir = TestDir::new();
    let (_etcd, cluster) = common::etcd_cluster(dir.path(), 2);
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);
    a.create_image("r", "4M", "1M", &["b:ram"]);
    let mut c = client(a, "r");
    for block in 0..4u64 {
        assert_eq!(c.write(0, block * 2048, &pattern(block, 1)).unwrap(), S_OK);
    }
    assert_eq!(c.flush(0).unwrap(), S_OK);
    for block in 0..4u64 {
        let (status, data) = c.read(0, block * 2048, 64 << 10).unwrap();
        assert_eq!(status, S_OK);
        assert!(data == pattern(block, 1), "block {block}");
        assert!(b.block_file("ram", "r", block).exists(), "held on b");
        assert!(!a.block_file("ram", "r", block).exists(), "nothing on a");
    }
    // b knows the image (held, not exported) and serves it after its own restart.
    assert!(!b.socket("r").exists());
    let mut b_restarted = cluster;
    b_restarted.nodes[1].restart();
    let (status, data) = c.read(0, 2048, 64 << 10).unwrap();
    assert_eq!((status, data == pattern(1, 1)), (S_OK, true));
}

#[test]
fn a_killed_replica_is_marked_stale_and_resynced() {
    let dir = TestDir::new();
    let (_etcd, mut cluster) = common::etcd_cluster(dir.path(), 2);
    cluster.nodes[0].create_image("m", "2M", "256K", &["a:ram", "b:volume"]);
    let mut c = client(&cluster.nodes[0], "m");
    for block in 0..8u64 {
        assert_eq!(c.write(0, block * 512, &pattern(block, 1)).unwrap(), S_OK);
    }
    cluster.nodes[1].kill9();
    // Writes go on while b is dead: acknowledged from a's copy, b's copies go stale.
    for block in 0..8u64 {
        assert_eq!(c.write(0, block * 512, &pattern(block, 2)).unwrap(), S_OK);
    }
    let (in_sync, stale) = cluster.nodes[0].copies_on("m", "b");
    assert!(
        stale > 0,
        "b's copies should be stale, got {in_sync} in sync"
    );
    cluster.nodes[1].start_again();
    std::thread::sleep(Duration::from_secs(3)); // the failure list entry expires
    let report = cluster.nodes[0].cli(&["sync", "m"]);
    assert_eq!(cluster.nodes[0].copies_on("m", "b"), (8, 0), "{report}");
    for block in 0..8u64 {
        let a_bytes = std::fs::read(cluster.nodes[0].block_file("ram", "m", block)).unwrap();
        let b_bytes = std::fs::read(cluster.nodes[1].block_file("volume", "m", block)).unwrap();
        assert!(a_bytes == b_bytes, "block {block} differs between copies");
        assert!(a_bytes[..64 << 10] == pattern(block, 2)[..]);
    }
}

#[test]
fn a_peer_with_the_wrong_key_is_refused() {
    let dir = TestDir::new();
    let (_etcd, cluster) = common::etcd_cluster_with_wrong_key(dir.path(), 2, 1);
    // The metadata is etcd's; the data path between the two is closed.
    cluster.nodes[0].create_image("x", "1M", "256K", &["b:ram"]);
    let mut c = client(&cluster.nodes[0], "x");
    assert_ne!(
        c.write(0, 0, &[1; 4096]).unwrap(),
        S_OK,
        "a write to a node with another key must fail"
    );
    assert!(
        !cluster.nodes[1].block_file("ram", "x", 0).exists(),
        "b stored nothing"
    );
    // b logs the failure after it sent its Refuse: give it a moment.
    let logged = common::wait_until(Duration::from_secs(5), || {
        cluster.nodes[1].log().contains("handshake")
    });
    assert!(logged, "{}", cluster.nodes[1].log());
}

/// The UKAI use case: a disk's blocks move from node b to node a (where its VM runs) while
/// the VM keeps writing and reading, and b ends up holding nothing.
#[test]
fn move_a_disk_to_the_node_that_uses_it() {
    let dir = TestDir::new();
    let (_etcd, cluster) = common::etcd_cluster(dir.path(), 2);
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);
    a.create_image("vm", "4M", "512K", &["b:volume"]);
    let mut c = client(a, "vm");
    for block in 0..8u64 {
        assert_eq!(c.write(0, block * 1024, &pattern(block, 0)).unwrap(), S_OK);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut round = 0u8;
            while !stop.load(Ordering::Relaxed) {
                round = round.wrapping_add(1);
                for block in 0..8u64 {
                    assert_eq!(
                        c.write(0, block * 1024, &pattern(block, round)).unwrap(),
                        S_OK
                    );
                    let (status, data) = c.read(0, block * 1024, 64 << 10).unwrap();
                    assert_eq!(status, S_OK);
                    assert!(data == pattern(block, round), "block {block} round {round}");
                }
            }
            (c, round)
        })
    };
    a.cli(&["location", "add", "vm", "--at", "a:ram"]);
    a.cli(&["sync", "vm"]);
    a.cli(&["sync", "vm"]);
    assert_eq!(a.copies_on("vm", "a"), (8, 0));
    a.cli(&["location", "rm", "vm", "--at", "b:volume"]);
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let (mut c, round) = writer.join().expect("the guest saw no error");
    assert!(round > 0);
    assert_eq!(a.copies_on("vm", "b"), (0, 0));
    for block in 0..8u64 {
        assert!(
            !b.block_file("volume", "vm", block).exists(),
            "b still holds block {block}"
        );
        let (_, data) = c.read(0, block * 1024, 64 << 10).unwrap();
        assert!(data == pattern(block, round));
    }
    assert!(
        common::wait_until(Duration::from_secs(10), || !b
            .image_dir("volume", "vm")
            .exists()),
        "b keeps files of the image"
    );
}

/// Discards reach every copy: a peer's copy of a discarded block goes there too. With the peer
/// stopped, a discard waits for it (until the peer's timeout) but holds up nothing else: a read
/// submitted after it on the same queue is answered at once. Then the discard succeeds on the
/// copy that took it and the peer's copy goes out of sync.
#[test]
fn discards_reach_every_copy_and_a_stopped_peer_holds_up_only_its_discard() {
    use cormorant_frontend::{BlkRequest, DiscardRange};
    use std::time::Instant;

    let dir = TestDir::new();
    let (_etcd, cluster) = common::etcd_cluster(dir.path(), 2);
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);
    a.create_image("d", "4M", "1M", &["a:ram", "b:ram"]);
    let mut c = client(a, "d");
    for block in 0..4u64 {
        assert_eq!(c.write(0, block * 2048, &pattern(block, 1)).unwrap(), S_OK);
    }
    let whole_block = |block: u64| DiscardRange {
        sector: block * 2048,
        num_sectors: 2048,
        flags: 0,
    };
    assert_eq!(
        c.queue(0).unwrap().discard(&[whole_block(1)]).unwrap(),
        S_OK
    );
    assert!(!a.block_file("ram", "d", 1).exists());
    assert!(!b.block_file("ram", "d", 1).exists(), "b kept block 1");
    assert_eq!(
        c.read(0, 2048, 64 << 10).unwrap(),
        (S_OK, vec![0; 64 << 10])
    );

    b.pause();
    let q = c.queue(0).unwrap();
    let ranges = q.alloc(16).unwrap();
    q.memory()
        .write(ranges.addr, &whole_block(2).to_bytes())
        .unwrap();
    let started = Instant::now();
    let discard = q.submit(&BlkRequest::discard(ranges)).unwrap();
    let buf = q.alloc(64 << 10).unwrap();
    let read = q.submit(&BlkRequest::read(0, buf)).unwrap();
    let read_done = q.wait_for(read, Duration::from_secs(10)).unwrap();
    let read_took = started.elapsed();
    let discard_done = q.wait_for(discard, Duration::from_secs(10)).unwrap();
    let discard_took = started.elapsed();
    b.resume();
    assert_eq!(read_done.status, S_OK);
    let mut data = vec![0; 64 << 10];
    q.memory().read(buf.addr, &mut data).unwrap();
    assert_eq!(data, pattern(0, 1));
    assert!(
        read_took < Duration::from_secs(1) && discard_took >= Duration::from_secs(2),
        "the read took {read_took:?}, the discard {discard_took:?}"
    );
    assert_eq!(discard_done.status, S_OK);
    assert!(!a.block_file("ram", "d", 2).exists());
    assert_eq!(a.copies_on("d", "b").1, 1, "b's copy of block 2 is stale");
}
