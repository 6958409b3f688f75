//! `qmpbak prune` and `qmpbak merge` against real QEMU backups: what a policy keeps still restores exactly
//! (checked against references captured at each backup's instant), `verify` passes afterwards, the bytes freed
//! are what left the disk, a dry run changes nothing, a prune or merge killed midway leaves a tree that still
//! restores exactly and is finished by the next run, and the VM's next incremental still works.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use chain::retention::Action;
use integration_tests::repo::{BackupReport, TestRepo};
use integration_tests::timeouts::CLI_TIMEOUT;
use integration_tests::{MIB, TestVm, cli, image};
use qmpbak_engine::merge::MergeReport;
use qmpbak_engine::prune::PruneReport;
use qmpbak_engine::verify::VerifyReport;

const VM: &str = "vm1";
const DISKS: [&str; 2] = ["disk0", "disk1"];

fn sizes() -> [(&'static str, u64); 2] {
    [("disk0", 32 * MIB), ("disk1", 16 * MIB)]
}

/// A backup node and the references of its disks, captured at its instant.
struct Point {
    node: String,
    refs: Vec<PathBuf>,
}

/// Writes something different for round `i`: new data, overwrites of older data, and now and then zeroes over
/// data an older node holds.
async fn change(vm: &TestVm, i: u8) {
    let i64 = u64::from(i);
    vm.write_pattern("disk0", 0x10 + i, (i64 % 6) * 4 * MIB + 512 * 1024, MIB)
        .await;
    vm.write_pattern("disk0", 0x40 + i, i64 * 256 * 1024, 64 * 1024)
        .await;
    if i % 2 == 0 {
        vm.write_pattern("disk1", 0x70 + i, i64 * MIB, 128 * 1024).await;
    }
    if i % 3 == 0 {
        vm.write_zeroes("disk0", 0, MIB).await;
    }
}

/// Captures references of `vm`'s disks into `work` as `label`, then backs it up: the report and the new point.
async fn backup_point(repo: &TestRepo, vm: &TestVm, work: &Path, label: &str) -> (BackupReport, Point) {
    let refs = vm.capture_references(&DISKS, work, label).await;
    let report = repo.backup_report(vm, VM, &[]);
    let point = Point {
        node: report.node.clone(),
        refs,
    };
    (report, point)
}

/// A full and `n - 1` incrementals of `vm`, each with references.
async fn backups(repo: &TestRepo, vm: &TestVm, work: &Path, n: u8, label: &str) -> Vec<Point> {
    let mut points = Vec::new();
    for i in 0..n {
        if i == 0 {
            vm.write_pattern("disk0", 0x01, 0, 8 * MIB).await;
            vm.write_pattern("disk1", 0x02, 4 * MIB, 2 * MIB).await;
        } else {
            change(vm, i).await;
        }
        points.push(backup_point(repo, vm, work, &format!("{label}{i}")).await.1);
    }
    points
}

fn prune(repo: &TestRepo, extra: &[&str]) -> cli::Output {
    repo.run(VM, &[&["prune", "--json"], extra].concat())
}

fn merge(repo: &TestRepo, node: &str) -> cli::Output {
    repo.run(VM, &["merge", node, "--json"])
}

#[track_caller]
fn assert_restores_exactly(repo: &TestRepo, point: &Point, out: &Path) {
    let dir = out.join(&point.node);
    let to = dir.display().to_string();
    repo.run(VM, &["restore", &point.node, "--to", &to, "--json"])
        .success();
    for (disk, reference) in DISKS.iter().zip(&point.refs) {
        image::assert_same(reference, &dir.join(format!("{disk}.qcow2")));
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[track_caller]
fn assert_verifies(repo: &TestRepo) {
    let report: VerifyReport = repo.run(VM, &["verify", "--json"]).success().report();
    assert!(report.ok, "{report:?}");
}

/// Bytes the files of the node directories take on the host.
fn node_file_bytes(repo: &TestRepo) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(repo.vm_dir(VM)).unwrap().flatten() {
        if entry.file_type().unwrap().is_dir() {
            for file in std::fs::read_dir(entry.path()).unwrap().flatten() {
                let meta = file.metadata().unwrap();
                if meta.is_file() {
                    total += meta.blocks() * 512;
                }
            }
        }
    }
    total
}

/// Every file below the VM directory with its size and modification time.
fn listing(dir: &Path) -> BTreeMap<PathBuf, (u64, i64, i64)> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let meta = entry.metadata().unwrap();
        if meta.is_dir() {
            out.extend(listing(&entry.path()));
        } else {
            out.insert(entry.path(), (meta.len(), meta.mtime(), meta.mtime_nsec()));
        }
    }
    out
}

