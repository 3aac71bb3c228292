//! Whole-block access to the copies of an image's blocks, for resync: this node's block files
//! directly, other nodes' through the peer protocol.

use std::collections::HashMap;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::{Mutex, OnceLock};

use sha2::{Digest, Sha256};

use crate::disk::Disk;
use crate::image::{ImageName, Location, NodeId, Tier};
use crate::replica::failure::FailureList;
use crate::replica::sync::Copies;

/// The copies of one disk's blocks.
pub struct DiskCopies<'a> {
    pub disk: &'a Disk,
    pub failures: &'a FailureList,
}

impl DiskCopies<'_> {
    fn local(&self, at: &Location) -> io::Result<()> {
        if &at.node == self.disk.me() {
            Ok(())
        } else {
            Err(io::Error::other(format!(
                "copy on node {} is not reachable: no peer connection",
                at.node
            )))
        }
    }
}

impl Copies for DiskCopies<'_> {
    fn checksum(
        &self,
        image: &ImageName,
        at: &Location,
        block: u64,
    ) -> io::Result<Option<[u8; 32]>> {
        let len = self.disk.meta().block_len(block);
        let data = self.read(image, at, block, len)?;
        Ok(Some(match data {
            Some(mut bytes) => {
                bytes.resize(len as usize, 0);
                Sha256::digest(&bytes).into()
            }
            None => zero_digest(len),
        }))
    }

    fn read(
        &self,
        _image: &ImageName,
        at: &Location,
        block: u64,
        len: u64,
    ) -> io::Result<Option<Vec<u8>>> {
        self.local(at)?;
        let Some(file) = self.disk.files(at.tier).for_read(block)? else {
            return Ok(None);
        };
        let mut buf = vec![0u8; len as usize];
        let mut n = 0;
        while n < buf.len() {
            match file.read_at(&mut buf[n..], n as u64)? {
                0 => break,
                k => n += k,
            }
        }
        buf.truncate(n);
        Ok(Some(buf))
    }

    fn write(
        &self,
        _image: &ImageName,
        at: &Location,
        block: u64,
        data: Option<&[u8]>,
    ) -> io::Result<()> {
        self.local(at)?;
        let files = self.disk.files(at.tier);
        let Some(data) = data else {
            return files.drop_block(block);
        };
        let file = files.for_write(block)?;
        file.write_all_at(data, 0)?;
        file.set_len(data.len() as u64)?;
        if at.tier == Tier::Volume {
            // The copy is about to be marked in sync: its bytes must be as durable as the
            // metadata that says so.
            file.sync_data()?;
            files.sync_dir_if_dirty()?;
        }
        Ok(())
    }

    fn reachable(&self, node: &NodeId) -> bool {
        node == self.disk.me() || !self.failures.is_failed(node)
    }
}

/// SHA-256 of `len` zero bytes, remembered: every never-written block hashes to it.
fn zero_digest(len: u64) -> [u8; 32] {
    static DIGESTS: OnceLock<Mutex<HashMap<u64, [u8; 32]>>> = OnceLock::new();
    let map = DIGESTS.get_or_init(Default::default);
    let mut map = map.lock().unwrap_or_else(|p| p.into_inner());
    *map.entry(len)
        .or_insert_with(|| Sha256::digest(vec![0u8; len as usize]).into())
}
