//! A network partition, made with a network namespace and a veth pair that the test creates
//! and removes: the cut-off replica is put on the failure list, its copies go stale while the
//! writes go on, and after the partition heals a sync brings it back.
//!
//! The namespace and its addresses: `common::netns`.

mod common;

use std::time::Duration;

use common::netns;
use common::TestDir;
use cormorant_frontend::{BlkClient, ClientOptions};

#[test]
fn a_partitioned_replica_is_failure_listed_and_recovered() {
    let Some(ns) = netns::create_or_skip("part") else {
        return;
    };
    let dir = TestDir::new();
    // b, inside the namespace, reaches etcd through the veth: the cut takes etcd away
    // from it too.
    let (_etcd, _proxy, cluster) = netns::cluster_across(&ns, dir.path(), 3);
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);
    a.create_image("p", "2M", "256K", &["a:ram", "b:ram"]);
    let opts = ClientOptions {
        io_timeout: Duration::from_secs(30),
        ..ClientOptions::default()
    };
    let mut c = BlkClient::connect(a.socket("p"), &opts).unwrap();
    for block in 0..8u64 {
        assert_eq!(c.write(0, block * 512, &[block as u8; 4096]).unwrap(), 0);
    }
    assert!(b.block_file("ram", "p", 7).exists());

    ns.cut(true);
    // Writes go on: b's heartbeat goes unanswered, which puts b on the failure list (about
    // when the first write to b times out); the rest skip b.
    for block in 0..8u64 {
        assert_eq!(
            c.write(0, block * 512, &[0xf0 | block as u8; 4096])
                .unwrap(),
            0
        );
    }
    assert!(
        a.log().contains("peer b: failed"),
        "b should be failure-listed"
    );
    let stale = a.cli(&["image", "info", "p"])["blocks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|blk| blk["locations"][1]["synced"] == false)
        .count();
    assert_eq!(stale, 8, "every block was written while b was cut off");

    ns.cut(false);
    std::thread::sleep(Duration::from_secs(4)); // the failure list entry (3 s) expires
    a.cli(&["sync", "p"]);
    for block in 0..8u64 {
        let here = std::fs::read(a.block_file("ram", "p", block)).unwrap();
        let there = std::fs::read(b.block_file("ram", "p", block)).unwrap();
        assert!(here == there, "block {block} differs after the resync");
        assert_eq!(here[0], 0xf0 | block as u8);
    }
}
