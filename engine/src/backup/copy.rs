//! One pass over a point-in-time view of a disk, shared by the checksum-diff and the pull backup: the view is
//! read over NBD and hashed into the node's checking table, and what the new node must hold is written into its
//! file as soon as it is hashed, from the same buffer (nothing read twice): neighbouring blocks in one write,
//! several writes in flight while the hashing workers go on.
//!
//! What is read: the whole disk (a full, a checksum-diff) or only some blocks (an incremental's dirty ones),
//! holes skipped by block status either way. What is written: the blocks whose check value differs from the
//! base's table (the parent node, whose file backs the new one), or without a base every block that is not all
//! zeros (a new file without backing reads as zeros); of such a block, its data, and its holes only where the
//! file has a backing to hide (as write-zeroes). When the backing chain can be read straight from its files
//! ([`Pass::parent`]), a changed block is compared with it cluster by cluster and only the clusters that differ
//! are written: a checksum-diff then stores what the guest changed, not every megabyte block it touched. The
//! table is the whole disk's, or the base's with the blocks read rehashed.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use chain::Piece;
use tokio::sync::Semaphore;

use super::{Run, interrupted};
use crate::direct::DirectSource;
use crate::tables::threads;

/// The cluster size of the node files qmpbak creates (QEMU's qcow2 default): the unit in which a changed block
/// is compared with the parent's chain, so that no write covers part of a cluster (QEMU would then copy the
/// rest of that cluster from the backing file).
const NODE_CLUSTER: u64 = 64 << 10;

/// How often the progress display is updated while a disk is read.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(250);

/// One disk's pass: where to read, what, against which table, into which file.
pub(super) struct Pass<'a, S> {
    pub disk: &'a str,
    pub source: S,
    /// Only these blocks (ascending), the rest taken from `base`; `None`: the whole disk.
    pub blocks: Option<Vec<u64>>,
    /// The table the new node's file reads as before the pass (its backing's); `None`: it reads as zeros.
    pub base: Option<chain::Table>,
    /// The new node's file, writable.
    pub target: nbd::Client,
    /// Sorted, disjoint `(offset, len)`: the only bytes that may differ from the file's backing (an
    /// incremental's dirty ranges, whose clean rest was read from the backing itself); only they are written
    /// of a changed block. `None`: changed blocks are written whole.
    pub write_only: Option<Arc<[(u64, u64)]>>,
    /// The chain the new node's file has as its backing (the base's), read straight from its files: of a changed
    /// block, only the clusters whose bytes differ from it are written; the rest of the block reads from the
    /// backing, byte for byte what was compared. `None` (no base, a chain that cannot be read directly, an
    /// encrypted repository), or with `write_only`: changed blocks are written as above.
    pub parent: Option<DirectSource>,
}

