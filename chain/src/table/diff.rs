//! Difference tables (format version 3): the blocks whose digests differ between a node's table and its
//! parent node's, and the content ids ([`Table::content_id`]) of both, so an incremental's table file is the
//! size of its change and the full table is derived along the recovery chain ([`TableFile`],
//! [`Table::apply_diff`]). The file layout is in the parent module's docs.

use std::io;
use std::path::Path;

use sha2::{Digest as _, Sha256};

use super::{
    Digest, HEADER_LEN, HashingWriter, MAGIC, Scheme, Table, VERSION_DIFF, check_sha256, read_table_file,
};
use crate::error::{Error, Result};
use crate::fsio;

/// Bytes after the common header of a difference table: the two content ids and the entry count.
pub(super) const DIFF_HEADER_LEN: usize = 32 + 32 + 8;
/// Bytes per entry: u64 block index and digest.
pub(super) const ENTRY_LEN: usize = 8 + 32;

/// A difference table: what turns the base table (content id `base`) into the node's (content id `id`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableDiff {
    block_size: u64,
    virtual_size: u64,
    keyed: bool,
    scheme: Scheme,
    /// Content id of the node's full table.
    id: Digest,
    /// Content id of the table this is a difference against.
    base: Digest,
    /// The blocks that differ, by index, strictly increasing.
    changes: Vec<(u64, Digest)>,
}

/// A table file as stored: whole, or a difference against its parent node's table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TableFile {
    /// A whole table and its content id.
    Whole {
        table: Table,
        id: Digest,
    },
    Diff(TableDiff),
}

impl TableDiff {
    /// Content id of the node's full table.
    pub fn id(&self) -> &Digest {
        &self.id
    }

    /// Content id of the table this is a difference against.
    pub fn base(&self) -> &Digest {
        &self.base
    }

    /// The number of blocks it names.
    pub fn len(&self) -> usize {
        self.changes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    fn encode(&self, count: u64, out: &mut dyn io::Write) -> io::Result<()> {
        out.write_all(MAGIC)?;
        out.write_all(&VERSION_DIFF.to_le_bytes())?;
        let flags = super::file_flags(self.keyed, self.scheme);
        out.write_all(&flags.to_le_bytes())?;
        out.write_all(&self.block_size.to_le_bytes())?;
        out.write_all(&self.virtual_size.to_le_bytes())?;
        out.write_all(&count.to_le_bytes())?;
        out.write_all(&self.id)?;
        out.write_all(&self.base)?;
        out.write_all(&(self.changes.len() as u64).to_le_bytes())?;
        for (index, digest) in &self.changes {
            out.write_all(&index.to_le_bytes())?;
            out.write_all(digest)?;
        }
        Ok(())
    }
}

impl TableFile {
    /// Reads a table file whose sha256 must be `expected_sha256` (hex), reading it once
    /// ([`Error::TableChecksumMismatch`], [`Error::TableCorrupt`]). A whole table's content id is the file's
    /// sha256 when it is encoded as this qmpbak writes it, else computed.
    pub fn load_verified(path: impl AsRef<Path>, expected_sha256: &str) -> Result<TableFile> {
        let path = path.as_ref();
        let bytes = read_table_file(path)?;
        let sha: Digest = Sha256::digest(&bytes).into();
        check_sha256(path, &hex::encode(sha), expected_sha256)?;
        let (file, canonical) = Table::decode_any(&bytes).map_err(|detail| Error::TableCorrupt {
            path: path.to_owned(),
            detail,
        })?;
        Ok(match file {
            TableFile::Whole { table, .. } => {
                let id = if canonical { sha } else { table.content_id() };
                TableFile::Whole { table, id }
            }
            diff @ TableFile::Diff(_) => diff,
        })
    }

