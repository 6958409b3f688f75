//! Disks that are not a plain writable qcow2 on virtio-blk: raw files, a real block device (a loop device), a
//! qcow2 under a throttle filter, a read-only disk, a CD-ROM and an empty drive. Each is backed up (or skipped
//! and named) and its data checked against a reference taken at the backup's instant.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};

use integration_tests::repo::{BackupReport, TestRepo};
use integration_tests::{MIB, TestVm, TestVmBuilder, cli, image};
use qmpbak_engine::backup::DiskReport;
use qmpbak_engine::inspect::{DiskInfo, VmInfo};

const VM: &str = "kinds";

/// Adds disk `id`: a `format` node named `node-<id>` over the protocol node `file`, on virtio-blk.
fn with_disk(builder: TestVmBuilder, id: &str, format: &str, file: &Value) -> TestVmBuilder {
    let node = json!({ "driver": format, "node-name": format!("node-{id}"), "file": file });
    builder
        .arg("-blockdev")
        .arg(&node.to_string())
        .arg("-device")
        .arg(&format!("virtio-blk-pci,drive=node-{id},id={id}"))
}

fn file_node(path: &Path) -> Value {
    json!({ "driver": "file", "filename": path })
}

/// A raw image of `size` bytes (sparse).
fn create_raw(path: &Path, size: u64) {
    image::qemu_img(&[
        "create",
        "-q",
        "-f",
        "raw",
        path.to_str().unwrap(),
        &size.to_string(),
    ]);
}

/// `qmpbak info --json` of the VM.
fn info(vm: &TestVm) -> VmInfo {
    cli::run(&["info", "--socket", vm.socket().to_str().unwrap(), "--json"])
        .success()
        .report()
}

/// The disk `id` of an `info` report.
fn info_disk<'a>(info: &'a VmInfo, id: &str) -> &'a DiskInfo {
    info.disks
        .iter()
        .find(|d| d.id == id)
        .unwrap_or_else(|| panic!("no disk {id} in {info:#?}"))
}

/// The disk `id` of a backup report.
fn disk<'a>(report: &'a BackupReport, id: &str) -> &'a DiskReport {
    report
        .disks
        .iter()
        .find(|d| d.disk == id)
        .unwrap_or_else(|| panic!("no disk {id} in {report:#?}"))
}

/// Captures what the guest sees on disk `id` now into `dst`: the VM paused, the image below any filter (as
/// `qmpbak info` names it) copied with `qemu-img convert -U`.
async fn capture(vm: &TestVm, id: &str, dst: &Path) {
    vm.qmp().execute_raw("stop", None).await.unwrap();
    let file = info_disk(&info(vm), id).file.clone();
    image::convert_to_qcow2(Path::new(&file), dst);
    vm.qmp().execute_raw("cont", None).await.unwrap();
}

fn backup(repo: &TestRepo, vm: &TestVm) -> BackupReport {
    repo.backup_report(vm, VM, &[])
}

fn assert_node(repo: &TestRepo, report: &BackupReport, id: &str, reference: &Path) {
    image::assert_same(reference, &repo.node_file(VM, report.node.as_str(), id));
}

