//! The manifest's data model: the serde types of one VM's backups (pretty JSON, snake_case, RFC 3339 times)
//! and nothing that changes or checks them, so that [`crate::tree`] can number nodes without depending on
//! [`crate::manifest`], which keeps the tree valid.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::ids::{NodeId, RelPath};

/// The manifest format this qmpbak writes and the newest it reads.
pub const FORMAT_VERSION: u32 = 1;

/// One VM's backups.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format_version: u32,
    /// The VM's name, which is also its directory's name.
    pub vm: String,
    /// 8 random hex digits chosen when the manifest was created; part of the names of the dirty bitmaps this
    /// repository owns in QEMU, so two repositories backing up one VM do not take each other's bitmaps.
    pub chain_id: String,
    pub created: DateTime<Utc>,
    /// The sequence number of the next node id ([`Manifest::next_node_id`]).
    pub next_seq: u64,
    /// The VM's disks as last seen.
    pub disks: Vec<DiskIdentity>,
    /// Every node, in creation order.
    pub nodes: Vec<Node>,
    /// The node the VM's dirty bitmaps count from: the next incremental's parent.
    pub current: Option<NodeId>,
    /// Operations that started and have not been cleaned up (in flight, or left by a process that died).
    #[serde(default)]
    pub operations: Vec<Operation>,
}

/// A disk of the VM, as QEMU showed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskIdentity {
    /// The disk's stable name (the device's qdev id, else its drive name, else its device path); names the
    /// disk's files.
    pub id: String,
    /// The block node name behind the device.
    pub node_name: Option<String>,
    pub virtual_size: u64,
    pub serial: Option<String>,
    /// The image file QEMU had open (the protocol node below the format node) when the current node was made:
    /// a disk whose image is another file is another disk.
    pub filename: Option<String>,
    /// 8 random hex digits chosen when the disk was first backed up; part of the names of its dirty bitmaps,
    /// so a bitmap is only ever used for the disk it was made on. `None` in manifests of older qmpbak versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// A new random disk key ([`DiskIdentity::key`]).
pub fn new_disk_key() -> String {
    random_hex8()
}

/// One backup (or snapshot) of the VM: a node of the tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Node {
    pub id: NodeId,
    /// The node this one is based on; `None` for a full backup that starts a tree.
    pub parent: Option<NodeId>,
    pub kind: NodeKind,
    pub created: DateTime<Utc>,
    pub state: NodeState,
    /// A user's name for the node; unique, and usable wherever a node id is.
    pub tag: Option<String>,
    /// Why this level (full, incremental …) was chosen.
    pub reason: Option<String>,
    /// Preorder number (see [`crate::tree`]); maintained by the manifest.
    pub lid: u64,
    /// Largest `lid` in this node's subtree; maintained by the manifest.
    pub tid: u64,
    pub disks: Vec<NodeDisk>,
}

/// What kind of backup a node is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeKind {
    /// Every allocated block; starts a tree.
    Full,
    /// The blocks changed since the parent.
    Incremental,
    /// The blocks changed since the last full.
    Differential,
    /// A point-in-time state kept without copying the disks elsewhere.
    Snapshot,
}

/// Whether a node's data is usable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    /// Being written; not usable yet.
    Pending,
    /// Written, synced and checked: usable.
    Complete,
    /// The backup failed; kept for the record until pruned.
    Failed,
}

impl fmt::Display for NodeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            NodeKind::Full => "full",
            NodeKind::Incremental => "incremental",
            NodeKind::Differential => "differential",
            NodeKind::Snapshot => "snapshot",
        })
    }
}

impl fmt::Display for NodeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            NodeState::Pending => "pending",
            NodeState::Complete => "complete",
            NodeState::Failed => "failed",
        })
    }
}

