//! `qmpbak backup` against real QEMU with two disks and known byte patterns: every node's image, read through
//! its backing chain, equals a reference captured at that backup's instant.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use integration_tests::repo::{BackupReport, TestRepo, assert_no_leftovers, copied_bytes, expected_bitmaps};
use integration_tests::{MIB, TestVm, cli, image};

const VM: &str = "vm1";
const DISKS: [&str; 2] = ["disk0", "disk1"];

async fn two_disk_vm() -> TestVm {
    TestVm::start(&[("disk0", 32 * MIB), ("disk1", 16 * MIB)]).await
}

/// Captures references of both disks into `dir` under `label`.
async fn capture(vm: &TestVm, dir: &Path, label: &str) -> Vec<PathBuf> {
    vm.capture_references(&DISKS, dir, label).await
}

/// `refs` holds the references of [`DISKS`], in that order.
fn assert_node_equals(repo: &TestRepo, node: &str, refs: &[PathBuf]) {
    for (disk, reference) in DISKS.iter().zip(refs) {
        image::assert_same(reference, &repo.node_file(VM, node, disk));
    }
}

#[tokio::test]
async fn full_then_five_incrementals_are_each_exact() {
    let vm = two_disk_vm().await;
    let repo = TestRepo::init();
    let refs_dir = tempfile::tempdir().unwrap();
    vm.write_pattern("disk0", 0x11, 0, 4 * MIB).await;
    vm.write_pattern("disk1", 0x22, 2 * MIB, MIB).await;

    let full_refs = capture(&vm, refs_dir.path(), "full").await;
    let full = repo.backup_report(&vm, VM, &[]);
    assert_eq!(full.level, "full");
    assert!(full.reason.as_str().contains("first backup"), "{full:?}");
    let full_id = full.node.clone();
    assert_node_equals(&repo, &full_id, &full_refs);

    let mut nodes = vec![(full_id.clone(), full_refs)];
    for round in 1..=5u8 {
        let off = u64::from(round) * 3 * MIB;
        vm.write_pattern("disk0", 0x30 + round, off, 512 * 1024).await;
        vm.write_pattern("disk0", 0x40 + round, off + 64 * 1024 * 7, 64 * 1024)
            .await;
        if round % 2 == 0 {
            vm.write_pattern("disk1", 0x50 + round, u64::from(round) * MIB, 128 * 1024)
                .await;
        }
        if round == 3 {
            // A discard-like zero write over data the full has: must read back as zeroes, not the parent's data.
            vm.write_zeroes("disk0", 0, MIB).await;
        }
        let refs = capture(&vm, refs_dir.path(), &format!("inc{round}")).await;
        let inc = repo.backup_report(&vm, VM, &[]);
        assert_eq!(inc.level, "incremental", "{inc:?}");
        assert_eq!(inc.method, "bitmap", "{inc:?}");
        assert_eq!(inc.parent.as_ref(), Some(&nodes.last().unwrap().0), "{inc:?}");
        let id = inc.node.clone();
        // Only what changed was copied.
        let copied = inc.disks[0].copied_bytes;
        assert!(
            copied <= 2 * MIB,
            "incremental {round} copied {copied} bytes of disk0"
        );
        nodes.push((id, refs));
    }
    // Every node, old and new, still equals its instant.
    for (id, refs) in &nodes {
        assert_node_equals(&repo, id, refs);
    }
    let manifest = repo.manifest(VM);
    let last = &nodes.last().unwrap().0;
    assert_eq!(
        manifest.current.as_ref().map(ToString::to_string).as_deref(),
        Some(last.as_str())
    );
    assert_eq!(manifest.nodes.len(), 6);
    assert!(manifest.operations.is_empty());
    for node in &manifest.nodes {
        assert!(
            node.disks
                .iter()
                .all(|d| d.table.is_some() && d.table_sha256.is_some()),
            "{node:?}"
        );
    }
    assert_no_leftovers(&vm, &expected_bitmaps(&manifest, last, &full_id)).await;
}

