//! The test guest itself: a write guest makes progress, a flushed or crash-consistent copy of its disk verifies,
//! and a few damaged bytes in a recorded file make the verify guest fail. The other tests build on this.

use integration_tests::guest::{self, TestGuest};
use integration_tests::{MIB, image};

const DISK: &str = "disk0";

#[tokio::test]
async fn write_guest_reports_ready_then_files() {
    let mut guest = TestGuest::builder().disk(DISK, 64 * MIB).start().await;
    guest.wait_ready().await;
    for n in 1..=3 {
        assert_eq!(
            guest.wait_for_file(n).await,
            n,
            "files are numbered from 1 on a blank disk"
        );
    }
    assert!(guest.alive());
}

#[tokio::test]
async fn flushed_copy_of_a_writing_guest_verifies() {
    let mut guest = TestGuest::start_writing(DISK, 64 * MIB).await;
    guest.wait_for_file(3).await;
    let copy = guest.dir().join("copy.qcow2");
    guest.capture_disk(&copy).await;

    let verdict = guest::verify_image(&copy).await;
    verdict.assert_ok();
    // the known file and at least three more
    assert!(verdict.verified.unwrap_or(0) >= 4, "{verdict:?}");
    // The writer keeps going after the copy.
    let next = guest.files_written() + 1;
    guest.wait_for_file(next).await;
}

#[tokio::test]
async fn disk_of_a_killed_guest_verifies() {
    let mut guest = TestGuest::start_writing(DISK, 64 * MIB).await;
    guest.wait_for_file(5).await;
    guest.kill();

    let verdict = guest::verify_image(&guest.disk_path()).await;
    verdict.assert_ok();
    assert!(verdict.verified.unwrap_or(0) >= 6, "{verdict:?}");
}

#[tokio::test]
async fn ten_damaged_bytes_in_a_recorded_file_fail_verify() {
    let mut guest = TestGuest::start_writing(DISK, 64 * MIB).await;
    guest.wait_for_file(3).await;
    let copy = guest.dir().join("copy.qcow2");
    guest.capture_disk(&copy).await;
    guest.kill();
    let raw = guest.dir().join("copy.raw");
    image::qemu_img(&[
        "convert",
        "-O",
        "raw",
        &copy.to_string_lossy(),
        &raw.to_string_lossy(),
    ]);

    guest::damage_known_file(&raw, 10);

    let verdict = guest::verify_image(&raw).await;
    assert!(!verdict.is_ok(), "{verdict:?}");
    assert_eq!(
        verdict.failed,
        ["known"],
        "only the damaged file fails: {verdict:?}"
    );
    assert_ne!(
        verdict.fsck, "errors",
        "file data damage is not file system damage: {verdict:?}"
    );
}
