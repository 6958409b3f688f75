//! Every row of the README's exit-code table, each from a real failure: the number a script sees is the one
//! the table promises. (130, interrupted, is covered by tests/signals.rs.)

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use nix::sys::signal::Signal;

use integration_tests::cli::{self, Output};
use integration_tests::repo::TestRepo;
use integration_tests::timeouts::CLI_TIMEOUT;
use integration_tests::{MIB, TestVm};

#[track_caller]
fn assert_code(out: &Output, code: i32, says: &str) {
    assert_eq!(out.code(), Some(code), "{out:?}");
    assert!(out.stderr.contains(says), "expected {says:?} in: {out:?}");
}

/// A VM and a repository with a full and an incremental of its disk.
async fn two_backups() -> (TestVm, TestRepo, Vec<String>) {
    two_backups_with(&[]).await
}

/// [`two_backups`], each backup run with `extra` arguments.
async fn two_backups_with(extra: &[&str]) -> (TestVm, TestRepo, Vec<String>) {
    let vm = TestVm::start(&[("disk0", 16 * MIB)]).await;
    let repo = TestRepo::init();
    vm.write_pattern("disk0", 0x11, 0, 4 * MIB).await;
    let full = repo.backup_node(&vm, "vm1", extra);
    vm.write_pattern("disk0", 0x22, 2 * MIB, 4 * MIB).await;
    let inc = repo.backup_node(&vm, "vm1", extra);
    (vm, repo, vec![full, inc])
}

#[tokio::test]
async fn usage_repository_lock_and_qemu_rows() {
    let (vm, repo, nodes) = two_backups().await;
    // 2: a name that does not exist.
    assert_code(&repo.run("vm1", &["show", "0999"]), 2, "0999");
    // 3: not a repository; a manifest that is not valid JSON.
    let dir = tempfile::tempdir().unwrap();
    assert_code(
        &cli::run(&["list", dir.path().to_str().unwrap()]),
        3,
        "not a qmpbak repository",
    );
    // 4: a verify holds the VM's lock while a backup wants it.
    let paused = cli::run_paused_at(&repo.vm_args("vm1", &["verify"]), "verify-reading", &[], None);
    assert_code(&repo.try_backup(&vm, "vm1", &[]), 4, "lock");
    paused.signal(Signal::SIGUSR1);
    paused.finish().success();
    // 5: no QEMU behind the socket.
    let gone = dir.path().join("gone.sock");
    assert_code(
        &cli::run(&["info", "--socket", gone.to_str().unwrap()]),
        5,
        "does not exist",
    );
    // 1: a full filesystem is a plain failure, whoever meets it.
    let mut cmd = cli::command_owned(&repo.backup_args(&vm, "vm1", &[]));
    cmd.env("QMPBAK_INJECT_ENOSPC_AT", "backup-save-complete");
    assert_code(
        &cli::wait(cmd.spawn().unwrap(), CLI_TIMEOUT),
        1,
        "No space left on device",
    );
    // 3 again, last: the manifest is damaged.
    let manifest = repo.vm_dir("vm1").join("manifest.json");
    std::fs::write(&manifest, b"{ not json").unwrap();
    assert_code(
        &repo.run("vm1", &["restore", &nodes[1], "--to", "/nonexistent/x"]),
        3,
        "manifest",
    );
}

#[tokio::test]
async fn a_verify_whose_reader_fails_is_not_damage() {
    // Compressed: verify reads the chain through a qemu-storage-daemon (an uncompressed one is read directly).
    let (_vm, repo, _nodes) = two_backups_with(&["--compress"]).await;
    let tmp = tempfile::tempdir().unwrap();
    let paused = cli::run_paused_at(
        &repo.vm_args("vm1", &["verify"]),
        "verify-reading",
        &[("TMPDIR", tmp.path())],
        None,
    );
    // The qemu-storage-daemon verify reads through dies: an NBD and QMP failure, not a damaged backup.
    for pid in cli::processes_mentioning(tmp.path().to_str().unwrap()) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
    }
    paused.signal(Signal::SIGUSR1);
    let out = paused.finish();
    assert_code(&out, 5, "not damage");
    assert!(!out.stdout.contains("DAMAGED"), "{out:?}");
    repo.run("vm1", &["verify"]).success();
}

#[tokio::test]
async fn a_missing_or_unreadable_node_file_is_a_damaged_backup() {
    let (_vm, repo, nodes) = two_backups().await;
    let out_dir = tempfile::tempdir().unwrap();
    let target = out_dir.path().join("out.qcow2");
    let full_file = repo.node_file("vm1", &nodes[0], "disk0");
    let saved = out_dir.path().join("saved.qcow2");
    std::fs::copy(&full_file, &saved).unwrap();

    // Missing: the full under the incremental is gone.
    std::fs::remove_file(&full_file).unwrap();
    let out = repo.run("vm1", &["restore", &nodes[1], "--to", target.to_str().unwrap()]);
    assert_code(&out, 6, "is missing");
    assert!(!target.exists());
    assert_code(&repo.run("vm1", &["verify"]), 6, "damaged");

    // Unreadable: its qcow2 header overwritten.
    std::fs::copy(&saved, &full_file).unwrap();
    let mut bytes = std::fs::read(&full_file).unwrap();
    bytes[..512].fill(0x5a);
    std::fs::write(&full_file, &bytes).unwrap();
    let out = repo.run("vm1", &["restore", &nodes[1], "--to", target.to_str().unwrap()]);
    assert_code(&out, 6, "not a readable qcow2");
    assert!(!target.exists());
    assert_code(&repo.run("vm1", &["verify"]), 6, "damaged");

    // Mended: both restore and verify are happy again.
    std::fs::copy(&saved, &full_file).unwrap();
    repo.run("vm1", &["restore", &nodes[1], "--to", target.to_str().unwrap()])
        .success();
    repo.run("vm1", &["verify"]).success();
}

/// A standard error that cannot be written (`2>/dev/full`, a closed pipe) changes no exit code: a failure
/// still exits with its row's code, and `--json` still prints the error object on standard output. The message
/// used to panic on the write and exit 101.
#[test]
fn an_unwritable_standard_error_keeps_the_exit_code() {
    let dir = tempfile::tempdir().unwrap();
    let gone = dir.path().join("gone.sock");
    let full = std::fs::OpenOptions::new().write(true).open("/dev/full").unwrap();
    let out = cli::command(&["info", "--socket", gone.to_str().unwrap(), "--json"])
        .stderr(full)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(5), "{out:?}");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["error"]["code"], 5, "{json}");
}