#[tokio::test]
async fn differential_after_three_incrementals_equals_its_instant() {
    let vm = two_disk_vm().await;
    let repo = TestRepo::init();
    let refs_dir = tempfile::tempdir().unwrap();
    vm.write_pattern("disk0", 0x01, 0, 2 * MIB).await;
    let full = repo.backup_report(&vm, VM, &["--level", "full"]);
    let full_id = full.node.clone();
    for round in 0..3u8 {
        vm.write_pattern("disk0", 0x10 + round, (u64::from(round) + 4) * MIB, MIB)
            .await;
        vm.write_pattern("disk1", 0x20 + round, u64::from(round) * MIB, 64 * 1024)
            .await;
        assert_eq!(
            repo.backup_report(&vm, VM, &["--level", "inc"]).level,
            "incremental"
        );
    }
    vm.write_pattern("disk0", 0x77, 10 * MIB, MIB).await;
    let refs = capture(&vm, refs_dir.path(), "diff").await;
    let diff = repo.backup_report(&vm, VM, &["--level", "diff"]);
    assert_eq!(diff.level, "differential", "{diff:?}");
    assert_eq!(diff.parent.as_deref(), Some(&*full_id));
    let id = diff.node.as_str();
    assert_node_equals(&repo, id, &refs);
    // The differential copied everything since the full: four writes of 1 MiB on disk0.
    assert_eq!(diff.disks[0].copied_bytes, 4 * MIB);

    // An incremental after it is relative to the differential.
    vm.write_pattern("disk1", 0x99, 0, 64 * 1024).await;
    let refs = capture(&vm, refs_dir.path(), "after-diff").await;
    let inc = repo.backup_report(&vm, VM, &[]);
    assert_eq!(inc.parent.as_deref(), Some(id));
    assert_node_equals(&repo, inc.node.as_str(), &refs);
}

#[tokio::test]
async fn a_grown_disk_gets_a_full_with_the_reason() {
    let vm = two_disk_vm().await;
    let repo = TestRepo::init();
    repo.backup_report(&vm, VM, &[]);
    vm.qmp()
        .execute_raw(
            "block_resize",
            Some(serde_json::json!({"node-name": "node-disk1", "size": 24 * MIB})),
        )
        .await
        .unwrap();
    let explicit = repo.try_backup(&vm, VM, &["--level", "inc"]);
    assert_eq!(explicit.code(), Some(2), "{explicit:?}");
    assert!(explicit.stderr.contains("disk disk1 grew"), "{}", explicit.stderr);
    let report = repo.backup_report(&vm, VM, &[]);
    assert_eq!(report.level, "full", "{report:?}");
    assert!(
        report
            .reason
            .as_str()
            .contains("disk disk1 grew from 16777216 to 25165824 bytes")
    );
}

/// The checksum-diff copy merges neighbouring changed blocks into one write and keeps several writes in
/// flight: changed runs that cross the workers' run boundaries, zeroed blocks beside data blocks, isolated
/// blocks, blocks that were holes in the full, the disk's last block, a block rewritten with its old bytes, and
/// a disk changed end to end. Each node must read exactly as the disk did, and of the changed blocks only the
/// 64 KiB clusters that differ from the full be copied.
#[tokio::test]
async fn a_checksum_diff_with_many_neighbouring_and_scattered_changes_is_exact() {
    let vm = two_disk_vm().await;
    let repo = TestRepo::init();
    let refs_dir = tempfile::tempdir().unwrap();
    vm.write_pattern("disk0", 0x11, 0, 24 * MIB).await;
    vm.write_pattern("disk1", 0x22, 0, 4 * MIB).await;
    repo.backup_report(&vm, VM, &[]);

    vm.qmp().execute_raw("stop", None).await.unwrap();
    vm.qmp().execute_raw("cont", None).await.unwrap();
    let vm = vm.restart().await;
    // Blocks 3..=8: across the boundaries of 4 MiB runs.
    vm.write_pattern("disk0", 0x33, 3 * MIB + MIB / 2, 5 * MIB).await;
    // Blocks 10 and 11 zeroed, block 12 data beside them.
    vm.write_zeroes("disk0", 10 * MIB, 2 * MIB).await;
    vm.write_pattern("disk0", 0x44, 12 * MIB, 4096).await;
    // Isolated blocks 15, 17 and 19.
    vm.write_pattern("disk0", 0x55, 15 * MIB + 64 * 1024, 64 * 1024)
        .await;
    vm.write_pattern("disk0", 0x56, 17 * MIB, 4096).await;
    vm.write_pattern("disk0", 0x57, 20 * MIB - 4096, 4096).await;
    // Block 20 rewritten with the bytes it had: not a change.
    vm.write_pattern("disk0", 0x11, 20 * MIB, MIB).await;
    // Blocks 26 and 27 were never written before; block 31 is the last.
    vm.write_pattern("disk0", 0x66, 26 * MIB, 2 * MIB).await;
    vm.write_pattern("disk0", 0x77, 31 * MIB + MIB / 2, MIB / 2).await;
    // All 16 blocks of disk1.
    vm.write_pattern("disk1", 0x88, 0, 16 * MIB).await;
    let refs = capture(&vm, refs_dir.path(), "after-crash").await;

    repo.cache_images(VM);
    let inc = repo.backup_report(&vm, VM, &[]);
    assert_eq!(inc.method, "checksum-diff", "{inc:?}");
    let id = inc.node.clone();
    assert_node_equals(&repo, &id, &refs);
    // Of the 15 changed blocks of disk0, the clusters that differ from the full: 5 MiB over blocks 3..=8, the
    // two zeroed blocks, one 64 KiB cluster in each of blocks 12, 15, 17 and 19, blocks 26 and 27, and the
    // second half of block 31 (its first half was a hole and still is). Before the clusters were compared,
    // every changed block was written whole (15 MiB).
    assert_eq!(
        inc.disks[0].copied_bytes,
        9 * MIB + MIB / 2 + 4 * 64 * 1024,
        "{inc:?}"
    );
    assert_eq!(inc.disks[1].copied_bytes, 16 * MIB, "{inc:?}");
    // The zeroed blocks are stored as zeroes, not as data.
    assert_eq!(
        image::allocated_data_bytes(&repo.node_file(VM, &id, "disk0")),
        7 * MIB + MIB / 2 + 4 * 64 * 1024
    );

    // The restore of the node reads back the same disks.
    let out = tempfile::tempdir().unwrap();
    let restored = out.path().join("r");
    cli::run(&[
        "restore",
        &id,
        "--repo",
        repo.path().to_str().unwrap(),
        "--vm",
        VM,
        "--to",
        restored.to_str().unwrap(),
    ])
    .success();
    for (disk, reference) in DISKS.iter().zip(&refs) {
        image::assert_same(reference, &restored.join(format!("{disk}.qcow2")));
    }
}

