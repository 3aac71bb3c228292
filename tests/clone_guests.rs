//! Issue 13 with real guests under QEMU (TCG): snapshots taken while a guest writes hold
//! exactly a prefix of its acknowledged writes (one image, and two at one instant with
//! `--group`); clones of one golden image used by guests in parallel leave it unchanged;
//! `image flatten` under a guest that writes and verifies, then the parent removed and the
//! daemon restarted. The daemon crashes are in tests/clone_crash.rs (VM-less).

mod common;

use std::time::Duration;

use common::daemon::Daemon;
use common::guest::{Disk, Guest, GuestOpts, RunningGuest};
use common::{md5_prefix, never_zero_bytes, tools_available, wait_until, TestDir};

const TOOLS: &[&str] = &["qemu-system-x86_64"];
const MIB: usize = 1 << 20;

fn md5(dir: &TestDir, data: &[u8]) -> String {
    let path = dir.join("md5.tmp");
    std::fs::write(&path, data).unwrap();
    md5_prefix(&path, data.len())
}

/// The largest `n` of the complete `TAG n` lines on a guest's console so far.
fn last_mark(guest: &RunningGuest, tag: &str) -> u64 {
    let console = guest.console().replace('\r', "");
    let complete = &console[..console.rfind('\n').map_or(0, |i| i + 1)];
    complete
        .lines()
        .filter_map(|l| {
            let rest = &l[l.find(tag)? + tag.len()..];
            rest.trim().parse::<u64>().ok()
        })
        .max()
        .unwrap_or(0)
}

/// Waits until the guest printed `TAG n` for some `n >= at_least`.
fn wait_mark(guest: &RunningGuest, tag: &str, at_least: u64) -> u64 {
    let reached = wait_until(Duration::from_secs(240), || {
        last_mark(guest, tag) >= at_least
    });
    assert!(reached, "no `{tag}{at_least}`:\n{}", guest.console());
    last_mark(guest, tag)
}

/// A record: the number `n` printed zero-padded to `len` digits, as the guest's `printf`
/// writes it. `None` for bytes that are neither a record nor zeros (a torn write).
fn parse_record(bytes: &[u8]) -> Option<u64> {
    if bytes.iter().all(|&b| b == 0) {
        return Some(0);
    }
    if !bytes.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let digits = std::str::from_utf8(bytes).ok()?.trim_start_matches('0');
    if digits.is_empty() {
        return Some(0);
    }
    digits.parse().ok()
}

/// What the guest's `printf "%0<len>d" n` writes.
fn record(n: u64, len: usize) -> String {
    let digits = n.to_string();
    "0".repeat(len - digits.len()) + &digits
}

// ---- 1. snapshots under a verified write workload -------------------------------------

/// Slots per disk: 4 KiB records at 256 KiB steps, over four 1 MiB blocks.
const SLOTS: u64 = 16;
const SLOT_STEP: usize = 256 << 10;
const RECORD: usize = 4096;

/// Writes record 1, 2, 3, ... forever, alternating between vda (odd) and vdb (even), each
/// with O_DIRECT and an fsync (a FLUSH) before `ACK n` is printed.
const PREFIX_SCRIPT: &str = r#"
n=0
while :; do
  n=$((n+1))
  printf "%04096d" $n > /tmp/r
  if [ $((n % 2)) = 1 ]; then dev=/dev/vda; else dev=/dev/vdb; fi
  slot=$(( (n / 2) % 16 ))
  dd if=/tmp/r of=$dev bs=4k seek=$((slot * 64)) oflag=direct conv=fsync 2>/dev/null || echo "WRITE-ERROR $n"
  echo "ACK $n"
done
"#;

/// Where record `n` goes: (disk 0 = vda or 1 = vdb, slot).
fn record_place(n: u64) -> (usize, u64) {
    (if n % 2 == 1 { 0 } else { 1 }, (n / 2) % SLOTS)
}

