//! Data types QEMU sends or takes: open enums and the reply structures of the typed commands.
//!
//! Grouped by subject; everything is re-exported here and at the crate root.

mod block;
mod enums;
mod introspection;
mod job;
mod machine;

pub use block::{
    BlockDeviceInfo, BlockExportInfo, BlockGraph, BlockGraphEdge, BlockGraphNode, BlockInfo, DirtyBitmapInfo,
    ImageInfo,
};
pub use enums::{
    ActionCompletionMode, BitmapSyncMode, BlockDeviceIoStatus, BlockExportRemoveMode, BlockdevOnError,
    JobStatus, JobType, MirrorSyncMode, RunState, SchemaMetaType,
};
pub use introspection::SchemaInfo;
pub use job::{BlockJobInfo, JobInfo};
pub use machine::{Greeting, StatusInfo, VersionInfo, VersionTriple};