#[tokio::test]
async fn qemu_restarted_after_a_crash_gives_an_exact_checksum_diff_incremental() {
    let vm = two_disk_vm().await;
    let repo = TestRepo::init();
    let refs_dir = tempfile::tempdir().unwrap();
    vm.write_pattern("disk0", 0x11, 0, 8 * MIB).await;
    vm.write_pattern("disk1", 0x22, 0, 4 * MIB).await;
    let full = repo.backup_report(&vm, VM, &[]);
    let full_id = full.node.clone();

    // The guest's data is on disk (stop flushes), then QEMU dies: its persistent bitmaps were never stored
    // cleanly, so it comes back with them inconsistent.
    vm.qmp().execute_raw("stop", None).await.unwrap();
    vm.qmp().execute_raw("cont", None).await.unwrap();
    let vm = vm.restart().await;
    vm.write_pattern("disk0", 0x33, 2 * MIB, MIB).await;
    vm.write_pattern("disk0", 0x44, 5 * MIB + 4096, 4096).await;
    vm.write_pattern("disk1", 0x55, 3 * MIB, MIB).await;
    let refs = capture(&vm, refs_dir.path(), "after-crash").await;

    repo.cache_images(VM);
    let inc = repo.backup_report(&vm, VM, &[]);
    assert_eq!(inc.level, "incremental", "{inc:?}");
    assert_eq!(inc.method, "checksum-diff", "{inc:?}");
    assert_eq!(inc.view.as_deref(), Some("copy-before-write"), "{inc:?}");
    let reason = inc.reason.as_str();
    assert!(reason.contains("disk0") && reason.contains(&full_id), "{reason}");
    let id = inc.node.clone();
    assert_node_equals(&repo, &id, &refs);
    // Only the blocks (1 MiB each) whose checksums changed were read again, and of them only the 64 KiB clusters
    // that differ from the full were stored: a whole block and one cluster on disk0, a whole block on disk1.
    assert_eq!(inc.disks[0].copied_bytes, MIB + 64 * 1024, "{inc:?}");
    assert_eq!(inc.disks[1].copied_bytes, MIB, "{inc:?}");
    assert_eq!(
        image::allocated_data_bytes(&repo.node_file(VM, &id, "disk0")),
        MIB + 64 * 1024
    );
    assert_eq!(
        image::allocated_data_bytes(&repo.node_file(VM, &id, "disk1")),
        MIB
    );

    // The bitmaps are healthy again: the next backup uses them.
    vm.write_pattern("disk1", 0x66, 0, 64 * 1024).await;
    let refs = capture(&vm, refs_dir.path(), "next").await;
    let next = repo.backup_report(&vm, VM, &[]);
    assert_eq!(next.method, "bitmap", "{next:?}");
    assert_node_equals(&repo, next.node.as_str(), &refs);
    let manifest = repo.manifest(VM);
    assert_no_leftovers(&vm, &expected_bitmaps(&manifest, next.node.as_str(), &full_id)).await;
}

