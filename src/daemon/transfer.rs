//! Raw image files in and out: import copies a file into an image's blocks (thin: zero
//! blocks are skipped), export writes an image to a sparse file.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::Progress;
use crate::disk::Disk;
use crate::image::Tier;
use crate::route;
use crate::store::read_full_at;

/// How often an import or export reports progress, in blocks.
const PROGRESS_EVERY: u64 = 16;

/// Copies a raw file into the image's blocks, skipping all-zero blocks so the image stays thin.
pub fn import_raw(disk: &Disk, source: &mut File, progress: Progress) -> io::Result<()> {
    let (blocks, block_size) = {
        let meta = disk.meta();
        (meta.blocks(), meta.block_size)
    };
    let mut buf = vec![0u8; block_size as usize];
    for block in 0..blocks {
        let n = read_full(source, &mut buf)?;
        if buf[..n].iter().any(|&b| b != 0) {
            let tier = local_tier(disk, block)?;
            let file = disk.files(tier).for_write(block)?;
            file.write_all_at(&buf[..n], 0)?;
            // The caller's sync makes the import durable: it syncs what is marked.
            if tier == crate::image::Tier::Volume {
                disk.dirty().mark(block, &file);
            }
        }
        if block % PROGRESS_EVERY == 0 || block + 1 == blocks {
            progress(block + 1, blocks);
        }
    }
    Ok(())
}

/// Writes the image to a raw file, leaving holes where the image has none of its data.
pub fn export_raw(disk: &Disk, path: &Path, progress: Progress) -> io::Result<()> {
    let out = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    let (blocks, block_size, size) = {
        let meta = disk.meta();
        (meta.blocks(), meta.block_size, meta.size)
    };
    out.set_len(size)?;
    let mut buf = vec![0u8; block_size as usize];
    for block in 0..blocks {
        let tier = local_tier(disk, block)?;
        if let Some(file) = disk.files(tier).for_read(block)? {
            let len = block_size.min(size - block * block_size) as usize;
            let n = read_full_at(&file, &mut buf[..len], 0)?;
            buf[n..len].fill(0);
            if buf[..len].iter().any(|&b| b != 0) {
                out.write_all_at(&buf[..len], block * block_size)?;
            }
        }
        if block % PROGRESS_EVERY == 0 || block + 1 == blocks {
            progress(block + 1, blocks);
        }
    }
    out.sync_all()
}

fn local_tier(disk: &Disk, block: u64) -> io::Result<Tier> {
    let meta = disk.meta();
    meta.table
        .locations(block)
        .and_then(|l| route::local_copy(l, disk.me()))
        .ok_or_else(|| io::Error::other(format!("block {block} has no in-sync copy here")))
}

/// Reads until `buf` is full or the file ends; returns the bytes read.
fn read_full(source: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match source.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    buf[n..].fill(0);
    Ok(n)
}
