//! Checking tables: a SHA-256 digest of every fixed-size block of a disk as the guest sees it at a node (the
//! last block may be short and is hashed as it is), computed by the table's [`Scheme`]. They let `verify`
//! check a backup without its parents' data, and let a backup find changed blocks by comparing against the
//! previous node when QEMU has lost its bitmaps.
//!
//! File format (integers little-endian): magic `QBAKTBL1`, u32 version, u32 flags (bit 0: keyed; bit 1: the
//! digests are by [`Scheme::Pieces`], else [`Scheme::Flat`]; a table written before pieces has it clear), u64 block
//! size, u64 virtual size, u64 block count (= virtual size / block size, rounded up), then
//! - version 2 (plain tables): a presence bitmap of `ceil(count / 8)` bytes (bit `i % 8` of byte `i / 8` set when
//!   block `i` is stored; unused bits zero), then one 32-byte digest per stored block in block order. A block not
//!   stored is all zeros: a mostly empty disk has a table the size of its data, not of its virtual size
//!   (128 KiB of bitmap per TiB);
//! - version 1 (keyed tables, and every table an older qmpbak wrote): one 32-byte digest per block. A keyed
//!   table stays dense: a zero block's keyed digest cannot be told from another's, and leaving zero blocks out
//!   would show which blocks of an encrypted disk are zeros;
//! - version 3 (a *difference* table, [`TableDiff`]): the content id of the node's full table and of the table
//!   it is a difference against (32 bytes each), a u64 number of entries, then per entry a u64 block index
//!   (strictly increasing, below the block count) and the block's 32-byte digest: only the blocks whose
//!   digest differs from the base's, a block that became zeros included (keyed or plain alike, so a keyed
//!   difference shows no more than which blocks changed, which the node's qcow2 shows anyway).
//!
//! A table's *content id* ([`Table::content_id`]) is the sha256 of its whole encoding (version 2 for a plain
//! table, version 1 for a keyed one): the sha256 of the file that a whole table of this content is. A
//! difference table names its base by content id, not by file, so rewriting a table as whole or against
//! another base (prune, merge) changes no id and no table that names it.

mod build;
mod diff;
mod hash;
mod source;

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

use sha2::{Digest as _, Sha256};

pub use build::{BlockSource, BlockVisitor, Extent, ExtentKind, Piece, VISIT_RUN_BYTES, Visited};
pub use diff::{TableDiff, TableFile, diff_file_len, is_difference_file};
pub use hash::{PIECE_SIZE, Scheme, all_zero};
pub use source::{FileSource, MemSource};

use crate::error::{Error, Result};
use crate::fsio;

/// A block's digest (32 bytes of SHA-256, by the table's [`Scheme`]).
pub type Digest = [u8; 32];

/// The first 8 bytes of a table file.
pub const MAGIC: &[u8; 8] = b"QBAKTBL1";
/// The newest table format this qmpbak writes and reads: zero blocks implicit (plain tables).
pub const VERSION: u32 = 2;
/// The dense format: a digest per block (keyed tables; every table before version 2).
pub const VERSION_DENSE: u32 = 1;
/// The difference format: the blocks that differ from a base table ([`TableDiff`]).
pub const VERSION_DIFF: u32 = 3;
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
    /// The number of blocks.
    count: u64,
    blocks: Blocks,
    /// Digest of an all-zero block of `block_size` bytes.
    zero_full: Digest,
    /// Digest of an all-zero last block (which may be shorter).
    zero_last: Digest,
    /// The digests are keyed (HMAC with a repository's table key, [`crate::crypt::TableKey`]): flag bit 0 in
    /// the file. Zero blocks cannot be recognised in such a table.
    keyed: bool,
    /// How the digests were computed: flag bit 1 in the file.
    scheme: Scheme,
}

/// A table's digests in memory.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Blocks {
    /// One digest per block: keyed tables, whose zero blocks cannot be recognised.
    Dense(Vec<Digest>),
    /// The blocks that are not all zeros, sorted by index, never a zero block's digest: plain tables. A mostly
    /// empty 1 TiB disk then takes a few KiB of memory, not 32 MiB per table.
    Sparse(Vec<(u64, Digest)>),
}

/// The file flag of a keyed table.
const FLAG_KEYED: u32 = 1;

/// A table file's flags: keyed or not, and the scheme's bit.
fn file_flags(keyed: bool, scheme: Scheme) -> u32 {
    let keyed = if keyed { FLAG_KEYED } else { 0 };
    keyed | scheme.flag()
}

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

