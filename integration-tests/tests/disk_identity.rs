//! Disks that move: a VM restarted with its disks in another order, one removed, one replaced by a copy of
//! another, or renamed. A backup builds on a disk's bitmap or table only when it is provably that disk's;
//! otherwise it reads the disk whole and says why. Every case is checked by restoring and comparing with the
//! disk as the guest saw it at the backup instant. And disk names: one rule for every device type, stable
//! across QEMU restarts, snapshot and revert.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use integration_tests::repo::{BackupReport, TestRepo, assert_no_leftovers, expected_bitmaps};
use integration_tests::{Device, MIB, TestVm, cli, image};
use qmpbak_engine::inspect::{NameSource, VmInfo};

const VM: &str = "moved";
const SIZE: u64 = 32 * MIB;

/// Two disks of the same size on `-drive if=virtio` (QEMU names them `virtio0`, `virtio1` by position), on
/// images `a.qcow2` and `b.qcow2`.
async fn positional_vm() -> TestVm {
    TestVm::builder()
        .disk("virtio0", SIZE)
        .disk("virtio1", SIZE)
        .device("virtio0", Device::DriveIfVirtio)
        .device("virtio1", Device::DriveIfVirtio)
        .image("virtio0", "a.qcow2")
        .image("virtio1", "b.qcow2")
        .start()
        .await
}

/// Two virtio-blk disks with ids `disk0` (image `a.qcow2`) and `disk1` (image `b.qcow2`).
async fn named_vm() -> TestVm {
    TestVm::builder()
        .disk("disk0", SIZE)
        .disk("disk1", SIZE)
        .image("disk0", "a.qcow2")
        .image("disk1", "b.qcow2")
        .start()
        .await
}

/// Distinct data on both disks, then a full backup.
async fn full_of_distinct_disks(repo: &TestRepo, vm: &TestVm, ids: [&str; 2]) -> String {
    vm.write_pattern(ids[0], 0xaa, 0, MIB).await;
    vm.write_pattern(ids[1], 0xbb, 8 * MIB, MIB).await;
    let full = repo.backup_report(vm, VM, &[]);
    assert_eq!(full.level, "full", "{full:?}");
    full.node.clone()
}

/// Restores `node` offline and asserts each of `disks` equals its reference.
fn assert_restores_as(repo: &TestRepo, node: &str, disks: &[&str], refs: &[PathBuf], out: &Path) {
    let dir = out.join(format!("restored-{node}"));
    // A trailing slash: a directory even for one disk.
    let to = format!("{}/", dir.display());
    repo.run(VM, &["restore", node, "--to", &to, "--json"]).success();
    for (disk, reference) in disks.iter().zip(refs) {
        image::assert_same(reference, &dir.join(format!("{disk}.qcow2")));
    }
}

/// Backs the VM up and checks that the new node restores as `disks` were just before it (references labelled
/// `label` in `refs`); returns the backup's report and node id.
async fn backup_checked(
    repo: &TestRepo,
    vm: &TestVm,
    disks: &[&str],
    refs: &Path,
    label: &str,
) -> (BackupReport, String) {
    let references = vm.capture_references(disks, refs, label).await;
    let report = repo.backup_report(vm, VM, &[]);
    let node = report.node.clone();
    assert_restores_as(repo, &node, disks, &references, refs);
    (report, node)
}

/// Asserts a backup was a full and its reason names `disk` and contains `why`.
#[track_caller]
fn assert_full_because(report: &BackupReport, disk: &str, why: &str) {
    assert_eq!(report.level, "full", "{report:?}");
    let reason = report.reason.as_str();
    assert!(
        reason.contains(&format!("disk {disk} ")) && reason.contains(why),
        "the reason should name disk {disk} and say {why:?}: {reason}"
    );
}

