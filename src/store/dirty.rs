//! Volume-tier block files changed since their last sync: what the next flush must sync.

use std::collections::HashMap;
use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// Dirty block files of one image. Entries carry the sequence number of their last change,
/// so a flush removes only what it synced: a flush that ends must not forget a write that
/// landed while it ran, and concurrent flushes each sync what they saw.
#[derive(Default)]
pub struct DirtyFiles {
    files: Mutex<HashMap<u64, (Arc<File>, u64)>>,
    seq: AtomicU64,
}

/// What one flush is syncing: (block, sequence) pairs to clear when it succeeds.
pub type FlushTicket = Vec<(u64, u64)>;

impl DirtyFiles {
    fn lock(&self) -> MutexGuard<'_, HashMap<u64, (Arc<File>, u64)>> {
        self.files.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records that `block`'s `file` changed after the data landed.
    pub fn mark(&self, block: u64, file: &Arc<File>) {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(block, (file.clone(), seq));
    }

    /// Forgets `block`: its file was removed, and the directory sync makes that durable.
    pub fn forget(&self, block: u64) {
        self.lock().remove(&block);
    }

    pub fn contains(&self, block: u64) -> bool {
        self.lock().contains_key(&block)
    }

    /// The files to sync now, and the ticket to [`DirtyFiles::clear`] afterwards.
    pub fn snapshot(&self) -> (Vec<Arc<File>>, FlushTicket) {
        let files = self.lock();
        let sync = files.values().map(|(f, _)| f.clone()).collect();
        let ticket = files.iter().map(|(&b, &(_, s))| (b, s)).collect();
        (sync, ticket)
    }

    /// Forgets what a flush synced, unless the block changed again since its snapshot.
    pub fn clear(&self, ticket: &FlushTicket) {
        let mut files = self.lock();
        for (block, seq) in ticket {
            if files.get(block).is_some_and(|(_, s)| s == seq) {
                files.remove(block);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flush_ticket_keeps_later_writes() {
        let dir = tempfile::tempdir().unwrap();
        let f = Arc::new(File::create(dir.path().join("x")).unwrap());
        let d = DirtyFiles::default();
        d.mark(1, &f);
        d.mark(2, &f);
        let (files, ticket) = d.snapshot();
        assert_eq!(files.len(), 2);
        d.mark(2, &f);
        d.clear(&ticket);
        let (files, _) = d.snapshot();
        assert_eq!(files.len(), 1, "block 2 was written again during the flush");
        assert!(d.contains(2) && !d.contains(1));
        d.forget(2);
        assert!(!d.contains(2));
    }
}