/// A checksum-diff compares a changed block with the parent's chain only where that chain is in the page cache:
/// reading it from the disk would cost more than the writes it saves. With the repository's files dropped from
/// the cache, the changed blocks are stored whole, and the node is just as exact.
#[tokio::test]
async fn a_checksum_diff_whose_parent_is_not_in_the_page_cache_stores_whole_blocks() {
    use std::os::fd::AsRawFd as _;
    let vm = two_disk_vm().await;
    let repo = TestRepo::init();
    let refs_dir = tempfile::tempdir().unwrap();
    vm.write_pattern("disk0", 0x11, 0, 8 * MIB).await;
    let full = repo.backup_report(&vm, VM, &[]);
    vm.qmp().execute_raw("stop", None).await.unwrap();
    vm.qmp().execute_raw("cont", None).await.unwrap();
    let vm = vm.restart().await;
    vm.write_pattern("disk0", 0x33, 2 * MIB, 4096).await;
    vm.write_pattern("disk0", 0x44, 5 * MIB + 4096, 4096).await;
    let refs = capture(&vm, refs_dir.path(), "after-crash").await;
    for disk in DISKS {
        let file = std::fs::File::open(repo.node_file(VM, &full.node, disk)).unwrap();
        file.sync_all().unwrap();
        nix::fcntl::posix_fadvise(
            file.as_raw_fd(),
            0,
            0,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        )
        .unwrap();
    }

    let inc = repo.backup_report(&vm, VM, &[]);
    assert_eq!(inc.method, "checksum-diff", "{inc:?}");
    // Two changed blocks, written whole (in the cache, one 64 KiB cluster of each would have been).
    assert_eq!(inc.disks[0].copied_bytes, 2 * MIB, "{inc:?}");
    assert_eq!(inc.disks[1].copied_bytes, 0, "{inc:?}");
    assert_node_equals(&repo, inc.node.as_str(), &refs);
}

/// A checksum-diff takes the same copy-before-write view as a pull (or the fleece when forced): killed with
/// the VM paused for the instant or with its devices on the filters, the next run resumes the VM and puts the
/// devices back; guest writes reach the images, and checksum-diffs with either view are exact.
#[tokio::test]
async fn a_checksum_diff_killed_in_its_view_is_undone_and_both_views_are_exact() {
    let vm = two_disk_vm().await;
    let repo = TestRepo::init();
    let refs_dir = tempfile::tempdir().unwrap();
    vm.write_pattern("disk0", 0x11, 0, 4 * MIB).await;
    repo.backup_report(&vm, VM, &[]);
    vm.qmp().execute_raw("stop", None).await.unwrap();
    vm.qmp().execute_raw("cont", None).await.unwrap();
    let mut vm = vm.restart().await;
    let before = vm.attached().await;
    for (round, point) in ["view-vm-paused", "view-drives-switched"].into_iter().enumerate() {
        let round = u8::try_from(round).unwrap();
        vm.write_pattern("disk1", 0x40 + round, u64::from(round) * MIB, MIB)
            .await;
        let crashed = cli::run_crashing_at(
            &repo.backup_args(&vm, VM, &[]),
            point,
            integration_tests::timeouts::PROCESS_EXIT_TIMEOUT,
        );
        crashed.assert_crashed_at(point);
        assert!(!vm.running().await, "{point}: the VM runs");
        let refs = capture(&vm, refs_dir.path(), point).await;
        let next = repo.backup_report(&vm, VM, &[]);
        assert_eq!(next.method, "checksum-diff", "{next:?}");
        assert_eq!(next.view.as_deref(), Some("copy-before-write"), "{next:?}");
        assert!(next.cleaned.resumed_vm, "{next:?}");
        assert_node_equals(&repo, next.node.as_str(), &refs);
        assert!(vm.running().await, "{point}");
        assert_eq!(vm.attached().await, before, "{point}");
        // Bitmaps inconsistent again: the next backup is a checksum-diff.
        vm.qmp().execute_raw("stop", None).await.unwrap();
        vm.qmp().execute_raw("cont", None).await.unwrap();
        vm = vm.restart().await;
    }
    // The fleece, forced, on the same QEMU.
    vm.write_pattern("disk0", 0x66, 2 * MIB, MIB).await;
    let refs = capture(&vm, refs_dir.path(), "fleece").await;
    let mut cmd = cli::command_owned(&repo.backup_args(&vm, VM, &[]));
    cmd.env("QMPBAK_VIEW", "fleece");
    let inc: BackupReport = cli::wait(cmd.spawn().unwrap(), integration_tests::timeouts::CLI_TIMEOUT)
        .success()
        .report();
    assert_eq!(
        (inc.method.as_ref(), inc.view.as_deref()),
        ("checksum-diff", Some("fleece")),
        "{inc:?}"
    );
    assert_node_equals(&repo, inc.node.as_str(), &refs);
    assert_eq!(vm.attached().await, before);
    let manifest = repo.manifest(VM);
    assert!(manifest.operations.is_empty());
    repo.run(VM, &["verify"]).success();
}