#[tokio::test]
async fn disks_in_another_order_are_read_whole_not_stacked_on_each_others_chains() {
    let vm = positional_vm().await;
    let repo = TestRepo::init();
    let refs = tempfile::tempdir().unwrap();
    full_of_distinct_disks(&repo, &vm, ["virtio0", "virtio1"]).await;

    // Restarted with the drives the other way round: virtio0 is b now, virtio1 is a.
    let vm = vm
        .quit_and_restart_with(|b| b.image("virtio0", "b.qcow2").image("virtio1", "a.qcow2"))
        .await;
    vm.write_pattern("virtio0", 0xcc, 20 * MIB, MIB).await;
    let disks = ["virtio0", "virtio1"];
    let (report, node) = backup_checked(&repo, &vm, &disks, refs.path(), "moved").await;
    let b = vm.disk_path("virtio0").display().to_string();
    assert_full_because(&report, "virtio0", &format!("is image {b}"));
    assert_full_because(&report, "virtio1", "a.qcow2");

    // From here the disks build on their own bitmaps again.
    vm.write_pattern("virtio1", 0xdd, 4 * MIB, MIB).await;
    let next_refs = vm.capture_references(&disks, refs.path(), "next").await;
    let inc = repo.backup_report(&vm, VM, &[]);
    assert_eq!(
        (inc.level.as_ref(), inc.method.as_ref()),
        ("incremental", "bitmap"),
        "{inc:?}"
    );
    let inc_node = inc.node.clone();
    assert_restores_as(&repo, &inc_node, &disks, &next_refs, refs.path());
    // The bitmaps that came along on the moved images are gone; each disk has its own.
    assert_no_leftovers(&vm, &expected_bitmaps(&repo.manifest(VM), &inc_node, &node)).await;
}

#[tokio::test]
async fn a_removed_disk_does_not_lend_its_chain_to_the_disk_that_takes_its_name() {
    let vm = positional_vm().await;
    let repo = TestRepo::init();
    let refs = tempfile::tempdir().unwrap();
    full_of_distinct_disks(&repo, &vm, ["virtio0", "virtio1"]).await;

    // Restarted with only b, which QEMU now calls virtio0.
    let vm = vm
        .quit_and_restart_with(|b| b.without_disk("virtio1").image("virtio0", "b.qcow2"))
        .await;
    vm.write_pattern("virtio0", 0xcc, 20 * MIB, MIB).await;
    let moved_refs = vm.capture_references(&["virtio0"], refs.path(), "moved").await;
    let report = repo.backup_report(&vm, VM, &[]);
    let node = report.node.clone();
    assert_restores_as(&repo, &node, &["virtio0"], &moved_refs, refs.path());
    assert_full_because(&report, "virtio0", "b.qcow2");
    assert_eq!(
        repo.run(VM, &["verify", "--json"]).code(),
        Some(0),
        "verify after the move"
    );
}

#[tokio::test]
async fn a_disk_replaced_by_a_copy_of_another_is_read_whole() {
    let vm = named_vm().await;
    let repo = TestRepo::init();
    let refs = tempfile::tempdir().unwrap();
    full_of_distinct_disks(&repo, &vm, ["disk0", "disk1"]).await;

    // disk1 comes back as a copy of a (its bitmaps copied with it); disk0 is still a.
    let mut vm = vm;
    vm.quit().await;
    std::fs::copy(vm.dir().join("a.qcow2"), vm.dir().join("copy.qcow2")).unwrap();
    let vm = vm.restart_with(|b| b.image("disk1", "copy.qcow2")).await;
    vm.write_pattern("disk1", 0xcc, 20 * MIB, MIB).await;
    let disks = ["disk0", "disk1"];
    let (report, _) = backup_checked(&repo, &vm, &disks, refs.path(), "copied").await;
    assert_full_because(&report, "disk1", "copy.qcow2");
}

