//! Difference tables (issue 22): an incremental's checking table holds only the blocks that differ from its
//! parent's, and the full table of any node is derived along its recovery chain. Tested against real QEMU
//! backups: the table files are the size of the change, the derived table of every node equals the table of
//! its restored image, prune in the middle of a chain and merge (also killed between their steps) keep every
//! remaining node's table exact, a difference applied to a table that is not its base is refused, and a
//! checksum-diff after a QEMU restart compares against a derived table.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use chain::Table;
use integration_tests::repo::TestRepo;
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

/// A node and its disks' references, captured at its instant.
struct Point {
    node: String,
    refs: Vec<PathBuf>,
}

async fn backup_point(repo: &TestRepo, vm: &TestVm, work: &Path, label: &str, extra: &[&str]) -> Point {
    let refs = vm.capture_references(&DISKS, work, label).await;
    let node = repo.backup_node(vm, VM, extra);
    Point { node, refs }
}

/// The table file the manifest names for a node's disk.
fn table_path(repo: &TestRepo, node: &str, disk: &str) -> PathBuf {
    let manifest = repo.manifest(VM);
    let n = manifest.node(&node.parse().unwrap()).unwrap();
    let d = n.disks.iter().find(|d| d.disk == disk).unwrap();
    repo.vm_dir(VM).join(d.table.as_ref().unwrap().as_path())
}

/// The format version in a table file's header.
fn version(path: &Path) -> u8 {
    std::fs::read(path).unwrap()[8]
}

