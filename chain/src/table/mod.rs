//! Checking tables: the sha256 of every fixed-size block of a disk as the guest sees it at a node (the last
//! block may be short and is hashed as it is). They let `verify` check a backup without its parents' data, and
//! let a backup find changed blocks by comparing against the previous node when QEMU has lost its bitmaps.
//!
//! File format (integers little-endian): magic `QBAKTBL1`, u32 version (1), u32 flags (0), u64 block size,
//! u64 virtual size, u64 block count (= virtual size / block size, rounded up), then one 32-byte digest per
//! block.

mod build;
mod source;

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read};
use std::path::Path;
use std::sync::{Mutex, OnceLock, PoisonError};

use sha2::{Digest as _, Sha256};

pub use build::{BlockSource, BlockVisitor, Extent, ExtentKind, Piece, VISIT_RUN_BYTES, Visited};
pub use source::{FileSource, MemSource};

use crate::error::{Error, Result};
use crate::fsio;

/// A block's sha256.
pub type Digest = [u8; 32];

/// The first 8 bytes of a table file.
pub const MAGIC: &[u8; 8] = b"QBAKTBL1";
/// The table format this qmpbak writes and reads.
pub const VERSION: u32 = 1;
/// Bytes before the first digest.
pub const HEADER_LEN: usize = 40;
/// The smallest block size a table may have (the repository's own minimum is larger).
pub const MIN_BLOCK_SIZE: u64 = 4 << 10;
/// The largest block size a table may have.
pub const MAX_BLOCK_SIZE: u64 = 16 << 20;
/// The most blocks a table may have: 2 GiB of digests in memory, a 64 TiB disk at the default 1 MiB block
/// size. Sizes come from qcow2 headers, NBD servers and table files, so they are checked before they size
/// anything ([`check_size`]).
pub const MAX_BLOCKS: u64 = 1 << 26;
/// The largest disk a table may cover: offsets must fit an `off_t`.
pub const MAX_VIRTUAL_SIZE: u64 = i64::MAX as u64;

/// A checking table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    block_size: u64,
    virtual_size: u64,
    digests: Vec<Digest>,
    /// Digest of an all-zero block of `block_size` bytes.
    zero_full: Digest,
    /// Digest of an all-zero last block (which may be shorter).
    zero_last: Digest,
    /// The digests are keyed (HMAC with a repository's table key, [`crate::crypt::TableKey`]): flag bit 0 in
    /// the file. Zero blocks cannot be recognised in such a table.
    keyed: bool,
}

/// The file flag of a keyed table.
const FLAG_KEYED: u32 = 1;

/// Checks a table block size ([`Error::InvalidBlockSize`]).
pub fn check_block_size(block_size: u64) -> Result<()> {
    if block_size.is_power_of_two() && (MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size) {
        Ok(())
    } else {
        Err(Error::InvalidBlockSize {
            block_size,
            min: MIN_BLOCK_SIZE,
            max: MAX_BLOCK_SIZE,
        })
    }
}

/// The number of blocks of a table for a disk of `virtual_size` bytes, if a table may cover it:
/// [`Error::DiskTooLarge`] past [`MAX_VIRTUAL_SIZE`] or [`MAX_BLOCKS`].
pub fn check_size(virtual_size: u64, block_size: u64) -> Result<u64> {
    check_block_size(block_size)?;
    let count = block_count(virtual_size, block_size);
    if virtual_size > MAX_VIRTUAL_SIZE || count > MAX_BLOCKS {
        return Err(Error::DiskTooLarge {
            virtual_size,
            block_size,
            max_blocks: MAX_BLOCKS,
        });
    }
    Ok(count)
}

/// Number of blocks covering `virtual_size` bytes.
pub fn block_count(virtual_size: u64, block_size: u64) -> u64 {
    virtual_size.div_ceil(block_size)
}

/// sha256 of `data`.
pub fn digest_of(data: &[u8]) -> Digest {
    Sha256::digest(data).into()
}

static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

/// Feeds `len` zero bytes to `hasher` without allocating them.
fn hash_zeros(hasher: &mut Sha256, mut len: u64) {
    while len > 0 {
        let n = len.min(ZEROS.len() as u64) as usize;
        hasher.update(&ZEROS[..n]);
        len -= n as u64;
    }
}

