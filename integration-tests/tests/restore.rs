//! `qmpbak restore` and `qmpbak verify` against real QEMU: every node of a tree with two branches and a
//! differential restores exactly (offline, qcow2 and raw, also after the repository moved), live restore runs
//! the VM at once and keeps the guest's writes (and the next incremental holds only those), and damage is found
//! and refused.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use integration_tests::repo::{TestRepo, copied_bytes};
use integration_tests::timeouts::{BLOCK_JOB_TIMEOUT, CLI_CRASH_TIMEOUT, CLI_TIMEOUT, NBD_CONNECT_TIMEOUT};
use integration_tests::{MIB, TestVm, cli, image};
use qmp::EventFilter;
use qmpbak_engine::cleanup::CleanupReport;
use qmpbak_engine::restore::live::LiveReport;
use qmpbak_engine::restore::offline::RestoreReport;
use qmpbak_engine::verify::VerifyReport;

const VM: &str = "vm1";
const DISKS: [&str; 2] = ["disk0", "disk1"];

fn sizes() -> [(&'static str, u64); 2] {
    [("disk0", 32 * MIB), ("disk1", 16 * MIB)]
}

fn restore(repo: &TestRepo, node: &str, to: &Path, extra: &[&str]) -> cli::Output {
    repo.run(
        VM,
        &[&["restore", node, "--to", to.to_str().unwrap(), "--json"], extra].concat(),
    )
}

fn verify(repo: &TestRepo, extra: &[&str]) -> cli::Output {
    repo.run(VM, &[&["verify", "--json"], extra].concat())
}

fn live_args(repo: &TestRepo, vm: &TestVm, node: &str, extra: &[&str]) -> Vec<String> {
    repo.live_restore_args(&vm.socket(), VM, node, extra)
}

/// Starts `qmpbak restore --live` of `node` into the paused `vm`, streaming at 4 MiB/s, and returns once the
/// stream job runs (the VM runs from then on).
async fn start_slow_live_restore(repo: &TestRepo, vm: &TestVm, node: &str) -> std::process::Child {
    let mut events = vm.qmp().subscribe(EventFilter::names(&["JOB_STATUS_CHANGE"]));
    let args = live_args(repo, vm, node, &["--speed-limit", &(4 * MIB).to_string()]);
    let child = cli::command_owned(&args).spawn().unwrap();
    loop {
        let e = events
            .next_timeout(BLOCK_JOB_TIMEOUT)
            .await
            .expect("stream job starts");
        if e.data["status"] == "running" {
            break;
        }
    }
    child
}

fn assert_restores_exactly(repo: &TestRepo, node: &str, refs: &[PathBuf], out: &Path) {
    for format in ["qcow2", "raw"] {
        let dir = out.join(format!("{node}-{format}"));
        let printed = restore(repo, node, &dir, &["--format", format]).success();
        // The printed shape: the report's documented keys (and each disk's), so a renamed field is caught.
        let raw = printed.json();
        cli::assert_keys(&raw, &["vm", "node", "format", "disks", "duration_secs"]);
        cli::assert_keys(
            &raw["disks"][0],
            &["disk", "path", "virtual_size", "verified", "mismatched_blocks"],
        );
        let report: RestoreReport = printed.report();
        assert_eq!(report.node, node);
        for (disk, reference) in DISKS.iter().zip(refs) {
            let path = dir.join(format!("{disk}.{format}"));
            assert!(report.disks.iter().any(|d| d.verified));
            let info = image::info(&path);
            assert_eq!(info["format"], format, "{info}");
            assert!(info.get("backing-filename").is_none(), "standalone: {info}");
            image::assert_same(reference, &path);
            // Thin: holes stay holes (the disks are mostly unwritten).
            let allocated = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&path).unwrap()) * 512;
            let virtual_size = info["virtual-size"].as_u64().unwrap();
            assert!(
                allocated < virtual_size / 2,
                "{} holds {allocated} of {virtual_size} bytes",
                path.display()
            );
        }
    }
}