impl Table {
    /// A table from its parts; `digests`, computed by `scheme`, must have one entry per block.
    pub fn from_digests(
        scheme: Scheme,
        block_size: u64,
        virtual_size: u64,
        digests: Vec<Digest>,
    ) -> Result<Table> {
        let count = check_size(virtual_size, block_size)?;
        if digests.len() as u64 != count {
            return Err(Error::DigestCount {
                given: digests.len() as u64,
                expected: count,
            });
        }
        Ok(Table::assemble(scheme, block_size, virtual_size, digests))
    }

    /// [`Table::from_digests`] for keyed digests ([`crate::crypt::TableKey`]).
    pub fn from_digests_keyed(
        scheme: Scheme,
        block_size: u64,
        virtual_size: u64,
        digests: Vec<Digest>,
    ) -> Result<Table> {
        let count = check_size(virtual_size, block_size)?;
        if digests.len() as u64 != count {
            return Err(Error::DigestCount {
                given: digests.len() as u64,
                expected: count,
            });
        }
        let mut table = Table::shape(scheme, block_size, virtual_size, Blocks::Dense(digests));
        table.keyed = true;
        Ok(table)
    }

    /// Whether the digests are keyed.
    pub fn is_keyed(&self) -> bool {
        self.keyed
    }

    /// How its digests are computed.
    pub fn scheme(&self) -> Scheme {
        self.scheme
    }

    /// A plain table from one digest per block (the caller has checked the sizes): its zero blocks are
    /// dropped.
    fn assemble(scheme: Scheme, block_size: u64, virtual_size: u64, digests: Vec<Digest>) -> Table {
        let mut table = Table::shape(scheme, block_size, virtual_size, Blocks::Sparse(Vec::new()));
        let stored = digests
            .into_iter()
            .enumerate()
            .map(|(i, d)| (i as u64, d))
            .filter(|(i, d)| *d != table.zero_for(*i))
            .collect();
        table.blocks = Blocks::Sparse(stored);
        table
    }

    /// The struct around `blocks`, plain; the caller has checked the sizes.
    fn shape(scheme: Scheme, block_size: u64, virtual_size: u64, blocks: Blocks) -> Table {
        let last_len = match virtual_size % block_size {
            0 => block_size,
            rest => rest,
        };
        Table {
            block_size,
            virtual_size,
            count: block_count(virtual_size, block_size),
            blocks,
            zero_full: scheme.zero_digest(block_size),
            zero_last: scheme.zero_digest(last_len),
            keyed: false,
            scheme,
        }
    }

    /// The table of an all-zero disk (a new, empty one) whose digests are computed by `scheme`.
    pub fn zeroed(scheme: Scheme, block_size: u64, virtual_size: u64) -> Result<Table> {
        check_size(virtual_size, block_size)?;
        Ok(Table::shape(
            scheme,
            block_size,
            virtual_size,
            Blocks::Sparse(Vec::new()),
        ))
    }

    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    pub fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    /// The number of blocks.
    pub fn len(&self) -> u64 {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Every block's digest, in block order (zero blocks included).
    pub fn digests(&self) -> impl Iterator<Item = &Digest> + '_ {
        (0..self.count).filter_map(|i| self.digest(i))
    }

    /// The number of digests held in memory: every block's for a keyed table, the non-zero blocks' for a
    /// plain one.
    pub fn stored(&self) -> u64 {
        match &self.blocks {
            Blocks::Dense(d) => d.len() as u64,
            Blocks::Sparse(s) => s.len() as u64,
        }
    }

    /// Block `index`'s digest (`None` past the end).
    pub fn digest(&self, index: u64) -> Option<&Digest> {
        if index >= self.count {
            return None;
        }
        match &self.blocks {
            Blocks::Dense(d) => d.get(usize::try_from(index).ok()?),
            Blocks::Sparse(s) => Some(match s.binary_search_by_key(&index, |(i, _)| *i) {
                Ok(at) => &s[at].1,
                Err(_) => self.zero_ref(index),
            }),
        }
    }

    /// The byte range of block `index`: its offset and length (the last one may be short).
    pub fn block_range(&self, index: u64) -> (u64, u64) {
        block_range(index, self.block_size, self.virtual_size)
    }

    fn zero_for(&self, index: u64) -> Digest {
        *self.zero_ref(index)
    }

    fn zero_ref(&self, index: u64) -> &Digest {
        if index + 1 == self.count {
            &self.zero_last
        } else {
            &self.zero_full
        }
    }

