//! The frontend against a real backend: qemu-storage-daemon's vhost-user-blk export.
//!
//! Fails under `CI=true` when qemu-storage-daemon is missing; otherwise skips with a note.
//! `QSD=/path/to/qemu-storage-daemon` picks another binary.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cormorant_frontend::blk::{S_IOERR, S_NOT_WRITTEN, S_OK};
use cormorant_frontend::{
    BlkClient, BlkQueue, BlkRequest, ClientOptions, Completion, DiscardRange, Error, Malformed,
};

/// Image size: 64 MiB, enough for 1 MiB writes at several offsets.
const IMAGE_SIZE: u64 = 64 << 20;
/// How long qsd may take to create its socket.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a malformed chain may go unanswered before we call it a stall.
const RAW_TIMEOUT: Duration = Duration::from_secs(2);

/// A running qemu-storage-daemon exporting a fresh raw image; killed on drop.
struct Qsd {
    child: Child,
    dir: tempfile::TempDir,
    sock: PathBuf,
}

impl Qsd {
    /// Starts qsd, or returns `None` (after a note) when it is not installed outside CI.
    fn start(num_queues: u16) -> Option<Qsd> {
        let bin = std::env::var_os("QSD")
            .map(PathBuf::from)
            .or_else(|| find_in_path("qemu-storage-daemon"));
        let Some(bin) = bin else {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("qemu-storage-daemon not found and CI=true");
            }
            eprintln!("note: qemu-storage-daemon not found; skipping");
            return None;
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let image = dir.path().join("disk.raw");
        File::create(&image)
            .and_then(|f| f.set_len(IMAGE_SIZE))
            .expect("create image");
        let sock = dir.path().join("vhost.sock");
        let log = File::create(dir.path().join("qsd.log")).expect("log file");
        let child = Command::new(bin)
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=f0,filename={}",
                image.display()
            ))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={},\
                 writable=on,num-queues={num_queues}",
                sock.display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn qemu-storage-daemon");
        let mut qsd = Qsd { child, dir, sock };
        qsd.wait_for_socket();
        Some(qsd)
    }

    fn wait_for_socket(&mut self) {
        let deadline = Instant::now() + START_TIMEOUT;
        while !self.sock.exists() {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                panic!("qsd exited with {status}: {}", self.log());
            }
            assert!(Instant::now() < deadline, "no socket: {}", self.log());
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("qsd.log")).unwrap_or_default()
    }

    fn connect(&self, num_queues: u16) -> BlkClient {
        self.connect_with(&ClientOptions {
            num_queues,
            ..ClientOptions::default()
        })
    }

    fn connect_with(&self, opts: &ClientOptions) -> BlkClient {
        BlkClient::connect(&self.sock, opts)
            .unwrap_or_else(|e| panic!("connect: {e:?}; qsd log: {}", self.log()))
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Deterministic, offset-dependent bytes, so a read from the wrong place shows.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    (0..len as u64)
        .map(|i| (i.wrapping_mul(31) ^ seed.wrapping_mul(0x9e37_79b9)) as u8)
        .collect()
}

