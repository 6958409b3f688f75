//! `qmpbak backup --pull` against real QEMU: the VM's QEMU exports point-in-time views of its disks over NBD on
//! loopback TCP with TLS (x509 credentials made with rcgen), qmpbak reads them and writes the nodes itself.
//! Every node equals a reference captured at its instant, restores and verifies; a wrong CA or a missing
//! --tls-dir is a clear error that leaves nothing behind; a kill at each new step is cleaned up by the next run,
//! which loses no change.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use integration_tests::pki::{TestPki, free_port};
use integration_tests::repo::{BackupReport, TestRepo, assert_no_leftovers, expected_bitmaps};
use integration_tests::timeouts::{CLI_TIMEOUT, PROCESS_EXIT_TIMEOUT};
use integration_tests::{MIB, TestVm, cli, image};

const VM: &str = "vm1";
const DISKS: [&str; 2] = ["disk0", "disk1"];

/// A VM with two disks and server credentials `tls0`.
async fn tls_vm(pki: &TestPki) -> TestVm {
    TestVm::builder()
        .disk("disk0", 32 * MIB)
        .disk("disk1", 16 * MIB)
        .arg("-object")
        .arg(&pki.server_object("tls0"))
        .start()
        .await
}

/// The arguments of a pull over TLS with the client credentials `creds` on `port`.
fn pull_args(pki: &TestPki, creds: &str, port: u16) -> Vec<String> {
    vec![
        "--pull".into(),
        "--nbd-listen".into(),
        format!("127.0.0.1:{port}"),
        "--tls-dir".into(),
        pki.path(creds).display().to_string(),
    ]
}

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

fn assert_node_equals(repo: &TestRepo, node: &str, refs: &[PathBuf]) {
    for (disk, reference) in DISKS.iter().zip(refs) {
        image::assert_same(reference, &repo.node_file(VM, node, disk));
    }
}

/// Restores `node` offline and compares each disk with its reference.
fn assert_restores(repo: &TestRepo, node: &str, refs: &[PathBuf]) {
    let out = tempfile::tempdir().unwrap();
    let restored = out.path().join("r");
    repo.run(VM, &["restore", node, "--to", restored.to_str().unwrap()])
        .success();
    for (disk, reference) in DISKS.iter().zip(refs) {
        image::assert_same(reference, &restored.join(format!("{disk}.qcow2")));
    }
}

async fn assert_no_exports(vm: &TestVm) {
    let exports = vm.qmp().execute_raw("query-block-exports", None).await.unwrap();
    assert_eq!(
        exports.as_array().map(Vec::len),
        Some(0),
        "leftover exports: {exports}"
    );
}

/// Runs a successful pull of `vm` with the extra environment `env` and returns its report, after checking that
/// it read the view `view` (`copy-before-write` or `fleece`).
#[track_caller]
fn backup_env(repo: &TestRepo, vm: &TestVm, args: &[&str], env: &[(&str, &str)], view: &str) -> BackupReport {
    let mut cmd = cli::command_owned(&repo.backup_args(vm, VM, args));
    cmd.envs(env.iter().copied());
    let report: BackupReport = cli::wait(cmd.spawn().unwrap(), CLI_TIMEOUT).success().report();
    assert_eq!(report.view.as_deref(), Some(view), "{report:?}");
    report
}

/// The environment that makes a pull use the fleece where QEMU has copy-before-write.
const FLEECE: [(&str, &str); 1] = [("QMPBAK_VIEW", "fleece")];
const CBW: &str = "copy-before-write";

fn pulled(report: &BackupReport, disk: usize) -> u64 {
    report.disks[disk]
        .pulled_bytes
        .unwrap_or_else(|| panic!("no pulled_bytes: {report:?}"))
}

#[tokio::test]
async fn pull_full_incremental_differential_and_checksum_diff_over_tls_are_exact() {
    pull_every_level(&[], CBW).await;
}

#[tokio::test]
async fn pull_every_level_with_the_fleece_view_is_exact() {
    pull_every_level(&FLEECE, "fleece").await;
}

