//! Frames waiting to be written to one connection. A thread that queues a frame while no
//! one is writing becomes the writer: it writes everything queued, including what others
//! queue meanwhile, in one `writev` per batch, so pipelined frames share system calls and a
//! lone frame goes out without a hand-off to another thread. A thread with several frames to
//! send stages them and flushes once. Threads that must not block on
//! the socket only queue, and a writer thread (`run`) picks their frames up.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Write};
use std::mem;
use std::sync::{Condvar, Mutex};
use std::time::Instant;

use super::frame::Outgoing;
use super::lock;
use super::seal::{Sealer, TAG_LEN};

/// Told, after each batch went out, how many frames it held and the sum of their charges.
type Written = Box<dyn Fn(usize, usize) + Send + Sync>;

pub(crate) struct Outbox<W: Write = std::net::TcpStream> {
    state: Mutex<State>,
    /// The writer thread waits here for frames nobody is writing.
    queued: Condvar,
    /// Callers wait here for room.
    drained: Condvar,
    /// The stream, once attached, and the sealer that tags each frame after the handshake
    /// in the order written. Only the thread that set `State::writing` touches them.
    out: Mutex<Option<(W, Option<Sealer>)>>,
    written: Written,
}

#[derive(Default)]
struct State {
    queue: VecDeque<(Outgoing, usize)>,
    /// Bytes queued or being written.
    bytes: usize,
    /// Some thread is writing: it will take whatever is queued before it stops.
    writing: bool,
    attached: bool,
    closed: bool,
}

impl<W: Write> Outbox<W> {
    pub(crate) fn new(written: impl Fn(usize, usize) + Send + Sync + 'static) -> Self {
        Outbox {
            state: Mutex::new(State::default()),
            queued: Condvar::new(),
            drained: Condvar::new(),
            out: Mutex::new(None),
            written: Box::new(written),
        }
    }

    /// Gives the outbox its stream; frames queued before are written by the writer thread.
    /// With a sealer every frame is followed by its tag.
    pub(crate) fn attach(&self, stream: W, sealer: Option<Sealer>) {
        *lock(&self.out) = Some((stream, sealer));
        lock(&self.state).attached = true;
        self.queued.notify_all();
    }

    /// Queues a frame for the writer thread; `charge` is handed to the `written` callback
    /// once it is out. False when the outbox is closed (the frame is dropped).
    pub(crate) fn push(&self, frame: Outgoing, charge: usize) -> bool {
        let mut state = lock(&self.state);
        if state.closed {
            return false;
        }
        state.bytes += frame.len();
        state.queue.push_back((frame, charge));
        self.queued.notify_one();
        true
    }

    /// Queues a frame and, if no one is writing, writes the queue on this thread (blocking
    /// while the socket is full). `Ok(false)` when the outbox is closed (the frame is
    /// dropped); an error is the stream's, and the connection is done for.
    pub(crate) fn send(&self, frame: Outgoing, charge: usize) -> io::Result<bool> {
        {
            let mut state = lock(&self.state);
            if state.closed {
                return Ok(false);
            }
            state.bytes += frame.len();
            state.queue.push_back((frame, charge));
            if state.writing || !state.attached {
                self.queued.notify_one();
                return Ok(true);
            }
            state.writing = true;
        }
        self.drain().map(|()| true)
    }

    /// Queues a frame to go out with the next [`Outbox::flush`] (or whatever write comes
    /// first), waking no one: frames staged together leave in one system call. False when
    /// the outbox is closed (the frame is dropped).
    pub(crate) fn stage(&self, frame: Outgoing, charge: usize) -> bool {
        let mut state = lock(&self.state);
        if state.closed {
            return false;
        }
        state.bytes += frame.len();
        state.queue.push_back((frame, charge));
        true
    }

    /// Writes what is queued on this thread, unless another thread is writing (it takes the
    /// queue before it stops) or the stream is not attached yet (the writer thread is woken
    /// for it). `Ok(false)` when the outbox is closed; an error is the stream's, and the
    /// connection is done for.
    pub(crate) fn flush(&self) -> io::Result<bool> {
        {
            let mut state = lock(&self.state);
            if state.closed {
                return Ok(false);
            }
            if state.queue.is_empty() || state.writing {
                return Ok(true);
            }
            if !state.attached {
                self.queued.notify_one();
                return Ok(true);
            }
            state.writing = true;
        }
        self.drain().map(|()| true)
    }

