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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_with_nothing_cleaned_reads_back_and_prints_its_keys_sorted() {
        // The fields left out when empty (`devices_restored`, `resumed_vm`, `left_in_qemu`) read back as
        // empty: a printed report is always readable as its type.
        let printed =
            serde_json::to_string_pretty(&serde_json::to_value(CleanupReport::default()).unwrap()).unwrap();
        let read: CleanupReport = serde_json::from_str(&printed).unwrap();
        assert!(read.cleaned.devices_restored.is_empty() && !read.cleaned.resumed_vm);
        assert!(read.cleaned.left_in_qemu.is_empty() && read.mounts.is_empty());
        // The bytes the binary printed before the type: the keys of a `Value`, sorted.
        let keys: Vec<&str> = printed
            .lines()
            .filter_map(|l| l.strip_prefix("  \"")?.split('"').next())
            .collect();
        assert_eq!(
            keys,
            [
                "bitmaps",
                "block_nodes",
                "failed_nodes",
                "files",
                "jobs",
                "kept_outside",
                "mounts",
                "operations",
                "pending"
            ]
        );
    }
}