#[tokio::test]
async fn a_copy_over_the_same_file_is_compared_with_that_disks_table_not_built_on_its_bitmap() {
    let vm = named_vm().await;
    let repo = TestRepo::init();
    let refs = tempfile::tempdir().unwrap();
    full_of_distinct_disks(&repo, &vm, ["disk0", "disk1"]).await;

    // b's file now holds a copy of a, bitmaps and all: the same file, another disk's bitmaps.
    let mut vm = vm;
    vm.quit().await;
    std::fs::copy(vm.dir().join("a.qcow2"), vm.dir().join("b.qcow2")).unwrap();
    let vm = vm.restart_with(|b| b).await;
    vm.write_pattern("disk1", 0xcc, 20 * MIB, MIB).await;
    let disks = ["disk0", "disk1"];
    let (report, _) = backup_checked(&repo, &vm, &disks, refs.path(), "copied").await;
    assert_eq!(
        (report.level.as_ref(), report.method.as_ref()),
        ("incremental", "checksum-diff"),
        "{report:?}"
    );
    let reason = report.reason.as_str();
    assert!(
        reason.contains("disk disk1") && reason.contains("cannot prove"),
        "{reason}"
    );
}

#[tokio::test]
async fn renamed_disks_are_read_whole_under_their_new_names() {
    let vm = named_vm().await;
    let repo = TestRepo::init();
    let refs = tempfile::tempdir().unwrap();
    full_of_distinct_disks(&repo, &vm, ["disk0", "disk1"]).await;

    // disk1 (b) is now called data, and disk0 (a) takes the name disk1.
    let vm = vm
        .quit_and_restart_with(|b| b.rename_disk("disk1", "data").rename_disk("disk0", "disk1"))
        .await;
    vm.write_pattern("disk1", 0xcc, 20 * MIB, MIB).await;
    let disks = ["disk1", "data"];
    let (report, _) = backup_checked(&repo, &vm, &disks, refs.path(), "renamed").await;
    assert_full_because(&report, "disk1", "a.qcow2");
    assert_full_because(&report, "data", "is not in the previous backup");
}

/// One disk of each kind, with the name qmpbak must give it and where the name comes from.
const KINDS: [(&str, Device, NameSource); 7] = [
    ("sd0", Device::ScsiHd, NameSource::DeviceId),
    ("nv0", Device::Nvme, NameSource::DeviceId),
    ("hd0", Device::IdeHd, NameSource::DeviceId),
    (
        "peripheral-anon-device0",
        Device::VirtioBlkNoId,
        NameSource::DevicePath,
    ),
    ("virtio0", Device::DriveIfVirtio, NameSource::Drive),
    ("vd0", Device::DriveVirtioBlk, NameSource::DeviceId),
    ("drv0", Device::DriveVirtioBlkNoId, NameSource::Drive),
];

fn node_disks(repo: &TestRepo, node: &str) -> Vec<String> {
    let manifest = repo.manifest(VM);
    let id: chain::NodeId = node.parse().unwrap();
    let mut disks: Vec<String> = manifest
        .node(&id)
        .unwrap()
        .disks
        .iter()
        .map(|d| d.disk.clone())
        .collect();
    disks.sort();
    disks
}

