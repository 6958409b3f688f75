//! Retention: which nodes of a VM's backup tree a prune keeps, as a pure function of the manifest and a
//! [`Policy`] (restic/borg-like, applied per branch: a branch is the path from a root to a leaf, and a node kept
//! on any branch is kept).
//!
//! The [`Plan`] says what happens to every node and in which order removals are safe: bottom-up (reverse
//! preorder), so that a removed node's children at the time it goes are exactly the nearest nodes below it that
//! stay. A removed node with nothing left below it is deleted; one with nodes left below is merged into them
//! (each absorbs its layer), so no kept node ever loses data it reads through its recovery chain.
//! Snapshot nodes, pending nodes and nodes based on a snapshot are never prune's to remove (`skip`). Day,
//! week and month buckets are taken in UTC.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::mem::discriminant;

use chrono::{DateTime, Datelike, Utc};
use serde::{Deserialize, Serialize, Serializer};

use crate::error::Result;
use crate::manifest::{Manifest, Node, NodeKind, NodeState};
use crate::names::NodeId;
use crate::tree::Tree;

/// What to keep on each branch. A node is kept if any rule keeps it; the manifest's current node is always
/// kept.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Policy {
    /// The newest N complete nodes of each branch.
    pub keep_last: u32,
    /// The newest node of each of the last D days that have backups, per branch.
    pub keep_daily: u32,
    /// The newest node of each of the last W ISO weeks that have backups, per branch.
    pub keep_weekly: u32,
    /// The newest node of each of the last M months that have backups, per branch.
    pub keep_monthly: u32,
    /// Every node with a tag.
    pub keep_tagged: bool,
}

/// The policy as `prune`'s options spell it: `keep-daily 7, keep-tag` (`nothing` when empty).
impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        for (n, what) in [
            (self.keep_last, "last"),
            (self.keep_daily, "daily"),
            (self.keep_weekly, "weekly"),
            (self.keep_monthly, "monthly"),
        ] {
            if n > 0 {
                parts.push(format!("keep-{what} {n}"));
            }
        }
        if self.keep_tagged {
            parts.push("keep-tag".to_owned());
        }
        if parts.is_empty() {
            f.write_str("nothing")
        } else {
            f.write_str(&parts.join(", "))
        }
    }
}

impl Policy {
    /// Whether no rule keeps anything (only the current node would stay).
    pub fn is_empty(&self) -> bool {
        self.keep_last == 0
            && self.keep_daily == 0
            && self.keep_weekly == 0
            && self.keep_monthly == 0
            && !self.keep_tagged
    }
}

/// What a prune does with a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Stays as it is.
    Keep,
    /// Removed; nothing is based on it by the time it goes.
    Delete,
    /// Removed after each of its children (at that time) has absorbed its layer.
    MergeIntoChildren,
    /// Not prune's to touch (a snapshot, a pending backup, a node based on a snapshot); stays.
    Skip,
}

impl Action {
    /// Whether the node goes.
    pub fn removes(self) -> bool {
        matches!(self, Action::Delete | Action::MergeIntoChildren)
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Keep => "keep",
            Action::Delete => "delete",
            Action::MergeIntoChildren => "merge into children",
            Action::Skip => "skip",
        })
    }
}

/// Why a node gets its action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Why {
    /// The manifest's current node: the VM's dirty bitmaps count from it.
    Current,
    /// One of the newest `keep_last` on the branch ending at this leaf.
    Last { n: u32, branch: NodeId },
    /// The newest of its day (`2025-01-31`).
    Daily(String),
    /// The newest of its ISO week (`2025-W05`).
    Weekly(String),
    /// The newest of its month (`2025-01`).
    Monthly(String),
    /// It has this tag (`keep_tagged`).
    Tagged(String),
    /// A snapshot lives in the VM's storage; prune never touches it.
    Snapshot,
    /// A backup still being written.
    Pending,
    /// Its recovery chain holds this snapshot.
    BasedOnSnapshot(NodeId),
    /// This snapshot or pending node would have to absorb its layer.
    Blocks(NodeId),
    /// A failed backup that other nodes are based on.
    FailedWithChildren,
    /// A failed backup: it has no data.
    Failed,
    /// No rule keeps it.
    NotSelected,
}

impl fmt::Display for Why {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Why::Current => f.write_str("current (the VM's bitmaps count from it)"),
            Why::Last { n, branch } => write!(f, "one of the last {n} of the branch to {branch}"),
            Why::Daily(day) => write!(f, "newest of day {day}"),
            Why::Weekly(week) => write!(f, "newest of week {week}"),
            Why::Monthly(month) => write!(f, "newest of month {month}"),
            Why::Tagged(tag) => write!(f, "tagged {tag}"),
            Why::Snapshot => f.write_str("snapshot: lives in the VM's storage, prune does not touch it"),
            Why::Pending => f.write_str("pending: a backup is being written"),
            Why::BasedOnSnapshot(s) => write!(f, "based on snapshot {s}, which prune does not touch"),
            Why::Blocks(n) => write!(f, "{n} is based on it and cannot absorb it"),
            Why::FailedWithChildren => f.write_str("failed, but other nodes are based on it"),
            Why::Failed => f.write_str("failed backup"),
            Why::NotSelected => f.write_str("no rule keeps it"),
        }
    }
}

