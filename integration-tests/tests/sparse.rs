//! Big, mostly empty disks: what a backup costs follows the data, not the virtual size (issue 22). A full
//! backup of a 1 TiB qcow2 disk holding a few MiB copies and stores those MiB, and every node still equals the
//! guest's view at its instant. Their checking tables are the size of the data too: zero blocks are not
//! stored.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::MetadataExt as _;
use std::path::Path;

use integration_tests::repo::{TestRepo, copied_bytes};
use integration_tests::{MIB, TestVm, image};
use qmpbak_engine::verify::VerifyReport;

const VM: &str = "sparse";
const DISK: &str = "big0";
const TIB: u64 = 1024 * 1024 * MIB;

/// Bytes a file takes on the host.
fn on_disk(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

#[tokio::test]
async fn a_full_backup_of_a_mostly_empty_1_tib_disk_copies_and_stores_only_its_data() {
    let vm = TestVm::builder().disk(DISK, TIB).start().await;
    let repo = TestRepo::init();
    let refs = tempfile::tempdir().unwrap();
    vm.write_pattern(DISK, 0x11, 0, 4 * MIB).await;
    vm.write_pattern(DISK, 0x22, 700 * 1024 * MIB, 4 * MIB).await;
    let data = 8 * MIB;

    let full_ref = refs.path().join("full.qcow2");
    vm.capture_reference(DISK, &full_ref).await;
    let full = repo.backup_report(&vm, VM, &[]);
    let full_node = full.node.as_str();
    assert_eq!(full.level, "full", "{full:?}");
    assert_eq!(
        copied_bytes(&full),
        [data],
        "only the allocated clusters are copied: {full:?}"
    );
    let file = repo.node_file(VM, full_node, DISK);
    // qcow2 header, L1, refcounts and the L2 tables of the two extents: a few hundred KiB. sync=full wrote a
    // zero cluster entry for every cluster of the disk: 128 MiB of L2 tables more.
    let stored = on_disk(&file);
    assert!(
        stored <= data + 2 * MIB,
        "the full stores {stored} bytes for {data} of data"
    );
    image::assert_same(&full_ref, &file);
    // 1 Mi blocks: a presence bitmap of 128 KiB and 8 digests, not 32 MiB of digests.
    let table = file.with_extension("table");
    assert!(
        on_disk(&table) <= 256 << 10,
        "the full's table takes {} bytes",
        on_disk(&table)
    );

    vm.write_pattern(DISK, 0x33, 300 * 1024 * MIB, MIB).await;
    vm.write_zeroes(DISK, 0, MIB).await;
    let inc_ref = refs.path().join("inc.qcow2");
    vm.capture_reference(DISK, &inc_ref).await;
    let inc = repo.backup_report(&vm, VM, &[]);
    assert_eq!(inc.level, "incremental", "{inc:?}");
    let inc_file = repo.node_file(VM, inc.node.as_str(), DISK);
    image::assert_same(&inc_ref, &inc_file);
    let inc_table = inc_file.with_extension("table");
    assert!(
        on_disk(&inc_table) <= 256 << 10,
        "the incremental's table takes {} bytes",
        on_disk(&inc_table)
    );

    // Nothing written since: the job copies nothing, and the table is the incremental's, taken from it
    // without mapping the 1 TiB chain (verify below rehashes every node against its table).
    let empty = repo.backup_report(&vm, VM, &[]);
    assert_eq!(empty.level, "incremental", "{empty:?}");
    assert_eq!(copied_bytes(&empty), [0], "{empty:?}");
    image::assert_same(&inc_ref, &repo.node_file(VM, empty.node.as_str(), DISK));

    let verified: VerifyReport = repo.run(VM, &["verify", "--json"]).success().report();
    assert!(verified.ok, "{verified:?}");
    assert_eq!(verified.nodes.len(), 3, "{verified:?}");
}