#[test]
fn config_reads_writes_flush_and_id() {
    let Some(qsd) = Qsd::start(2) else { return };
    let mut c = qsd.connect(2);
    let cfg = c.config().clone();
    assert_eq!(cfg.capacity, IMAGE_SIZE / 512, "{cfg:?}");
    assert_eq!(cfg.num_queues, 2, "{cfg:?}");
    eprintln!("qsd config: {cfg:?}");
    eprintln!("qsd negotiated: {:x?}", c.negotiated());

    for queue in 0..2 {
        for (i, &len) in [4096usize, 1 << 20].iter().enumerate() {
            for &offset in &[0u64, 4096, 7 << 20, IMAGE_SIZE - (1 << 20)] {
                let sector = offset / 512 + (queue as u64 * 8) + i as u64 * 16;
                let sector = sector.min((IMAGE_SIZE - len as u64) / 512);
                let data = pattern(len, sector ^ queue as u64);
                assert_eq!(c.write(queue, sector, &data).unwrap(), S_OK);
                let (status, back) = c.read(queue, sector, len as u32).unwrap();
                assert_eq!(status, S_OK);
                assert!(back == data, "queue {queue} sector {sector} len {len}");
            }
        }
    }
    assert_eq!(c.flush(0).unwrap(), S_OK);
    assert_eq!(c.flush(1).unwrap(), S_OK);

    let (status, id) = c.get_id(0).unwrap();
    eprintln!(
        "qsd GET_ID: status {status}, {:?}",
        String::from_utf8_lossy(&id)
    );
    assert_eq!(status, S_OK);

    let (status, _) = c.read(1, IMAGE_SIZE / 512, 4096).unwrap();
    assert_eq!(status, S_IOERR, "read past the end");
    let (status, _) = c.read(0, IMAGE_SIZE / 512 - 4, 4096).unwrap();
    assert_eq!(status, S_IOERR, "read straddling the end");

    let zero = DiscardRange {
        sector: 0,
        num_sectors: 8,
        flags: 0,
    };
    let wz = c.write_zeroes(0, &[zero]).unwrap();
    eprintln!("qsd WRITE_ZEROES: status {wz}");
    if c.has_feature(cormorant_frontend::blk::feature::WRITE_ZEROES) {
        assert_eq!(wz, S_OK);
        assert_eq!(c.read(0, 0, 4096).unwrap(), (S_OK, vec![0; 4096]));
    }
    let d = c.discard(1, &[zero]).unwrap();
    eprintln!("qsd DISCARD: status {d}");
    let next_avail: Vec<u32> = c
        .queues_mut()
        .iter()
        .map(|q| q.next_avail().into())
        .collect();
    let bases = c.close().unwrap();
    assert_eq!(
        bases, next_avail,
        "GET_VRING_BASE after every request was answered"
    );
}

#[test]
fn sixty_four_requests_in_flight_on_one_queue() {
    let Some(qsd) = Qsd::start(1) else { return };
    sixty_four_in_flight(&mut qsd.connect(1));
}

/// The same without EVENT_IDX and without indirect descriptors: three ring descriptors per
/// request, a kick per batch unless the backend sets NO_NOTIFY.
#[test]
fn sixty_four_in_flight_with_direct_chains_and_no_event_idx() {
    let Some(qsd) = Qsd::start(1) else { return };
    let mut c = qsd.connect_with(&ClientOptions {
        event_idx: false,
        indirect: false,
        ..ClientOptions::default()
    });
    assert!(!c.queue(0).unwrap().uses_indirect());
    sixty_four_in_flight(&mut c);
}

fn sixty_four_in_flight(c: &mut BlkClient) {
    let q = c.queue(0).unwrap();
    assert!(q.max_in_flight() >= 64);
    const N: usize = 64;
    const LEN: u32 = 4096;
    let mut bufs = Vec::with_capacity(N);
    for i in 0..N {
        let b = q.alloc(LEN).unwrap();
        q.memory()
            .write(b.addr, &pattern(LEN as usize, i as u64))
            .unwrap();
        bufs.push(b);
    }
    let sector = |i: usize| (i as u64) * 8 * 3;
    let writes: Vec<_> = (0..N)
        .map(|i| BlkRequest::write(sector(i), bufs[i]))
        .collect();
    let first = q.submit_batch(&writes).unwrap();
    assert_eq!(q.in_flight(), N);
    let done = drain(q, N);
    assert!(done.iter().all(|c| c.status == S_OK), "{done:?}");
    let mut tokens: Vec<u64> = done.iter().map(|c| c.token.0 - first.0).collect();
    tokens.sort_unstable();
    assert_eq!(tokens, (0..N as u64).collect::<Vec<_>>());

    for b in &bufs {
        q.memory().fill(b.addr, LEN as usize, 0).unwrap();
    }
    let reads: Vec<_> = (0..N)
        .map(|i| BlkRequest::read(sector(i), bufs[i]))
        .collect();
    let first = q.submit_batch(&reads).unwrap();
    let done = drain(q, N);
    for c in &done {
        let i = (c.token.0 - first.0) as usize;
        assert_eq!(c.status, S_OK);
        assert_eq!(c.used_len, LEN + 1, "data plus status byte");
        let mut back = vec![0u8; LEN as usize];
        q.memory().read(bufs[i].addr, &mut back).unwrap();
        assert!(back == pattern(LEN as usize, i as u64), "request {i}");
    }
    let s = q.stats();
    eprintln!("64 in flight: {s:?}");
    assert_eq!(s.submitted, 2 * N as u64);
    assert_eq!(s.completed, 2 * N as u64);
}