async fn pull_every_level(env: &[(&str, &str)], view: &str) {
    let pki = TestPki::loopback();
    let port = free_port();
    let args = pull_args(&pki, "client", port);
    let vm = tls_vm(&pki).await;
    let repo = TestRepo::init();
    let refs_dir = tempfile::tempdir().unwrap();
    vm.write_pattern("disk0", 0x11, 0, 4 * MIB).await;
    vm.write_pattern("disk1", 0x22, 2 * MIB, MIB).await;
    // 64 KiB alone in a block of holes.
    vm.write_pattern("disk1", 0x23, 10 * MIB + 128 * 1024, 64 * 1024)
        .await;

    let full_refs = vm.capture_references(&DISKS, refs_dir.path(), "full").await;
    let full = backup_env(&repo, &vm, &strs(&args), env, view);
    assert_eq!(
        (full.level.as_ref(), full.method.as_ref()),
        ("full", "full"),
        "{full:?}"
    );
    let full_id = full.node.clone();
    assert_node_equals(&repo, &full_id, &full_refs);
    // Only the allocated extents crossed the connection.
    assert_eq!(
        (pulled(&full, 0), pulled(&full, 1)),
        (4 * MIB, MIB + 64 * 1024),
        "{full:?}"
    );
    // And only they were written: the holes of a block with data stay holes in the full's file.
    assert_eq!(
        (full.disks[0].copied_bytes, full.disks[1].copied_bytes),
        (4 * MIB, MIB + 64 * 1024),
        "{full:?}"
    );

    vm.write_pattern("disk0", 0x33, 8 * MIB + 4096, 512 * 1024).await;
    vm.write_zeroes("disk0", 0, MIB).await;
    // Inside a block of the full's data: the rest of the block comes from the parent.
    vm.write_pattern("disk0", 0x37, MIB + 128 * 1024, 64 * 1024).await;
    vm.write_pattern("disk1", 0x44, 0, 64 * 1024).await;
    let inc_refs = vm.capture_references(&DISKS, refs_dir.path(), "inc").await;
    let inc = backup_env(&repo, &vm, &strs(&args), env, view);
    assert_eq!(
        (inc.level.as_ref(), inc.method.as_ref()),
        ("incremental", "bitmap"),
        "{inc:?}"
    );
    let inc_id = inc.node.clone();
    assert_node_equals(&repo, &inc_id, &inc_refs);
    // Only the dirty extents cross the connection (the bitmap's 64 KiB granularity; the zeroed block is a hole
    // in the view): the rest of each touched block is the parent's, read locally.
    assert_eq!(
        (pulled(&inc, 0), pulled(&inc, 1)),
        (640 * 1024, 64 * 1024),
        "{inc:?}"
    );
    // And only the dirty ranges of the changed blocks are written into the node (the zeroed MiB as zeroes):
    // the clean rest of a block reads as the parent's there already, through the node file's backing.
    assert_eq!(
        (inc.disks[0].copied_bytes, inc.disks[1].copied_bytes),
        (576 * 1024 + MIB + 64 * 1024, 64 * 1024),
        "{inc:?}"
    );

    vm.write_pattern("disk1", 0x55, 5 * MIB, MIB).await;
    let diff_refs = vm.capture_references(&DISKS, refs_dir.path(), "diff").await;
    let diff = backup_env(
        &repo,
        &vm,
        &[&["--level", "diff"], strs(&args).as_slice()].concat(),
        env,
        view,
    );
    assert_eq!(diff.level, "differential", "{diff:?}");
    assert_eq!(diff.parent.as_ref(), Some(&full_id), "{diff:?}");
    let diff_id = diff.node.clone();
    assert_node_equals(&repo, &diff_id, &diff_refs);

    // QEMU dies after a stop: its bitmaps come back inconsistent, and the next pull compares tables.
    vm.qmp().execute_raw("stop", None).await.unwrap();
    vm.qmp().execute_raw("cont", None).await.unwrap();
    let vm = vm.restart().await;
    vm.write_pattern("disk0", 0x66, 2 * MIB, MIB).await;
    // A hole in a block of the parent's data: the checksum-diff writes it as zeros, or the parent's data would
    // show through.
    vm.write_zeroes("disk1", 2 * MIB + 256 * 1024, 64 * 1024).await;
    let cd_refs = vm.capture_references(&DISKS, refs_dir.path(), "cd").await;
    repo.cache_images(VM);
    let cd = backup_env(&repo, &vm, &strs(&args), env, view);
    assert_eq!(cd.method, "checksum-diff", "{cd:?}");
    let cd_id = cd.node.clone();
    assert_node_equals(&repo, &cd_id, &cd_refs);
    assert_eq!(cd.disks[0].copied_bytes, MIB, "{cd:?}");

    for (id, refs) in [
        (&full_id, &full_refs),
        (&inc_id, &inc_refs),
        (&diff_id, &diff_refs),
        (&cd_id, &cd_refs),
    ] {
        assert_restores(&repo, id, refs);
    }
    // Each table is the node's disk's (so that of its reference, which the node equals).
    repo.run(VM, &["verify"]).success();
    let manifest = repo.manifest(VM);
    // Every pulled disk names the host that served it (QEMU on this host: a Unix QMP socket).
    for n in &manifest.nodes {
        for d in &n.disks {
            assert_eq!(
                d.source_host.as_deref(),
                Some(d.location.host.as_str()),
                "{}",
                n.id
            );
        }
    }
    assert_no_leftovers(&vm, &expected_bitmaps(&manifest, &cd_id, &full_id)).await;
    assert_no_exports(&vm).await;
    vm.assert_scratch_empty("disk0");
}

#[tokio::test]
async fn guest_writes_during_a_pull_are_not_in_the_node_and_are_in_the_next() {
    guest_writes_during_a_pull(&[], CBW).await;
}

