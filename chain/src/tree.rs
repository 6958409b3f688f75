//! The backup tree as nested sets. Every node has `lid`, its preorder number (from 1; roots in the order of the
//! node list, children in creation order, i.e. the order of the node list), and `tid`, the largest `lid` in its
//! subtree. Ancestry is then arithmetic: A is an ancestor-or-self of X exactly when `A.lid <= X.lid <= A.tid`.
//!
//! [`numbering`] computes the numbers from parent links (the only place that follows them); [`Tree`] answers
//! queries from the stored numbers alone, through an index by `lid`. Both work on a plain slice of nodes.

use std::collections::HashMap;

use crate::error::ManifestProblem;
use crate::model::{Node, NodeKind};
use crate::names::NodeId;

const NONE: usize = usize::MAX;

/// Computes `(lid, tid)` for every node of `nodes`, in the same order, from the parent links.
///
/// Fails on a duplicate id, a parent that is not in the list, or a cycle of parent links.
pub fn numbering(nodes: &[Node]) -> Result<Vec<(u64, u64)>, ManifestProblem> {
    let n = nodes.len();
    let mut position: HashMap<&str, usize> = HashMap::with_capacity(n);
    for (i, node) in nodes.iter().enumerate() {
        if position.insert(node.id.as_str(), i).is_some() {
            return Err(ManifestProblem::DuplicateNode {
                node: node.id.to_string(),
            });
        }
    }
    // Children as linked lists in node-list order: first_child / last_child / next_sibling.
    let mut first_child = vec![NONE; n];
    let mut last_child = vec![NONE; n];
    let mut next_sibling = vec![NONE; n];
    let mut roots = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let Some(parent) = &node.parent else {
            roots.push(i);
            continue;
        };
        let Some(&p) = position.get(parent.as_str()) else {
            return Err(ManifestProblem::MissingParent {
                node: node.id.to_string(),
                parent: parent.to_string(),
            });
        };
        if last_child[p] == NONE {
            first_child[p] = i;
        } else {
            next_sibling[last_child[p]] = i;
        }
        last_child[p] = i;
    }

    let mut numbers = vec![(0u64, 0u64); n];
    let mut counter = 0u64;
    // Iterative preorder: each stack entry is a node and the next child of it to visit.
    let mut stack: Vec<(usize, usize)> = Vec::new();
    for &root in &roots {
        counter += 1;
        numbers[root].0 = counter;
        stack.push((root, first_child[root]));
        while let Some(top) = stack.last_mut() {
            let child = top.1;
            if child == NONE {
                let node = top.0;
                stack.pop();
                numbers[node].1 = counter;
            } else {
                top.1 = next_sibling[child];
                counter += 1;
                numbers[child].0 = counter;
                stack.push((child, first_child[child]));
            }
        }
    }
    if counter as usize != n {
        // Some node is not below any root: its parent links loop. Report the loop itself.
        let start = numbers.iter().position(|&(lid, _)| lid == 0).unwrap_or(0);
        return Err(ManifestProblem::Cycle {
            nodes: cycle_from(nodes, &position, start),
        });
    }
    Ok(numbers)
}

/// The ids on the parent-link cycle reached from `start` (for the error message only).
fn cycle_from(nodes: &[Node], position: &HashMap<&str, usize>, start: usize) -> Vec<String> {
    let mut seen: HashMap<usize, usize> = HashMap::new();
    let mut path = Vec::new();
    let mut at = start;
    while let std::collections::hash_map::Entry::Vacant(slot) = seen.entry(at) {
        slot.insert(path.len());
        path.push(at);
        match nodes[at].parent.as_ref().and_then(|p| position.get(p.as_str())) {
            Some(&p) => at = p,
            None => break,
        }
    }
    let from = seen.get(&at).copied().unwrap_or(0);
    let mut cycle: Vec<String> = path[from..].iter().map(|&i| nodes[i].id.to_string()).collect();
    if let Some(first) = cycle.first().cloned() {
        cycle.push(first);
    }
    cycle
}

