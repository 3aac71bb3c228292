//! Cache copies of remote blocks (issue 12 part 2): a node that serves an image keeps what it
//! read from other nodes, serves it back, drops it on its own writes, never exceeds its
//! budget, and never serves it once another node could have written the image.
//! Driven with the VM-less client against nodes keeping their metadata in a real etcd.

mod common;

use std::time::Duration;

use common::daemon::{Cluster, Daemon};
use common::etcd::EtcdCluster;
use common::guest::{Disk as GuestDisk, Guest, GuestOpts, GuestOutput};
use common::{tools_available, wait_until, TestDir};
use cormorant_frontend::{BlkClient, ClientOptions, DiscardRange};

const S_OK: u8 = 0;
/// 64 KiB per block written and read back (blocks are 1 MiB).
const PART: u32 = 64 << 10;

fn client(node: &Daemon, image: &str) -> BlkClient {
    BlkClient::connect(node.socket(image), &ClientOptions::default()).expect("connect")
}

fn pattern(block: u64, round: u8) -> Vec<u8> {
    (0..PART)
        .map(|i: u32| (i as u8) ^ (block as u8).wrapping_mul(7) ^ round.wrapping_mul(13))
        .collect()
}

fn setup(dir: &TestDir, nodes: usize, extra: &[&str]) -> Option<(EtcdCluster, Cluster)> {
    if !tools_available(&["etcd", "etcdctl"]) {
        return None;
    }
    let etcd = common::start_etcd(dir.path());
    let cluster = Cluster::start_etcd_with(dir.path(), nodes, &etcd.endpoint_arg(), extra);
    Some((etcd, cluster))
}

fn cache_stats(node: &Daemon, image: &str) -> serde_json::Value {
    node.cli(&["stats", image])["cache"].clone()
}

fn count(stats: &serde_json::Value, key: &str) -> u64 {
    stats[key]
        .as_u64()
        .unwrap_or_else(|| panic!("no {key} in {stats}"))
}

/// Block files in the node's RAM-tier cache, over all images.
fn cache_files(node: &Daemon) -> usize {
    let Ok(images) = std::fs::read_dir(node.ram_dir.join(".cache")) else {
        return 0;
    };
    images
        .flatten()
        .map(|d| std::fs::read_dir(d.path()).map_or(0, |f| f.count()))
        .sum()
}

fn write_blocks(client: &mut BlkClient, blocks: u64, round: u8) {
    for block in 0..blocks {
        let status = client
            .write(0, block * 2048, &pattern(block, round))
            .unwrap();
        assert_eq!(status, S_OK, "write block {block}");
    }
    assert_eq!(client.flush(0).unwrap(), S_OK);
}

fn check_blocks(client: &mut BlkClient, blocks: u64, round: u8) {
    for block in 0..blocks {
        let (status, data) = client.read(0, block * 2048, PART).unwrap();
        assert_eq!(status, S_OK, "read block {block}");
        assert!(data == pattern(block, round), "block {block}: wrong data");
    }
}

