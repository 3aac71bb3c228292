//! Review findings: tests that demonstrate defects (expected to FAIL on the current code).

mod common;

use common::daemon::Daemon;
use common::TestDir;
use cormorant::frontend::{BlkClient, ClientOptions};

const S_OK: u8 = 0;

fn connect(daemon: &Daemon, image: &str, queues: u16) -> BlkClient {
    let opts = ClientOptions {
        num_queues: queues,
        ..ClientOptions::default()
    };
    BlkClient::connect(daemon.socket(image), &opts).expect("connect to the daemon")
}

/// A flush issues one fdatasync per dirty volume-tier block file, all at once, into an
/// io_uring of 512 entries: with more than 512 files dirty the rest fail ("io_uring engine
/// full"), the flush answers IOERR and, since nothing is cleared, so does every later flush.
#[test]
fn flush_with_more_dirty_files_than_ring_entries_succeeds() {
    let dir = TestDir::new();
    let daemon = Daemon::start(dir.path());
    daemon.cli(&[
        "image", "create", "f", "--size", "64M", "--tier", "volume", "--block-size", "64K",
    ]);
    let mut client = connect(&daemon, "f", 1);
    let q = client.queue(0).unwrap();
    // One 4 KiB write into each of 600 blocks (64 KiB = 128 sectors apart).
    for block in 0..600u64 {
        assert_eq!(q.write(block * 128, &[0xab; 4096]).unwrap(), S_OK);
    }
    let status = q.flush().unwrap();
    assert_eq!(status, S_OK, "flush of 600 dirty files failed\n{}", daemon.log().lines().filter(|l| l.contains("ERROR")).take(5).collect::<Vec<_>>().join("\n"));
    // And it must not stay failed.
    assert_eq!(q.flush().unwrap(), S_OK);
}

/// `BlockFiles::for_read` caches "absent" after its open failed, without checking that no
/// writer created the file meanwhile. A read of one sector and a write of another sector of
/// the same never-written block, on two queues, can leave the cache saying "absent" after the
/// write was stored: later reads of the block return zeros instead of the written data.
#[test]
fn concurrent_read_does_not_hide_a_new_block_file() {
    use cormorant::store::{BlockFiles, TierDirs};
    use std::os::unix::fs::FileExt;
    use std::sync::{Arc, Barrier};
    let root = tempfile::tempdir().unwrap();
    let dirs = TierDirs {
        ram: root.path().join("ram"),
        volume: root.path().join("vol"),
    };
    let files = Arc::new(BlockFiles::open(&dirs, cormorant::image::Tier::Ram, &"img".parse().unwrap()));
    files.create_dir().unwrap();
    const ROUNDS: u64 = 20_000;
    let barrier = Arc::new(Barrier::new(2));
    let reader = {
        let (files, barrier) = (files.clone(), barrier.clone());
        std::thread::spawn(move || {
            for block in 0..ROUNDS {
                barrier.wait();
                let _ = files.for_read(block).unwrap();
                barrier.wait();
            }
        })
    };
    let mut hidden = Vec::new();
    for block in 0..ROUNDS {
        barrier.wait();
        files.for_write(block).unwrap().write_all_at(b"acked", 0).unwrap();
        barrier.wait();
        // The write is stored (and would be acknowledged): a read must find it.
        if files.for_read(block).unwrap().is_none() {
            hidden.push(block);
        }
        // Keep the cache small so every round starts uncached.
        files.forget_all();
    }
    reader.join().unwrap();
    assert!(
        hidden.is_empty(),
        "{} of {ROUNDS} written blocks read back as absent (zeros), e.g. {:?}",
        hidden.len(),
        &hidden[..hidden.len().min(5)]
    );
}
