//! Nodes that keep the cluster's metadata in a real 3-member etcd: one owner per image,
//! fenced; lost copies never served; deleted images gone everywhere; one view of the cluster.
//! Driven with the VM-less client; tests/etcd_guests.rs does the same with real guests.

mod common;

use std::time::Duration;

use common::daemon::{Cluster, Daemon};
use common::etcd::EtcdCluster;
use common::{tools_available, wait_until, TestDir};
use cormorant::frontend::{BlkClient, ClientOptions};

const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
/// Short leases keep the tests quick; the default is 10 s.
const LEASE_TTL: u64 = 3;

fn client(node: &Daemon, image: &str) -> BlkClient {
    BlkClient::connect(node.socket(image), &ClientOptions::default()).expect("connect")
}

fn pattern(block: u64, round: u8) -> Vec<u8> {
    (0..64 << 10)
        .map(|i: u32| (i as u8) ^ (block as u8).wrapping_mul(7) ^ round)
        .collect()
}

fn setup(dir: &TestDir, nodes: usize) -> Option<(EtcdCluster, Cluster)> {
    if !tools_available(&["etcd", "etcdctl"]) {
        return None;
    }
    let etcd_dir = dir.path().join("etcd");
    std::fs::create_dir_all(&etcd_dir).unwrap();
    let etcd = EtcdCluster::start(&etcd_dir, 3);
    let cluster = Cluster::start_etcd(dir.path(), nodes, &etcd.endpoint_arg(), LEASE_TTL);
    Some((etcd, cluster))
}

/// (in-sync, out-of-sync) copies of `image` on node `on`, as the cluster records them.
fn copies_on(node: &Daemon, image: &str, on: &str) -> (usize, usize) {
    let info = node.cli(&["image", "info", image]);
    let mut counts = (0, 0);
    for block in info["blocks"].as_array().unwrap() {
        for l in block["locations"].as_array().unwrap() {
            if l["node"] == on {
                if l["synced"].as_bool().unwrap() {
                    counts.0 += 1;
                } else {
                    counts.1 += 1;
                }
            }
        }
    }
    counts
}