/// sha256 of `len` zero bytes; computed once per length and cached.
pub fn zero_digest(len: u64) -> Digest {
    static CACHE: OnceLock<Mutex<HashMap<u64, Digest>>> = OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    if let Some(d) = cache.lock().unwrap_or_else(PoisonError::into_inner).get(&len) {
        return *d;
    }
    let mut hasher = Sha256::new();
    hash_zeros(&mut hasher, len);
    let digest: Digest = hasher.finalize().into();
    cache
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(len, digest);
    digest
}

/// A hasher that has absorbed `len` zero bytes: where a block that starts with a hole continues from. Blocks
/// often do (a data extent that starts inside a block), and their leading zeros then cost nothing after the
/// first time. Cached per length when `len` is a multiple of 4 KiB (which bounds the cache to block size /
/// 4 KiB entries); other lengths are hashed each time.
pub(crate) fn zero_prefix_hasher(len: u64) -> Sha256 {
    static CACHE: OnceLock<Mutex<HashMap<u64, Sha256>>> = OnceLock::new();
    if len % 4096 != 0 || len > MAX_BLOCK_SIZE {
        let mut hasher = Sha256::new();
        hash_zeros(&mut hasher, len);
        return hasher;
    }
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    if let Some(h) = cache.lock().unwrap_or_else(PoisonError::into_inner).get(&len) {
        return h.clone();
    }
    let mut hasher = Sha256::new();
    hash_zeros(&mut hasher, len);
    cache
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(len, hasher.clone());
    hasher
}

impl Table {
    /// A table from its parts; `digests` must have one entry per block.
    pub fn from_digests(block_size: u64, virtual_size: u64, digests: Vec<Digest>) -> Result<Table> {
        let count = check_size(virtual_size, block_size)?;
        if digests.len() as u64 != count {
            return Err(Error::DigestCount {
                given: digests.len() as u64,
                expected: count,
            });
        }
        Ok(Table::assemble(block_size, virtual_size, digests))
    }

    /// [`Table::from_digests`] for keyed digests ([`crate::crypt::TableKey`]).
    pub fn from_digests_keyed(block_size: u64, virtual_size: u64, digests: Vec<Digest>) -> Result<Table> {
        let mut table = Table::from_digests(block_size, virtual_size, digests)?;
        table.keyed = true;
        Ok(table)
    }

    /// Whether the digests are keyed.
    pub fn is_keyed(&self) -> bool {
        self.keyed
    }

    /// Builds the struct; the caller has checked the sizes.
    fn assemble(block_size: u64, virtual_size: u64, digests: Vec<Digest>) -> Table {
        let last_len = match virtual_size % block_size {
            0 => block_size,
            rest => rest,
        };
        Table {
            block_size,
            virtual_size,
            digests,
            zero_full: zero_digest(block_size),
            zero_last: zero_digest(last_len),
            keyed: false,
        }
    }

    /// The table of an all-zero disk (a new, empty one).
    pub fn zeroed(block_size: u64, virtual_size: u64) -> Result<Table> {
        let count = check_size(virtual_size, block_size)? as usize;
        let mut table = Table::assemble(block_size, virtual_size, Vec::new());
        table.digests = vec![table.zero_full; count];
        if let Some(last) = table.digests.last_mut() {
            *last = table.zero_last;
        }
        Ok(table)
    }

    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    pub fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    /// The number of blocks.
    pub fn len(&self) -> u64 {
        self.digests.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }

    pub fn digests(&self) -> &[Digest] {
        &self.digests
    }

    /// Block `index`'s digest.
    pub fn digest(&self, index: u64) -> Option<&Digest> {
        self.digests.get(usize::try_from(index).ok()?)
    }

    /// The byte range of block `index`: its offset and length (the last one may be short).
    pub fn block_range(&self, index: u64) -> (u64, u64) {
        block_range(index, self.block_size, self.virtual_size)
    }

    fn zero_for(&self, index: u64) -> Digest {
        if index + 1 == self.len() {
            self.zero_last
        } else {
            self.zero_full
        }
    }