/// Writes fresh `lid`/`tid` into every node.
pub fn recompute(nodes: &mut [Node]) -> Result<(), ManifestProblem> {
    let numbers = numbering(nodes)?;
    for (node, (lid, tid)) in nodes.iter_mut().zip(numbers) {
        node.lid = lid;
        node.tid = tid;
    }
    Ok(())
}

/// Compares the stored `lid`/`tid` with the tree: the first node that disagrees is the problem.
pub fn check(nodes: &[Node]) -> Result<(), ManifestProblem> {
    let numbers = numbering(nodes)?;
    for (node, expected) in nodes.iter().zip(numbers) {
        if (node.lid, node.tid) != expected {
            return Err(ManifestProblem::Numbering {
                node: node.id.to_string(),
                stored: (node.lid, node.tid),
                expected,
            });
        }
    }
    Ok(())
}

/// Queries over a node list whose `lid`/`tid` are current, answered from the numbers alone.
///
/// Building it is one pass: an index by `lid`, one by id, and each node's children in `lid` order (found from
/// the numbers: a node's first child has the next `lid`, and a child's next sibling starts after its `tid`).
/// A recovery chain is then a binary search per level, among the roots and then among each ancestor's
/// children for the one whose range holds the target's `lid`.
#[derive(Debug)]
pub struct Tree<'a> {
    nodes: &'a [Node],
    /// `by_lid[lid - 1]` is the position of that node in `nodes`.
    by_lid: Vec<usize>,
    by_id: HashMap<&'a str, usize>,
    /// The `lid`s of the roots, ascending.
    roots: Vec<u64>,
    /// The children of the node with `lid` are `child_lids[child_start[lid - 1]..child_start[lid]]`.
    child_start: Vec<usize>,
    child_lids: Vec<u64>,
}

impl<'a> Tree<'a> {
    /// Indexes `nodes`. Checks that the numbers are a preorder numbering of some forest (each `lid` once,
    /// from 1 to the number of nodes, `lid <= tid`, every subtree's range inside its parent's), not that it
    /// is the forest of the parent links: [`check`] does that.
    pub fn new(nodes: &'a [Node]) -> Result<Tree<'a>, ManifestProblem> {
        let n = nodes.len();
        let mut lid_slots = vec![NONE; n];
        let mut ids = HashMap::with_capacity(n);
        // Say what the right numbers are, if the parent links make a tree at all.
        let stale = |node: &Node| {
            check(nodes)?;
            Err(ManifestProblem::Numbering {
                node: node.id.to_string(),
                stored: (node.lid, node.tid),
                expected: (0, 0),
            })
        };
        for (i, node) in nodes.iter().enumerate() {
            if ids.insert(node.id.as_str(), i).is_some() {
                return Err(ManifestProblem::DuplicateNode {
                    node: node.id.to_string(),
                });
            }
            let plausible = node.lid >= 1 && node.lid <= node.tid && node.tid <= n as u64;
            if !plausible || lid_slots[(node.lid - 1) as usize] != NONE {
                return stale(node);
            }
            lid_slots[(node.lid - 1) as usize] = i;
        }
        let at = |lid: u64| &nodes[lid_slots[(lid - 1) as usize]];
        let mut roots = Vec::new();
        let mut lid = 1;
        while lid <= n as u64 {
            roots.push(lid);
            lid = at(lid).tid + 1;
        }
        let mut child_start = Vec::with_capacity(n + 1);
        let mut child_lids = Vec::with_capacity(n);
        for &slot in &lid_slots {
            let parent = &nodes[slot];
            child_start.push(child_lids.len());
            let mut lid = parent.lid + 1;
            while lid <= parent.tid {
                let child = at(lid);
                if child.tid > parent.tid {
                    return stale(child);
                }
                child_lids.push(lid);
                lid = child.tid + 1;
            }
        }
        child_start.push(child_lids.len());
        Ok(Tree {
            nodes,
            by_lid: lid_slots,
            by_id: ids,
            roots,
            child_start,
            child_lids,
        })
    }

    /// The `lid`s of the children of the node with `lid`.
    fn child_lids_of(&self, lid: u64) -> &[u64] {
        let i = (lid - 1) as usize;
        &self.child_lids[self.child_start[i]..self.child_start[i + 1]]
    }

    /// The nodes, in the order of the node list (creation order).
    pub fn nodes(&self) -> &'a [Node] {
        self.nodes
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The node with this id.
    pub fn get(&self, id: &str) -> Option<&'a Node> {
        self.by_id.get(id).map(|&i| &self.nodes[i])
    }

