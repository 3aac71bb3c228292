//! One image as the virtio layer sees it: its geometry, its serial, the queues that serve it,
//! and the ownership steps around a guest starting and stopping the device.
//!
//! Taking an image over when a migrated guest starts here can wait seconds (for the old
//! owner's lease); it runs on a thread of its own, never on a queue thread, and wakes the
//! queues that asked through their completion eventfds.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

use super::Queue;
use crate::disk::{Disk, SizeWatcher};
use crate::peers::Transport;

/// What the device looks like to the guest.
#[derive(Debug, Clone, Copy)]
pub struct Geometry {
    pub capacity: u64,
    pub block_size: u64,
    pub read_only: bool,
}

/// What tells a guest its disk's capacity changed, given the new size in bytes.
pub type OnResize = Box<dyn Fn(u64) + Send + Sync>;

pub struct Device {
    disk: Arc<Disk>,
    /// How peer calls go out: the pooled clients in the daemon, an in-process network in
    /// the simulation.
    peers: Arc<dyn Transport>,
    use_uring: bool,
    /// Queues waiting for the take-over in progress, if one is.
    preparing: Mutex<Option<Vec<EventFd>>>,
    /// Take-over attempts finished so far: a queue that asked for one knows it is over.
    attempts: AtomicU64,
    /// The image's size in bytes as the guest may address it: follows the metadata (an
    /// online resize, see [`Device::size_changed`]); one load per request to check against.
    capacity: AtomicU64,
    /// Who tells the guest the capacity changed (the vhost-user connection), once set.
    on_resize: Mutex<Option<OnResize>>,
}

impl Device {
    /// A device of `disk`, following its size from now on.
    pub fn new(disk: Arc<Disk>, peers: Arc<dyn Transport>, use_uring: bool) -> Arc<Self> {
        let capacity = AtomicU64::new(disk.meta().size);
        let device = Arc::new(Device {
            disk,
            peers,
            use_uring,
            preparing: Mutex::new(None),
            attempts: AtomicU64::new(0),
            capacity,
            on_resize: Mutex::new(None),
        });
        let watcher: Arc<dyn SizeWatcher> = device.clone();
        device.disk.watch_size(Arc::downgrade(&watcher));
        // A resize between reading the size above and watching it is caught here.
        device
            .capacity
            .store(device.disk.meta().size, Ordering::Release);
        device
    }

    /// The image's size in bytes, as requests are checked against it now.
    pub fn capacity(&self) -> u64 {
        self.capacity.load(Ordering::Acquire)
    }

    /// Sets what tells the guest its disk's capacity changed (called with the new size,
    /// after requests are already checked against it).
    pub fn on_resize(&self, notify: OnResize) {
        *self.on_resize.lock().unwrap_or_else(|p| p.into_inner()) = Some(notify);
    }

    pub fn geometry(&self) -> Geometry {
        let meta = self.disk.meta();
        Geometry {
            capacity: self.capacity(),
            block_size: meta.block_size,
            read_only: meta.read_only,
        }
    }

    /// The image's name, which is also the serial the guest reads (GET_ID).
    pub fn name(&self) -> &str {
        self.disk.name().as_str()
    }

    /// A new queue of this device, completing on its own eventfd.
    pub fn queue(&self) -> std::io::Result<Queue> {
        Queue::new(self.disk.clone(), self.peers.clone(), self.use_uring)
    }

    /// The image's limits (QoS), shared by its queues.
    pub fn qos(&self) -> &crate::qos::Limiter {
        self.disk.qos()
    }

    /// Whether requests may be served now without a take-over or an activation first.
    pub fn is_ready(&self) -> bool {
        self.disk.is_active() && self.disk.owned_here()
    }

    /// Take-over attempts finished so far (see [`Device::prepare`]).
    pub fn attempts(&self) -> u64 {
        self.attempts.load(Ordering::Acquire)
    }

    /// Makes this node the owner and holds the device active (see
    /// `ownership::ensure_serving`), on a thread of its own; `notify` is written when the
    /// attempt is over, whatever its outcome, and [`Device::attempts`] has moved on.
    pub fn prepare(self: &Arc<Self>, notify: &EventFd) {
        let mut preparing = self.preparing.lock().unwrap_or_else(|p| p.into_inner());
        let waiter = match notify.try_clone() {
            Ok(waiter) => waiter,
            Err(e) => {
                // Without a way to wake the queue, do it here rather than never.
                log::error!("image {}: {e}; taking over on the queue", self.name());
                drop(preparing);
                crate::ownership::ensure_serving(&self.disk);
                self.attempts.fetch_add(1, Ordering::AcqRel);
                let _ = notify.write(1);
                return;
            }
        };
        if let Some(waiters) = preparing.as_mut() {
            waiters.push(waiter);
            return;
        }
        *preparing = Some(vec![waiter]);
        drop(preparing);
        log::debug!("image {}: kicked while not ready: taking over", self.name());
        let device = self.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("take-over {}", self.name()))
            .spawn(move || device.prepare_now());
        if let Err(e) = spawned {
            log::error!("image {}: cannot start a thread: {e}", self.name());
            self.prepare_now();
        }
    }

    fn prepare_now(&self) {
        let ready = crate::ownership::ensure_serving(&self.disk);
        log::debug!("image {}: take-over done (serving: {ready})", self.name());
        let waiters = self
            .preparing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        self.attempts.fetch_add(1, Ordering::AcqRel);
        for waiter in waiters.into_iter().flatten() {
            let _ = waiter.write(1);
        }
    }

    /// The frontend stopped every queue: another node may take the image over (as soon as
    /// etcd says so; the frontend does not wait for it).
    pub fn stopped(&self) {
        crate::ownership::device_stopped_soon(&self.disk);
    }
}

impl SizeWatcher for Device {
    /// The image was resized: requests are checked against the new size from now on, then
    /// the guest is told. A shrink is only allowed with no frontend, so a guest never has
    /// requests in flight past a new, smaller end.
    fn size_changed(&self, size: u64) {
        self.capacity.store(size, Ordering::Release);
        let notify = self.on_resize.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(notify) = notify.as_ref() {
            notify(size);
        }
    }
}
