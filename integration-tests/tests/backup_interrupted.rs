//! Backups that are throttled, interrupted (SIGINT), killed at each step (crash points), or contended (lock):
//! the VM keeps running, the next run cleans up what is left, and its result is exact.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use integration_tests::cli;
use integration_tests::repo::{
    BackupReport, TestRepo, any_file_named, assert_no_leftovers, expected_bitmaps,
};
use integration_tests::timeouts::{BLOCK_JOB_TIMEOUT, CLI_CRASH_TIMEOUT, CLI_TIMEOUT, PROMPT_TIMEOUT};
use integration_tests::{MIB, TestVm, image};
use qmp::EventFilter;

const VM: &str = "vm1";

/// Waits until a job of the VM reaches `running`: the backup's transaction has happened.
async fn wait_job_running(events: &mut qmp::EventStream) {
    let deadline = tokio::time::Instant::now() + BLOCK_JOB_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let event = events.next_timeout(left).await.expect("a backup job starts");
        if event.data["status"] == "running" {
            return;
        }
    }
}

#[tokio::test]
async fn writes_during_a_throttled_backup_do_not_reach_it() {
    let vm = TestVm::start(&[("disk0", 16 * MIB)]).await;
    let repo = TestRepo::init();
    let refs = tempfile::tempdir().unwrap();
    vm.write_pattern("disk0", 0x11, 0, 8 * MIB).await;
    let reference = refs.path().join("ref.qcow2");
    vm.capture_reference("disk0", &reference).await;

    let mut events = vm.qmp().subscribe(EventFilter::names(&["JOB_STATUS_CHANGE"]));
    let args = repo.backup_args(&vm, VM, &["--speed-limit", &(2 * MIB).to_string()]);
    let child = cli::command(&args.iter().map(String::as_str).collect::<Vec<_>>())
        .spawn()
        .unwrap();
    wait_job_running(&mut events).await;
    // While the job copies at 2 MiB/s, the guest overwrites all of it.
    vm.write_pattern("disk0", 0xee, 0, 16 * MIB).await;
    let out = cli::wait(child, CLI_TIMEOUT).success();
    let node = out.report::<BackupReport>().node;
    image::assert_same(&reference, &repo.node_file(VM, &node, "disk0"));
}

#[tokio::test]
async fn sigint_cancels_and_cleans_up_and_the_next_backup_is_exact() {
    let vm = TestVm::start(&[("disk0", 16 * MIB), ("disk1", 16 * MIB)]).await;
    let repo = TestRepo::init();
    let refs = tempfile::tempdir().unwrap();
    vm.write_pattern("disk0", 0x11, 0, 8 * MIB).await;
    let full = repo.backup_report(&vm, VM, &[]);
    let full_id = full.node.clone();
    vm.write_pattern("disk0", 0x22, 0, 8 * MIB).await;

    let mut events = vm.qmp().subscribe(EventFilter::names(&["JOB_STATUS_CHANGE"]));
    let args = repo.backup_args(&vm, VM, &["--speed-limit", &(MIB / 4).to_string()]);
    let child = cli::command(&args.iter().map(String::as_str).collect::<Vec<_>>())
        .spawn()
        .unwrap();
    wait_job_running(&mut events).await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap()),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let out = cli::wait(child, CLI_CRASH_TIMEOUT);
    assert_eq!(out.code(), Some(130), "{out:?}");
    assert!(out.stderr.contains("interrupted"), "{}", out.stderr);
    assert!(vm.running().await, "the VM keeps running");

    // Nothing is left: no jobs, nodes, new bitmaps, files; the node is recorded as failed.
    let manifest = repo.manifest(VM);
    assert!(manifest.operations.is_empty());
    let failed: Vec<_> = manifest
        .nodes
        .iter()
        .filter(|n| n.state == chain::NodeState::Failed)
        .collect();
    assert_eq!(failed.len(), 1);
    assert!(!repo.vm_dir(VM).join(failed[0].id.as_str()).exists());
    assert_no_leftovers(&vm, &expected_bitmaps(&manifest, &full_id, &full_id)).await;

    // The next backup still sees every change since the full.
    let reference = refs.path().join("ref.qcow2");
    vm.capture_reference("disk0", &reference).await;
    let inc = repo.backup_report(&vm, VM, &[]);
    assert_eq!(inc.method, "bitmap", "{inc:?}");
    assert_eq!(inc.parent.as_deref(), Some(&*full_id));
    image::assert_same(&reference, &repo.node_file(VM, inc.node.as_str(), "disk0"));
}