#[test]
fn remote_reads_are_cached_and_the_owners_writes_drop_them() {
    let dir = TestDir::new();
    let Some((_etcd, cluster)) = setup(&dir, 2, &[]) else {
        return;
    };
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);
    a.create_image("c", "4M", "1M", &["b:ram"]);
    a.cli(&["image", "set", "c", "--cache", "ram", "--cache-size", "2M"]);
    assert_eq!(a.cli(&["image", "info", "c"])["qos"]["cache"], "ram");
    let mut guest = client(a, "c");
    write_blocks(&mut guest, 4, 1);
    check_blocks(&mut guest, 4, 1); // misses: fills
    let cold = cache_stats(a, "c");
    assert_eq!(count(&cold, "hits"), 0, "{cold}");
    assert_eq!(count(&cold, "used"), 4 * u64::from(PART), "{cold}");
    check_blocks(&mut guest, 4, 1); // hits
    let warm = cache_stats(a, "c");
    assert_eq!(count(&warm, "hits"), 4, "{warm}");
    assert_eq!(count(&warm, "misses"), count(&cold, "misses"), "{warm}");
    // The cache is node-private: nothing of it reaches the image's locations.
    let info = a.cli(&["image", "info", "c"]);
    for block in info["blocks"].as_array().unwrap() {
        for location in block["locations"].as_array().unwrap() {
            assert_eq!(
                location["node"], "b",
                "a cache copy became a location: {info}"
            );
        }
    }
    assert!(!a.block_file("ram", "c", 0).exists());

    // The owner writes a cached block: the next read sees the new data, not the cache.
    assert_eq!(guest.write(0, 2 * 2048, &pattern(2, 2)).unwrap(), S_OK);
    let (status, data) = guest.read(0, 2 * 2048, PART).unwrap();
    assert_eq!((status, data == pattern(2, 2)), (S_OK, true));
    // A discard of a cached block reads back as zeros.
    let range = DiscardRange {
        sector: 3 * 2048,
        num_sectors: PART / 512,
        flags: 0,
    };
    assert_eq!(guest.write_zeroes(0, &[range]).unwrap(), S_OK);
    let (status, data) = guest.read(0, 3 * 2048, PART).unwrap();
    assert_eq!((status, data == vec![0; PART as usize]), (S_OK, true));
    let (status, data) = guest.read(0, 3 * 2048, PART).unwrap();
    assert_eq!(
        (status, data == vec![0; PART as usize]),
        (S_OK, true),
        "cached zeros"
    );

    // Off: nothing is kept, reads go to b every time.
    a.cli(&["image", "set", "c", "--cache", "off"]);
    let before = cache_stats(a, "c");
    assert_eq!(count(&before, "used"), 0, "{before}");
    assert_eq!(
        b.cli(&["image", "info", "c"])["qos"]["cache"],
        "off",
        "the setting is the image's, in etcd"
    );
    check_blocks(&mut guest, 2, 1);
    let after = cache_stats(a, "c");
    assert_eq!(count(&after, "hits"), count(&before, "hits"));
    assert_eq!(count(&after, "used"), 0);
}

#[test]
fn a_small_budget_is_never_exceeded_and_data_stays_right() {
    let dir = TestDir::new();
    let budget: u64 = 256 << 10;
    let Some((_etcd, cluster)) = setup(&dir, 2, &["--cache-budget-ram", "256K"]) else {
        return;
    };
    let a = &cluster.nodes[0];
    a.create_image("e", "8M", "1M", &["b:ram"]);
    a.cli(&["image", "set", "e", "--cache", "ram"]);
    let mut guest = client(a, "e");
    write_blocks(&mut guest, 8, 3);
    for pass in 0..2 {
        for block in 0..8u64 {
            let (status, data) = guest.read(0, block * 2048, PART).unwrap();
            assert_eq!(status, S_OK);
            assert!(data == pattern(block, 3), "pass {pass} block {block}");
            let stats = cache_stats(a, "e");
            assert!(count(&stats, "used") <= budget, "over the budget: {stats}");
        }
    }
    let stats = cache_stats(a, "e");
    assert_eq!(count(&stats, "used"), budget, "the budget is used: {stats}");
    // The least recently used went: the last four blocks read are the ones cached, each in
    // a file of its own (evicted ones are unlinked).
    let hits = count(&stats, "hits");
    for block in 4..8u64 {
        let (status, data) = guest.read(0, block * 2048, PART).unwrap();
        assert_eq!((status, data == pattern(block, 3)), (S_OK, true));
    }
    assert_eq!(count(&cache_stats(a, "e"), "hits"), hits + 4);
    assert_eq!(cache_files(a), 4);
}

