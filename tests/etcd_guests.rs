//! Issue 10's four failures, each with real guests under QEMU on nodes that keep their
//! metadata in a real 3-member etcd. Each failed on the design before etcd (every node
//! owning a private copy of the metadata); each guest checks its data with md5 sums.

mod common;

use std::time::Duration;

use common::daemon::{Cluster, Daemon};
use common::etcd::EtcdCluster;
use common::guest::{Disk, Guest, GuestOpts, GuestOutput};
use common::{tools_available, wait_until, TestDir};

/// Shell that makes chunk `$i` of tag `$tag` (256 KiB, a number padded with zeros) in /tmp/c.
const MAKE_CHUNK: &str = r#"printf "%0262144d" $((i*1000+tag)) > /tmp/c"#;

/// Writes chunks `first..=last` (256 KiB each at their index) with `tag`, flushing each;
/// prints `WROTE i`, and `RESULT write_errors=N` at the end.
fn write_script(first: u32, last: u32, tag: u32) -> String {
    format!(
        r#"
tag={tag}; errors=0
for i in $(seq {first} {last}); do
  {MAKE_CHUNK}
  dd if=/tmp/c of=/dev/vda bs=64k seek=$((i*4)) oflag=direct conv=fsync 2>/dev/null || errors=$((errors+1))
  echo "WROTE $i"
done
echo "RESULT write_errors=$errors"
"#
    )
}