#[tokio::test]
async fn killed_at_every_step_the_next_run_cleans_up_and_is_exact() {
    let vm = TestVm::start(&[("disk0", 16 * MIB), ("disk1", 8 * MIB)]).await;
    let repo = TestRepo::init();
    let refs = tempfile::tempdir().unwrap();
    vm.write_pattern("disk0", 0x01, 0, 4 * MIB).await;
    let full = repo.backup_report(&vm, VM, &[]);
    let mut parent = full.node.clone();
    let full_id = parent.clone();

    let points = [
        "backup-begun",
        "backup-jobs-started",
        "backup-copied",
        "backup-files-synced",
        "backup-tables-written",
        "backup-completed",
    ];
    for (i, point) in points.iter().enumerate() {
        vm.write_pattern("disk0", 0x10 + i as u8, i as u64 * MIB, MIB)
            .await;
        vm.write_pattern("disk1", 0x20 + i as u8, i as u64 * MIB, 64 * 1024)
            .await;
        let args = repo.backup_args(&vm, VM, &[]);
        let mut cmd = cli::command(&args.iter().map(String::as_str).collect::<Vec<_>>());
        cmd.env("QMPBAK_CRASH_AT", point);
        let out = cli::wait(cmd.spawn().unwrap(), CLI_TIMEOUT);
        assert!(
            !out.status.success(),
            "{point}: the run should have died: {out:?}"
        );
        assert!(out.stderr.contains(point), "{point}: {}", out.stderr);
        assert!(vm.running().await, "{point}: the VM keeps running");
        // The manifest is valid whatever the step.
        let manifest = repo.manifest(VM);

        let refs_now: Vec<_> = ["disk0", "disk1"]
            .iter()
            .map(|d| {
                let p = refs.path().join(format!("{point}-{d}.qcow2"));
                (d.to_string(), p)
            })
            .collect();
        for (d, p) in &refs_now {
            vm.capture_reference(d, p).await;
        }
        let next = repo.backup_report(&vm, VM, &[]);
        let id = next.node.clone();
        if *point == "backup-completed" {
            // The killed run had finished its node; the next one builds on it.
            let killed = manifest.current.as_ref().unwrap().to_string();
            assert_ne!(killed, parent, "{point}");
            assert_eq!(next.parent, Some(killed), "{point}");
        } else {
            assert_eq!(next.parent.as_ref(), Some(&parent), "{point}: {next:?}");
            assert!(!next.cleaned.operations.is_empty(), "{point}: {next:?}");
        }
        for (d, p) in &refs_now {
            image::assert_same(p, &repo.node_file(VM, &id, d));
        }
        let manifest = repo.manifest(VM);
        assert!(manifest.operations.is_empty(), "{point}");
        assert!(!any_file_named(&repo.vm_dir(VM), "fleece"), "{point}");
        assert_no_leftovers(&vm, &expected_bitmaps(&manifest, &id, &full_id)).await;
        parent = id;
    }
}

#[tokio::test]
async fn a_second_backup_of_the_same_vm_fails_at_once_with_the_lock_error() {
    let vm = TestVm::start(&[("disk0", 16 * MIB)]).await;
    let repo = TestRepo::init();
    vm.write_pattern("disk0", 0x11, 0, 8 * MIB).await;
    repo.backup_report(&vm, VM, &[]);
    vm.write_pattern("disk0", 0x22, 0, 8 * MIB).await;

    let mut events = vm.qmp().subscribe(EventFilter::names(&["JOB_STATUS_CHANGE"]));
    let args = repo.backup_args(&vm, VM, &["--speed-limit", &(2 * MIB).to_string()]);
    let first = cli::command(&args.iter().map(String::as_str).collect::<Vec<_>>())
        .spawn()
        .unwrap();
    wait_job_running(&mut events).await;
    let started = std::time::Instant::now();
    let second = repo.try_backup(&vm, VM, &[]);
    assert!(started.elapsed() < PROMPT_TIMEOUT, "the second run must not wait");
    assert_eq!(second.code(), Some(4), "{second:?}");
    assert!(
        second.stderr.contains(&first.id().to_string()),
        "names the holder's pid: {}",
        second.stderr
    );
    cli::wait(first, CLI_TIMEOUT).success();
}

#[tokio::test]
async fn a_full_disk_at_the_final_manifest_write_leaves_current_where_it_was() {
    let vm = TestVm::start(&[("disk0", 16 * MIB)]).await;
    let repo = TestRepo::init();
    let refs = tempfile::tempdir().unwrap();
    vm.write_pattern("disk0", 0x11, 0, 4 * MIB).await;
    let full = repo.backup_node(&vm, VM, &[]);
    vm.write_pattern("disk0", 0x22, MIB, 2 * MIB).await;

    let mut cmd = cli::command_owned(&repo.backup_args(&vm, VM, &[]));
    cmd.env("QMPBAK_INJECT_ENOSPC_AT", "backup-save-complete");
    let out = cli::wait(cmd.spawn().unwrap(), CLI_TIMEOUT);
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(out.stderr.contains("No space left on device"), "{out:?}");
    let manifest = repo.manifest(VM);
    assert_eq!(
        manifest.current.as_ref().map(chain::NodeId::as_str),
        Some(full.as_str())
    );
    assert!(manifest.operations.is_empty());
    let failed = manifest.nodes.last().unwrap();
    assert_eq!(failed.state, chain::NodeState::Failed);
    assert!(!repo.vm_dir(VM).join(failed.id.as_str()).exists());
    assert_no_leftovers(&vm, &expected_bitmaps(&manifest, &full, &full)).await;

    // The next automatic backup is an incremental on the full, with every write since it.
    vm.write_pattern("disk0", 0x33, 8 * MIB, MIB).await;
    let reference = refs.path().join("ref.qcow2");
    vm.capture_reference("disk0", &reference).await;
    let report = repo.backup_report(&vm, VM, &[]);
    assert_eq!(report.parent.as_ref(), Some(&full), "{report:?}");
    assert_eq!(report.method, "bitmap", "{report:?}");
    let node = report.node.as_str();
    let restored = refs.path().join("restored.qcow2");
    repo.run(VM, &["restore", node, "--to", restored.to_str().unwrap()])
        .success();
    image::assert_same(&reference, &restored);
}