#[tokio::test]
async fn every_device_type_keeps_its_name_across_restart_snapshot_revert_commit_and_live_restore() {
    let mut builder = TestVm::builder();
    for (id, device, _) in KINDS {
        builder = builder.disk(id, 16 * MIB).device(id, device);
    }
    let vm = builder.start().await;
    let repo = TestRepo::init();
    let refs = tempfile::tempdir().unwrap();
    let ids: Vec<&str> = KINDS.iter().map(|k| k.0).collect();
    let mut sorted: Vec<String> = ids.iter().map(|s| (*s).to_owned()).collect();
    sorted.sort();

    // `info` shows each name and where it comes from.
    let info = cli::run(&["info", "--socket", vm.socket().to_str().unwrap(), "--json"])
        .success()
        .report::<VmInfo>();
    for (id, _, source) in KINDS {
        let disk = info
            .disks
            .iter()
            .find(|d| d.id == id)
            .unwrap_or_else(|| panic!("info has no disk {id}: {info:?}"));
        assert_eq!(disk.id_source, source, "{disk:?}");
    }

    for (i, id) in ids.iter().enumerate() {
        vm.write_pattern(id, 0x10 + i as u8, 0, MIB).await;
    }
    let full = repo.backup_report(&vm, VM, &[]);
    assert_eq!(full.level, "full", "{full:?}");
    assert_eq!(node_disks(&repo, full.node.as_str()), sorted);

    // A QEMU restart: same names, the bitmaps still theirs.
    let vm = vm.quit_and_restart_with(|b| b).await;
    for (i, id) in ids.iter().enumerate() {
        vm.write_pattern(id, 0x20 + i as u8, MIB, MIB).await;
    }
    let inc = repo.backup_report(&vm, VM, &[]);
    assert_eq!(
        (inc.level.as_ref(), inc.method.as_ref()),
        ("incremental", "bitmap"),
        "{inc:?}"
    );
    assert_eq!(node_disks(&repo, inc.node.as_str()), sorted);

    // A snapshot puts new block nodes on top of every disk: same names, still bitmap incrementals.
    let socket_run = |cmd: &[&str]| {
        cli::run_owned(&repo.socket_args(&vm.socket(), VM, cmd))
            .success()
            .json()
    };
    socket_run(&["snapshot", "--tag", "tp"]);
    for (i, id) in ids.iter().enumerate() {
        vm.write_pattern(id, 0x30 + i as u8, 2 * MIB, MIB).await;
    }
    let after = repo.backup_report(&vm, VM, &[]);
    assert_eq!(
        (after.level.as_ref(), after.method.as_ref()),
        ("incremental", "bitmap"),
        "{after:?}"
    );
    assert_eq!(node_disks(&repo, after.node.as_str()), sorted);

    // Revert finds every disk of the time point by name; the next backup is exact.
    socket_run(&["revert", "tp"]);
    for (i, id) in ids.iter().enumerate() {
        vm.write_pattern(id, 0x40 + i as u8, 3 * MIB, MIB).await;
    }
    let refs_now = vm.capture_references(&ids, refs.path(), "reverted").await;
    let last = repo.backup_report(&vm, VM, &[]);
    let node = last.node.clone();
    assert_eq!(node_disks(&repo, &node), sorted);
    assert_restores_as(&repo, &node, &ids, &refs_now, refs.path());

    // A second time point on top of the first, committed into it: the names stay, and so do the bitmaps.
    socket_run(&["snapshot", "--tag", "tp2"]);
    socket_run(&["commit", "tp2"]);
    for (i, id) in ids.iter().enumerate() {
        vm.write_pattern(id, 0x50 + i as u8, 4 * MIB, MIB).await;
    }
    let committed = repo.backup_report(&vm, VM, &[]);
    assert_eq!(
        (committed.level.as_ref(), committed.method.as_ref()),
        ("incremental", "bitmap"),
        "{committed:?}"
    );
    assert_eq!(node_disks(&repo, committed.node.as_str()), sorted);

    // A live restore into a new VM with the same devices finds every disk by the same names. (Not the -drive
    // disks: QEMU refuses `blockdev-reopen` of a node whose name it generated, so a live restore cannot put a
    // chain under them.)
    let live: Vec<(&str, Device, NameSource)> = KINDS.into_iter().filter(|k| !k.1.is_drive()).collect();
    let mut blank = TestVm::builder().paused();
    for (id, device, _) in &live {
        blank = blank.disk(id, 16 * MIB).device(id, *device);
    }
    let vm2 = blank.start().await;
    let mut args = vec![];
    for (id, ..) in &live {
        args.extend(["--disk", id]);
    }
    cli::run_owned(&repo.live_restore_args(&vm2.socket(), VM, &node, &args)).success();
    let live_ids: Vec<&str> = live.iter().map(|k| k.0).collect();
    let restored_refs = vm2.capture_references(&live_ids, refs.path(), "live").await;
    for (id, restored) in live_ids.iter().zip(&restored_refs) {
        let i = ids.iter().position(|x| x == id).unwrap();
        image::assert_same(&refs_now[i], restored);
    }
    let branch = repo.backup_report(&vm2, VM, &[]);
    assert_eq!(
        (
            branch.level.as_ref(),
            branch.method.as_ref(),
            branch.parent.as_deref()
        ),
        ("incremental", "bitmap", Some(node.as_str())),
        "{branch:?}"
    );
    let mut live_sorted: Vec<String> = live_ids.iter().map(|s| (*s).to_owned()).collect();
    live_sorted.sort();
    assert_eq!(node_disks(&repo, branch.node.as_str()), live_sorted);
}

