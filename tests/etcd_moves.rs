//! The contract of `sync`: when it returns, the copies it synchronized are in sync (or its
//! report says how many are left). A guest writes and verifies without pause while its disk
//! moves between two nodes twenty times in a row (`location add`, `sync`, `location rm`):
//! every `location rm` of the old copy succeeds, and the guest sees no error and no mismatch.

mod common;

use std::time::Duration;

use common::guest::{Disk, Guest, GuestOpts};
use common::{tools_available, TestDir};

const MOVES: usize = 20;

#[test]
fn a_disk_moves_twenty_times_under_a_writing_guest() {
    if !tools_available(&["qemu-system-x86_64", "etcd"]) {
        return;
    }
    let dir = TestDir::new();
    let (_etcd, cluster) = common::etcd_cluster(dir.path(), 2);
    let a = &cluster.nodes[0];
    a.create_image("mv", "8M", "1M", &["a:ram"]);
    // For its first 110 s of uptime (the moves take well under that), rewrite chunk i of 32
    // with round r and read it back; then verify them all.
    let script = r#"
r=0; bad=0; errors=0
while [ "$(cut -d. -f1 /proc/uptime)" -lt 110 ]; do
  r=$((r+1)); i=$((r % 32))
  printf "%065536d" $((r*100+i)) > /tmp/c
  dd if=/tmp/c of=/dev/vda bs=64k seek=$i oflag=direct conv=fsync 2>/dev/null || errors=$((errors+1))
  md5sum < /tmp/c | cut -d' ' -f1 > /tmp/sum.$i
  got=$(dd if=/dev/vda bs=64k skip=$i count=1 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
  [ "$got" = "$(cat /tmp/sum.$i)" ] || bad=$((bad+1))
  [ $((r % 50)) -eq 0 ] && echo "ROUND $r"
done
for j in $(seq 0 31); do
  [ -e /tmp/sum.$j ] || continue
  got=$(dd if=/dev/vda bs=64k skip=$j count=1 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
  [ "$got" = "$(cat /tmp/sum.$j)" ] || bad=$((bad+1))
done
echo "RESULT rounds=$r"
echo "RESULT bad=$bad"
echo "RESULT errors=$errors"
"#;
    let mut guest = Guest::spawn(
        &GuestOpts::new(dir.join("guest"), script)
            .disk(Disk::new(a.socket("mv")))
            .timeout(Duration::from_secs(400)),
    );
    assert!(guest.wait_for_console("ROUND 50", Duration::from_secs(200)));
    for run in 0..MOVES {
        let (from, to) = if run % 2 == 0 { ("a", "b") } else { ("b", "a") };
        a.cli(&["location", "add", "mv", "--at", &format!("{to}:ram")]);
        let report = a.cli(&["sync", "mv"]);
        assert_eq!(
            report["left"], 0,
            "move {run}: sync left copies out of sync: {report}"
        );
        let out = a.cli_raw(&["location", "rm", "mv", "--at", &format!("{from}:ram")]);
        assert!(
            out.status.success(),
            "move {run}: location rm of the old copy refused right after sync: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let console = guest.console();
    assert!(
        !console.contains("RESULT"),
        "the guest stopped writing before the moves ended:\n{console}"
    );
    let out = guest.wait();
    out.expect_ok();
    assert_eq!(out.value("bad"), Some("0"), "{}", out.console);
    assert_eq!(out.value("errors"), Some("0"), "{}", out.console);
}