    /// The content id of the node's full table.
    pub fn id(&self) -> &Digest {
        match self {
            TableFile::Whole { id, .. } => id,
            TableFile::Diff(diff) => diff.id(),
        }
    }
}

impl Table {
    /// The difference that turns `base` (content id `base_id`) into this table: the blocks whose digests
    /// differ, zero ones included. `None` when the two do not cover the same disk the same way
    /// ([`Table::same_shape`]): such a table is stored whole.
    pub fn diff_against(&self, base: &Table, base_id: &Digest) -> Result<Option<TableDiff>> {
        if !self.same_shape(base) {
            return Ok(None);
        }
        let changes = Table::diff(base, self)?
            .into_iter()
            .filter_map(|i| self.digest(i).map(|d| (i, *d)))
            .collect();
        Ok(Some(TableDiff {
            block_size: self.block_size,
            virtual_size: self.virtual_size,
            keyed: self.keyed,
            scheme: self.scheme,
            id: self.content_id(),
            base: *base_id,
            changes,
        }))
    }

    /// Applies a difference table read from `path` to this table, which must be its base: its content id
    /// `self_id` must be the one the difference names ([`Error::TableBaseMismatch`]), and its shape the
    /// difference's.
    pub fn apply_diff(&mut self, self_id: &Digest, diff: &TableDiff, path: &Path) -> Result<()> {
        if *self_id != diff.base
            || self.block_size != diff.block_size
            || self.virtual_size != diff.virtual_size
            || self.keyed != diff.keyed
            || self.scheme != diff.scheme
        {
            return Err(Error::TableBaseMismatch {
                path: path.to_owned(),
                expected: hex::encode(diff.base),
                actual: if *self_id == diff.base {
                    format!(
                        "the same content id but another shape (block size {}, virtual size {}, keyed {}, \
                         {:?} digests)",
                        self.block_size, self.virtual_size, self.keyed, self.scheme
                    )
                } else {
                    hex::encode(self_id)
                },
            });
        }
        self.apply(&diff.changes)
    }

