//! The manifest: everything qmpbak knows about one VM's backups, as a serde model (pretty JSON, snake_case,
//! RFC 3339 times), with the operations that keep its tree valid and [`Manifest::validate`], which checks all
//! of it.

use std::collections::{HashMap, HashSet};
use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{Error, ManifestProblem, Result};
use crate::names::{NodeId, RelPath, check_name, name_problem, rel_path_problem};
use crate::tree::{self, Tree};

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
            host: crate::lock::hostname(),
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

fn is_chain_id(s: &str) -> bool {
    s.len() == 8 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

impl Manifest {
    /// An empty manifest for VM `vm` with a new random chain id.
    pub fn new(vm: impl Into<String>, now: DateTime<Utc>) -> Manifest {
        Manifest {
            format_version: FORMAT_VERSION,
            vm: vm.into(),
            chain_id: random_hex8(),
            created: now,
            next_seq: 1,
            disks: Vec::new(),
            nodes: Vec::new(),
            current: None,
            operations: Vec::new(),
        }
    }

    /// Hands out the next node id ("0001", "0002" …) and advances `next_seq`. Never returns an id in use.
    ///
    /// Fails with [`Error::NodeIdsExhausted`] (changing nothing) when the sequence would pass `u64::MAX`: it
    /// never wraps around.
    pub fn next_node_id(&mut self) -> Result<NodeId> {
        let mut seq = self.next_seq.max(1);
        loop {
            let next = seq.checked_add(1).ok_or_else(|| Error::NodeIdsExhausted {
                vm: self.vm.clone(),
                seq,
            })?;
            let id = NodeId::from_seq(seq);
            if self.node(&id).is_none() && !self.nodes.iter().any(|n| n.tag.as_deref() == Some(id.as_str())) {
                self.next_seq = next;
                return Ok(id);
            }
            seq = next;
        }
    }

    /// The node with this id.
    pub fn node(&self, id: &NodeId) -> Option<&Node> {
        self.nodes.iter().find(|n| n.id == *id)
    }

    /// The node with this id, to change its state, tag, reason or disks. Change `parent` only through
    /// [`Manifest::reparent`], which renumbers the tree.
    pub fn node_mut(&mut self, id: &NodeId) -> Option<&mut Node> {
        self.nodes.iter_mut().find(|n| n.id == *id)
    }

    /// The node a user means by `wanted`: its id, its tag, or its sequence number without the zero padding
    /// ("3" for "0003"), in that order.
    pub fn find(&self, wanted: &str) -> Option<&Node> {
        if let Some(node) = self.nodes.iter().find(|n| n.id == wanted) {
            return Some(node);
        }
        if let Some(node) = self.nodes.iter().find(|n| n.tag.as_deref() == Some(wanted)) {
            return Some(node);
        }
        if !wanted.is_empty() && wanted.bytes().all(|b| b.is_ascii_digit()) {
            let seq: u64 = wanted.parse().ok()?;
            return self.nodes.iter().find(|n| n.id.seq() == Some(seq));
        }
        None
    }

    /// Ids and tags that look like `wanted` (small edit distance, or one is a prefix of the other), closest
    /// first, at most five: for "did you mean".
    pub fn near_matches(&self, wanted: &str) -> Vec<String> {
        let names = self
            .nodes
            .iter()
            .flat_map(|n| std::iter::once(n.id.as_str()).chain(n.tag.as_deref()));
        let limit = if wanted.chars().count() <= 3 { 1 } else { 2 };
        let lower = wanted.to_lowercase();
        let mut near: Vec<(usize, &str)> = names
            .filter(|name| *name != wanted)
            .filter_map(|name| {
                let candidate = name.to_lowercase();
                let distance = edit_distance(&lower, &candidate);
                let prefix =
                    !lower.is_empty() && (candidate.starts_with(&lower) || lower.starts_with(&candidate));
                (distance <= limit || prefix).then_some((distance, name))
            })
            .collect();
        near.sort_unstable();
        near.dedup_by(|a, b| a.1 == b.1);
        near.into_iter()
            .take(5)
            .map(|(_, name)| name.to_owned())
            .collect()
    }

    /// The description of a disk.
    pub fn disk(&self, id: &str) -> Option<&DiskIdentity> {
        self.disks.iter().find(|d| d.id == id)
    }

    /// Adds a node at the end of the node list (it is the newest) and renumbers the tree.
    ///
    /// Its id, tag, disk ids and paths must be valid, its id and tag unused, and its parent present. Its
    /// `lid`/`tid` are ignored and set. `next_seq` moves past a numeric id.
    pub fn add_node(&mut self, mut node: Node) -> Result<()> {
        node.id.check()?;
        if self.node(&node.id).is_some() {
            return Err(Error::NodeExists {
                vm: self.vm.clone(),
                node: node.id,
            });
        }
        if let Some(other) = self
            .nodes
            .iter()
            .find(|n| n.tag.as_deref() == Some(node.id.as_str()))
        {
            return Err(Error::TagInUse {
                vm: self.vm.clone(),
                tag: node.id.to_string(),
                other: other.id.clone(),
            });
        }
        if let Some(parent) = &node.parent {
            parent.check()?;
            if self.node(parent).is_none() {
                return Err(Error::ParentNotFound {
                    vm: self.vm.clone(),
                    parent: parent.clone(),
                    node: node.id,
                });
            }
        }
        if let Some(tag) = &node.tag {
            self.check_tag(tag, &node.id)?;
        }
        for disk in &node.disks {
            check_name("disk id", &disk.disk)?;
            disk.file.check()?;
            for path in disk.backing.iter().chain(&disk.table) {
                path.check()?;
            }
        }
        if let Some(seq) = node.id.seq() {
            let next = seq.checked_add(1).ok_or_else(|| Error::NodeIdsExhausted {
                vm: self.vm.clone(),
                seq,
            })?;
            self.next_seq = self.next_seq.max(next);
        }
        node.lid = 0;
        node.tid = 0;
        self.nodes.push(node);
        self.recompute_numbering()
    }

    fn check_tag(&self, tag: &str, node: &NodeId) -> Result<()> {
        check_name("tag", tag)?;
        let clash = self
            .nodes
            .iter()
            .find(|n| n.id != *node && (n.tag.as_deref() == Some(tag) || n.id == tag));
        match clash {
            Some(other) => Err(Error::TagInUse {
                vm: self.vm.clone(),
                tag: tag.to_owned(),
                other: other.id.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Sets or clears a node's tag; a tag must be a valid name used by no other node (as tag or id).
    pub fn set_tag(&mut self, id: &NodeId, tag: Option<String>) -> Result<()> {
        if let Some(tag) = &tag {
            self.check_tag(tag, id)?;
        }
        let vm = self.vm.clone();
        let node = self.node_mut(id).ok_or_else(|| Error::NodeNotFound {
            vm,
            node: id.to_string(),
        })?;
        node.tag = tag;
        Ok(())
    }

    /// Removes a leaf node. A node with children is refused ([`Error::NotALeaf`]); see
    /// [`Manifest::remove_node_reparent`]. If it was `current`, `current` becomes `None` (the next backup
    /// cannot count changes from a node that is gone).
    pub fn remove_node(&mut self, id: &NodeId) -> Result<Node> {
        let position = self.position(id)?;
        let children: Vec<NodeId> = self
            .nodes
            .iter()
            .filter(|n| n.parent.as_ref() == Some(id))
            .map(|n| n.id.clone())
            .collect();
        if !children.is_empty() {
            return Err(Error::NotALeaf {
                vm: self.vm.clone(),
                node: id.clone(),
                children,
            });
        }
        let node = self.nodes.remove(position);
        if self.current.as_ref() == Some(id) {
            self.current = None;
        }
        self.recompute_numbering()?;
        Ok(node)
    }

    /// Removes a node and gives its children to its parent (they become roots if it was one): for prune,
    /// after its data has been merged into the children. `current` is cleared as by
    /// [`Manifest::remove_node`].
    pub fn remove_node_reparent(&mut self, id: &NodeId) -> Result<Node> {
        let position = self.position(id)?;
        let node = self.nodes.remove(position);
        for child in self.nodes.iter_mut().filter(|n| n.parent.as_ref() == Some(id)) {
            child.parent.clone_from(&node.parent);
        }
        if self.current.as_ref() == Some(id) {
            self.current = None;
        }
        self.recompute_numbering()?;
        Ok(node)
    }

    /// Moves a node (with its subtree) under another parent, or makes it a root, and renumbers. Refuses to
    /// move a node below itself.
    pub fn reparent(&mut self, id: &NodeId, parent: Option<NodeId>) -> Result<()> {
        let position = self.position(id)?;
        if let Some(p) = &parent {
            let tree = self.tree()?;
            let (Some(target), Some(moving)) = (tree.get(p.as_str()), tree.get(id.as_str())) else {
                return Err(Error::ParentNotFound {
                    vm: self.vm.clone(),
                    node: id.clone(),
                    parent: p.clone(),
                });
            };
            if Tree::contains(moving, target) {
                return Err(Error::MoveIntoOwnSubtree {
                    vm: self.vm.clone(),
                    node: id.clone(),
                    parent: p.clone(),
                });
            }
        }
        self.nodes[position].parent = parent;
        self.recompute_numbering()
    }

    fn position(&self, id: &NodeId) -> Result<usize> {
        self.nodes
            .iter()
            .position(|n| n.id == *id)
            .ok_or_else(|| Error::NodeNotFound {
                vm: self.vm.clone(),
                node: id.to_string(),
            })
    }

    /// Recomputes every node's `lid`/`tid` from the parent links.
    pub fn recompute_numbering(&mut self) -> Result<()> {
        tree::recompute(&mut self.nodes).map_err(|problem| Error::ManifestInconsistent {
            vm: self.vm.clone(),
            problem,
        })
    }

    /// The tree, indexed for queries. Fails if the numbering is stale (nodes changed without
    /// [`Manifest::recompute_numbering`]).
    pub fn tree(&self) -> Result<Tree<'_>> {
        Tree::new(&self.nodes).map_err(|problem| Error::ManifestInconsistent {
            vm: self.vm.clone(),
            problem,
        })
    }

    fn not_found(&self, id: &NodeId) -> Error {
        Error::NodeNotFound {
            vm: self.vm.clone(),
            node: id.to_string(),
        }
    }

    /// What restoring `id` needs: the full first, `id` last. One query costs one scan to index the tree; for
    /// many queries, use [`Manifest::tree`].
    pub fn recovery_chain(&self, id: &NodeId) -> Result<Vec<&Node>> {
        self.tree()?
            .recovery_chain(id.as_str())
            .ok_or_else(|| self.not_found(id))
    }

    /// The ancestors of `id`, root first.
    pub fn ancestors(&self, id: &NodeId) -> Result<Vec<&Node>> {
        self.tree()?
            .ancestors(id.as_str())
            .ok_or_else(|| self.not_found(id))
    }

    /// The children of `id`, oldest first.
    pub fn children(&self, id: &NodeId) -> Result<Vec<&Node>> {
        self.tree()?
            .children(id.as_str())
            .ok_or_else(|| self.not_found(id))
    }

    /// `id` and everything below it, in preorder.
    pub fn subtree(&self, id: &NodeId) -> Result<Vec<&Node>> {
        self.tree()?
            .subtree(id.as_str())
            .ok_or_else(|| self.not_found(id))
    }

    /// Nodes without children, in preorder.
    pub fn leaves(&self) -> Result<Vec<&Node>> {
        Ok(self.tree()?.leaves())
    }

    /// The most recently created leaf below (or at) `id`.
    pub fn branch_head(&self, id: &NodeId) -> Result<&Node> {
        self.tree()?
            .branch_head(id.as_str())
            .ok_or_else(|| self.not_found(id))
    }

    /// The nearest full backup at or above `id` (`None` if its chain has no full).
    pub fn last_full(&self, id: &NodeId) -> Result<Option<&Node>> {
        self.tree()?
            .last_full(id.as_str())
            .ok_or_else(|| self.not_found(id))
    }

    /// Records an operation that is starting.
    pub fn add_operation(&mut self, operation: Operation) {
        self.operations.push(operation);
    }

    /// Drops the record of a finished (or cleaned up) operation.
    pub fn remove_operation(&mut self, id: &str) -> Option<Operation> {
        let position = self.operations.iter().position(|o| o.id == id)?;
        Some(self.operations.remove(position))
    }

    /// Checks everything a manifest must satisfy: valid names, ids and paths; a tree (unique ids, parents
    /// present, no cycle) whose stored `lid`/`tid` match it; `current` present; tags unique; `next_seq`
    /// above every numeric id. Does not check `format_version` or which directory it belongs to
    /// (loading does).
    pub fn validate(&self) -> Result<(), ManifestProblem> {
        self.validate_values()?;
        tree::check(&self.nodes)?;
        if let Some(current) = &self.current {
            if self.node(current).is_none() {
                return Err(ManifestProblem::CurrentMissing {
                    current: current.to_string(),
                });
            }
        }
        let mut names: HashMap<&str, &str> = self
            .nodes
            .iter()
            .map(|n| (n.id.as_str(), n.id.as_str()))
            .collect();
        for node in &self.nodes {
            if let Some(tag) = node.tag.as_deref() {
                if let Some(other) = names.insert(tag, node.id.as_str()) {
                    if other != node.id.as_str() || tag != node.id.as_str() {
                        return Err(ManifestProblem::DuplicateTag {
                            tag: tag.to_owned(),
                            nodes: (other.to_owned(), node.id.to_string()),
                        });
                    }
                }
            }
            if let Some(seq) = node.id.seq() {
                if seq >= self.next_seq {
                    return Err(ManifestProblem::NextSeqTooLow {
                        next_seq: self.next_seq,
                        node: node.id.to_string(),
                    });
                }
            }
        }
        Ok(())
    }

    fn validate_values(&self) -> Result<(), ManifestProblem> {
        let invalid = |field: String, value: &str, reason: String| {
            Err(ManifestProblem::InvalidValue {
                field,
                value: value.to_owned(),
                reason,
            })
        };
        if let Some(reason) = name_problem(&self.vm) {
            return invalid("vm".to_owned(), &self.vm, reason);
        }
        if self.next_seq == u64::MAX {
            return invalid(
                "next_seq".to_owned(),
                &self.next_seq.to_string(),
                "no node id can follow it (the sequence ends there)".to_owned(),
            );
        }
        if !is_chain_id(&self.chain_id) {
            return invalid(
                "chain_id".to_owned(),
                &self.chain_id,
                "it must be 8 hex digits".to_owned(),
            );
        }
        let mut disk_ids = HashSet::new();
        for (i, disk) in self.disks.iter().enumerate() {
            if let Some(reason) = name_problem(&disk.id) {
                return invalid(format!("disks[{i}].id"), &disk.id, reason);
            }
            if !disk_ids.insert(disk.id.as_str()) {
                return invalid(
                    format!("disks[{i}].id"),
                    &disk.id,
                    "another disk has the same id".to_owned(),
                );
            }
            if let Some(key) = &disk.key {
                if !is_chain_id(key) {
                    return invalid(
                        format!("disks[{i}].key"),
                        key,
                        "it must be 8 hex digits".to_owned(),
                    );
                }
            }
        }
        for (i, node) in self.nodes.iter().enumerate() {
            if let Some(reason) = name_problem(node.id.as_str()) {
                return invalid(format!("nodes[{i}].id"), node.id.as_str(), reason);
            }
            let at = |field: &str| format!("node {} {field}", node.id);
            if let Some(parent) = &node.parent {
                if let Some(reason) = name_problem(parent.as_str()) {
                    return invalid(at("parent"), parent.as_str(), reason);
                }
            }
            if let Some(tag) = &node.tag {
                if let Some(reason) = name_problem(tag) {
                    return invalid(at("tag"), tag, reason);
                }
            }
            for (d, disk) in node.disks.iter().enumerate() {
                if let Some(reason) = name_problem(&disk.disk) {
                    return invalid(at(&format!("disks[{d}].disk")), &disk.disk, reason);
                }
                let paths = [
                    ("file", Some(&disk.file)),
                    ("backing", disk.backing.as_ref()),
                    ("table", disk.table.as_ref()),
                ];
                for (name, path) in paths {
                    if let Some(reason) = path.and_then(|p| rel_path_problem(p.as_str())) {
                        let value = path.map_or("", RelPath::as_str);
                        return invalid(at(&format!("disks[{d}].{name}")), value, reason);
                    }
                }
                if let Some(sha) = &disk.table_sha256 {
                    if sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
                        return invalid(
                            at(&format!("disks[{d}].table_sha256")),
                            sha,
                            "it must be 64 hex digits".into(),
                        );
                    }
                }
            }
        }
        if let Some(current) = &self.current {
            if let Some(reason) = name_problem(current.as_str()) {
                return invalid("current".to_owned(), current.as_str(), reason);
            }
        }
        for (i, op) in self.operations.iter().enumerate() {
            if let Some(node) = &op.node {
                if let Some(reason) = name_problem(node.as_str()) {
                    return invalid(format!("operations[{i}].node"), node.as_str(), reason);
                }
            }
            for (f, file) in op.files.iter().enumerate() {
                if let Some(reason) = rel_path_problem(file.as_str()) {
                    return invalid(format!("operations[{i}].files[{f}]"), file.as_str(), reason);
                }
            }
        }
        Ok(())
    }
}

/// Levenshtein distance between two short strings.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1).min(row[j] + 1).min(diagonal + usize::from(ca != cb));
            diagonal = above;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edit_distances() {
        assert_eq!(edit_distance("", ""), 0);
        assert_eq!(edit_distance("abc", ""), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("0003", "0030"), 2);
    }

    #[test]
    fn chain_ids_are_hex() {
        let a = random_hex8();
        assert!(is_chain_id(&a), "{a}");
        assert!(!is_chain_id("xyz"));
    }
}
