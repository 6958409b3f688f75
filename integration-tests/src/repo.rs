//! Helpers for tests that back up a [`TestVm`](crate::TestVm) into a repository: run `qmpbak` against it, read
//! the manifest through the chain crate, and check that QEMU was left with nothing of qmpbak's.

use std::path::{Path, PathBuf};

use crate::cli::{self, Output};
use crate::vm::TestVm;

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

    pub fn vm_dir(&self, vm: &str) -> PathBuf {
        self.path().join(vm)
    }

    /// The VM's manifest, loaded and validated by the chain crate.
    pub fn manifest(&self, vm: &str) -> chain::Manifest {
        let repo = chain::Repository::open(self.path()).expect("open repository");
        repo.vm(vm).expect("vm store").load().expect("manifest loads")
    }

    /// The node file of `node` for `disk`.
    pub fn node_file(&self, vm: &str, node: &str, disk: &str) -> PathBuf {
        self.vm_dir(vm).join(node).join(format!("{disk}.qcow2"))
    }

    /// Arguments for `qmpbak backup` of `vm` into this repository, plus `extra`.
    pub fn backup_args(&self, vm: &TestVm, name: &str, extra: &[&str]) -> Vec<String> {
        let mut args: Vec<String> = vec![
            "backup".into(),
            "--socket".into(),
            vm.socket().display().to_string(),
            "--repo".into(),
            self.path().display().to_string(),
            "--vm".into(),
            name.into(),
            "--json".into(),
        ];
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        args
    }

    /// Runs `qmpbak backup --json` and returns its output (not asserting success).
    pub fn try_backup(&self, vm: &TestVm, name: &str, extra: &[&str]) -> Output {
        let args = self.backup_args(vm, name, extra);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        cli::run(&refs)
    }

    /// Runs a successful `qmpbak backup --json` and returns its JSON report.
    #[track_caller]
    pub fn backup(&self, vm: &TestVm, name: &str, extra: &[&str]) -> serde_json::Value {
        self.try_backup(vm, name, extra).success().json()
    }
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

/// The names of qmpbak's bitmaps a VM should carry after backup `node` whose full is `full`.
pub fn expected_bitmaps(manifest: &chain::Manifest, node: &str, full: &str) -> Vec<String> {
    vec![
        format!("qmpbak-{}-inc-{node}", manifest.chain_id),
        format!("qmpbak-{}-diff-{full}", manifest.chain_id),
    ]
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