fn ids(points: &[Point]) -> Vec<String> {
    points.iter().map(|p| p.node.clone()).collect()
}

#[tokio::test]
async fn keep_last_three_of_eight_merges_the_rest_away_and_what_stays_restores_exactly() {
    let repo = TestRepo::init();
    let work = tempfile::tempdir().unwrap();
    let vm = TestVm::start(&sizes()).await;
    let points = backups(&repo, &vm, work.path(), 8, "n").await;
    let all = ids(&points);

    // A dry run prints the plan and touches nothing.
    let before = listing(&repo.vm_dir(VM));
    let dry = prune(&repo, &["--keep-last", "3", "--dry-run"]).success();
    // The printed shape: the prune report's documented keys (and a plan entry's, a merged node's, the
    // leftovers'), so a renamed field is caught.
    let raw = dry.json();
    cli::assert_keys(
        &raw,
        &[
            "vm",
            "dry_run",
            "policy",
            "plan",
            "removed",
            "merged",
            "removed_bytes",
            "added_bytes",
            "freed_bytes",
            "leftovers",
        ],
    );
    cli::assert_keys(
        &raw["plan"][0],
        &["node", "kind", "state", "created", "tag", "action", "why", "into"],
    );
    cli::assert_keys(&raw["leftovers"], &["operations", "files", "freed_bytes"]);
    let dry: PruneReport = dry.report();
    assert!(dry.dry_run, "{dry:?}");
    assert_eq!(
        dry.removed,
        all[..5].iter().rev().cloned().collect::<Vec<_>>(),
        "{dry:?}"
    );
    let actions: Vec<Action> = dry.plan.iter().map(|d| d.action).collect();
    assert_eq!(
        actions,
        [[Action::MergeIntoChildren; 5].as_slice(), &[Action::Keep; 3]].concat()
    );
    assert_eq!(listing(&repo.vm_dir(VM)), before, "a dry run changes nothing");

    let bytes_before = node_file_bytes(&repo);
    let printed = prune(&repo, &["--keep-last", "3"]).success();
    cli::assert_keys(&printed.json()["merged"][0], &["node", "into"]);
    let report: PruneReport = printed.report();
    let bytes_after = node_file_bytes(&repo);
    assert_eq!(report.removed, all[..5].iter().rev().cloned().collect::<Vec<_>>());
    for merged in &report.merged {
        assert_eq!(merged.into, [all[5].clone()], "{report:?}");
    }
    let freed = report.freed_bytes;
    assert_eq!(
        freed,
        i64::try_from(bytes_before).unwrap() - i64::try_from(bytes_after).unwrap(),
        "freed bytes are what left the disk: {report:?}"
    );
    assert!(freed > 0, "{report:?}");
    assert_eq!(
        i64::try_from(report.removed_bytes).unwrap() - i64::try_from(report.added_bytes).unwrap(),
        freed
    );

    // The three newest remain; the oldest of them absorbed the rest and is a full now.
    let manifest = repo.manifest(VM);
    let left: Vec<String> = manifest.nodes.iter().map(|n| n.id.to_string()).collect();
    assert_eq!(left, all[5..]);
    let first = manifest.node(&all[5].parse().unwrap()).unwrap();
    assert_eq!(first.kind, chain::NodeKind::Full);
    assert!(first.parent.is_none() && first.disks.iter().all(|d| d.backing.is_none()));
    for disk in DISKS {
        let info = image::info(&repo.node_file(VM, &all[5], disk));
        assert!(info.get("backing-filename").is_none(), "standalone: {info}");
    }
    assert!(manifest.operations.is_empty());
    assert_eq!(manifest.current.as_ref().unwrap().to_string(), all[7]);
    for gone in &all[..5] {
        assert!(!repo.vm_dir(VM).join(gone).exists(), "{gone}'s directory is gone");
    }
    let out = work.path().join("out");
    for point in &points[5..] {
        assert_restores_exactly(&repo, point, &out);
    }
    assert_verifies(&repo);

    // The VM's bitmaps count from the current node, which stayed: the next backup is a bitmap incremental.
    change(&vm, 9).await;
    let (report, next) = backup_point(&repo, &vm, work.path(), "after").await;
    assert_eq!(report.level, "incremental", "{report:?}");
    assert_eq!(report.method, "bitmap", "{report:?}");
    assert_eq!(report.parent.as_ref(), Some(&all[7]));
    assert_restores_exactly(&repo, &next, &out);

    // Pruning again with the same policy has nothing more to do than the new backup asks.
    let again: PruneReport = prune(&repo, &["--keep-last", "3"]).success().report();
    assert_eq!(again.removed, [all[5].clone()], "{again:?}");
    for point in points[6..].iter().chain([&next]) {
        assert_restores_exactly(&repo, point, &out);
    }
}