/// Restores `point` as raw images, checks them against its references, and checks that the table built from
/// each restored image is the node's derived table.
#[track_caller]
fn assert_exact(repo: &TestRepo, point: &Point, out: &Path) {
    let dir = out.join(&point.node);
    let to = dir.display().to_string();
    repo.run(VM, &["restore", &point.node, "--to", &to, "--format", "raw"])
        .success();
    for (disk, reference) in DISKS.iter().zip(&point.refs) {
        let raw = dir.join(format!("{disk}.raw"));
        image::assert_same(reference, &raw);
        let built = Table::build(
            &chain::FileSource::open(&raw).unwrap(),
            chain::Scheme::default(),
            MIB,
            2,
        )
        .unwrap();
        assert_eq!(
            built,
            repo.derived_table(VM, &point.node, disk),
            "node {} disk {disk}",
            point.node
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[track_caller]
fn assert_verifies(repo: &TestRepo) {
    let report: VerifyReport = repo.run(VM, &["verify", "--json"]).success().report();
    assert!(report.ok, "{report:?}");
}

/// A full (tagged `base`) and four incrementals with known changes, per disk the number of 1 MiB blocks
/// whose content each incremental changed.
async fn chain_of_five(repo: &TestRepo, vm: &TestVm, work: &Path) -> (Vec<Point>, Vec<[u64; 2]>) {
    vm.write_pattern("disk0", 0x01, 0, 8 * MIB).await;
    vm.write_pattern("disk1", 0x02, 4 * MIB, 2 * MIB).await;
    let mut points = vec![backup_point(repo, vm, work, "p0", &["--tag", "base"]).await];
    let mut changed = Vec::new();
    // 1: block 20 new, block 1 zeroed; disk1 unchanged.
    vm.write_pattern("disk0", 0x21, 20 * MIB, 64 * 1024).await;
    vm.write_zeroes("disk0", MIB, MIB).await;
    points.push(backup_point(repo, vm, work, "p1", &[]).await);
    changed.push([2, 0]);
    // 2: blocks 3, 4, 5 (across boundaries); disk1 block 0.
    vm.write_pattern("disk0", 0x22, 3 * MIB + 4096, 2 * MIB).await;
    vm.write_pattern("disk1", 0x23, 0, 4096).await;
    points.push(backup_point(repo, vm, work, "p2", &[]).await);
    changed.push([3, 1]);
    // 3: disk1's last block; disk0 block 20 rewritten with what it holds (no change).
    vm.write_pattern("disk1", 0x24, 15 * MIB, MIB).await;
    vm.write_pattern("disk0", 0x21, 20 * MIB, 64 * 1024).await;
    points.push(backup_point(repo, vm, work, "p3", &[]).await);
    changed.push([0, 1]);
    // 4: disk0 block 31 (the last), block 5 overwritten again.
    vm.write_pattern("disk0", 0x25, 31 * MIB, 4096).await;
    vm.write_pattern("disk0", 0x26, 5 * MIB, 4096).await;
    points.push(backup_point(repo, vm, work, "p4", &[]).await);
    changed.push([2, 0]);
    (points, changed)
}

#[tokio::test]
async fn incremental_tables_hold_only_their_changes_and_derive_every_nodes_table_exactly() {
    let repo = TestRepo::init();
    let work = tempfile::tempdir().unwrap();
    let vm = TestVm::start(&sizes()).await;
    let (points, changed) = chain_of_five(&repo, &vm, work.path()).await;
    let out = work.path().join("out");

    for disk in DISKS {
        assert_eq!(
            version(&table_path(&repo, &points[0].node, disk)),
            2,
            "the full's table is whole"
        );
    }
    for (point, counts) in points[1..].iter().zip(&changed) {
        for (disk, count) in DISKS.iter().zip(counts) {
            let path = table_path(&repo, &point.node, disk);
            assert_eq!(version(&path), 3, "{}", path.display());
            assert_eq!(
                std::fs::metadata(&path).unwrap().len(),
                chain::table::diff_file_len(*count),
                "node {} disk {disk}: {count} changed blocks",
                point.node
            );
        }
    }
    for point in &points {
        assert_exact(&repo, point, &out);
    }
    assert_verifies(&repo);
}

#[tokio::test]
async fn prune_in_the_middle_and_merge_rewrite_difference_tables_and_keep_every_table_exact() {
    let repo = TestRepo::init();
    let work = tempfile::tempdir().unwrap();
    let vm = TestVm::start(&sizes()).await;
    let (points, _) = chain_of_five(&repo, &vm, work.path()).await;
    let ids: Vec<String> = points.iter().map(|p| p.node.clone()).collect();
    let out = work.path().join("out");

    // Keeping the tagged full and the last two, nodes 1 and 2 go; node 3 absorbs them, and its difference
    // table (against node 2's) is written anew against the full's. Killed once the new tables are written and
    // before the manifest names them: everything still derives and restores exactly.
    let args = repo.vm_args(VM, &["prune", "--keep-last", "2", "--keep-tag", "--json"]);
    cli::run_crashing_at(&args, "prune-tables-rewritten", CLI_TIMEOUT)
        .assert_crashed_at("prune-tables-rewritten");
    let manifest = repo.manifest(VM);
    assert_eq!(manifest.operations.len(), 1);
    for point in &points {
        assert_exact(&repo, point, &out);
    }
    // The next prune deletes the unused new tables it recorded, plans afresh and finishes.
    let report = repo
        .run(VM, &["prune", "--keep-last", "2", "--keep-tag", "--json"])
        .success()
        .report::<PruneReport>();
    assert_eq!(report.leftovers.operations.len(), 1, "{report:?}");
    let manifest = repo.manifest(VM);
    assert!(manifest.operations.is_empty());
    let left: Vec<String> = manifest.nodes.iter().map(|n| n.id.to_string()).collect();
    assert_eq!(left, [&ids[0], &ids[3], &ids[4]].map(String::clone));
    for disk in DISKS {
        let path = table_path(&repo, &ids[3], disk);
        assert_eq!(
            path.file_name().unwrap().to_string_lossy(),
            format!("{disk}.table-on-{}", ids[0])
        );
        assert_eq!(version(&path), 3, "still a difference, against the full's table");
        // node 4's difference names node 3's content, which did not change
        assert_eq!(version(&table_path(&repo, &ids[4], disk)), 3);
    }
    let node3_dir = repo.vm_dir(VM).join(&ids[3]);
    let mut files: Vec<String> = std::fs::read_dir(&node3_dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(
        files,
        [
            "disk0.qcow2".to_owned(),
            format!("disk0.table-on-{}", ids[0]),
            "disk1.qcow2".to_owned(),
            format!("disk1.table-on-{}", ids[0]),
        ],
        "the old tables are gone, and no leftover"
    );
    let kept = [&points[0], &points[3], &points[4]];
    for point in kept {
        assert_exact(&repo, point, &out);
    }
    assert_verifies(&repo);

    // Merging node 3 makes it a full: its tables are written whole (the same content, so node 4's difference
    // against it still fits). Killed after the new tables are written, and again after the manifest names
    // them but before the old ones are deleted.
    let args = repo.vm_args(VM, &["merge", &ids[3], "--json"]);
    cli::run_crashing_at(&args, "merge-tables-rewritten", CLI_TIMEOUT)
        .assert_crashed_at("merge-tables-rewritten");
    for point in kept {
        assert_exact(&repo, point, &out);
    }
    cli::run_crashing_at(&args, "merge-tables-switched", CLI_TIMEOUT)
        .assert_crashed_at("merge-tables-switched");
    for point in kept {
        assert_exact(&repo, point, &out);
    }
    let report: MergeReport = repo.run(VM, &["merge", &ids[3], "--json"]).success().report();
    assert_eq!(report.leftovers.operations.len(), 1, "{report:?}");
    let manifest = repo.manifest(VM);
    assert!(manifest.operations.is_empty());
    for disk in DISKS {
        let path = table_path(&repo, &ids[3], disk);
        assert_eq!(
            path.file_name().unwrap().to_string_lossy(),
            format!("{disk}.table-whole")
        );
        assert_eq!(version(&path), 2, "a full's table is whole");
        assert!(!node3_dir.join(format!("{disk}.table-on-{}", ids[0])).exists());
        assert_eq!(version(&table_path(&repo, &ids[4], disk)), 3);
    }
    for point in kept {
        assert_exact(&repo, point, &out);
    }
    assert_verifies(&repo);

    // The next backup is a difference against node 4's derived table.
    vm.write_pattern("disk0", 0x27, 9 * MIB, 4096).await;
    let next = backup_point(&repo, &vm, work.path(), "p5", &[]).await;
    let path = table_path(&repo, &next.node, "disk0");
    assert_eq!(
        std::fs::metadata(&path).unwrap().len(),
        chain::table::diff_file_len(1)
    );
    assert_exact(&repo, &next, &out);
}

#[tokio::test]
async fn a_difference_over_a_table_that_is_not_its_base_is_refused_with_a_clear_error() {
    let repo = TestRepo::init();
    let work = tempfile::tempdir().unwrap();
    let vm = TestVm::start(&sizes()).await;
    let (points, _) = chain_of_five(&repo, &vm, work.path()).await;
    let ids: Vec<String> = points.iter().map(|p| p.node.clone()).collect();

    // Node 3's disk0 table replaced by node 2's (a valid difference, against node 1's table), and the
    // manifest's sha256 made to match: every file checks out, but the difference does not fit its base.
    let manifest_path = repo.vm_dir(VM).join("manifest.json");
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&manifest_path).unwrap()).unwrap();
    let at = |id: &str| {
        manifest["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .position(|n| n["id"] == id)
            .unwrap()
    };
    let (n2, n3) = (at(&ids[2]), at(&ids[3]));
    let from = repo
        .vm_dir(VM)
        .join(manifest["nodes"][n2]["disks"][0]["table"].as_str().unwrap());
    let to = repo
        .vm_dir(VM)
        .join(manifest["nodes"][n3]["disks"][0]["table"].as_str().unwrap());
    std::fs::copy(&from, &to).unwrap();
    manifest["nodes"][n3]["disks"][0]["table_sha256"] =
        manifest["nodes"][n2]["disks"][0]["table_sha256"].clone();
    std::fs::write(&manifest_path, serde_json::to_vec_pretty(&manifest).unwrap()).unwrap();

    let restored = work.path().join("r");
    for node in [&ids[3], &ids[4]] {
        let refused = repo.run(VM, &["restore", node, "--to", restored.to_str().unwrap()]);
        assert!(!refused.status.success(), "{refused:?}");
        assert!(
            refused
                .stderr
                .contains("is a difference against a table with content id")
                && refused.stderr.contains(&format!("{}/disk0.table", ids[3])),
            "{refused:?}"
        );
    }
    // verify says which nodes: node 3 and node 4 (whose table derives through node 3's), not the others.
    let report: VerifyReport = repo.run(VM, &["verify", "--json"]).report();
    assert!(!report.ok, "{report:?}");
    assert_eq!(
        report.damaged_nodes,
        [ids[3].as_str(), ids[4].as_str()],
        "{report:?}"
    );
    // The nodes below still restore.
    let ok = work.path().join("ok");
    repo.run(VM, &["restore", &ids[2], "--to", ok.to_str().unwrap()])
        .success();
}

#[tokio::test]
async fn a_checksum_diff_after_a_qemu_restart_compares_with_a_table_derived_from_differences() {
    let repo = TestRepo::init();
    let work = tempfile::tempdir().unwrap();
    let vm = TestVm::start(&sizes()).await;
    vm.write_pattern("disk0", 0x01, 0, 8 * MIB).await;
    let mut points = vec![backup_point(&repo, &vm, work.path(), "f", &[]).await];
    for i in 0..3u8 {
        vm.write_pattern("disk0", 0x30 + i, u64::from(i) * 4 * MIB + MIB / 2, MIB)
            .await;
        vm.write_pattern("disk1", 0x40 + i, u64::from(i) * MIB, 4096)
            .await;
        points.push(backup_point(&repo, &vm, work.path(), &format!("i{i}"), &[]).await);
    }
    // QEMU dies with its bitmaps unsaved: the next backup compares the disks with the last node's table,
    // derived from three differences.
    vm.qmp().execute_raw("stop", None).await.unwrap();
    vm.qmp().execute_raw("cont", None).await.unwrap();
    let vm = vm.restart().await;
    vm.write_pattern("disk0", 0x55, 20 * MIB, 4096).await;
    vm.write_pattern("disk1", 0x56, 9 * MIB, 2 * MIB).await;
    let refs = vm.capture_references(&DISKS, work.path(), "after").await;
    let report = repo.backup_report(&vm, VM, &[]);
    assert_eq!(report.method, "checksum-diff", "{report:?}");
    let point = Point {
        node: report.node.clone(),
        refs,
    };
    // Only the changed blocks are in its table, and of them only the clusters that differ from the parent's
    // chain were copied: one 64 KiB cluster of disk0 (the rest of its block is still a hole), two whole blocks
    // of disk1.
    assert_eq!(report.disks[0].copied_bytes, 64 * 1024, "{report:?}");
    assert_eq!(report.disks[1].copied_bytes, 2 * MIB, "{report:?}");
    for (disk, count) in DISKS.iter().zip([1, 2]) {
        let path = table_path(&repo, &point.node, disk);
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            chain::table::diff_file_len(count)
        );
    }
    points.push(point);
    let out = work.path().join("out");
    for point in &points {
        assert_exact(&repo, point, &out);
    }
    assert_verifies(&repo);
}