/// A checksum-diff creates its node files and scratch images while QEMU builds the schema its view is chosen
/// by. When the view is then refused (a copy-before-write filter that an earlier run left without a record),
/// the run fails clearly and leaves none of its images in the repository, and stacks nothing on the filter.
#[tokio::test]
async fn a_checksum_diff_refused_at_its_view_leaves_none_of_its_images() {
    let vm = two_disk_vm().await;
    let repo = TestRepo::init();
    vm.write_pattern("disk0", 0x11, 0, 2 * MIB).await;
    repo.backup_report(&vm, VM, &[]);
    vm.qmp().execute_raw("stop", None).await.unwrap();
    vm.qmp().execute_raw("cont", None).await.unwrap();
    let vm = vm.restart().await;
    let crashed = cli::run_crashing_at(
        &repo.backup_args(&vm, VM, &[]),
        "view-drives-switched",
        integration_tests::timeouts::PROCESS_EXIT_TIMEOUT,
    );
    crashed.assert_crashed_at("view-drives-switched");
    vm.qmp().execute_raw("cont", None).await.unwrap();
    repo.lose_records(VM);
    let filters = vm.attached().await;
    let before = repo.images(VM);

    repo.try_backup(&vm, VM, &[])
        .assert_failed_saying("a copy-before-write filter an earlier qmpbak run left");
    assert_eq!(repo.images(VM), before, "the refused run left images");
    assert_eq!(vm.attached().await, filters);
    assert!(repo.manifest(VM).operations.is_empty());
}

/// A checksum-diff reads the disks through an NBD server in the VM's QEMU. When another tool already runs one
/// there, the backup fails clearly and that server keeps running (teardown once stopped it unconditionally);
/// the next backup, once it is gone, is exact.
#[tokio::test]
async fn a_checksum_diff_into_a_qemu_whose_nbd_server_runs_leaves_that_server_running() {
    let vm = two_disk_vm().await;
    let repo = TestRepo::init();
    let refs_dir = tempfile::tempdir().unwrap();
    vm.write_pattern("disk0", 0x11, 0, 2 * MIB).await;
    repo.backup_report(&vm, VM, &[]);
    vm.qmp().execute_raw("stop", None).await.unwrap();
    vm.qmp().execute_raw("cont", None).await.unwrap();
    let vm = vm.restart().await;
    vm.write_pattern("disk0", 0x33, MIB, MIB).await;
    let socket = vm.dir().join("someone-elses-nbd.sock");
    let theirs =
        serde_json::json!({"addr": {"type": "unix", "data": {"path": socket.display().to_string()}}});
    vm.qmp()
        .execute_raw("nbd-server-start", Some(theirs.clone()))
        .await
        .unwrap();

    let out = repo.try_backup(&vm, VM, &[]);
    assert_ne!(out.code(), Some(0), "{out:?}");
    assert!(out.stderr.contains("another NBD server"), "{}", out.stderr);
    let again = vm.qmp().execute_raw("nbd-server-start", Some(theirs)).await;
    assert!(again.is_err(), "the other NBD server was stopped");
    assert!(repo.manifest(VM).operations.is_empty());

    vm.qmp().execute_raw("nbd-server-stop", None).await.unwrap();
    let refs = capture(&vm, refs_dir.path(), "after").await;
    let inc = repo.backup_report(&vm, VM, &[]);
    assert_eq!(inc.method, "checksum-diff", "{inc:?}");
    assert_node_equals(&repo, inc.node.as_str(), &refs);
}