#[tokio::test]
async fn a_tree_with_two_branches_keeps_the_newest_of_each_and_merges_the_shared_part_into_both() {
    let repo = TestRepo::init();
    let work = tempfile::tempdir().unwrap();
    let vm1 = TestVm::start(&sizes()).await;
    let mut points = backups(&repo, &vm1, work.path(), 3, "a").await;
    drop(vm1);
    // A second branch from the middle node, restored live into a new VM that then changes.
    let vm2 = TestVm::start_paused(&sizes()).await;
    cli::run_owned(&repo.live_restore_args(&vm2.socket(), VM, &points[1].node, &[])).success();
    for i in 0..2u8 {
        change(&vm2, 20 + i).await;
        points.push(backup_point(&repo, &vm2, work.path(), &format!("b{i}")).await.1);
    }
    let all = ids(&points);
    // 1 - 2 - 3 and 2 - 4 - 5 (current).
    let manifest = repo.manifest(VM);
    assert_eq!(
        manifest
            .node(&all[3].parse().unwrap())
            .unwrap()
            .parent
            .as_ref()
            .unwrap()
            .to_string(),
        all[1]
    );

    let report: PruneReport = prune(&repo, &["--keep-last", "1"]).success().report();
    assert_eq!(report.removed, [&all[3], &all[1], &all[0]].map(String::clone));
    let merged: Vec<(String, Vec<String>)> = report
        .merged
        .iter()
        .map(|m| (m.node.clone(), m.into.clone()))
        .collect();
    assert_eq!(
        merged,
        [
            (all[3].clone(), vec![all[4].clone()]),
            (all[1].clone(), vec![all[2].clone(), all[4].clone()]),
            (all[0].clone(), vec![all[2].clone(), all[4].clone()]),
        ]
    );
    let manifest = repo.manifest(VM);
    assert_eq!(manifest.tree().unwrap().roots().len(), 2, "two standalone fulls");
    for id in [&all[2], &all[4]] {
        let node = manifest.node(&id.parse().unwrap()).unwrap();
        assert_eq!(node.kind, chain::NodeKind::Full, "{node:?}");
    }
    let out = work.path().join("out");
    for point in [&points[2], &points[4]] {
        assert_restores_exactly(&repo, point, &out);
    }
    assert_verifies(&repo);

    change(&vm2, 30).await;
    let (report, next) = backup_point(&repo, &vm2, work.path(), "after").await;
    assert_eq!(report.method, "bitmap", "{report:?}");
    assert_eq!(report.parent.as_ref(), Some(&all[4]));
    assert_restores_exactly(&repo, &next, &out);
}