impl Serialize for Why {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl Why {
    /// The reason whose [`Display`](fmt::Display) text `text` is (how a report prints it), or `None`.
    pub fn parse(text: &str) -> Option<Why> {
        let node = |id: &str| NodeId(id.to_owned());
        Some(match text {
            "current (the VM's bitmaps count from it)" => Why::Current,
            "snapshot: lives in the VM's storage, prune does not touch it" => Why::Snapshot,
            "pending: a backup is being written" => Why::Pending,
            "failed, but other nodes are based on it" => Why::FailedWithChildren,
            "failed backup" => Why::Failed,
            "no rule keeps it" => Why::NotSelected,
            _ => {
                if let Some(rest) = text.strip_prefix("one of the last ") {
                    let (n, branch) = rest.split_once(" of the branch to ")?;
                    Why::Last {
                        n: n.parse().ok()?,
                        branch: node(branch),
                    }
                } else if let Some(day) = text.strip_prefix("newest of day ") {
                    Why::Daily(day.to_owned())
                } else if let Some(week) = text.strip_prefix("newest of week ") {
                    Why::Weekly(week.to_owned())
                } else if let Some(month) = text.strip_prefix("newest of month ") {
                    Why::Monthly(month.to_owned())
                } else if let Some(tag) = text.strip_prefix("tagged ") {
                    Why::Tagged(tag.to_owned())
                } else if let Some(rest) = text.strip_prefix("based on snapshot ") {
                    Why::BasedOnSnapshot(node(rest.strip_suffix(", which prune does not touch")?))
                } else {
                    Why::Blocks(node(text.strip_suffix(" is based on it and cannot absorb it")?))
                }
            }
        })
    }
}

/// Read back from its text, as a report prints it (for programs that read `qmpbak prune --json`).
impl<'de> Deserialize<'de> for Why {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> std::result::Result<Why, D::Error> {
        let text = String::deserialize(deserializer)?;
        Why::parse(&text).ok_or_else(|| serde::de::Error::custom(format!("not a prune reason: {text:?}")))
    }
}

/// The plan for one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    pub node: NodeId,
    pub kind: NodeKind,
    pub state: NodeState,
    pub created: DateTime<Utc>,
    pub tag: Option<String>,
    pub action: Action,
    pub why: Vec<Why>,
    /// For [`Action::MergeIntoChildren`]: the children it has when it goes (the nearest nodes below it that
    /// stay), which absorb its layer.
    pub into: Vec<NodeId>,
}

/// What a prune will do: a decision per node (preorder) and the order in which to remove nodes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Plan {
    pub decisions: Vec<Decision>,
    /// The removed nodes, bottom-up: each after everything below it that goes.
    pub order: Vec<NodeId>,
}

impl Plan {
    /// The decision for `id`.
    pub fn decision(&self, id: &NodeId) -> Option<&Decision> {
        self.decisions.iter().find(|d| d.node == *id)
    }

    /// The removals in the order to carry them out.
    pub fn removals(&self) -> impl Iterator<Item = &Decision> + '_ {
        let by_id: HashMap<&NodeId, &Decision> = self.decisions.iter().map(|d| (&d.node, d)).collect();
        self.order.iter().filter_map(move |id| by_id.get(id).copied())
    }

    /// The nodes that stay (kept or skipped).
    pub fn staying(&self) -> impl Iterator<Item = &Decision> + '_ {
        self.decisions.iter().filter(|d| !d.action.removes())
    }
}

/// Adds `why` unless a reason of the same kind is already there (one "last N" is enough, whatever the
/// branch).
fn add_reason(reasons: &mut Vec<Why>, why: Why) {
    if !reasons.iter().any(|r| discriminant(r) == discriminant(&why)) {
        reasons.push(why);
    }
}

/// Keeps the newest node of each of the newest `count` buckets (`bucket` names a node's bucket) among
/// `nodes`, which are sorted newest first.
fn keep_buckets(
    nodes: &[&Node],
    count: u32,
    bucket: impl Fn(&DateTime<Utc>) -> String,
    why: impl Fn(String) -> Why,
    reasons: &mut HashMap<NodeId, Vec<Why>>,
) {
    if count == 0 {
        return;
    }
    let mut last: Option<String> = None;
    let mut taken = 0;
    for node in nodes {
        let key = bucket(&node.created);
        if last.as_ref() == Some(&key) {
            continue;
        }
        taken += 1;
        if taken > count {
            break;
        }
        last = Some(key.clone());
        add_reason(reasons.entry(node.id.clone()).or_default(), why(key));
    }
}