    /// Whether block `index` is all zeros (false past the end).
    pub fn is_zero(&self, index: u64) -> bool {
        !self.keyed && self.digest(index).is_some_and(|d| *d == self.zero_for(index))
    }

    /// The table of a child node: the parent's digests with `changed` ones replaced.
    pub fn derive(parent: &Table, changed: &[(u64, Digest)]) -> Result<Table> {
        let mut child = parent.clone();
        for &(index, digest) in changed {
            let count = child.len();
            let slot = usize::try_from(index)
                .ok()
                .and_then(|i| child.digests.get_mut(i))
                .ok_or(Error::BlockOutOfRange { index, count })?;
            *slot = digest;
        }
        Ok(child)
    }

    /// The blocks whose digests differ. Tables of different shape (block size or virtual size: a resized
    /// disk) are [`Error::TableShapeMismatch`].
    pub fn diff(a: &Table, b: &Table) -> Result<Vec<u64>> {
        if a.block_size != b.block_size || a.virtual_size != b.virtual_size {
            return Err(Error::TableShapeMismatch {
                left: (a.block_size, a.virtual_size),
                right: (b.block_size, b.virtual_size),
            });
        }
        Ok(a.digests
            .iter()
            .zip(&b.digests)
            .enumerate()
            .filter(|(_, (x, y))| x != y)
            .map(|(i, _)| i as u64)
            .collect())
    }

    /// The file contents.
    fn encode(&self, out: &mut dyn io::Write) -> io::Result<()> {
        out.write_all(MAGIC)?;
        out.write_all(&VERSION.to_le_bytes())?;
        let flags = if self.keyed { FLAG_KEYED } else { 0 };
        out.write_all(&flags.to_le_bytes())?;
        out.write_all(&self.block_size.to_le_bytes())?;
        out.write_all(&self.virtual_size.to_le_bytes())?;
        out.write_all(&self.len().to_le_bytes())?;
        for digest in &self.digests {
            out.write_all(digest)?;
        }
        Ok(())
    }

    /// Writes the table to `path` atomically (mode 0600) and returns the sha256 of the file, in hex, for the
    /// manifest.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<String> {
        let mut hasher = Sha256::new();
        fsio::write_atomic_with(path.as_ref(), true, |w| {
            let mut tee = HashingWriter {
                inner: w,
                hasher: &mut hasher,
            };
            self.encode(&mut tee)
        })?;
        Ok(hex::encode(hasher.finalize()))
    }

    /// Reads a table file, checking its header, sizes and length ([`Error::TableCorrupt`]).
    pub fn load(path: impl AsRef<Path>) -> Result<Table> {
        let path = path.as_ref();
        let bytes = read_table_file(path)?;
        Table::decode(&bytes).map_err(|detail| Error::TableCorrupt {
            path: path.to_owned(),
            detail,
        })
    }

    /// Reads a table file whose sha256 must be `expected_sha256` (hex), reading it once.
    pub fn load_verified(path: impl AsRef<Path>, expected_sha256: &str) -> Result<Table> {
        let path = path.as_ref();
        let bytes = read_table_file(path)?;
        check_sha256(path, &hex::encode(Sha256::digest(&bytes)), expected_sha256)?;
        Table::decode(&bytes).map_err(|detail| Error::TableCorrupt {
            path: path.to_owned(),
            detail,
        })
    }

    /// Checks that the file at `path` has sha256 `expected_sha256` (hex): [`Error::TableChecksumMismatch`]
    /// if not.
    pub fn verify_file(path: impl AsRef<Path>, expected_sha256: &str) -> Result<()> {
        let path = path.as_ref();
        check_sha256(path, &sha256_file(path)?, expected_sha256)
    }

    fn decode(bytes: &[u8]) -> std::result::Result<Table, String> {
        if bytes.len() < HEADER_LEN {
            return Err(format!(
                "it is {} bytes long, shorter than the {HEADER_LEN}-byte header",
                bytes.len()
            ));
        }
        if &bytes[..8] != MAGIC {
            return Err(format!(
                "it does not start with {:?} (not a checking table)",
                String::from_utf8_lossy(MAGIC)
            ));
        }
        let u32_at = |at: usize| u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
        let u64_at = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[at..at + 8]);
            u64::from_le_bytes(b)
        };
        let version = u32_at(8);
        if version != VERSION {
            return Err(if version > VERSION {
                format!("format version {version}, written by a newer qmpbak (this one reads {VERSION})")
            } else {
                format!("unknown format version {version}")
            });
        }
        let flags = u32_at(12);
        if flags & !FLAG_KEYED != 0 {
            return Err(format!("unknown flags {flags:#x}"));
        }
        let (block_size, virtual_size, count) = (u64_at(16), u64_at(24), u64_at(32));
        if check_block_size(block_size).is_err() {
            return Err(format!(
                "block size {block_size} is not a power of two from {MIN_BLOCK_SIZE} to {MAX_BLOCK_SIZE}"
            ));
        }
        let expected_count = check_size(virtual_size, block_size).map_err(|e| e.to_string())?;
        if count != expected_count {
            return Err(format!(
                "it says {count} blocks, but {virtual_size} bytes in blocks of {block_size} make {expected_count}"
            ));
        }
        let body = (bytes.len() - HEADER_LEN) as u64;
        if body != count.saturating_mul(32) {
            let what = if body < count.saturating_mul(32) {
                "truncated"
            } else {
                "longer than its header says"
            };
            return Err(format!(
                "{what}: {body} bytes of digests for {count} blocks (expected {})",
                count * 32
            ));
        }
        let digests = bytes[HEADER_LEN..]
            .chunks_exact(32)
            .map(|c| {
                let mut d = [0u8; 32];
                d.copy_from_slice(c);
                d
            })
            .collect();
        let mut table = Table::assemble(block_size, virtual_size, digests);
        table.keyed = flags & FLAG_KEYED != 0;
        Ok(table)
    }
}

