//! The VM configurations of README's "What qmpbak backs up" table that are not covered elsewhere: device types
//! other than virtio-blk, `-drive` against `-blockdev`, a qcow2 with an external data file, a VM running on an
//! overlay, a disk in an iothread, a disk hot-plugged between backups. Each is backed up full and incremental
//! and every node compared with a reference taken at the backup's instant.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use serde_json::json;

use integration_tests::repo::TestRepo;
use integration_tests::{MIB, TestVm, cli, image};
use qmpbak_engine::inspect::VmInfo;

const VM: &str = "conf";

/// `qmpbak info --json` of the VM.
fn info(vm: &TestVm) -> VmInfo {
    cli::run(&["info", "--socket", vm.socket().to_str().unwrap(), "--json"])
        .success()
        .report()
}

/// The id qmpbak gives the disk whose format node is `node` (named by the test), from `qmpbak info`.
fn id_of_node(vm: &TestVm, node: &str) -> String {
    let info = info(vm);
    info.disks
        .iter()
        .find(|d| d.node_name == node)
        .map_or_else(|| panic!("no disk on node {node}: {info:#?}"), |d| d.id.clone())
}

/// A guest write through the device `qdev` (HMP `qemu-io -d`: a qdev id, or `ID/virtio-backend`).
async fn write(vm: &TestVm, qdev: &str, pattern: u8, offset: u64, len: u64) {
    let line = format!("qemu-io -d {qdev} \"write -P 0x{pattern:02x} {offset} {len}\"");
    let reply = vm
        .qmp()
        .execute_raw("human-monitor-command", Some(json!({ "command-line": line })))
        .await
        .unwrap();
    let text = reply.as_str().unwrap_or_default();
    assert!(
        !["failed", "error", "Error", "not found"]
            .iter()
            .any(|w| text.contains(w)),
        "{line}: {text}"
    );
}

/// Captures what the guest sees on disk `id` now into `dst` (VM paused; the image `qmpbak info` names, with
/// its backing chain).
async fn capture(vm: &TestVm, id: &str, dst: &Path) {
    vm.qmp().execute_raw("stop", None).await.unwrap();
    let info = info(vm);
    let file = info
        .disks
        .iter()
        .find(|d| d.id == id)
        .map(|d| d.file.clone())
        .unwrap();
    image::convert_to_qcow2(Path::new(&file), dst);
    vm.qmp().execute_raw("cont", None).await.unwrap();
}

/// A disk of the test: the format node the test named and the `qemu-io -d` device path.
struct Disk {
    node: &'static str,
    qdev: &'static str,
}

/// Full, then incremental: each node equals the guest's view at its instant. Returns the repository.
async fn full_then_incremental(vm: &TestVm, disks: &[Disk]) -> TestRepo {
    let repo = TestRepo::init();
    let refs = tempfile::tempdir().unwrap();
    let ids: Vec<String> = disks.iter().map(|d| id_of_node(vm, d.node)).collect();
    for (i, d) in disks.iter().enumerate() {
        write(vm, d.qdev, 0x10 + i as u8, 0, 2 * MIB).await;
    }
    for (round, level) in [(0u8, "full"), (1, "incremental")] {
        if round == 1 {
            for (i, d) in disks.iter().enumerate() {
                write(vm, d.qdev, 0x20 + i as u8, 3 * MIB, MIB).await;
            }
        }
        let mut refs_now = Vec::new();
        for id in &ids {
            let r = refs.path().join(format!("{round}-{id}.qcow2"));
            capture(vm, id, &r).await;
            refs_now.push(r);
        }
        let report = repo.backup_report(vm, VM, &[]);
        assert_eq!(report.level, level, "{report:#?}");
        if round == 1 {
            assert_eq!(report.method, "bitmap", "{report:#?}");
        }
        let node = report.node.as_str();
        for (id, r) in ids.iter().zip(&refs_now) {
            image::assert_same(r, &repo.node_file(VM, node, id));
        }
    }
    repo
}