    /// Writes the table to `path` atomically (mode 0600): as a difference against `base` (content id
    /// `base_id`) when it can be one, else whole. Returns the sha256 of the file, in hex, for the manifest.
    pub fn save_against(&self, base: Option<(&Table, &Digest)>, path: impl AsRef<Path>) -> Result<String> {
        let diff = match base {
            Some((base, base_id)) => self.diff_against(base, base_id)?,
            None => None,
        };
        match diff {
            Some(diff) => diff.save(self.count, path),
            None => self.save(path),
        }
    }
}

impl TableDiff {
    /// Writes the difference to `path` atomically (mode 0600); returns the file's sha256 in hex.
    fn save(&self, count: u64, path: impl AsRef<Path>) -> Result<String> {
        let mut hasher = Sha256::new();
        fsio::write_atomic_with(path.as_ref(), true, |w| {
            let mut tee = HashingWriter {
                inner: w,
                hasher: &mut hasher,
            };
            let mut buffered = io::BufWriter::with_capacity(1 << 16, &mut tee);
            self.encode(count, &mut buffered)?;
            io::Write::flush(&mut buffered)
        })?;
        Ok(hex::encode(hasher.finalize()))
    }
}

/// The body of a version 3 table (after the common header, whose sizes are checked).
pub(super) fn decode(
    block_size: u64,
    virtual_size: u64,
    count: u64,
    keyed: bool,
    scheme: Scheme,
    body: &[u8],
) -> std::result::Result<TableDiff, String> {
    let Some((head, entries)) = body.split_at_checked(DIFF_HEADER_LEN) else {
        return Err(format!(
            "truncated: {} bytes after the header of a difference table, which needs {DIFF_HEADER_LEN}",
            body.len()
        ));
    };
    let mut id = [0u8; 32];
    id.copy_from_slice(&head[..32]);
    let mut base = [0u8; 32];
    base.copy_from_slice(&head[32..64]);
    let mut n = [0u8; 8];
    n.copy_from_slice(&head[64..72]);
    let n = u64::from_le_bytes(n);
    // Checked against the block count and the bytes there are before it sizes anything.
    if n > count {
        return Err(format!("it names {n} changed blocks of a disk of {count}"));
    }
    let expected = n * ENTRY_LEN as u64;
    if entries.len() as u64 != expected {
        let what = if (entries.len() as u64) < expected {
            "truncated"
        } else {
            "longer than its header says"
        };
        return Err(format!(
            "{what}: {} bytes of entries for {n} changed blocks (expected {expected})",
            entries.len()
        ));
    }
    let mut changes: Vec<(u64, Digest)> = Vec::with_capacity(n as usize);
    for entry in entries.chunks_exact(ENTRY_LEN) {
        let mut index = [0u8; 8];
        index.copy_from_slice(&entry[..8]);
        let index = u64::from_le_bytes(index);
        if index >= count {
            return Err(format!("it names block {index} of a disk of {count} blocks"));
        }
        if changes.last().is_some_and(|(last, _)| *last >= index) {
            return Err(format!(
                "its block indices are not strictly increasing (at block {index})"
            ));
        }
        let mut digest = [0u8; 32];
        digest.copy_from_slice(&entry[8..]);
        changes.push((index, digest));
    }
    Ok(TableDiff {
        block_size,
        virtual_size,
        keyed,
        scheme,
        id,
        base,
        changes,
    })
}

/// Whether the table file at `path` is a difference (its header says version 3), read from its first 12
/// bytes without checking the rest: what a caller about to remove the file's base must know. A file too short
/// for a header is [`Error::TableCorrupt`].
pub fn is_difference_file(path: &Path) -> Result<bool> {
    use std::io::Read as _;
    let mut head = [0u8; 12];
    let mut file = std::fs::File::open(path).map_err(Error::io("open", path))?;
    file.read_exact(&mut head).map_err(|e| Error::TableCorrupt {
        path: path.to_owned(),
        detail: format!("its header cannot be read ({e})"),
    })?;
    if &head[..8] != MAGIC {
        return Err(Error::TableCorrupt {
            path: path.to_owned(),
            detail: "it does not start with the checking table magic".to_owned(),
        });
    }
    Ok(u32::from_le_bytes([head[8], head[9], head[10], head[11]]) == VERSION_DIFF)
}

/// Bytes of a difference table file with `changes` entries.
pub fn diff_file_len(changes: u64) -> u64 {
    HEADER_LEN as u64 + DIFF_HEADER_LEN as u64 + changes * ENTRY_LEN as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    const BS: u64 = 4096;

    fn base() -> Table {
        let zeroed = Table::zeroed(Scheme::default(), BS, 999 * BS + 10).unwrap();
        Table::derive(&zeroed, &[(0, [1u8; 32]), (500, [2; 32]), (999, [3; 32])]).unwrap()
    }

    #[test]
    fn a_difference_holds_only_the_changed_blocks_and_derives_the_table() {
        let dir = tempfile::tempdir().unwrap();
        let parent = base();
        let parent_path = dir.path().join("p.table");
        let parent_sha = parent.save(&parent_path).unwrap();
        // the content id of a whole table is its file's sha256
        assert_eq!(hex::encode(parent.content_id()), parent_sha);
        let zero = *Table::zeroed(Scheme::default(), BS, 999 * BS + 10)
            .unwrap()
            .digest(500)
            .unwrap();
        let child = Table::derive(&parent, &[(7, [9; 32]), (500, zero), (0, [1; 32])]).unwrap();
        let path = dir.path().join("c.table");
        let sha = child
            .save_against(Some((&parent, &parent.content_id())), &path)
            .unwrap();
        // block 7 new, block 500 zeroed; block 0 rewritten with the same digest is no difference
        assert_eq!(std::fs::metadata(&path).unwrap().len(), diff_file_len(2));
        let TableFile::Diff(diff) = TableFile::load_verified(&path, &sha).unwrap() else {
            panic!("not a difference")
        };
        assert_eq!(diff.id(), &child.content_id());
        let TableFile::Whole { table, id } = TableFile::load_verified(&parent_path, &parent_sha).unwrap()
        else {
            panic!("not whole")
        };
        let mut derived = table;
        derived.apply_diff(&id, &diff, &path).unwrap();
        assert_eq!(derived, child);
        assert_eq!(derived.content_id(), *diff.id());
        // Table::load refuses a difference: it has no full table by itself
        let err = Table::load(&path).unwrap_err();
        assert!(err.to_string().contains("difference table"), "{err}");
    }

    #[test]
    fn a_difference_refuses_a_base_that_is_not_its_own() {
        let parent = base();
        let child = Table::derive(&parent, &[(3, [4; 32])]).unwrap();
        let diff = child
            .diff_against(&parent, &parent.content_id())
            .unwrap()
            .unwrap();
        let mut other = Table::derive(&parent, &[(4, [4; 32])]).unwrap();
        let id = other.content_id();
        let err = other.apply_diff(&id, &diff, Path::new("x.table")).unwrap_err();
        assert!(matches!(err, Error::TableBaseMismatch { .. }), "{err:?}");
        assert!(err.to_string().contains("x.table"), "{err}");
        // another shape is never a difference
        let grown = Table::zeroed(Scheme::default(), BS, 1000 * BS).unwrap();
        assert!(
            grown
                .diff_against(&parent, &parent.content_id())
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn a_keyed_difference_names_changed_blocks_that_became_zero_too() {
        let dense = Table::from_digests_keyed(
            Scheme::default(),
            BS,
            4 * BS,
            vec![[1; 32], [2; 32], [3; 32], [4; 32]],
        )
        .unwrap();
        let child = Table::derive(&dense, &[(1, [0; 32]), (2, [3; 32])]).unwrap();
        let diff = child.diff_against(&dense, &dense.content_id()).unwrap().unwrap();
        assert_eq!(diff.len(), 1);
        let mut derived = dense.clone();
        derived
            .apply_diff(&dense.content_id(), &diff, Path::new("k"))
            .unwrap();
        assert_eq!(derived, child);
        assert!(derived.is_keyed());
    }

    fn corrupt(bytes: &[u8], want: &str) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.table");
        std::fs::write(&path, bytes).unwrap();
        let sha = crate::table::sha256_file(&path).unwrap();
        let err = TableFile::load_verified(&path, &sha).unwrap_err();
        assert!(matches!(err, Error::TableCorrupt { .. }), "{err:?}");
        assert!(err.to_string().contains(want), "{err}");
    }

    #[test]
    fn corrupt_differences_are_refused_before_they_size_anything() {
        let parent = base();
        let child = Table::derive(&parent, &[(3, [4; 32]), (9, [5; 32])]).unwrap();
        let diff = child
            .diff_against(&parent, &parent.content_id())
            .unwrap()
            .unwrap();
        let mut good = Vec::new();
        diff.encode(parent.len(), &mut good).unwrap();
        let n_at = HEADER_LEN + 64;
        corrupt(&good[..HEADER_LEN + 10], "truncated");
        let mut huge = good.clone();
        huge[n_at..n_at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        corrupt(&huge, "changed blocks of a disk of 1000");
        corrupt(&good[..good.len() - 1], "truncated");
        let mut longer = good.clone();
        longer.push(0);
        corrupt(&longer, "longer than");
        let first = HEADER_LEN + DIFF_HEADER_LEN;
        let mut past = good.clone();
        past[first..first + 8].copy_from_slice(&1000u64.to_le_bytes());
        corrupt(&past, "block 1000");
        let mut unordered = good.clone();
        unordered[first..first + 8].copy_from_slice(&9u64.to_le_bytes());
        corrupt(&unordered, "strictly increasing");
    }
}