/// The image moves to b and back: a must not serve what it cached before b wrote.
#[test]
fn a_node_that_lost_the_image_never_serves_its_old_cache() {
    let dir = TestDir::new();
    let Some((_etcd, cluster)) = setup(&dir, 3, &[]) else {
        return;
    };
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);
    a.create_image("m", "4M", "1M", &["c:ram"]);
    a.cli(&["image", "set", "m", "--cache", "ram"]);
    {
        let mut on_a = client(a, "m");
        write_blocks(&mut on_a, 4, 1);
        check_blocks(&mut on_a, 4, 1);
        check_blocks(&mut on_a, 4, 1);
        assert_eq!(count(&cache_stats(a, "m"), "hits"), 4);
    }
    assert!(wait_until(Duration::from_secs(5), || {
        a.log().contains("device stopped") || a.log().contains("frontend disconnected")
    }));
    b.cli(&["image", "adopt", "m"]);
    {
        let mut on_b = client(b, "m");
        write_blocks(&mut on_b, 4, 2);
        check_blocks(&mut on_b, 4, 2);
        assert_eq!(
            b.cli(&["stats", "m"])["cache"]["mode"],
            "ram",
            "the setting moved"
        );
    }
    // a lost the image (and holds no copy of it, so it closes it): its cache files are gone.
    assert!(
        wait_until(Duration::from_secs(10), || cache_files(a) == 0),
        "a kept its cache after it lost the image"
    );
    assert!(wait_until(Duration::from_secs(5), || {
        b.log().contains("device stopped") || b.log().contains("frontend disconnected")
    }));
    a.cli(&["image", "adopt", "m"]);
    let mut on_a = client(a, "m");
    check_blocks(&mut on_a, 4, 2);
    assert_eq!(a.cli(&["image", "info", "m"])["owner"], "a");
}

/// As above, but a keeps copies (a stripe member: a take-over does not gather a striped
/// image's blocks on the new owner), so it keeps the image open, and the same cache, while b
/// owns it: only the fence and the owner epoch keep its old cache from being served.
#[test]
fn a_node_that_keeps_a_copy_never_serves_its_old_cache() {
    let dir = TestDir::new();
    let Some((_etcd, cluster)) = setup(&dir, 3, &[]) else {
        return;
    };
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);
    a.cli(&[
        "image",
        "create",
        "k",
        "--size",
        "4M",
        "--block-size",
        "1M",
        "--stripe",
        "a:volume,c:ram",
    ]);
    a.cli(&["image", "set", "k", "--cache", "ram"]);
    {
        let mut on_a = client(a, "k");
        write_blocks(&mut on_a, 4, 1);
        check_blocks(&mut on_a, 4, 1);
        check_blocks(&mut on_a, 4, 1);
        // a's stripe member's blocks are read from its own copies, c's from the cache.
        assert_eq!(count(&cache_stats(a, "k"), "hits"), 2);
    }
    assert!(cache_files(a) > 0);
    assert!(wait_until(Duration::from_secs(5), || {
        a.log().contains("device stopped") || a.log().contains("frontend disconnected")
    }));
    b.cli(&["image", "adopt", "k"]);
    {
        let mut on_b = client(b, "k");
        write_blocks(&mut on_b, 4, 2);
        check_blocks(&mut on_b, 4, 2);
    }
    // a still holds the image (its stripe member) but was fenced: its cache is dropped.
    assert!(
        wait_until(Duration::from_secs(10), || cache_files(a) == 0),
        "a kept its cache after it lost the image"
    );
    assert!(wait_until(Duration::from_secs(5), || {
        b.log().contains("device stopped") || b.log().contains("frontend disconnected")
    }));
    // Taken back: a (fenced while it kept the image open) opens it again as a new instance
    // and serves b's data, never what it cached before.
    a.cli(&["image", "adopt", "k"]);
    let mut on_a = client(a, "k");
    for _ in 0..2 {
        for block in 0..4u64 {
            let (status, data) = on_a.read(0, block * 2048, PART).unwrap();
            assert_eq!(
                status, S_OK,
                "block {block}: a does not serve the image again"
            );
            assert!(
                data == pattern(block, 2),
                "block {block}: a served old data"
            );
        }
    }
}

