//! Nodes that keep the cluster's metadata in a real 3-member etcd: one owner per image,
//! fenced; lost copies never served; deleted images gone everywhere; one view of the cluster.
//! Driven with the VM-less client; tests/etcd_guests.rs does the same with real guests.

mod common;

use std::time::Duration;

use common::daemon::{Cluster, Daemon};
use common::etcd::EtcdCluster;
use common::{tools_available, wait_until, TestDir};
use cormorant_frontend::{BlkClient, ClientOptions};

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
    Some(common::etcd_cluster(dir.path(), nodes))
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
    for command in [
        &["sync", "one"][..],
        &["location", "add", "one", "--at", "c:ram"][..],
        &["location", "rm", "one", "--at", "b:ram"][..],
    ] {
        let out = c.cli_raw(command);
        assert!(
            !out.status.success(),
            "{command:?} ran on a node that does not own the image"
        );
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("owned by node a"),
            "{command:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
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
        wait_until(Duration::from_secs(10), || b.copies_on("w", "a") == (0, 4)),
        "a's lost copies are still in sync: {:?}",
        b.copies_on("w", "a")
    );
    for round in 0..3 {
        for block in 0..4u64 {
            let (status, data) = client.read(0, block * 2048, 64 << 10).unwrap();
            assert_eq!(status, S_OK, "round {round} block {block}");
            assert!(data == pattern(block, 3), "block {block} lost its data");
        }
    }
    b.cli(&["sync", "w"]);
    assert_eq!(b.copies_on("w", "a"), (4, 0));
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

/// Issue 10, failure 4: copies marked out of sync by the old owner after the new one adopted
/// the image are known to the new owner when it takes over: it never reads the stale copy.
#[test]
fn the_new_owner_sees_what_the_old_one_marked_after_the_adoption() {
    let dir = TestDir::new();
    let Some((_etcd, mut cluster)) = setup(&dir, 3) else {
        return;
    };
    // c's copy is listed first: a reader that trusts it reads there.
    cluster.nodes[0].create_image("s", "4M", "1M", &["c:ram", "a:ram"]);
    let mut on_a = client(&cluster.nodes[0], "s");
    for block in 0..4u64 {
        assert_eq!(
            on_a.write(0, block * 2048, &pattern(block, 1)).unwrap(),
            S_OK
        );
    }
    cluster.nodes[1].cli(&["image", "adopt", "s"]);
    cluster.nodes[2].kill9();
    for block in 0..4u64 {
        assert_eq!(
            on_a.write(0, block * 2048, &pattern(block, 2)).unwrap(),
            S_OK
        );
    }
    assert_eq!(on_a.flush(0).unwrap(), S_OK);
    assert_eq!(cluster.nodes[0].copies_on("s", "c"), (0, 4));
    drop(on_a);
    cluster.nodes[2].start_again(); // c serves its stale copy again
    let b = &cluster.nodes[1];
    let mut on_b = client(b, "s");
    for block in 0..4u64 {
        let (status, data) = on_b.read(0, block * 2048, 64 << 10).unwrap();
        assert_eq!(status, S_OK);
        assert!(
            data == pattern(block, 2),
            "block {block}: stale data from c"
        );
    }
    assert_eq!(b.cli(&["image", "info", "s"])["owner"], "b");
    // The blocks move to b; the good copy is the source, never the stale one.
    assert!(wait_until(Duration::from_secs(30), || {
        let (on_b_synced, _) = b.copies_on("s", "b");
        on_b_synced == 4 && b.copies_on("s", "a") == (0, 0)
    }));
    for block in 0..4u64 {
        let copy = std::fs::read(b.block_file("ram", "s", block)).unwrap();
        assert!(copy[..64 << 10] == pattern(block, 2)[..], "block {block}");
    }
}