#[tokio::test]
async fn every_node_of_a_two_branch_tree_restores_exactly_also_after_moving_the_repository() {
    let repo = TestRepo::init();
    let work = tempfile::tempdir().unwrap();
    let mut nodes: Vec<(String, Vec<PathBuf>)> = Vec::new();
    {
        let vm = TestVm::start(&sizes()).await;
        vm.write_pattern("disk0", 0x01, 0, 4 * MIB).await;
        vm.write_pattern("disk1", 0x02, 8 * MIB, MIB).await;
        for (i, level) in ["full", "inc", "inc", "diff"].iter().enumerate() {
            if i > 0 {
                vm.write_pattern("disk0", 0x10 + i as u8, i as u64 * 5 * MIB, 2 * MIB)
                    .await;
                vm.write_pattern("disk1", 0x20 + i as u8, i as u64 * MIB, 64 * 1024)
                    .await;
            }
            if i == 2 {
                vm.write_zeroes("disk0", 0, MIB).await;
            }
            let refs = vm.capture_references(&DISKS, work.path(), &format!("a{i}")).await;
            let report = repo.backup_report(&vm, VM, &["--level", level]);
            nodes.push((report.node.clone(), refs));
        }
    }
    // A second branch: node 2 restored live into a new VM, which then changes and is backed up.
    let branch_point = nodes[1].0.clone();
    let vm2 = TestVm::start_paused(&sizes()).await;
    cli::run_owned(&live_args(&repo, &vm2, &branch_point, &[])).success();
    vm2.write_pattern("disk1", 0x77, 0, MIB).await;
    let refs = vm2.capture_references(&DISKS, work.path(), "branch").await;
    let branch = repo.backup_report(&vm2, VM, &[]);
    assert_eq!(branch.parent.as_ref(), Some(&branch_point), "{branch:?}");
    assert_eq!(branch.method, "bitmap", "{branch:?}");
    nodes.push((branch.node.clone(), refs));

    let manifest = repo.manifest(VM);
    assert_eq!(
        manifest.children(&branch_point.parse().unwrap()).unwrap().len(),
        2,
        "node 2 has two children"
    );
    let listing = cli::run(&["list", repo.vm_dir(VM).to_str().unwrap()])
        .success()
        .stdout;
    assert!(
        listing.contains("├──") && listing.contains("differential"),
        "{listing}"
    );

    let out = work.path().join("out");
    for (node, refs) in &nodes {
        assert_restores_exactly(&repo, node, refs, &out);
    }
    // Moved elsewhere, the repository restores the same: nothing trusts the paths in qcow2 headers.
    let moved = work.path().join("moved-repo");
    std::fs::rename(repo.path(), &moved).unwrap();
    let out2 = work.path().join("out2");
    let moved_repo = TestRepo::at(moved.clone());
    for (node, refs) in [&nodes[2], &nodes[4]] {
        assert_restores_exactly(&moved_repo, node, refs, &out2);
    }
    std::fs::rename(&moved, repo.path()).unwrap();
}

/// An output on a filesystem that refuses O_DIRECT (the restore writes with it where it can): the images are
/// written through the page cache instead, say so at -v, and are exact.
#[tokio::test]
async fn a_restore_onto_a_filesystem_without_o_direct_is_written_buffered_and_exact() {
    let repo = TestRepo::init();
    let work = tempfile::tempdir().unwrap();
    let vm = TestVm::start(&sizes()).await;
    vm.write_pattern("disk0", 0x31, 0, 3 * MIB).await;
    vm.write_pattern("disk1", 0x32, 4 * MIB, MIB).await;
    repo.backup_node(&vm, VM, &[]);
    vm.write_pattern("disk0", 0x33, MIB + 64 * 1024, 64 * 1024).await;
    vm.write_zeroes("disk1", 4 * MIB, 64 * 1024).await;
    let refs = vm.capture_references(&DISKS, work.path(), "inc").await;
    let inc = repo.backup_node(&vm, VM, &[]);
    for (inject, format) in [(true, "qcow2"), (false, "raw")] {
        let dir = work.path().join(format!("out-{format}"));
        let args = repo.vm_args(
            VM,
            &[
                "restore",
                &inc,
                "--to",
                dir.to_str().unwrap(),
                "--format",
                format,
                "-v",
            ],
        );
        let mut cmd = cli::command_owned(&args);
        if inject {
            cmd.env("QMPBAK_INJECT_NO_ODIRECT", "1");
        }
        let out = cli::wait(cmd.spawn().unwrap(), CLI_TIMEOUT).success();
        assert_eq!(
            out.stderr.contains("written through the page cache"),
            inject,
            "{}",
            out.stderr
        );
        for (disk, reference) in DISKS.iter().zip(&refs) {
            image::assert_same(reference, &dir.join(format!("{disk}.{format}")));
        }
    }
}