fn drain(q: &mut BlkQueue, n: usize) -> Vec<Completion> {
    let mut done = Vec::with_capacity(n);
    while done.len() < n {
        q.wait_completions(&mut done, Duration::from_secs(10))
            .expect("completions");
    }
    assert_eq!(q.in_flight(), 0);
    done
}

/// What happened to one malformed chain, in words for the survey table.
fn outcome(r: Result<cormorant_frontend::RawReply, Error>) -> (String, bool) {
    match r {
        Ok(r) => (
            format!(
                "answered: status {:?}, used len {}, id {}",
                r.status, r.used.len, r.used.id
            ),
            true,
        ),
        Err(Error::Timeout { .. }) => ("no answer (request dropped)".into(), false),
        Err(Error::Disconnected) => ("backend closed the connection".into(), false),
        Err(e) => panic!("frontend error: {e:?}"),
    }
}

/// Whether the queue still serves a one-sector read within [`RAW_TIMEOUT`].
fn still_serves(q: &mut BlkQueue) -> String {
    let buf = match q.alloc(512) {
        Ok(b) => b,
        Err(e) => return format!("no ({e})"),
    };
    let r = q
        .submit(&BlkRequest::read(0, buf))
        .and_then(|t| q.wait_for(t, RAW_TIMEOUT));
    match r {
        Ok(c) if c.status == S_OK => "yes".into(),
        Ok(c) => format!("status {}", c.status),
        Err(e) => format!("no ({e})"),
    }
}

/// Sends every malformed case on its own connection and records what qsd does, then checks
/// qsd still serves a new connection. Run with `--nocapture` to see the table.
#[test]
fn malformed_chains_survey() {
    let Some(qsd) = Qsd::start(1) else { return };
    let mut kept = 0;
    for case in Malformed::ALL {
        let mut c = qsd.connect(1);
        let capacity = c.config().capacity;
        let q = c.queue(0).unwrap();
        let chain = q.malformed(case, capacity).unwrap();
        let r = q.run_raw(&chain, RAW_TIMEOUT);
        let stalled = matches!(r, Err(Error::Timeout { .. }));
        let (what, answered) = outcome(r);
        if stalled {
            q.abandon_raw().unwrap();
        }
        let after = if answered || stalled {
            still_serves(q)
        } else {
            "-".into()
        };
        kept += usize::from(answered && after == "yes");
        eprintln!("{case:?}: {what}; same queue serves a read after: {after}");
    }
    // However qsd took the hostile chains, it still serves a fresh connection.
    let mut c = qsd.connect(1);
    assert_eq!(c.read(0, 0, 4096).unwrap().0, S_OK);
    eprintln!(
        "{kept} of {} cases answered with the connection kept",
        Malformed::ALL.len()
    );
    eprintln!("qsd log:\n{}", qsd.log());
}

/// Malformed chains that qsd answers: all on one connection, which keeps serving.
#[test]
fn answered_malformed_chains_keep_the_connection() {
    let Some(qsd) = Qsd::start(1) else { return };
    let mut c = qsd.connect(1);
    let capacity = c.config().capacity;
    let q = c.queue(0).unwrap();
    for case in [
        Malformed::SectorPastEnd,
        Malformed::SectorOverflow,
        Malformed::UnknownType,
        Malformed::UnalignedLen,
    ] {
        let chain = q.malformed(case, capacity).unwrap();
        let r = q
            .run_raw(&chain, RAW_TIMEOUT)
            .unwrap_or_else(|e| panic!("{case:?}: {e:?}"));
        assert_ne!(r.status, Some(S_NOT_WRITTEN), "{case:?}: no status written");
        assert_ne!(r.status, Some(S_OK), "{case:?} succeeded");
        assert_eq!(q.read(0, 4096).unwrap().0, S_OK, "after {case:?}");
    }
}
