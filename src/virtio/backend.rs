//! The vhost-user backend: features, config space, and the hand-off from vring events to the
//! queue workers. One backend serves one frontend connection.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::VhostUserBackend;
use virtio_bindings::bindings::virtio_blk::*;
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use super::config::BlkConfig;
use super::config_change::{ConfigChannel, Notified};
use super::inflight;
use super::memory::DirtyLog;
use super::request::Limits;
use super::worker::{AtomicMem, Vring, Worker};
use crate::image::SECTOR_SIZE;
use crate::route::Device;

/// Queues a frontend may use (QEMU's `num-queues`). Each gets its own thread, idle unless
/// the guest uses it; eight covers one queue per vCPU for the guests we expect on a node.
pub const MAX_QUEUES: usize = 8;
/// Largest virtqueue we accept; 1024 is the virtio-blk maximum QEMU allows.
pub const MAX_QUEUE_SIZE: usize = 1024;
/// Data segments per request we advertise: Linux then never sends more. Leaves room for the
/// header and status descriptors in a 128-entry queue, QEMU's smallest default.
pub const SEG_MAX: u32 = 126;
/// Discard and write-zeroes limits: one range of at most 1 GiB per request keeps each
/// request's synchronous hole-punching short.
const MAX_DISCARD_SECTORS: u32 = (1 << 30) / SECTOR_SIZE as u32;
const MAX_DISCARD_SEG: u32 = 1;
/// The vhost feature saying the backend logs the guest pages it writes (live migration).
const VHOST_F_LOG_ALL: u64 = 26;
/// Event data value for io_uring completions: values up to the queue count are taken by the
/// queues' kicks and the exit event.
pub const COMPLETION_EVENT: u16 = MAX_QUEUES as u16 + 1;
/// Event data value for the QoS timer of a queue holding a request for its image's tokens.
pub const THROTTLE_EVENT: u16 = MAX_QUEUES as u16 + 2;

pub struct BlkBackend {
    /// False until the connection is admitted (one frontend per image): until then kicks are
    /// parked, so a frontend that is about to be turned away never touches the disk.
    admitted: AtomicBool,
    config: BlkConfig,
    read_only: bool,
    workers: Vec<Mutex<Worker>>,
    device: Arc<Device>,
    /// Set while the frontend has VHOST_F_LOG_ALL acked: the workers mark what they fill.
    log: DirtyLog,
    /// Where a change of capacity is announced to QEMU (see `config_change`).
    channel: Arc<ConfigChannel>,
}

impl BlkBackend {
    pub fn new(device: Arc<Device>, mem: AtomicMem) -> io::Result<Self> {
        let geometry = device.geometry();
        let (capacity, read_only, block_size) =
            (geometry.capacity, geometry.read_only, geometry.block_size);
        let config = BlkConfig {
            capacity_bytes: capacity,
            seg_max: SEG_MAX,
            size_max: 0,
            num_queues: MAX_QUEUES as u16,
            max_discard_sectors: MAX_DISCARD_SECTORS,
            max_discard_seg: MAX_DISCARD_SEG,
            discard_alignment_sectors: (block_size.min(1 << 20) / SECTOR_SIZE) as u32,
            max_write_zeroes_sectors: MAX_DISCARD_SECTORS,
            max_write_zeroes_seg: MAX_DISCARD_SEG,
        };
        let limits = Limits {
            capacity,
            read_only,
            max_discard_sectors: MAX_DISCARD_SECTORS,
            max_discard_seg: MAX_DISCARD_SEG,
            max_write_zeroes_sectors: MAX_DISCARD_SECTORS,
            max_write_zeroes_seg: MAX_DISCARD_SEG,
        };
        let log = DirtyLog::default();
        let workers = (0..MAX_QUEUES)
            .map(|_| Worker::new(&device, limits, mem.clone(), log.clone()).map(Mutex::new))
            .collect::<io::Result<_>>()?;
        let channel = Arc::new(ConfigChannel::default());
        device.on_resize(announce_resize(device.name().to_string(), channel.clone()));
        Ok(BlkBackend {
            admitted: AtomicBool::new(false),
            config,
            read_only,
            workers,
            device,
            log,
            channel,
        })
    }

    /// The backend request channel QEMU handed over (SET_BACKEND_REQ_FD, kept by `relay`).
    pub fn config_channel(&self) -> &ConfigChannel {
        &self.channel
    }

    fn worker(&self, index: usize) -> std::sync::MutexGuard<'_, Worker> {
        self.workers[index]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The completion eventfd of queue `index`'s worker, for the vring thread's epoll.
    pub fn completion_fd(&self, index: usize) -> i32 {
        std::os::unix::io::AsRawFd::as_raw_fd(self.worker(index).completion_fd())
    }

