//! Boot storm (issue 13, part 2), for correctness: many clones of one golden image on the RAM
//! tier read it at once and see exactly its content, each keeps its own writes to itself, the
//! golden image and its snapshot stay unchanged, and the RAM tier grows by the written blocks
//! only (the clones share the golden's block files). Timing targets live in the benchmark
//! harness (`cormorant-bench --only bootstorm`), not here.

mod common;

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::daemon::Daemon;
use common::guest::{Disk, Guest, GuestOpts};
use common::TestDir;
use cormorant_frontend::{BlkClient, ClientOptions};

const MIB: u64 = 1 << 20;
/// Sectors per MiB.
const SECTORS_PER_MIB: u64 = MIB / 512;
/// The golden image: small, so filling and reading it 32 times is quick.
const GOLDEN: u64 = 64 * MIB;
/// Its block size, the unit a clone copies up on its first write: small, so 32 clones that
/// each write two blocks add 64 MiB to the RAM tier, not 256 MiB.
const BLOCK: u64 = MIB;
const CLONES: usize = 32;
/// Blocks each VM-less clone writes (its own pattern, into each).
const WRITES_PER_CLONE: u64 = 2;
/// What the RAM tier may hold beyond the golden's blocks and the copied-up ones: directory
/// entries and the metadata of 33 images, far below a single block per clone.
const SLACK: u64 = 4 * MIB;

/// The golden image's content: every 8 bytes a step of xorshift64 seeded by the MiB index, so
/// no two MiB are alike and no byte range reads as zeros (a hole) by accident.
fn golden_content() -> Vec<u8> {
    let mut data = vec![0u8; GOLDEN as usize];
    for (i, mib) in data.chunks_exact_mut(MIB as usize).enumerate() {
        let mut x = (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        for word in mib.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            word.copy_from_slice(&x.to_le_bytes());
        }
    }
    data
}

/// Bytes allocated under `dir`, each inode counted once: a snapshot's hard links to its image's
/// block files cost nothing, as on tmpfs (whose statfs a shared /dev/shm would make noisy).
fn ram_used(dir: &Path) -> u64 {
    let mut seen = HashSet::new();
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap().flatten() {
            let meta = entry.metadata().unwrap();
            if meta.is_dir() {
                stack.push(entry.path());
            } else if seen.insert((meta.dev(), meta.ino())) {
                total += meta.blocks() * 512;
            }
        }
    }
    total
}

/// A daemon holding the golden image `gold` (imported from a raw file, on the RAM tier, 1 MiB
/// blocks) and its snapshot `gold@base`; returns the raw file's path too.
fn golden(dir: &TestDir, content: &[u8]) -> (Daemon, std::path::PathBuf) {
    let daemon = Daemon::start(dir.path());
    let raw = dir.join("golden.raw");
    std::fs::write(&raw, content).unwrap();
    daemon.cli(&[
        "image",
        "import",
        "gold",
        raw.to_str().unwrap(),
        "--tier",
        "ram",
        "--block-size",
        "1M",
    ]);
    daemon.cli(&["image", "snapshot", "gold", "base"]);
    (daemon, raw)
}

fn connect(daemon: &Daemon, image: &str) -> BlkClient {
    let opts = ClientOptions {
        mem_size: 8 * MIB,
        ..ClientOptions::default()
    };
    BlkClient::connect(daemon.socket(image), &opts)
        .unwrap_or_else(|e| panic!("connect to {image}: {e}"))
}

/// Reads the whole image in 1 MiB requests and panics at the first MiB that differs from
/// `want` (with `own` regions of the client's own writes: (offset, data)).
fn verify(c: &mut BlkClient, image: &str, want: &[u8], own: &[(u64, Vec<u8>)]) {
    if let Err(e) = check(c, image, want, own) {
        panic!("{e}");
    }
}

