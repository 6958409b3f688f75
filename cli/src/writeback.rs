//! Early writeback of files that another process (QEMU's backup job, `qemu-img convert`) is still writing.
//!
//! Neither writes its output durably (backup targets are opened with `cache.no-flush`, `qemu-img convert`
//! writes with `cache=unsafe`), and the kernel starts background writeback only past 10 % of memory by default
//! (2.4 GiB on a 24 GiB host), so a backup or restore of a few GiB can sit in the page cache until qmpbak's final
//! fsync, which then waits for all of it. [`EarlyWriteback`] fdatasyncs the files over and over from a thread while they are written, so
//! the disk works during the copy and the final fsync ([`chain::store::sync_files`]) finds little left.
//! Its fdatasyncs only start writeback early: durability still comes from that final fsync.

use std::fs::File;
use std::path::PathBuf;
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::time::Duration;

/// The pause between rounds, so that a round over files with nothing dirty does not spin.
const ROUND_PAUSE: Duration = Duration::from_millis(20);

/// A thread writing back files until stopped or dropped.
pub struct EarlyWriteback {
    stop: Sender<()>,
}

impl EarlyWriteback {
    /// Starts writing back `files`. Files that do not exist yet are tried again next round; errors are ignored
    /// (the final fsync reports them).
    pub fn start(files: Vec<PathBuf>) -> EarlyWriteback {
        let (stop, stopped) = mpsc::channel::<()>();
        // Without a thread there is no early writeback, and the final fsync does it all: not an error.
        let _ = std::thread::Builder::new()
            .name("writeback".into())
            .spawn(move || {
                let mut open: Vec<Option<File>> = files.iter().map(|_| None).collect();
                loop {
                    for (path, file) in files.iter().zip(open.iter_mut()) {
                        if file.is_none() {
                            *file = File::open(path).ok();
                        }
                        if let Some(f) = file {
                            let _ = f.sync_data();
                        }
                    }
                    match stopped.recv_timeout(ROUND_PAUSE) {
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

#[cfg(test)]
mod tests {
    use super::*;

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
