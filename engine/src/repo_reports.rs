//! The `--json` reports of the commands that read or set up a repository without QEMU (`list`, `show`,
//! `init`, `policy`): types the binary prints and programs (the tests) read back. The binary prints each
//! through a `serde_json::Value`, whose keys come out sorted: the bytes these commands always printed.

use std::path::PathBuf;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use chain::{Node, NodeId, Policy};

/// One VM of `qmpbak list REPO`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmRow {
    pub vm: String,
    /// How many nodes the VM's tree has.
    pub nodes: usize,
    pub current: Option<NodeId>,
    /// When the newest node was made; none before the first.
    pub last_backup: Option<DateTime<Utc>>,
}

/// `qmpbak list REPO/VM`: the VM's tree.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TreeReport {
    pub vm: String,
    pub chain_id: String,
    pub current: Option<NodeId>,
    pub nodes: Vec<Node>,
}

/// `qmpbak show NODE`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShowReport {
    pub node: Node,
    /// Whether the node is the VM's current one.
    pub current: bool,
    /// The nodes a restore of this one reads, this one first.
    pub recovery_chain: Vec<String>,
}

/// `qmpbak init`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InitReport {
    pub repo: PathBuf,
    pub block_size: u64,
    pub full_every: u32,
    pub retention: Option<Policy>,
    pub encrypted: bool,
}

/// `qmpbak policy`: the repository's default retention after the command.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PolicyReport {
    pub repo: PathBuf,
    pub retention: Option<Policy>,
}
