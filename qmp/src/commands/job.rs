//! Commands that start block jobs (backup, mirror, commit, stream) and that drive any job through its life.
//!
//! The `new` constructors set `auto-dismiss: false`, so a job's outcome stays readable with `query-jobs`
//! until it is dismissed (`Qmp::wait_job` relies on it).

use serde::{Deserialize, Serialize};

use super::{Empty, command};
use crate::types::{BitmapSyncMode, BlockdevOnError, MirrorSyncMode};

/// `blockdev-backup`: copies `device` to the already-added node `target` as of the moment the job starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockdevBackup {
    pub job_id: String,
    pub device: String,
    pub target: String,
    pub sync: MirrorSyncMode,
    /// The bitmap that selects what to copy (`sync: bitmap`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bitmap: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bitmap_mode: Option<BitmapSyncMode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compress: Option<bool>,
    /// Bytes per second, 0 for no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub speed: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_source_error: Option<BlockdevOnError>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_target_error: Option<BlockdevOnError>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_finalize: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_dismiss: Option<bool>,
    /// Names the copy-before-write filter node the job inserts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter_node_name: Option<String>,
    /// Discard copied clusters from the source (QEMU 9.1+; see `Capabilities::backup_discard_source`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discard_source: Option<bool>,
}
command!(BlockdevBackup, "blockdev-backup", Empty);

impl BlockdevBackup {
    /// A backup with `auto-dismiss: false` and every other option at QEMU's default.
    pub fn new(
        job_id: impl Into<String>,
        device: impl Into<String>,
        target: impl Into<String>,
        sync: MirrorSyncMode,
    ) -> BlockdevBackup {
        BlockdevBackup {
            job_id: job_id.into(),
            device: device.into(),
            target: target.into(),
            sync,
            bitmap: None,
            bitmap_mode: None,
            compress: None,
            speed: None,
            on_source_error: None,
            on_target_error: None,
            auto_finalize: None,
            auto_dismiss: Some(false),
            filter_node_name: None,
            discard_source: None,
        }
    }
}

/// `blockdev-mirror`: copies `device` to the already-added node `target` and keeps them in step until the job
/// is completed (it then pivots the guest onto `target`, in place of `replaces` if given) or cancelled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockdevMirror {
    pub job_id: String,
    pub device: String,
    pub target: String,
    pub sync: MirrorSyncMode,
    /// The node the pivot replaces, when it is not `device` itself (e.g. the format node under a filter).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaces: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub speed: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_finalize: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_dismiss: Option<bool>,
}
command!(BlockdevMirror, "blockdev-mirror", Empty);

impl BlockdevMirror {
    /// A mirror with `auto-dismiss: false` and every other option at QEMU's default.
    pub fn new(
        job_id: impl Into<String>,
        device: impl Into<String>,
        target: impl Into<String>,
        sync: MirrorSyncMode,
    ) -> BlockdevMirror {
        BlockdevMirror {
            job_id: job_id.into(),
            device: device.into(),
            target: target.into(),
            sync,
            replaces: None,
            speed: None,
            auto_finalize: None,
            auto_dismiss: Some(false),
        }
    }
}

/// `block-commit`: merges the image `top-node` (default: the active layer) into `base-node`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockCommit {
    pub job_id: String,
    pub device: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_node: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_node: Option<String>,
    /// The backing file name to write into the image above `top`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing_file: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub speed: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_finalize: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_dismiss: Option<bool>,
}
command!(BlockCommit, "block-commit", Empty);

impl BlockCommit {
    /// A commit of `device`'s active layer down to its base, with `auto-dismiss: false`.
    pub fn new(job_id: impl Into<String>, device: impl Into<String>) -> BlockCommit {
        BlockCommit {
            job_id: job_id.into(),
            device: device.into(),
            auto_dismiss: Some(false),
            ..BlockCommit::default()
        }
    }
}

/// `block-stream`: copies the backing chain above `base-node` into `device`'s image.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockStream {
    pub job_id: String,
    pub device: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_node: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing_file: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub speed: Option<u64>,
    /// What the job does on an I/O error: `report` (QEMU's default: fail), `stop` (pause until resumed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_finalize: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_dismiss: Option<bool>,
}
command!(BlockStream, "block-stream", Empty);

impl BlockStream {
    /// A stream of the whole backing chain into `device`, with `auto-dismiss: false`.
    pub fn new(job_id: impl Into<String>, device: impl Into<String>) -> BlockStream {
        BlockStream {
            job_id: job_id.into(),
            device: device.into(),
            auto_dismiss: Some(false),
            ..BlockStream::default()
        }
    }
}

/// Declares a `{id}` job command.
macro_rules! job_command {
    ($(#[$meta:meta])* $ty:ident, $name:literal) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
        pub struct $ty {
            pub id: String,
        }
        command!($ty, $name, Empty);

        impl $ty {
            pub fn new(id: impl Into<String>) -> $ty {
                $ty { id: id.into() }
            }
        }
    };
}

job_command!(
    /// `job-cancel`: stops a job; it concludes with an error (or, for a ready mirror, without one).
    JobCancel,
    "job-cancel"
);
job_command!(
    /// `job-finalize`: finalizes a `pending` job (one started with `auto-finalize: false`).
    JobFinalize,
    "job-finalize"
);
job_command!(
    /// `job-dismiss`: removes a `concluded` job; its outcome is gone afterwards.
    JobDismiss,
    "job-dismiss"
);
job_command!(
    /// `job-resume`: resumes a `paused` job, e.g. one that stopped on an error with `on-error: stop`.
    JobResume,
    "job-resume"
);
job_command!(
    /// `job-complete`: completes a `ready` mirror or active commit.
    JobComplete,
    "job-complete"
);

/// `block-job-set-speed`: changes a block job's rate limit (bytes per second, 0 for none).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockJobSetSpeed {
    pub device: String,
    pub speed: u64,
}
command!(BlockJobSetSpeed, "block-job-set-speed", Empty);