/// What slot `slot` of disk `disk` holds once records 1..=n are written.
fn state_after(n: u64, disk: usize, slot: u64) -> u64 {
    (1..=n)
        .rev()
        .find(|&m| record_place(m) == (disk, slot))
        .unwrap_or(0)
}

/// The records in every slot of one disk's raw content.
fn slots_of(raw: &[u8], what: &str) -> Vec<u64> {
    (0..SLOTS as usize)
        .map(|slot| {
            let at = slot * SLOT_STEP;
            parse_record(&raw[at..at + RECORD])
                .unwrap_or_else(|| panic!("{what}: slot {slot} holds a torn record"))
        })
        .collect()
}

/// The `n` in `range` such that every slot of every listed disk is as records 1..=n left it:
/// the snapshot is exactly that prefix of the guest's writes. Panics if there is none.
fn prefix_in(disks: &[(usize, Vec<u64>)], range: std::ops::RangeInclusive<u64>) -> u64 {
    range
        .clone()
        .find(|&n| {
            disks.iter().all(|(disk, slots)| {
                (0..SLOTS).all(|slot| slots[slot as usize] == state_after(n, *disk, slot))
            })
        })
        .unwrap_or_else(|| panic!("no prefix of the guest's writes in {range:?}: {disks:?}"))
}

/// Takes a snapshot under the running workload; returns (acknowledged before, after).
fn snapshot_under(daemon: &Daemon, guest: &RunningGuest, args: &[&str]) -> (u64, u64, u64) {
    let before = last_mark(guest, "ACK ");
    let taken = daemon.cli(args);
    let after = last_mark(guest, "ACK ");
    let held = taken["writes_held_us"].as_u64().unwrap();
    eprintln!("{args:?}: acknowledged {before} before, {after} after; writes held {held} us");
    // A few milliseconds on an idle machine (links only; the syncs are outside the barrier):
    // a quarter of a second means the guest stalls, even on a busy one.
    assert!(held < 250_000, "writes held {held} us");
    (before, after, held)
}

/// The snapshots of one image and of two at one instant, each taken while a guest writes
/// numbered, flushed records alternately to both: each holds exactly a prefix of the writes
/// (the pair one common prefix), at least what was acknowledged before the command.
#[test]
fn snapshots_under_guest_writes_hold_a_prefix_of_them() {
    if !tools_available(TOOLS) {
        return;
    }
    let dir = TestDir::new();
    let daemon = Daemon::start(dir.path());
    daemon.create_image("a", "8M", "1M", &[]);
    daemon.cli(&[
        "image",
        "create",
        "b",
        "--size",
        "8M",
        "--block-size",
        "1M",
        "--tier",
        "volume",
    ]);
    let guest = Guest::spawn(
        &GuestOpts::new(dir.join("guest"), PREFIX_SCRIPT)
            .disk(Disk::new(daemon.socket("a")))
            .disk(Disk::new(daemon.socket("b")))
            .timeout(Duration::from_secs(600)),
    );
    wait_mark(&guest, "ACK ", 40);
    let single = snapshot_under(&daemon, &guest, &["image", "snapshot", "a", "s1"]);
    wait_mark(&guest, "ACK ", single.1 + 40);
    let group = snapshot_under(
        &daemon,
        &guest,
        &["image", "snapshot", "--group", "a", "b", "s2"],
    );
    // The images go on being written after the snapshots: they must not see it.
    let end = wait_mark(&guest, "ACK ", group.1 + 40);
    let out = guest.kill();
    assert!(!out.console.contains("WRITE-ERROR"), "{}", out.console);

    let size = 8 * MIB;
    // A write may start before its predecessor's `ACK` reaches the console: two of slack.
    let a1 = slots_of(&daemon.exported("a@s1", size), "a@s1");
    let n1 = prefix_in(&[(0, a1)], single.0..=single.1 + 2);
    let a2 = slots_of(&daemon.exported("a@s2", size), "a@s2");
    let b2 = slots_of(&daemon.exported("b@s2", size), "b@s2");
    let n2 = prefix_in(&[(0, a2), (1, b2)], group.0..=group.1 + 2);
    eprintln!("a@s1 holds writes 1..={n1}; a@s2 and b@s2 hold 1..={n2}; {end} written in all");
    assert!(n2 > n1 + 2 && end > n2 + 2);
    // The live images hold more than the snapshots.
    let a_now = slots_of(&daemon.exported("a", size), "a");
    assert!(prefix_in(&[(0, a_now)], end..=end + 20) > n2);
}

