//! Early writeback of files that another process (QEMU's backup job, `qemu-img convert`) is still writing.
//!
//! Neither writes its output durably (backup targets are opened with `cache.no-flush`, `qemu-img convert`
//! writes with `cache=unsafe`), and the kernel starts background writeback only past 10 % of memory by default
//! (2.4 GiB on a 24 GiB host), so a backup or restore of a few GiB can sit in the page cache until qmpbak's
//! final fsync, which then waits for all of it. [`EarlyWriteback`] watches the files from a thread and starts
//! the writeback of one each time another [`STEP`] of it has been allocated, so the disk works during the copy
//! and the final fsync ([`chain::store::sync_files`]) finds at most about a step left. Durability still comes
//! from that final fsync only.
//!
//! How each step is written back is the caller's [`Flush`]: `fdatasync`, which waits for the pages (and
//! commits the filesystem's journal and flushes the device's cache), or `sync_file_range(SYNC_FILE_RANGE_WRITE)`,
//! which only queues them. Measured for issue 20 (2 cores, load average 4–14 from other work, `scripts/bench
//! --only full,restore --runs 3` with both binaries, alternating): an offline restore of a full + 10
//! incrementals (`qemu-img convert` writing) was faster with the queued writeback in three bench rounds where
//! it ran first (nine restores each: 1.7–4.3 s against 2.3–5.8 s, medians 2.7 and 3.6 s) and in four pairs of
//! restores alone where it ran second (3.2–4.3 s against 4.5–6.2 s), with less system CPU.
//! For a full backup (QEMU's job writing) no difference could be told from the noise: two identical binaries
//! differed by 1.3 s (2.4 against 3.7 s) depending on which bench ran first. So `qemu-img convert` outputs
//! queue ([`Flush::Queue`]) and backups keep the waiting `fdatasync` ([`Flush::Wait`]) until it is measured on
//! a quiet machine. Steps of 16 or 256 MiB instead of 64 made no difference measurable under that load.

use std::fs::File;
use std::path::PathBuf;
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::time::Duration;

/// Bytes newly allocated in a file that make it due for writeback. Large enough that the calls are few (16 per
/// GiB), small enough that what is left for the final fsync is quick.
pub const STEP: u64 = 64 << 20;

/// How often the files' allocated sizes are read (a `stat` each).
const POLL: Duration = Duration::from_millis(20);

/// How a file due for writeback is written back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flush {
    /// `fdatasync`: waits for the pages, so the writer's dirty pages never run far ahead of the disk.
    Wait,
    /// `sync_file_range(SYNC_FILE_RANGE_WRITE)`: queues the pages and returns, without a journal commit or a
    /// device cache flush.
    Queue,
}

/// A thread writing back files until stopped or dropped.
pub struct EarlyWriteback {
    stop: Sender<()>,
}

impl EarlyWriteback {
    /// Starts watching `files`. Files that do not exist yet are tried again at the next poll; errors are
    /// ignored (the final fsync reports them).
    pub fn start(files: Vec<PathBuf>, flush: Flush) -> EarlyWriteback {
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
                                let _ = match flush {
                                    Flush::Wait => file.sync_data(),
                                    Flush::Queue => start_writeback(file),
                                };
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

/// Starts writeback of every dirty page of `file` without waiting for it and without a device cache flush or
/// a journal commit (`sync_file_range` with `SYNC_FILE_RANGE_WRITE` only): unlike an `fdatasync`, it does not
/// stall the process still writing the file. The caller ignores errors (a filesystem without it): the final
/// fsync reports what matters.
#[allow(unsafe_code)]
fn start_writeback(file: &File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd as _;
    // SAFETY: a plain system call on a file descriptor that `file` keeps open for its duration; it reads or
    // writes no memory of this process.
    let rc = unsafe { libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// When a file is due for its next writeback: a [`STEP`] past the allocated size at the last one.
#[derive(Debug, Default)]
struct Due {
    synced_at: u64,
}

impl Due {
    /// Whether a file with `allocated` bytes is due; if so, counts the writeback as started.
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
        let writeback = EarlyWriteback::start(vec![present.clone(), dir.path().join("missing")], Flush::Wait);
        writeback.stop();
        // Starting the writeback of a file with dirty pages, and again of one whose pages are queued, works.
        let file = File::options().append(true).open(&present).unwrap();
        std::io::Write::write_all(&mut &file, &[7; 8192]).unwrap();
        start_writeback(&file).unwrap();
        start_writeback(&file).unwrap();
        // Dropping without stop also ends the thread.
        drop(EarlyWriteback::start(
            vec![dir.path().join("missing")],
            Flush::Queue,
        ));
    }
}