#[tokio::test]
async fn a_prune_killed_midway_leaves_an_exact_tree_and_the_next_prune_finishes_it() {
    let repo = TestRepo::init();
    let work = tempfile::tempdir().unwrap();
    let vm = TestVm::start(&sizes()).await;
    let points = backups(&repo, &vm, work.path(), 5, "k").await;
    let all = ids(&points);
    let out = work.path().join("out");

    // Killed right after the first rebase: 0003 has absorbed its parent's layer, the manifest does not say so.
    let args = repo.vm_args(VM, &["prune", "--keep-last", "2", "--json"]);
    cli::run_crashing_at(&args, "prune-rebased", CLI_TIMEOUT).assert_crashed_at("prune-rebased");
    let manifest = repo.manifest(VM);
    assert_eq!(manifest.nodes.len(), 5);
    assert_eq!(manifest.operations.len(), 1);
    assert!(matches!(
        manifest.operations[0].payload,
        chain::Payload::Prune { .. }
    ));
    for point in &points {
        assert_restores_exactly(&repo, point, &out);
    }

    // Killed again after a node left the manifest but before its files were deleted.
    cli::run_crashing_at(&args, "prune-dropped", CLI_TIMEOUT).assert_crashed_at("prune-dropped");
    let manifest = repo.manifest(VM);
    assert_eq!(manifest.nodes.len(), 4, "one node left the manifest");
    assert!(
        repo.vm_dir(VM).join(&all[2]).exists(),
        "its files are still there"
    );
    for point in points.iter().filter(|p| p.node != all[2]) {
        assert_restores_exactly(&repo, point, &out);
    }

    // The next prune removes the leftovers and finishes the job.
    let report: PruneReport = prune(&repo, &["--keep-last", "2"]).success().report();
    assert_eq!(report.leftovers.operations.len(), 1, "{report:?}");
    assert!(!report.leftovers.files.is_empty(), "{report:?}");
    assert_eq!(report.removed, [&all[1], &all[0]].map(String::clone));
    let manifest = repo.manifest(VM);
    assert!(manifest.operations.is_empty());
    let left: Vec<String> = manifest.nodes.iter().map(|n| n.id.to_string()).collect();
    assert_eq!(left, all[3..]);
    let dirs: Vec<String> = std::fs::read_dir(repo.vm_dir(VM))
        .unwrap()
        .flatten()
        .filter(|e| e.file_type().unwrap().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        dirs.len(),
        2,
        "only the kept nodes' directories are left: {dirs:?}"
    );
    for point in &points[3..] {
        assert_restores_exactly(&repo, point, &out);
    }
    assert_verifies(&repo);

    change(&vm, 7).await;
    let next = repo.backup_report(&vm, VM, &[]);
    assert_eq!(next.method, "bitmap", "{next:?}");
}