#[tokio::test]
async fn scsi_and_ide_disks_from_drive_and_blockdev_back_up_exactly() {
    let images = tempfile::tempdir().unwrap();
    let scsi = images.path().join("scsi.qcow2");
    let ide = images.path().join("ide.qcow2");
    let legacy = images.path().join("legacy.qcow2");
    for p in [&scsi, &ide, &legacy] {
        image::create_qcow2(p, 8 * MIB);
    }
    let blockdev = |path: &Path, node: &str| {
        json!({ "driver": "qcow2", "node-name": node, "file": { "driver": "file", "filename": path } })
            .to_string()
    };
    let vm = TestVm::builder()
        .arg("-device")
        .arg("virtio-scsi-pci,id=scsi0")
        .arg("-blockdev")
        .arg(&blockdev(&scsi, "node-sd0"))
        .arg("-device")
        .arg("scsi-hd,drive=node-sd0,id=sd0,bus=scsi0.0")
        .arg("-blockdev")
        .arg(&blockdev(&ide, "node-hd0"))
        .arg("-device")
        .arg("ide-hd,drive=node-hd0,id=hd0,bus=ide.2")
        .arg("-drive")
        .arg(&format!(
            "file={},format=qcow2,if=none,id=legacy,node-name=node-legacy",
            legacy.display()
        ))
        .arg("-device")
        .arg("virtio-blk-pci,drive=legacy,id=vd0")
        .start()
        .await;
    full_then_incremental(
        &vm,
        &[
            Disk {
                node: "node-sd0",
                qdev: "sd0",
            },
            Disk {
                node: "node-hd0",
                qdev: "hd0",
            },
            Disk {
                node: "node-legacy",
                qdev: "vd0/virtio-backend",
            },
        ],
    )
    .await;
}

#[tokio::test]
async fn a_qcow2_with_an_external_data_file_backs_up_and_keeps_its_bitmaps() {
    let images = tempfile::tempdir().unwrap();
    let img = images.path().join("df.qcow2");
    let data = images.path().join("df.data");
    image::qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &format!("data_file={}", data.display()),
        img.to_str().unwrap(),
        &(8 * MIB).to_string(),
    ]);
    let node = json!({ "driver": "qcow2", "node-name": "node-df0",
                       "file": { "driver": "file", "filename": img },
                       "data-file": { "driver": "file", "filename": data } });
    let vm = TestVm::builder()
        .arg("-blockdev")
        .arg(&node.to_string())
        .arg("-device")
        .arg("virtio-blk-pci,drive=node-df0,id=df0")
        .start()
        .await;
    let disks = [Disk {
        node: "node-df0",
        qdev: "df0/virtio-backend",
    }];
    let repo = full_then_incremental(&vm, &disks).await;
    let id = id_of_node(&vm, "node-df0");
    assert!(
        info(&vm).disks[0].bitmaps_persist,
        "a qcow2 stores bitmaps also with an external data file"
    );
    // A clean restart keeps the bitmap: the next backup is a bitmap incremental again.
    let mut vm = vm;
    vm.quit().await;
    let vm = vm.restart().await;
    write(&vm, "df0/virtio-backend", 0x5e, 6 * MIB, MIB).await;
    let refs = tempfile::tempdir().unwrap();
    let r = refs.path().join("r.qcow2");
    capture(&vm, &id, &r).await;
    let report = repo.backup_report(&vm, VM, &[]);
    assert_eq!(report.method, "bitmap", "{report:#?}");
    image::assert_same(&r, &repo.node_file(VM, report.node.as_str(), &id));
}

#[tokio::test]
async fn a_vm_running_on_an_overlay_backs_up_what_the_guest_sees() {
    let images = tempfile::tempdir().unwrap();
    let mut bytes = vec![0u8; 8 * MIB as usize];
    bytes[..4 * MIB as usize].fill(0x3b);
    let base = images.path().join("base.qcow2");
    image::qcow2_from_bytes(&base, &bytes);
    let overlay = images.path().join("overlay.qcow2");
    image::qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        base.to_str().unwrap(),
        "-F",
        "qcow2",
        overlay.to_str().unwrap(),
    ]);
    let node = json!({ "driver": "qcow2", "node-name": "node-ov0",
                       "file": { "driver": "file", "filename": overlay } });
    let vm = TestVm::builder()
        .arg("-blockdev")
        .arg(&node.to_string())
        .arg("-device")
        .arg("virtio-blk-pci,drive=node-ov0,id=ov0")
        .start()
        .await;
    full_then_incremental(
        &vm,
        &[Disk {
            node: "node-ov0",
            qdev: "ov0/virtio-backend",
        }],
    )
    .await;
}