#[tokio::test]
async fn a_raw_disk_backs_up_full_then_by_bitmap_and_after_a_restart_by_checksums() {
    let images = tempfile::tempdir().unwrap();
    let raw = images.path().join("raw0.img");
    create_raw(&raw, 16 * MIB);
    let vm = with_disk(TestVm::builder(), "raw0", "raw", &file_node(&raw))
        .disk("disk0", 16 * MIB)
        .start()
        .await;
    let repo = TestRepo::init();
    let refs = tempfile::tempdir().unwrap();
    vm.write_pattern("raw0", 0x11, 0, 2 * MIB).await;
    let r1 = refs.path().join("r1.qcow2");
    capture(&vm, "raw0", &r1).await;
    let full = backup(&repo, &vm);
    assert_eq!(full.level, "full", "{full:?}");
    assert!(!disk(&full, "raw0").bitmaps_persist, "{full:?}");
    assert_node(&repo, &full, "raw0", &r1);
    let info = info(&vm);
    assert!(!info_disk(&info, "raw0").bitmaps_persist, "{info:#?}");
    assert!(info_disk(&info, "disk0").bitmaps_persist, "{info:#?}");
    let text = cli::run(&["info", "--socket", vm.socket().to_str().unwrap()])
        .success()
        .stdout;
    assert!(
        text.contains("bitmaps persist across restarts: no (disk raw0 is raw"),
        "{text}"
    );

    vm.write_pattern("raw0", 0x22, 5 * MIB, MIB).await;
    let r2 = refs.path().join("r2.qcow2");
    capture(&vm, "raw0", &r2).await;
    let inc = backup(&repo, &vm);
    assert_eq!(
        (inc.level.as_ref(), inc.method.as_ref()),
        ("incremental", "bitmap"),
        "{inc:?}"
    );
    assert_eq!(disk(&inc, "raw0").copied_bytes, MIB, "{inc:?}");
    assert_node(&repo, &inc, "raw0", &r2);

    // QEMU shuts down cleanly and starts again: the qcow2's bitmap was stored in its image, the raw disk's is
    // gone; the next backup compares checksums and says why.
    let mut vm = vm;
    vm.quit().await;
    let mut vm = vm.restart().await;
    vm.write_pattern("raw0", 0x33, 9 * MIB, MIB).await;
    let r3 = refs.path().join("r3.qcow2");
    capture(&vm, "raw0", &r3).await;
    let after = backup(&repo, &vm);
    assert_eq!(after.method, "checksum-diff", "{after:?}");
    let reason = after.reason.as_str();
    assert!(
        reason.contains("disk raw0 is raw: its bitmaps live only while QEMU runs"),
        "{reason}"
    );
    assert!(!reason.contains("disk disk0"), "{reason}");
    assert_eq!(disk(&after, "raw0").copied_bytes, MIB, "{after:?}");
    assert_node(&repo, &after, "raw0", &r3);

    // Time points need qcow2 images: refused with a usage error that names the disk, nothing changed.
    let out = cli::run_owned(&repo.socket_args(&vm.socket(), VM, &["snapshot"]));
    assert_eq!(out.code(), Some(2), "{out:?}");
    assert!(out.stderr.contains("disk raw0 is raw image"), "{}", out.stderr);
    assert!(repo.manifest(VM).operations.is_empty());
    vm.quit().await;
}

/// A loop device over a file made by the test, detached on drop (also when the test panics).
struct LoopDevice {
    path: PathBuf,
}

impl LoopDevice {
    /// `losetup -f --show FILE`; `None` (with the reason printed) if this machine cannot make loop devices.
    fn attach(file: &Path) -> Option<LoopDevice> {
        let out = Command::new("losetup").args(["-f", "--show"]).arg(file).output();
        match out {
            Ok(out) if out.status.success() => Some(LoopDevice {
                path: PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()),
            }),
            Ok(out) => {
                eprintln!(
                    "SKIPPED: cannot make a loop device (losetup: {})",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
                None
            }
            Err(e) => {
                eprintln!("SKIPPED: cannot make a loop device (running losetup: {e})");
                None
            }
        }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.path).status();
    }
}

