//! Per-image limits on a queue (see `qos`): a parsed request asks the image's limiter; one
//! that must wait is held here, the queue stops taking requests off its ring, and a timerfd
//! on the queue thread's epoll wakes it when the tokens are due. The queue thread sleeps
//! meanwhile: no spinning, and other images' queues (their own threads) are not involved.
//!
//! Everything QoS touches in the worker goes through this file: `take` calls
//! [`Worker::execute_within_limits`], `pop_batch` and `process` stop while
//! [`Worker::holding`], the backend forwards the timer's event to
//! [`Worker::on_throttle_timer`], and `drain` releases the held request.

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_sys_util::timerfd::TimerFd;

use super::{Mem, Vring, Worker};
use crate::qos::Admission;
use crate::virtio::request::{Kind, Request};

/// Longest a held request sleeps before asking the limiter again, even when its tokens are
/// due later: a limit the operator raises or removes meanwhile applies within this, instead of
/// after a wait computed under the old limit (which may be seconds for a large request under a
/// low bandwidth limit). Ten wake-ups a second per waiting queue cost nothing measurable.
const RECHECK: Duration = Duration::from_millis(100);

/// A request popped from the ring that waits for its image's tokens.
struct Held {
    head: u16,
    request: Request,
    mem: Arc<Mem>,
    since: Instant,
}

/// One queue's part of the image's limits: the request it holds and the timer that wakes it.
pub(super) struct Throttle {
    timer: TimerFd,
    held: Option<Held>,
}

impl Throttle {
    pub(super) fn new() -> std::io::Result<Throttle> {
        let timer = TimerFd::new()?;
        // Non-blocking: the timer may be re-armed between epoll reporting it and the read
        // (another event of the same wake-up held a new request), and a blocking read would
        // then stall the queue until the new expiry.
        // SAFETY: fcntl on a descriptor this struct owns, with integer arguments only.
        let rc = unsafe {
            let flags = libc::fcntl(timer.as_raw_fd(), libc::F_GETFL);
            libc::fcntl(timer.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK)
        };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Throttle { timer, held: None })
    }

    pub(super) fn fd(&self) -> &TimerFd {
        &self.timer
    }
}

/// What a request costs against the limits: its data bytes (reads and writes only; a
/// discard's range moves no data).
fn data_bytes(request: &Request) -> u64 {
    match request.kind {
        Kind::Read { .. } | Kind::Write { .. } => request.data_len,
        _ => 0,
    }
}

impl Worker {
    /// Starts `request` if the image's limits allow it now, else holds it until they do.
    pub(super) fn execute_within_limits(
        &mut self,
        vring: &Vring,
        head: u16,
        request: Request,
        mem: &Arc<Mem>,
    ) {
        // Only a replay takes several requests without `pop_batch`'s check: they were
        // admitted before the restart, so they pass.
        if self.throttle.held.is_some() {
            return self.execute(vring, head, request, mem);
        }
        match self.device.qos().admit(data_bytes(&request)) {
            Admission::Go => self.execute(vring, head, request, mem),
            Admission::Wait(wait) => {
                self.throttle.held = Some(Held {
                    head,
                    request,
                    mem: mem.clone(),
                    since: Instant::now(),
                });
                self.arm_throttle(wait);
            }
        }
    }

    /// Whether the queue holds a request for its tokens (it takes no new ones meanwhile).
    pub(super) fn holding(&self) -> bool {
        self.throttle.held.is_some()
    }

    /// The timerfd the queue thread's epoll watches for held requests.
    pub fn throttle_fd(&self) -> &TimerFd {
        self.throttle.fd()
    }

    /// The throttle timer fired: start the held request if its tokens are due, and serve
    /// the queue on from there.
    pub fn on_throttle_timer(&mut self) {
        // Non-blocking: nothing to read when the timer was re-armed since it fired.
        let _ = self.throttle.timer.wait();
        let Some(vring) = self.vring.clone() else {
            return;
        };
        let Some(held) = self.throttle.held.take() else {
            return;
        };
        match self.device.qos().admit(data_bytes(&held.request)) {
            Admission::Go => {
                self.device.qos().record_wait(held.since.elapsed());
                self.execute(&vring, held.head, held.request, &held.mem);
                self.process(&vring);
            }
            Admission::Wait(wait) => {
                // Not yet (a wait longer than `RECHECK`, or the limits changed): wait again.
                self.throttle.held = Some(held);
                self.arm_throttle(wait);
            }
        }
    }

    /// The queue is being stopped: the held request goes now, whatever the limits say, so
    /// every request taken off the ring is completed.
    pub(super) fn release_held(&mut self, vring: &Vring) {
        if let Some(held) = self.throttle.held.take() {
            let _ = self.throttle.timer.clear();
            self.device.qos().record_wait(held.since.elapsed());
            self.execute(vring, held.head, held.request, &held.mem);
            self.queue.submit_queued();
        }
    }

    fn arm_throttle(&mut self, wait: Duration) {
        // A zero duration would disarm the timer: wait at least a microsecond.
        let wait = wait.clamp(Duration::from_micros(1), RECHECK);
        if let Err(e) = self.throttle.timer.reset(wait, None) {
            // Cannot happen with a valid duration; without the timer the request would wait
            // for the next kick, so let it go instead.
            log::warn!(
                "image {}: cannot arm the QoS timer: {e}",
                self.device.name()
            );
            if let (Some(vring), Some(held)) = (self.vring.clone(), self.throttle.held.take()) {
                self.execute(&vring, held.head, held.request, &held.mem);
            }
        }
    }
}
