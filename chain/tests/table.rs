//! Building checking tables: equal to a naive digest per block (by its scheme's definition) whatever the holes,
//! sizes and thread counts; holes are not read; partial rebuilds derive the same table as a full one; a file
//! source with real holes agrees with memory; and read failures name where they happened.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use std::io;
use std::os::unix::fs::FileExt;

use chain::table;
use chain::{BlockSource, Error, Extent, ExtentKind, FileSource, MemSource, Scheme, Table, TableFile};
use common::Rng;
use proptest::prelude::*;

const BS: u64 = 4096;

/// Each block's digest by the scheme's definition: the sha256 of its bytes, or of its 64 KiB pieces' sha256s.
fn naive_as(scheme: Scheme, data: &[u8], block_size: u64) -> Vec<table::Digest> {
    use sha2::{Digest as _, Sha256};
    data.chunks(block_size as usize)
        .map(|block| match scheme {
            Scheme::Flat => Sha256::digest(block).into(),
            Scheme::Pieces => {
                let mut outer = Sha256::new();
                for piece in block.chunks(table::PIECE_SIZE as usize) {
                    outer.update(Sha256::digest(piece));
                }
                outer.finalize().into()
            }
        })
        .collect()
}

fn naive(data: &[u8], block_size: u64) -> Vec<table::Digest> {
    naive_as(Scheme::default(), data, block_size)
}

fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut data = vec![0u8; len];
    Rng::new(seed).fill(&mut data);
    data
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn build_equals_naive_hashing(
        len in 0usize..(24 * BS as usize),
        holes in prop::collection::vec((0u64..(24 * BS), 1u64..(3 * BS)), 0..6),
        seed in any::<u64>(),
        threads in 1usize..4,
    ) {
        let src = MemSource::with_holes(random_bytes(len, seed), &holes);
        let table = Table::build(&src, Scheme::default(), BS, threads).unwrap();
        prop_assert_eq!(table.digests().copied().collect::<Vec<_>>(), naive(src.data(), BS));
        prop_assert_eq!(table.virtual_size(), len as u64);
        // Holes are never read: every other byte is read exactly once.
        let hole_bytes: u64 = src.extents(0, len as u64).unwrap().iter()
            .filter(|e| e.kind == ExtentKind::Zero).map(|e| e.len).sum();
        prop_assert_eq!(src.bytes_read(), len as u64 - hole_bytes);
        for i in 0..table.len() {
            let (offset, n) = table.block_range(i);
            let zero = src.data()[offset as usize..(offset + n) as usize].iter().all(|&b| b == 0);
            prop_assert_eq!(table.is_zero(i), zero, "block {}", i);
        }
    }

    /// Blocks of several pieces, in both schemes: holes are not read, pieces of zeros (holes, or zeros read
    /// as data) are not hashed, and every digest is the definition's.
    #[test]
    fn both_schemes_equal_their_definitions(
        len in 0usize..(6 << 18),
        holes in prop::collection::vec((0u64..(6 << 18), 1u64..(200 << 10)), 0..6),
        zeroed in prop::collection::vec((0usize..(6 << 18), 1usize..(150 << 10)), 0..4),
        seed in any::<u64>(),
        block_size in prop::sample::select(vec![4096u64, 64 << 10, 256 << 10]),
        threads in 1usize..3,
    ) {
        let mut data = random_bytes(len, seed);
        for (at, n) in zeroed {
            let end = (at + n).min(len);
            if at < end {
                data[at..end].fill(0);
            }
        }
        let src = MemSource::with_holes(data, &holes);
        for scheme in [Scheme::Flat, Scheme::Pieces] {
            let table = Table::build(&src, scheme, block_size, threads).unwrap();
            prop_assert_eq!(table.scheme(), scheme);
            prop_assert_eq!(
                table.digests().copied().collect::<Vec<_>>(),
                naive_as(scheme, src.data(), block_size)
            );
            for i in 0..table.len() {
                let (offset, n) = table.block_range(i);
                let zero = src.data()[offset as usize..(offset + n) as usize].iter().all(|&b| b == 0);
                prop_assert_eq!(table.is_zero(i), zero, "block {}", i);
            }
        }
    }

    #[test]
    fn derive_from_changed_blocks_equals_a_full_build(
        len in 1usize..(16 * BS as usize),
        writes in prop::collection::vec((0usize..(16 * BS as usize), 1usize..6000), 0..6),
        seed in any::<u64>(),
    ) {
        let before = random_bytes(len, seed);
        let mut after = before.clone();
        let mut touched = std::collections::BTreeSet::new();
        for (i, (offset, n)) in writes.iter().enumerate() {
            let offset = offset % len;
            let end = (offset + n).min(len);
            after[offset..end].copy_from_slice(&random_bytes(end - offset, seed ^ (i as u64 + 1)));
            for block in (offset as u64 / BS)..=((end as u64 - 1) / BS) {
                touched.insert(block);
            }
        }
        let parent = Table::build(&MemSource::new(before.clone()), Scheme::default(), BS, 2).unwrap();
        let new_src = MemSource::new(after.clone());
        let touched: Vec<u64> = touched.into_iter().collect();
        let changed = Table::build_blocks(&new_src, &parent, &touched, 2).unwrap();
        prop_assert_eq!(changed.iter().map(|c| c.0).collect::<Vec<_>>(), touched.clone());
        let child = Table::derive(&parent, &changed).unwrap();
        let full = Table::build(&new_src, Scheme::default(), BS, 3).unwrap();
        prop_assert_eq!(&child, &full);
        // diff finds exactly the blocks whose bytes changed.
        let really: Vec<u64> = (0..parent.len())
            .filter(|&i| {
                let (o, n) = parent.block_range(i);
                before[o as usize..(o + n) as usize] != after[o as usize..(o + n) as usize]
            })
            .collect();
        prop_assert_eq!(Table::diff(&parent, &child).unwrap(), really);
    }
}