// ---- 2. clones of one golden image in parallel guests ----------------------------------

const GOLD_SIZE: usize = 16 * MIB;

/// Reads the whole disk, writes 128 KiB across the boundary of blocks 1 and 2 and 4 KiB in
/// block 9 (the guest's number repeated), discards block 12 and 64 KiB inside block 13 (they
/// must read zeros, not the parent's data), reads the disk again.
fn clone_script(id: u32) -> String {
    format!(
        r#"
md5() {{ md5sum | cut -d' ' -f1; }}
echo "RESULT gold=$(dd if=/dev/vda bs=1M count=16 iflag=direct 2>/dev/null | md5)"
printf "%0131072d" {id} > /tmp/w
dd if=/tmp/w of=/dev/vda bs=64k seek=31 oflag=direct conv=fsync 2>/dev/null || echo "WRITE-ERROR 1"
head -c 4096 /tmp/w > /tmp/p
dd if=/tmp/p of=/dev/vda bs=4k seek=2309 oflag=direct conv=fsync 2>/dev/null || echo "WRITE-ERROR 2"
blkdiscard -o 12582912 -l 1048576 /dev/vda || echo "DISCARD-ERROR 1"
blkdiscard -o 13697024 -l 65536 /dev/vda || echo "DISCARD-ERROR 2"
echo "RESULT after=$(dd if=/dev/vda bs=1M count=16 iflag=direct 2>/dev/null | md5)"
"#
    )
}

/// What clone `id` holds after [`clone_script`].
fn clone_expected(gold: &[u8], id: u32) -> Vec<u8> {
    let mut want = gold.to_vec();
    let record = record(id as u64, 131072);
    want[31 * 65536..33 * 65536].copy_from_slice(record.as_bytes());
    want[2309 * 4096..2310 * 4096].copy_from_slice(&record.as_bytes()[..4096]);
    want[12 * MIB..13 * MIB].fill(0);
    want[13 * MIB + 64 * 1024..13 * MIB + 128 * 1024].fill(0);
    want
}

/// Four clones of one snapshot (two on each tier), each used by a guest of its own at the
/// same time: each reads the golden content, writes, and reads its own writes over the rest;
/// the snapshot and the image it was taken of stay as they were.
#[test]
fn four_clones_in_parallel_guests_leave_their_parent_unchanged() {
    if !tools_available(TOOLS) {
        return;
    }
    let dir = TestDir::new();
    let daemon = Daemon::start(dir.path());
    let gold = never_zero_bytes(GOLD_SIZE, 0x60_1d);
    daemon.import("gold", &gold, &["--block-size", "1M"]);
    daemon.cli(&["image", "snapshot", "gold", "base"]);
    let tiers = ["ram", "ram", "volume", "volume"];
    for (id, tier) in tiers.iter().enumerate() {
        let name = format!("vm{id}");
        let made = daemon.cli(&["image", "clone", "gold@base", &name, "--tier", tier]);
        assert_eq!(made["parent"], "gold@base", "{made}");
    }
    let guests: Vec<RunningGuest> = (0..tiers.len())
        .map(|id| {
            Guest::spawn(
                &GuestOpts::new(dir.join(&format!("g{id}")), &clone_script(id as u32 + 1))
                    .disk(Disk::new(daemon.socket(&format!("vm{id}"))))
                    .timeout(Duration::from_secs(400)),
            )
        })
        .collect();
    let gold_md5 = md5(&dir, &gold);
    for (id, guest) in guests.into_iter().enumerate() {
        let out = guest.wait();
        out.expect_ok();
        assert!(!out.console.contains("-ERROR"), "{}", out.console);
        assert_eq!(
            out.expect_value("gold"),
            gold_md5,
            "vm{id} read the golden image"
        );
        let want = clone_expected(&gold, id as u32 + 1);
        assert_eq!(out.expect_value("after"), md5(&dir, &want), "vm{id} after");
        let name = format!("vm{id}");
        assert!(
            daemon.exported(&name, GOLD_SIZE) == want,
            "{name} exports what the guest wrote over the golden image"
        );
        let info = daemon.cli(&["image", "info", &name]);
        assert_eq!(
            info["own_blocks"], 5,
            "blocks 1, 2, 9 and 13 copied up, 12 emptied: {info}"
        );
    }
    assert!(
        daemon.exported("gold@base", GOLD_SIZE) == gold,
        "the snapshot changed"
    );
    assert!(
        daemon.exported("gold", GOLD_SIZE) == gold,
        "the image changed"
    );
    let info = daemon.cli(&["image", "info", "gold@base"]);
    assert_eq!(
        info["children"],
        serde_json::json!(["vm0", "vm1", "vm2", "vm3"])
    );
}