#[tokio::test]
async fn guest_writes_during_a_fleece_pull_are_not_in_the_node_and_are_in_the_next() {
    guest_writes_during_a_pull(&FLEECE, "fleece").await;
}

async fn guest_writes_during_a_pull(env: &[(&str, &str)], view: &str) {
    let pki = TestPki::loopback();
    let port = free_port();
    let args = pull_args(&pki, "client", port);
    let vm = tls_vm(&pki).await;
    let repo = TestRepo::init();
    let refs_dir = tempfile::tempdir().unwrap();
    vm.write_pattern("disk0", 0x11, 0, 4 * MIB).await;
    backup_env(&repo, &vm, &strs(&args), env, view);
    vm.write_pattern("disk0", 0x22, 6 * MIB, MIB).await;
    let refs = vm.capture_references(&DISKS, refs_dir.path(), "at").await;

    // Held after the views are exported: the guest overwrites data the pull has yet to read.
    let inc_args = repo.backup_args(&vm, VM, &strs(&args));
    let env_paths: Vec<(&str, &Path)> = env.iter().map(|(k, v)| (*k, Path::new(*v))).collect();
    let paused = cli::run_paused_at(&inc_args, "pull-exported", &env_paths, None);
    vm.write_pattern("disk0", 0x33, 0, 8 * MIB).await;
    vm.write_pattern("disk1", 0x44, 0, 2 * MIB).await;
    let after = vm.capture_references(&DISKS, refs_dir.path(), "after").await;
    paused.signal(nix::sys::signal::Signal::SIGUSR1);
    let inc: BackupReport = paused.finish().success().report();
    assert_eq!(inc.view.as_deref(), Some(view), "{inc:?}");
    assert_node_equals(&repo, inc.node.as_str(), &refs);
    assert_restores(&repo, inc.node.as_str(), &refs);

    let next = backup_env(&repo, &vm, &strs(&args), env, view);
    assert_eq!(next.method, "bitmap", "{next:?}");
    assert_node_equals(&repo, next.node.as_str(), &after);
    assert_restores(&repo, next.node.as_str(), &after);
    assert!(vm.running().await);
}

/// A VM the user paused stays paused through a copy-before-write pull (the run pauses only a running VM, and
/// resumes only what it paused).
#[tokio::test]
async fn a_pull_of_a_paused_vm_leaves_it_paused() {
    let pki = TestPki::loopback();
    let args = pull_args(&pki, "client", free_port());
    let vm = tls_vm(&pki).await;
    let repo = TestRepo::init();
    let refs_dir = tempfile::tempdir().unwrap();
    vm.write_pattern("disk0", 0x11, 0, MIB).await;
    vm.qmp().execute_raw("stop", None).await.unwrap();
    let refs = vm.capture_references(&DISKS, refs_dir.path(), "full").await;
    let full = backup_env(&repo, &vm, &strs(&args), &[], CBW);
    assert_node_equals(&repo, full.node.as_str(), &refs);
    assert!(!vm.running().await, "the pull resumed a VM the user paused");
    vm.qmp().execute_raw("cont", None).await.unwrap();
    assert!(vm.running().await);
}

/// Killed with the VM paused for the instant, or with the devices on the filters: `cleanup` puts every device
/// back on its node and resumes the VM; the guest's writes then reach the disk images, no qmpbak node stays,
/// and the next pull is exact.
#[tokio::test]
async fn a_pull_killed_while_the_vm_is_paused_or_switched_is_undone_by_cleanup() {
    let pki = TestPki::loopback();
    let args = pull_args(&pki, "client", free_port());
    let vm = tls_vm(&pki).await;
    let repo = TestRepo::init();
    let refs_dir = tempfile::tempdir().unwrap();
    vm.write_pattern("disk0", 0x11, 0, 2 * MIB).await;
    let full_id = backup_env(&repo, &vm, &strs(&args), &[], CBW).node;
    let before = vm.attached().await;
    let socket = vm.socket().display().to_string();
    for (round, point) in ["view-vm-paused", "view-drives-switched"].into_iter().enumerate() {
        let crashed = cli::run_crashing_at(
            &repo.backup_args(&vm, VM, &strs(&args)),
            point,
            PROCESS_EXIT_TIMEOUT,
        );
        crashed.assert_crashed_at(point);
        assert!(!vm.running().await, "{point}: the VM runs");
        if point == "view-drives-switched" {
            let now = vm.attached().await;
            assert!(
                now.iter().all(|(_, drv)| drv == "copy-before-write"),
                "{point}: {now:?}"
            );
        }
        let out = repo.run(VM, &["cleanup", "--socket", &socket]).success();
        assert!(out.stdout.contains("resumed the VM"), "{}", out.stdout);
        assert!(vm.running().await, "{point}: cleanup did not resume the VM");
        assert_eq!(vm.attached().await, before, "{point}");
        assert!(repo.manifest(VM).operations.is_empty());
        // The guest's writes reach the image files.
        let round = u8::try_from(round).unwrap();
        vm.write_pattern("disk1", 0x40 + round, u64::from(round) * MIB, MIB)
            .await;
    }
    let manifest = repo.manifest(VM);
    assert_no_leftovers(&vm, &expected_bitmaps(&manifest, &full_id, &full_id)).await;
    vm.assert_scratch_empty("disk0");
    let refs = vm.capture_references(&DISKS, refs_dir.path(), "next").await;
    // disk1's image file holds both writes (the reference is read from the image file).
    image::assert_pattern(&refs[1], 0, MIB, 0x40);
    image::assert_pattern(&refs[1], MIB, MIB, 0x41);
    let inc = backup_env(&repo, &vm, &strs(&args), &[], CBW);
    assert_eq!(inc.method, "bitmap", "{inc:?}");
    assert_node_equals(&repo, inc.node.as_str(), &refs);
}

