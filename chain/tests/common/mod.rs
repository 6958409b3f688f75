//! Helpers shared by the chain crate's integration tests: node builders, naive tree walks to compare the
//! lid/tid queries against, a temporary repository, and the "re-run this test binary as a child" trick.

#![allow(dead_code, clippy::unwrap_used)] // shared by several test binaries; unwrap fails the test

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};

use chain::{Location, Manifest, Node, NodeDisk, NodeId, NodeKind, NodeState, RelPath, Repository, VmStore};
use chrono::{TimeZone, Utc};

/// A node with one disk, as a backup would add it.
pub fn node(id: &NodeId, parent: Option<&NodeId>, kind: NodeKind) -> Node {
    Node {
        id: id.clone(),
        parent: parent.cloned(),
        kind,
        created: Utc.with_ymd_and_hms(2025, 1, 2, 3, 4, 5).unwrap(),
        state: NodeState::Complete,
        tag: None,
        reason: Some("test".into()),
        lid: 0,
        tid: 0,
        disks: vec![NodeDisk {
            source_host: None,
            disk: "disk0".into(),
            file: RelPath::disk_image(id, "disk0").unwrap(),
            backing: parent.map(|p| RelPath::disk_image(p, "disk0").unwrap()),
            virtual_size: 1 << 30,
            allocated_bytes: 1 << 20,
            bitmap: None,
            table: Some(RelPath::disk_table(id, "disk0").unwrap()),
            table_sha256: Some("ab".repeat(32)),
            location: Location {
                host: "host".into(),
                path: format!("/backups/vm/{id}/disk0.qcow2"),
                predecessor: None,
            },
        }],
    }
}

/// Adds a new node under `parent` (a full if there is none) and returns its id.
pub fn add(m: &mut Manifest, parent: Option<&NodeId>) -> NodeId {
    let id = m.next_node_id().unwrap();
    let kind = if parent.is_some() {
        NodeKind::Incremental
    } else {
        NodeKind::Full
    };
    m.add_node(node(&id, parent, kind)).unwrap();
    id
}

// ---- naive versions of the tree queries, by parent links ----

pub fn naive_children<'a>(nodes: &'a [Node], id: Option<&NodeId>) -> Vec<&'a Node> {
    nodes.iter().filter(|n| n.parent.as_ref() == id).collect()
}

/// Preorder of the subtree at `id`, by recursion over parent links.
pub fn naive_preorder<'a>(nodes: &'a [Node], id: &NodeId, out: &mut Vec<&'a Node>) {
    let me = nodes.iter().find(|n| n.id == *id).unwrap();
    out.push(me);
    for child in naive_children(nodes, Some(id)) {
        naive_preorder(nodes, &child.id, out);
    }
}

/// (lid, tid) per node id by a recursive DFS.
pub fn naive_numbering(nodes: &[Node]) -> Vec<(NodeId, u64, u64)> {
    fn walk(nodes: &[Node], id: &NodeId, counter: &mut u64, out: &mut Vec<(NodeId, u64, u64)>) {
        *counter += 1;
        let lid = *counter;
        let slot = out.len();
        out.push((id.clone(), lid, 0));
        for child in naive_children(nodes, Some(id)) {
            walk(nodes, &child.id, counter, out);
        }
        out[slot].2 = *counter;
    }
    let mut out = Vec::new();
    let mut counter = 0;
    for root in naive_children(nodes, None) {
        walk(nodes, &root.id, &mut counter, &mut out);
    }
    out
}

/// Root first, `id` last, by following parents.
pub fn naive_chain<'a>(nodes: &'a [Node], id: &NodeId) -> Vec<&'a Node> {
    let mut chain = Vec::new();
    let mut at = nodes.iter().find(|n| n.id == *id);
    while let Some(node) = at {
        chain.push(node);
        at = node
            .parent
            .as_ref()
            .and_then(|p| nodes.iter().find(|n| n.id == *p));
    }
    chain.reverse();
    chain
}

pub fn ids(nodes: &[&Node]) -> Vec<String> {
    nodes.iter().map(|n| n.id.to_string()).collect()
}

// ---- repositories ----

/// A repository in a temporary directory, with one VM "vm1".
pub struct TestRepo {
    pub dir: tempfile::TempDir,
    pub repo: Repository,
    pub vm: VmStore,
}

impl TestRepo {
    pub fn new() -> TestRepo {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::init(dir.path().join("repo")).unwrap();
        let vm = repo.create_vm("vm1").unwrap();
        TestRepo { dir, repo, vm }
    }

    pub fn repo_path(&self) -> PathBuf {
        self.repo.path().to_owned()
    }
}

// ---- child processes: this test binary, re-run to execute one helper "test" ----

/// The environment variable that tells a helper test it is the child and what to work on.
pub const CHILD_DIR: &str = "CHAIN_TEST_CHILD_DIR";

/// A child process running one helper test of this binary; killed (SIGKILL) and reaped when dropped, so a
/// failing test leaves nothing running.
pub struct ChildProc {
    pub child: Child,
    out: BufReader<ChildStdout>,
}

/// Runs the helper test `name` of this binary as a child process with `CHAIN_TEST_CHILD_DIR=dir`.
pub fn spawn_child(name: &str, dir: &Path) -> ChildProc {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_DIR, dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let out = BufReader::new(child.stdout.take().unwrap());
    ChildProc { child, out }
}

impl ChildProc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Reads the child's output until a line ends with `marker` (the test harness prints its own text too,
    /// such as "test NAME ... " before the helper's first line).
    pub fn wait_for_line(&mut self, marker: &str) {
        let mut line = String::new();
        loop {
            line.clear();
            let n = self.out.read_line(&mut line).unwrap();
            assert!(n > 0, "the child exited before printing {marker:?}");
            if line.trim_end().ends_with(marker) {
                return;
            }
        }
    }

    /// SIGKILL, then reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ChildProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A tiny xorshift generator (tests need some randomness, not quality).
pub struct Rng(u64);

impl Rng {
    pub fn seeded() -> Rng {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        Rng((nanos as u64) | 1)
    }

    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}