/// A guest reading sequentially: read-ahead brings the next bytes into the cache before it
/// asks, and the data is right.
#[test]
fn sequential_reads_are_read_ahead() {
    let dir = TestDir::new();
    let Some((_etcd, cluster)) = setup(&dir, 2, &[]) else {
        return;
    };
    let a = &cluster.nodes[0];
    a.create_image("s", "8M", "1M", &["b:ram"]);
    a.cli(&["image", "set", "s", "--cache", "ram"]);
    let mut guest = client(a, "s");
    let chunks = (8u64 << 20) / u64::from(PART);
    for chunk in 0..chunks {
        let sector = chunk * u64::from(PART) / 512;
        assert_eq!(guest.write(0, sector, &pattern(chunk, 4)).unwrap(), S_OK);
    }
    assert_eq!(guest.flush(0).unwrap(), S_OK);
    for chunk in 0..chunks {
        let sector = chunk * u64::from(PART) / 512;
        let (status, data) = guest.read(0, sector, PART).unwrap();
        assert_eq!(status, S_OK);
        assert!(data == pattern(chunk, 4), "chunk {chunk}: wrong data");
        // Give read-ahead a moment, as a guest's own work between reads would.
        std::thread::sleep(Duration::from_millis(2));
    }
    let stats = cache_stats(a, "s");
    assert!(count(&stats, "readahead_bytes") > 0, "{stats}");
    assert!(count(&stats, "readahead_hits") > chunks / 2, "{stats}");
    assert!(count(&stats, "hits") > chunks / 2, "{stats}");
    // Back to back, with nothing cached: reads that find their bytes still on the way
    // wait for read-ahead's transfer instead of asking again.
    a.cli(&["image", "set", "s", "--cache", "off"]);
    a.cli(&["image", "set", "s", "--cache", "ram"]);
    let ahead_before = count(&cache_stats(a, "s"), "readahead_hits");
    for chunk in 0..chunks {
        let sector = chunk * u64::from(PART) / 512;
        let (status, data) = guest.read(0, sector, PART).unwrap();
        assert_eq!(status, S_OK);
        assert!(
            data == pattern(chunk, 4),
            "chunk {chunk}: wrong data, back to back"
        );
    }
    let stats = cache_stats(a, "s");
    assert!(
        count(&stats, "readahead_hits") > ahead_before + chunks / 2,
        "{stats}"
    );
    // Random reads do not read ahead.
    a.cli(&["image", "set", "s", "--cache", "off"]);
    a.cli(&["image", "set", "s", "--cache", "ram"]);
    let before = count(&cache_stats(a, "s"), "readahead_bytes");
    for chunk in [9u64, 3, 77, 40, 12, 100, 5] {
        let sector = chunk * u64::from(PART) / 512;
        let (status, data) = guest.read(0, sector, PART).unwrap();
        assert_eq!((status, data == pattern(chunk, 4)), (S_OK, true));
    }
    assert_eq!(count(&cache_stats(a, "s"), "readahead_bytes"), before);
}

/// Writes 256 KiB chunks `first..=last` with `tag` from a real guest (as tests/etcd_guests.rs
/// does); `RESULT write_errors=N`.
fn guest_write(first: u32, last: u32, tag: u32) -> String {
    format!(
        r#"
tag={tag}; errors=0
for i in $(seq {first} {last}); do
  printf "%0262144d" $((i*1000+tag)) > /tmp/c
  dd if=/tmp/c of=/dev/vda bs=64k seek=$((i*4)) oflag=direct conv=fsync 2>/dev/null || errors=$((errors+1))
done
echo "RESULT write_errors=$errors"
"#
    )
}