/// A copy-before-write target that fails every write (blkdebug) breaks the view, never the guest's write: the
/// guest's write during the pull reaches the disk, the pull fails clearly and leaves nothing, and the next pull
/// has the write.
#[tokio::test]
async fn a_failing_view_fails_the_pull_and_never_the_guest_write() {
    let pki = TestPki::loopback();
    let args = pull_args(&pki, "client", free_port());
    let vm = tls_vm(&pki).await;
    let repo = TestRepo::init();
    let refs_dir = tempfile::tempdir().unwrap();
    vm.write_pattern("disk0", 0x11, 0, 4 * MIB).await;
    let full_id = backup_env(&repo, &vm, &strs(&args), &[], CBW).node;
    vm.write_pattern("disk0", 0x22, 6 * MIB, MIB).await;
    let paused = cli::run_paused_at(
        &repo.backup_args(&vm, VM, &strs(&args)),
        "pull-exported",
        &[("QMPBAK_INJECT_SCRATCH_EIO", Path::new("1"))],
        None,
    );
    // Overwrites data the pull has yet to read: the old data cannot be copied out.
    vm.write_pattern("disk0", 0x33, 0, 8 * MIB).await;
    paused.signal(nix::sys::signal::Signal::SIGUSR1);
    let out = paused.finish();
    assert_ne!(out.code(), Some(0), "{out:?}");
    assert!(out.stderr.contains("disk0"), "{}", out.stderr);
    assert!(vm.running().await);
    let manifest = repo.manifest(VM);
    assert!(manifest.operations.is_empty(), "{:?}", manifest.operations);
    assert_no_leftovers(&vm, &expected_bitmaps(&manifest, &full_id, &full_id)).await;
    assert_no_exports(&vm).await;
    let refs = vm.capture_references(&DISKS, refs_dir.path(), "after").await;
    image::assert_pattern(&refs[0], 0, 8 * MIB, 0x33);
    let inc = backup_env(&repo, &vm, &strs(&args), &[], CBW);
    assert_eq!(inc.method, "bitmap", "{inc:?}");
    assert_node_equals(&repo, inc.node.as_str(), &refs);
}

#[tokio::test]
async fn a_wrong_ca_or_no_credentials_is_a_clear_error_and_leaves_nothing() {
    let pki = TestPki::loopback();
    let port = free_port();
    let vm = tls_vm(&pki).await;
    let repo = TestRepo::init();
    vm.write_pattern("disk0", 0x11, 0, MIB).await;

    let wrong = repo.try_backup(&vm, VM, &strs(&pull_args(&pki, "client-wrong-ca", port)));
    assert_ne!(wrong.code(), Some(0), "{wrong:?}");
    assert!(
        wrong.stderr.to_lowercase().contains("certificate"),
        "{}",
        wrong.stderr
    );
    let port_s = format!("127.0.0.1:{port}");
    let plain = repo.try_backup(&vm, VM, &["--pull", "--nbd-listen", &port_s]);
    assert_eq!(plain.code(), Some(2), "{plain:?}");
    assert!(plain.stderr.contains("--tls-dir"), "{}", plain.stderr);
    let manifest = repo.manifest(VM);
    assert!(
        manifest
            .nodes
            .iter()
            .all(|n| n.state != chain::NodeState::Complete),
        "a node was completed"
    );
    assert!(manifest.operations.is_empty(), "{:?}", manifest.operations);
    for n in &manifest.nodes {
        for d in DISKS {
            assert!(
                !repo.node_file(VM, n.id.as_str(), d).exists(),
                "node file of {} left",
                n.id
            );
        }
    }
    assert_no_leftovers(&vm, &[]).await;
    assert_no_exports(&vm).await;

    // Plaintext when asked for, then TLS with the right credentials.
    let plain = repo.backup_report(
        &vm,
        VM,
        &["--pull", "--nbd-listen", &port_s, "--insecure-plaintext"],
    );
    assert_eq!(plain.level, "full", "{plain:?}");
    let ok = repo.backup_report(&vm, VM, &strs(&pull_args(&pki, "client", port)));
    assert_eq!(ok.level, "incremental", "{ok:?}");
}

