//! Helpers for tests that back up a [`TestVm`](crate::TestVm) into a repository: run `qmpbak` against it, read
//! the manifest through the chain crate, and check that QEMU was left with nothing of qmpbak's.

use std::path::{Path, PathBuf};

use crate::cli::{self, Output};
use crate::vm::TestVm;
pub use qmpbak_engine::backup::BackupReport;

/// A repository in its own temporary directory (or at a given path).
pub struct TestRepo {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
}

impl TestRepo {
    /// `qmpbak init` in a new temporary directory.
    pub fn init() -> TestRepo {
        let dir = tempfile::Builder::new()
            .prefix("qmpbak-repo-")
            .tempdir()
            .expect("create temp dir");
        let path = dir.path().join("repo");
        cli::run(&["init", path.to_str().expect("utf-8 path")]).success();
        TestRepo { dir: Some(dir), path }
    }

    /// A repository already made at `path` (the caller owns the directory).
    pub fn at(path: PathBuf) -> TestRepo {
        TestRepo { dir: None, path }
    }

    pub fn path(&self) -> PathBuf {
        self.path.clone()
    }

    /// The temporary directory holding the repository, if this fixture made it.
    pub fn temp_dir(&self) -> Option<&Path> {
        self.dir.as_ref().map(tempfile::TempDir::path)
    }

