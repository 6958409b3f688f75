//! `qmpbak mount` on the real test guest's ext4 disk: the files the guest wrote (and recorded, synced) before a
//! backup are read back byte for byte from the read-only mount, a crash-consistent incremental mounts without a
//! write (ext4 `noload`), and nothing in the repository changes.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use sha2::{Digest as _, Sha256};

use integration_tests::guest::TestGuest;
use integration_tests::mounts::{self, Unmount, assert_nothing_left, can_mount, checksums};
use integration_tests::repo::{BackupReport, TestRepo};
use integration_tests::{MIB, cli};
use qmpbak_engine::mount::MountReport;

const DISK: &str = "disk0";
const VM: &str = "guest";

/// Checks every file the mounted MANIFEST names against its recorded sha256; the number checked. `strict`:
/// every named file must be there and match.
fn verify_manifest(root: &Path, strict: bool) -> u64 {
    let manifest = std::fs::read_to_string(root.join("MANIFEST")).unwrap();
    let mut verified = 0;
    for line in manifest.lines() {
        let Some((sha, name)) = line.split_once(' ') else {
            assert!(!strict, "MANIFEST line {line:?}");
            continue;
        };
        match std::fs::read(root.join(name)) {
            Ok(bytes) => {
                let actual = mounts::hex(&Sha256::digest(&bytes));
                if strict {
                    assert_eq!(actual, sha, "{name} differs from what the guest recorded");
                }
                if actual == sha {
                    verified += 1;
                }
            }
            Err(e) => assert!(!strict, "{name}: {e}"),
        }
    }
    verified
}

#[tokio::test]
async fn files_the_guest_wrote_before_the_backup_are_read_back_from_the_mount() {
    let mut guest = TestGuest::builder().disk(DISK, 128 * MIB).agent().start().await;
    guest.wait_ready().await;
    guest.wait_for_file(5).await;
    let qga = guest.qga_socket();
    let repo = TestRepo::init();

    // Quiesced: the file system is frozen, its journal flushed, for the backup instant.
    let written_before = guest.files_written();
    let quiesced = cli::run_owned(&repo.socket_backup_args(
        &guest.socket(),
        VM,
        &["--quiesce", "--qga", qga.to_str().unwrap()],
    ))
    .success()
    .report::<BackupReport>();
    let quiesced = quiesced.node;
    // Crash consistent: taken while the guest writes.
    let seen = guest.files_written();
    guest.wait_for_file(seen + 3).await;
    let crash = cli::run_owned(&repo.socket_backup_args(&guest.socket(), VM, &[]))
        .success()
        .report::<BackupReport>();
    let crash = crash.node;
    let before = checksums(&repo.path());

    let list: MountReport = repo
        .run(VM, &["mount", &quiesced, "--list", "--json"])
        .success()
        .report();
    assert!(list.partition_table.is_none(), "{list:?}");
    assert_eq!(list.partitions[0].fstype.as_deref(), Some("ext4"), "{list:?}");
    assert_eq!(list.partitions[0].size, 128 * MIB, "{list:?}");

    if can_mount() {
        let dir = tempfile::tempdir().unwrap();
        let _unmount = Unmount(dir.path().to_owned());
        let dir_arg = dir.path().to_str().unwrap();
        let report: MountReport = repo
            .run(VM, &["mount", &quiesced, dir_arg, "--json"])
            .success()
            .report();
        assert_eq!(
            report.partitions[0].mounted_at.as_deref(),
            Some(Path::new(dir_arg)),
            "{report:?}"
        );
        let verified = verify_manifest(dir.path(), true);
        // MANIFEST holds the known file and f1..fN.
        assert!(
            verified > written_before,
            "{verified} files read back, {written_before} written before the backup"
        );
        cli::run(&["umount", dir_arg]).success();
        assert_nothing_left(dir.path(), &report);

        // The crash-consistent incremental mounts without replaying the journal: what it shows is the file
        // system as last written in place, and every file it shows whole is the guest's.
        let report: MountReport = repo
            .run(VM, &["mount", &crash, dir_arg, "--json"])
            .success()
            .report();
        mounts::assert_locked_down(dir.path());
        let verified = verify_manifest(dir.path(), false);
        eprintln!("crash-consistent node {crash}: {verified} files read back");
        cli::run(&["umount", dir_arg]).success();
        assert_nothing_left(dir.path(), &report);
    }

    assert_eq!(checksums(&repo.path()), before, "the repository changed");
    assert!(guest.alive());
}