/// Runs `pass`: returns the new node's table for the disk and the bytes written into its file. Every write is
/// answered before the table counts; an interrupt stops the workers, waits for the writes and is the error.
pub(super) async fn hash_and_copy<S: chain::BlockSource + Send + 'static>(
    run: &Run<'_>,
    pass: Pass<'_, S>,
) -> Result<(chain::Table, u64)> {
    let Pass {
        disk,
        source,
        blocks,
        base,
        target,
        write_only,
        parent,
    } = pass;
    let block_size = run.block_size;
    if let Some(base) = &base {
        if base.block_size() != block_size {
            bail!(
                "the base node's checking table of disk {disk} has {}-byte blocks, the repository {block_size}-byte blocks",
                base.block_size(),
            );
        }
    }
    if blocks.is_some() && base.is_none() {
        bail!("hashing some blocks of disk {disk} needs the base's table for the others");
    }
    let size = chain::BlockSource::len(&source);
    let total = match &blocks {
        Some(b) => (b.len() as u64).saturating_mul(block_size).min(size),
        None => size,
    };
    let handle = tokio::runtime::Handle::current();
    let parent =
        parent.filter(|p| base.is_some() && write_only.is_none() && chain::BlockSource::len(p) == size);
    let visitor = Arc::new(CopyChanged::new(base, target, handle, write_only, parent));
    let worker = Arc::clone(&visitor);
    let mut build = tokio::task::spawn_blocking(move || -> Result<chain::Table> {
        let key = worker.key.clone();
        match blocks {
            None => {
                // Compared with the base's digests: hashed as they were.
                let scheme = worker
                    .base
                    .as_ref()
                    .map_or_else(chain::Scheme::default, chain::Table::scheme);
                let table =
                    chain::Table::build_visiting(&source, scheme, block_size, threads(), worker.as_ref())?;
                Ok(chain::crypt::sealed(key.as_ref(), table)?)
            }
            Some(blocks) => {
                let base = worker.base.as_ref().context("no base table")?;
                let hashes =
                    chain::Table::build_blocks_visiting(&source, base, &blocks, threads(), worker.as_ref())?;
                Ok(chain::Table::derive(
                    base,
                    &chain::crypt::sealed_blocks(key.as_ref(), hashes),
                )?)
            }
        }
    });
    let mut ticker = tokio::time::interval(PROGRESS_INTERVAL);
    let outcome = loop {
        tokio::select! {
            joined = &mut build => break joined.context("table builder panicked")?,
            () = run.interrupt.wait() => {
                visitor.cancelled.store(true, Ordering::Relaxed);
                let _ = build.await;
                let _ = visitor.finish().await;
                return Err(interrupted());
            }
            _ = ticker.tick() => {
                run.progress.advance(disk, visitor.hashed.load(Ordering::Relaxed), total);
            }
        }
    };
    // Every write is answered before the table counts: a failed one is the error, even when the build
    // stopped for another reason meanwhile.
    let finished = visitor.finish().await;
    let table = outcome?;
    finished?;
    let uncached = visitor.uncached.load(Ordering::Relaxed);
    if uncached > 0 {
        tracing::info!(
            disk,
            bytes = uncached,
            "changed blocks written whole: the parent's chain was not in the page cache to compare them with"
        );
    }
    Ok((table, visitor.copied.load(Ordering::Relaxed)))
}

/// Copies each block the new node must hold into its file, from the bytes the table build just read and hashed:
/// a block whose check value differs from the base's or, without a base (the file reads as zeros), every block
/// that is not all zeros. It runs on the build's worker threads, which see runs of consecutive
/// blocks: neighbouring changed blocks of one kind become one write (data, or zeroes), and writes go on in the
/// background, up to [`WRITE_BYTES_IN_FLIGHT`] of them, while the workers read and hash on.
struct CopyChanged {
    base: Option<chain::Table>,
    /// The table key of an encrypted repository: the base's digests are keyed.
    key: Option<chain::TableKey>,
    target: nbd::Client,
    /// [`Pass::write_only`].
    write_only: Option<Arc<[(u64, u64)]>>,
    /// [`Pass::parent`], only with a base and without `write_only`.
    parent: Option<DirectSource>,
    /// Set once reading the parent failed: changed blocks are written whole from then on (always right).
    parent_failed: AtomicBool,
    /// Bytes of changed blocks written whole because the parent's bytes were not in the page cache.
    uncached: AtomicU64,
    /// The runtime the writes run on (the workers are plain threads).
    handle: tokio::runtime::Handle,
    /// Bounds the bytes of writes in flight, one permit per [`WRITE_PERMIT_BYTES`].
    in_flight: Arc<Semaphore>,
    /// The first write that failed: (offset, error).
    write_error: Arc<Mutex<Option<(u64, nbd::Error)>>>,
    /// Bytes hashed so far, for the progress display.
    hashed: AtomicU64,
    /// Bytes written into the new node.
    copied: AtomicU64,
    /// Set on an interrupt: the next run ends the build.
    cancelled: AtomicBool,
}

/// Bytes of writes into the new node in flight at once; each holds a copy of its bytes until it is answered.
const WRITE_BYTES_IN_FLIGHT: u64 = 16 << 20;

/// What one permit of [`CopyChanged::in_flight`] stands for.
const WRITE_PERMIT_BYTES: u64 = 64 << 10;

/// Permits of [`CopyChanged::in_flight`] in all.
const WRITE_PERMITS: u32 = (WRITE_BYTES_IN_FLIGHT / WRITE_PERMIT_BYTES) as u32;