#[tokio::test]
async fn a_backup_of_one_disk_holds_that_disk_and_the_next_of_all_disks_is_a_full() {
    let vm = two_disk_vm().await;
    let repo = TestRepo::init();
    let refs_dir = tempfile::tempdir().unwrap();
    vm.write_pattern("disk0", 0x11, 0, 2 * MIB).await;
    vm.write_pattern("disk1", 0x22, 0, 2 * MIB).await;
    repo.backup_report(&vm, VM, &[]);

    vm.write_pattern("disk0", 0x33, 4 * MIB, MIB).await;
    vm.write_pattern("disk1", 0x44, 4 * MIB, MIB).await;
    let refs = capture(&vm, refs_dir.path(), "subset").await;
    let subset = repo.backup_report(&vm, VM, &["--disk", "disk0"]);
    assert_eq!(subset.level, "incremental", "{subset:?}");
    assert_eq!(subset.method, "bitmap", "{subset:?}");
    let subset_id = subset.node.clone();
    let node = repo.manifest(VM).find(&subset_id).unwrap().clone();
    assert_eq!(
        node.disks.iter().map(|d| d.disk.as_str()).collect::<Vec<_>>(),
        ["disk0"]
    );
    image::assert_same(&refs[0], &repo.node_file(VM, &subset_id, "disk0"));

    // An incremental of every disk has nothing to build on for disk1: refused, and nothing changes.
    let before = repo.manifest(VM);
    let refused = repo.try_backup(&vm, VM, &["--level", "inc"]);
    assert_eq!(refused.code(), Some(2), "{refused:?}");
    assert!(
        refused
            .stderr
            .contains("disk disk1 is not in the previous backup"),
        "{refused:?}"
    );
    let after = repo.manifest(VM);
    assert_eq!(after.nodes.len(), before.nodes.len());
    assert_eq!(after.current, before.current);

    // auto takes a full of every disk, and says why.
    let full_refs = capture(&vm, refs_dir.path(), "full-again").await;
    let full = repo.backup_report(&vm, VM, &[]);
    assert_eq!(full.level, "full", "{full:?}");
    assert!(
        full.reason
            .as_str()
            .contains("disk disk1 is not in the previous backup"),
        "{full:?}"
    );
    let full_id = full.node.clone();
    assert_node_equals(&repo, &full_id, &full_refs);
    let manifest = repo.manifest(VM);
    assert_no_leftovers(&vm, &expected_bitmaps(&manifest, &full_id, &full_id)).await;
}

#[tokio::test]
async fn after_a_snapshot_the_next_backup_is_still_a_bitmap_incremental() {
    let vm = two_disk_vm().await;
    let repo = TestRepo::init();
    let refs_dir = tempfile::tempdir().unwrap();
    vm.write_pattern("disk0", 0x11, 0, 2 * MIB).await;
    repo.backup_report(&vm, VM, &[]);
    // Written before the time point (in its frozen file) and after it (in the new overlay).
    vm.write_pattern("disk0", 0x22, 4 * MIB, MIB).await;
    cli::run_owned(&repo.socket_args(&vm.socket(), VM, &["snapshot", "--tag", "tp"])).success();
    vm.write_pattern("disk1", 0x33, 8 * MIB, MIB).await;

    let refs = capture(&vm, refs_dir.path(), "after").await;
    let inc = repo.backup_report(&vm, VM, &[]);
    assert_eq!(inc.level, "incremental", "{inc:?}");
    assert_eq!(inc.method, "bitmap", "{inc:?}");
    let copied = copied_bytes(&inc);
    assert_eq!(copied, [MIB, MIB], "both writes and nothing else: {inc:?}");
    assert_node_equals(&repo, inc.node.as_str(), &refs);
    // And the chain of bitmaps goes on from there.
    let next = repo.backup_report(&vm, VM, &[]);
    assert_eq!(next.method, "bitmap", "{next:?}");
    assert!(next.disks.iter().all(|d| d.copied_bytes == 0), "{next:?}");
}

/// The checking table of `node`'s disk `disk` equals one built from `reference` (a qcow2 captured at the
/// node's instant), block for block, in the repository's block size.
fn assert_table_of(repo: &TestRepo, node: &str, disk: &str, reference: &Path) {
    let block_size = chain::Repository::open(repo.path())
        .unwrap()
        .settings()
        .block_size;
    assert_table_in(repo, node, disk, reference, block_size);
}

/// [`assert_table_of`] in `block_size` blocks.
fn assert_table_in(repo: &TestRepo, node: &str, disk: &str, reference: &Path, block_size: u64) {
    let raw = reference.with_extension("raw");
    image::qemu_img(&[
        "convert",
        "-O",
        "raw",
        reference.to_str().unwrap(),
        raw.to_str().unwrap(),
    ]);
    let expected = chain::Table::build(
        &chain::FileSource::open(&raw).unwrap(),
        chain::Scheme::default(),
        block_size,
        0,
    )
    .unwrap();
    let stored = repo.derived_table(VM, node, disk);
    assert_eq!(stored.block_size(), block_size, "{disk}");
    assert_eq!(stored.virtual_size(), expected.virtual_size(), "{disk}");
    let differ: Vec<usize> = stored
        .digests()
        .zip(expected.digests())
        .enumerate()
        .filter(|(_, (a, b))| a != b)
        .map(|(i, _)| i)
        .collect();
    assert!(
        differ.is_empty(),
        "{disk}: table blocks {differ:?} are not the instant's"
    );
    std::fs::remove_file(raw).unwrap();
}

