//! Whole-block access to the copies of an image's blocks, for resync: this node's block files
//! directly, other nodes' through the peer protocol.

use std::collections::HashMap;
use std::io;
use std::sync::{Mutex, OnceLock};

use sha2::{Digest, Sha256};

use crate::disk::Disk;
use crate::image::range::RangeError;
use crate::image::{BlockRange, ImageName, Location, NodeId};
use crate::peer::{PeerError, Request, Response, MAX_CHUNK};
use crate::peers::Transport;
use crate::replica::sync::Copies;
use crate::store::BlockError;

/// Why reading or writing a copy failed. Resync speaks `io::Error` (its `Copies` trait), so
/// these travel inside one, as its source: `io::Error::get_ref` gives them back.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("{node}: {source}")]
    Peer {
        node: NodeId,
        #[source]
        source: PeerError,
    },
    #[error("{node} refused: {message} (code {code})")]
    Refused {
        node: NodeId,
        code: u16,
        message: String,
    },
    #[error("{node} answered {answer} to a {asked} request")]
    Unexpected {
        node: NodeId,
        asked: &'static str,
        answer: String,
    },
    #[error("block {block}: {source}")]
    Range {
        block: u64,
        #[source]
        source: RangeError,
    },
    #[error(transparent)]
    Local(#[from] BlockError),
}

impl From<CopyError> for io::Error {
    fn from(e: CopyError) -> io::Error {
        io::Error::other(e)
    }
}

/// The copies of one disk's blocks.
pub struct DiskCopies<'a> {
    pub disk: &'a Disk,
    /// The peers (`Peers` in the daemon, an in-process network in the simulation).
    pub peers: &'a dyn Transport,
}

impl DiskCopies<'_> {
    fn is_local(&self, at: &Location) -> bool {
        &at.node == self.disk.me()
    }

    fn call(&self, at: &Location, request: Request) -> Result<Response, CopyError> {
        match self.peers.call_wait(&at.node, request) {
            Ok(Response::Error { code, message }) => Err(CopyError::Refused {
                node: at.node.clone(),
                code,
                message,
            }),
            Ok(response) => Ok(response),
            Err(source) => Err(CopyError::Peer {
                node: at.node.clone(),
                source,
            }),
        }
    }

    fn remote_read(&self, at: &Location, block: u64, len: u64) -> Result<Vec<u8>, CopyError> {
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
                other => return Err(unexpected(at, "read", &other)),
            }
        }
        Ok(data)
    }

    /// Replaces a remote copy: the bytes, a hole for the rest of the block, then a flush so
    /// the copy is durable before it is marked in sync.
    fn remote_write(
        &self,
        at: &Location,
        block: u64,
        data: Option<&[u8]>,
    ) -> Result<(), CopyError> {
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

fn unexpected(at: &Location, asked: &'static str, answer: &Response) -> CopyError {
    CopyError::Unexpected {
        node: at.node.clone(),
        asked,
        answer: format!("{answer:?}"),
    }
}

impl Copies for DiskCopies<'_> {
    /// Absent blocks hash like zeros, here and on peers, so an unwritten copy matches a
    /// zero-filled one.
    fn checksum(&self, _: &ImageName, at: &Location, block: u64) -> io::Result<Option<[u8; 32]>> {
        let len = self.disk.meta().block_len(block);
        let digest = if self.is_local(at) {
            self.disk
                .blocks()
                .digest(at.tier, block)
                .map_err(CopyError::from)?
        } else {
            let blocks = BlockRange::new(block, block + 1)
                .map_err(|source| CopyError::Range { block, source })?;
            let request = Request::Checksums {
                image: self.disk.image_ref(),
                tier: at.tier,
                blocks,
            };
            match self.call(at, request)? {
                Response::Checksums(sums) if sums.len() == 1 => sums[0],
                other => return Err(unexpected(at, "checksums", &other).into()),
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
            return Ok(self.remote_read(at, block, len).map(Some)?);
        }
        let mut data = self
            .disk
            .blocks()
            .read_block(at.tier, block)
            .map_err(CopyError::from)?;
        if let Some(bytes) = data.as_mut() {
            bytes.truncate(len as usize);
        }
        Ok(data)
    }

    fn write(
        &self,
        _: &ImageName,
        at: &Location,
        block: u64,
        data: Option<&[u8]>,
    ) -> io::Result<()> {
        if !self.is_local(at) {
            return Ok(self.remote_write(at, block, data)?);
        }
        // The copy is about to be marked in sync: `replace_block` makes it durable first.
        let replaced = self.disk.blocks().replace_block(at.tier, block, data);
        Ok(replaced.map_err(CopyError::from)?)
    }

    fn reachable(&self, node: &NodeId) -> bool {
        node == self.disk.me() || !self.peers.is_failed(node)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::holder::tests::{daemon, setup, BLOCK};
    use crate::image::Tier;

    #[test]
    fn a_local_copy_is_replaced_whole_and_checksums_like_its_source() {
        let (_root, service, disk) = setup();
        let copies = DiskCopies {
            disk: &disk,
            peers: daemon(&service).peers(),
        };
        let name = disk.name().clone();
        let here = Location {
            node: disk.me().clone(),
            tier: Tier::Volume,
            synced: true,
        };
        let zeros = copies.checksum(&name, &here, 0).unwrap();
        assert_eq!(
            zeros,
            Some(zero_digest(BLOCK)),
            "an absent block hashes like zeros"
        );

        disk.blocks().write(Tier::Volume, 0, 0, &[3; 8192]).unwrap();
        copies.write(&name, &here, 0, Some(b"copied")).unwrap();
        let data = copies.read(&name, &here, 0, BLOCK).unwrap().unwrap();
        assert_eq!(data, b"copied", "the old tail is gone");
        let mut padded = b"copied".to_vec();
        padded.resize(BLOCK as usize, 0);
        let want: [u8; 32] = Sha256::digest(&padded).into();
        assert_eq!(copies.checksum(&name, &here, 0).unwrap(), Some(want));

        copies.write(&name, &here, 0, None).unwrap();
        assert!(copies.read(&name, &here, 0, BLOCK).unwrap().is_none());
        assert_eq!(copies.checksum(&name, &here, 0).unwrap(), zeros);
    }

    #[test]
    fn a_copy_too_long_for_its_block_is_a_typed_error() {
        let (_root, service, disk) = setup();
        let copies = DiskCopies {
            disk: &disk,
            peers: daemon(&service).peers(),
        };
        let here = Location {
            node: disk.me().clone(),
            tier: Tier::Volume,
            synced: true,
        };
        let long = vec![1u8; BLOCK as usize + 1];
        let err = copies
            .write(disk.name(), &here, 1, Some(&long))
            .unwrap_err();
        let inner = err.get_ref().and_then(|e| e.downcast_ref::<CopyError>());
        assert!(
            matches!(inner, Some(CopyError::Local(BlockError::OutOfBlock { .. }))),
            "{err}"
        );
    }
}