impl CopyChanged {
    fn new(
        base: Option<chain::Table>,
        target: nbd::Client,
        handle: tokio::runtime::Handle,
        write_only: Option<Arc<[(u64, u64)]>>,
        parent: Option<DirectSource>,
    ) -> CopyChanged {
        CopyChanged {
            base,
            key: crate::crypt::unlock::table_key(),
            target,
            write_only,
            parent,
            parent_failed: AtomicBool::new(false),
            uncached: AtomicU64::new(0),
            handle,
            in_flight: Arc::new(Semaphore::new(WRITE_PERMITS as usize)),
            write_error: Arc::new(Mutex::new(None)),
            hashed: AtomicU64::new(0),
            copied: AtomicU64::new(0),
            cancelled: AtomicBool::new(false),
        }
    }

    /// `None` when the new node's file already reads as the block (the base's block, or zeros without a base);
    /// else whether it reads as zeros.
    fn change(&self, block: &chain::Visited<'_>) -> Option<bool> {
        let zero = block.pieces.iter().all(|p| match p {
            Piece::Data(d) => d.iter().all(|&b| b == 0),
            Piece::Zero(_) => true,
        });
        let Some(base) = &self.base else {
            return (!zero).then_some(false);
        };
        let keyed = self.key.as_ref().map(|k| k.seal(block.index, &block.digest));
        if base.digest(block.index) == Some(keyed.as_ref().unwrap_or(&block.digest)) {
            return None;
        }
        Some(zero)
    }

    /// The first failed write, as an I/O error.
    fn failed_write(&self) -> Option<io::Error> {
        let failed = self.write_error.lock().unwrap_or_else(PoisonError::into_inner);
        failed
            .as_ref()
            .map(|(offset, e)| io::Error::other(format!("writing the new node at byte {offset}: {e}")))
    }