/// Exports the VM's disk `id` read-only over NBD from its own QEMU and connects to it: the guest's view.
async fn guest_view(vm: &TestVm, id: &str) -> nbd::Client {
    let socket = vm.dir().join("view.sock");
    vm.qmp()
        .execute_raw(
            "nbd-server-start",
            Some(serde_json::json!({"addr": {"type": "unix", "data": {"path": socket}}})),
        )
        .await
        .unwrap();
    vm.qmp()
        .execute_raw(
            "block-export-add",
            Some(serde_json::json!({"type": "nbd", "id": "view", "node-name": format!("node-{id}"), "writable": false})),
        )
        .await
        .unwrap();
    nbd::Client::connect_unix(&socket, &format!("node-{id}"), NBD_CONNECT_TIMEOUT)
        .await
        .unwrap()
}

#[tokio::test]
async fn live_restore_runs_at_once_and_guest_writes_during_streaming_survive() {
    let repo = TestRepo::init();
    let work = tempfile::tempdir().unwrap();
    let node = {
        let vm = TestVm::start(&sizes()).await;
        vm.write_pattern("disk0", 0x5a, 0, 16 * MIB).await;
        vm.write_pattern("disk1", 0xa5, 0, 8 * MIB).await;
        repo.backup_report(&vm, VM, &[]);
        vm.write_pattern("disk0", 0x6b, 4 * MIB, MIB).await;
        repo.backup_node(&vm, VM, &[])
    };
    let vm = TestVm::start_paused(&sizes()).await;
    let child = start_slow_live_restore(&repo, &vm, &node).await;
    assert!(vm.running().await, "the VM runs while data streams in");
    // The guest reads the backup's data at once.
    let view = guest_view(&vm, "disk0").await;
    let mut buf = vec![0u8; 64 * 1024];
    view.read(15 * MIB, &mut buf).await.unwrap();
    assert!(buf.iter().all(|&b| b == 0x5a));
    view.read(4 * MIB, &mut buf).await.unwrap();
    assert!(buf.iter().all(|&b| b == 0x6b));
    // The guest writes while streaming; its writes win.
    vm.write_pattern("disk0", 0xee, 12 * MIB, MIB).await;
    vm.write_pattern("disk1", 0xdd, 20 * 1024 * 1024 / 4, 64 * 1024)
        .await;
    view.disconnect().await.unwrap();
    let out = cli::wait(child, CLI_TIMEOUT).success();
    // The printed shape: the live report's documented keys, so a renamed field is caught.
    cli::assert_keys(
        &out.json(),
        &["vm", "node", "disks", "running_after_secs", "duration_secs"],
    );
    let out: LiveReport = out.report();
    assert!(out.running_after_secs < out.duration_secs, "{out:?}");

    // Expected: the backup plus the guest's writes, with no backing file left.
    let expected = work.path().join("expected");
    restore(&repo, &node, &expected, &[]).success();
    let exp0 = expected.join("disk0.qcow2");
    let exp1 = expected.join("disk1.qcow2");
    for (path, cmd) in [(&exp0, "write -P 0xee 12M 1M"), (&exp1, "write -P 0xdd 5M 64k")] {
        let st = std::process::Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", cmd])
            .arg(path)
            .output()
            .unwrap();
        assert!(st.status.success(), "{st:?}");
    }
    vm.qmp().execute_raw("stop", None).await.unwrap();
    for (disk, exp) in [("disk0", &exp0), ("disk1", &exp1)] {
        image::assert_same(exp, &vm.disk_path(disk));
        assert!(image::info(&vm.disk_path(disk)).get("backing-filename").is_none());
    }
    let left = vm.foreign_block_nodes().await;
    assert!(left.is_empty(), "leftover {left:?}");
    let manifest = repo.manifest(VM);
    assert_eq!(manifest.current.as_ref().unwrap().to_string(), node);
    assert!(manifest.operations.is_empty());
}