    /// The node with this `lid`.
    pub fn by_lid(&self, lid: u64) -> Option<&'a Node> {
        let i = usize::try_from(lid.checked_sub(1)?).ok()?;
        self.by_lid.get(i).map(|&p| &self.nodes[p])
    }

    /// Every node in preorder (by `lid`).
    pub fn preorder(&self) -> impl Iterator<Item = &'a Node> + '_ {
        self.by_lid.iter().map(|&p| &self.nodes[p])
    }

    /// Whether `a` is `b` or one of its ancestors.
    pub fn contains(a: &Node, b: &Node) -> bool {
        a.lid <= b.lid && b.lid <= a.tid
    }

    /// The roots (full backups that start a tree), in order.
    pub fn roots(&self) -> Vec<&'a Node> {
        self.roots.iter().filter_map(|&lid| self.by_lid(lid)).collect()
    }

    /// Everything needed to restore `id`: the nodes N with `N.lid <= X.lid <= N.tid`, root (the full) first,
    /// `id` last.
    pub fn recovery_chain(&self, id: &str) -> Option<Vec<&'a Node>> {
        let x = self.get(id)?;
        let mut chain = Vec::new();
        let mut level: &[u64] = &self.roots;
        loop {
            // The last node of this level starting at or before X is the one whose range holds X.
            let k = level.partition_point(|&lid| lid <= x.lid);
            let node = self.by_lid(level[k.checked_sub(1)?])?;
            chain.push(node);
            if node.lid == x.lid {
                return Some(chain);
            }
            level = self.child_lids_of(node.lid);
        }
    }

    /// The ancestors of `id`, root first (the recovery chain without `id` itself).
    pub fn ancestors(&self, id: &str) -> Option<Vec<&'a Node>> {
        let mut chain = self.recovery_chain(id)?;
        chain.pop();
        Some(chain)
    }

    /// The children of `id`, in creation order.
    pub fn children(&self, id: &str) -> Option<Vec<&'a Node>> {
        let x = self.get(id)?;
        Some(
            self.child_lids_of(x.lid)
                .iter()
                .filter_map(|&lid| self.by_lid(lid))
                .collect(),
        )
    }

    /// `id` and all its descendants, in preorder (`lid` from `X.lid` to `X.tid`).
    pub fn subtree(&self, id: &str) -> Option<Vec<&'a Node>> {
        let x = self.get(id)?;
        let range = (x.lid - 1) as usize..x.tid as usize;
        Some(self.by_lid.get(range)?.iter().map(|&p| &self.nodes[p]).collect())
    }

    /// The union of the subtrees of `ids`, in preorder, each node once: one pass over the tree whatever the
    /// number of ids (`None` if one is missing).
    pub fn subtrees<'i>(&self, ids: impl IntoIterator<Item = &'i str>) -> Option<Vec<&'a Node>> {
        let mut ranges = Vec::new();
        for id in ids {
            let x = self.get(id)?;
            ranges.push((x.lid, x.tid));
        }
        ranges.sort_unstable();
        let mut out = Vec::new();
        let mut next = ranges.iter().peekable();
        let mut covered_to = 0;
        for node in self.preorder() {
            while let Some(&&(lid, tid)) = next.peek() {
                if lid > node.lid {
                    break;
                }
                covered_to = covered_to.max(tid);
                next.next();
            }
            if node.lid <= covered_to {
                out.push(node);
            }
        }
        Some(out)
    }

    /// The nodes without children (`lid == tid`), in preorder.
    pub fn leaves(&self) -> Vec<&'a Node> {
        self.preorder().filter(|n| n.lid == n.tid).collect()
    }

    /// The newest node of the branch below `id`: the most recently created leaf of its subtree (latest in the
    /// node list, which is creation order).
    pub fn branch_head(&self, id: &str) -> Option<&'a Node> {
        let x = self.get(id)?;
        let range = (x.lid - 1) as usize..x.tid as usize;
        self.by_lid
            .get(range)?
            .iter()
            .copied()
            .filter(|&p| self.nodes[p].lid == self.nodes[p].tid)
            .max()
            .map(|p| &self.nodes[p])
    }

    /// The nearest full backup at or above `id`; `Some(None)` if its chain has none (a broken chain).
    pub fn last_full(&self, id: &str) -> Option<Option<&'a Node>> {
        let chain = self.recovery_chain(id)?;
        Some(chain.into_iter().rev().find(|n| n.kind == NodeKind::Full))
    }

    /// The parent of `id` (`Some(None)` for a root).
    pub fn parent(&self, id: &str) -> Option<Option<&'a Node>> {
        let x = self.get(id)?;
        Some(x.parent.as_ref().and_then(|p| self.get(p.as_str())))
    }

    /// The position of `id` in the node list.
    pub fn position(&self, id: &NodeId) -> Option<usize> {
        self.by_id.get(id.as_str()).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::NodeState;

    fn node(id: &str, parent: Option<&str>, lid: u64, tid: u64) -> Node {
        Node {
            id: NodeId::new(id).unwrap(),
            parent: parent.map(|p| NodeId::new(p).unwrap()),
            kind: if parent.is_some() {
                NodeKind::Incremental
            } else {
                NodeKind::Full
            },
            created: chrono::Utc::now(),
            state: NodeState::Complete,
            tag: None,
            reason: None,
            lid,
            tid,
            disks: Vec::new(),
        }
    }

    #[test]
    fn numbering_errors() {
        let dup = [node("a", None, 1, 1), node("a", None, 2, 2)];
        assert_eq!(
            numbering(&dup),
            Err(ManifestProblem::DuplicateNode { node: "a".into() })
        );
        let orphan = [node("a", None, 1, 1), node("b", Some("zz"), 2, 2)];
        assert!(matches!(
            numbering(&orphan),
            Err(ManifestProblem::MissingParent { .. })
        ));
        let selfish = [node("a", None, 1, 1), node("b", Some("b"), 2, 2)];
        assert_eq!(
            numbering(&selfish),
            Err(ManifestProblem::Cycle {
                nodes: vec!["b".into(), "b".into()]
            })
        );
        let ring = [
            node("a", Some("c"), 1, 1),
            node("b", Some("a"), 2, 2),
            node("c", Some("b"), 3, 3),
        ];
        let Err(ManifestProblem::Cycle { nodes }) = numbering(&ring) else {
            panic!()
        };
        assert_eq!(nodes.len(), 4, "{nodes:?}");
    }

    #[test]
    fn tree_new_refuses_numbers_that_do_not_nest() {
        // Plausible one by one, but b's range sticks out of its parent a's.
        let nodes = [
            node("a", None, 1, 2),
            node("b", Some("a"), 2, 3),
            node("c", Some("b"), 3, 3),
        ];
        let err = Tree::new(&nodes).unwrap_err();
        assert!(matches!(err, ManifestProblem::Numbering { .. }), "{err:?}");
        let twice = [node("a", None, 1, 2), node("b", Some("a"), 1, 2)];
        assert!(matches!(
            Tree::new(&twice),
            Err(ManifestProblem::Numbering { .. })
        ));
        let good = [
            node("a", None, 1, 3),
            node("b", Some("a"), 2, 3),
            node("c", Some("b"), 3, 3),
        ];
        let tree = Tree::new(&good).unwrap();
        assert_eq!(tree.recovery_chain("c").unwrap().len(), 3);
        assert!(tree.recovery_chain("zz").is_none());
        assert_eq!(tree.parent("b").unwrap().unwrap().id, "a");
        assert_eq!(tree.by_lid(3).unwrap().id, "c");
        assert!(tree.by_lid(0).is_none() && tree.by_lid(4).is_none());
    }
}
