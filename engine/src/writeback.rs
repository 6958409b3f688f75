//! Early writeback of files that another process (QEMU's backup job, `qemu-img convert`) is still writing.
//!
//! Neither writes its output durably (backup targets are opened with `cache.no-flush`, `qemu-img convert`
//! writes with `cache=unsafe`), and the kernel starts background writeback only past 10 % of memory by default
//! (2.4 GiB on a 24 GiB host), so a backup or restore of a few GiB can sit in the page cache until qmpbak's
//! final fsync, which then waits for all of it. [`EarlyWriteback`] watches the files from a thread and
//! fdatasyncs one each time another [`STEP`] of it has been allocated, so the disk works during the copy and
//! the final fsync ([`chain::store::sync_files`]) finds at most about a step left. These fdatasyncs only start
//! writeback early: durability still comes from that final fsync.

use std::fs::File;
use std::path::PathBuf;
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::time::Duration;

/// Bytes newly allocated in a file that make it due for an fdatasync. Large enough that the flushes are few
/// (16 per GiB), small enough that what is left for the final fsync is quick.
pub const STEP: u64 = 64 << 20;

/// How often the files' allocated sizes are read (a `stat` each).
const POLL: Duration = Duration::from_millis(20);

/// A thread writing back files until stopped or dropped.
pub struct EarlyWriteback {
    stop: Sender<()>,
}

impl EarlyWriteback {
    /// Starts watching `files`. Files that do not exist yet are tried again at the next poll; errors are
    /// ignored (the final fsync reports them).
    pub fn start(files: Vec<PathBuf>) -> EarlyWriteback {
        let (stop, stopped) = mpsc::channel::<()>();
        // Without a thread there is no early writeback, and the final fsync does it all: not an error.
        let _ = std::thread::Builder::new()
            .name("writeback".into())
            .spawn(move || {
                let mut open: Vec<Option<(File, Due)>> = files.iter().map(|_| None).collect();
                loop {
                    for (path, slot) in files.iter().zip(open.iter_mut()) {
                        if slot.is_none() {
                            *slot = File::open(path).ok().map(|f| (f, Due::default()));
                        }
                        if let Some((file, due)) = slot {
                            let allocated = file.metadata().map_or(0, |m| chain::fsio::allocated(&m));
                            if due.check(allocated) {
                                let _ = file.sync_data();
                            }
                        }
                    }
                    match stopped.recv_timeout(POLL) {
                        Err(RecvTimeoutError::Timeout) => {}
                        Ok(()) | Err(RecvTimeoutError::Disconnected) => break,
                    }
                }
            });
        EarlyWriteback { stop }
    }

    /// Stops the thread after its current round, without waiting for it (dropping does the same).
    pub fn stop(self) {
        let _ = self.stop.send(());
    }
}

/// When a file is due for its next fdatasync: a [`STEP`] past the allocated size at the last one.
#[derive(Debug, Default)]
struct Due {
    synced_at: u64,
}

impl Due {
    /// Whether a file with `allocated` bytes is due; if so, counts the sync as done.
    fn check(&mut self, allocated: u64) -> bool {
        if allocated >= self.synced_at.saturating_add(STEP) {
            self.synced_at = allocated;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_is_due_once_per_step_of_new_allocation() {
        let mut due = Due::default();
        assert!(!due.check(0));
        assert!(!due.check(STEP - 1));
        assert!(due.check(STEP + 10));
        assert!(!due.check(2 * STEP));
        assert!(due.check(2 * STEP + 10));
    }

    #[test]
    fn stops_with_missing_and_present_files() {
        let dir = tempfile::tempdir().unwrap();
        let present = dir.path().join("present");
        std::fs::write(&present, b"data").unwrap();
        let writeback = EarlyWriteback::start(vec![present, dir.path().join("missing")]);
        writeback.stop();
        // Dropping without stop also ends the thread.
        drop(EarlyWriteback::start(vec![dir.path().join("missing")]));
    }
}