/// Flips one byte of guest data inside `file` (the first data cluster of its own layer).
fn flip_a_data_byte(file: &Path) -> u64 {
    let out = std::process::Command::new("qemu-img")
        .args(["map", "--output=json", "-U"])
        .arg(format!("json:{{\"driver\":\"qcow2\",\"file\":{{\"driver\":\"file\",\"filename\":\"{}\"}},\"backing\":null}}", file.display()))
        .output()
        .unwrap();
    let map: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let extent = map.iter().find(|e| e["data"] == true).expect("a data extent");
    let host = extent["offset"].as_u64().unwrap() + 100;
    let mut bytes = std::fs::read(file).unwrap();
    bytes[host as usize] ^= 0xff;
    std::fs::write(file, bytes).unwrap();
    extent["start"].as_u64().unwrap() + 100
}

#[tokio::test]
async fn a_flipped_byte_is_named_by_verify_and_stops_restore_unless_forced() {
    let repo = TestRepo::init();
    let work = tempfile::tempdir().unwrap();
    let vm = TestVm::start(&sizes()).await;
    let mut ids = Vec::new();
    for i in 0..3u8 {
        vm.write_pattern("disk0", 0x30 + i, u64::from(i) * 3 * MIB, 2 * MIB)
            .await;
        ids.push(repo.backup_node(&vm, VM, &[]));
    }
    let ok: VerifyReport = verify(&repo, &[]).success().report();
    assert!(ok.ok, "{ok:?}");

    let guest_offset = flip_a_data_byte(&repo.node_file(VM, &ids[1], "disk0"));
    let out = verify(&repo, &["--all"]);
    assert_eq!(out.code(), Some(6), "{out:?}");
    // The printed shape: the verify report's documented keys (and a node's, a disk's, a bad block's), so a
    // renamed field is caught.
    let raw = out.json();
    cli::assert_keys(
        &raw,
        &[
            "vm",
            "ok",
            "nodes",
            "damaged_nodes",
            "broken_restores",
            "unchecked_nodes",
        ],
    );
    cli::assert_keys(&raw["nodes"][0], &["node", "disks"]);
    cli::assert_keys(
        &raw["nodes"][0]["disks"][0],
        &["disk", "ok", "checked", "blocks_checked", "bad_blocks", "error"],
    );
    let report: VerifyReport = out.report();
    assert_eq!(report.damaged_nodes, [ids[1].clone()], "{report:?}");
    assert_eq!(
        report.broken_restores,
        [ids[1].clone(), ids[2].clone()],
        "{report:?}"
    );
    let bad = report.nodes.iter().find(|n| n.node == ids[1]).unwrap();
    let bad_disk = bad.disks.iter().find(|d| d.disk == "disk0").unwrap();
    assert_eq!(bad_disk.bad_blocks[0].index, guest_offset / MIB, "{bad_disk:?}");

    // Restore of the damaged node and of its descendant refuses and leaves nothing; the node before is fine.
    for id in [&ids[1], &ids[2]] {
        let to = work.path().join(format!("r-{id}"));
        let out = restore(&repo, id, &to, &[]);
        assert_eq!(out.code(), Some(6), "{out:?}");
        assert!(
            out.stderr.contains("damaged") && out.stderr.contains("disk0"),
            "{}",
            out.stderr
        );
        assert!(!to.join("disk0.qcow2").exists());
    }
    let to = work.path().join("forced");
    let forced: RestoreReport = restore(&repo, &ids[1], &to, &["--force"]).success().report();
    assert!(!forced.disks[0].verified, "{forced:?}");
    assert!(to.join("disk0.qcow2").exists());
    restore(&repo, &ids[0], &work.path().join("good"), &[]).success();
}