    /// Whether block `index` is all zeros (false past the end).
    pub fn is_zero(&self, index: u64) -> bool {
        !self.keyed && self.digest(index).is_some_and(|d| *d == self.zero_for(index))
    }

    /// The table of a child node: the parent's digests with `changed` ones replaced (a later entry for the
    /// same block wins). Linear in the parent's stored blocks plus the changes.
    pub fn derive(parent: &Table, changed: &[(u64, Digest)]) -> Result<Table> {
        let mut child = parent.clone();
        child.apply(changed)?;
        Ok(child)
    }

    /// [`Table::derive`] in place: replaces the `changed` digests (a later entry for the same block wins).
    pub fn apply(&mut self, changed: &[(u64, Digest)]) -> Result<()> {
        let count = self.count;
        if let Some(&(index, _)) = changed.iter().find(|(i, _)| *i >= count) {
            return Err(Error::BlockOutOfRange { index, count });
        }
        let (zero_full, zero_last) = (self.zero_full, self.zero_last);
        let zero_for = |index: u64| if index + 1 == count { zero_last } else { zero_full };
        match &mut self.blocks {
            Blocks::Dense(digests) => {
                for &(index, digest) in changed {
                    // in range: checked above
                    if let Some(slot) = usize::try_from(index).ok().and_then(|i| digests.get_mut(i)) {
                        *slot = digest;
                    }
                }
            }
            Blocks::Sparse(stored) => {
                let mut sorted = changed.to_vec();
                // stable: among entries for one block, the last stays last
                sorted.sort_by_key(|(i, _)| *i);
                let mut merged = Vec::with_capacity(stored.len() + changed.len());
                let mut old = std::mem::take(stored).into_iter().peekable();
                let mut new = sorted.into_iter().peekable();
                while let Some(&(index, digest)) = new.peek() {
                    while old.peek().is_some_and(|(i, _)| *i < index) {
                        merged.extend(old.next());
                    }
                    new.next();
                    if new.peek().is_some_and(|(i, _)| *i == index) {
                        continue;
                    }
                    if old.peek().is_some_and(|(i, _)| *i == index) {
                        old.next();
                    }
                    if digest != zero_for(index) {
                        merged.push((index, digest));
                    }
                }
                merged.extend(old);
                *stored = merged;
            }
        }
        Ok(())
    }

    /// The content id: the sha256 of the table's whole encoding (version 2 plain, version 1 keyed), which is
    /// the sha256 of the file [`Table::save`] writes for it. A difference table names its base by it.
    pub fn content_id(&self) -> Digest {
        let mut hasher = Sha256::new();
        {
            let mut sink = io::sink();
            let mut tee = HashingWriter {
                inner: &mut sink,
                hasher: &mut hasher,
            };
            let mut buffered = io::BufWriter::with_capacity(1 << 16, &mut tee);
            // Writing into a sink cannot fail.
            let _ = self.encode(&mut buffered);
            let _ = io::Write::flush(&mut buffered);
        }
        hasher.finalize().into()
    }

    /// Whether `other` covers the same disk the same way (block size, virtual size, keyed or not, scheme):
    /// whether one can be a difference against the other, and their digests be compared.
    pub fn same_shape(&self, other: &Table) -> bool {
        self.block_size == other.block_size
            && self.virtual_size == other.virtual_size
            && self.keyed == other.keyed
            && self.scheme == other.scheme
    }

    /// The blocks whose digests differ. Tables of different shape (block size or virtual size: a resized
    /// disk) are [`Error::TableShapeMismatch`]. Two plain tables are compared by their stored blocks alone.
    pub fn diff(a: &Table, b: &Table) -> Result<Vec<u64>> {
        if a.block_size != b.block_size || a.virtual_size != b.virtual_size {
            return Err(Error::TableShapeMismatch {
                left: (a.block_size, a.virtual_size),
                right: (b.block_size, b.virtual_size),
            });
        }
        if a.scheme != b.scheme {
            return Err(Error::TableSchemeMismatch {
                left: a.scheme,
                right: b.scheme,
            });
        }
        let (Blocks::Sparse(left), Blocks::Sparse(right)) = (&a.blocks, &b.blocks) else {
            return Ok((0..a.count).filter(|&i| a.digest(i) != b.digest(i)).collect());
        };
        // Both hold only non-zero blocks: a block stored in one alone differs.
        let mut out = Vec::new();
        let (mut left, mut right) = (left.iter().peekable(), right.iter().peekable());
        loop {
            let (take_left, take_right) = match (left.peek().map(|e| e.0), right.peek().map(|e| e.0)) {
                (None, None) => break,
                (Some(l), Some(r)) => (l <= r, r <= l),
                (Some(_), None) => (true, false),
                (None, Some(_)) => (false, true),
            };
            let here = (left.next_if(|_| take_left), right.next_if(|_| take_right));
            match here {
                (Some(l), Some(r)) if l.1 == r.1 => {}
                (Some(e), _) | (None, Some(e)) => out.push(e.0),
                (None, None) => {}
            }
        }
        Ok(out)
    }

