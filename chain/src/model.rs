//! The manifest's data model: the serde types of one VM's backups (pretty JSON, snake_case, RFC 3339 times)
//! and nothing that changes or checks them, so that [`crate::tree`] can number nodes without depending on
//! [`crate::manifest`], which keeps the tree valid.

use std::fmt;
use std::path::PathBuf;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::ids::{NodeId, RelPath};

/// The manifest format this qmpbak writes and the newest it reads.
///
/// 2: an operation record's payload is a typed [`Payload`] (tagged by `kind`); format 1 had a `kind` string
/// and a free-text `note`, and is read by converting its records ([`crate::v1`]).
pub const FORMAT_VERSION: u32 = 2;

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
    /// The checking table (a SHA-256 digest per block of the disk as the guest sees it at this node).
    pub table: Option<RelPath>,
    /// sha256 of the table file.
    pub table_sha256: Option<String>,
    pub location: Location,
    /// The host whose QEMU served the disk's data (the hypervisor), when it is not `location.host`, the host
    /// that wrote the file: a pull backup reads the disk over the network. Absent in older manifests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_host: Option<String>,
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
/// process that died. What is particular to its kind, and what recovery needs to know of it, is its
/// [`Payload`]. A record is data from a file: recovery checks everything it names before acting on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Operation {
    pub id: String,
    /// The node the operation makes (a backup's, a time point's, a live restore's or a merge's); `None` for
    /// the operations that work on no one node (revert, commit, prune).
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
    /// What the operation is, with what recovery needs to know of it.
    #[serde(serialize_with = "write_payload", deserialize_with = "read_payload")]
    pub payload: Payload,
    /// The free-text note of a format-1 record that no field of its payload took (see [`crate::v1`]): kept for
    /// the reader, never acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub legacy_note: Option<String>,
}

/// A dirty bitmap on a block node.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BitmapRecord {
    pub node: String,
    pub name: String,
}

/// What a pull backup's copy-before-write view changed in the VM's QEMU, recorded before each change is made.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ViewRecord {
    /// The run paused a running VM for the view's instant (set before `stop`, cleared after `cont`).
    #[serde(default)]
    pub paused_vm: bool,
    /// The devices whose drive the run switches (or switched) to a copy-before-write filter.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub switched: Vec<DriveSwitch>,
}

/// One device's drive switched to a copy-before-write filter: QOM path of the device, the node it was attached
/// to, the filter's node name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriveSwitch {
    pub device: String,
    pub original: String,
    pub filter: String,
}

/// What an [`Operation`] does, one variant per kind, tagged `kind` in the manifest. A kind this qmpbak does
/// not know is read as [`Payload::Other`] (its other fields dropped).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Payload {
    /// A backup into the record's node.
    Backup {
        /// The run started the VM's NBD server (a checksum-diff reads the disks over it): recovery stops it.
        #[serde(default)]
        nbd_server_started: bool,
        /// Scratch images a pull backup made on the hypervisor for the disks' old data (absolute paths there,
        /// written only through the VM's QEMU): recovery empties them (QMP cannot delete a file).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        scratch: Vec<PathBuf>,
        /// A pull's copy-before-write view: whether the run paused the VM and which devices it switched to
        /// its filters (recovery switches them back and resumes a VM the run paused).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        view: Option<ViewRecord>,
        /// The guest agent's socket through which the run froze the guest's filesystems (`--quiesce`), set
        /// before the freeze and cleared after the thaw: recovery thaws them through it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        frozen_by: Option<PathBuf>,
    },
    /// A time point (the record's node).
    Snapshot {
        /// The overlays it created beside the VM's disks (absolute paths), outside the repository.
        #[serde(default)]
        outside_files: Vec<PathBuf>,
    },
    /// A revert to a time point; makes no node.
    Revert {
        time_point: NodeId,
        /// The overlays it created beside the VM's disks (absolute paths), outside the repository.
        #[serde(default)]
        outside_files: Vec<PathBuf>,
    },
    /// A commit of a time point into its parent. It cannot be undone once a disk is committed, so recovery
    /// finishes it.
    Commit(CommitRecord),
    /// A live restore of the record's node: the VM runs on the node's chain until streaming ends, so recovery
    /// finishes it.
    LiveRestore {
        /// Across hosts: the chain is served from the backup host over NBD (absent: the VM's QEMU opens the
        /// repository's files itself).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        served: Option<ServedChain>,
    },
    /// A live restore's emptiness check: it starts an NBD server in the VM's QEMU and exports the target disks
    /// read-only as `<record id>-<index>`, for about a second, before the live restore's own record exists.
    /// Recorded before the server starts and dropped once both are gone; recovery removes the exports and
    /// stops the server. It makes no node.
    EmptyCheck {},
    /// A prune (offline), removing nodes in this order.
    Prune {
        /// The retention policy, in words.
        #[serde(default)]
        policy: String,
        #[serde(default)]
        removing: Vec<NodeId>,
    },
    /// A merge (offline) of the record's node's recovery chain into the node.
    Merge {
        /// The nodes folded into it, oldest first.
        #[serde(default)]
        folded: Vec<NodeId>,
    },
    /// A format-1 record that could not be read as its kind `was` (its note is kept in
    /// [`Operation::legacy_note`]): recovery does not act on it.
    Unreadable { was: String },
    /// A kind this qmpbak does not know (written by another version); written back as its bare kind.
    #[serde(skip)]
    Other(String),
}