#[tokio::test]
async fn restore_refuses_to_overwrite_and_names_near_matches() {
    let repo = TestRepo::init();
    let work = tempfile::tempdir().unwrap();
    let vm = TestVm::start(&[("disk0", 16 * MIB)]).await;
    let node = repo.backup_node(&vm, VM, &["--tag", "clean"]);
    let file = work.path().join("existing.qcow2");
    std::fs::write(&file, b"precious").unwrap();
    let out = restore(&repo, &node, &file, &[]);
    assert_eq!(out.code(), Some(2), "{out:?}");
    assert!(
        out.stderr.contains("existing.qcow2") && out.stderr.contains("--force"),
        "{}",
        out.stderr
    );
    assert_eq!(std::fs::read(&file).unwrap(), b"precious");
    restore(&repo, "clean", &file, &["--force"]).success();
    // Not even --force replaces what is not a regular file (here a pipe; a device node alike).
    let fifo = work.path().join("pipe");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    let out = restore(&repo, &node, &fifo, &["--force"]);
    assert_eq!(out.code(), Some(2), "{out:?}");
    assert!(out.stderr.contains("not a regular file"), "{}", out.stderr);
    assert!(std::fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo());

    let out = restore(&repo, "0002", &work.path().join("x"), &[]);
    assert_eq!(out.code(), Some(2), "{out:?}");
    assert!(
        out.stderr.contains("no node or tag \"0002\"") && out.stderr.contains("0001"),
        "{}",
        out.stderr
    );
    let out = restore(&repo, "claen", &work.path().join("x"), &[]);
    assert!(
        out.stderr.contains("did you mean") && out.stderr.contains("clean"),
        "{}",
        out.stderr
    );
}

#[tokio::test]
async fn killed_during_streaming_the_vm_runs_on_and_cleanup_finishes_the_restore() {
    let repo = TestRepo::init();
    let work = tempfile::tempdir().unwrap();
    let node = {
        let vm = TestVm::start(&sizes()).await;
        vm.write_pattern("disk0", 0x3c, 0, 8 * MIB).await;
        repo.backup_node(&vm, VM, &[])
    };
    let vm = TestVm::start_paused(&sizes()).await;
    let args = live_args(&repo, &vm, &node, &["--speed-limit", &(2 * MIB).to_string()]);
    cli::run_crashing_at(&args, "restore-streaming", CLI_CRASH_TIMEOUT)
        .assert_crashed_at("restore-streaming");

    // The VM runs correctly on the chain that stays in QEMU.
    assert!(vm.running().await);
    let view = guest_view(&vm, "disk0").await;
    let mut buf = vec![0u8; 4096];
    view.read(7 * MIB, &mut buf).await.unwrap();
    assert!(buf.iter().all(|&b| b == 0x3c));
    view.disconnect().await.unwrap();
    assert_eq!(
        repo.manifest(VM).operations.len(),
        1,
        "the record is kept until the restore is finished"
    );

    // cleanup finishes it: streaming completes and the repository is detached.
    let socket = vm.socket();
    let cleaned = repo
        .run(VM, &["cleanup", "--socket", socket.to_str().unwrap(), "--json"])
        .success();
    // The printed shape: the cleanup report's documented keys (those printed when empty too), so a renamed
    // field is caught.
    cli::assert_keys(
        &cleaned.json(),
        &[
            "operations",
            "jobs",
            "block_nodes",
            "bitmaps",
            "files",
            "failed_nodes",
            "pending",
            "kept_outside",
            "mounts",
        ],
    );
    let cleaned: CleanupReport = cleaned.report();
    assert_eq!(cleaned.cleaned.operations.len(), 1, "{cleaned:?}");
    assert!(repo.manifest(VM).operations.is_empty());
    let expected = work.path().join("expected");
    restore(&repo, &node, &expected, &[]).success();
    vm.qmp().execute_raw("stop", None).await.unwrap();
    image::assert_same(&expected.join("disk0.qcow2"), &vm.disk_path("disk0"));
    assert!(
        image::info(&vm.disk_path("disk0"))
            .get("backing-filename")
            .is_none()
    );
}

