//! Raw image files in and out: import copies a file into an image's blocks (thin: zero
//! blocks are skipped), export writes an image to a sparse file. Both go through the image's
//! [`crate::store::Blocks`], so an import's files are synced by the flush that ends it.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::Progress;
use crate::disk::Disk;
use crate::image::Tier;
use crate::route;
use crate::store::BlockError;

/// How often an import or export reports progress, in blocks.
const PROGRESS_EVERY: u64 = 16;

#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("cannot read the source file: {0}")]
    Source(#[source] io::Error),
    #[error("cannot write the export file: {0}")]
    Target(#[source] io::Error),
    #[error("block {0} has no in-sync copy on this node")]
    NoLocalCopy(u64),
    #[error(transparent)]
    Block(#[from] BlockError),
}

/// Copies a raw file into the image's blocks, skipping all-zero blocks so the image stays thin.
/// The caller flushes the image's blocks afterwards to make the import durable.
pub fn import_raw(disk: &Disk, source: &mut File, progress: Progress) -> Result<(), TransferError> {
    let (blocks, block_size) = {
        let meta = disk.meta();
        (meta.blocks(), meta.block_size)
    };
    let mut buf = vec![0u8; block_size as usize];
    for block in 0..blocks {
        let n = read_full(source, &mut buf).map_err(TransferError::Source)?;
        if buf[..n].iter().any(|&b| b != 0) {
            let tier = local_tier(disk, block)?;
            disk.blocks().write(tier, block, 0, &buf[..n])?;
        }
        if block % PROGRESS_EVERY == 0 || block + 1 == blocks {
            progress(block + 1, blocks);
        }
    }
    Ok(())
}

/// Writes the image to a raw file, leaving holes where the image has none of its data.
pub fn export_raw(disk: &Disk, path: &Path, progress: Progress) -> Result<(), TransferError> {
    let out = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(TransferError::Target)?;
    let (blocks, block_size, size) = {
        let meta = disk.meta();
        (meta.blocks(), meta.block_size, meta.size)
    };
    out.set_len(size).map_err(TransferError::Target)?;
    let mut buf = vec![0u8; block_size as usize];
    for block in 0..blocks {
        let tier = local_tier(disk, block)?;
        let len = disk.blocks().block_len(block) as usize;
        let has_file = disk.blocks().read(tier, block, 0, &mut buf[..len])?;
        if has_file && buf[..len].iter().any(|&b| b != 0) {
            out.write_all_at(&buf[..len], block * block_size)
                .map_err(TransferError::Target)?;
        }
        if block % PROGRESS_EVERY == 0 || block + 1 == blocks {
            progress(block + 1, blocks);
        }
    }
    out.sync_all().map_err(TransferError::Target)
}

fn local_tier(disk: &Disk, block: u64) -> Result<Tier, TransferError> {
    let meta = disk.meta();
    meta.table
        .locations(block)
        .and_then(|l| route::local_copy(l, disk.me()))
        .ok_or(TransferError::NoLocalCopy(block))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::{ImageMeta, Location};
    use crate::store::TierDirs;
    use std::sync::Arc;

    const BLOCK: u64 = 64 << 10;

    fn disk(root: &Path) -> Arc<Disk> {
        let dirs = TierDirs {
            ram: root.join("ram"),
            volume: root.join("vol"),
        };
        let here = Location {
            node: "a".parse().unwrap(),
            tier: Tier::Volume,
            synced: true,
        };
        let meta = ImageMeta::new(
            "img".parse().unwrap(),
            "a".parse().unwrap(),
            3 * BLOCK,
            BLOCK,
            false,
            vec![here],
        )
        .unwrap();
        let store = Arc::new(crate::meta::store::LocalStore::new(root.join("meta")));
        Disk::open(meta, &dirs, "a".parse().unwrap(), store)
    }

    #[test]
    fn import_marks_its_files_for_the_flush_and_export_reads_them_back() {
        let root = tempfile::tempdir().unwrap();
        let disk = disk(root.path());
        let mut raw = vec![0u8; 3 * BLOCK as usize];
        raw[10] = 1;
        raw[2 * BLOCK as usize + 5] = 2;
        let source_path = root.path().join("in.raw");
        std::fs::write(&source_path, &raw).unwrap();
        let mut source = File::open(&source_path).unwrap();
        import_raw(&disk, &mut source, &mut |_, _| {}).unwrap();
        let blocks = disk.blocks();
        assert!(
            blocks.is_dirty(0) && blocks.is_dirty(2),
            "import must mark its files"
        );
        assert!(!blocks.is_dirty(1), "an all-zero block is skipped");
        assert!(blocks.file_for_read(Tier::Volume, 1).unwrap().is_none());
        blocks.flush().unwrap();
        assert!(!blocks.is_dirty(0) && !blocks.is_dirty(2));

        let out = root.path().join("out.raw");
        export_raw(&disk, &out, &mut |_, _| {}).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), raw);
    }

    #[test]
    fn export_to_an_unwritable_path_is_a_target_error() {
        let root = tempfile::tempdir().unwrap();
        let disk = disk(root.path());
        let bad = root.path().join("missing").join("out.raw");
        let err = export_raw(&disk, &bad, &mut |_, _| {}).unwrap_err();
        assert!(matches!(err, TransferError::Target(_)), "{err}");
    }
}
