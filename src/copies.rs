//! Whole-block access to the copies of an image's blocks, for resync: this node's block files
//! directly, other nodes' through the peer protocol.

use std::collections::HashMap;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::{Mutex, OnceLock};

use sha2::{Digest, Sha256};

use crate::cluster::Peers;
use crate::disk::Disk;
use crate::image::{BlockRange, ImageName, Location, NodeId, Tier};
use crate::peer::{Request, Response, MAX_CHUNK};
use crate::replica::sync::Copies;

/// The copies of one disk's blocks.
pub struct DiskCopies<'a> {
    pub disk: &'a Disk,
    pub peers: &'a Peers,
}

impl DiskCopies<'_> {
    fn is_local(&self, at: &Location) -> bool {
        &at.node == self.disk.me()
    }

    fn call(&self, at: &Location, request: Request) -> io::Result<Response> {
        match self.peers.call_wait(&at.node, request) {
            Ok(Response::Error { code, message }) => Err(io::Error::other(format!(
                "{} refused: {message} (code {code})",
                at.node
            ))),
            Ok(response) => Ok(response),
            Err(e) => Err(io::Error::other(format!("{}: {e}", at.node))),
        }
    }

    fn remote_read(&self, at: &Location, block: u64, len: u64) -> io::Result<Vec<u8>> {
        let mut data = Vec::with_capacity(len as usize);
        while (data.len() as u64) < len {
            let chunk = (len - data.len() as u64).min(u64::from(MAX_CHUNK)) as u32;
            let request = Request::Read {
                image: self.disk.image_ref(),
                tier: at.tier,
                block,
                offset: data.len() as u32,
                len: chunk,
            };
            match self.call(at, request)? {
                Response::Data(bytes) if bytes.len() == chunk as usize => data.extend(bytes),
                other => return Err(io::Error::other(format!("unexpected answer {other:?}"))),
            }
        }
        Ok(data)
    }

    /// Replaces a remote copy: the bytes, a hole for the rest of the block, then a flush so
    /// the copy is durable before it is marked in sync.
    fn remote_write(&self, at: &Location, block: u64, data: Option<&[u8]>) -> io::Result<()> {
        // One stamp for the whole copy: newer than every guest write issued before it, so a
        // late one of those cannot land over the copy.
        let image = self.disk.image_ref().with_stamp(self.disk.next_stamp());
        let len = self.disk.meta().block_len(block);
        let data = data.unwrap_or(&[]);
        for (i, chunk) in data.chunks(MAX_CHUNK as usize).enumerate() {
            let request = Request::Write {
                image: image.clone(),
                tier: at.tier,
                block,
                offset: (i * MAX_CHUNK as usize) as u32,
                data: chunk.to_vec(),
            };
            self.call(at, request)?;
        }
        if (data.len() as u64) < len {
            let request = Request::Discard {
                image: image.clone(),
                tier: at.tier,
                block,
                offset: data.len() as u32,
                len: (len - data.len() as u64) as u32,
            };
            self.call(at, request)?;
        }
        self.call(at, Request::Flush { image })?;
        Ok(())
    }
}

/// SHA-256 of a block's bytes on this node (zero-filled to the block's length), or None
/// when the block has no file there.
pub fn block_digest(disk: &Disk, tier: Tier, block: u64) -> io::Result<Option<[u8; 32]>> {
    let len = disk.meta().block_len(block);
    let Some(file) = disk.files(tier).for_read(block)? else {
        return Ok(None);
    };
    let mut bytes = read_file(&file, len)?;
    bytes.resize(len as usize, 0);
    Ok(Some(Sha256::digest(&bytes).into()))
}

fn read_file(file: &std::fs::File, len: u64) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len as usize];
    let n = crate::store::read_full_at(file, &mut buf, 0)?;
    buf.truncate(n);
    Ok(buf)
}

impl Copies for DiskCopies<'_> {
    /// Absent blocks hash like zeros, here and on peers, so an unwritten copy matches a
    /// zero-filled one.
    fn checksum(&self, _: &ImageName, at: &Location, block: u64) -> io::Result<Option<[u8; 32]>> {
        let len = self.disk.meta().block_len(block);
        let digest = if self.is_local(at) {
            block_digest(self.disk, at.tier, block)?
        } else {
            let request = Request::Checksums {
                image: self.disk.image_ref(),
                tier: at.tier,
                blocks: BlockRange::new(block, block + 1).map_err(io::Error::other)?,
            };
            match self.call(at, request)? {
                Response::Checksums(sums) if sums.len() == 1 => sums[0],
                other => return Err(io::Error::other(format!("unexpected answer {other:?}"))),
            }
        };
        Ok(Some(digest.unwrap_or_else(|| zero_digest(len))))
    }

    fn read(
        &self,
        _: &ImageName,
        at: &Location,
        block: u64,
        len: u64,
    ) -> io::Result<Option<Vec<u8>>> {
        if !self.is_local(at) {
            return self.remote_read(at, block, len).map(Some);
        }
        match self.disk.files(at.tier).for_read(block)? {
            Some(file) => read_file(&file, len).map(Some),
            None => Ok(None),
        }
    }

    fn write(
        &self,
        _: &ImageName,
        at: &Location,
        block: u64,
        data: Option<&[u8]>,
    ) -> io::Result<()> {
        if !self.is_local(at) {
            return self.remote_write(at, block, data);
        }
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
        node == self.disk.me() || !self.peers.failures().is_failed(node)
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