#[tokio::test]
async fn compressed_backups_are_hashed_through_qemu_and_restore_exactly() {
    // Compressed clusters have no place in the file that could be read directly: tables, restore and verify
    // read such chains through QEMU.
    let repo = TestRepo::init();
    let work = tempfile::tempdir().unwrap();
    let vm = TestVm::start(&sizes()).await;
    vm.write_pattern("disk0", 0x31, 0, 3 * MIB).await;
    vm.write_pattern("disk1", 0x32, MIB, MIB).await;
    let full = repo.backup_report(&vm, VM, &["--level", "full", "--compress"]);
    vm.write_pattern("disk0", 0x33, 2 * MIB, 2 * MIB).await;
    vm.write_zeroes("disk1", MIB, 64 * 1024).await;
    let refs = vm.capture_references(&DISKS, work.path(), "compressed").await;
    let inc = repo.backup_report(&vm, VM, &["--compress"]);
    assert_eq!(inc.method, "bitmap", "{inc:?}");
    let file = repo.node_file(VM, full.node.as_str(), "disk0");
    let map = image::qemu_img(&["map", "--output=json", file.to_str().unwrap()]);
    assert!(
        map.contains("\"compressed\": true") || !map.contains("\"offset\""),
        "the full is compressed: {map}"
    );
    assert_restores_exactly(&repo, inc.node.as_str(), &refs, &work.path().join("out"));
    let ok: VerifyReport = verify(&repo, &[]).success().report();
    assert!(ok.ok, "{ok:?}");
}

#[tokio::test]
async fn the_first_incremental_after_a_live_restore_copies_only_the_guests_writes() {
    let repo = TestRepo::init();
    let work = tempfile::tempdir().unwrap();
    let node = {
        let vm = TestVm::start(&sizes()).await;
        vm.write_pattern("disk0", 0x5a, 0, 8 * MIB).await;
        vm.write_pattern("disk1", 0xa5, 0, 4 * MIB).await;
        repo.backup_node(&vm, VM, &[])
    };
    let vm = TestVm::start_paused(&sizes()).await;
    // One guest write while the data streams in, one after.
    let child = start_slow_live_restore(&repo, &vm, &node).await;
    vm.write_pattern("disk0", 0x66, 2 * MIB, MIB).await;
    cli::wait(child, CLI_TIMEOUT).success();
    vm.write_pattern("disk0", 0x77, 20 * MIB, MIB).await;
    let refs = vm.capture_references(&DISKS, work.path(), "after-restore").await;
    let inc = repo.backup_report(&vm, VM, &[]);
    assert_eq!(inc.level, "incremental", "{inc:?}");
    assert_eq!(inc.method, "bitmap", "{inc:?}");
    let copied = copied_bytes(&inc);
    // The stream's own writes do not mark the new bitmap (QEMU's copy-on-read path): only the guest's do.
    assert_eq!(
        copied,
        [2 * MIB, 0],
        "only the guest's writes are copied: {inc:?}"
    );
    assert_restores_exactly(&repo, inc.node.as_str(), &refs, work.path());
}

/// No export, no NBD server and no block node of qmpbak left in `vm`'s QEMU.
async fn assert_nothing_left(vm: &TestVm) {
    let exports = vm.qmp().execute_raw("query-block-exports", None).await.unwrap();
    assert_eq!(exports, serde_json::json!([]), "leftover exports");
    // A server left running would refuse a second one.
    let socket = vm.dir().join("probe.sock");
    vm.qmp()
        .execute_raw(
            "nbd-server-start",
            Some(serde_json::json!({"addr": {"type": "unix", "data": {"path": socket}}})),
        )
        .await
        .expect("no NBD server left running");
    vm.qmp().execute_raw("nbd-server-stop", None).await.unwrap();
    let left = vm.foreign_block_nodes().await;
    assert!(left.is_empty(), "leftover {left:?}");
}