#[test]
fn tables_survive_the_disk() {
    let dir = tempfile::tempdir().unwrap();
    let src = MemSource::with_holes(random_bytes(10 * BS as usize + 123, 7), &[(2 * BS, 3 * BS)]);
    let table = Table::build(&src, Scheme::default(), BS, 0).unwrap();
    let path = dir.path().join("disk0.table");
    let sha = table.save(&path).unwrap();
    assert_eq!(Table::load_verified(&path, &sha).unwrap(), table);
    assert!((2..5).all(|i| table.is_zero(i)));
}

#[test]
fn a_sparse_file_hashes_like_its_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.raw");
    let file = std::fs::File::create(&path).unwrap();
    let size = (64 << 20) + 5000; // 64 MiB and a short last block
    file.set_len(size).unwrap();
    let mut rng = Rng::new(42);
    let mut chunk = vec![0u8; 300_000];
    for offset in [0, 10 << 20, (30 << 20) + 777, size - 1000] {
        rng.fill(&mut chunk);
        let n = chunk.len().min((size - offset) as usize);
        file.write_all_at(&chunk[..n], offset).unwrap();
    }
    drop(file);
    let bytes = std::fs::read(&path).unwrap();
    let block_size = 1 << 20;
    let from_file = Table::build(
        &FileSource::open(&path).unwrap(),
        Scheme::default(),
        block_size,
        0,
    )
    .unwrap();
    assert_eq!(
        from_file.digests().copied().collect::<Vec<_>>(),
        naive(&bytes, block_size)
    );
    assert_eq!(from_file.len(), 65);
    assert!(from_file.is_zero(20) && !from_file.is_zero(0) && !from_file.is_zero(64));
    let some = Table::build_blocks(&FileSource::open(&path).unwrap(), &from_file, &[64, 0, 30], 2).unwrap();
    assert_eq!(
        some,
        vec![
            (64, *from_file.digest(64).unwrap()),
            (0, *from_file.digest(0).unwrap()),
            (30, *from_file.digest(30).unwrap())
        ]
    );
}