#[tokio::test]
async fn a_block_device_under_raw_backs_up_like_a_file() {
    let images = tempfile::tempdir().unwrap();
    let backing = images.path().join("lo.img");
    create_raw(&backing, 16 * MIB);
    let Some(device) = LoopDevice::attach(&backing) else {
        return;
    };
    let file = json!({ "driver": "host_device", "filename": device.path });
    let vm = with_disk(TestVm::builder(), "blk0", "raw", &file).start().await;
    let repo = TestRepo::init();
    let refs = tempfile::tempdir().unwrap();
    vm.write_pattern("blk0", 0x44, MIB, 3 * MIB).await;
    let r1 = refs.path().join("r1.qcow2");
    capture(&vm, "blk0", &r1).await;
    let full = backup(&repo, &vm);
    assert_eq!(disk(&full, "blk0").virtual_size, 16 * MIB, "{full:?}");
    assert_node(&repo, &full, "blk0", &r1);
    assert!(!info_disk(&info(&vm), "blk0").bitmaps_persist);

    vm.write_zeroes("blk0", 2 * MIB, MIB).await;
    vm.write_pattern("blk0", 0x55, 12 * MIB, 512 * 1024).await;
    let r2 = refs.path().join("r2.qcow2");
    capture(&vm, "blk0", &r2).await;
    let inc = backup(&repo, &vm);
    assert_eq!(inc.method, "bitmap", "{inc:?}");
    assert_node(&repo, &inc, "blk0", &r2);

    // After QEMU crashed, its bitmap is gone: a checksum-diff that says why.
    let vm = vm.restart().await;
    vm.write_pattern("blk0", 0x66, 7 * MIB, MIB).await;
    let r3 = refs.path().join("r3.qcow2");
    capture(&vm, "blk0", &r3).await;
    let after = backup(&repo, &vm);
    assert_eq!(after.method, "checksum-diff", "{after:?}");
    assert!(
        after
            .reason
            .contains("disk blk0 is raw: its bitmaps live only while QEMU runs"),
        "{after:?}"
    );
    assert_eq!(disk(&after, "blk0").copied_bytes, MIB, "{after:?}");
    assert_node(&repo, &after, "blk0", &r3);
    // QEMU lets the loop device go before the device is detached.
    drop(vm);
}

/// The block driver of the node disk `id`'s device is attached to.
async fn root_driver(vm: &TestVm, id: &str) -> String {
    let blocks = vm.qmp().execute_raw("query-block", None).await.unwrap();
    let qdev = format!("/machine/peripheral/{id}/");
    blocks
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["qdev"].as_str().unwrap_or("").starts_with(&qdev))
        .and_then(|b| b["inserted"]["drv"].as_str())
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn backups_and_time_points_work_under_a_throttle_filter() {
    under_a_filter(
        &json!({ "driver": "throttle", "throttle-group": "tg0" }),
        "throttle",
    )
    .await;
}

#[tokio::test]
async fn backups_and_time_points_work_under_a_copy_on_read_filter() {
    under_a_filter(&json!({ "driver": "copy-on-read" }), "copy-on-read").await;
}

