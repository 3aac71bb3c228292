//! Review findings: tests that demonstrate defects (expected to FAIL on the current code).

mod common;

use common::daemon::Daemon;
use common::TestDir;
use cormorant_frontend::{BlkClient, ClientOptions};

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
        "image",
        "create",
        "f",
        "--size",
        "64M",
        "--tier",
        "volume",
        "--block-size",
        "64K",
    ]);
    let mut client = connect(&daemon, "f", 1);
    let q = client.queue(0).unwrap();
    // One 4 KiB write into each of 600 blocks (64 KiB = 128 sectors apart).
    for block in 0..600u64 {
        assert_eq!(q.write(block * 128, &[0xab; 4096]).unwrap(), S_OK);
    }
    let status = q.flush().unwrap();
    assert_eq!(
        status,
        S_OK,
        "flush of 600 dirty files failed\n{}",
        daemon
            .log()
            .lines()
            .filter(|l| l.contains("ERROR"))
            .take(5)
            .collect::<Vec<_>>()
            .join("\n")
    );
    // And it must not stay failed.
    assert_eq!(q.flush().unwrap(), S_OK);
}

/// `BlockFiles::for_read` (behind `Blocks::file_for_read`) caches "absent" after its open failed, without checking that no
/// writer created the file meanwhile. A read of one sector and a write of another sector of
/// the same never-written block, on two queues, can leave the cache saying "absent" after the
/// write was stored: later reads of the block return zeros instead of the written data.
#[test]
fn concurrent_read_does_not_hide_a_new_block_file() {
    use cormorant::image::Tier::Ram;
    use cormorant::store::{Blocks, TierDirs};
    use std::os::unix::fs::FileExt;
    use std::sync::{Arc, Barrier};
    let root = tempfile::tempdir().unwrap();
    let dirs = TierDirs {
        ram: root.path().join("ram"),
        volume: root.path().join("vol"),
    };
    const ROUNDS: u64 = 20_000;
    let files = Arc::new(Blocks::open(
        &dirs,
        &"img".parse().unwrap(),
        cormorant::image::ImageId::LEGACY,
        4096,
        ROUNDS * 4096,
    ));
    files.files(Ram).create_dir().unwrap();
    let barrier = Arc::new(Barrier::new(2));
    let reader = {
        let (files, barrier) = (files.clone(), barrier.clone());
        std::thread::spawn(move || {
            for block in 0..ROUNDS {
                barrier.wait();
                let _ = files.file_for_read(Ram, block).unwrap();
                barrier.wait();
            }
        })
    };
    let mut hidden = Vec::new();
    for block in 0..ROUNDS {
        barrier.wait();
        files
            .file_for_write(Ram, block)
            .unwrap()
            .write_all_at(b"acked", 0)
            .unwrap();
        barrier.wait();
        // The write is stored (and would be acknowledged): a read must find it.
        if files.file_for_read(Ram, block).unwrap().is_none() {
            hidden.push(block);
        }
        // Keep the cache small so every round starts uncached.
        files.files(Ram).forget_all();
    }
    reader.join().unwrap();
    assert!(
        hidden.is_empty(),
        "{} of {ROUNDS} written blocks read back as absent (zeros), e.g. {:?}",
        hidden.len(),
        &hidden[..hidden.len().min(5)]
    );
}