#[tokio::test]
async fn a_pull_killed_at_each_step_is_cleaned_up_and_loses_no_change() {
    let pki = TestPki::loopback();
    let port = free_port();
    let args = pull_args(&pki, "client", port);
    let vm = tls_vm(&pki).await;
    let repo = TestRepo::init();
    let refs_dir = tempfile::tempdir().unwrap();
    vm.write_pattern("disk0", 0x11, 0, 2 * MIB).await;
    let full = repo.backup_report(&vm, VM, &strs(&args));
    let full_id = full.node.clone();
    let before = vm.attached().await;

    for (round, point) in [
        "pull-recorded",
        "pull-scratch-added",
        "view-vm-paused",
        "view-drives-switched",
        "pull-view-started",
        "pull-server-started",
        "pull-exported",
        "pull-copied",
    ]
    .into_iter()
    .enumerate()
    {
        let round = u8::try_from(round).unwrap();
        vm.write_pattern("disk0", 0x20 + round, (4 + u64::from(round)) * MIB, 256 * 1024)
            .await;
        let crashed = cli::run_crashing_at(
            &repo.backup_args(&vm, VM, &strs(&args)),
            point,
            PROCESS_EXIT_TIMEOUT,
        );
        crashed.assert_crashed_at(point);
    }
    // The last one (killed after the copy, its server and exports still there) is cleaned up by `cleanup`.
    let socket = vm.socket().display().to_string();
    repo.run(VM, &["cleanup", "--socket", &socket]).success();
    assert!(repo.manifest(VM).operations.is_empty());
    assert_no_exports(&vm).await;
    vm.assert_scratch_empty("disk0");
    // Every device is back on its own node (never a filter of a killed run under the next one's), and runs.
    assert_eq!(vm.attached().await, before);
    assert!(vm.running().await);
    let refs = vm.capture_references(&DISKS, refs_dir.path(), "last").await;
    let inc = repo.backup_report(&vm, VM, &strs(&args));
    assert_eq!(inc.method, "bitmap", "{inc:?}");
    assert_eq!(inc.parent.as_ref(), Some(&full_id), "{inc:?}");
    assert_node_equals(&repo, inc.node.as_str(), &refs);
    let manifest = repo.manifest(VM);
    assert!(manifest.operations.is_empty(), "{:?}", manifest.operations);
    assert_no_leftovers(&vm, &expected_bitmaps(&manifest, inc.node.as_str(), &full_id)).await;
    assert_no_exports(&vm).await;
    vm.assert_scratch_empty("disk0");
}

#[tokio::test]
async fn an_interrupted_pull_exits_130_and_leaves_nothing() {
    let pki = TestPki::loopback();
    let port = free_port();
    let args = pull_args(&pki, "client", port);
    let vm = tls_vm(&pki).await;
    let repo = TestRepo::init();
    let refs_dir = tempfile::tempdir().unwrap();
    vm.write_pattern("disk0", 0x11, 0, 2 * MIB).await;
    let full_id = repo.backup_node(&vm, VM, &strs(&args));
    vm.write_pattern("disk1", 0x22, MIB, MIB).await;

    let paused = cli::run_paused_at(
        &repo.backup_args(&vm, VM, &strs(&args)),
        "pull-exported",
        &[],
        None,
    );
    paused.signal(nix::sys::signal::Signal::SIGINT);
    let out = paused.finish();
    assert_eq!(out.code(), Some(130), "{out:?}");
    assert!(out.stderr.contains("interrupted"), "{out:?}");
    let manifest = repo.manifest(VM);
    assert!(manifest.operations.is_empty(), "{:?}", manifest.operations);
    assert_eq!(
        manifest.current.as_ref().map(chain::NodeId::as_str),
        Some(full_id.as_str())
    );
    assert_no_leftovers(&vm, &expected_bitmaps(&manifest, &full_id, &full_id)).await;
    assert_no_exports(&vm).await;
    vm.assert_scratch_empty("disk0");

    // No change lost: the next incremental has disk1's write.
    let refs = vm.capture_references(&DISKS, refs_dir.path(), "next").await;
    let inc = repo.backup_report(&vm, VM, &strs(&args));
    assert_eq!(inc.method, "bitmap", "{inc:?}");
    assert_node_equals(&repo, inc.node.as_str(), &refs);
}