/// Disk `thr0`: the filter node `filter` (its options without `node-name` and `file`) on top of a qcow2. A full,
/// a checksum-diff after a crash, two time points, a revert to each, a commit: data right each time, the
/// filter (driver `driver`) still on top.
async fn under_a_filter(filter: &Value, driver: &str) {
    let images = tempfile::tempdir().unwrap();
    let path = images.path().join("thr0.qcow2");
    image::create_qcow2(&path, 16 * MIB);
    let qcow2 = json!({ "driver": "qcow2", "node-name": "node-thr0-fmt", "file": file_node(&path) });
    let mut top = filter.clone();
    top["node-name"] = json!("node-thr0");
    top["file"] = qcow2;
    let vm = TestVm::builder()
        .arg("-object")
        .arg("throttle-group,id=tg0,x-bps-total=1000000000")
        .arg("-blockdev")
        .arg(&top.to_string())
        .arg("-device")
        .arg("virtio-blk-pci,drive=node-thr0,id=thr0")
        .start()
        .await;
    assert_eq!(root_driver(&vm, "thr0").await, driver);
    let repo = TestRepo::init();
    let refs = tempfile::tempdir().unwrap();
    // A full, and after QEMU crashed, a checksum-diff read through the filter.
    vm.write_pattern("thr0", 0x0f, 8 * MIB, MIB).await;
    let first = refs.path().join("first.qcow2");
    capture(&vm, "thr0", &first).await;
    assert_node(&repo, &backup(&repo, &vm), "thr0", &first);
    let vm = vm.restart().await;
    let run = |args: &[&str]| {
        cli::run_owned(&repo.socket_args(&vm.socket(), VM, args))
            .success()
            .json()
    };

    vm.write_pattern("thr0", 0x11, 0, 2 * MIB).await;
    let clean = refs.path().join("clean.qcow2");
    capture(&vm, "thr0", &clean).await;
    let diff = backup(&repo, &vm);
    assert_eq!(diff.method, "checksum-diff", "{diff:?}");
    assert_node(&repo, &diff, "thr0", &clean);
    run(&["snapshot", "--tag", "clean"]);

    vm.write_pattern("thr0", 0x22, 4 * MIB, MIB).await;
    let second = refs.path().join("second.qcow2");
    capture(&vm, "thr0", &second).await;
    run(&["snapshot", "--tag", "second"]);
    vm.write_pattern("thr0", 0x33, 0, 8 * MIB).await;

    run(&["revert", "clean"]);
    let now = refs.path().join("now-clean.qcow2");
    capture(&vm, "thr0", &now).await;
    image::assert_same(&clean, &now);
    assert_eq!(root_driver(&vm, "thr0").await, driver, "the filter stays on top");

    run(&["revert", "second"]);
    let now = refs.path().join("now-second.qcow2");
    capture(&vm, "thr0", &now).await;
    image::assert_same(&second, &now);

    // `second`'s increment moves into `clean`'s file, below the filter.
    run(&["commit", "second"]);
    let now = refs.path().join("now-committed.qcow2");
    capture(&vm, "thr0", &now).await;
    image::assert_same(&second, &now);
    assert_eq!(root_driver(&vm, "thr0").await, driver, "the filter stays on top");

    let again = backup(&repo, &vm);
    assert_node(&repo, &again, "thr0", &second);
    assert!(repo.manifest(VM).operations.is_empty());
}

#[tokio::test]
async fn a_cdrom_and_an_empty_drive_are_skipped_and_named() {
    let images = tempfile::tempdir().unwrap();
    let iso = images.path().join("cd.iso");
    std::fs::write(&iso, vec![0x43u8; MIB as usize]).unwrap();
    let vm = TestVm::builder()
        .disk("disk0", 8 * MIB)
        .arg("-drive")
        .arg(&format!(
            "file={},format=raw,if=none,id=cddrive,media=cdrom,readonly=on",
            iso.display()
        ))
        .arg("-device")
        .arg("ide-cd,drive=cddrive,id=cd0,bus=ide.0")
        .arg("-device")
        .arg("ide-cd,id=cd1,bus=ide.1")
        .start()
        .await;
    let repo = TestRepo::init();
    let refs = tempfile::tempdir().unwrap();
    vm.write_pattern("disk0", 0x66, 0, MIB).await;
    let d0 = refs.path().join("d0.qcow2");
    vm.capture_reference("disk0", &d0).await;

    let full = backup(&repo, &vm);
    let ids: Vec<&str> = full.disks.iter().map(|d| d.disk.as_str()).collect();
    assert_eq!(ids, ["disk0"], "{full:#?}");
    assert_node(&repo, &full, "disk0", &d0);
    // The CD-ROM is named by its qdev id or, where qmpbak does not read that for ide-cd, by its drive.
    let find = |reason: &str| {
        full.skipped
            .iter()
            .find(|s| s.reason.contains(reason))
            .map_or_else(|| panic!("no {reason} in skipped: {full:#?}"), |s| s.disk.clone())
    };
    let cdrom = find("removable medium");
    assert!(["cd0", "cddrive"].contains(&cdrom.as_str()), "{full:#?}");
    assert_eq!(find("no medium"), "cd1", "{full:#?}");

    // Named explicitly, the CD-ROM is backed up too.
    let cd = repo.backup_report(&vm, VM, &["--level", "full", "--disk", &cdrom]);
    assert!(cd.skipped.is_empty(), "{cd:?}");
    image::assert_same(&iso, &repo.node_file(VM, cd.node.as_str(), &cdrom));
}