/// One disk's data in a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeDisk {
    /// The disk's id ([`DiskIdentity::id`]).
    pub disk: String,
    /// The qcow2 file, relative to the VM directory.
    pub file: RelPath,
    /// The qcow2's backing file (the parent's), relative to the VM directory.
    pub backing: Option<RelPath>,
    pub virtual_size: u64,
    /// Bytes the file takes on the host.
    pub allocated_bytes: u64,
    /// The dirty bitmap that counts changes since this node.
    pub bitmap: Option<String>,
    /// The checking table (a sha256 per block of the disk as the guest sees it at this node).
    pub table: Option<RelPath>,
    /// sha256 of the table file.
    pub table_sha256: Option<String>,
    pub location: Location,
}

/// Where a file was written, for the record (the manifest's relative path is what is used).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Location {
    pub host: String,
    /// The absolute path where the file was written.
    pub path: String,
    /// Where it was before, if it was moved.
    pub predecessor: Option<String>,
}

/// An operation in progress: what it created in QEMU and on disk, so that a later run can clean up after a
/// process that died.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Operation {
    pub id: String,
    pub kind: OperationKind,
    pub node: Option<NodeId>,
    pub started: DateTime<Utc>,
    pub pid: u32,
    pub host: String,
    /// Block job ids.
    #[serde(default)]
    pub jobs: Vec<String>,
    /// Block node names added.
    #[serde(default)]
    pub block_nodes: Vec<String>,
    #[serde(default)]
    pub bitmaps: Vec<BitmapRecord>,
    /// Files created, relative to the VM directory.
    #[serde(default)]
    pub files: Vec<RelPath>,
    pub note: Option<String>,
}

/// A dirty bitmap on a block node.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BitmapRecord {
    pub node: String,
    pub name: String,
}

/// What an [`Operation`] does. Open: a kind this qmpbak does not know is kept as [`OperationKind::Other`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum OperationKind {
    Backup,
    Restore,
    Snapshot,
    Commit,
    Prune,
    Merge,
    Other(String),
}

impl OperationKind {
    pub fn as_str(&self) -> &str {
        match self {
            OperationKind::Backup => "backup",
            OperationKind::Restore => "restore",
            OperationKind::Snapshot => "snapshot",
            OperationKind::Commit => "commit",
            OperationKind::Prune => "prune",
            OperationKind::Merge => "merge",
            OperationKind::Other(other) => other,
        }
    }
}

impl From<&str> for OperationKind {
    fn from(s: &str) -> OperationKind {
        match s {
            "backup" => OperationKind::Backup,
            "restore" => OperationKind::Restore,
            "snapshot" => OperationKind::Snapshot,
            "commit" => OperationKind::Commit,
            "prune" => OperationKind::Prune,
            "merge" => OperationKind::Merge,
            other => OperationKind::Other(other.to_owned()),
        }
    }
}

impl fmt::Display for OperationKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for OperationKind {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for OperationKind {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        Ok(OperationKind::from(s.as_str()))
    }
}

impl Operation {
    /// A new operation by this process on this host, with a random id.
    pub fn new(kind: OperationKind, node: Option<NodeId>, now: DateTime<Utc>) -> Operation {
        Operation {
            id: format!("{}-{}", now.format("%Y%m%dT%H%M%SZ"), random_hex8()),
            kind,
            node,
            started: now,
            pid: std::process::id(),
            host: crate::host::hostname(),
            jobs: Vec::new(),
            block_nodes: Vec::new(),
            bitmaps: Vec::new(),
            files: Vec::new(),
            note: None,
        }
    }
}

/// 8 random hex digits (from the standard library's randomly seeded hasher, plus the time and pid).
pub(crate) fn random_hex8() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    hasher.write_u128(nanos);
    hasher.write_u32(std::process::id());
    format!("{:08x}", hasher.finish() as u32)
}

pub(crate) fn is_chain_id(s: &str) -> bool {
    s.len() == 8 && s.bytes().all(|b| b.is_ascii_hexdigit())
}