#[tokio::test]
async fn a_pull_whose_nbd_server_goes_away_fails_clearly_and_the_next_is_exact() {
    let pki = TestPki::loopback();
    let port = free_port();
    let args = pull_args(&pki, "client", port);
    let vm = tls_vm(&pki).await;
    let repo = TestRepo::init();
    let refs_dir = tempfile::tempdir().unwrap();
    vm.write_pattern("disk0", 0x11, 0, 2 * MIB).await;
    let full_id = repo.backup_node(&vm, VM, &strs(&args));
    vm.write_pattern("disk0", 0x22, 3 * MIB, MIB).await;

    // The connection is gone before qmpbak reads (as if the network dropped): the server stops.
    let paused = cli::run_paused_at(
        &repo.backup_args(&vm, VM, &strs(&args)),
        "pull-exported",
        &[],
        None,
    );
    vm.qmp().execute_raw("nbd-server-stop", None).await.unwrap();
    paused.signal(nix::sys::signal::Signal::SIGUSR1);
    let out = paused.finish();
    assert_ne!(out.code(), Some(0), "{out:?}");
    assert!(
        out.stderr.contains("connecting to the NBD export"),
        "{}",
        out.stderr
    );
    let manifest = repo.manifest(VM);
    assert!(manifest.operations.is_empty(), "{:?}", manifest.operations);
    assert_no_leftovers(&vm, &expected_bitmaps(&manifest, &full_id, &full_id)).await;
    vm.assert_scratch_empty("disk0");

    let refs = vm.capture_references(&DISKS, refs_dir.path(), "next").await;
    let inc = repo.backup_report(&vm, VM, &strs(&args));
    assert_eq!(inc.method, "bitmap", "{inc:?}");
    assert_node_equals(&repo, inc.node.as_str(), &refs);
}

/// A repository on a filesystem without O_DIRECT (the local daemon refuses the direct open): the node files are
/// written through the page cache instead, and say so at -v; every node is exact.
#[tokio::test]
async fn a_pull_into_a_filesystem_without_o_direct_is_written_buffered_and_exact() {
    let pki = TestPki::loopback();
    let port = free_port();
    let vm = tls_vm(&pki).await;
    let repo = TestRepo::init();
    let refs_dir = tempfile::tempdir().unwrap();
    let pull = pull_args(&pki, "client", port);
    let args = [strs(&pull), vec!["-v"]].concat();
    for (round, pattern) in [(0u64, 0x61u8), (1, 0x62)] {
        vm.write_pattern("disk0", pattern, round * 3 * MIB + 4096, 2 * MIB)
            .await;
        vm.write_pattern("disk1", pattern, round * MIB, 64 * 1024).await;
        let refs = vm
            .capture_references(&DISKS, refs_dir.path(), &format!("r{round}"))
            .await;
        let mut cmd = cli::command_owned(&repo.backup_args(&vm, VM, &args));
        cmd.env("QMPBAK_INJECT_NO_ODIRECT", "1");
        let out = cli::wait(cmd.spawn().unwrap(), CLI_TIMEOUT).success();
        assert!(
            out.stderr.contains("written through the page cache"),
            "{}",
            out.stderr
        );
        let report: BackupReport = out.report();
        assert_eq!(
            report.level,
            if round == 0 { "full" } else { "incremental" },
            "{report:?}"
        );
        assert_node_equals(&repo, &report.node, &refs);
    }
    repo.run(VM, &["verify"]).success();
}

#[tokio::test]
async fn a_pull_into_an_encrypted_repository_is_encrypted_exact_and_verifies() {
    let pki = TestPki::loopback();
    let port = free_port();
    let vm = tls_vm(&pki).await;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("repo.key");
    std::fs::write(&key, b"0123456789abcdef0123456789abcdef\n").unwrap();
    let path = dir.path().join("repo");
    cli::run(&[
        "init",
        "--encrypt",
        "--key-file",
        key.to_str().unwrap(),
        path.to_str().unwrap(),
    ])
    .success();
    let repo = TestRepo::at(path);
    let key_args = ["--key-file", key.to_str().unwrap()];
    let pull = pull_args(&pki, "client", port);
    let args = [strs(&pull), key_args.to_vec()].concat();
    let refs_dir = tempfile::tempdir().unwrap();

    vm.write_pattern("disk0", 0x5a, 0, 2 * MIB).await;
    let full_refs = vm.capture_references(&DISKS, refs_dir.path(), "full").await;
    let full_id = repo.backup_node(&vm, VM, &args);
    vm.write_pattern("disk0", 0x5a, 4 * MIB, MIB).await;
    vm.write_pattern("disk1", 0x5b, 0, MIB).await;
    let inc_refs = vm.capture_references(&DISKS, refs_dir.path(), "inc").await;
    let inc = repo.backup_report(&vm, VM, &args);
    assert_eq!(inc.method, "bitmap", "{inc:?}");
    let inc_id = inc.node.clone();

    // Ciphertext on disk: the pattern is nowhere in the node files.
    for node in [&full_id, &inc_id] {
        let bytes = std::fs::read(repo.node_file(VM, node, "disk0")).unwrap();
        assert!(
            !bytes.windows(64).any(|w| w == [0x5a; 64]),
            "node {node} holds plaintext"
        );
    }
    repo.run(VM, &[&["verify"][..], &key_args].concat()).success();
    for (node, refs) in [(&full_id, &full_refs), (&inc_id, &inc_refs)] {
        let out = tempfile::tempdir().unwrap();
        let restored = out.path().join("r");
        repo.run(
            VM,
            &[
                &["restore", node.as_str(), "--to", restored.to_str().unwrap()][..],
                &key_args,
            ]
            .concat(),
        )
        .success();
        for (disk, reference) in DISKS.iter().zip(refs) {
            image::assert_same(reference, &restored.join(format!("{disk}.qcow2")));
        }
    }
}