/// The largest table file there can be.
const MAX_FILE_LEN: u64 = HEADER_LEN as u64 + MAX_BLOCKS * 32;

/// A table file's bytes, its length checked before anything is read: a file longer than any table is
/// [`Error::TableCorrupt`] without being read.
fn read_table_file(path: &Path) -> Result<Vec<u8>> {
    let mut file = File::open(path).map_err(Error::io("open", path))?;
    let len = file.metadata().map_err(Error::io("stat", path))?.len();
    if len > MAX_FILE_LEN {
        return Err(Error::TableCorrupt {
            path: path.to_owned(),
            detail: format!("it is {len} bytes long, longer than any checking table ({MAX_FILE_LEN} bytes)"),
        });
    }
    let mut bytes = Vec::with_capacity(len as usize);
    file.read_to_end(&mut bytes).map_err(Error::io("read", path))?;
    Ok(bytes)
}

/// The byte range of block `index` of a disk: offset and length (the last block may be short).
pub fn block_range(index: u64, block_size: u64, virtual_size: u64) -> (u64, u64) {
    let offset = index.saturating_mul(block_size);
    (offset, block_size.min(virtual_size.saturating_sub(offset)))
}

/// sha256 of a file, in hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = File::open(path).map_err(Error::io("open", path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(Error::io("read", path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

fn check_sha256(path: &Path, actual: &str, expected: &str) -> Result<()> {
    if actual.eq_ignore_ascii_case(expected) {
        Ok(())
    } else {
        Err(Error::TableChecksumMismatch {
            path: path.to_owned(),
            expected: expected.to_owned(),
            actual: actual.to_owned(),
        })
    }
}

/// Writes through to `inner` and hashes what was written.
struct HashingWriter<'a> {
    inner: &'a mut dyn io::Write,
    hasher: &'a mut Sha256,
}