/// A live restore into a disk that holds data used to keep it under the backup's: wrong data, silently. Now
/// it is refused before anything changes, naming each disk and its allocated bytes; a zero cluster counts
/// (it hides the backing just as data does, though `base:allocation` calls it a hole).
#[tokio::test]
async fn a_live_restore_into_a_disk_that_holds_data_is_refused_and_changes_nothing() {
    let repo = TestRepo::init();
    let work = tempfile::tempdir().unwrap();
    let node = {
        let vm = TestVm::start(&sizes()).await;
        vm.write_pattern("disk0", 0x5a, 0, 16 * MIB).await;
        vm.write_pattern("disk1", 0xa5, 0, 8 * MIB).await;
        repo.backup_node(&vm, VM, &[])
    };
    let before = repo.manifest(VM);
    let vm = TestVm::start_paused(&sizes()).await;
    vm.write_zeroes("disk0", 4 * MIB, MIB).await;
    vm.write_pattern("disk1", 0x77, 3 * MIB, 64 * 1024).await;
    for disk in DISKS {
        vm.qemu_io(disk, "flush").await;
    }
    let refs = vm.capture_references(&DISKS, work.path(), "before").await;

    let out = cli::run_owned(&live_args(&repo, &vm, &node, &[]));
    assert_eq!(out.code(), Some(2), "{out:?}");
    assert!(
        out.stderr.contains("disk disk0 has 1048576 bytes allocated"),
        "{out:?}"
    );
    assert!(
        out.stderr.contains("disk disk1 has 65536 bytes allocated"),
        "{out:?}"
    );

    assert!(!vm.running().await, "the VM stays paused");
    let after = vm.capture_references(&DISKS, work.path(), "after").await;
    for (b, a) in refs.iter().zip(&after) {
        image::assert_same(b, a);
    }
    assert_nothing_left(&vm).await;
    let manifest = repo.manifest(VM);
    assert_eq!(manifest.current, before.current);
    assert!(manifest.operations.is_empty());
    assert_eq!(manifest.nodes.len(), before.nodes.len());
}

/// Another tool's NBD server in the VM's QEMU: the emptiness check cannot read through it (QMP does not say
/// where it listens), so the live restore is refused, and that server keeps running with its export.
#[tokio::test]
async fn a_live_restore_leaves_another_tools_nbd_server_alone_and_is_refused() {
    let repo = TestRepo::init();
    let node = {
        let vm = TestVm::start(&sizes()).await;
        vm.write_pattern("disk0", 0x5a, 0, MIB).await;
        repo.backup_node(&vm, VM, &[])
    };
    let vm = TestVm::start_paused(&sizes()).await;
    let view = guest_view(&vm, "disk0").await;
    let out = cli::run_owned(&live_args(&repo, &vm, &node, &[]));
    assert_eq!(out.code(), Some(5), "{out:?}");
    assert!(out.stderr.contains("another NBD server"), "{out:?}");
    assert!(!vm.running().await, "the VM stays paused");
    // The other server and its export still serve.
    let mut buf = vec![0u8; 4096];
    view.read(0, &mut buf).await.unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    let exports = vm.qmp().execute_raw("query-block-exports", None).await.unwrap();
    assert_eq!(exports.as_array().unwrap().len(), 1, "{exports}");
    view.disconnect().await.unwrap();
    assert!(repo.manifest(VM).operations.is_empty());
}

/// qmpbak killed while the emptiness check's NBD server and export are in the VM's QEMU (issue 19): they used
/// to stay there, unknown to any later run, and the next live restore was refused ("another NBD server").
/// Now their operation record makes `cleanup` remove them, and also the next live restore itself (its
/// recovery), which then restores exactly.
#[tokio::test]
async fn killed_during_the_emptiness_check_the_next_run_or_cleanup_removes_its_nbd_server() {
    let repo = TestRepo::init();
    let work = tempfile::tempdir().unwrap();
    let node = {
        let vm = TestVm::start(&sizes()).await;
        vm.write_pattern("disk0", 0x3d, 0, 4 * MIB).await;
        vm.write_pattern("disk1", 0x4e, 2 * MIB, MIB).await;
        repo.backup_node(&vm, VM, &[])
    };
    let expected = work.path().join("expected");
    restore(&repo, &node, &expected, &[]).success();
    let vm = TestVm::start_paused(&sizes()).await;
    let args = live_args(&repo, &vm, &node, &[]);
    let killed = |what: &str| {
        cli::run_crashing_at(&args, "restore-checking-empty", CLI_CRASH_TIMEOUT)
            .assert_crashed_at("restore-checking-empty");
        let ops = repo.manifest(VM).operations;
        assert_eq!(ops.len(), 1, "{what}: {ops:?}");
        assert_eq!(ops[0].payload, chain::Payload::EmptyCheck {}, "{what}");
    };
    killed("first kill");
    assert!(!vm.running().await, "the VM stays paused");
    let exports = vm.qmp().execute_raw("query-block-exports", None).await.unwrap();
    assert_eq!(
        exports.as_array().unwrap().len(),
        1,
        "the check's export: {exports}"
    );

    let socket = vm.socket();
    let cleaned: CleanupReport = repo
        .run(VM, &["cleanup", "--socket", socket.to_str().unwrap(), "--json"])
        .success()
        .report();
    assert_eq!(cleaned.cleaned.operations.len(), 1, "{cleaned:?}");
    assert!(repo.manifest(VM).operations.is_empty());
    assert_nothing_left(&vm).await;

    // Killed again; this time the next live restore finds the record and removes them itself.
    killed("second kill");
    let report: LiveReport = cli::run_owned(&args).success().report();
    assert_eq!(report.node, node);
    assert!(repo.manifest(VM).operations.is_empty());
    vm.qmp().execute_raw("stop", None).await.unwrap();
    for disk in DISKS {
        image::assert_same(&expected.join(format!("{disk}.qcow2")), &vm.disk_path(disk));
        assert!(image::info(&vm.disk_path(disk)).get("backing-filename").is_none());
    }
    assert_nothing_left(&vm).await;
}