// ---- 3. flatten under a guest's I/O ------------------------------------------------------

/// 48 blocks of 4 MiB on the volume tier: the flatten copies (and syncs) 192 MiB.
const FLAT_SIZE: usize = 192 * MIB;
const FLAT_BLOCK: usize = 4 * MIB;
/// Records of 64 KiB, one slot in every other block (8 MiB apart, 1 MiB into the block).
const FLAT_SLOTS: u64 = 24;
const FLAT_RECORD: usize = 64 << 10;

fn flat_slot_offset(slot: u64) -> usize {
    slot as usize * 2 * FLAT_BLOCK + MIB
}

/// Until vdb reads STOP: writes record n to slot n % 24 (flushed), reads it back, and reads a
/// golden page of an odd block (never written) and compares it with what it read there first;
/// `ROUND n` after each. At the end every slot and every golden page is checked again.
const FLAT_SCRIPT: &str = r#"
md5() { md5sum | cut -d' ' -f1; }
dd if=/dev/zero of=/dev/vdb bs=4k count=1 oflag=direct 2>/dev/null
stopped() { [ "$(dd if=/dev/vdb bs=4k count=1 iflag=direct 2>/dev/null | head -c 4)" = STOP ]; }
gold() { dd if=/dev/vda bs=4k skip=$(( ($1 * 2 + 1) * 1024 + 512 )) count=1 iflag=direct 2>/dev/null | md5; }
for j in $(seq 0 23); do gold $j > /tmp/gold.$j; done
echo READY
n=0; bad=0
while ! stopped; do
  n=$((n+1)); slot=$((n % 24))
  printf "%065536d" $n > /tmp/r
  dd if=/tmp/r of=/dev/vda bs=64k seek=$(( slot * 128 + 16 )) oflag=direct conv=fsync 2>/dev/null || echo "WRITE-ERROR $n"
  [ "$(dd if=/dev/vda bs=64k skip=$(( slot * 128 + 16 )) count=1 iflag=direct 2>/dev/null | md5)" = "$(md5 < /tmp/r)" ] || { echo "READ-BACK-DIFFERS $n"; bad=$((bad+1)); }
  [ "$(gold $slot)" = "$(cat /tmp/gold.$slot)" ] || { echo "GOLD-DIFFERS $slot"; bad=$((bad+1)); }
  echo "ROUND $n"
done
for slot in $(seq 0 23); do
  m=$(( n - (n - slot + 24) % 24 ))
  if [ $m -gt 0 ]; then
    printf "%065536d" $m > /tmp/r
    [ "$(dd if=/dev/vda bs=64k skip=$(( slot * 128 + 16 )) count=1 iflag=direct 2>/dev/null | md5)" = "$(md5 < /tmp/r)" ] || bad=$((bad+1))
  fi
  [ "$(gold $slot)" = "$(cat /tmp/gold.$slot)" ] || bad=$((bad+1))