/// The guest's writes after a full's instant, made while its jobs copy, reach neither its node nor its checking
/// table: the table is the instant's, block for block (issue 20: the property any table built during the copy
/// must keep).
#[tokio::test]
async fn guest_writes_during_a_full_leave_its_table_at_the_instant() {
    let vm = two_disk_vm().await;
    let repo = TestRepo::init();
    let refs_dir = tempfile::tempdir().unwrap();
    vm.write_pattern("disk0", 0x11, 0, 12 * MIB).await;
    vm.write_pattern("disk1", 0x22, MIB, 3 * MIB).await;
    let refs = capture(&vm, refs_dir.path(), "instant").await;

    let args = repo.backup_args(&vm, VM, &[]);
    let paused = cli::run_paused_at(&args, "backup-copying", &[], None);
    // After the instant: new data over old (whole and partial blocks), zeroes over data, data into a hole, on
    // both disks.
    vm.write_pattern("disk0", 0x33, 2 * MIB, 3 * MIB + 4096).await;
    vm.write_zeroes("disk0", 8 * MIB, MIB).await;
    vm.write_pattern("disk0", 0x44, 20 * MIB + 512, 64 * 1024).await;
    vm.write_pattern("disk1", 0x55, 0, 512).await;
    vm.write_pattern("disk1", 0x66, 10 * MIB, 2 * MIB).await;
    paused.signal(nix::sys::signal::Signal::SIGUSR1);
    let out = paused.finish().success();
    // The printed shape: the report's documented keys (and each disk's), so a renamed field is caught.
    let raw = out.json();
    cli::assert_keys(
        &raw,
        &[
            "vm",
            "node",
            "parent",
            "level",
            "method",
            "reason",
            "disks",
            "duration_secs",
            "tables_secs",
            "quiesced",
            "cleaned",
            "skipped",
            "plaintext_of_encrypted",
        ],
    );
    cli::assert_keys(
        &raw["disks"][0],
        &[
            "disk",
            "virtual_size",
            "copied_bytes",
            "stored_bytes",
            "bitmaps_persist",
        ],
    );
    let report: BackupReport = out.report();
    assert_eq!(report.level, "full", "{report:?}");
    let node = report.node.as_str();
    assert_node_equals(&repo, node, &refs);
    for (disk, reference) in DISKS.iter().zip(&refs) {
        assert_table_of(&repo, node, disk, reference);
    }
    repo.run(VM, &["verify"]).success();
    let manifest = repo.manifest(VM);
    assert!(manifest.operations.is_empty());
    assert_no_leftovers(&vm, &expected_bitmaps(&manifest, node, node)).await;

    // The next incremental holds exactly the writes made during the full.
    let after = capture(&vm, refs_dir.path(), "after").await;
    let inc = repo.backup_report(&vm, VM, &[]);
    assert_eq!(inc.method, "bitmap", "{inc:?}");
    let inc = inc.node.as_str();
    assert_node_equals(&repo, inc, &after);
    for (disk, reference) in DISKS.iter().zip(&after) {
        assert_table_of(&repo, inc, disk, reference);
    }
}

/// The guest's writes while an incremental's or a differential's job copies, inside and outside the blocks it
/// copies, leave each node and table at its instant (issue 20).
#[tokio::test]
async fn guest_writes_during_an_incremental_and_a_differential_leave_their_tables_at_the_instant() {
    let vm = two_disk_vm().await;
    let repo = TestRepo::init();
    let refs_dir = tempfile::tempdir().unwrap();
    vm.write_pattern("disk0", 0x11, 0, 12 * MIB).await;
    vm.write_pattern("disk1", 0x22, MIB, 3 * MIB).await;
    repo.backup_report(&vm, VM, &[]);
    for (i, level) in ["inc", "diff"].into_iter().enumerate() {
        let p = 0x30 + 0x10 * i as u8;
        vm.write_pattern("disk0", p, 3 * MIB, 2 * MIB + 512).await;
        vm.write_zeroes("disk0", 10 * MIB, 64 * 1024).await;
        vm.write_pattern("disk1", p + 1, 7 * MIB, 4096).await;
        let refs = capture(&vm, refs_dir.path(), level).await;
        let args = repo.backup_args(&vm, VM, &["--level", level]);
        let paused = cli::run_paused_at(&args, "backup-copying", &[], None);
        // Inside the blocks the job copies, and outside them.
        vm.write_pattern("disk0", p + 2, 4 * MIB, 4096).await;
        vm.write_pattern("disk0", p + 3, 16 * MIB, MIB).await;
        vm.write_zeroes("disk1", 7 * MIB, 4096).await;
        vm.write_pattern("disk1", p + 4, 0, 512).await;
        paused.signal(nix::sys::signal::Signal::SIGUSR1);
        let report: BackupReport = paused.finish().success().report();
        assert_eq!(report.method, "bitmap", "{report:?}");
        let node = report.node.as_str();
        assert_node_equals(&repo, node, &refs);
        for (disk, reference) in DISKS.iter().zip(&refs) {
            assert_table_of(&repo, node, disk, reference);
        }
        assert!(repo.manifest(VM).operations.is_empty());
    }
    repo.run(VM, &["verify"]).success();
}