/// [`verify`] as a value, for threads that must reach their barriers whatever they find.
fn check(
    c: &mut BlkClient,
    image: &str,
    want: &[u8],
    own: &[(u64, Vec<u8>)],
) -> Result<(), String> {
    for i in 0..GOLDEN / MIB {
        let (status, got) = c
            .read(0, i * SECTORS_PER_MIB, MIB as u32)
            .map_err(|e| format!("{image}: read of MiB {i}: {e}"))?;
        if status != 0 {
            return Err(format!("{image}: read of MiB {i}: status {status}"));
        }
        let mut expect = want[(i * MIB) as usize..((i + 1) * MIB) as usize].to_vec();
        for (offset, data) in own {
            if offset / MIB == i {
                let at = (offset % MIB) as usize;
                expect[at..at + data.len()].copy_from_slice(data);
            }
        }
        if got != expect {
            return Err(format!("{image}: MiB {i} differs from what it should hold"));
        }
    }
    Ok(())
}

/// Clone `n`'s writes and their flush; the first failure.
fn write_own(c: &mut BlkClient, image: &str, own: &[(u64, Vec<u8>)]) -> Result<(), String> {
    for (offset, data) in own {
        match c.write(0, offset / 512, data) {
            Ok(0) => {}
            other => return Err(format!("{image}: write at {offset}: {other:?}")),
        }
    }
    match c.flush(0) {
        Ok(0) => Ok(()),
        other => Err(format!("{image}: flush: {other:?}")),
    }
}

/// Clone `n`'s writes: 64 KiB of its own byte into each of two blocks, at an offset that
/// depends on `n`, so that a write leaking into another clone would show there.
fn own_writes(n: usize) -> Vec<(u64, Vec<u8>)> {
    (0..WRITES_PER_CLONE)
        .map(|w| {
            let block = (n as u64 * 7 + w * 31) % (GOLDEN / BLOCK);
            let offset = block * BLOCK + (n as u64 % 16) * 64 * 1024;
            (offset, vec![0x80 | n as u8; 64 * 1024])
        })
        .collect()
}

#[test]
fn thirty_two_clones_read_the_golden_image_and_keep_their_writes_apart() {
    let dir = TestDir::new();
    let content = Arc::new(golden_content());
    let (daemon, _raw) = golden(&dir, &content);
    let used_golden = ram_used(&daemon.ram_dir);
    assert!(
        (GOLDEN..GOLDEN + SLACK).contains(&used_golden),
        "golden image and its snapshot take {used_golden} bytes of the RAM tier"
    );

    let started = Instant::now();
    let mut clients = Vec::new();
    for n in 0..CLONES {
        let name = format!("vm{n}");
        let made = daemon.cli(&["image", "clone", "gold@base", &name, "--tier", "ram"]);
        assert_eq!(made["parent"], "gold@base");
        clients.push(connect(&daemon, &name));
    }
    eprintln!(
        "{CLONES} clones created and connected in {:?}",
        started.elapsed()
    );
    let used_clones = ram_used(&daemon.ram_dir);
    assert!(
        used_clones < used_golden + SLACK,
        "{CLONES} fresh clones took {} bytes of the RAM tier",
        used_clones - used_golden
    );

    // All read at once, then all write, then all read again: a write of one clone must not
    // show in any other.
    let barrier = Arc::new(Barrier::new(CLONES));
    let started = Instant::now();
    let threads: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(n, mut c)| {
            let (content, barrier) = (content.clone(), barrier.clone());
            // Every thread reaches every barrier, so one failure cannot hang the others.
            std::thread::spawn(move || {
                let name = format!("vm{n}");
                let own = own_writes(n);
                barrier.wait();
                let read = check(&mut c, &name, &content, &[]);
                barrier.wait();
                let wrote = write_own(&mut c, &name, &own);
                barrier.wait();
                let reread = check(&mut c, &name, &content, &own);
                read.and(wrote).and(reread)
            })
        })
        .collect();
    let failed: Vec<String> = threads
        .into_iter()
        .filter_map(|t| t.join().unwrap().err())
        .collect();
    assert!(failed.is_empty(), "{failed:#?}");
    eprintln!(
        "{CLONES} clients read, wrote and read back in {:?}",
        started.elapsed()
    );

    for image in ["gold", "gold@base"] {
        verify(&mut connect(&daemon, image), image, &content, &[]);
    }
    for n in 0..CLONES {
        let info = daemon.cli(&["image", "info", &format!("vm{n}")]);
        assert_eq!(info["parent"], "gold@base");
        assert_eq!(info["own_blocks"], WRITES_PER_CLONE, "vm{n}: {info}");
    }
    let written = CLONES as u64 * WRITES_PER_CLONE * BLOCK;
    let used = ram_used(&daemon.ram_dir);
    eprintln!(
        "RAM tier: golden {used_golden}, with {CLONES} clones {used_clones}, after their \
         writes {used} bytes ({written} bytes of copied-up blocks)"
    );
    assert!(
        used >= used_golden + written,
        "the copied-up blocks are missing from the RAM tier: {used} bytes"
    );
    assert!(
        used < used_golden + written + SLACK,
        "RAM tier holds {used} bytes: more than the golden ({used_golden}) and the written \
         blocks ({written})"
    );
}

