//! A repository written by an older qmpbak: `fixtures/v1-repo` is what qmpbak with manifest format 1 wrote
//! for a VM with one 16 MiB disk holding 0x5a in its first 4 MiB (a full backup, node 0001, then a
//! checksum-diff backup killed at `backup-copied`, which left node 0002 pending and its operation record with
//! the NBD-server note). The node file itself is not committed: it is made here with the same guest
//! contents, which its committed checking table describes.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use integration_tests::repo::TestRepo;
use integration_tests::{MIB, TestVm, image};
use qmpbak_engine::repo_reports::TreeReport;

/// The fixture's guest contents of disk0 at node 0001.
fn base_contents() -> Vec<u8> {
    let mut bytes = vec![0u8; 16 * MIB as usize];
    bytes[..4 * MIB as usize].fill(0x5a);
    bytes
}

/// Copies the format-1 repository into `dir`, makes its node file, and records `image` as the image of the
/// VM's disk (the fixture names the image of the machine it was made on).
fn format_1_repository(dir: &Path, image: &Path) -> PathBuf {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/v1-repo");
    let repo = dir.join("repo");
    std::fs::create_dir_all(repo.join("vm1/0001")).unwrap();
    for file in ["qmpbak-repo.json", "vm1/0001/disk0.table"] {
        std::fs::copy(fixture.join(file), repo.join(file)).unwrap();
    }
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture.join("vm1/manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["format_version"], 1);
    assert_eq!(manifest["operations"][0]["note"], "started the VM's NBD server");
    manifest["disks"][0]["filename"] = serde_json::json!(image);
    std::fs::write(
        repo.join("vm1/manifest.json"),
        serde_json::to_vec_pretty(&manifest).unwrap(),
    )
    .unwrap();
    image::qcow2_from_bytes(&repo.join("vm1/0001/disk0.qcow2"), &base_contents());
    repo
}

#[tokio::test]
async fn a_repository_of_format_1_is_read_backed_up_into_and_restored() {
    let vm = TestVm::start(&[("disk0", 16 * MIB)]).await;
    vm.write_pattern("disk0", 0x5a, 0, 4 * MIB).await;
    let work = tempfile::tempdir().unwrap();
    let repo = TestRepo::at(format_1_repository(work.path(), &vm.active_image("disk0").await));

    // Read: listed, and verified against the committed table.
    let vm_dir = repo.vm_dir("vm1");
    let listed: TreeReport = integration_tests::cli::run(&["list", vm_dir.to_str().unwrap(), "--json"])
        .success()
        .report();
    let printed = serde_json::to_string(&listed).unwrap();
    assert!(printed.contains("0002"), "{printed}");
    repo.run("vm1", &["verify"]).success();
    let manifest = repo.manifest("vm1");
    assert_eq!(
        manifest.operations[0].payload,
        chain::Payload::Backup {
            nbd_server_started: true,
            scratch: Vec::new(),
            view: None,
            frozen_by: None,
        }
    );

    // Backed up into: the killed backup's record is finished first, then the disks are compared with node
    // 0001's table (its bitmaps are not in this QEMU).
    vm.write_pattern("disk0", 0x33, 8 * MIB, MIB).await;
    let report = repo.backup_report(&vm, "vm1", &[]);
    assert_eq!(report.cleaned.operations, ["backup-0002"], "{report:?}");
    assert_eq!(report.parent.as_deref(), Some("0001"), "{report:?}");
    assert_eq!(report.method, "checksum-diff", "{report:?}");
    let node = report.node.clone();
    let manifest = repo.manifest("vm1");
    assert!(manifest.operations.is_empty());
    assert_eq!(
        manifest.node(&"0002".parse().unwrap()).unwrap().state,
        chain::NodeState::Failed
    );
    // The new node's table is a difference against the format-1 (dense) table of its parent: the one block
    // that changed.
    let table = manifest.node(&node.parse().unwrap()).unwrap().disks[0]
        .table
        .clone()
        .unwrap();
    let bytes = std::fs::read(repo.vm_dir("vm1").join(table.as_path())).unwrap();
    assert_eq!(bytes[8], 3, "a difference table");
    assert_eq!(bytes.len() as u64, chain::table::diff_file_len(1));
    // The parent's digests are flat (sha256 of each block, as every table before the pieces scheme): the
    // disk was hashed as they were, or every block would have differed.
    assert_eq!(bytes[12], 0, "flat digests, as its parent's");
    let text = std::fs::read_to_string(repo.vm_dir("vm1").join("manifest.json")).unwrap();
    assert!(
        text.contains("\n  \"format_version\": 2,"),
        "saved in the current format"
    );

    // Restored: the old node and the new one.
    let refs = work.path().join("refs");
    std::fs::create_dir(&refs).unwrap();
    let base = refs.join("base.qcow2");
    image::qcow2_from_bytes(&base, &base_contents());
    let now = refs.join("now.qcow2");
    vm.capture_reference("disk0", &now).await;
    for (node, reference) in [("0001", &base), (node.as_str(), &now)] {
        let out = work.path().join(format!("restored-{node}.qcow2"));
        repo.run("vm1", &["restore", node, "--to", out.to_str().unwrap()])
            .success();
        image::assert_same(reference, &out);
    }
    repo.run("vm1", &["verify"]).success();

    // A new full starts a chain with pieces digests beside the old one; an incremental on it keeps them.
    let full = repo.backup_report(&vm, "vm1", &["--level", "full"]);
    vm.write_pattern("disk0", 0x44, 2 * MIB, 64 * 1024).await;
    let inc = repo.backup_report(&vm, "vm1", &["--level", "inc"]);
    let manifest = repo.manifest("vm1");
    for (node, version) in [(&full.node, 2), (&inc.node, 3)] {
        let table = manifest.node(&node.parse().unwrap()).unwrap().disks[0]
            .table
            .clone()
            .unwrap();
        let bytes = std::fs::read(repo.vm_dir("vm1").join(table.as_path())).unwrap();
        assert_eq!((bytes[8], bytes[12]), (version, 2), "{node}: pieces digests");
        if version == 3 {
            assert_eq!(
                bytes.len() as u64,
                chain::table::diff_file_len(1),
                "one block changed"
            );
        }
    }
    let now = refs.join("later.qcow2");
    vm.capture_reference("disk0", &now).await;
    let out = work.path().join("restored-inc.qcow2");
    repo.run("vm1", &["restore", &inc.node, "--to", out.to_str().unwrap()])
        .success();
    image::assert_same(&now, &out);
    repo.run("vm1", &["verify"]).success();
}
