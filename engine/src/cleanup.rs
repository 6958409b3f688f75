//! The report of `qmpbak cleanup`: what recovery undid in QEMU and on disk, and the interrupted mounts it
//! undid, as one type the binary prints and the tests read.

use serde::{Deserialize, Serialize};

use crate::mount::UmountReport;
use crate::recovery::Cleaned;

/// What `qmpbak cleanup` did: the fields of [`Cleaned`] and `mounts`, in one JSON object.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CleanupReport {
    #[serde(flatten)]
    pub cleaned: Cleaned,
    /// Mounts of the VM's nodes whose qmpbak was killed while setting them up, undone.
    pub mounts: Vec<UmountReport>,
}
