//! Backups of a real Linux guest writing to its ext4 filesystem: restored disks, booted in a fresh guest, pass
//! fsck and every file the guest recorded (synced) before the backup instant verifies; `--quiesce` freezes and
//! thaws the filesystem through the guest agent; a live restore boots the guest while the data streams in.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use integration_tests::guest::{self, GuestMode, TestGuest};
use integration_tests::repo::{BackupReport, TestRepo};
use integration_tests::timeouts::CLI_TIMEOUT;
use integration_tests::{MIB, cli};
use qmpbak_engine::restore::live::LiveReport;

const DISK: &str = "disk0";
const VM: &str = "guest";

fn try_backup(repo: &TestRepo, guest: &TestGuest, extra: &[&str]) -> cli::Output {
    cli::run_owned(&repo.socket_backup_args(&guest.socket(), VM, extra))
}

fn backup(repo: &TestRepo, guest: &TestGuest, extra: &[&str]) -> BackupReport {
    try_backup(repo, guest, extra).success().report()
}

fn restore(repo: &TestRepo, node: &str, to: &std::path::Path) {
    repo.run(VM, &["restore", node, "--to", to.to_str().unwrap()])
        .success();
}

#[tokio::test]
async fn backups_taken_while_the_guest_writes_restore_to_filesystems_that_verify() {
    let mut guest = TestGuest::start_writing(DISK, 128 * MIB).await;
    let repo = TestRepo::init();
    let out = tempfile::tempdir().unwrap();
    let mut nodes = Vec::new();
    for round in 0..3 {
        // The guest keeps writing files (and overwriting its hot file) while each backup runs.
        let seen = guest.files_written();
        guest.wait_for_file(seen + 5).await;
        // Files the guest reported before the backup started were recorded and synced before its instant.
        let written_before = guest.files_written();
        let report = backup(&repo, &guest, &[]);
        assert_eq!(
            report.level,
            if round == 0 { "full" } else { "incremental" },
            "{report:?}"
        );
        nodes.push((report.node, written_before));
    }
    assert!(guest.alive());
    for (node, written_before) in &nodes {
        let image = out.path().join(format!("{node}.qcow2"));
        restore(&repo, node, &image);
        let verdict = guest::verify_image(&image).await;
        verdict.assert_ok();
        // Crash consistent: every file recorded before the backup instant is there and intact.
        let verified = verdict.verified.unwrap();
        assert!(
            verified >= *written_before,
            "node {node}: {verified} files verified, {written_before} written before"
        );
    }
}

#[tokio::test]
async fn quiesced_backups_give_a_clean_filesystem_and_a_failing_one_still_thaws() {
    let mut guest = TestGuest::builder().disk(DISK, 128 * MIB).agent().start().await;
    guest.wait_ready().await;
    let qga = guest.qga_socket();
    let repo = TestRepo::init();
    let out = tempfile::tempdir().unwrap();
    guest.wait_for_file(3).await;

    let report = backup(&repo, &guest, &["--quiesce", "--qga", qga.to_str().unwrap()]);
    assert!(report.quiesced, "{report:?}");
    let node = report.node;
    let image = out.path().join("quiesced.qcow2");
    restore(&repo, &node, &image);
    let verdict = guest::verify_image(&image).await;
    verdict.assert_ok();
    // Frozen at the instant: no journal to replay.
    assert!(
        !verdict.console.iter().any(|l| l.contains("recovering journal")),
        "a quiesced backup needed journal recovery: {:?}",
        verdict.console
    );

    // A backup that fails while the filesystem is frozen still thaws it: make its transaction fail by taking
    // the name of the bitmap it will add.
    let manifest = repo.manifest(VM);
    let next = format!("{:04}", manifest.next_seq);
    let taken = integration_tests::repo::bitmap_name(&manifest, guest.disk_id(), "inc", &next);
    guest
        .qmp()
        .execute_raw(
            "block-dirty-bitmap-add",
            Some(serde_json::json!({"node": guest.node_name(), "name": taken})),
        )
        .await
        .unwrap();
    let failed = try_backup(&repo, &guest, &["--quiesce", "--qga", qga.to_str().unwrap()]);
    assert_eq!(failed.code(), Some(5), "{failed:?}");
    let mut agent = guest.qga().await;
    assert_eq!(agent.execute("guest-fsfreeze-status", None).await, "thawed");
    let seen = guest.files_written();
    guest.wait_for_file(seen + 2).await;
}

#[tokio::test]
async fn a_live_restore_boots_the_guest_while_streaming_and_its_verify_passes() {
    let repo = TestRepo::init();
    let node = {
        let mut guest = TestGuest::start_writing(DISK, 128 * MIB).await;
        guest.wait_for_file(8).await;
        backup(&repo, &guest, &[]).node
    };
    // A fresh verify guest, paused, on an empty disk of the same size.
    let mut target = TestGuest::builder()
        .disk(DISK, 128 * MIB)
        .mode(GuestMode::Verify)
        .arg("-S")
        .start()
        .await;
    let speed_limit = (8 * MIB).to_string();
    let a = repo.live_restore_args(&target.socket(), VM, &node, &["--speed-limit", &speed_limit]);
    let child = cli::command_owned(&a).spawn().unwrap();
    // The guest boots from the restored node while its data streams in, and verifies every file.
    let verdict_line = target
        .wait_for_line(guest::line::VERIFY, guest::GUEST_VERIFY_TIMEOUT)
        .await;
    assert!(verdict_line.contains("OK"), "{verdict_line}");
    // The verify guest powers off when it is done, which may be before streaming ends: then qmpbak reports that
    // QEMU went away; otherwise it finished streaming.
    let out = cli::wait(child, CLI_TIMEOUT);
    if out.status.success() {
        let report: LiveReport = out.report();
        assert!(report.running_after_secs < report.duration_secs, "{report:?}");
    } else {
        assert_eq!(out.code(), Some(5), "{out:?}");
        assert!(out.stderr.contains("closed"), "{}", out.stderr);
    }
}

/// A backup killed while the guest's filesystems are frozen (`--quiesce`) left them frozen for good: nothing
/// recorded the freeze. The record now names the agent before the freeze, and the next command that finishes
/// the record (here `cleanup`) thaws them; the guest goes on writing.
#[tokio::test]
async fn a_backup_killed_while_the_guest_is_frozen_is_thawed_by_cleanup() {
    let mut guest = TestGuest::builder().disk(DISK, 128 * MIB).agent().start().await;
    guest.wait_ready().await;
    let qga = guest.qga_socket();
    let repo = TestRepo::init();
    guest.wait_for_file(2).await;
    let args = repo.socket_backup_args(
        &guest.socket(),
        VM,
        &["--quiesce", "--qga", qga.to_str().unwrap()],
    );
    cli::run_crashing_at(&args, "backup-frozen", CLI_TIMEOUT).assert_crashed_at("backup-frozen");
    let mut agent = guest.qga().await;
    assert_eq!(agent.execute("guest-fsfreeze-status", None).await, "frozen");
    drop(agent);
    let out = repo
        .run(
            VM,
            &["cleanup", "--socket", guest.socket().to_str().unwrap(), "--json"],
        )
        .success();
    let cleaned: qmpbak_engine::cleanup::CleanupReport = out.report();
    assert!(cleaned.cleaned.thawed_guest, "{cleaned:?}");
    let mut agent = guest.qga().await;
    assert_eq!(agent.execute("guest-fsfreeze-status", None).await, "thawed");
    let seen = guest.files_written();
    guest.wait_for_file(seen + 2).await;
}