/// A resync that copies a hot block "frozen" (after 3 optimistic attempts raced) freezes it
/// and then waits for the block's in-flight writes to finish. But a queue that has one write
/// to the block in flight (started, not yet reaped) and pops a second write to the same block
/// blocks its own thread in `start_write` waiting for the thaw, so the first write can never
/// finish: the resync gives up after IDLE_WAIT (15 s) and the guest's queue is stalled that
/// long. Batches of writes to one block are exactly the hot-block case the freeze exists for.
#[test]
fn resync_of_a_hot_block_does_not_stall_the_queue() {
    use cormorant_frontend::BlkRequest;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};
    let dir = TestDir::new();
    let daemon = Daemon::start(dir.path());
    daemon.cli(&["image", "create", "h", "--size", "8M", "--block-size", "1M"]);
    let opts = ClientOptions {
        io_timeout: Duration::from_secs(60),
        ..ClientOptions::default()
    };
    let mut client = BlkClient::connect(daemon.socket("h"), &opts).unwrap();
    // Block 0 holds data the new copy will lack, so the resync has to copy it.
    assert_eq!(client.write(0, 0, &vec![0xaa; 1 << 20]).unwrap(), S_OK);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let q = client.queue(0).unwrap();
            let bufs: Vec<_> = (0..32).map(|_| q.alloc(4096).unwrap()).collect();
            for (i, b) in bufs.iter().enumerate() {
                q.memory().fill(b.addr, 4096, i as u8 + 1).unwrap();
            }
            // 32 writes of 4 KiB, all inside block 0, per batch.
            let reqs: Vec<BlkRequest> = bufs
                .iter()
                .enumerate()
                .map(|(i, b)| BlkRequest::write(i as u64 * 8, *b))
                .collect();
            let mut worst = Duration::ZERO;
            let mut done = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                q.submit_batch(&reqs).unwrap();
                let mut got = 0;
                while got < reqs.len() {
                    done.clear();
                    got += q
                        .wait_completions(&mut done, Duration::from_secs(60))
                        .unwrap();
                    assert!(done.iter().all(|c| c.status == S_OK));
                }
                worst = worst.max(started.elapsed());
            }
            worst
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    daemon.cli(&[
        "location",
        "add",
        "h",
        "--at",
        "local:volume",
        "--blocks",
        "0..1",
    ]);
    let mut reports = Vec::new();
    for _ in 0..3 {
        reports.push(daemon.cli(&["sync", "h", "--blocks", "0..1"]));
    }
    stop.store(true, Ordering::Relaxed);
    let worst = writer.join().unwrap();
    assert!(
        {
            eprintln!(
                "worst {worst:?} reports {reports:?}\n{}",
                daemon
                    .log()
                    .lines()
                    .filter(|l| l.contains("frozen") || l.contains("fill"))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            worst < Duration::from_secs(2)
        },
        "a batch of writes waited {worst:?} while block 0 was resynced; reports {reports:?}"
    );
}

/// A flush must not report success while a copy that took writes did not confirm them
/// durable. `RemoteEngine::flush` turns every peer error into success ("its copies are caught
/// by the next write"), so with the only copy on b, a flush while b is unreachable answers OK:
/// the guest believes data durable that only sits in b's page cache, and b's copy stays
/// marked in sync.
#[test]
fn flush_fails_when_the_only_copy_cannot_be_flushed() {
    if !common::tools_available(&["etcd"]) {
        return;
    }
    let dir = TestDir::new();
    let (_etcd, cluster) = common::etcd_cluster(dir.path(), 2);
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);
    a.create_image("r", "4M", "1M", &["b:volume"]);
    let mut c = BlkClient::connect(a.socket("r"), &ClientOptions::default()).unwrap();
    assert_eq!(c.write(0, 0, &[0x77; 4096]).unwrap(), S_OK);
    // b stops answering (hung, partitioned): its page cache holds the write, not its disk.
    // SAFETY: kill(2) on a child process of this test.
    unsafe { libc::kill(b.pid() as i32, libc::SIGSTOP) };
    let status = c.flush(0).unwrap();
    // SAFETY: as above.
    unsafe { libc::kill(b.pid() as i32, libc::SIGCONT) };
    assert_ne!(
        status, S_OK,
        "flush acknowledged though the only copy (on b) never confirmed it"
    );
}

/// `image rm` does not wait for (or stop) a background fill: the fill keeps saving the
/// image's metadata (`update_meta` -> `save`) and writing block files after the image was
/// removed, so the removed image's metadata file comes back, and a restarted daemon serves
/// an image the operator removed.
#[test]
fn removed_image_stays_removed_while_a_fill_runs() {
    use std::time::Duration;
    let dir = TestDir::new();
    let mut daemon = Daemon::start(dir.path());
    let raw = dir.path().join("src.raw");
    let data: Vec<u8> = (0..256u32 << 20).map(|i| (i >> 12) as u8 | 1).collect();
    std::fs::write(&raw, &data).unwrap();
    daemon.cli(&[
        "image",
        "import",
        "g",
        raw.to_str().unwrap(),
        "--block-size",
        "1M",
        "--tier",
        "ram",
    ]);
    daemon.cli(&["location", "add", "g", "--at", "local:volume"]);
    daemon.cli(&["image", "rm", "g"]);
    std::thread::sleep(Duration::from_secs(5));
    let meta = daemon.volume_dir.join(".meta").join("g.json");
    let existed = meta.exists();
    daemon.restart();
    let list = daemon.cli(&["image", "list"]);
    assert!(
        !existed && list.as_array().unwrap().is_empty(),
        "metadata file back after rm: {existed}; images after restart: {list}"
    );
}