/// Reads chunks `first..=last` and compares each with the chunk of `tag`: `RESULT bad=N`
/// (a chunk that cannot be read counts as bad too).
fn check_script(first: u32, last: u32, tag: u32) -> String {
    format!(
        r#"
tag={tag}; bad=0
for i in $(seq {first} {last}); do
  {MAKE_CHUNK}
  want=$(md5sum < /tmp/c | cut -d' ' -f1)
  got=$(dd if=/dev/vda bs=64k skip=$((i*4)) count=4 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
  [ "$got" = "$want" ] || bad=$((bad+1))
done
echo "RESULT bad=$bad"
"#
    )
}

fn setup(dir: &TestDir, nodes: usize) -> Option<(EtcdCluster, Cluster)> {
    if !tools_available(&["qemu-system-x86_64", "etcd"]) {
        return None;
    }
    Some(common::etcd_cluster(dir.path(), nodes))
}

fn run(dir: &TestDir, name: &str, node: &Daemon, image: &str, script: &str) -> GuestOutput {
    let out = Guest::run(
        &GuestOpts::new(dir.join(name), script)
            .disk(Disk::new(node.socket(image)))
            .timeout(Duration::from_secs(240)),
    );
    out.expect_ok();
    out
}

/// Failure 1: two nodes adopt one image and boot a guest on it at once. Exactly one takes it
/// over; the other guest's writes fail, and none of them is stored.
#[test]
fn split_brain_two_adopters_one_disk() {
    let dir = TestDir::new();
    let Some((_etcd, cluster)) = setup(&dir, 3) else {
        return;
    };
    let (a, b, c) = (&cluster.nodes[0], &cluster.nodes[1], &cluster.nodes[2]);
    a.create_image("two", "8M", "1M", &["a:ram"]);
    let first = run(&dir, "first", a, "two", &write_script(0, 3, 1));
    assert_eq!(first.value("write_errors"), Some("0"), "{}", first.console);
    b.cli(&["image", "adopt", "two"]);
    c.cli(&["image", "adopt", "two"]);
    let both = |tag: u32| format!("{}{}", write_script(4, 7, tag), check_script(0, 3, 1));
    let on_b = Guest::spawn(
        &GuestOpts::new(dir.join("on-b"), &both(2))
            .disk(Disk::new(b.socket("two")))
            .timeout(Duration::from_secs(240)),
    );
    let on_c = Guest::spawn(
        &GuestOpts::new(dir.join("on-c"), &both(3))
            .disk(Disk::new(c.socket("two")))
            .timeout(Duration::from_secs(240)),
    );
    let (out_b, out_c) = (on_b.wait(), on_c.wait());
    let clean =
        |o: &GuestOutput| o.value("write_errors") == Some("0") && o.value("bad") == Some("0");
    assert!(
        clean(&out_b) != clean(&out_c),
        "exactly one guest may own the disk:\nb: {}\nc: {}",
        out_b.console,
        out_c.console
    );
    let (winner, id, tag, loser) = if clean(&out_b) {
        (b, "b", 2, &out_c)
    } else {
        (c, "c", 3, &out_b)
    };
    assert_eq!(loser.value("write_errors"), Some("4"), "{}", loser.console);
    assert_eq!(winner.cli(&["image", "info", "two"])["owner"], id);
    let after = run(&dir, "after", winner, "two", &check_script(4, 7, tag));
    assert_eq!(
        after.value("bad"),
        Some("0"),
        "the loser's writes landed: {}",
        after.console
    );
}

/// Failure 2: a holder restarts with its RAM wiped. A new guest on the owner reads every
/// byte it wrote before: the lost copies are never read as data.
#[test]
fn a_holder_restarted_with_its_ram_wiped_loses_nothing() {
    let dir = TestDir::new();
    let Some((_etcd, mut cluster)) = setup(&dir, 3) else {
        return;
    };
    cluster.nodes[1].create_image("w", "8M", "1M", &["a:ram", "c:ram"]);
    let wrote = run(
        &dir,
        "write",
        &cluster.nodes[1],
        "w",
        &write_script(0, 7, 5),
    );
    assert_eq!(wrote.value("write_errors"), Some("0"), "{}", wrote.console);
    cluster.nodes[0].kill9();
    std::fs::remove_dir_all(&cluster.nodes[0].ram_dir).unwrap();
    cluster.nodes[0].start_again();
    let read = run(&dir, "read", &cluster.nodes[1], "w", &check_script(0, 7, 5));
    assert_eq!(read.value("bad"), Some("0"), "{}", read.console);
}

/// Failure 3: an image is removed while a holder is down, and created again under its
/// name. A guest writing 4 KiB into a block of the new image reads zeros around it, never
/// the old image's bytes.
#[test]
fn a_recreated_image_never_shows_the_deleted_ones_bytes() {
    let dir = TestDir::new();
    let Some((_etcd, mut cluster)) = setup(&dir, 3) else {
        return;
    };
    cluster.nodes[0].create_image("t", "8M", "1M", &["c:ram", "b:ram"]);
    let wrote = run(&dir, "old", &cluster.nodes[0], "t", &write_script(0, 7, 7));
    assert_eq!(wrote.value("write_errors"), Some("0"), "{}", wrote.console);
    cluster.nodes[2].kill9();
    cluster.nodes[0].cli(&["image", "rm", "t"]);
    cluster.nodes[0].create_image("t", "8M", "1M", &["c:ram", "b:ram"]);
    cluster.nodes[2].start_again();
    let script = r#"
dd if=/dev/zero of=/tmp/e bs=1M count=1 2>/dev/null
printf "%04096d" 42 > /tmp/p
dd if=/tmp/p of=/tmp/e bs=4k seek=2 conv=notrunc 2>/dev/null
dd if=/tmp/p of=/dev/vda bs=4k seek=2 oflag=direct conv=fsync 2>/dev/null || echo "RESULT write_error=1"
want=$(md5sum < /tmp/e | cut -d' ' -f1)
got=$(dd if=/dev/vda bs=1M count=1 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
[ "$got" = "$want" ] && echo "RESULT leak=no" || echo "RESULT leak=yes"
"#;
    let new = run(&dir, "new", &cluster.nodes[0], "t", script);
    assert_eq!(new.value("write_error"), None, "{}", new.console);
    assert_eq!(new.value("leak"), Some("no"), "{}", new.console);
    let c = &cluster.nodes[2];
    assert!(wait_until(Duration::from_secs(10), || {
        std::fs::read_dir(&c.ram_dir)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("t@"))
            .count()
            == 1
    }));
}

/// Failure 4: the new owner of a migrated image knows every copy the old owner marked out of
/// sync after the adoption, and never reads the stale one.
#[test]
fn the_adopter_sees_copies_marked_stale_after_it_adopted() {
    let dir = TestDir::new();
    let Some((_etcd, mut cluster)) = setup(&dir, 3) else {
        return;
    };
    cluster.nodes[0].create_image("s", "8M", "1M", &["c:ram", "a:ram"]);
    let script = format!(
        "{}echo PHASE1\nsleep 8\n{}",
        write_script(0, 3, 1),
        write_script(0, 3, 2)
    );
    let mut guest = Guest::spawn(
        &GuestOpts::new(dir.join("old"), &script)
            .disk(Disk::new(cluster.nodes[0].socket("s")))
            .timeout(Duration::from_secs(240)),
    );
    assert!(guest.wait_for_console("PHASE1", Duration::from_secs(120)));
    cluster.nodes[1].cli(&["image", "adopt", "s"]);
    cluster.nodes[2].kill9();
    let out = guest.wait();
    out.expect_ok();
    assert!(!out.console.contains("write_errors=4"), "{}", out.console);
    cluster.nodes[2].start_again(); // c serves its stale copy again
    let read = run(&dir, "new", &cluster.nodes[1], "s", &check_script(0, 3, 2));
    assert_eq!(
        read.value("bad"),
        Some("0"),
        "stale data read: {}",
        read.console
    );
    assert_eq!(cluster.nodes[1].cli(&["image", "info", "s"])["owner"], "b");
}