/// The owner dies (kill -9): another node adopts the image and serves it as soon as the dead
/// owner's lease runs out; every flushed write is there.
#[test]
fn a_dead_owners_image_is_adopted_after_its_lease() {
    let dir = TestDir::new();
    let Some((_etcd, mut cluster)) = setup(&dir, 2) else {
        return;
    };
    cluster.nodes[0].create_image("d", "4M", "1M", &["a:ram", "b:ram"]);
    let mut on_a = client(&cluster.nodes[0], "d");
    for block in 0..4u64 {
        assert_eq!(
            on_a.write(0, block * 2048, &pattern(block, 5)).unwrap(),
            S_OK
        );
    }
    assert_eq!(on_a.flush(0).unwrap(), S_OK);
    cluster.nodes[0].kill9();
    let killed = std::time::Instant::now();
    let b = &cluster.nodes[1];
    b.cli(&["image", "adopt", "d"]);
    let mut on_b = client(b, "d");
    assert_eq!(on_b.write(0, 4 * 2048 - 8, &[7; 4096]).unwrap(), S_OK);
    let took = killed.elapsed();
    eprintln!("adopted {took:?} after the owner was killed (lease {LEASE_TTL} s)");
    assert!(took < Duration::from_secs(2 * LEASE_TTL + 3), "{took:?}");
    for block in 0..3u64 {
        let (status, data) = on_b.read(0, block * 2048, 64 << 10).unwrap();
        assert_eq!(
            (status, data == pattern(block, 5)),
            (S_OK, true),
            "block {block}"
        );
    }
    assert_eq!(b.cli(&["image", "info", "d"])["owner"], "b");
    // a comes back: it is no longer the owner and does not export the image.
    cluster.nodes[0].start_again();
    let a = &cluster.nodes[0];
    assert!(
        !a.socket("d").exists(),
        "a must not export an image it lost"
    );
    assert_eq!(on_b.write(0, 0, &[8; 4096]).unwrap(), S_OK);
}

/// etcd members die under a writing client: with one gone, writes go on; with the majority
/// gone, writes wait (none is acknowledged without a valid lease) and go on when it is back.
#[test]
fn writes_wait_for_an_etcd_majority_and_go_on_after_it() {
    let dir = TestDir::new();
    let Some((mut etcd, cluster)) = setup(&dir, 2) else {
        return;
    };
    let a = &cluster.nodes[0];
    a.create_image("e", "4M", "1M", &["a:ram", "b:ram"]);
    let mut on_a = client(a, "e");
    assert_eq!(on_a.write(0, 0, &pattern(0, 1)).unwrap(), S_OK);
    etcd.kill(0);
    for block in 0..4u64 {
        assert_eq!(
            on_a.write(0, block * 2048, &pattern(block, 2)).unwrap(),
            S_OK
        );
    }
    etcd.kill(1);
    // The lease cannot be renewed now: a write must wait until etcd is back.
    std::thread::sleep(Duration::from_secs(LEASE_TTL + 1));
    let writer = std::thread::spawn(move || {
        let started = std::time::Instant::now();
        let status = on_a.write(0, 2048, &pattern(1, 3)).unwrap();
        (status, started.elapsed(), on_a)
    });
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        !writer.is_finished(),
        "a write was acknowledged without a valid lease"
    );
    etcd.restart(0);
    etcd.restart(1);
    let (status, waited, mut on_a) = writer.join().unwrap();
    assert_eq!(status, S_OK, "the write goes on once etcd answers");
    assert!(waited >= Duration::from_secs(2), "{waited:?}");
    let (status, data) = on_a.read(0, 2048, 64 << 10).unwrap();
    assert_eq!((status, data == pattern(1, 3)), (S_OK, true));
}