/// A disk whose reads fail when they reach past some offset.
struct Failing;

impl BlockSource for Failing {
    fn len(&self) -> u64 {
        16 * BS
    }
    fn extents(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        Ok(vec![Extent {
            offset,
            len,
            kind: ExtentKind::Data,
        }])
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        if offset + buf.len() as u64 > 9 * BS {
            return Err(io::Error::other("bad sector"));
        }
        buf.fill(1);
        Ok(())
    }
    fn name(&self) -> String {
        "the failing disk".into()
    }
}

#[test]
fn read_errors_name_the_source_and_offset() {
    for threads in [1, 2] {
        let err = Table::build(&Failing, Scheme::default(), BS, threads).unwrap_err();
        let Error::SourceRead { offset, .. } = &err else {
            panic!("{err:?}")
        };
        assert!(*offset >= 9 * BS);
        assert!(err.to_string().contains("the failing disk"), "{err}");
        let cause = std::error::Error::source(&err).unwrap().to_string();
        assert!(cause.contains("bad sector"), "{cause}");
    }
    let err = Table::build_blocks(
        &Failing,
        &Table::zeroed(Scheme::default(), BS, 16 * BS).unwrap(),
        &[16],
        1,
    )
    .unwrap_err();
    assert!(
        matches!(err, Error::BlockOutOfRange { index: 16, count: 16 }),
        "{err:?}"
    );
    assert!(matches!(
        Table::build(&Failing, Scheme::default(), 1000, 1),
        Err(Error::InvalidBlockSize { .. })
    ));
}

/// A source that claims a size and holds nothing but one zero extent (a crafted qcow2 header, a lying NBD
/// server): nothing may be sized from its length before it is checked.
struct Huge(u64);

impl BlockSource for Huge {
    fn len(&self) -> u64 {
        self.0
    }

    fn extents(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        Ok(vec![Extent {
            offset,
            len,
            kind: ExtentKind::Zero,
        }])
    }

    fn read_at(&self, _offset: u64, buf: &mut [u8]) -> io::Result<()> {
        buf.fill(0);
        Ok(())
    }
}

#[test]
fn a_source_too_large_for_a_table_is_an_error_not_an_allocation() {
    const PIB: u64 = 1 << 50;
    for size in [u64::MAX, table::MAX_VIRTUAL_SIZE + 1, PIB] {
        for result in [
            Table::build(&Huge(size), Scheme::default(), 1 << 20, 1).map(|_| ()),
            Table::build_blocks(
                &Huge(size),
                &Table::zeroed(Scheme::default(), 1 << 20, 1 << 20).unwrap(),
                &[0],
                1,
            )
            .map(|_| ()),
            Table::zeroed(Scheme::default(), 1 << 20, size).map(|_| ()),
        ] {
            let err = result.unwrap_err();
            assert!(
                matches!(err, Error::DiskTooLarge { virtual_size, .. } if virtual_size == size),
                "{err:?}"
            );
        }
    }
    // The largest table there may be, and one block more.
    let most = table::MAX_BLOCKS * BS;
    assert_eq!(table::check_size(most, BS).unwrap(), table::MAX_BLOCKS);
    assert!(matches!(
        table::check_size(most + 1, BS),
        Err(Error::DiskTooLarge { .. })
    ));
    let err = Table::zeroed(Scheme::default(), BS, most + 1).unwrap_err();
    assert!(err.to_string().contains("block_size"), "{err}");
}

#[test]
fn a_table_header_claiming_a_huge_disk_is_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("huge.table");
    let mut bytes = table::MAGIC.to_vec();
    bytes.extend_from_slice(&table::VERSION.to_le_bytes());
    bytes.extend_from_slice(&0u32.to_le_bytes());
    bytes.extend_from_slice(&BS.to_le_bytes());
    bytes.extend_from_slice(&u64::MAX.to_le_bytes());
    bytes.extend_from_slice(&u64::MAX.div_ceil(BS).to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let err = Table::load(&path).unwrap_err();
    let Error::TableCorrupt { detail, .. } = &err else {
        panic!("{err:?}")
    };
    assert!(detail.contains("beyond what a checking table covers"), "{detail}");
}