/// Guests that boot at once, each from its own clone.
const GUESTS: usize = 4;
/// Where guest `i` writes its 64 KiB pattern: MiB `8 + i`, inside the golden's data.
const GUEST_WRITE_MIB: u64 = 8;

/// 64 KiB of ASCII digits: busybox `printf "%065536d" ID`.
fn guest_pattern(id: usize) -> Vec<u8> {
    let digits = id.to_string();
    let mut pattern = vec![b'0'; 64 * 1024 - digits.len()];
    pattern.extend_from_slice(digits.as_bytes());
    pattern
}

/// The guest's script: checksum the whole disk, write its own 64 KiB, read it back.
fn guest_script(id: usize) -> String {
    let mib = GOLDEN / MIB;
    let seek = (GUEST_WRITE_MIB + id as u64) * 16;
    format!(
        r#"
sum=$(dd if=/dev/vda bs=1M count={mib} iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
echo "RESULT md5=$sum"
echo "CORMORANT-STORM-READ {id}"
printf "%065536d" {id} > /tmp/p
dd if=/tmp/p of=/dev/vda bs=64k seek={seek} oflag=direct conv=fsync 2>/dev/null || exit 3
back=$(dd if=/dev/vda bs=64k skip={seek} count=1 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
[ "$back" = "$(md5sum < /tmp/p | cut -d' ' -f1)" ] || exit 4
echo "RESULT wrote=yes"
"#
    )
}

#[test]
fn four_guests_boot_at_once_each_from_its_own_clone() {
    if !common::tools_available(&["qemu-system-x86_64", "md5sum"]) {
        return;
    }
    let dir = TestDir::new();
    let content = golden_content();
    let (daemon, raw) = golden(&dir, &content);
    let golden_md5 = common::md5_prefix(&raw, GOLDEN as usize);
    for id in 0..GUESTS {
        daemon.cli(&["image", "clone", "gold@base", &format!("vm{id}")]);
    }

    let started = Instant::now();
    let guests: Vec<_> = (0..GUESTS)
        .map(|id| {
            let opts = GuestOpts::new(dir.join(&format!("guest{id}")), &guest_script(id))
                .disk(Disk::new(daemon.socket(&format!("vm{id}"))))
                .timeout(Duration::from_secs(300));
            Guest::spawn(&opts)
        })
        .collect();
    let outputs: Vec<_> = guests.into_iter().map(|g| g.wait()).collect();
    eprintln!(
        "{GUESTS} TCG guests booted, checksummed their clone and wrote to it in {:?}",
        started.elapsed()
    );
    for (id, out) in outputs.iter().enumerate() {
        out.expect_ok();
        assert_eq!(out.expect_value("md5"), golden_md5, "guest {id} read");
        assert_eq!(out.expect_value("wrote"), "yes", "guest {id}");
    }

    // Each clone holds the golden plus its own guest's write; the golden and its snapshot
    // hold neither.
    for id in 0..GUESTS {
        let name = format!("vm{id}");
        let offset = (GUEST_WRITE_MIB + id as u64) * MIB;
        verify(
            &mut connect(&daemon, &name),
            &name,
            &content,
            &[(offset, guest_pattern(id))],
        );
    }
    for image in ["gold", "gold@base"] {
        verify(&mut connect(&daemon, image), image, &content, &[]);
    }
}
