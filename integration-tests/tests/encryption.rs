//! Encryption at rest: an encrypted source disk is never copied decrypted into a repository that is not
//! encrypted unless the user says so.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use integration_tests::repo::TestRepo;
use integration_tests::{MIB, TestVm, image};

/// The passphrase of the test VM's encrypted disk.
const DISK_PASSPHRASE: &str = "disk passphrase of the test VM";

/// The byte the guest writes: 64 of them in a row never occur by chance in ciphertext.
const PATTERN: u8 = 0x11;

/// Whether the file holds 64 consecutive bytes of `pattern`.
fn holds_pattern(path: &Path, pattern: u8) -> bool {
    let bytes = std::fs::read(path).unwrap();
    let needle = [pattern; 64];
    bytes.windows(needle.len()).any(|w| w == needle)
}

async fn encrypted_vm() -> TestVm {
    TestVm::builder()
        .encrypted_disk("disk0", 16 * MIB, DISK_PASSPHRASE)
        .start()
        .await
}

#[tokio::test]
async fn an_encrypted_disk_is_refused_by_a_plain_repository_and_nothing_is_written() {
    let vm = encrypted_vm().await;
    vm.write_pattern("disk0", PATTERN, 0, 2 * MIB).await;
    assert!(
        !holds_pattern(&vm.disk_path("disk0"), PATTERN),
        "the source disk is not encrypted"
    );
    let repo = TestRepo::init();
    let out = repo.try_backup(&vm, "vm1", &[]);
    assert_eq!(out.code(), Some(2), "{out:?}");
    assert!(
        out.stderr.contains("disk0") && out.stderr.contains("--allow-plaintext"),
        "{out:?}"
    );
    assert!(
        !repo.vm_dir("vm1").exists(),
        "the refused backup created the VM's directory"
    );
}

#[tokio::test]
async fn allow_plaintext_backs_up_an_encrypted_disk_decrypted_and_says_so() {
    let vm = encrypted_vm().await;
    vm.write_pattern("disk0", PATTERN, 0, 2 * MIB).await;
    let dir = tempfile::tempdir().unwrap();
    let reference = dir.path().join("ref.qcow2");
    vm.capture_reference("disk0", &reference).await;
    let repo = TestRepo::init();
    let report = repo.backup(&vm, "vm1", &["--allow-plaintext"]);
    assert_eq!(report["plaintext_of_encrypted"], serde_json::json!(["disk0"]));
    let node = report["node"].as_str().unwrap();
    image::assert_same(&reference, &repo.node_file("vm1", node, "disk0"));
    assert!(holds_pattern(&repo.node_file("vm1", node, "disk0"), PATTERN));
    // The text report says so too.
    vm.write_pattern("disk0", 0x22, 0, MIB).await;
    let text = integration_tests::cli::run_owned(&repo.vm_args(
        "vm1",
        &[
            "backup",
            "--allow-plaintext",
            "--socket",
            vm.socket().to_str().unwrap(),
        ],
    ))
    .success();
    assert!(text.stdout.contains("DECRYPTED"), "{text:?}");
}