    /// The file contents: version 2 for a plain table, version 1 (dense) for a keyed one.
    fn encode(&self, out: &mut dyn io::Write) -> io::Result<()> {
        self.encode_as(if self.keyed { VERSION_DENSE } else { VERSION }, out)
    }

    /// The file contents in format `version` (1 or 2).
    fn encode_as(&self, version: u32, out: &mut dyn io::Write) -> io::Result<()> {
        out.write_all(MAGIC)?;
        out.write_all(&version.to_le_bytes())?;
        let flags = file_flags(self.keyed, self.scheme);
        out.write_all(&flags.to_le_bytes())?;
        out.write_all(&self.block_size.to_le_bytes())?;
        out.write_all(&self.virtual_size.to_le_bytes())?;
        out.write_all(&self.len().to_le_bytes())?;
        if version == VERSION_DENSE {
            for digest in self.digests() {
                out.write_all(digest)?;
            }
            return Ok(());
        }
        let stored: Vec<(u64, &Digest)> = match &self.blocks {
            // only non-zero blocks, in order
            Blocks::Sparse(stored) => stored.iter().map(|(i, d)| (*i, d)).collect(),
            Blocks::Dense(_) => (0..self.count)
                .filter_map(|i| self.digest(i).map(|d| (i, d)))
                .filter(|(i, _)| !self.is_zero(*i))
                .collect(),
        };
        let mut bitmap = vec![0u8; bitmap_len(self.count)];
        for (i, _) in &stored {
            bitmap[(i / 8) as usize] |= 1 << (i % 8);
        }
        out.write_all(&bitmap)?;
        for (_, digest) in stored {
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
        match Table::decode_any(bytes)? {
            (TableFile::Whole { table, .. }, _) => Ok(table),
            (TableFile::Diff(_), _) => Err(format!(
                "it is a difference table (format version {VERSION_DIFF}): it holds only the blocks that differ \
                 from its parent node's table and is read through the node's recovery chain"
            )),
        }
    }

    /// Any table file: a whole table (its content id left zero for the caller, who knows the file's sha256)
    /// or a difference, and whether a whole table is encoded canonically (then its content id is the file's
    /// sha256).
    fn decode_any(bytes: &[u8]) -> std::result::Result<(TableFile, bool), String> {
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
        if ![VERSION, VERSION_DENSE, VERSION_DIFF].contains(&version) {
            return Err(if version > VERSION_DIFF {
                format!(
                    "format version {version}, written by a newer qmpbak (this one reads up to {VERSION_DIFF})"
                )
            } else {
                format!("unknown format version {version}")
            });
        }
        let flags = u32_at(12);
        if flags & !(FLAG_KEYED | hash::FLAG_PIECES) != 0 {
            return Err(format!("unknown flags {flags:#x} (written by a newer qmpbak?)"));
        }
        let keyed = flags & FLAG_KEYED != 0;
        let scheme = Scheme::from_flags(flags);
        if keyed && version == VERSION {
            return Err(format!(
                "a keyed table in format version {version}: keyed tables are only written dense (version {VERSION_DENSE})"
            ));
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
        let whole = |table: Table, canonical: bool| (TableFile::Whole { table, id: [0; 32] }, canonical);
        if version == VERSION_DIFF {
            let diff = diff::decode(
                block_size,
                virtual_size,
                count,
                keyed,
                scheme,
                &bytes[HEADER_LEN..],
            )?;
            return Ok((TableFile::Diff(diff), false));
        }
        if version == VERSION {
            let (table, canonical) =
                Table::decode_sparse(scheme, block_size, virtual_size, count, &bytes[HEADER_LEN..])?;
            return Ok(whole(table, canonical));
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
        Ok(if keyed {
            let mut table = Table::shape(scheme, block_size, virtual_size, Blocks::Dense(digests));
            table.keyed = true;
            whole(table, true)
        } else {
            whole(Table::assemble(scheme, block_size, virtual_size, digests), false)
        })
    }

    /// The body of a version 2 table: presence bitmap, then the stored digests. `count` is checked.
    fn decode_sparse(
        scheme: Scheme,
        block_size: u64,
        virtual_size: u64,
        count: u64,
        body: &[u8],
    ) -> std::result::Result<(Table, bool), String> {
        let map_len = bitmap_len(count);
        let Some((bitmap, digests)) = body.split_at_checked(map_len) else {
            return Err(format!(
                "truncated: {} bytes for a presence bitmap of {map_len} bytes",
                body.len()
            ));
        };
        if count % 8 != 0 && bitmap.last().is_some_and(|last| last >> (count % 8) != 0) {
            return Err(format!(
                "its presence bitmap marks blocks past the last one ({count} blocks)"
            ));
        }
        let stored: u64 = bitmap.iter().map(|b| u64::from(b.count_ones())).sum();
        let body = digests.len() as u64;
        if body != stored * 32 {
            let what = if body < stored * 32 {
                "truncated"
            } else {
                "longer than its header says"
            };
            return Err(format!(
                "{what}: {body} bytes of digests for {stored} stored blocks (expected {})",
                stored * 32
            ));
        }
        let mut table = Table::zeroed(scheme, block_size, virtual_size).map_err(|e| e.to_string())?;
        // The set bits in order, a byte at a time: a mostly empty table has mostly zero bytes.
        let indices = bitmap
            .iter()
            .enumerate()
            .filter(|(_, b)| **b != 0)
            .flat_map(|(at, b)| {
                (0..8u64)
                    .filter(move |bit| b & (1 << bit) != 0)
                    .map(move |bit| at as u64 * 8 + bit)
            });
        let stored: Vec<(u64, Digest)> = indices
            .zip(digests.chunks_exact(32))
            .map(|(i, c)| {
                let mut d = [0u8; 32];
                d.copy_from_slice(c);
                (i, d)
            })
            .filter(|(i, d)| *d != table.zero_for(*i))
            .collect();
        // A zero block's digest stored anyway is read as not stored: the file is then not the encoding this
        // qmpbak writes.
        let canonical = stored.len() as u64 == digests.len() as u64 / 32;
        table.blocks = Blocks::Sparse(stored);
        Ok((table, canonical))
    }
}

/// Bytes of a version 2 table's presence bitmap for `count` blocks.
fn bitmap_len(count: u64) -> usize {
    usize::try_from(count.div_ceil(8)).unwrap_or(usize::MAX)
}

/// The largest table file there can be (a difference naming every block: larger than version 2 with every
/// block stored).
pub const MAX_FILE_LEN: u64 =
    HEADER_LEN as u64 + diff::DIFF_HEADER_LEN as u64 + MAX_BLOCKS * diff::ENTRY_LEN as u64;

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
        Table::from_digests(Scheme::default(), BS, 3 * BS + 100, digests).unwrap()
    }

    #[test]
    fn save_load_round_trip_and_checksum() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.table");
        let table = sample();
        let sha = table.save(&path).unwrap();
        assert_eq!(sha, sha256_file(&path).unwrap());
        // a presence bitmap of one byte and four digests (no block of the sample is zero)
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            HEADER_LEN as u64 + 1 + 4 * 32
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
    fn a_file_says_how_its_digests_were_computed() {
        let dir = tempfile::tempdir().unwrap();
        for scheme in [Scheme::Flat, Scheme::Pieces] {
            let mut data = vec![0u8; 3 * (64 << 10)];
            data[70_000] = 1;
            let table = Table::build(&MemSource::new(data), scheme, 256 << 10, 1).unwrap();
            let path = dir.path().join(format!("{scheme:?}.table"));
            table.save(&path).unwrap();
            let mut head = [0u8; 16];
            head.copy_from_slice(&std::fs::read(&path).unwrap()[..16]);
            assert_eq!(head[12], if scheme == Scheme::Pieces { 2 } else { 0 });
            let loaded = Table::load(&path).unwrap();
            assert_eq!(loaded.scheme(), scheme);
            assert_eq!(loaded, table);
        }
        // Tables of different schemes are not compared, nor one a difference against the other.
        let flat = Table::zeroed(Scheme::Flat, BS, 3 * BS).unwrap();
        let pieces = Table::zeroed(Scheme::Pieces, BS, 3 * BS).unwrap();
        assert!(!flat.same_shape(&pieces));
        assert!(matches!(
            Table::diff(&flat, &pieces),
            Err(Error::TableSchemeMismatch { .. })
        ));
        assert_eq!(pieces.diff_against(&flat, &flat.content_id()).unwrap(), None);
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
        newer[8] = 4;
        corrupt(&newer, "newer qmpbak");
        let mut keyed_sparse = good.clone();
        keyed_sparse[12] = 1;
        corrupt(&keyed_sparse, "only written dense");
        let mut past_end = good.clone();
        past_end[HEADER_LEN] |= 0x10;
        corrupt(&past_end, "past the last one");
        let mut flags = good.clone();
        flags[12] = 4;
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
    fn a_mostly_zero_table_is_stored_in_the_size_of_its_data_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sparse.table");
        // 1000 blocks, 3 of them data, the short last one among them.
        let zeroed = Table::zeroed(Scheme::default(), BS, 999 * BS + 10).unwrap();
        let table = Table::derive(&zeroed, &[(0, [1u8; 32]), (500, [2; 32]), (999, [3; 32])]).unwrap();
        assert_eq!(table.stored(), 3);
        table.save(&path).unwrap();
        let len = std::fs::metadata(&path).unwrap().len();
        assert_eq!(len, HEADER_LEN as u64 + 125 + 3 * 32);
        assert_eq!(Table::load(&path).unwrap(), table);
        zeroed.save(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), HEADER_LEN as u64 + 125);
        assert_eq!(Table::load(&path).unwrap(), zeroed);
    }