/// SIGINT while the emptiness check's NBD server and export are up: the check removes them and the run stops
/// with exit 130 before anything in the VM changes (still paused, disks empty, no record).
#[tokio::test]
async fn interrupted_during_the_emptiness_check_the_restore_stops_before_changing_anything() {
    let repo = TestRepo::init();
    let node = {
        let vm = TestVm::start(&sizes()).await;
        vm.write_pattern("disk0", 0x3d, 0, MIB).await;
        repo.backup_node(&vm, VM, &[])
    };
    let vm = TestVm::start_paused(&sizes()).await;
    let args = live_args(&repo, &vm, &node, &[]);
    let paused = cli::run_paused_at(&args, "restore-checking-empty", &[], None);
    paused.signal(nix::sys::signal::Signal::SIGINT);
    paused.signal(nix::sys::signal::Signal::SIGUSR1);
    let out = paused.finish();
    assert_eq!(out.code(), Some(130), "{out:?}");
    assert!(out.stderr.contains("before anything changed"), "{out:?}");
    assert!(!vm.running().await, "the VM stays paused");
    for disk in DISKS {
        assert_eq!(image::allocated_data_bytes(&vm.disk_path(disk)), 0);
    }
    assert!(repo.manifest(VM).operations.is_empty());
    assert_nothing_left(&vm).await;
}

/// The stream of a live restore marks no bitmap, so a qmpbak bitmap the empty target disks already carried (a
/// copy of the disks taken while they were empty carries the full's) would say that nothing changed since that
/// backup: a differential on it missed all the restored data, silently. The restore removes them; the next
/// differential is exact.
#[tokio::test]
async fn a_live_restore_removes_the_bitmaps_its_empty_disks_carried() {
    let repo = TestRepo::init();
    let work = tempfile::tempdir().unwrap();
    let (node, carried) = {
        let vm = TestVm::start(&sizes()).await;
        repo.backup_node(&vm, VM, &[]);
        let carried = vm.bitmaps().await;
        vm.write_pattern("disk0", 0xbb, 8 * MIB, MIB).await;
        vm.write_pattern("disk1", 0xcc, 0, 2 * MIB).await;
        (repo.backup_node(&vm, VM, &[]), carried)
    };
    assert!(
        carried.iter().any(|(_, name)| name.contains("-diff-")),
        "{carried:?}"
    );
    let vm = TestVm::start_paused(&sizes()).await;
    for (node_name, name) in &carried {
        vm.qmp()
            .execute_raw(
                "block-dirty-bitmap-add",
                Some(serde_json::json!({ "node": node_name, "name": name, "persistent": true })),
            )
            .await
            .unwrap();
    }
    cli::run_owned(&live_args(&repo, &vm, &node, &[])).success();
    let left = vm.bitmaps().await;
    for stale in &carried {
        assert!(!left.contains(stale), "{stale:?} is still there: {left:?}");
    }
    vm.write_pattern("disk0", 0xdd, 20 * MIB, MIB).await;
    let refs = vm.capture_references(&DISKS, work.path(), "after-restore").await;
    let diff = repo.backup_report(&vm, VM, &["--level", "diff"]);
    assert_restores_exactly(&repo, diff.node.as_str(), &refs, work.path());
}
