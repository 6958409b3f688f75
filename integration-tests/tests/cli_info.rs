//! `qmpbak info` against a real VM, and its errors for sockets that are missing, not sockets, or not QMP.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::os::unix::net::UnixListener;

use integration_tests::{MIB, TestVm, cli};
use qmpbak_engine::inspect::VmInfo;

#[tokio::test]
async fn info_lists_disks_and_bitmaps() {
    let vm = TestVm::start(&[("disk0", 64 * MIB), ("disk1", 32 * MIB)]).await;
    vm.write_pattern("disk0", 0x5a, 0, 2 * MIB).await;
    vm.qmp()
        .execute_raw(
            "block-dirty-bitmap-add",
            Some(serde_json::json!({"node": "node-disk0", "name": "bm0", "persistent": true})),
        )
        .await
        .unwrap();
    vm.write_pattern("disk0", 0x33, 4 * MIB, MIB).await;
    let socket = vm.socket();

    let out = cli::run(&["info", "--socket", socket.to_str().unwrap(), "--json"]).success();
    // The printed shape: the info report's documented keys (and QEMU's, a disk's, a bitmap's), so a renamed
    // field is caught.
    let raw = out.json();
    cli::assert_keys(&raw, &["qemu", "disks", "empty_drives"]);
    cli::assert_keys(&raw["qemu"], &["version", "package"]);
    cli::assert_keys(
        &raw["disks"][0],
        &[
            "id",
            "id_source",
            "qdev",
            "node_name",
            "root_node",
            "file",
            "image",
            "format",
            "virtual_size",
            "allocated_size",
            "backing_file",
            "has_backing",
            "read_only",
            "removable",
            "bitmaps_persist",
            "encrypted",
            "bitmaps",
        ],
    );
    cli::assert_keys(
        &raw["disks"][0]["bitmaps"][0],
        &[
            "name",
            "persistent",
            "recording",
            "busy",
            "inconsistent",
            "granularity",
            "count",
        ],
    );
    let info: VmInfo = out.report();
    assert!(info.qemu.version.starts_with(|c: char| c.is_ascii_digit()));
    let disks = &info.disks;
    assert_eq!(disks.len(), 2, "{info:#?}");
    let d0 = &disks[0];
    assert_eq!(d0.id, "disk0");
    assert_eq!(d0.node_name, "node-disk0");
    assert_eq!(d0.format, "qcow2");
    assert_eq!(d0.virtual_size, 64 * MIB);
    assert!(d0.file.ends_with("disk0.qcow2"));
    assert!(d0.allocated_size.unwrap() >= 2 * MIB);
    let bm = &d0.bitmaps[0];
    assert_eq!(bm.name, "bm0");
    assert!(bm.persistent);
    assert!(bm.recording);
    assert!(!bm.busy);
    assert!(!bm.inconsistent);
    assert_eq!(bm.granularity, 65536);
    assert_eq!(bm.count, MIB);
    assert_eq!(disks[1].id, "disk1");
    assert_eq!(disks[1].bitmaps.len(), 0);

    // The human form names the same things.
    let text = cli::run(&["info", "--socket", socket.to_str().unwrap()])
        .success()
        .stdout;
    for needle in ["disk0", "disk1", "node-disk0", "bm0", "qcow2"] {
        assert!(text.contains(needle), "{needle} missing from:\n{text}");
    }
}

#[test]
fn info_on_a_missing_socket_is_a_clear_qemu_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nope.sock");
    let out = cli::run(&["info", "--socket", path.to_str().unwrap()]);
    assert_eq!(out.code(), Some(5), "{out:?}");
    assert!(out.stderr.contains("nope.sock"), "{}", out.stderr);
    assert!(
        out.stderr.contains("does not exist") || out.stderr.contains("No such file"),
        "{}",
        out.stderr
    );
}

#[test]
fn info_on_a_path_that_is_not_a_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("plain-file");
    std::fs::write(&path, b"hello").unwrap();
    let out = cli::run(&["info", "--socket", path.to_str().unwrap()]);
    assert_eq!(out.code(), Some(5), "{out:?}");
    assert!(
        out.stderr.contains("plain-file") && out.stderr.contains("not a socket"),
        "{}",
        out.stderr
    );
}

#[test]
fn info_on_a_socket_that_is_not_qmp() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("not-qmp.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let server = std::thread::spawn(move || {
        use std::io::Write;
        let (mut conn, _) = listener.accept().unwrap();
        let _ = conn.write_all(b"220 smtp.example ESMTP ready\r\n");
        // Keep the connection open a moment so the client reads the banner, then close it.
        let mut buf = [0u8; 64];
        let _ = std::io::Read::read(&mut conn, &mut buf);
    });
    let out = cli::run(&["info", "--socket", path.to_str().unwrap()]);
    assert_eq!(out.code(), Some(5), "{out:?}");
    assert!(
        out.stderr.contains("not-qmp.sock") && out.stderr.contains("QMP"),
        "{}",
        out.stderr
    );
    let _ = server.join();
}