    #[test]
    fn a_dense_version_1_table_still_reads_and_keyed_tables_are_written_dense() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.table");
        let table = Table::zeroed(Scheme::default(), BS, 3 * BS).unwrap();
        let mut old = Vec::new();
        table.encode_as(VERSION_DENSE, &mut old).unwrap();
        assert_eq!(old.len(), HEADER_LEN + 3 * 32);
        std::fs::write(&path, &old).unwrap();
        assert_eq!(Table::load(&path).unwrap(), table);

        let keyed = Table::from_digests_keyed(Scheme::default(), BS, 3 * BS, vec![[0; 32]; 3]).unwrap();
        let mut bytes = Vec::new();
        keyed.encode(&mut bytes).unwrap();
        assert_eq!(bytes[8], VERSION_DENSE as u8);
        assert_eq!(bytes.len(), HEADER_LEN + 3 * 32);
        keyed.save(&path).unwrap();
        assert_eq!(Table::load(&path).unwrap(), keyed);
    }

    #[test]
    fn zero_blocks_are_recognised_including_a_short_last_one() {
        let table = Table::zeroed(Scheme::default(), BS, 2 * BS + 10).unwrap();
        assert_eq!(table.len(), 3);
        assert!((0..3).all(|i| table.is_zero(i)));
        assert!(!table.is_zero(3));
        assert_eq!(table.digest(2), Some(&Scheme::default().digest_of(&[0; 10])));
        assert_eq!(
            table.digest(0),
            Some(&Scheme::default().digest_of(&[0; BS as usize]))
        );
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
        let grown = Table::zeroed(Scheme::default(), BS, 4 * BS + 100).unwrap();
        let err = Table::diff(&parent, &grown).unwrap_err();
        assert!(matches!(err, Error::TableShapeMismatch { .. }), "{err:?}");
        assert!(err.to_string().contains("resized"), "{err}");
        let other_bs = Table::zeroed(Scheme::default(), 2 * BS, 3 * BS + 100).unwrap();
        assert!(matches!(
            Table::diff(&parent, &other_bs),
            Err(Error::TableShapeMismatch { .. })
        ));
    }

    #[test]
    fn block_sizes_are_checked() {
        assert!(matches!(
            Table::zeroed(Scheme::default(), 1000, 10),
            Err(Error::InvalidBlockSize { .. })
        ));
        assert!(Table::zeroed(Scheme::default(), MIN_BLOCK_SIZE / 2, 10).is_err());
        assert!(Table::zeroed(Scheme::default(), MAX_BLOCK_SIZE * 2, 10).is_err());
        assert!(matches!(
            Table::from_digests(Scheme::default(), BS, BS, vec![]),
            Err(Error::DigestCount {
                given: 0,
                expected: 1
            })
        ));
        let empty = Table::zeroed(Scheme::default(), BS, 0).unwrap();
        assert!(empty.is_empty());
    }
}