/// Decides, for every node of `manifest`, whether a prune with `policy` keeps it, deletes it or merges it into
/// its children, and in which order the removals are safe.
pub fn plan(manifest: &Manifest, policy: &Policy) -> Result<Plan> {
    let tree = manifest.tree()?;
    let preorder: Vec<&Node> = tree.preorder().collect();

    // Nodes prune leaves alone, with why.
    let mut skipped: HashMap<NodeId, Why> = HashMap::new();
    let mut on_snapshot: HashMap<&NodeId, NodeId> = HashMap::new();
    for node in &preorder {
        let inherited = node.parent.as_ref().and_then(|p| on_snapshot.get(p)).cloned();
        if node.kind == NodeKind::Snapshot {
            on_snapshot.insert(&node.id, inherited.unwrap_or_else(|| node.id.clone()));
            skipped.insert(node.id.clone(), Why::Snapshot);
        } else if let Some(snapshot) = inherited {
            on_snapshot.insert(&node.id, snapshot.clone());
            skipped.insert(node.id.clone(), Why::BasedOnSnapshot(snapshot));
        } else if node.state == NodeState::Pending {
            skipped.insert(node.id.clone(), Why::Pending);
        }
    }
    let current = manifest
        .current
        .as_ref()
        .filter(|c| manifest.node(c).is_some() && !skipped.contains_key(*c));

    // Branches are the paths to the leaves that remain after the prune: deleting a whole branch takes away
    // what only that branch kept. So decide, drop the branches that go, and decide again until nothing more
    // goes (each round only adds deletions, so this ends).
    let mut deleted: HashSet<NodeId> = HashSet::new();
    let mut rounds = 0;
    loop {
        let reasons = select(&tree, &preorder, policy, &skipped, &deleted, current);
        let decisions = decide(&tree, &preorder, &skipped, reasons);
        let now: HashSet<NodeId> = decisions
            .iter()
            .filter(|d| d.action == Action::Delete)
            .map(|d| d.node.clone())
            .collect();
        rounds += 1;
        if now == deleted || rounds > preorder.len() {
            let order = decisions
                .iter()
                .rev()
                .filter(|d| d.action.removes())
                .map(|d| d.node.clone())
                .collect();
            return Ok(Plan { decisions, order });
        }
        deleted = now;
    }
}

/// The reasons to keep each node: the policy's rules on every branch that does not end in a `deleted`
/// subtree, tags, and the current node.
fn select(
    tree: &Tree<'_>,
    preorder: &[&Node],
    policy: &Policy,
    skipped: &HashMap<NodeId, Why>,
    deleted: &HashSet<NodeId>,
    current: Option<&NodeId>,
) -> HashMap<NodeId, Vec<Why>> {
    let eligible = |n: &Node| n.state == NodeState::Complete && !skipped.contains_key(&n.id);
    let mut reasons: HashMap<NodeId, Vec<Why>> = HashMap::new();
    // The leaves of what remains: remaining nodes whose children all go (deleted sets are whole subtrees).
    let leaves = preorder.iter().filter(|n| {
        !deleted.contains(&n.id)
            && tree
                .children(n.id.as_str())
                .unwrap_or_default()
                .iter()
                .all(|c| deleted.contains(&c.id))
    });
    for leaf in leaves {
        let Some(chain) = tree.recovery_chain(leaf.id.as_str()) else {
            continue;
        };
        let mut branch: Vec<&Node> = chain.into_iter().filter(|n| eligible(n)).collect();
        branch.sort_by(|a, b| b.created.cmp(&a.created).then(b.lid.cmp(&a.lid)));
        for node in branch.iter().take(policy.keep_last as usize) {
            add_reason(
                reasons.entry(node.id.clone()).or_default(),
                Why::Last {
                    n: policy.keep_last,
                    branch: leaf.id.clone(),
                },
            );
        }
        keep_buckets(
            &branch,
            policy.keep_daily,
            |t| t.format("%Y-%m-%d").to_string(),
            Why::Daily,
            &mut reasons,
        );
        keep_buckets(
            &branch,
            policy.keep_weekly,
            |t| {
                let week = t.iso_week();
                format!("{}-W{:02}", week.year(), week.week())
            },
            Why::Weekly,
            &mut reasons,
        );
        keep_buckets(
            &branch,
            policy.keep_monthly,
            |t| t.format("%Y-%m").to_string(),
            Why::Monthly,
            &mut reasons,
        );
    }
    if policy.keep_tagged {
        for node in preorder.iter().filter(|n| eligible(n)) {
            if let Some(tag) = &node.tag {
                add_reason(
                    reasons.entry(node.id.clone()).or_default(),
                    Why::Tagged(tag.clone()),
                );
            }
        }
    }
    if let Some(current) = current {
        reasons
            .entry(current.clone())
            .or_default()
            .insert(0, Why::Current);
    }
    reasons
}