#[tokio::test]
async fn merge_makes_a_synthetic_full_whose_descendants_and_ancestors_still_restore_exactly() {
    let repo = TestRepo::init();
    let work = tempfile::tempdir().unwrap();
    let vm = TestVm::start(&sizes()).await;
    let points = backups(&repo, &vm, work.path(), 5, "m").await;
    let all = ids(&points);
    let out = work.path().join("out");

    // Killed after the first disk's file was replaced: the tree still restores exactly.
    let args = repo.vm_args(VM, &["merge", &all[2], "--json"]);
    cli::run_crashing_at(&args, "merge-renamed", CLI_TIMEOUT).assert_crashed_at("merge-renamed");
    for point in &points {
        assert_restores_exactly(&repo, point, &out);
    }

    let printed = merge(&repo, &all[2]).success();
    // The printed shape: the merge report's documented keys (and a disk's), so a renamed field is caught.
    let raw = printed.json();
    cli::assert_keys(
        &raw,
        &[
            "vm",
            "node",
            "previous_parent",
            "folded",
            "disks",
            "added_bytes",
            "leftovers",
        ],
    );
    cli::assert_keys(&raw["disks"][0], &["disk", "before_bytes", "after_bytes"]);
    let report: MergeReport = printed.report();
    assert_eq!(report.folded, all[..2]);
    assert_eq!(report.leftovers.operations.len(), 1, "{report:?}");
    let manifest = repo.manifest(VM);
    let node = manifest.node(&all[2].parse().unwrap()).unwrap();
    assert_eq!(node.kind, chain::NodeKind::Full);
    assert!(node.parent.is_none() && node.disks.iter().all(|d| d.backing.is_none()));
    assert!(manifest.operations.is_empty());
    assert_eq!(manifest.nodes.len(), 5, "the old ancestors stay");
    assert_eq!(manifest.tree().unwrap().roots().len(), 2);
    for disk in DISKS {
        let file = repo.node_file(VM, &all[2], disk);
        assert!(image::info(&file).get("backing-filename").is_none());
        // On its own, the file is the node's disk.
        image::assert_same(
            &points[2].refs[DISKS.iter().position(|d| *d == disk).unwrap()],
            &file,
        );
        assert!(
            !repo
                .vm_dir(VM)
                .join(&all[2])
                .join(format!("{disk}.merging.qcow2"))
                .exists()
        );
    }
    for point in &points {
        assert_restores_exactly(&repo, point, &out);
    }
    assert_verifies(&repo);

    // Merging a full does nothing; the next backup is still an incremental of the current node.
    let again: MergeReport = merge(&repo, &all[2]).success().report();
    assert!(again.previous_parent.is_none(), "{again:?}");
    change(&vm, 8).await;
    let (report, next) = backup_point(&repo, &vm, work.path(), "after").await;
    assert_eq!(report.method, "bitmap", "{report:?}");
    assert_eq!(report.parent.as_ref(), Some(&all[4]));
    assert_restores_exactly(&repo, &next, &out);
}

#[tokio::test]
async fn prune_without_a_policy_is_a_usage_error_and_failed_backups_go() {
    let repo = TestRepo::init();
    let vm = TestVm::start(&[("disk0", 16 * MIB)]).await;
    repo.backup_report(&vm, VM, &[]);
    let out = prune(&repo, &[]);
    assert_eq!(out.code(), Some(2), "{out:?}");
    // A backup killed midway leaves a failed node once cleaned up; prune removes it.
    let killed = cli::run_crashing_at(&repo.backup_args(&vm, VM, &[]), "backup-copied", CLI_TIMEOUT);
    assert!(!killed.status.success(), "{killed:?}");
    let refused = prune(&repo, &["--keep-last", "5"]);
    assert_eq!(refused.code(), Some(1), "{refused:?}");
    assert!(refused.stderr.contains("qmpbak cleanup"), "{}", refused.stderr);
    let socket = vm.socket().display().to_string();
    repo.run(VM, &["cleanup", "--socket", &socket]).success();
    let failed = repo
        .manifest(VM)
        .nodes
        .iter()
        .find(|n| n.state == chain::NodeState::Failed)
        .map(|n| n.id.to_string())
        .unwrap();
    let report: PruneReport = prune(&repo, &["--keep-last", "5"]).success().report();
    assert_eq!(report.removed, vec![failed.clone()], "{report:?}");
    assert!(repo.manifest(VM).node(&failed.parse().unwrap()).is_none());
    assert!(!repo.vm_dir(VM).join(&failed).exists());
}
