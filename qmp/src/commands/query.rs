//! Read-only queries: version, schema, run state, block devices, nodes and graph, jobs.

use serde::{Deserialize, Serialize};

use super::command;
use crate::types::{
    BlockDeviceInfo, BlockGraph, BlockInfo, BlockJobInfo, JobInfo, SchemaInfo, StatusInfo, VersionInfo,
};

/// `query-version`: QEMU's version.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueryVersion;
command!(QueryVersion, "query-version", VersionInfo);

/// `query-qmp-schema`: the introspected schema; see `Capabilities` for the useful view of it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueryQmpSchema;
command!(QueryQmpSchema, "query-qmp-schema", Vec<SchemaInfo>);

/// `query-status`: whether the VM runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueryStatus;
command!(QueryStatus, "query-status", StatusInfo);

/// `query-block`: the guest-visible block backends and their root nodes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueryBlock;
command!(QueryBlock, "query-block", Vec<BlockInfo>);

/// `query-named-block-nodes`: every named node; with `flat: true`, backing images are not nested in `image`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueryNamedBlockNodes {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flat: Option<bool>,
}
command!(
    QueryNamedBlockNodes,
    "query-named-block-nodes",
    Vec<BlockDeviceInfo>
);

/// `query-jobs`: every job, block or not, with status, progress and error.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueryJobs;
command!(QueryJobs, "query-jobs", Vec<JobInfo>);

/// `query-block-jobs`: the block jobs, with offsets and speed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueryBlockJobs;
command!(QueryBlockJobs, "query-block-jobs", Vec<BlockJobInfo>);

/// `x-debug-query-block-graph`: every node and the edges (`file`, `backing`, …) between them. Unstable (`x-`)
/// but present in every QEMU qmpbak supports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct XDebugQueryBlockGraph;
command!(XDebugQueryBlockGraph, "x-debug-query-block-graph", BlockGraph);