/// Checks chunks `first..=last` against `tag`, reading each 64 KiB at a time with O_DIRECT;
/// `RESULT NAME=N` counts the bad ones.
fn guest_check(name: &str, first: u32, last: u32, tag: u32) -> String {
    format!(
        r#"
tag={tag}; bad=0
for i in $(seq {first} {last}); do
  printf "%0262144d" $((i*1000+tag)) > /tmp/c
  want=$(md5sum < /tmp/c | cut -d' ' -f1)
  got=$(dd if=/dev/vda bs=64k skip=$((i*4)) count=4 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
  [ "$got" = "$want" ] || bad=$((bad+1))
done
echo "RESULT {name}=$bad"
"#
    )
}

fn boot(dir: &TestDir, name: &str, node: &Daemon, image: &str, script: &str) -> GuestOutput {
    let out = Guest::run(
        &GuestOpts::new(dir.join(name), script)
            .disk(GuestDisk::new(node.socket(image)))
            .timeout(Duration::from_secs(300)),
    );
    out.expect_ok();
    out
}

fn wait_stopped(node: &Daemon) {
    assert!(wait_until(Duration::from_secs(10), || {
        node.log().contains("device stopped") || node.log().contains("frontend disconnected")
    }));
}

/// Real guests read an image whose blocks are all on another node: with the cache on (a
/// warm second pass served from it, the owner's own writes never read back stale, a
/// sequential read read ahead), after the image moved to another owner, and with it off.
#[test]
fn guests_read_remote_blocks_with_the_cache_on_and_off() {
    if !tools_available(&["qemu-system-x86_64"]) {
        return;
    }
    let dir = TestDir::new();
    let Some((_etcd, cluster)) = setup(&dir, 3, &[]) else {
        return;
    };
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);
    a.create_image("g", "8M", "1M", &["c:ram"]);
    a.cli(&["image", "set", "g", "--cache", "ram"]);
    let script = [
        guest_write(0, 15, 1),
        guest_check("cold", 0, 15, 1),
        guest_check("warm", 0, 15, 1),
        guest_write(4, 7, 2),
        guest_check("old", 0, 3, 1),
        guest_check("new", 4, 7, 2),
        guest_check("rest", 8, 15, 1),
        // One sequential pass over the whole disk, in 128 KiB reads.
        "dd if=/dev/vda of=/dev/null bs=128k iflag=direct 2>/dev/null; echo \"RESULT seq=$?\"\n"
            .to_string(),
    ]
    .concat();
    let out = boot(&dir, "on", a, "g", &script);
    for key in ["write_errors", "cold", "warm", "old", "new", "rest", "seq"] {
        assert_eq!(out.value(key), Some("0"), "{key}: {}", out.console);
    }
    let stats = cache_stats(a, "g");
    assert!(
        count(&stats, "hits") >= 64,
        "the warm pass was not served: {stats}"
    );
    assert!(count(&stats, "readahead_hits") > 0, "{stats}");
    wait_stopped(a);

    // The image moves to b, whose guest overwrites some chunks; then back to a, cache off.
    b.cli(&["image", "adopt", "g"]);
    let out = boot(
        &dir,
        "moved",
        b,
        "g",
        &[guest_write(0, 3, 3), guest_check("moved", 0, 3, 3)].concat(),
    );
    assert_eq!(out.value("moved"), Some("0"), "{}", out.console);
    wait_stopped(b);
    b.cli(&["image", "set", "g", "--cache", "off"]);
    a.cli(&["image", "adopt", "g"]);
    let script = [
        guest_check("back", 0, 3, 3),
        guest_check("new", 4, 7, 2),
        guest_check("rest", 8, 15, 1),
    ]
    .concat();
    let out = boot(&dir, "off", a, "g", &script);
    for key in ["back", "new", "rest"] {
        assert_eq!(out.value(key), Some("0"), "{key}: {}", out.console);
    }
    assert_eq!(count(&cache_stats(a, "g"), "used"), 0);
}