#[test]
fn a_table_file_longer_than_any_table_is_refused_unread() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("long.table");
    let file = std::fs::File::create(&path).unwrap();
    // Sparse: nothing is written, and nothing may be read.
    file.set_len(table::MAX_FILE_LEN + 32).unwrap();
    let err = Table::load(&path).unwrap_err();
    let Error::TableCorrupt { detail, .. } = &err else {
        panic!("{err:?}")
    };
    assert!(detail.contains("longer than any checking table"), "{detail}");
}

/// A table file's bytes mutated at random: header fields set to extreme values, bytes changed, cut or added.
fn load_bytes(bytes: &[u8]) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.table");
    std::fs::write(&path, bytes).unwrap();
    match Table::load(&path) {
        Ok(t) => {
            // What loads is consistent: one digest per block of its size.
            assert_eq!(
                t.len(),
                table::check_size(t.virtual_size(), t.block_size()).unwrap()
            );
            let body = bytes.len() as u64 - table::HEADER_LEN as u64;
            if bytes[8] == 1 {
                assert_eq!(body, t.len() * 32);
            } else {
                // version 2: a presence bitmap, then whole digests
                let map = t.len().div_ceil(8);
                assert!(
                    body >= map && (body - map) % 32 == 0,
                    "{body} bytes for {} blocks",
                    t.len()
                );
            }
        }
        Err(e) => assert!(matches!(e, Error::TableCorrupt { .. }), "{e:?}"),
    }
}

fn valid_table_bytes(blocks: u64, tail: u64) -> Vec<u8> {
    let size = blocks * BS + tail;
    let table = Table::zeroed(Scheme::default(), BS, size).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.table");
    table.save(&path).unwrap();
    std::fs::read(&path).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_table_files_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..600), magic in any::<bool>()) {
        let mut file = if magic { table::MAGIC.to_vec() } else { Vec::new() };
        file.extend_from_slice(&bytes);
        load_bytes(&file);
    }

    #[test]
    fn mutated_table_files_never_panic(
        blocks in 0u64..8,
        tail in 0u64..BS,
        field in 0usize..5,
        value in prop_oneof![any::<u64>(), Just(u64::MAX), Just(0), Just(1 << 63), Just(BS)],
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..4), 0..4),
    ) {
        let mut bytes = valid_table_bytes(blocks, tail);
        // Header fields: version+flags, block size, virtual size, block count, or none.
        match field {
            0 => bytes[8..16].copy_from_slice(&value.to_le_bytes()),
            1 => bytes[16..24].copy_from_slice(&value.to_le_bytes()),
            2 => bytes[24..32].copy_from_slice(&value.to_le_bytes()),
            3 => bytes[32..40].copy_from_slice(&value.to_le_bytes()),
            _ => {}
        }
        for (at, byte, how) in edits {
            if bytes.is_empty() { break; }
            let i = at.index(bytes.len());
            match how {
                0 => bytes[i] = byte,
                1 => { bytes.remove(i); }
                2 => bytes.insert(i, byte),
                _ => bytes.truncate(i),
            }
        }
        load_bytes(&bytes);
    }
}