/// Turns reasons into decisions: first keep or remove, then bottom-up what each removed node's children are
/// when it goes, and whether something below stops it from going.
fn decide(
    tree: &Tree<'_>,
    preorder: &[&Node],
    skipped: &HashMap<NodeId, Why>,
    mut reasons: HashMap<NodeId, Vec<Why>>,
) -> Vec<Decision> {
    let mut decisions: Vec<Decision> = preorder
        .iter()
        .map(|node| {
            let (action, why) = if let Some(why) = skipped.get(&node.id) {
                (Action::Skip, vec![why.clone()])
            } else if let Some(why) = reasons.remove(&node.id) {
                (Action::Keep, why)
            } else if node.state == NodeState::Failed {
                (Action::Delete, vec![Why::Failed])
            } else {
                (Action::Delete, vec![Why::NotSelected])
            };
            Decision {
                node: node.id.clone(),
                kind: node.kind,
                state: node.state,
                created: node.created,
                tag: node.tag.clone(),
                action,
                why,
                into: Vec::new(),
            }
        })
        .collect();
    let index: HashMap<&str, usize> = preorder
        .iter()
        .enumerate()
        .map(|(i, n)| (n.id.as_str(), i))
        .collect();
    // frontier[i]: the nearest nodes below node i that stay, i.e. its children when it goes.
    let mut frontier: Vec<Vec<usize>> = vec![Vec::new(); preorder.len()];
    for i in (0..preorder.len()).rev() {
        let children = tree.children(preorder[i].id.as_str()).unwrap_or_default();
        let mut below = Vec::new();
        for child in children {
            let Some(&c) = index.get(child.id.as_str()) else {
                continue;
            };
            if decisions[c].action.removes() {
                below.extend(frontier[c].iter().copied());
            } else {
                below.push(c);
            }
        }
        below.sort_unstable();
        let decision = &mut decisions[i];
        if decision.action.removes() && !below.is_empty() {
            if let Some(&blocker) = below.iter().find(|&&c| skipped.contains_key(&preorder[c].id)) {
                decision.action = Action::Keep;
                decision.why = vec![Why::Blocks(preorder[blocker].id.clone())];
            } else if decision.state == NodeState::Failed {
                decision.action = Action::Keep;
                decision.why = vec![Why::FailedWithChildren];
            } else {
                decision.action = Action::MergeIntoChildren;
                decision.into = below.iter().map(|&c| preorder[c].id.clone()).collect();
            }
        }
        frontier[i] = below;
    }
    decisions
}

