//! Handing a parsed request to the block device layer: its guest buffers become host
//! buffers, and it is remembered in a slot until its completion comes back. GET_ID is the
//! device's own business and is answered here.

use std::sync::Arc;

use virtio_bindings::bindings::virtio_blk::VIRTIO_BLK_ID_BYTES;
use vm_memory::Bytes;

use super::{InFlight, Mem, Vring, Worker};
use crate::route::{BlockRequest, IoVecs};
use crate::virtio::request::{Kind, Request, Segment, Segments};

impl Worker {
    pub(super) fn execute(&mut self, vring: &Vring, head: u16, request: Request, mem: &Arc<Mem>) {
        let used_len = match request.kind {
            Kind::Read { .. } => request.data_len as u32 + 1,
            Kind::GetId => (request.data_len as u32).min(VIRTIO_BLK_ID_BYTES) + 1,
            _ => 1,
        };
        let fills = match request.kind {
            Kind::Read { .. } | Kind::GetId => request.data.clone(),
            _ => Segments::new(),
        };
        let block = match request.kind {
            Kind::GetId => {
                let status = match self.get_id(&request.data, mem) {
                    Ok(()) => super::complete::STATUS_OK,
                    Err(()) => super::complete::STATUS_IOERR,
                };
                let used = if status == super::complete::STATUS_OK {
                    used_len
                } else {
                    1
                };
                self.mark_filled(mem, &fills);
                return self.answer_status(vring, head, request.status, status, used, mem);
            }
            Kind::Read { offset } => match host_buffers(mem, &request.data) {
                Some(bufs) => BlockRequest::Read { offset, bufs },
                None => return self.buffer_moved(vring, head, request.status, mem),
            },
            Kind::Write { offset } => match host_buffers(mem, &request.data) {
                Some(bufs) => BlockRequest::Write { offset, bufs },
                None => return self.buffer_moved(vring, head, request.status, mem),
            },
            Kind::Discard(ranges) | Kind::WriteZeroes { ranges, .. } => {
                BlockRequest::Free(ranges.iter().map(|r| (r.offset, r.len)).collect())
            }
            Kind::Flush => BlockRequest::Flush,
        };
        let slot = self.requests.insert(InFlight {
            head,
            status: request.status,
            used_len,
            mem: mem.clone(),
            fills,
        });
        self.queue.submit(slot as u64, block);
    }

    /// A memory table update between parsing and now moved a buffer out of guest memory.
    fn buffer_moved(
        &mut self,
        vring: &Vring,
        head: u16,
        status: vm_memory::GuestAddress,
        mem: &Mem,
    ) {
        log::warn!(
            "image {}: guest buffer moved out of memory",
            self.device.name()
        );
        let ioerr = super::complete::STATUS_IOERR;
        self.answer_status(vring, head, status, ioerr, 1, mem);
    }

    /// Writes the image's name, cut or padded to 20 bytes, as the device's serial.
    fn get_id(&self, data: &[Segment], mem: &Mem) -> Result<(), ()> {
        let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        let name = self.device.name().as_bytes();
        let n = name.len().min(id.len());
        id[..n].copy_from_slice(&name[..n]);
        let mut at = 0;
        for segment in data {
            let take = (segment.len as usize).min(id.len() - at);
            mem.write_slice(&id[at..at + take], segment.addr)
                .map_err(|_| ())?;
            at += take;
        }
        Ok(())
    }
}

/// Host addresses of guest buffers. The parser checked that they lie in guest memory; a
/// memory table update between parsing and now could still make that untrue, hence Option.
fn host_buffers(mem: &Mem, segments: &[Segment]) -> Option<IoVecs> {
    crate::virtio::memory::host_buffers(mem, segments)
}