#[tokio::test]
async fn a_read_only_disk_is_backed_up_and_its_bitmap_kept_in_memory() {
    let images = tempfile::tempdir().unwrap();
    // The read-only disk's data, written before QEMU opens it.
    let mut data = vec![0u8; 8 * MIB as usize];
    data[MIB as usize..3 * MIB as usize].fill(0x5c);
    let ro = images.path().join("ro0.qcow2");
    image::qcow2_from_bytes(&ro, &data);
    let vm = TestVm::builder()
        .disk("disk0", 8 * MIB)
        .arg("-drive")
        .arg(&format!(
            "file={},format=qcow2,if=none,id=rodrive,readonly=on",
            ro.display()
        ))
        .arg("-device")
        .arg("virtio-blk-pci,drive=rodrive,id=ro0")
        // The same image once more, read-only through -blockdev.
        .arg("-blockdev")
        .arg(
            &json!({ "driver": "qcow2", "node-name": "node-ro1", "read-only": true,
                     "file": { "driver": "file", "filename": ro, "read-only": true } })
            .to_string(),
        )
        .arg("-device")
        .arg("virtio-blk-pci,drive=node-ro1,id=ro1")
        .start()
        .await;
    let repo = TestRepo::init();

    let full = backup(&repo, &vm);
    let mut ids: Vec<&str> = full.disks.iter().map(|d| d.disk.as_str()).collect();
    ids.sort_unstable();
    assert_eq!(ids, ["disk0", "ro0", "ro1"], "{full:#?}");
    for id in ["ro0", "ro1"] {
        image::assert_same(&ro, &repo.node_file(VM, full.node.as_str(), id));
        assert!(!disk(&full, id).bitmaps_persist, "{full:?}");
        assert_eq!(
            disk(&full, id).bitmaps_volatile_why.as_deref(),
            Some("is read-only: its bitmaps live only while QEMU runs")
        );
    }

    // The read-only disk's bitmap lives in QEMU's memory: the next backup is still a bitmap incremental.
    vm.write_pattern("disk0", 0x77, 4 * MIB, MIB).await;
    let inc = backup(&repo, &vm);
    assert_eq!(inc.method, "bitmap", "{inc:?}");
    for id in ["ro0", "ro1"] {
        assert_eq!(disk(&inc, id).copied_bytes, 0, "{inc:?}");
        image::assert_same(&ro, &repo.node_file(VM, inc.node.as_str(), id));
    }
}

/// Runs `qmpbak ARGS` that must fail with `code`, and returns the one JSON error object on its stdout.
#[track_caller]
fn json_failure(args: &[&str], code: i32) -> Value {
    let out = cli::run(args);
    assert_eq!(out.code(), Some(code), "{out:?}");
    assert!(
        out.stderr.contains("qmpbak"),
        "the message stays on stderr: {out:?}"
    );
    let value = out.json();
    let error = &value["error"];
    assert_eq!(error["code"], code, "{value:#}");
    assert!(!error["message"].as_str().unwrap().is_empty(), "{value:#}");
    assert!(error["causes"].is_array(), "{value:#}");
    assert!(error["kind"].is_string(), "{value:#}");
    value
}

#[test]
fn a_failing_command_with_json_prints_one_error_object() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.sock");
    let e = json_failure(&["info", "--socket", missing.to_str().unwrap(), "--json"], 5);
    assert_eq!(e["error"]["kind"], "qemu");
    let text = e.to_string();
    assert!(text.contains("nope.sock"), "{e:#}");

    let e = json_failure(&["list", dir.path().to_str().unwrap(), "--json"], 3);
    assert_eq!(e["error"]["kind"], "repository");

    let e = json_failure(&["info", "--json", "--no-such-option"], 2);
    assert_eq!(e["error"]["kind"], "usage");
    assert!(e.to_string().contains("--no-such-option"), "{e:#}");

    // Without --json, stdout stays empty.
    let out = cli::run(&["list", dir.path().to_str().unwrap()]);
    assert_eq!((out.code(), out.stdout.as_str()), (Some(3), ""));
}
