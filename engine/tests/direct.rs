//! [`qmpbak_engine::direct::DirectSource`] against QEMU itself: a three-layer qcow2 chain with data in every layer,
//! partial-cluster overwrites, zero clusters, discards and a hole reads byte for byte as `qemu-img convert`
//! flattens it, and hashes to the same checking table. A compressed image is refused (read through QEMU then).
//! Needs `qemu-img` and `qemu-io` (scripts/setup installs them).
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use chain::{BlockSource as _, FileSource, Scheme, Table};
use qmpbak_engine::direct::{DirectSource, chain_spec};
use qmpbak_engine::qemu_bins::QemuBins;

const MIB: u64 = 1 << 20;

fn run(program: &str, args: &[&str]) {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A qcow2 image at `dir/name` of 8 MiB over `backing`, with the qemu-io commands `ops` run on it.
fn layer(dir: &Path, name: &str, backing: Option<&str>, ops: &[&str]) -> PathBuf {
    let path = dir.join(name);
    let p = path.to_str().unwrap();
    match backing {
        Some(b) => run(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", b, p],
        ),
        None => run("qemu-img", &["create", "-q", "-f", "qcow2", p, "8M"]),
    }
    for op in ops {
        run("qemu-io", &["-f", "qcow2", "-c", op, p]);
    }
    path
}

#[tokio::test]
async fn a_chain_reads_and_hashes_as_qemu_flattens_it() {
    let dir = tempfile::tempdir().unwrap();
    let base = layer(
        dir.path(),
        "base.qcow2",
        None,
        &["write -P 0x11 0 3M", "write -z 4M 1M", "write -P 0x12 5M 64k"],
    );
    let mid = layer(
        dir.path(),
        "mid.qcow2",
        Some("base.qcow2"),
        &[
            "write -P 0x22 512k 100k",
            "write -z 1M 64k",
            "discard 2M 128k",
            "write -P 0x23 4160k 8k",
        ],
    );
    let top = layer(
        dir.path(),
        "top.qcow2",
        Some("mid.qcow2"),
        &["write -P 0x33 6M 1536k", "write -P 0x44 100 1", "write -z 5M 4k"],
    );
    let flat = dir.path().join("flat.raw");
    run(
        "qemu-img",
        &[
            "convert",
            "-O",
            "raw",
            top.to_str().unwrap(),
            flat.to_str().unwrap(),
        ],
    );

    let files = vec![base, mid, top];
    let direct = DirectSource::open(&QemuBins::from_env(), &files)
        .await
        .unwrap()
        .expect("an uncompressed chain is read directly");
    let expected = std::fs::read(&flat).unwrap();
    assert_eq!(direct.len(), 8 * MIB);
    let top_alone = qmpbak_engine::tables::layer_extents(&QemuBins::from_env(), &files[2])
        .await
        .unwrap();
    assert_eq!(
        direct.top_layer_ranges(),
        &top_alone[..],
        "the top layer's own ranges"
    );

    let mut all = vec![0xffu8; expected.len()];
    direct.read_at(0, &mut all).unwrap();
    assert!(all == expected, "the whole disk differs from qemu-img convert's");
    // Reads that start and end inside ranges of different layers.
    for (offset, len) in [
        (99, 3),
        (500 * 1024, 200 * 1024),
        (4 * MIB - 10, 20),
        (6 * MIB - 1, 2),
    ] {
        let mut buf = vec![0xffu8; len as usize];
        direct.read_at(offset, &mut buf).unwrap();
        assert!(
            buf[..] == expected[offset as usize..(offset + len) as usize],
            "read of {len} at {offset} differs"
        );
    }

    for block_size in [64 * 1024, MIB] {
        let from_qemu = Table::build(
            &FileSource::open(&flat).unwrap(),
            Scheme::default(),
            block_size,
            1,
        )
        .unwrap();
        let from_files = Table::build(&direct, Scheme::default(), block_size, 0).unwrap();
        assert_eq!(
            Table::diff(&from_qemu, &from_files).unwrap(),
            Vec::<u64>::new(),
            "tables differ with {block_size}-byte blocks"
        );
    }
}

#[tokio::test]
async fn compressed_images_are_left_to_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let plain = layer(dir.path(), "plain.qcow2", None, &["write -P 0x55 0 1M"]);
    let packed = dir.path().join("packed.qcow2");
    run(
        "qemu-img",
        &[
            "convert",
            "-c",
            "-O",
            "qcow2",
            plain.to_str().unwrap(),
            packed.to_str().unwrap(),
        ],
    );
    let bins = QemuBins::from_env();
    assert!(DirectSource::open(&bins, &[packed]).await.unwrap().is_none());
    assert!(DirectSource::open(&bins, &[plain]).await.unwrap().is_some());
}

/// `is_cached` says whether the data of a range is in the page cache without reading it: after the files are
/// read, yes; after they are dropped from the cache, no, and asking again brings nothing in; a range that reads as
/// zeros needs nothing from the disk.
#[tokio::test]
async fn the_page_cache_is_asked_without_reading() {
    use std::os::fd::AsRawFd as _;
    let dir = tempfile::tempdir().unwrap();
    let base = layer(dir.path(), "base.qcow2", None, &["write -P 0x11 0 2M"]);
    let top = layer(
        dir.path(),
        "top.qcow2",
        Some("base.qcow2"),
        &["write -P 0x22 1M 64k"],
    );
    let files = [base, top];
    let source = DirectSource::open(&QemuBins::from_env(), &files)
        .await
        .unwrap()
        .unwrap();
    let evict = || {
        for f in &files {
            let file = std::fs::File::open(f).unwrap();
            file.sync_all().unwrap();
            nix::fcntl::posix_fadvise(
                file.as_raw_fd(),
                0,
                0,
                nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
            )
            .unwrap();
        }
    };
    for f in &files {
        std::fs::read(f).unwrap();
    }
    let Some(cached) = source.is_cached(0, 2 * MIB).unwrap() else {
        eprintln!("this kernel has no cachestat: nothing to check");
        return;
    };
    assert!(cached);
    evict();
    for _ in 0..2 {
        assert_eq!(source.is_cached(0, 2 * MIB).unwrap(), Some(false));
        assert_eq!(source.is_cached(MIB, 64 * 1024).unwrap(), Some(false));
    }
    // The hole after the data reads as zeros: nothing to wait for.
    assert_eq!(source.is_cached(4 * MIB, MIB).unwrap(), Some(true));
    let mut buf = vec![0; 64 * 1024];
    source.read_at(MIB, &mut buf).unwrap();
    assert_eq!(source.is_cached(MIB, 64 * 1024).unwrap(), Some(true));
}

#[test]
fn the_chain_spec_names_every_layer_read_only() {
    let spec = chain_spec(&[PathBuf::from("/a"), PathBuf::from("/b")]);
    assert_eq!(spec["file"]["filename"], "/b");
    assert_eq!(spec["read-only"], true);
    assert_eq!(spec["backing"]["file"]["filename"], "/a");
    assert_eq!(spec["backing"]["backing"], serde_json::Value::Null);
}