#[test]
fn every_node_sees_every_image_and_node() {
    let dir = TestDir::new();
    let Some((_etcd, cluster)) = setup(&dir, 3) else {
        return;
    };
    let (a, b, c) = (&cluster.nodes[0], &cluster.nodes[1], &cluster.nodes[2]);
    a.create_image("one", "4M", "1M", &["a:ram", "b:ram"]);
    b.create_image("two", "4M", "1M", &["c:volume"]);
    for node in [a, b, c] {
        let list = node.cli(&["image", "list"]);
        let owners: Vec<(String, String)> = list
            .as_array()
            .unwrap()
            .iter()
            .map(|i| {
                (
                    i["name"].as_str().unwrap().to_string(),
                    i["owner"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        assert_eq!(
            owners,
            vec![("one".into(), "a".into()), ("two".into(), "b".into())]
        );
        let nodes = node.cli(&["node", "list"]);
        assert_eq!(nodes.as_array().unwrap().len(), 3, "{nodes}");
    }
    // A node that does not own the image names its owner.
    let out = c.cli_raw(&["image", "rm", "one"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("owned by node a"));
    // Names are unique in the cluster.
    let out = c.cli_raw(&["image", "create", "one", "--size", "1M"]);
    assert!(!out.status.success());
}

#[test]
fn remote_copies_are_read_and_written_through_etcd_metadata() {
    let dir = TestDir::new();
    let Some((_etcd, cluster)) = setup(&dir, 2) else {
        return;
    };
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);
    a.create_image("r", "4M", "1M", &["b:ram"]);
    let mut client = client(a, "r");
    for block in 0..4u64 {
        assert_eq!(
            client.write(0, block * 2048, &pattern(block, 1)).unwrap(),
            S_OK
        );
    }
    assert_eq!(client.flush(0).unwrap(), S_OK);
    for block in 0..4u64 {
        let (status, data) = client.read(0, block * 2048, 64 << 10).unwrap();
        assert_eq!(status, S_OK);
        assert!(data == pattern(block, 1), "block {block}");
        assert!(b.block_file("ram", "r", block).exists(), "held on b");
        assert!(!a.block_file("ram", "r", block).exists(), "nothing on a");
    }
}

/// Issue 10, failure 3: a deleted image's bytes never reach a new image of the same name,
/// also on a holder that was down when the image was removed.
#[test]
fn a_removed_image_is_gone_everywhere_and_never_read_by_its_successor() {
    let dir = TestDir::new();
    let Some((_etcd, mut cluster)) = setup(&dir, 3) else {
        return;
    };
    cluster.nodes[0].create_image("t", "4M", "1M", &["b:ram", "c:ram"]);
    {
        let mut client = client(&cluster.nodes[0], "t");
        for block in 0..4u64 {
            assert_eq!(
                client.write(0, block * 2048, &pattern(block, 9)).unwrap(),
                S_OK
            );
        }
        assert_eq!(client.flush(0).unwrap(), S_OK);
    }
    let b_dir = cluster.nodes[1].image_dir("ram", "t");
    let c_dir = cluster.nodes[2].image_dir("ram", "t");
    assert!(b_dir.exists() && c_dir.exists());
    cluster.nodes[2].kill9();
    cluster.nodes[0].cli(&["image", "rm", "t"]);
    assert!(
        wait_until(Duration::from_secs(5), || !b_dir.exists()),
        "b keeps the removed image's files"
    );
    assert!(c_dir.exists(), "c was down");
    cluster.nodes[0].create_image("t", "4M", "1M", &["b:ram", "c:ram"]);
    cluster.nodes[2].start_again();
    assert!(
        wait_until(Duration::from_secs(10), || !c_dir.exists()),
        "c kept the removed image's files after its restart"
    );
    let mut client = client(&cluster.nodes[0], "t");
    assert_eq!(client.write(0, 8, &[0x5a; 4096]).unwrap(), S_OK);
    for block in 0..4u64 {
        let (status, data) = client.read(0, block * 2048, 64 << 10).unwrap();
        assert_eq!(status, S_OK);
        let mut expected = vec![0u8; 64 << 10];
        if block == 0 {
            expected[4096..8192].fill(0x5a);
        }
        assert!(data == expected, "block {block} shows old bytes");
    }
}

/// Issue 10, failure 2: a holder whose RAM tier was wiped (a host reboot) never serves its
/// copies as data: the owner marks them out of sync and reads the other copy.
#[test]
fn a_wiped_ram_holder_is_never_read_as_in_sync() {
    let dir = TestDir::new();
    let Some((_etcd, mut cluster)) = setup(&dir, 3) else {
        return;
    };
    cluster.nodes[1].create_image("w", "4M", "1M", &["a:ram", "c:ram"]);
    let mut client = client(&cluster.nodes[1], "w");
    for block in 0..4u64 {
        assert_eq!(
            client.write(0, block * 2048, &pattern(block, 3)).unwrap(),
            S_OK
        );
    }
    assert_eq!(client.flush(0).unwrap(), S_OK);
    cluster.nodes[0].kill9();
    std::fs::remove_dir_all(&cluster.nodes[0].ram_dir).unwrap();
    cluster.nodes[0].start_again();
    let b = &cluster.nodes[1];
    assert!(
        wait_until(Duration::from_secs(10), || copies_on(b, "w", "a") == (0, 4)),
        "a's lost copies are still in sync: {:?}",
        copies_on(b, "w", "a")
    );
    for round in 0..3 {
        for block in 0..4u64 {
            let (status, data) = client.read(0, block * 2048, 64 << 10).unwrap();
            assert_eq!(status, S_OK, "round {round} block {block}");
            assert!(data == pattern(block, 3), "block {block} lost its data");
        }
    }
    b.cli(&["sync", "w"]);
    assert_eq!(copies_on(b, "w", "a"), (4, 0));
    let a_copy = std::fs::read(cluster.nodes[0].block_file("ram", "w", 2)).unwrap();
    assert!(a_copy[..64 << 10] == pattern(2, 3)[..]);
}

/// Issue 10, failure 1: two nodes adopt one image and each starts a guest on it: exactly one
/// wins the take-over; the other's guest gets I/O errors, and nothing it wrote is stored.
#[test]
fn two_adopters_one_owner() {
    let dir = TestDir::new();
    let Some((_etcd, cluster)) = setup(&dir, 3) else {
        return;
    };
    let (a, b, c) = (&cluster.nodes[0], &cluster.nodes[1], &cluster.nodes[2]);
    a.create_image("two", "4M", "1M", &["a:ram"]);
    {
        let mut first = client(a, "two");
        assert_eq!(first.write(0, 0, &pattern(0, 1)).unwrap(), S_OK);
        assert_eq!(first.flush(0).unwrap(), S_OK);
    } // a's guest stops: its device is no longer active there.
    assert!(wait_until(Duration::from_secs(5), || {
        a.log().contains("device stopped") || a.log().contains("frontend disconnected")
    }));
    b.cli(&["image", "adopt", "two"]);
    c.cli(&["image", "adopt", "two"]);
    let mut on_b = client(b, "two");
    let mut on_c = client(c, "two");
    let status_b = on_b.write(0, 2048, &pattern(1, 2)).unwrap();
    let status_c = on_c.write(0, 2048, &pattern(1, 3)).unwrap();
    assert!(
        (status_b == S_OK) != (status_c == S_OK),
        "exactly one writer may win: b {status_b}, c {status_c}"
    );
    let (winner, loser, won) = if status_b == S_OK {
        (&mut on_b, &mut on_c, 2)
    } else {
        (&mut on_c, &mut on_b, 3)
    };
    for _ in 0..3 {
        assert_eq!(loser.write(0, 4096, &pattern(2, 9)).unwrap(), S_IOERR);
        assert_eq!(loser.read(0, 0, 4096).unwrap().0, S_IOERR);
    }
    let (status, data) = winner.read(0, 2048, 64 << 10).unwrap();
    assert_eq!((status, data == pattern(1, won)), (S_OK, true));
    let (status, data) = winner.read(0, 4096, 64 << 10).unwrap();
    assert_eq!(
        (status, data == vec![0; 64 << 10]),
        (S_OK, true),
        "the loser's write landed"
    );
    let (status, data) = winner.read(0, 0, 64 << 10).unwrap();
    assert_eq!((status, data == pattern(0, 1)), (S_OK, true));
}