/// The load on etcd: guest I/O writes nothing there (only creation, location changes,
/// failures and resync commits do). Prints the keys and bytes per image for docs/SCALING.md.
#[test]
fn guest_io_writes_nothing_to_etcd() {
    let dir = TestDir::new();
    let Some((etcd, cluster)) = setup(&dir, 2) else {
        return;
    };
    let a = &cluster.nodes[0];
    let revision = || -> i64 {
        let out = etcd.etcdctl(&["endpoint", "status", "--write-out=json"]);
        let status: serde_json::Value = serde_json::from_str(&out).expect("etcdctl json");
        status[0]["Status"]["header"]["revision"].as_i64().unwrap()
    };
    let before_create = revision();
    for i in 0..10 {
        a.create_image(&format!("img{i}"), "20G", "4M", &["a:ram", "b:ram"]);
    }
    let after_create = revision();
    let mut c = client(a, "img0");
    let started = revision();
    for i in 0..500u64 {
        assert_eq!(
            c.write(0, (i * 97 % 4096) * 2048, &pattern(i, 1)).unwrap(),
            S_OK
        );
        if i % 50 == 0 {
            assert_eq!(c.flush(0).unwrap(), S_OK);
        }
    }
    let after_io = revision();
    // Connecting marked the device active (one write); the I/O itself wrote nothing.
    assert!(
        after_io - started <= 1,
        "guest I/O wrote to etcd: {started} -> {after_io}"
    );
    let keys = etcd.etcdctl(&["get", "/cormorant/", "--prefix", "--write-out=json"]);
    let keys: serde_json::Value = serde_json::from_str(&keys).unwrap();
    let kvs = keys["kvs"].as_array().cloned().unwrap_or_default();
    let image_keys: Vec<&serde_json::Value> = kvs
        .iter()
        .filter(|kv| {
            let key = String::from_utf8(base64_decode(kv["key"].as_str().unwrap())).unwrap();
            key.contains("/image/img") || key.contains("/extents/")
        })
        .collect();
    let bytes: usize = image_keys
        .iter()
        .map(|kv| {
            kv["key"].as_str().unwrap().len() * 3 / 4 + kv["value"].as_str().unwrap().len() * 3 / 4
        })
        .sum();
    eprintln!(
        "etcd load: 10 images of 20 GiB (2 copies): {} revisions to create, {} keys, {bytes} bytes of keys and values; 500 guest writes + 10 flushes: {} revisions",
        after_create - before_create,
        image_keys.len(),
        after_io - started
    );
    assert_eq!(
        image_keys.len(),
        10 * 4,
        "one header and 3 extents records per image"
    );
}

fn base64_decode(text: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .expect("etcdctl prints base64")
}

/// A node cut off from etcd stops acknowledging writes before its lease can run out; another
/// node takes the image over once it has; when the cut heals, the old owner's waiting write
/// fails (it lost the image) and nothing it held back is ever acknowledged.
#[test]
fn an_owner_cut_off_from_etcd_stops_acknowledging_within_its_lease() {
    let dir = TestDir::new();
    if !tools_available(&["etcd", "etcdctl"]) {
        return;
    }
    let etcd_dir = dir.path().join("etcd");
    std::fs::create_dir_all(&etcd_dir).unwrap();
    let etcd = EtcdCluster::start(&etcd_dir, 3);
    let first: std::net::SocketAddr = etcd.endpoints()[0]
        .trim_start_matches("http://")
        .parse()
        .unwrap();
    let proxy = common::proxy::Proxy::start(first);
    let endpoints = vec![proxy.url(), etcd.endpoint_arg(), etcd.endpoint_arg()];
    let cluster = Cluster::start_etcd_each(dir.path(), &endpoints, LEASE_TTL);
    let (a, c) = (&cluster.nodes[0], &cluster.nodes[2]);
    a.create_image("p", "4M", "1M", &["a:ram", "c:ram"]);
    let mut on_a = client(a, "p");
    assert_eq!(on_a.write(0, 0, &pattern(0, 1)).unwrap(), S_OK);
    assert_eq!(on_a.flush(0).unwrap(), S_OK);
    proxy.cut();
    let cut = std::time::Instant::now();
    // Writes are acknowledged for a while, then wait: never past the lease.
    let mut last_ack = cut;
    let writer = std::thread::spawn(move || {
        let mut acked = Vec::new();
        for round in 2..240u8 {
            let status = on_a.write(0, 2048, &pattern(1, round)).unwrap();
            if status != S_OK {
                return (acked, Some((round, status)), on_a);
            }
            acked.push((round, std::time::Instant::now()));
            std::thread::sleep(Duration::from_millis(50));
        }
        (acked, None, on_a)
    });
    // c adopts as soon as a's lease has run out in etcd, and writes.
    std::thread::sleep(Duration::from_secs(1));
    c.cli(&["image", "adopt", "p"]);
    let mut on_c = client(c, "p");
    assert_eq!(on_c.write(0, 2048, &pattern(1, 250)).unwrap(), S_OK);
    let took_over = cut.elapsed();
    proxy.heal();
    let (acked, failed, _on_a) = writer.join().unwrap();
    if let Some(&(_, at)) = acked.last() {
        last_ack = at;
    }
    let acked_for = last_ack.duration_since(cut);
    eprintln!(
        "a acknowledged writes for {acked_for:?} after the cut; c took over after {took_over:?}"
    );
    assert!(
        acked_for < Duration::from_secs(LEASE_TTL),
        "a acknowledged a write {acked_for:?} after it lost etcd"
    );
    assert!(
        took_over >= acked_for,
        "c took over before a stopped acknowledging"
    );
    let (round, status) = failed.expect("a's held-back write must fail, not succeed");
    assert_eq!(status, S_IOERR, "round {round}");
    let (status, data) = on_c.read(0, 2048, 64 << 10).unwrap();
    assert_eq!((status, data == pattern(1, 250)), (S_OK, true));
    assert_eq!(c.cli(&["image", "info", "p"])["owner"], "c");
}