    /// Starts the writes of `blocks` (consecutive, changed, all zero or not): one request for all of them, or
    /// with [`Self::write_only`] one per range of it within them.
    fn write(&self, blocks: &[chain::Visited<'_>], zero: bool) -> io::Result<()> {
        let (Some(first), Some(last)) = (blocks.first(), blocks.last()) else {
            return Ok(());
        };
        let start = first.offset;
        let end = last.offset + last.len;
        match &self.write_only {
            None => match &self.parent {
                Some(parent) if !self.parent_failed.load(Ordering::Relaxed) => {
                    self.write_differing(parent, blocks, start, end - start, zero)
                }
                _ => self.write_range(blocks, start, end - start, zero),
            },
            Some(only) => {
                for (offset, len, inside) in cut(only, start, end - start) {
                    if inside {
                        self.write_range(blocks, offset, len, zero)?;
                    }
                }
                Ok(())
            }
        }
    }

    /// Starts the writes of bytes `[offset, offset + len)` of `blocks`: one write-zeroes request when they are
    /// all zeros, else one write per run of data pieces, and for the runs of zero pieces between them a
    /// write-zeroes request where the file has a backing to hide, nothing where it reads as zeros already (a
    /// hole in the disk stays a hole in a full's file, not a megabyte block's worth of written zeros).
    fn write_range(
        &self,
        blocks: &[chain::Visited<'_>],
        offset: u64,
        len: u64,
        zero: bool,
    ) -> io::Result<()> {
        if zero {
            return self.issue(offset, len, None);
        }
        for (start, n, data) in spans(blocks, offset, len) {
            if data {
                self.issue(start, n, Some(gather(blocks, start, n)))?;
            } else if self.base.is_some() {
                self.issue(start, n, None)?;
            }
        }
        Ok(())
    }

    /// Starts the writes of the clusters of `[offset, offset + len)` of `blocks` (all zeros when `zero`) whose
    /// bytes differ from `parent`'s, neighbouring clusters of one kind (data, or zeros) in one request. The
    /// parent's bytes are read only from the page cache: where they are not there, the range is written as
    /// [`Self::write_range`] does (a read from the disk would cost more than the writes it saves); if the parent
    /// cannot be read, so is every later range.
    fn write_differing(
        &self,
        parent: &DirectSource,
        blocks: &[chain::Visited<'_>],
        offset: u64,
        len: u64,
        zero: bool,
    ) -> io::Result<()> {
        let size = usize::try_from(len).map_err(io::Error::other)?;
        let read = match parent.is_cached(offset, len) {
            Ok(Some(true)) => {
                let mut old = vec![0u8; size];
                chain::BlockSource::read_at(parent, offset, &mut old).map(|()| old)
            }
            // Reading the chain from the disk would cost more than writing the whole blocks saves.
            Ok(_) => {
                self.uncached.fetch_add(len, Ordering::Relaxed);
                return self.write_range(blocks, offset, len, zero);
            }
            Err(e) => Err(e),
        };
        let old = match read {
            Ok(old) => old,
            Err(e) => {
                if !self.parent_failed.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        "reading the parent's chain at byte {offset} failed ({e}): the changed blocks are stored whole"
                    );
                }
                return self.write_range(blocks, offset, len, zero);
            }
        };
        let new = (!zero).then(|| gather(blocks, offset, len));
        for (start, n, zeros) in differing(offset, &old, new.as_deref()) {
            let lo = (start - offset) as usize;
            // A run of zeros is written as write-zeroes; a data run exists only when the blocks are not all zeros.
            let data = match &new {
                Some(bytes) if !zeros => Some(bytes[lo..lo + n as usize].to_vec()),
                _ => None,
            };
            self.issue(start, n, data)?;
        }
        Ok(())
    }

    /// Starts one write (`data`) or write-zeroes request (`None`) of `len` bytes at `offset`, after waiting for
    /// room among the writes in flight.
    fn issue(&self, offset: u64, len: u64, data: Option<Vec<u8>>) -> io::Result<()> {
        let permits = u32::try_from(len.div_ceil(WRITE_PERMIT_BYTES))
            .unwrap_or(u32::MAX)
            .clamp(1, WRITE_PERMITS);
        let permit = self
            .handle
            .block_on(Arc::clone(&self.in_flight).acquire_many_owned(permits))
            .map_err(io::Error::other)?;
        let target = self.target.clone();
        let failed = Arc::clone(&self.write_error);
        self.handle.spawn(async move {
            let written = match data {
                Some(bytes) => target.write_owned(offset, bytes, false).await,
                None => target.write_zeroes(offset, len, false).await,
            };
            if let Err(e) = written {
                failed
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .get_or_insert((offset, e));
            }
            drop(permit);
        });
        self.copied.fetch_add(len, Ordering::Relaxed);
        Ok(())
    }

    /// Waits until every write started has been answered; the first that failed is the error.
    async fn finish(&self) -> Result<()> {
        let all = self
            .in_flight
            .acquire_many(WRITE_PERMITS)
            .await
            .context("waiting for the writes into the new node")?;
        drop(all);
        match self.failed_write() {
            Some(e) => Err(anyhow!(e)),
            None => Ok(()),
        }
    }
}

impl chain::BlockVisitor for CopyChanged {
    fn run(&self, blocks: &[chain::Visited<'_>]) -> Result<(), (u64, io::Error)> {
        let first = blocks.first().map_or(0, |b| b.index);
        self.hashed
            .fetch_add(blocks.iter().map(|b| b.len).sum(), Ordering::Relaxed);
        if self.cancelled.load(Ordering::Relaxed) {
            return Err((first, io::Error::new(io::ErrorKind::Interrupted, "interrupted")));
        }
        // A write that failed in the background stops the build at the next run.
        if let Some(e) = self.failed_write() {
            return Err((first, e));
        }
        let changes: Vec<Option<bool>> = blocks.iter().map(|b| self.change(b)).collect();
        let mut i = 0;
        while i < blocks.len() {
            let Some(zero) = changes[i] else {
                i += 1;
                continue;
            };
            let mut j = i + 1;
            while j < blocks.len() && changes[j] == Some(zero) {
                j += 1;
            }
            self.write(&blocks[i..j], zero)
                .map_err(|e| (blocks[i].index, e))?;
            i = j;
        }
        Ok(())
    }
}

/// The bytes `[offset, offset + len)` of `blocks` (consecutive, covering the range).
fn gather(blocks: &[chain::Visited<'_>], offset: u64, len: u64) -> Vec<u8> {
    let end = offset + len;
    let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    let mut at = blocks.first().map_or(offset, |b| b.offset);
    for p in blocks.iter().flat_map(|b| &b.pieces) {
        let n = match p {
            Piece::Data(d) => d.len() as u64,
            Piece::Zero(n) => *n,
        };
        let (lo, hi) = (at.max(offset), (at + n).min(end));
        if hi > lo {
            match p {
                // In range: lo - at and hi - at are at most the piece's length.
                Piece::Data(d) => bytes.extend_from_slice(&d[(lo - at) as usize..(hi - at) as usize]),
                Piece::Zero(_) => bytes.resize(bytes.len() + (hi - lo) as usize, 0),
            }
        }
        at += n;
        if at >= end {
            break;
        }
    }
    bytes
}

/// The runs of [`NODE_CLUSTER`]-aligned clusters (cut at the range's edges) in which `new` (all zeros when
/// `None`) differs from `old`, both the bytes of the disk from `offset` on: `(start, len, zeros)`, in order,
/// neighbouring clusters that both are, or both are not, all zeros in `new` merged.
fn differing(offset: u64, old: &[u8], new: Option<&[u8]>) -> Vec<(u64, u64, bool)> {
    let end = offset + old.len() as u64;
    let mut out: Vec<(u64, u64, bool)> = Vec::new();
    let mut at = offset;
    while at < end {
        let stop = ((at / NODE_CLUSTER + 1) * NODE_CLUSTER).min(end);
        let (lo, hi) = ((at - offset) as usize, (stop - offset) as usize);
        let was = &old[lo..hi];
        let same = match new {
            Some(n) => n[lo..hi] == *was,
            None => chain::table::all_zero(was),
        };
        if !same {
            // Only a cluster that is written is looked at for zeros.
            let zeros = new.is_none_or(|n| chain::table::all_zero(&n[lo..hi]));
            match out.last_mut() {
                Some((s, l, z)) if *z == zeros && *s + *l == at => *l += stop - at,
                _ => out.push((at, stop - at, zeros)),
            }
        }
        at = stop;
    }
    out
}

/// `[offset, offset + len)` of `blocks` (consecutive, covering the range) as runs of data pieces and of zero
/// pieces: `(start, len, data)`, in order, neighbours of one kind merged.
fn spans(blocks: &[chain::Visited<'_>], offset: u64, len: u64) -> Vec<(u64, u64, bool)> {
    let end = offset + len;
    let mut out: Vec<(u64, u64, bool)> = Vec::new();
    let mut at = blocks.first().map_or(offset, |b| b.offset);
    for p in blocks.iter().flat_map(|b| &b.pieces) {
        let (n, data) = match p {
            Piece::Data(d) => (d.len() as u64, true),
            Piece::Zero(n) => (*n, false),
        };
        let (lo, hi) = (at.max(offset), (at + n).min(end));
        if hi > lo {
            match out.last_mut() {
                Some((s, l, d)) if *d == data && *s + *l == lo => *l += hi - lo,
                _ => out.push((lo, hi - lo, data)),
            }
        }
        at += n;
        if at >= end {
            break;
        }
    }
    out
}

/// `[offset, offset + len)` cut at the edges of `ranges` (sorted, disjoint `(offset, len)`): `(start, len,
/// inside)`, in order.
pub(super) fn cut(ranges: &[(u64, u64)], offset: u64, len: u64) -> Vec<(u64, u64, bool)> {
    let end = offset.saturating_add(len);
    let mut out = Vec::new();
    let mut at = offset;
    let first = ranges.partition_point(|&(o, l)| o.saturating_add(l) <= offset);
    for &(o, l) in &ranges[first..] {
        if at >= end || o >= end {
            break;
        }
        if o > at {
            out.push((at, o - at, false));
            at = o;
        }
        let stop = o.saturating_add(l).min(end);
        if stop > at {
            out.push((at, stop - at, true));
            at = stop;
        }
    }
    if at < end {
        out.push((at, end - at, false));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_range_is_cut_at_the_ranges_edges() {
        let dirty = [(10, 5), (20, 10), (40, 1)];
        assert_eq!(
            cut(&dirty, 0, 50),
            vec![
                (0, 10, false),
                (10, 5, true),
                (15, 5, false),
                (20, 10, true),
                (30, 10, false),
                (40, 1, true),
                (41, 9, false)
            ]
        );
        assert_eq!(
            cut(&dirty, 12, 10),
            vec![(12, 3, true), (15, 5, false), (20, 2, true)]
        );
        assert_eq!(cut(&dirty, 31, 5), vec![(31, 5, false)]);
        assert_eq!(cut(&dirty, 22, 3), vec![(22, 3, true)]);
        assert_eq!(cut(&[], 0, 7), vec![(0, 7, false)]);
    }

    #[test]
    fn only_the_clusters_that_differ_from_the_parent_are_written() {
        const C: usize = NODE_CLUSTER as usize;
        let c = NODE_CLUSTER;
        // Four clusters from the disk's start: the same, changed to other data, changed to zeros, the same.
        let mut old = vec![7u8; 4 * C];
        let mut new = old.clone();
        new[C + 5] = 8;
        new[2 * C..3 * C].fill(0);
        assert_eq!(
            differing(0, &old, Some(&new)),
            vec![(c, c, false), (2 * c, c, true)]
        );
        // Neighbouring changed clusters of one kind are one run; a range that starts and ends inside clusters
        // is cut at its edges.
        new[3 * C..].fill(9);
        new[2 * C..3 * C].fill(9);
        assert_eq!(differing(0, &old, Some(&new)), vec![(c, 3 * c, false)]);
        assert_eq!(
            differing(c / 2, &old[..2 * C], Some(&new[C / 2..C / 2 + 2 * C])),
            vec![(c, c + c / 2, false)]
        );
        // All zeros in the new bytes: only where the parent held data.
        old[..C].fill(0);
        assert_eq!(differing(0, &old, None), vec![(c, 3 * c, true)]);
        assert_eq!(differing(0, &vec![0; 2 * C], None), vec![]);
    }

    /// Blocks 1 and 2 of 12 bytes each at 16 and 28: `a`'s 8 bytes then 4 zeros, 8 zeros then `b`'s 4 bytes.
    fn two_blocks<'a>(a: &'a [u8], b: &'a [u8]) -> [chain::Visited<'a>; 2] {
        [
            chain::Visited {
                index: 1,
                offset: 16,
                len: 12,
                digest: chain::Digest::default(),
                pieces: vec![Piece::Data(a), Piece::Zero(4)],
            },
            chain::Visited {
                index: 2,
                offset: 28,
                len: 12,
                digest: chain::Digest::default(),
                pieces: vec![Piece::Zero(8), Piece::Data(b)],
            },
        ]
    }

    #[test]
    fn spans_are_the_runs_of_data_and_of_zeros_in_the_range() {
        let a: Vec<u8> = (0..8).collect();
        let b: Vec<u8> = (100..104).collect();
        let blocks = two_blocks(&a, &b);
        assert_eq!(
            spans(&blocks, 16, 24),
            vec![(16, 8, true), (24, 12, false), (36, 4, true)]
        );
        assert_eq!(spans(&blocks, 20, 6), vec![(20, 4, true), (24, 2, false)]);
        assert_eq!(spans(&blocks, 30, 7), vec![(30, 6, false), (36, 1, true)]);
        assert_eq!(spans(&blocks, 39, 1), vec![(39, 1, true)]);
    }

    #[test]
    fn gathered_bytes_are_the_blocks_bytes_in_the_range() {
        let a: Vec<u8> = (0..8).collect();
        let b: Vec<u8> = (100..104).collect();
        let blocks = two_blocks(&a, &b);
        let whole: Vec<u8> = a
            .iter()
            .copied()
            .chain([0; 12])
            .chain(b.iter().copied())
            .collect();
        for (offset, len) in [(16, 24), (16, 1), (20, 10), (23, 14), (39, 1), (27, 2)] {
            let from = (offset - 16) as usize;
            assert_eq!(
                gather(&blocks, offset, len),
                whole[from..from + len as usize],
                "{offset} {len}"
            );
        }
    }
}
