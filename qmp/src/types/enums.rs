//! The QAPI string enums qmpbak reads or sends, all open (see `open_enum!`).
//!
//! Values are spelled as in QEMU's `qapi/*.json`; a value a newer QEMU adds arrives as `Unknown(name)`.

use crate::open_enum::open_enum;

open_enum! {
    /// The state of a job (`JobStatus` in `qapi/job.json`).
    pub enum JobStatus {
        Undefined => "undefined",
        Created => "created",
        Running => "running",
        Paused => "paused",
        Ready => "ready",
        Standby => "standby",
        Waiting => "waiting",
        Pending => "pending",
        Aborting => "aborting",
        Concluded => "concluded",
        /// The job is gone (dismissed).
        Null => "null",
    }
}

impl JobStatus {
    /// Whether the job has finished running: `concluded` (its outcome can still be read) or `null` (gone).
    pub fn is_finished(&self) -> bool {
        matches!(self, JobStatus::Concluded | JobStatus::Null)
    }
}

open_enum! {
    /// The kind of a job (`JobType` in `qapi/job.json`).
    pub enum JobType {
        Commit => "commit",
        Stream => "stream",
        Mirror => "mirror",
        Backup => "backup",
        Create => "create",
        Amend => "amend",
        SnapshotLoad => "snapshot-load",
        SnapshotSave => "snapshot-save",
        SnapshotDelete => "snapshot-delete",
    }
}

open_enum! {
    /// What a backup or mirror job copies (`MirrorSyncMode`).
    pub enum MirrorSyncMode {
        /// Only the top image's allocated clusters.
        Top => "top",
        /// Everything.
        Full => "full",
        /// Only what the guest overwrites while the job runs (copy-before-write).
        None => "none",
        /// Only what a dirty bitmap marks (deprecated name of `bitmap`).
        Incremental => "incremental",
        /// Only what a dirty bitmap marks.
        Bitmap => "bitmap",
    }
}

open_enum! {
    /// What a backup job does with its bitmap when it ends (`BitmapSyncMode`).
    pub enum BitmapSyncMode {
        /// Clear the copied bits only if the job succeeds.
        OnSuccess => "on-success",
        /// Never touch the bitmap.
        Never => "never",
        /// Clear the copied bits even if the job fails.
        Always => "always",
    }
}

open_enum! {
    /// What a job does on an I/O error (`BlockdevOnError`).
    pub enum BlockdevOnError {
        Report => "report",
        Ignore => "ignore",
        Enospc => "enospc",
        Stop => "stop",
        Auto => "auto",
    }
}

open_enum! {
    /// The run state of the VM (`RunState` in `qapi/run-state.json`).
    pub enum RunState {
        Debug => "debug",
        Inmigrate => "inmigrate",
        InternalError => "internal-error",
        IoError => "io-error",
        Paused => "paused",
        Postmigrate => "postmigrate",
        Prelaunch => "prelaunch",
        FinishMigrate => "finish-migrate",
        RestoreVm => "restore-vm",
        Running => "running",
        SaveVm => "save-vm",
        Shutdown => "shutdown",
        Suspended => "suspended",
        Watchdog => "watchdog",
        GuestPanicked => "guest-panicked",
        Colo => "colo",
    }
}

open_enum! {
    /// The I/O status of a block device or job (`BlockDeviceIoStatus`).
    pub enum BlockDeviceIoStatus {
        Ok => "ok",
        Failed => "failed",
        Nospace => "nospace",
    }
}

open_enum! {
    /// How `transaction` treats jobs it starts when one action fails (`ActionCompletionMode`).
    pub enum ActionCompletionMode {
        /// Each job completes on its own.
        Individual => "individual",
        /// All jobs succeed or all fail together.
        Grouped => "grouped",
    }
}

open_enum! {
    /// How `block-export-del` treats an export still in use (`BlockExportRemoveMode`).
    pub enum BlockExportRemoveMode {
        /// Refuse if clients are connected.
        Safe => "safe",
        /// Disconnect the clients.
        Hard => "hard",
    }
}

open_enum! {
    /// The `meta-type` of a `query-qmp-schema` entry (`SchemaMetaType`).
    pub enum SchemaMetaType {
        Builtin => "builtin",
        Enum => "enum",
        Array => "array",
        Object => "object",
        Alternate => "alternate",
        Command => "command",
        Event => "event",
    }
}