#[tokio::test]
async fn a_pull_into_a_qemu_whose_nbd_server_runs_fails_and_leaves_that_server_running() {
    let pki = TestPki::loopback();
    let port = free_port();
    let vm = tls_vm(&pki).await;
    let repo = TestRepo::init();
    vm.write_pattern("disk0", 0x11, 0, MIB).await;
    let socket = vm.dir().join("someone-elses-nbd.sock");
    let theirs =
        serde_json::json!({"addr": {"type": "unix", "data": {"path": socket.display().to_string()}}});
    vm.qmp()
        .execute_raw("nbd-server-start", Some(theirs.clone()))
        .await
        .unwrap();

    let out = repo.try_backup(&vm, VM, &strs(&pull_args(&pki, "client", port)));
    assert_ne!(out.code(), Some(0), "{out:?}");
    assert!(out.stderr.contains("another NBD server"), "{}", out.stderr);
    // Still running: a second start is refused.
    let again = vm.qmp().execute_raw("nbd-server-start", Some(theirs)).await;
    assert!(again.is_err(), "the other NBD server was stopped");
    assert_no_exports(&vm).await;
    assert_no_leftovers(&vm, &[]).await;
    vm.assert_scratch_empty("disk0");
}

/// Two VMs (two QEMUs, as on two hypervisors) pulled at the same time into one repository: each VM's lock is
/// its own, both backups run at once, and every node of each equals its own references.
#[tokio::test]
async fn two_vms_pulled_at_once_into_one_repository_are_each_exact() {
    let pki = TestPki::loopback();
    let repo = TestRepo::init();
    let refs_dir = tempfile::tempdir().unwrap();
    let vms = [tls_vm(&pki).await, tls_vm(&pki).await];
    let names = ["web1", "db1"];
    let ports = [free_port(), free_port()];
    let mut refs = Vec::new();
    let mut nodes = Vec::new();
    for round in 0..2u8 {
        for (i, vm) in vms.iter().enumerate() {
            let pattern = 0x10 * (round + 1) + u8::try_from(i).unwrap();
            vm.write_pattern("disk0", pattern, u64::from(round) * 4 * MIB, 2 * MIB)
                .await;
            let label = format!("{}-{round}", names[i]);
            refs.push(vm.capture_references(&DISKS, refs_dir.path(), &label).await);
        }
        // Both pulls started before either is waited for.
        let children: Vec<_> = vms
            .iter()
            .zip(names)
            .zip(ports)
            .map(|((vm, name), port)| {
                let args = pull_args(&pki, "client", port);
                let mut cmd = cli::command_owned(&repo.backup_args(vm, name, &strs(&args)));
                cmd.spawn().expect("spawn qmpbak backup")
            })
            .collect();
        for child in children {
            let report: BackupReport = cli::wait(child, integration_tests::timeouts::CLI_TIMEOUT)
                .success()
                .report();
            nodes.push(report.node);
        }
    }
    // nodes and refs are in the same order: round 0 (web1, db1), round 1 (web1, db1).
    for (k, (node, refs)) in nodes.iter().zip(&refs).enumerate() {
        let name = names[k % 2];
        for (disk, reference) in DISKS.iter().zip(refs) {
            image::assert_same(reference, &repo.node_file(name, node, disk));
        }
    }
    for name in names {
        repo.run(name, &["verify"]).success();
        assert_eq!(repo.manifest(name).nodes.len(), 2, "{name}");
    }
}