done
echo "RESULT writes=$n"
echo "RESULT bad=$bad"
"#;

/// What the clone holds after `n` rounds of [`FLAT_SCRIPT`] over `gold`.
fn flat_expected(gold: &[u8], n: u64) -> Vec<u8> {
    let mut want = gold.to_vec();
    for slot in 0..FLAT_SLOTS {
        let last = (1..=n).rev().find(|m| m % FLAT_SLOTS == slot);
        if let Some(m) = last {
            let at = flat_slot_offset(slot);
            want[at..at + FLAT_RECORD].copy_from_slice(record(m, FLAT_RECORD).as_bytes());
        }
    }
    want
}

/// A guest writes and verifies its clone (volume tier) while `image flatten` copies the
/// parent's blocks in; then the parent and its image are removed under the running guest,
/// which goes on; after a daemon restart the clone holds everything.
#[test]
fn flatten_under_guest_io_then_the_parent_goes() {
    if !tools_available(TOOLS) {
        return;
    }
    let dir = TestDir::new();
    let mut daemon = Daemon::start(dir.path());
    let gold = never_zero_bytes(FLAT_SIZE, 0xf1a7);
    daemon.import("gold", &gold, &["--tier", "volume", "--block-size", "4M"]);
    daemon.cli(&["image", "snapshot", "gold", "base"]);
    daemon.cli(&["image", "clone", "gold@base", "vm"]);
    daemon.create_image("ctl", "1M", "1M", &[]);
    let guest = Guest::spawn(
        &GuestOpts::new(dir.join("guest"), FLAT_SCRIPT)
            .disk(Disk::new(daemon.socket("vm")))
            .disk(Disk::new(daemon.socket("ctl")))
            .timeout(Duration::from_secs(600)),
    );
    wait_mark(&guest, "ROUND ", 3);

    let before = last_mark(&guest, "ROUND ");
    let started = std::time::Instant::now();
    let flat = daemon.cli(&["image", "flatten", "vm"]);
    let took = started.elapsed();
    let after = last_mark(&guest, "ROUND ");
    eprintln!("flatten: {flat} in {took:?}; guest rounds {before} -> {after} meanwhile");
    // The 24 odd blocks are never written; of the even ones, those the guest wrote before
    // the flatten reached them were copied up by the guest's write instead.
    let copied = flat["blocks_copied"].as_u64().unwrap();
    assert!(
        (FLAT_SLOTS..=48 - own_at(before)).contains(&copied),
        "{copied} blocks copied"
    );
    daemon.cli(&["image", "rm", "gold@base"]);
    daemon.cli(&["image", "rm", "gold"]);
    wait_mark(&guest, "ROUND ", after + 30);

    let sign = daemon.block_file("ram", "ctl", 0);
    let mut data = std::fs::read(&sign).unwrap();
    data[..4].copy_from_slice(b"STOP");
    std::fs::write(&sign, &data).unwrap();
    let out = guest.wait();
    out.expect_ok();
    for failure in [
        "WRITE-ERROR",
        "READ-BACK-DIFFERS",
        "GOLD-DIFFERS",
        "I/O error",
    ] {
        assert!(
            !out.console.contains(failure),
            "{failure}:\n{}",
            out.console
        );
    }
    assert_eq!(out.value("bad"), Some("0"), "{}", out.console);
    let writes: u64 = out.expect_value("writes").parse().unwrap();

    let want = flat_expected(&gold, writes);
    assert!(daemon.exported("vm", FLAT_SIZE) == want, "after flatten");
    daemon.restart();
    assert!(daemon.cli(&["image", "info", "vm"])["parent"].is_null());
    assert!(daemon.exported("vm", FLAT_SIZE) == want, "after a restart");
}

/// Blocks the guest has written after `rounds` rounds (one slot per even block).
fn own_at(rounds: u64) -> u64 {
    rounds.min(FLAT_SLOTS)
}