/// An owner cut off from etcd and from the other copy's node at once: its write reaches only
/// its own copy, and the other copy's out-of-sync mark cannot be recorded, so the guest gets
/// an I/O error. The mark is kept and recorded as soon as etcd answers again; a sync then
/// makes the copies agree (before, both stayed "in sync" with different bytes).
#[test]
fn a_mark_etcd_missed_is_recorded_when_it_is_back() {
    let dir = TestDir::new();
    if !tools_available(&["etcd", "etcdctl"]) {
        return;
    }
    let etcd = common::start_etcd(dir.path());
    let first: std::net::SocketAddr = etcd.endpoints()[0]
        .trim_start_matches("http://")
        .parse()
        .unwrap();
    let proxy = common::proxy::Proxy::start(first);
    // A long lease: it outlives the cut, so a stays the owner.
    let endpoints = vec![proxy.url(), etcd.endpoint_arg()];
    let cluster = Cluster::start_etcd_each(dir.path(), &endpoints, 30);
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);
    a.create_image("m", "4M", "1M", &["a:ram", "b:ram"]);
    let mut on_a = client(a, "m");
    assert_eq!(on_a.write(0, 0, &pattern(0, 1)).unwrap(), S_OK);
    assert_eq!(on_a.flush(0).unwrap(), S_OK);
    proxy.cut();
    b.pause();
    let status = on_a.write(0, 0, &pattern(0, 2)).unwrap();
    assert_eq!(status, S_IOERR, "b missed it and etcd could not be told");
    proxy.heal();
    b.resume();
    assert!(
        wait_until(Duration::from_secs(20), || a.copies_on("m", "b").1 == 1),
        "the mark was never recorded: {:?}",
        a.copies_on("m", "b")
    );
    let report = a.cli(&["sync", "m"]);
    assert_eq!(report["left"], 0, "{report}");
    let on_a_copy = std::fs::read(a.block_file("ram", "m", 0)).unwrap();
    let on_b_copy = std::fs::read(b.block_file("ram", "m", 0)).unwrap();
    assert!(on_a_copy == on_b_copy, "the copies still differ");
}