/// The ids of the nodes that `plan` removes, as a set.
pub fn removed_set(plan: &Plan) -> HashSet<NodeId> {
    plan.order.iter().cloned().collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_reason_reads_back_from_its_text() {
        let id = |s: &str| NodeId(s.to_owned());
        let all = [
            Why::Current,
            Why::Last {
                n: 3,
                branch: id("0007"),
            },
            Why::Daily("2025-01-31".into()),
            Why::Weekly("2025-W05".into()),
            Why::Monthly("2025-01".into()),
            Why::Tagged("before-upgrade".into()),
            Why::Snapshot,
            Why::Pending,
            Why::BasedOnSnapshot(id("0002")),
            Why::Blocks(id("0004")),
            Why::FailedWithChildren,
            Why::Failed,
            Why::NotSelected,
        ];
        for why in all {
            let json = serde_json::to_string(&why).unwrap();
            assert_eq!(serde_json::from_str::<Why>(&json).unwrap(), why, "{json}");
        }
        assert!(Why::parse("no such reason").is_none());
    }

    use super::*;
    use crate::manifest::{Location, NodeDisk};
    use crate::names::RelPath;
    use chrono::{Duration, TimeZone};
    use proptest::prelude::*;

    fn base() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2025, 1, 1, 12, 0, 0).unwrap()
    }

    fn node(id: &NodeId, parent: Option<&NodeId>, kind: NodeKind, created: DateTime<Utc>) -> Node {
        Node {
            id: id.clone(),
            parent: parent.cloned(),
            kind,
            created,
            state: NodeState::Complete,
            tag: None,
            reason: None,
            lid: 0,
            tid: 0,
            disks: vec![NodeDisk {
                source_host: None,
                disk: "disk0".into(),
                file: RelPath::disk_image(id, "disk0").unwrap(),
                backing: parent.map(|p| RelPath::disk_image(p, "disk0").unwrap()),
                virtual_size: 1 << 20,
                allocated_bytes: 1 << 16,
                bitmap: None,
                table: None,
                table_sha256: None,
                location: Location {
                    host: "h".into(),
                    path: String::new(),
                    predecessor: None,
                },
            }],
        }
    }

    /// A chain of `n` nodes, one per hour, the last one current.
    fn chain(n: usize) -> Manifest {
        let mut m = Manifest::new("vm", base());
        let mut parent: Option<NodeId> = None;
        for i in 0..n {
            let id = m.next_node_id().unwrap();
            let kind = if parent.is_some() {
                NodeKind::Incremental
            } else {
                NodeKind::Full
            };
            m.add_node(node(
                &id,
                parent.as_ref(),
                kind,
                base() + Duration::hours(i64::try_from(i).unwrap()),
            ))
            .unwrap();
            parent = Some(id);
        }
        m.current = parent;
        m
    }

    fn id(s: &str) -> NodeId {
        NodeId::new(s).unwrap()
    }

    fn actions(plan: &Plan) -> Vec<(String, Action)> {
        plan.decisions
            .iter()
            .map(|d| (d.node.to_string(), d.action))
            .collect()
    }

    #[test]
    fn keep_last_three_of_eight_merges_the_older_ones_bottom_up() {
        let m = chain(8);
        let plan = plan(
            &m,
            &Policy {
                keep_last: 3,
                ..Policy::default()
            },
        )
        .unwrap();
        let expect = |n: &str, a| (n.to_owned(), a);
        assert_eq!(
            actions(&plan),
            vec![
                expect("0001", Action::MergeIntoChildren),
                expect("0002", Action::MergeIntoChildren),
                expect("0003", Action::MergeIntoChildren),
                expect("0004", Action::MergeIntoChildren),
                expect("0005", Action::MergeIntoChildren),
                expect("0006", Action::Keep),
                expect("0007", Action::Keep),
                expect("0008", Action::Keep),
            ]
        );
        let order: Vec<&str> = plan.order.iter().map(NodeId::as_str).collect();
        assert_eq!(order, ["0005", "0004", "0003", "0002", "0001"]);
        for d in plan.removals() {
            assert_eq!(d.into, vec![id("0006")], "{d:?}");
        }
        let current = plan.decision(&id("0008")).unwrap();
        assert_eq!(current.why[0], Why::Current);
    }

    /// 0001 - 0002 - 0003 (current) and 0001 - 0004 - 0005, one per hour.
    fn two_branches() -> Manifest {
        let mut m = chain(3);
        let (one, four, five) = (id("0001"), id("0004"), id("0005"));
        m.add_node(node(
            &four,
            Some(&one),
            NodeKind::Incremental,
            base() + Duration::hours(3),
        ))
        .unwrap();
        m.add_node(node(
            &five,
            Some(&four),
            NodeKind::Incremental,
            base() + Duration::hours(4),
        ))
        .unwrap();
        m.current = Some(id("0003"));
        m
    }

    #[test]
    fn a_branch_that_goes_whole_is_deleted_leaf_first() {
        let m = two_branches();
        let tagged_only = Policy {
            keep_tagged: true,
            ..Policy::default()
        };
        let plan = plan(&m, &tagged_only).unwrap();
        let expect = |n: &str, a| (n.to_owned(), a);
        assert_eq!(
            actions(&plan),
            vec![
                expect("0001", Action::MergeIntoChildren),
                expect("0002", Action::MergeIntoChildren),
                expect("0003", Action::Keep),
                expect("0004", Action::Delete),
                expect("0005", Action::Delete),
            ]
        );
        let order: Vec<&str> = plan.order.iter().map(NodeId::as_str).collect();
        assert_eq!(order, ["0005", "0004", "0002", "0001"]);
        assert_eq!(plan.decision(&id("0001")).unwrap().into, vec![id("0003")]);
    }

    #[test]
    fn each_branch_keeps_its_own_newest_and_shared_ancestors_merge_into_both() {
        let m = two_branches();
        let last1 = Policy {
            keep_last: 1,
            ..Policy::default()
        };
        let plan = plan(&m, &last1).unwrap();
        let kept: Vec<&str> = plan.staying().map(|d| d.node.as_str()).collect();
        assert_eq!(kept, ["0003", "0005"]);
        assert_eq!(
            plan.decision(&id("0001")).unwrap().into,
            vec![id("0003"), id("0005")],
            "0002 and 0004 go first, so 0001's children are 0003 and 0005 when it goes"
        );
        assert_eq!(
            plan.decision(&id("0005")).unwrap().why,
            vec![Why::Last {
                n: 1,
                branch: id("0005")
            }]
        );
    }

    #[test]
    fn failed_nodes_go_unless_something_is_based_on_them() {
        let mut m = two_branches();
        let last1 = Policy {
            keep_last: 1,
            ..Policy::default()
        };
        m.node_mut(&id("0005")).unwrap().state = NodeState::Failed;
        let plan = plan(&m, &last1).unwrap();
        let five = plan.decision(&id("0005")).unwrap();
        assert_eq!(
            (five.action, five.why.clone()),
            (Action::Delete, vec![Why::Failed])
        );
        assert_eq!(
            plan.decision(&id("0004")).unwrap().action,
            Action::Keep,
            "the newest complete node of its branch now"
        );
        let mut m = two_branches();
        m.node_mut(&id("0004")).unwrap().state = NodeState::Failed;
        let plan = super::plan(&m, &last1).unwrap();
        let four = plan.decision(&id("0004")).unwrap();
        assert_eq!(
            (four.action, four.why.clone()),
            (Action::Keep, vec![Why::FailedWithChildren])
        );
    }

    #[test]
    fn daily_weekly_monthly_keep_the_newest_of_each_bucket() {
        let mut m = Manifest::new("vm", base());
        let mut parent: Option<NodeId> = None;
        // Two backups a day (06:00, 18:00) over 70 days.
        for day in 0..70 {
            for hour in [6, 18] {
                let id = m.next_node_id().unwrap();
                let created = Utc.with_ymd_and_hms(2025, 1, 1, hour, 0, 0).unwrap() + Duration::days(day);
                let kind = if parent.is_some() {
                    NodeKind::Incremental
                } else {
                    NodeKind::Full
                };
                m.add_node(node(&id, parent.as_ref(), kind, created)).unwrap();
                parent = Some(id);
            }
        }
        m.current = parent;
        let plan = plan(
            &m,
            &Policy {
                keep_daily: 3,
                keep_weekly: 2,
                keep_monthly: 3,
                ..Policy::default()
            },
        )
        .unwrap();
        let kept: Vec<String> = plan
            .staying()
            .map(|d| d.created.format("%Y-%m-%d %H").to_string())
            .collect();
        // Days: Mar 11, 10, 9 (18:00). Weeks: the week of Mar 10 (its newest: Mar 11) and of Mar 3 (Mar 9).
        // Months: March (Mar 11), February (Feb 28), January (Jan 31).
        assert_eq!(
            kept,
            [
                "2025-01-31 18",
                "2025-02-28 18",
                "2025-03-09 18",
                "2025-03-10 18",
                "2025-03-11 18"
            ]
        );
        let mar9 = plan
            .decisions
            .iter()
            .find(|d| d.created.format("%m-%d %H").to_string() == "03-09 18")
            .unwrap();
        assert_eq!(
            mar9.why,
            vec![Why::Daily("2025-03-09".into()), Why::Weekly("2025-W10".into())]
        );
    }

    #[test]
    fn snapshots_and_what_they_block_are_left_alone() {
        // 0001 (full) - 0002 - 0003 (snapshot) - 0004 (backup based on the snapshot); 0001 - 0005 (current).
        let mut m = chain(2);
        let (one, two, three, four, five) = (id("0001"), id("0002"), id("0003"), id("0004"), id("0005"));
        m.add_node(node(
            &three,
            Some(&two),
            NodeKind::Snapshot,
            base() + Duration::hours(5),
        ))
        .unwrap();
        m.add_node(node(
            &four,
            Some(&three),
            NodeKind::Incremental,
            base() + Duration::hours(6),
        ))
        .unwrap();
        m.add_node(node(
            &five,
            Some(&one),
            NodeKind::Incremental,
            base() + Duration::hours(7),
        ))
        .unwrap();
        m.current = Some(five.clone());
        let plan = plan(
            &m,
            &Policy {
                keep_tagged: true,
                ..Policy::default()
            },
        )
        .unwrap();
        assert_eq!(plan.decision(&three).unwrap().action, Action::Skip);
        assert_eq!(plan.decision(&three).unwrap().why, vec![Why::Snapshot]);
        assert_eq!(
            plan.decision(&four).unwrap().why,
            vec![Why::BasedOnSnapshot(three.clone())]
        );
        assert_eq!(plan.decision(&two).unwrap().action, Action::Keep);
        assert_eq!(plan.decision(&two).unwrap().why, vec![Why::Blocks(three.clone())]);
        assert_eq!(plan.decision(&one).unwrap().action, Action::MergeIntoChildren);
        assert_eq!(plan.decision(&one).unwrap().into, vec![two, five]);
    }

    #[test]
    fn tags_are_kept_with_keep_tagged_only() {
        let mut m = chain(4);
        m.set_tag(&id("0002"), Some("golden".into())).unwrap();
        let last1 = Policy {
            keep_last: 1,
            ..Policy::default()
        };
        assert!(
            plan(&m, &last1)
                .unwrap()
                .decision(&id("0002"))
                .unwrap()
                .action
                .removes()
        );
        let tagged = Policy {
            keep_tagged: true,
            ..last1
        };
        let d = plan(&m, &tagged).unwrap();
        assert_eq!(
            d.decision(&id("0002")).unwrap().why,
            vec![Why::Tagged("golden".into())]
        );
        assert!(Policy::default().is_empty());
        assert!(!tagged.is_empty());
    }

    // ---- properties over generated trees ----

    #[derive(Debug, Clone)]
    struct Spec {
        /// Per node: parent (an index below it, or none), minutes after the start, kind and state choice.
        nodes: Vec<(Option<usize>, i64, u8, bool)>,
        current: usize,
        tags: Vec<usize>,
    }

    fn spec() -> impl Strategy<Value = Spec> {
        (1usize..40).prop_flat_map(|n| {
            let nodes = (0..n)
                .map(|i| {
                    let parent = if i == 0 {
                        Just(None).boxed()
                    } else {
                        prop_oneof![1 => Just(None), 8 => (0..i).prop_map(Some)].boxed()
                    };
                    (parent, 0i64..(200 * 24 * 60), 0u8..20, any::<bool>())
                })
                .collect::<Vec<_>>();
            (nodes, 0..n, proptest::collection::vec(0..n, 0..4)).prop_map(|(nodes, current, tags)| Spec {
                nodes,
                current,
                tags,
            })
        })
    }

    /// Builds the manifest: kinds and states drawn so that most nodes are complete backups, some are
    /// snapshots (under anything), failed leaves or pending leaves.
    fn build(spec: &Spec) -> Manifest {
        let mut m = Manifest::new("vm", base());
        let ids: Vec<NodeId> = (0..spec.nodes.len())
            .map(|i| NodeId::from_seq(i as u64 + 1))
            .collect();
        let has_children: HashSet<usize> = spec.nodes.iter().filter_map(|n| n.0).collect();
        for (i, &(parent, minutes, roll, _)) in spec.nodes.iter().enumerate() {
            let kind = match (parent, roll) {
                (_, 0) => NodeKind::Snapshot,
                (None, _) => NodeKind::Full,
                (Some(_), 1..=3) => NodeKind::Differential,
                _ => NodeKind::Incremental,
            };
            let mut n = node(
                &ids[i],
                parent.map(|p| &ids[p]),
                kind,
                base() + Duration::minutes(minutes),
            );
            if !has_children.contains(&i) {
                n.state = match roll {
                    4 => NodeState::Failed,
                    5 => NodeState::Pending,
                    _ => NodeState::Complete,
                };
            }
            m.add_node(n).unwrap();
        }
        for &t in &spec.tags {
            m.set_tag(&ids[t], Some(format!("tag{t}"))).unwrap();
        }
        if m.nodes[spec.current].state == NodeState::Complete {
            m.current = Some(ids[spec.current].clone());
        }
        m
    }

    fn policy() -> impl Strategy<Value = Policy> {
        (0u32..5, 0u32..5, 0u32..4, 0u32..4, any::<bool>()).prop_map(
            |(keep_last, keep_daily, keep_weekly, keep_monthly, keep_tagged)| Policy {
                keep_last,
                keep_daily,
                keep_weekly,
                keep_monthly,
                keep_tagged,
            },
        )
    }

    /// Carries a plan out on the manifest as prune does, checking each step is possible; returns the result.
    fn apply(m: &Manifest, plan: &Plan) -> Manifest {
        let mut m = m.clone();
        for d in plan.removals() {
            let children: Vec<NodeId> = m
                .children(&d.node)
                .unwrap()
                .iter()
                .map(|c| c.id.clone())
                .collect();
            match d.action {
                Action::Delete => {
                    assert!(
                        children.is_empty(),
                        "{} deleted with children {children:?}",
                        d.node
                    );
                    m.remove_node(&d.node).unwrap();
                }
                Action::MergeIntoChildren => {
                    let (mut children, mut into) = (children, d.into.clone());
                    children.sort();
                    into.sort();
                    assert_eq!(children, into, "{} merges into its children at that time", d.node);
                    m.remove_node_reparent(&d.node).unwrap();
                }
                _ => unreachable!(),
            }
        }
        m.validate().unwrap();
        m
    }

    /// A bucket key of a creation time.
    type Key = fn(&DateTime<Utc>) -> String;

    /// The nodes that the policy's rules select on the branches to `leaves`, naively.
    fn naive_selected(m: &Manifest, policy: &Policy, leaves: &[NodeId]) -> HashSet<NodeId> {
        let mut keep = HashSet::new();
        let eligible = |n: &&Node| {
            n.state == NodeState::Complete
                && m.recovery_chain(&n.id)
                    .unwrap()
                    .iter()
                    .all(|a| a.kind != NodeKind::Snapshot)
        };
        for leaf in leaves {
            let mut branch: Vec<&Node> = m
                .recovery_chain(leaf)
                .unwrap()
                .into_iter()
                .filter(eligible)
                .collect();
            branch.sort_by(|a, b| b.created.cmp(&a.created).then(b.lid.cmp(&a.lid)));
            keep.extend(
                branch
                    .iter()
                    .take(policy.keep_last as usize)
                    .map(|n| n.id.clone()),
            );
            let buckets: [(u32, Key); 3] = [
                (policy.keep_daily, |t| t.date_naive().to_string()),
                (policy.keep_weekly, |t| format!("{:?}", t.iso_week())),
                (policy.keep_monthly, |t| format!("{}-{}", t.year(), t.month())),
            ];
            for (count, key) in buckets {
                let mut seen: Vec<String> = Vec::new();
                for n in &branch {
                    let k = key(&n.created);
                    if !seen.contains(&k) {
                        seen.push(k);
                        if seen.len() <= count as usize {
                            keep.insert(n.id.clone());
                        }
                    }
                }
            }
        }
        keep
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

        #[test]
        fn plans_are_safe_and_keep_what_the_policy_selects(spec in spec(), policy in policy()) {
            let m = build(&spec);
            let plan = plan(&m, &policy).unwrap();
            prop_assert_eq!(plan.decisions.len(), m.nodes.len());
            let removed = removed_set(&plan);
            let after = apply(&m, &plan);

            // The current node is always kept, and everything that stays is still there.
            if let Some(current) = &m.current {
                prop_assert!(!removed.contains(current));
                prop_assert_eq!(after.current.as_ref(), Some(current));
            }
            for d in plan.staying() {
                prop_assert!(after.node(&d.node).is_some(), "{} stays", d.node);
            }
            prop_assert_eq!(after.nodes.len(), m.nodes.len() - removed.len());

            // A staying node's recovery chain afterwards is its old chain without the removed nodes: the
            // data of those was merged into nodes on the way down, so what it reads is unchanged.
            for d in plan.staying() {
                let before: Vec<NodeId> = m.recovery_chain(&d.node).unwrap().iter()
                    .map(|n| n.id.clone()).filter(|n| !removed.contains(n)).collect();
                let now: Vec<NodeId> = after.recovery_chain(&d.node).unwrap().iter().map(|n| n.id.clone()).collect();
                prop_assert_eq!(now, before);
            }

            // Snapshots and pending nodes are never touched; failed nodes go unless something is based on them.
            for n in &m.nodes {
                let d = plan.decision(&n.id).unwrap();
                if n.kind == NodeKind::Snapshot || n.state == NodeState::Pending {
                    prop_assert_eq!(d.action, Action::Skip);
                }
                if n.state == NodeState::Failed && d.action != Action::Skip && m.children(&n.id).unwrap().is_empty() {
                    prop_assert!(d.action.removes());
                }
                // Nothing is merged into a node prune may not change.
                for c in &d.into {
                    prop_assert_ne!(plan.decision(c).unwrap().action, Action::Skip);
                }
            }

            // On the branches that remain, every node a rule selects is kept, and nothing is kept by a rule
            // that does not select it there.
            let leaves: Vec<NodeId> = after.leaves().unwrap().iter().map(|n| n.id.clone()).collect();
            let selected = naive_selected(&m, &policy, &leaves);
            for id in &selected {
                prop_assert_eq!(plan.decision(id).unwrap().action, Action::Keep, "{} is selected", id);
            }
            for d in plan.staying() {
                let by_rule = d.why.iter().any(|w| matches!(w, Why::Last { .. } | Why::Daily(_) | Why::Weekly(_) | Why::Monthly(_)));
                prop_assert!(!by_rule || selected.contains(&d.node), "{} kept by a rule that does not select it", d.node);
            }
            // A leaf that goes takes its whole branch's claim with it: only what no remaining branch selects.
            for leaf in m.leaves().unwrap() {
                if removed.contains(&leaf.id) {
                    prop_assert_eq!(plan.decision(&leaf.id).unwrap().action, Action::Delete);
                }
            }
            if policy.keep_tagged {
                for n in m.nodes.iter().filter(|n| n.tag.is_some() && n.state == NodeState::Complete) {
                    prop_assert!(!removed.contains(&n.id));
                }
            }

            // A node kept for no reason would be a leak: everything kept has a reason.
            for d in plan.staying() {
                prop_assert!(!d.why.is_empty());
            }

            // Pruning again with the same policy removes nothing more.
            let again = super::plan(&after, &policy).unwrap();
            prop_assert!(again.order.is_empty(), "second prune removes {:?}", again.order);
        }
    }
}