/// A chain keeps its full's table block size: after the repository's settings were edited by hand to another
/// size, an incremental still rehashes the blocks its layer touched in its parent's blocks (it rehashed the
/// blocks of the new size's numbering, leaving a written block's digest stale), and only a new full takes
/// the new size.
#[tokio::test]
async fn an_incremental_hashes_in_its_chains_block_size_after_the_settings_changed() {
    let vm = two_disk_vm().await;
    let repo = TestRepo::init();
    let refs_dir = tempfile::tempdir().unwrap();
    vm.write_pattern("disk0", 0x11, 0, 4 * MIB).await;
    repo.backup_report(&vm, VM, &[]);
    let settings = repo.path().join(chain::repo::SETTINGS_FILE);
    let mut edited: serde_json::Value = serde_json::from_slice(&std::fs::read(&settings).unwrap()).unwrap();
    edited["block_size"] = serde_json::json!(64 * 1024);
    std::fs::write(&settings, serde_json::to_vec(&edited).unwrap()).unwrap();

    // In 64 KiB blocks these writes are blocks 5 and 8; in the chain's 1 MiB blocks both are block 0.
    vm.write_pattern("disk0", 0x22, 320 * 1024, 64 * 1024).await;
    vm.write_pattern("disk1", 0x33, 512 * 1024 + 4096, 4096).await;
    let refs = capture(&vm, refs_dir.path(), "inc").await;
    let inc = repo.backup_report(&vm, VM, &["--level", "inc"]);
    assert_eq!(inc.method, "bitmap", "{inc:?}");
    assert_node_equals(&repo, inc.node.as_str(), &refs);
    for (disk, reference) in DISKS.iter().zip(&refs) {
        assert_table_in(&repo, inc.node.as_str(), disk, reference, MIB);
    }
    repo.run(VM, &["verify"]).success();

    let full = repo.backup_report(&vm, VM, &["--level", "full"]);
    for disk in DISKS {
        assert_eq!(
            repo.derived_table(VM, full.node.as_str(), disk).block_size(),
            64 * 1024
        );
    }
}

/// `--speed-limit` and `--compress` set QEMU's backup job. A pull runs none, so it refuses them (exit 2, before
/// anything is reached); a checksum-diff incremental runs none either, and says that it runs without them.
/// Both used to be ignored without a word.
#[tokio::test]
async fn options_of_qemus_backup_job_are_refused_or_named_where_no_job_runs() {
    let vm = two_disk_vm().await;
    let repo = TestRepo::init();
    for flag in [&["--speed-limit", "65536"][..], &["--compress"][..]] {
        let out = repo.try_backup(&vm, VM, &[&["--pull", "--insecure-plaintext"][..], flag].concat());
        out.assert_failed_saying("which a pull backup does not run");
        assert_eq!(out.code(), Some(2), "{out:?}");
    }
    assert!(!repo.vm_dir(VM).exists(), "a refused pull made a VM");
    vm.write_pattern("disk0", 0x11, 0, MIB).await;
    repo.backup_report(&vm, VM, &[]);
    // The bitmaps gone, the next backup is a checksum-diff.
    for (node, name) in vm.bitmaps().await {
        vm.qmp()
            .execute_raw(
                "block-dirty-bitmap-remove",
                Some(serde_json::json!({ "node": node, "name": name })),
            )
            .await
            .unwrap();
    }
    let out = repo
        .try_backup(&vm, VM, &["--compress", "--speed-limit", "65536"])
        .success();
    let report: BackupReport = out.report();
    assert_eq!(report.method, "checksum-diff", "{report:?}");
    for flag in ["--speed-limit", "--compress"] {
        assert!(
            out.stderr
                .contains(&format!("{flag} does not apply to this checksum-diff")),
            "{flag}: {out:?}"
        );
    }
}