    /// Every image file (`*.qcow2`) in VM `vm`'s directory and below, sorted.
    pub fn images(&self, vm: &str) -> Vec<PathBuf> {
        let mut found = Vec::new();
        let mut dirs = vec![self.vm_dir(vm)];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).expect("read the VM's directory") {
                let path = entry.expect("directory entry").path();
                if path.is_dir() {
                    dirs.push(path);
                } else if path.extension().is_some_and(|e| e == "qcow2") {
                    found.push(path);
                }
            }
        }
        found.sort();
        found
    }

    /// Reads every image file of VM `vm` once, so that it is in the page cache: a checksum-diff compares a
    /// changed block with the parent's chain only where the chain is cached, and the tests that count the
    /// bytes it stores must not depend on what the rest of the suite pushed out of the cache meanwhile.
    pub fn cache_images(&self, vm: &str) {
        for path in self.images(vm) {
            let mut file = std::fs::File::open(&path).expect("open an image");
            std::io::copy(&mut file, &mut std::io::sink()).expect("read an image");
        }
    }

    /// Drops every operation record from VM `vm`'s manifest, as if they were lost: what the runs left in QEMU
    /// or on disk is then no record's any more.
    pub fn lose_records(&self, vm: &str) {
        let path = self.vm_dir(vm).join("manifest.json");
        let mut manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).expect("read manifest")).expect("parse manifest");
        manifest["operations"] = serde_json::json!([]);
        std::fs::write(
            &path,
            serde_json::to_vec_pretty(&manifest).expect("manifest JSON"),
        )
        .expect("write manifest");
    }

    pub fn vm_dir(&self, vm: &str) -> PathBuf {
        self.path().join(vm)
    }

    /// The VM's manifest, loaded and validated by the chain crate.
    pub fn manifest(&self, vm: &str) -> chain::Manifest {
        let repo = chain::Repository::open(self.path()).expect("open repository");
        repo.vm(vm).expect("vm store").load().expect("manifest loads")
    }

    /// Adds VM `vm` with a manifest of `count` complete one-disk nodes written through the chain crate, no
    /// QEMU and no node files (enough for `list` and `show`): node `i`'s parent is node `parent_of(i)` (a
    /// full where that is `None`). Returns the node ids in order.
    pub fn synthetic_vm(
        &self,
        vm: &str,
        count: usize,
        parent_of: impl Fn(usize) -> Option<usize>,
    ) -> Vec<chain::NodeId> {
        let repo = chain::Repository::open(self.path()).expect("open repository");
        let store = repo.create_vm(vm).expect("create VM");
        let guard = store
            .lock_exclusive(chain::LockWait::NoWait, "test")
            .expect("lock");
        let mut manifest = store.load().expect("load");
        // Times through serde: chrono is the chain crate's dependency, not this crate's.
        let created = serde_json::from_value(serde_json::json!("2025-01-01T00:00:00Z")).expect("time");
        let mut ids: Vec<chain::NodeId> = Vec::new();
        for i in 0..count {
            let id = chain::NodeId::from_seq(i as u64 + 1);
            let parent = parent_of(i).map(|p| ids[p].clone());
            let disk = chain::NodeDisk {
                source_host: None,
                disk: "disk0".into(),
                file: chain::RelPath::disk_image(&id, "disk0").expect("path"),
                backing: parent
                    .as_ref()
                    .map(|p| chain::RelPath::disk_image(p, "disk0").expect("path")),
                virtual_size: 16 * crate::MIB,
                allocated_bytes: crate::MIB,
                bitmap: None,
                table: Some(chain::RelPath::disk_table(&id, "disk0").expect("path")),
                table_sha256: None,
                location: chain::Location {
                    host: "test-host".into(),
                    path: format!("/nowhere/{id}/disk0.qcow2"),
                    predecessor: None,
                },
            };
            let kind = if parent.is_some() {
                chain::NodeKind::Incremental
            } else {
                chain::NodeKind::Full
            };
            // Pushed, and numbered once at the end: `add_node` renumbers the tree each time.
            manifest.nodes.push(chain::Node {
                id: id.clone(),
                parent,
                kind,
                created,
                state: chain::NodeState::Complete,
                tag: None,
                reason: None,
                lid: 0,
                tid: 0,
                disks: vec![disk],
            });
            ids.push(id);
        }
        manifest.next_seq = count as u64 + 1;
        manifest.recompute_numbering().expect("a tree");
        manifest.current = ids.last().cloned();
        store.save(&manifest, &guard).expect("save");
        ids
    }

    /// A node's full checking table as the manifest's files give it: whole tables read, differences applied in
    /// recovery chain order, each checked against its base (what qmpbak derives, rebuilt here independently).
    pub fn derived_table(&self, vm: &str, node: &str, disk: &str) -> chain::Table {
        let manifest = self.manifest(vm);
        let id = node.parse().expect("a node id");
        let mut table: Option<(chain::Table, chain::Digest)> = None;
        for n in manifest.recovery_chain(&id).expect("the node's recovery chain") {
            let d = n
                .disks
                .iter()
                .find(|d| d.disk == disk)
                .expect("the node has the disk");
            let rel = d.table.as_ref().expect("the node's disk has a table");
            let sha = d.table_sha256.as_ref().expect("the table's sha256");
            let path = self.vm_dir(vm).join(rel.as_path());
            match chain::TableFile::load_verified(&path, sha).expect("a table file that verifies") {
                chain::TableFile::Whole { table: t, id } => table = Some((t, id)),
                chain::TableFile::Diff(diff) => {
                    let (t, id) = table.as_mut().expect("a difference above a whole table");
                    t.apply_diff(id, &diff, &path)
                        .expect("the difference applies to its base");
                    *id = *diff.id();
                }
            }
        }
        let (table, id) = table.expect("a whole table at the bottom of the chain");
        assert_eq!(table.content_id(), id);
        table
    }

    /// The node file of `node` for `disk`.
    pub fn node_file(&self, vm: &str, node: &str, disk: &str) -> PathBuf {
        self.vm_dir(vm).join(node).join(format!("{disk}.qcow2"))
    }

    /// Arguments `ARGS --repo <this repository> --vm VM`, for a command on one VM's store in this repository.
    pub fn vm_args(&self, vm: &str, args: &[&str]) -> Vec<String> {
        let mut all: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
        all.extend([
            "--repo".into(),
            self.path().display().to_string(),
            "--vm".into(),
            vm.into(),
        ]);
        all
    }

    /// Runs `qmpbak ARGS --repo <this repository> --vm VM` and returns its output (not asserting success).
    pub fn run(&self, vm: &str, args: &[&str]) -> Output {
        cli::run_owned(&self.vm_args(vm, args))
    }

    /// Arguments `ARGS --socket SOCKET --repo <this repository> --vm VM --json`, for a command on the running
    /// QEMU behind QMP socket `socket` (a [`TestVm`]'s or a [`TestGuest`](crate::guest::TestGuest)'s) and VM
    /// `vm`'s store in this repository.
    pub fn socket_args(&self, socket: &Path, vm: &str, args: &[&str]) -> Vec<String> {
        let socket = socket.display().to_string();
        let mut all = self.vm_args(vm, &[args, &["--socket", &socket]].concat());
        all.push("--json".into());
        all
    }

    /// Arguments for `qmpbak backup` of `vm` into this repository, plus `extra`.
    pub fn backup_args(&self, vm: &TestVm, name: &str, extra: &[&str]) -> Vec<String> {
        self.socket_backup_args(&vm.socket(), name, extra)
    }

    /// Arguments for `qmpbak backup --json` of the QEMU behind QMP socket `socket` into this repository as VM
    /// `name`, plus `extra`.
    pub fn socket_backup_args(&self, socket: &Path, name: &str, extra: &[&str]) -> Vec<String> {
        let mut args = self.socket_args(socket, name, &["backup"]);
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        args
    }

    /// Runs `qmpbak backup --json` and returns its output (not asserting success).
    pub fn try_backup(&self, vm: &TestVm, name: &str, extra: &[&str]) -> Output {
        cli::run_owned(&self.backup_args(vm, name, extra))
    }

    /// Runs a successful `qmpbak backup --json` and returns its JSON report.
    #[track_caller]
    pub fn backup(&self, vm: &TestVm, name: &str, extra: &[&str]) -> serde_json::Value {
        self.try_backup(vm, name, extra).success().json()
    }

    /// Runs a successful `qmpbak backup --json` and returns its report.
    #[track_caller]
    pub fn backup_report(&self, vm: &TestVm, name: &str, extra: &[&str]) -> BackupReport {
        self.try_backup(vm, name, extra).success().report()
    }

    /// Runs a successful `qmpbak backup --json` and returns the id of the node it made.
    #[track_caller]
    pub fn backup_node(&self, vm: &TestVm, name: &str, extra: &[&str]) -> String {
        self.backup_report(vm, name, extra).node
    }

    /// Arguments for `qmpbak restore NODE --live --json` of VM `vm`'s node `node` from this repository into the
    /// paused QEMU behind QMP socket `socket`, plus `extra`.
    pub fn live_restore_args(&self, socket: &Path, vm: &str, node: &str, extra: &[&str]) -> Vec<String> {
        let mut args = self.socket_args(socket, vm, &["restore", node, "--live"]);
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        args
    }
}

