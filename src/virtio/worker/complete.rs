//! Answering a request: its status byte from the block device layer's outcome, the dirty
//! marks live migration needs, and its head on the used ring exactly once.

use virtio_bindings::bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK};
use vm_memory::GuestAddress;

use super::{Mem, Vring, Worker};
use crate::route::IoError;
use crate::virtio::request::Segment;

pub(super) const STATUS_OK: u8 = VIRTIO_BLK_S_OK as u8;
pub(super) const STATUS_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;

/// The status byte the guest gets for a request's outcome: the one place an execution error
/// becomes virtio's. Every failure of a well-formed request is an I/O error to the guest (the
/// daemon's log and metrics say which); requests the guest got wrong get theirs from the
/// parser (`ParseError::status`).
pub fn status(result: &Result<(), IoError>) -> u8 {
    match result {
        Ok(()) => STATUS_OK,
        Err(_) => STATUS_IOERR,
    }
}

impl Worker {
    /// Puts every request the block device layer settled on the used ring.
    pub(super) fn complete(&mut self, vring: &Vring) {
        let mut completions = std::mem::take(&mut self.completions);
        self.queue.complete(&mut completions);
        for completion in completions.drain(..) {
            let slot = completion.tag as usize;
            let Some(request) = self.requests.remove(slot) else {
                log::error!(
                    "image {}: completion for unknown request {slot}",
                    self.device.name()
                );
                continue;
            };
            let byte = status(&completion.result);
            let used = if byte == STATUS_OK {
                request.used_len
            } else {
                1
            };
            if byte == STATUS_OK {
                self.mark_filled(&request.mem, &request.fills);
            }
            self.answer_status(
                vring,
                request.head,
                request.status,
                byte,
                used,
                &request.mem,
            );
        }
        self.completions = completions;
    }

    /// Marks guest pages this request filled as dirty for live migration (writes that the
    /// kernel or a peer made into guest memory bypass vm-memory's bitmap); nothing while QEMU
    /// does not log.
    pub(super) fn mark_filled(&self, mem: &Mem, fills: &[Segment]) {
        crate::virtio::memory::mark_filled(&self.log, mem, fills);
    }

    /// Writes the status byte and puts the head on the used ring with `used` bytes (the
    /// status byte alone when it cannot be written: 0).
    pub(super) fn answer_status(
        &mut self,
        vring: &Vring,
        head: u16,
        status: GuestAddress,
        byte: u8,
        used: u32,
        mem: &Mem,
    ) {
        let used = match crate::virtio::memory::write_byte(&self.log, mem, status, byte) {
            true => used,
            false => 0,
        };
        self.put_used(vring, head, used);
    }
}