    /// Lets the writer thread send what is queued (staged frames wake no one by themselves).
    pub(crate) fn wake_writer(&self) {
        let _state = lock(&self.state);
        self.queued.notify_one();
    }

    /// Bytes queued or being written.
    pub(crate) fn queued_bytes(&self) -> usize {
        lock(&self.state).bytes
    }

    /// Waits while `limit` bytes or more are queued. False if `deadline` passed first.
    pub(crate) fn wait_room(&self, limit: usize, deadline: Instant) -> bool {
        let mut state = lock(&self.state);
        while state.bytes >= limit && !state.closed {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            state = match self.drained.wait_timeout(state, left) {
                Ok((state, _)) => state,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
        true
    }

    /// Stops writing (frames still queued are dropped) and refuses new frames.
    pub(crate) fn close(&self) {
        let mut state = lock(&self.state);
        state.closed = true;
        state.queue.clear();
        self.queued.notify_all();
        self.drained.notify_all();
    }

    pub(crate) fn is_closed(&self) -> bool {
        lock(&self.state).closed
    }

    /// The writer thread: writes frames that nobody else is writing, until the outbox is
    /// closed (`Ok`) or a write fails.
    pub(crate) fn run(&self) -> io::Result<()> {
        loop {
            {
                let mut state = lock(&self.state);
                while !state.closed && (state.queue.is_empty() || state.writing || !state.attached)
                {
                    state = self
                        .queued
                        .wait(state)
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                }
                if state.closed {
                    return Ok(());
                }
                state.writing = true;
            }
            self.drain()?;
        }
    }

    /// Writes batches until the queue is empty, then gives up `writing` (which the caller
    /// set). On an error the queue stays as it is: the connection is closing.
    fn drain(&self) -> io::Result<()> {
        loop {
            let batch = {
                let mut state = lock(&self.state);
                if state.closed || state.queue.is_empty() {
                    state.writing = false;
                    return Ok(());
                }
                mem::take(&mut state.queue)
            };
            let written = self.write_batch(&batch);
            let mut state = lock(&self.state);
            if let Err(e) = written {
                state.writing = false;
                return Err(e);
            }
            state.bytes -= batch.iter().map(|(frame, _)| frame.len()).sum::<usize>();
            self.drained.notify_all();
            drop(state);
            (self.written)(batch.len(), batch.iter().map(|(_, c)| c).sum());
        }
    }

    /// Writes a batch with as few system calls as the kernel allows (one `writev` of every
    /// frame's parts, up to `IOV_MAX` pieces each), then tags them in order as they go.
    fn write_batch(&self, batch: &VecDeque<(Outgoing, usize)>) -> io::Result<()> {
        let mut out = lock(&self.out);
        let (out, sealer) = out.as_mut().ok_or(io::ErrorKind::NotConnected)?;
        // Each frame's tail, computed in wire order: its tag, or with an encrypting sealer
        // the whole sealed frame (the payload is encrypted into a copy).
        let tails: Vec<Tail> = batch
            .iter()
            .map(|(frame, _)| match sealer {
                Some(s) if s.encrypts() => Tail::Sealed(frame.to_sealed_bytes(s)),
                Some(s) => Tail::Tag(frame.tag(s)),
                None => Tail::None,
            })
            .collect();
        let mut slices = Vec::with_capacity(batch.len() * 4);
        for ((frame, _), tail) in batch.iter().zip(&tails) {
            match tail {
                Tail::Sealed(bytes) => slices.push(IoSlice::new(bytes)),
                Tail::Tag(tag) => {
                    frame.slices(&mut slices);
                    slices.push(IoSlice::new(tag));
                }
                Tail::None => frame.slices(&mut slices),
            }
        }
        write_all_vectored(out, &mut slices)
    }
}

/// What follows a frame's parts on the wire.
enum Tail {
    None,
    Tag([u8; TAG_LEN]),
    Sealed(Vec<u8>),
}

/// `write_all` for a list of slices: `writev` until all of it is out.
fn write_all_vectored<W: Write>(out: &mut W, mut slices: &mut [IoSlice<'_>]) -> io::Result<()> {
    IoSlice::advance_slices(&mut slices, 0);
    while !slices.is_empty() {
        match out.write_vectored(slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peer::frame::Kind;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    /// A sink that can be shared with the test after the outbox took it.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            lock(&self.0).extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn ok(id: u64) -> Outgoing {
        Outgoing::new(Kind::Ok, id, vec![], vec![]).unwrap()
    }

    #[test]
    fn senders_write_in_order_and_report_charges() {
        let charged = Arc::new(AtomicUsize::new(0));
        let counter = charged.clone();
        let outbox: Outbox<Sink> = Outbox::new(move |frames, charges| {
            assert_eq!(frames * 10, charges);
            counter.fetch_add(charges, Ordering::SeqCst);
        });
        let sink = Sink::default();
        // Queued before the stream is there: they wait, and go out with the next send.
        assert!(outbox.send(ok(0), 10).unwrap());
        assert!(outbox.push(ok(1), 10));
        assert_eq!(charged.load(Ordering::SeqCst), 0);
        outbox.attach(sink.clone(), None);
        for id in 2..5 {
            assert!(outbox.send(ok(id), 10).unwrap());
        }
        assert_eq!(charged.load(Ordering::SeqCst), 50);
        let bytes = lock(&sink.0).clone();
        assert_eq!(bytes.len(), 5 * 24);
        assert_eq!((bytes[8], bytes[4 * 24 + 8]), (0, 4));
        outbox.close();
        assert!(!outbox.send(ok(9), 0).unwrap());
        assert!(!outbox.push(ok(9), 0));
    }

    #[test]
    fn the_writer_thread_takes_pushed_frames() {
        let outbox: Arc<Outbox<Sink>> = Arc::new(Outbox::new(|_, _| {}));
        let sink = Sink::default();
        let writer = {
            let outbox = outbox.clone();
            std::thread::spawn(move || outbox.run())
        };
        outbox.push(ok(1), 0);
        outbox.attach(sink.clone(), None);
        outbox.push(ok(2), 0);
        let deadline = Instant::now() + Duration::from_secs(5);
        while lock(&sink.0).len() < 48 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(lock(&sink.0).len(), 48);
        outbox.close();
        writer.join().unwrap().unwrap();
    }

    /// A sink that counts the system calls a batch takes.
    #[derive(Clone, Default)]
    struct Calls(Arc<Mutex<(usize, Vec<u8>)>>);

    impl Write for Calls {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.write_vectored(&[io::IoSlice::new(buf)])
        }

        fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
            let mut calls = lock(&self.0);
            calls.0 += 1;
            // Like a socket that takes at most 1000 bytes per call.
            let mut n = 0;
            for buf in bufs {
                let take = buf.len().min(1000 - n);
                calls.1.extend_from_slice(&buf[..take]);
                n += take;
                if n == 1000 {
                    break;
                }
            }
            Ok(n)
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn staged_frames_leave_together_on_flush_and_whole() {
        let outbox: Outbox<Calls> = Outbox::new(|_, _| {});
        let sink = Calls::default();
        outbox.attach(sink.clone(), None);
        for id in 0..10 {
            assert!(outbox.stage(ok(id), 0));
        }
        assert_eq!(lock(&sink.0).0, 0, "staging writes nothing");
        assert_eq!(outbox.queued_bytes(), 10 * 24);
        assert!(outbox.flush().unwrap());
        assert_eq!(lock(&sink.0).0, 1, "ten frames, one system call");
        assert_eq!(outbox.queued_bytes(), 0);
        // A batch larger than one call takes: written whole, in order, over several.
        let big = Outgoing::new(Kind::Data, 77, vec![1; 10], vec![2; 2500]).unwrap();
        let expected = [big.to_bytes(), ok(78).to_bytes()].concat();
        outbox.stage(big, 0);
        outbox.stage(ok(78), 0);
        outbox.flush().unwrap();
        let calls = lock(&sink.0);
        assert_eq!(&calls.1[240..], &expected[..]);
        assert_eq!(calls.0, 1 + 3);
    }

    #[test]
    fn room_waits_until_the_deadline() {
        let outbox: Outbox<Sink> = Outbox::new(|_, _| {});
        outbox.push(
            Outgoing::new(Kind::Data, 1, vec![0; 100], vec![]).unwrap(),
            0,
        );
        assert!(outbox.wait_room(1000, Instant::now()));
        let started = Instant::now();
        assert!(!outbox.wait_room(100, started + Duration::from_millis(50)));
        assert!(started.elapsed() >= Duration::from_millis(50));
        outbox.close();
        assert!(outbox.wait_room(100, Instant::now() + Duration::from_secs(10)));
    }
}