/// A holder's host loses power while its daemon runs: writes it took but had not flushed may
/// be gone from its volume tier. At its next start (another boot) it reports those copies;
/// the owner marks them out of sync where another copy has the data, and a sync repairs them.
#[test]
fn volume_copies_after_a_power_loss_are_resynced_not_trusted() {
    let dir = TestDir::new();
    let Some((_etcd, mut cluster)) = setup(&dir, 2) else {
        return;
    };
    cluster.nodes[0].create_image("v", "4M", "1M", &["a:ram", "b:volume"]);
    let mut on_a = client(&cluster.nodes[0], "v");
    for block in 0..4u64 {
        assert_eq!(
            on_a.write(0, block * 2048, &pattern(block, 1)).unwrap(),
            S_OK
        );
    }
    assert_eq!(on_a.flush(0).unwrap(), S_OK);
    assert_eq!(on_a.write(0, 0, &pattern(0, 2)).unwrap(), S_OK); // never flushed
    let b = &mut cluster.nodes[1];
    b.kill9();
    // The power loss: b's page cache held the unflushed write, its disk did not.
    let file = b.block_file("volume", "v", 0);
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[..64 << 10].copy_from_slice(&pattern(0, 1));
    std::fs::write(&file, bytes).unwrap();
    b.env
        .push(("CORMORANT_BOOT_ID".into(), "another-boot".into()));
    b.start_again();
    let a = &cluster.nodes[0];
    assert!(
        wait_until(Duration::from_secs(10), || a.copies_on("v", "b") == (0, 4)),
        "b's volume copies are still trusted: {:?}",
        a.copies_on("v", "b")
    );
    assert_eq!(a.cli(&["sync", "v"])["left"], 0);
    let on_b = std::fs::read(cluster.nodes[1].block_file("volume", "v", 0)).unwrap();
    assert!(
        on_b[..64 << 10] == pattern(0, 2)[..],
        "b's copy was not repaired"
    );
    // A clean stop and start on the same boot trusts everything again.
    let b = &mut cluster.nodes[1];
    assert!(b.terminate());
    b.start_again();
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(cluster.nodes[0].copies_on("v", "b"), (4, 0));
}

/// With `--peer-encrypt` on every node, remote reads and writes work as without (the frames
/// are ChaCha20-Poly1305 instead of tagged; tests/peer_transport.rs checks the wire).
#[test]
fn encrypted_peers_serve_remote_copies() {
    let dir = TestDir::new();
    if !tools_available(&["etcd", "etcdctl"]) {
        return;
    }
    let etcd = common::start_etcd(dir.path());
    let cluster =
        Cluster::start_etcd_with(dir.path(), 2, &etcd.endpoint_arg(), &["--peer-encrypt"]);
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);
    a.create_image("x", "4M", "1M", &["b:ram"]);
    let mut on_a = client(a, "x");
    for block in 0..4u64 {
        assert_eq!(
            on_a.write(0, block * 2048, &pattern(block, 4)).unwrap(),
            S_OK
        );
    }
    for block in 0..4u64 {
        let (status, data) = on_a.read(0, block * 2048, 64 << 10).unwrap();
        assert_eq!((status, data == pattern(block, 4)), (S_OK, true));
    }
    assert!(b.block_file("ram", "x", 3).exists());
}

/// Issue 11: a remote read whose copy fails goes to the next in-sync copy; the guest never
/// sees the failure.
#[test]
fn a_failed_remote_read_falls_back_to_the_next_copy() {
    let dir = TestDir::new();
    let Some((_etcd, mut cluster)) = setup(&dir, 3) else {
        return;
    };
    cluster.nodes[1].create_image("f", "4M", "1M", &["a:ram", "c:ram"]);
    let mut client = client(&cluster.nodes[1], "f");
    for block in 0..4u64 {
        assert_eq!(
            client.write(0, block * 2048, &pattern(block, 5)).unwrap(),
            S_OK
        );
    }
    // Reads go to a (the first in-sync copy) until it fails.
    let (status, _) = client.read(0, 0, 4096).unwrap();
    assert_eq!(status, S_OK);
    cluster.nodes[0].kill9();
    for block in 0..4u64 {
        let (status, data) = client.read(0, block * 2048, 64 << 10).unwrap();
        assert_eq!(status, S_OK, "block {block}");
        assert!(data == pattern(block, 5), "block {block}");
    }
    let log = cluster.nodes[1].log();
    assert!(
        log.contains("reading from c instead"),
        "no read fell back to c:\n{log}"
    );
}