/// How a live restore across hosts serves its node's chain: a qemu-storage-daemon on the backup host listening
/// on `host:port` (restarted there by recovery, which needs the same address), one read-only export per disk,
/// and in the VM's QEMU one `nbd` block node per disk (the record's `block_nodes`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServedChain {
    /// The address the daemon listens on (an IP address of the backup host).
    pub host: String,
    pub port: u16,
    /// The disks restored, in the order of their index in the jobs' and nodes' names.
    pub disks: Vec<String>,
    /// TLS (`false`: plaintext, as `--insecure-plaintext` allowed).
    pub tls: bool,
    /// The `tls-creds-x509` object qmpbak added to the VM's QEMU for the NBD client (removed at the end); `None`
    /// when it used one the VM had, or none (plaintext).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creds_object: Option<String>,
}

/// What a commit needs to be finished: the time point, its parent, and per disk the files involved. Taken from
/// the manifest when the commit begins; recovery acts only if the manifest still says the same.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommitRecord {
    /// The time point whose increment is merged (it stays in the tree).
    pub node: NodeId,
    /// Its parent, which absorbs it and leaves the tree.
    pub parent: NodeId,
    pub disks: Vec<CommitDisk>,
}

/// One disk of a [`CommitRecord`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommitDisk {
    pub disk: String,
    /// The time point's increment (its location in the VM's storage): leaves the disk's chain.
    pub increment: String,
    /// The parent's file: absorbs the increment.
    pub into: String,
}

impl Payload {
    /// The kind names this qmpbak reads as typed payloads.
    pub const KINDS: [&'static str; 9] = [
        "backup",
        "snapshot",
        "revert",
        "commit",
        "live_restore",
        "empty_check",
        "prune",
        "merge",
        "unreadable",
    ];

    /// The kind's name, as the manifest's `kind` tag writes it.
    pub fn kind(&self) -> &str {
        match self {
            Payload::Backup { .. } => "backup",
            Payload::Snapshot { .. } => "snapshot",
            Payload::Revert { .. } => "revert",
            Payload::Commit(_) => "commit",
            Payload::LiveRestore { .. } => "live_restore",
            Payload::EmptyCheck {} => "empty_check",
            Payload::Prune { .. } => "prune",
            Payload::Merge { .. } => "merge",
            Payload::Unreadable { .. } => "unreadable",
            Payload::Other(kind) => kind,
        }
    }

    /// The files a snapshot or revert created outside the repository (none for other kinds).
    pub fn outside_files(&self) -> &[PathBuf] {
        match self {
            Payload::Snapshot { outside_files } | Payload::Revert { outside_files, .. } => outside_files,
            _ => &[],
        }
    }

    /// Whether recovery stops the VM's NBD server: a backup that started it, and a live restore's emptiness
    /// check (recorded before its server starts; its record is dropped at once when the start fails).
    pub fn started_nbd_server(&self) -> bool {
        matches!(
            self,
            Payload::Backup {
                nbd_server_started: true,
                ..
            } | Payload::EmptyCheck {}
        )
    }
}

/// Writes a payload; [`Payload::Other`] as its bare kind.
fn write_payload<S: Serializer>(payload: &Payload, serializer: S) -> std::result::Result<S::Ok, S::Error> {
    match payload {
        Payload::Other(kind) => {
            use serde::ser::SerializeMap as _;
            let mut map = serializer.serialize_map(Some(1))?;
            map.serialize_entry("kind", kind)?;
            map.end()
        }
        known => known.serialize(serializer),
    }
}

/// Reads a payload: a known kind strictly (a malformed one fails the manifest's load), any other kind as
/// [`Payload::Other`].
fn read_payload<'de, D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Payload, D::Error> {
    use serde::de::Error as _;
    let value = serde_json::Value::deserialize(deserializer)?;
    let kind = value
        .get("kind")
        .and_then(serde_json::Value::as_str)
        .ok_or_else(|| D::Error::missing_field("kind"))?;
    if Payload::KINDS.contains(&kind) {
        Payload::deserialize(value).map_err(D::Error::custom)
    } else {
        Ok(Payload::Other(kind.to_owned()))
    }
}

impl Operation {
    /// A new operation by this process on this host, with a random id.
    pub fn new(payload: Payload, node: Option<NodeId>, now: DateTime<Utc>) -> Operation {
        Operation {
            id: format!("{}-{}", now.format("%Y%m%dT%H%M%SZ"), random_hex8()),
            node,
            started: now,
            pid: std::process::id(),
            host: crate::host::hostname(),
            jobs: Vec::new(),
            block_nodes: Vec::new(),
            bitmaps: Vec::new(),
            files: Vec::new(),
            payload,
            legacy_note: None,
        }
    }

    /// The kind's name ([`Payload::kind`]).
    pub fn kind(&self) -> &str {
        self.payload.kind()
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