    /// The QoS timerfd of queue `index`'s worker, for the vring thread's epoll.
    pub fn throttle_fd(&self, index: usize) -> i32 {
        std::os::unix::io::AsRawFd::as_raw_fd(self.worker(index).throttle_fd())
    }

    /// Lets the queues run, serving anything the guest queued before.
    pub fn admit(&self) {
        self.admitted.store(true, Ordering::Release);
        for index in 0..self.workers.len() {
            self.worker(index).resume();
        }
    }

    /// QEMU's in-flight region (SET_INFLIGHT_FD, answered by `relay`): each queue records its
    /// requests there and replays what a previous daemon left before serving new ones.
    /// Refused while a queue runs: QEMU hands a region over only before it starts the queues.
    pub fn set_inflight(&self, region: Arc<inflight::Region>) -> io::Result<()> {
        let mut workers: Vec<_> = (0..self.workers.len()).map(|i| self.worker(i)).collect();
        if workers.iter().any(|w| w.is_running()) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "an in-flight region while the queues run",
            ));
        }
        for (index, worker) in workers.iter_mut().enumerate() {
            worker.set_inflight(region.queue(index as u16));
        }
        Ok(())
    }

    /// Completes everything in flight on every queue (the connection is ending).
    pub fn drain(&self) {
        for index in 0..self.workers.len() {
            self.worker(index).drain();
        }
    }
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = BitmapMmapRegion;
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        MAX_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        let mut features = 1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_MQ
            | 1 << VIRTIO_BLK_F_DISCARD
            | 1 << VIRTIO_BLK_F_WRITE_ZEROES
            | 1 << VHOST_F_LOG_ALL
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if self.read_only {
            features |= 1 << VIRTIO_BLK_F_RO;
        }
        features
    }

    /// QEMU acks VHOST_F_LOG_ALL (waiting for our reply) when a live migration starts
    /// logging dirty pages, and drops it when logging ends: only in between do the workers
    /// mark the guest pages they fill.
    fn acked_features(&self, features: u64) {
        self.log.set(features & 1 << VHOST_F_LOG_ALL != 0);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::LOG_SHMFD
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
            | VhostUserProtocolFeatures::BACKEND_REQ
    }

    fn set_event_idx(&self, _enabled: bool) {
        // The vrings apply it themselves; the workers ask them whether to notify.
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        // The capacity follows the image (an online resize); the rest is fixed.
        let config = BlkConfig {
            capacity_bytes: self.device.capacity(),
            ..self.config
        };
        config.window(offset, size)
    }

    fn update_memory(&self, _mem: AtomicMem) -> io::Result<()> {
        // The workers share the daemon's `GuestMemoryAtomic`, which the library updates.
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..MAX_QUEUES).map(|q| 1u64 << q).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        let name = self.device.name();
        log::debug!("image {name}: stopping queue {queue_index} (draining)");
        if let Some(worker) = self.workers.get(queue_index as usize) {
            worker.lock().unwrap_or_else(|p| p.into_inner()).drain();
        }
        log::debug!("image {name}: queue {queue_index} drained");
        let running = self
            .workers
            .iter()
            .any(|w| w.lock().unwrap_or_else(|p| p.into_inner()).is_running());
        if !running {
            // The frontend stopped the device (every queue): another node may take the image
            // over now (the end of a live migration).
            self.device.stopped();
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        let Some(worker) = self.workers.get(thread_id) else {
            return Ok(());
        };
        let mut worker = worker.lock().unwrap_or_else(|p| p.into_inner());
        if device_event == COMPLETION_EVENT {
            worker.on_completions();
        } else if device_event == THROTTLE_EVENT {
            worker.on_throttle_timer();
        } else if let Some(vring) = vrings.get(device_event as usize) {
            // Checked under the worker's lock, which `admit` also takes: no kick is lost.
            if self.admitted.load(Ordering::Acquire) {
                worker.on_kick(vring);
            } else {
                worker.park(vring);
            }
        }
        Ok(())
    }
}

/// What a device does when its image was resized: tells QEMU, which re-reads the config
/// space and interrupts the guest. Runs on the thread that made the change (the control
/// request, or the etcd watch), never on a queue's.
fn announce_resize(image: String, channel: Arc<ConfigChannel>) -> crate::route::OnResize {
    Box::new(move |size| match channel.notify() {
        Ok(Notified::Yes) => {
            log::info!("image {image}: frontend told of the new size ({size} bytes)")
        }
        Ok(Notified::NoChannel) => log::warn!(
            "image {image}: resized to {size} bytes, but the frontend gave no backend channel: \
             the guest sees the new size only when it reconnects"
        ),
        Err(e) => {
            log::warn!("image {image}: resized to {size} bytes; cannot tell the frontend: {e}")
        }
    })
}
