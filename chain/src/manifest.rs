//! The manifest: everything qmpbak knows about one VM's backups. Its serde model lives in [`crate::model`]
//! (re-exported here); this module has the operations that keep its tree valid and [`Manifest::validate`],
//! which checks all of it.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};

use crate::error::{Error, ManifestProblem, Result};
use crate::names::{NodeId, RelPath, check_name, name_problem, rel_path_problem};
use crate::tree::{self, Tree};

pub use crate::model::{
    BitmapRecord, CommitDisk, CommitRecord, DiskIdentity, DriveSwitch, FORMAT_VERSION, Location, Manifest,
    Node, NodeDisk, NodeKind, NodeState, Operation, Payload, ServedChain, ViewRecord, new_disk_key,
};
use crate::model::{is_chain_id, random_hex8};

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
            let named: Vec<&NodeId> = match &op.payload {
                Payload::Revert { time_point, .. } => vec![time_point],
                Payload::Commit(record) => vec![&record.node, &record.parent],
                Payload::Prune { removing, .. } => removing.iter().collect(),
                Payload::Merge { folded } => folded.iter().collect(),
                _ => Vec::new(),
            };
            for node in named {
                if let Some(reason) = name_problem(node.as_str()) {
                    return invalid(format!("operations[{i}].payload"), node.as_str(), reason);
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