/// The `copied_bytes` of each disk in a `qmpbak backup --json` report, in the report's order.
#[track_caller]
pub fn copied_bytes(report: &BackupReport) -> Vec<u64> {
    report.disks.iter().map(|d| d.copied_bytes).collect()
}

/// Asserts that QEMU has no jobs and no block nodes but the VM's own, and that every qmpbak bitmap on the
/// VM's disks is one of `expected_bitmaps`.
pub async fn assert_no_leftovers(vm: &TestVm, expected_bitmaps: &[String]) {
    let jobs = vm
        .qmp()
        .execute_raw("query-jobs", None)
        .await
        .expect("query-jobs");
    assert_eq!(jobs.as_array().map(Vec::len), Some(0), "leftover jobs: {jobs}");
    let nodes = vm
        .qmp()
        .execute_raw("query-named-block-nodes", Some(serde_json::json!({"flat": true})))
        .await;
    let nodes = nodes.expect("query-named-block-nodes");
    for node in nodes.as_array().expect("array") {
        let name = node["node-name"].as_str().unwrap_or_default();
        assert!(
            name.starts_with("node-") || name.starts_with('#'),
            "leftover block node {name}: {}",
            node["file"]
        );
    }
    let blocks = vm
        .qmp()
        .execute_raw("query-block", None)
        .await
        .expect("query-block");
    for block in blocks.as_array().expect("array") {
        for bitmap in block["inserted"]["dirty-bitmaps"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let name = bitmap["name"].as_str().unwrap_or_default().to_owned();
            if name.starts_with("qmpbak-") {
                assert!(
                    expected_bitmaps.contains(&name),
                    "unexpected bitmap {name}; expected {expected_bitmaps:?}"
                );
            }
        }
    }
}

/// The names of qmpbak's bitmaps a VM should carry after backup `node` whose full is `full` (every disk's).
pub fn expected_bitmaps(manifest: &chain::Manifest, node: &str, full: &str) -> Vec<String> {
    manifest
        .disks
        .iter()
        .flat_map(|d| {
            [
                bitmap_name(manifest, &d.id, "inc", node),
                bitmap_name(manifest, &d.id, "diff", full),
            ]
        })
        .collect()
}

/// The name of disk `disk`'s qmpbak bitmap of `role` (`inc` or `diff`) relative to `node`: it carries the
/// chain id and the disk's key from the manifest.
#[track_caller]
pub fn bitmap_name(manifest: &chain::Manifest, disk: &str, role: &str, node: &str) -> String {
    let key = manifest
        .disk(disk)
        .and_then(|d| d.key.clone())
        .unwrap_or_else(|| panic!("disk {disk} has no key in the manifest"));
    format!("qmpbak-{}-{key}-{role}-{node}", manifest.chain_id)
}

/// Whether a file exists below `dir` with a name containing `needle`.
pub fn any_file_named(dir: &Path, needle: &str) -> bool {
    std::fs::read_dir(dir).into_iter().flatten().flatten().any(|e| {
        let p = e.path();
        p.file_name()
            .is_some_and(|n| n.to_string_lossy().contains(needle))
            || (p.is_dir() && any_file_named(&p, needle))
    })
}