impl io::Write for HashingWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BS: u64 = 4096;

    fn sample() -> Table {
        // 3 full blocks and a short one.
        let digests = (0..4u8).map(|i| [i; 32]).collect();
        Table::from_digests(BS, 3 * BS + 100, digests).unwrap()
    }

    #[test]
    fn save_load_round_trip_and_checksum() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.table");
        let table = sample();
        let sha = table.save(&path).unwrap();
        assert_eq!(sha, sha256_file(&path).unwrap());
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            HEADER_LEN as u64 + 4 * 32
        );
        assert_eq!(Table::load(&path).unwrap(), table);
        Table::verify_file(&path, &sha).unwrap();
        assert_eq!(Table::load_verified(&path, &sha.to_uppercase()).unwrap(), table);
        let wrong = "0".repeat(64);
        let err = Table::verify_file(&path, &wrong).unwrap_err();
        assert!(matches!(err, Error::TableChecksumMismatch { .. }), "{err:?}");
        assert!(err.to_string().contains("d.table"), "{err}");
        assert!(matches!(
            Table::load_verified(&path, &wrong),
            Err(Error::TableChecksumMismatch { .. })
        ));
    }

    fn corrupt(bytes: &[u8], want: &str) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.table");
        std::fs::write(&path, bytes).unwrap();
        let err = Table::load(&path).unwrap_err();
        let Error::TableCorrupt { path: p, detail } = &err else {
            panic!("{err:?}")
        };
        assert_eq!(p, &path);
        assert!(detail.contains(want), "{detail}");
        assert!(err.to_string().contains("bad.table"), "{err}");
    }

    #[test]
    fn corrupt_files_are_named() {
        let mut good = Vec::new();
        sample().encode(&mut good).unwrap();
        corrupt(&[], "shorter than");
        corrupt(&good[..20], "shorter than");
        let mut bad_magic = good.clone();
        bad_magic[0] = b'X';
        corrupt(&bad_magic, "does not start");
        let mut newer = good.clone();
        newer[8] = 2;
        corrupt(&newer, "newer qmpbak");
        let mut flags = good.clone();
        flags[12] = 2;
        corrupt(&flags, "flags");
        let mut bs = good.clone();
        bs[16] = 1;
        corrupt(&bs, "block size");
        let mut count = good.clone();
        count[32] = 5;
        corrupt(&count, "make 4");
        corrupt(&good[..good.len() - 1], "truncated");
        let mut longer = good.clone();
        longer.push(0);
        corrupt(&longer, "longer than");
    }

    #[test]
    fn zero_blocks_are_recognised_including_a_short_last_one() {
        let table = Table::zeroed(BS, 2 * BS + 10).unwrap();
        assert_eq!(table.len(), 3);
        assert!((0..3).all(|i| table.is_zero(i)));
        assert!(!table.is_zero(3));
        assert_eq!(table.digest(2), Some(&digest_of(&[0; 10])));
        assert_eq!(table.digest(0), Some(&digest_of(&[0; BS as usize])));
        assert_eq!(table.block_range(2), (2 * BS, 10));
        assert!(!sample().is_zero(0));
    }

    #[test]
    fn derive_and_diff() {
        let parent = sample();
        let changed = [(1, [9; 32]), (3, [8; 32])];
        let child = Table::derive(&parent, &changed).unwrap();
        assert_eq!(Table::diff(&parent, &child).unwrap(), vec![1, 3]);
        assert_eq!(Table::diff(&child, &child).unwrap(), Vec::<u64>::new());
        assert!(matches!(
            Table::derive(&parent, &[(4, [0; 32])]),
            Err(Error::BlockOutOfRange { index: 4, count: 4 })
        ));
        let grown = Table::zeroed(BS, 4 * BS + 100).unwrap();
        let err = Table::diff(&parent, &grown).unwrap_err();
        assert!(matches!(err, Error::TableShapeMismatch { .. }), "{err:?}");
        assert!(err.to_string().contains("resized"), "{err}");
        let other_bs = Table::zeroed(2 * BS, 3 * BS + 100).unwrap();
        assert!(matches!(
            Table::diff(&parent, &other_bs),
            Err(Error::TableShapeMismatch { .. })
        ));
    }

    #[test]
    fn block_sizes_are_checked() {
        assert!(matches!(
            Table::zeroed(1000, 10),
            Err(Error::InvalidBlockSize { .. })
        ));
        assert!(Table::zeroed(MIN_BLOCK_SIZE / 2, 10).is_err());
        assert!(Table::zeroed(MAX_BLOCK_SIZE * 2, 10).is_err());
        assert!(matches!(
            Table::from_digests(BS, BS, vec![]),
            Err(Error::DigestCount {
                given: 0,
                expected: 1
            })
        ));
        let empty = Table::zeroed(BS, 0).unwrap();
        assert!(empty.is_empty());
    }
}