#[tokio::test]
async fn a_disk_in_an_iothread_backs_up_and_after_a_crash_by_checksums() {
    let images = tempfile::tempdir().unwrap();
    let img = images.path().join("io0.qcow2");
    image::create_qcow2(&img, 8 * MIB);
    let node = json!({ "driver": "qcow2", "node-name": "node-io0",
                       "file": { "driver": "file", "filename": img } });
    let vm = TestVm::builder()
        .arg("-object")
        .arg("iothread,id=iot0")
        .arg("-blockdev")
        .arg(&node.to_string())
        .arg("-device")
        .arg("virtio-blk-pci,drive=node-io0,id=io0,iothread=iot0")
        .start()
        .await;
    let repo = full_then_incremental(
        &vm,
        &[Disk {
            node: "node-io0",
            qdev: "io0/virtio-backend",
        }],
    )
    .await;
    let id = id_of_node(&vm, "node-io0");
    // A crash loses the bitmap: the checksum-diff reads the disk over NBD from the iothread.
    let vm = vm.restart().await;
    write(&vm, "io0/virtio-backend", 0x6f, 5 * MIB, MIB).await;
    let refs = tempfile::tempdir().unwrap();
    let r = refs.path().join("r.qcow2");
    capture(&vm, &id, &r).await;
    let report = repo.backup_report(&vm, VM, &[]);
    assert_eq!(report.method, "checksum-diff", "{report:#?}");
    image::assert_same(&r, &repo.node_file(VM, report.node.as_str(), &id));
    // Time points in the iothread: snapshot, write, revert.
    let run = |args: &[&str]| {
        cli::run_owned(&repo.socket_args(&vm.socket(), VM, args))
            .success()
            .json()
    };
    run(&["snapshot", "--tag", "t"]);
    write(&vm, "io0/virtio-backend", 0x70, 0, 4 * MIB).await;
    run(&["revert", "t"]);
    let now = refs.path().join("now.qcow2");
    capture(&vm, &id, &now).await;
    image::assert_same(&r, &now);
}

#[tokio::test]
async fn a_disk_hot_plugged_between_backups_gets_a_full_that_says_why() {
    // q35's root bus takes no hot-plugged devices; a PCIe root port does.
    let vm = TestVm::builder()
        .disk("disk0", 8 * MIB)
        .arg("-device")
        .arg("pcie-root-port,id=rp0,chassis=1")
        .start()
        .await;
    let repo = TestRepo::init();
    vm.write_pattern("disk0", 0x11, 0, MIB).await;
    repo.backup_report(&vm, VM, &[]);

    let images = tempfile::tempdir().unwrap();
    let img = images.path().join("hot0.qcow2");
    image::create_qcow2(&img, 4 * MIB);
    vm.qmp()
        .execute_raw(
            "blockdev-add",
            Some(json!({ "driver": "qcow2", "node-name": "node-hot0",
                         "file": { "driver": "file", "filename": img } })),
        )
        .await
        .unwrap();
    vm.qmp()
        .execute_raw(
            "device_add",
            Some(json!({ "driver": "virtio-blk-pci", "drive": "node-hot0", "id": "hot0", "bus": "rp0" })),
        )
        .await
        .unwrap();
    vm.write_pattern("hot0", 0x22, MIB, MIB).await;
    let refs = tempfile::tempdir().unwrap();
    let r = refs.path().join("hot0.qcow2");
    vm.capture_reference("hot0", &r).await;
    let report = repo.backup_report(&vm, VM, &[]);
    assert_eq!(report.level, "full", "{report:#?}");
    assert!(
        report
            .reason
            .as_str()
            .contains("disk hot0 is not in the previous backup"),
        "{report:#?}"
    );
    image::assert_same(&r, &repo.node_file(VM, report.node.as_str(), "hot0"));
    vm.write_pattern("hot0", 0x33, 0, MIB).await;
    let inc = repo.backup_report(&vm, VM, &[]);
    assert_eq!(inc.method, "bitmap", "{inc:#?}");
}