/// `image prefetch` copies the whole image into the cache at its rate while a guest reads
/// and writes; afterwards every read is a hit, and the guest's writes were never undone.
#[test]
fn prefetch_fills_the_cache_at_its_rate_while_a_guest_runs() {
    let dir = TestDir::new();
    let Some((_etcd, cluster)) = setup(&dir, 2, &[]) else {
        return;
    };
    let a = &cluster.nodes[0];
    a.create_image("p", "8M", "1M", &["b:ram"]);
    let mut guest = client(a, "p");
    write_blocks(&mut guest, 8, 1);
    let out = a.cli_raw(&["image", "prefetch", "p"]);
    assert!(!out.status.success(), "a prefetch without a cache");
    assert!(String::from_utf8_lossy(&out.stderr).contains("has no cache"));
    a.cli(&["image", "set", "p", "--cache", "ram"]);
    for rate in ["0", "1K"] {
        let out = a.cli_raw(&["image", "prefetch", "p", "--rate", rate]);
        assert!(!out.status.success(), "--rate {rate}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("too low"));
    }
    let started = std::time::Instant::now();
    a.cli(&["image", "prefetch", "p", "--rate", "4M", "--no-wait"]);
    let again = a.cli_raw(&["image", "prefetch", "p"]);
    assert!(!again.status.success(), "two prefetches at once");
    // The guest keeps reading and writing meanwhile.
    let mut round = 1;
    while cache_stats(a, "p")["prefetch"]["running"] == true {
        round = 3 - round;
        for block in 0..2u64 {
            let status = guest
                .write(0, block * 2048, &pattern(block, round))
                .unwrap();
            assert_eq!(status, S_OK);
        }
        for block in 0..8u64 {
            let want = if block < 2 { round } else { 1 };
            let (status, data) = guest.read(0, block * 2048, PART).unwrap();
            assert_eq!(
                (status, data == pattern(block, want)),
                (S_OK, true),
                "block {block}"
            );
        }
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "prefetch never ended"
        );
    }
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1500),
        "8 MiB at 4 MiB/s took {took:?}"
    );
    let stats = cache_stats(a, "p");
    assert_eq!(stats["prefetch"]["blocks_done"], 8, "{stats}");
    assert!(stats["prefetch"]["stopped"].is_null(), "{stats}");
    // Blocks the guest did not rewrite are cached whole: a read anywhere in them hits.
    let hits = count(&stats, "hits");
    for block in 2..8u64 {
        let (status, data) = guest.read(0, block * 2048 + 1024, PART).unwrap();
        assert_eq!((status, data == vec![0; PART as usize]), (S_OK, true));
    }
    assert_eq!(
        count(&cache_stats(a, "p"), "hits"),
        hits + 6,
        "prefetched blocks missed"
    );
    for block in 0..2u64 {
        let (status, data) = guest.read(0, block * 2048, PART).unwrap();
        assert_eq!((status, data == pattern(block, round)), (S_OK, true));
    }
    // The CLI's own wait returns the figures once done.
    let done = a.cli(&["image", "prefetch", "p"]);
    assert_eq!(done["prefetch"]["running"], false, "{done}");
    // At the lowest rate the second chunk is 16 s away; turning caching off stops the
    // prefetch within its sleep, and says why.
    a.cli(&["image", "set", "p", "--cache", "volume"]);
    a.cli(&["image", "prefetch", "p", "--rate", "64K", "--no-wait"]);
    std::thread::sleep(Duration::from_millis(300));
    let turned_off = std::time::Instant::now();
    a.cli(&["image", "set", "p", "--cache", "off"]);
    while cache_stats(a, "p")["prefetch"]["running"] == true {
        assert!(
            turned_off.elapsed() < Duration::from_secs(5),
            "the prefetch slept on"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let stats = cache_stats(a, "p");
    assert_eq!(
        stats["prefetch"]["stopped"], "caching was turned off",
        "{stats}"
    );
}
