//! The record an exclusive lock holder leaves beside the lock file (`lock.holder.json`): who it is, so that a
//! refused process can say who holds the lock. Only data and reading it; taking locks is [`crate::lock`].

use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::host::{hostname, process_gone};

/// The name of the holder record beside a lock file.
pub const HOLDER_FILE: &str = "lock.holder.json";

/// Who holds an exclusive lock, as it recorded itself. May be stale (a holder killed before it could remove
/// it) or missing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockHolder {
    pub pid: u32,
    /// What it is doing ("qmpbak backup" …).
    pub command: String,
    pub host: String,
    pub since: DateTime<Utc>,
}

impl LockHolder {
    /// This process, doing `command`, from now.
    pub fn current(command: &str) -> LockHolder {
        LockHolder {
            pid: std::process::id(),
            command: command.to_owned(),
            host: hostname(),
            since: Utc::now(),
        }
    }

    /// Whether the recorded process is known to be gone: it was on this host and no process has its pid.
    pub fn is_dead(&self) -> bool {
        self.host == hostname() && process_gone(self.pid)
    }
}

/// The holder record that belongs to a lock file.
pub fn holder_path(lock: &Path) -> PathBuf {
    lock.with_file_name(HOLDER_FILE)
}

/// Reads the holder record, if there is a readable one.
pub fn read_holder(lock: &Path) -> Option<LockHolder> {
    let bytes = crate::fsio::read_bounded(&holder_path(lock), crate::fsio::MAX_SMALL_FILE_BYTES).ok()?;
    serde_json::from_slice(&bytes).ok()
}