/// The digest of block `i` in a naive model: zero blocks as `zero_digest` of their length, others a marker.
fn model_digest(kind: u8, i: u64, count: u64, tail: u64) -> table::Digest {
    if kind == 0 {
        let len = if i + 1 == count && tail != 0 { tail } else { BS };
        table::Scheme::default().zero_digest(len)
    } else {
        [kind; 32]
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// A table holds only its non-zero blocks in memory and on disk; derive, diff and a save/load round trip
    /// agree with one digest per block.
    #[test]
    fn sparse_tables_agree_with_one_digest_per_block(
        blocks in 1u64..40,
        tail in 0u64..BS,
        parent in prop::collection::vec((0u64..48, 0u8..3), 0..30),
        child in prop::collection::vec((0u64..48, 0u8..3), 0..30),
    ) {
        let size = blocks * BS + tail;
        let count = size.div_ceil(BS);
        let changes = |list: &[(u64, u8)]| -> Vec<(u64, table::Digest)> {
            list.iter().filter(|(i, _)| *i < count).map(|&(i, k)| (i, model_digest(k, i, count, tail % BS))).collect()
        };
        let mut model = (0..count).map(|i| model_digest(0, i, count, tail % BS)).collect::<Vec<_>>();
        let zeroed = Table::zeroed(Scheme::default(), BS, size).unwrap();
        let a = Table::derive(&zeroed, &changes(&parent)).unwrap();
        for (i, d) in changes(&parent) {
            model[i as usize] = d;
        }
        prop_assert_eq!(a.digests().copied().collect::<Vec<_>>(), model.clone());
        let zero_blocks = (0..count).filter(|&i| a.is_zero(i)).count() as u64;
        prop_assert_eq!(a.stored(), count - zero_blocks);
        let b = Table::derive(&a, &changes(&child)).unwrap();
        let mut child_model = model.clone();
        for (i, d) in changes(&child) {
            child_model[i as usize] = d;
        }
        prop_assert_eq!(b.digests().copied().collect::<Vec<_>>(), child_model.clone());
        let naive_diff: Vec<u64> = (0..count).filter(|&i| model[i as usize] != child_model[i as usize]).collect();
        prop_assert_eq!(Table::diff(&a, &b).unwrap(), naive_diff.clone());
        prop_assert_eq!(Table::diff(&b, &a).unwrap(), naive_diff);
        prop_assert_eq!(Table::from_digests(Scheme::default(), BS, size, child_model).unwrap(), b.clone());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.table");
        let sha = b.save(&path).unwrap();
        prop_assert_eq!(Table::load(&path).unwrap(), b.clone());
        // The content id is the sha256 of the whole file; a difference against `a` derives `b` from it.
        prop_assert_eq!(hex_of(&b.content_id()), sha);
        let diff_path = dir.path().join("d.table");
        let diff_sha = b.save_against(Some((&a, &a.content_id())), &diff_path).unwrap();
        prop_assert_eq!(
            std::fs::metadata(&diff_path).unwrap().len(),
            table::diff_file_len(Table::diff(&a, &b).unwrap().len() as u64)
        );
        let TableFile::Diff(diff) = TableFile::load_verified(&diff_path, &diff_sha).unwrap() else {
            panic!("not a difference");
        };
        let mut derived = a.clone();
        derived.apply_diff(&a.content_id(), &diff, &diff_path).unwrap();
        prop_assert_eq!(&derived, &b);
        prop_assert_eq!(diff.id(), &b.content_id());
        // Mutated, a difference file is refused (corrupt, or not the base), or derives `b`, or a table whose
        // content id is not the one it records; it never panics.
        let mut bytes = std::fs::read(&diff_path).unwrap();
        let at = (blocks as usize * 7 + tail as usize) % bytes.len();
        bytes[at] ^= 0x5a;
        std::fs::write(&diff_path, &bytes).unwrap();
        let sha = table::sha256_file(&diff_path).unwrap();
        match TableFile::load_verified(&diff_path, &sha) {
            Ok(TableFile::Diff(diff)) => {
                let mut derived = a.clone();
                // What derives to the content id it records is `b`; anything else is refused by that id.
                if derived.apply_diff(&a.content_id(), &diff, &diff_path).is_ok() && derived.content_id() == *diff.id() {
                    prop_assert_eq!(&derived, &b);
                }
            }
            Ok(TableFile::Whole { .. }) => {}
            Err(e) => prop_assert!(matches!(e, Error::TableCorrupt { .. }), "{:?}", e),
        }
    }
}

fn hex_of(d: &table::Digest) -> String {
    use std::fmt::Write as _;
    d.iter().fold(String::new(), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}