#[tokio::test]
async fn bitmaps_named_by_an_older_qmpbak_are_not_trusted_but_the_same_images_are_compared_with_their_tables()
{
    let vm = named_vm().await;
    let repo = TestRepo::init();
    let refs = tempfile::tempdir().unwrap();
    let full = full_of_distinct_disks(&repo, &vm, ["disk0", "disk1"]).await;

    // What an older qmpbak left: a manifest without disk keys, bitmaps named without them.
    let manifest = repo.manifest(VM);
    for disk in ["disk0", "disk1"] {
        let node = format!("node-{disk}");
        for role in ["inc", "diff"] {
            let keyed = integration_tests::repo::bitmap_name(&manifest, disk, role, &full);
            let args = serde_json::json!({"node": node, "name": keyed});
            vm.qmp()
                .execute_raw("block-dirty-bitmap-remove", Some(args))
                .await
                .unwrap();
            let old = format!("qmpbak-{}-{role}-{full}", manifest.chain_id);
            let args = serde_json::json!({"node": node, "name": old, "persistent": true});
            vm.qmp()
                .execute_raw("block-dirty-bitmap-add", Some(args))
                .await
                .unwrap();
        }
    }
    let path = repo.vm_dir(VM).join("manifest.json");
    let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    for disk in json["disks"].as_array_mut().unwrap() {
        disk.as_object_mut().unwrap().remove("key");
    }
    std::fs::write(&path, serde_json::to_string_pretty(&json).unwrap()).unwrap();

    vm.write_pattern("disk1", 0xcc, 20 * MIB, MIB).await;
    let disks = ["disk0", "disk1"];
    let (report, _) = backup_checked(&repo, &vm, &disks, refs.path(), "upgraded").await;
    assert_eq!(
        (report.level.as_ref(), report.method.as_ref()),
        ("incremental", "checksum-diff"),
        "{report:?}"
    );
    let reason = report.reason.as_str();
    assert!(reason.contains("cannot prove"), "{reason}");

    // The disks have keys and their own bitmaps now; the old ones are gone.
    vm.write_pattern("disk0", 0xdd, 4 * MIB, MIB).await;
    let next_refs = vm.capture_references(&disks, refs.path(), "next").await;
    let inc = repo.backup_report(&vm, VM, &[]);
    assert_eq!(
        (inc.level.as_ref(), inc.method.as_ref()),
        ("incremental", "bitmap"),
        "{inc:?}"
    );
    let inc_node = inc.node.clone();
    assert_restores_as(&repo, &inc_node, &disks, &next_refs, refs.path());
    assert_no_leftovers(&vm, &expected_bitmaps(&repo.manifest(VM), &inc_node, &full)).await;
}

#[tokio::test]
async fn a_live_restore_into_a_drive_disk_is_refused_with_a_way_out() {
    let source = TestVm::start(&[("vd0", 16 * MIB)]).await;
    let repo = TestRepo::init();
    source.write_pattern("vd0", 0x3c, 0, MIB).await;
    let node = repo.backup_node(&source, VM, &[]);
    let target = TestVm::builder()
        .disk("vd0", 16 * MIB)
        .device("vd0", Device::DriveVirtioBlk)
        .paused()
        .start()
        .await;
    let out = integration_tests::cli::run_owned(&repo.live_restore_args(&target.socket(), VM, &node, &[]));
    assert_eq!(out.code(), Some(2), "{out:?}");
    assert!(out.stderr.contains("attached with -drive"), "{out:?}");
    assert!(!target.running().await, "the target VM must stay as it was");
}