/// Every kind of device is switched to its copy-before-write filter and back (`qom-set drive` on scsi-hd,
/// nvme, ide-hd, virtio-blk with and without id, and `-drive` disks whose nodes QEMU named): full and
/// incremental pulls are exact, guest writes during the pull are not in the node, and every device ends on
/// its own node.
#[tokio::test]
async fn every_device_kind_is_pulled_through_its_filter_and_put_back() {
    use integration_tests::Device;
    const KINDS: [(&str, Device); 7] = [
        ("sd0", Device::ScsiHd),
        ("nv0", Device::Nvme),
        ("hd0", Device::IdeHd),
        ("peripheral-anon-device0", Device::VirtioBlkNoId),
        ("virtio0", Device::DriveIfVirtio),
        ("vd0", Device::DriveVirtioBlk),
        ("drv0", Device::DriveVirtioBlkNoId),
    ];
    let pki = TestPki::loopback();
    let args = pull_args(&pki, "client", free_port());
    let mut builder = TestVm::builder();
    for (id, device) in KINDS {
        builder = builder.disk(id, 8 * MIB).device(id, device);
    }
    let vm = builder
        .arg("-object")
        .arg(&pki.server_object("tls0"))
        .start()
        .await;
    let repo = TestRepo::init();
    let refs_dir = tempfile::tempdir().unwrap();
    let ids: Vec<&str> = KINDS.iter().map(|k| k.0).collect();
    let before = vm.attached().await;
    let node_equals = |node: &str, refs: &[PathBuf]| {
        for (disk, reference) in ids.iter().zip(refs) {
            image::assert_same(reference, &repo.node_file(VM, node, disk));
        }
    };
    for (i, id) in ids.iter().enumerate() {
        vm.write_pattern(id, 0x10 + u8::try_from(i).unwrap(), 0, MIB)
            .await;
    }
    let full_refs = vm.capture_references(&ids, refs_dir.path(), "full").await;
    let full = backup_env(&repo, &vm, &strs(&args), &[], CBW);
    node_equals(full.node.as_str(), &full_refs);
    assert_eq!(vm.attached().await, before);

    for (i, id) in ids.iter().enumerate() {
        vm.write_pattern(id, 0x20 + u8::try_from(i).unwrap(), 2 * MIB, MIB)
            .await;
    }
    let refs = vm.capture_references(&ids, refs_dir.path(), "inc").await;
    let paused = cli::run_paused_at(
        &repo.backup_args(&vm, VM, &strs(&args)),
        "pull-exported",
        &[],
        None,
    );
    for id in &ids {
        vm.write_pattern(id, 0x77, 0, 4 * MIB).await;
    }
    paused.signal(nix::sys::signal::Signal::SIGUSR1);
    let inc: BackupReport = paused.finish().success().report();
    assert_eq!(
        (inc.method.as_ref(), inc.view.as_deref()),
        ("bitmap", Some(CBW)),
        "{inc:?}"
    );
    node_equals(inc.node.as_str(), &refs);
    assert_eq!(vm.attached().await, before);
    let manifest = repo.manifest(VM);
    assert!(manifest.operations.is_empty());
    assert!(vm.running().await);
}

/// A copy-before-write filter of a killed run whose record is gone (here: removed from the manifest by hand)
/// is refused with a clear error before anything is created, never stacked under a new filter.
#[tokio::test]
async fn a_leftover_filter_without_a_record_is_refused() {
    let pki = TestPki::loopback();
    let args = pull_args(&pki, "client", free_port());
    let vm = tls_vm(&pki).await;
    let repo = TestRepo::init();
    vm.write_pattern("disk0", 0x11, 0, MIB).await;
    backup_env(&repo, &vm, &strs(&args), &[], CBW);
    let crashed = cli::run_crashing_at(
        &repo.backup_args(&vm, VM, &strs(&args)),
        "view-drives-switched",
        PROCESS_EXIT_TIMEOUT,
    );
    crashed.assert_crashed_at("view-drives-switched");
    vm.qmp().execute_raw("cont", None).await.unwrap();
    repo.lose_records(VM);
    let filters = vm.attached().await;
    assert!(
        filters.iter().all(|(_, drv)| drv == "copy-before-write"),
        "{filters:?}"
    );

    repo.try_backup(&vm, VM, &strs(&args))
        .assert_failed_saying("a copy-before-write filter an earlier qmpbak run left");
    // Nothing was stacked: the devices are on the same filters.
    assert_eq!(vm.attached().await, filters);
    assert!(repo.manifest(VM).operations.is_empty());
}

/// A pull without `--nbd-listen` whose default NBD port is taken on the VM's host (another VM's pull there, or
/// any other program) has QEMU listen on the next free port, and is exact; before, it failed on "Address
/// already in use", so two VMs of one hypervisor could not be pulled at once without `--nbd-listen` each.
#[tokio::test]
async fn a_pull_whose_default_nbd_port_is_taken_listens_on_the_next_one() {
    let pki = TestPki::loopback();
    // Taken while the pull starts: by this listener, or, if it cannot bind, by whoever already holds it.
    let held = std::net::TcpListener::bind(("127.0.0.1", qmpbak_engine::backup::DEFAULT_NBD_PORT));
    let vm = tls_vm(&pki).await;
    let repo = TestRepo::init();
    let refs_dir = tempfile::tempdir().unwrap();
    vm.write_pattern("disk0", 0x5a, 0, 2 * MIB).await;
    let refs = vm.capture_references(&DISKS, refs_dir.path(), "full").await;
    let client = pki.path("client").display().to_string();
    let full = repo.backup_report(&vm, VM, &["--pull", "--tls-dir", &client]);
    assert_node_equals(&repo, &full.node, &refs);
    assert_no_exports(&vm).await;
    drop(held);
}
