//! Building a table from a [`BlockSource`]: workers take runs of consecutive blocks (about [`RUN_BYTES`]) from a
//! shared counter and read each run with one extents query and one read per data extent in it, so small blocks
//! cost no more round trips than large ones; each keeps its buffers, so memory stays at a few runs per thread
//! however large the disk. Ranges the source reports as zero (holes) are neither read nor hashed where the
//! [`Scheme`] lets them be ([`super::hash`]).

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use super::hash::BlockHasher;
use super::{Blocks, Digest, Scheme, Table, block_range, check_size};
use crate::error::{Error, Result};

/// A disk as the guest sees it, readable from many threads at once.
pub trait BlockSource: Sync {
    /// Its size in bytes.
    fn len(&self) -> u64;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// What `[offset, offset + len)` holds, in order. Bytes no extent covers are read as data.
    fn extents(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>>;

    /// Fills `buf` from `offset` (all of it, or an error).
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;

    /// Reads `len` bytes at `offset` into `buf`, which holds exactly them afterwards. The builder's workers
    /// pass the same buffer block after block. The default resizes `buf` and calls [`BlockSource::read_at`];
    /// a source that receives data into buffers of its own (a network client) can receive straight into
    /// `buf`'s allocation instead of copying.
    fn read_into(&self, offset: u64, len: usize, buf: &mut Vec<u8>) -> io::Result<()> {
        buf.resize(len, 0);
        self.read_at(offset, buf)
    }

    /// What it is, for error messages (a path, an export name …).
    fn name(&self) -> String {
        "the disk being hashed".to_owned()
    }
}

/// A range of a [`BlockSource`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
    pub kind: ExtentKind,
}

/// Whether an extent must be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentKind {
    /// Bytes to read.
    Data,
    /// Known to read as zeros (a hole, or a range the image marks as zero): not read.
    Zero,
}

/// One piece of a block's bytes as a build read them: data, or a run of zeros that was never read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Piece<'a> {
    Data(&'a [u8]),
    Zero(u64),
}

/// One block as a [`BlockVisitor`] sees it.
#[derive(Debug, Clone)]
pub struct Visited<'a> {
    pub index: u64,
    /// Its first byte on the disk.
    pub offset: u64,
    /// Its length (the last block of a disk may be short).
    pub len: u64,
    pub digest: Digest,
    /// Its bytes in order.
    pub pieces: Vec<Piece<'a>>,
}

/// Sees every block of a [`Table::build_visiting`] right after it was hashed, with the bytes it was hashed from,
/// on the worker thread that read it: a copy can write what it hashed without reading it twice. Blocks come in
/// runs of consecutive blocks (one worker's read), so a copy can merge neighbours into one write.
pub trait BlockVisitor: Sync {
    /// The blocks of one run, consecutive and in order. An error names the block it concerns.
    fn run(&self, blocks: &[Visited<'_>]) -> Result<(), (u64, io::Error)>;
}

/// How many results a worker gathers before storing them in the shared digest list.
const BATCH: usize = 256;

/// About how many bytes of consecutive blocks a worker reads and hashes at a time (at least one block).
pub const RUN_BYTES: u64 = 1 << 20;

/// The same for [`Table::build_visiting`], whose visitor sees one run at a time (and may merge neighbouring
/// blocks of it into one write). Measured for a checksum-diff read over NBD on 2 cores: 4 MiB runs were no
/// faster than 1 MiB runs and nearly doubled qmpbak's peak RSS (83–92 MiB against about 50), so runs stay at
/// 1 MiB, and blocks merge when the table's blocks are smaller than that.
pub const VISIT_RUN_BYTES: u64 = 1 << 20;

/// Data buffers a worker keeps between runs (a run with more data extents allocates the rest afresh).
const KEPT_BUFFERS: usize = 4;

impl Table {
    /// Hashes every block of `source` by `scheme` with `threads` workers (0: one per core).
    pub fn build<S: BlockSource + ?Sized>(
        source: &S,
        scheme: Scheme,
        block_size: u64,
        threads: usize,
    ) -> Result<Table> {
        Table::build_whole(source, (scheme, block_size), threads, RUN_BYTES, None)
    }

    /// [`Table::build`], handing every block to `visitor` after hashing it, in runs of about
    /// [`VISIT_RUN_BYTES`]. A visitor error stops the build.
    pub fn build_visiting<S: BlockSource + ?Sized, V: BlockVisitor>(
        source: &S,
        scheme: Scheme,
        block_size: u64,
        threads: usize,
        visitor: &V,
    ) -> Result<Table> {
        Table::build_whole(
            source,
            (scheme, block_size),
            threads,
            VISIT_RUN_BYTES,
            Some(visitor),
        )
    }

    /// The table of the whole of `source`, keeping only its non-zero blocks as the workers hand them in.
    fn build_whole<S: BlockSource + ?Sized>(
        source: &S,
        (scheme, block_size): (Scheme, u64),
        threads: usize,
        run_bytes: u64,
        visitor: Option<&dyn BlockVisitor>,
    ) -> Result<Table> {
        let mut table = Table::zeroed(scheme, block_size, source.len())?;
        let keep = |index: u64, digest: &Digest| *digest != table.zero_for(index);
        let jobs = Jobs {
            count: table.len(),
            index_of: &|job| job,
            keep: &keep,
        };
        let stored = hash_blocks(source, (scheme, block_size), &jobs, threads, run_bytes, visitor)?;
        table.blocks = Blocks::Sparse(stored);
        Ok(table)
    }

    /// Hashes only the blocks `indices` of `source` as `like` (a table of the same disk: its block size and
    /// [`Scheme`]) hashes blocks, returning `(index, digest)` pairs in the same order: what
    /// [`Table::derive`] takes from `like`, or what is compared with its digests.
    pub fn build_blocks<S: BlockSource + ?Sized>(
        source: &S,
        like: &Table,
        indices: &[u64],
        threads: usize,
    ) -> Result<Vec<(u64, Digest)>> {
        Table::build_some(
            source,
            (like.scheme, like.block_size),
            indices,
            threads,
            RUN_BYTES,
            None,
        )
    }

    /// [`Table::build_blocks`] (`indices` ascending), handing every block to `visitor` after hashing it, in
    /// runs of consecutive blocks of about [`VISIT_RUN_BYTES`]. A visitor error stops the build.
    pub fn build_blocks_visiting<S: BlockSource + ?Sized, V: BlockVisitor>(
        source: &S,
        like: &Table,
        indices: &[u64],
        threads: usize,
        visitor: &V,
    ) -> Result<Vec<(u64, Digest)>> {
        Table::build_some(
            source,
            (like.scheme, like.block_size),
            indices,
            threads,
            VISIT_RUN_BYTES,
            Some(visitor),
        )
    }

    fn build_some<S: BlockSource + ?Sized>(
        source: &S,
        (scheme, block_size): (Scheme, u64),
        indices: &[u64],
        threads: usize,
        run_bytes: u64,
        visitor: Option<&dyn BlockVisitor>,
    ) -> Result<Vec<(u64, Digest)>> {
        let count = check_size(source.len(), block_size)?;
        if let Some(&index) = indices.iter().find(|&&i| i >= count) {
            return Err(Error::BlockOutOfRange { index, count });
        }
        let jobs = Jobs {
            count: indices.len() as u64,
            index_of: &|job| indices[job as usize],
            keep: &|_, _| true,
        };
        let digests = hash_blocks(source, (scheme, block_size), &jobs, threads, run_bytes, visitor)?;
        // every job kept, in job order
        Ok(indices
            .iter()
            .copied()
            .zip(digests.into_iter().map(|(_, d)| d))
            .collect())
    }
}

/// The number of workers for `threads` requested (0: all cores) and `jobs` blocks.
fn worker_count(threads: usize, jobs: u64) -> usize {
    let wanted = if threads == 0 {
        std::thread::available_parallelism().map_or(1, usize::from)
    } else {
        threads
    };
    wanted.min(usize::try_from(jobs).unwrap_or(usize::MAX)).max(1)
}

/// What [`hash_blocks`] hashes: `count` jobs, job `j` being block `index_of(j)`, and which results it keeps.
#[derive(Clone, Copy)]
struct Jobs<'a> {
    count: u64,
    index_of: &'a (dyn Fn(u64) -> u64 + Sync),
    keep: &'a (dyn Fn(u64, &Digest) -> bool + Sync),
}

/// Hashes `jobs` blocks, job `j` being block `index_of(j)`, into `(job, digest)` pairs in job order, keeping
/// only those `keep(job, digest)` accepts (a whole disk's table keeps its non-zero blocks, so a mostly empty
/// disk's build holds a few digests, not one per block); each worker claims about `run_bytes` of blocks at a
/// time.
fn hash_blocks<S: BlockSource + ?Sized>(
    source: &S,
    (scheme, block_size): (Scheme, u64),
    jobs: &Jobs<'_>,
    threads: usize,
    run_bytes: u64,
    visitor: Option<&dyn BlockVisitor>,
) -> Result<Vec<(u64, Digest)>> {
    let Jobs {
        count: jobs,
        index_of,
        keep,
    } = *jobs;
    let digests: Mutex<Vec<(u64, Digest)>> = Mutex::new(Vec::new());
    let next = AtomicU64::new(0);
    let failed = AtomicBool::new(false);
    let virtual_size = source.len();

    let per_claim = (run_bytes / block_size).max(1);
    let worker = || -> Result<()> {
        let mut bufs: Vec<Vec<u8>> = Vec::new();
        let mut done: Vec<(u64, Digest)> = Vec::with_capacity(BATCH);
        let store = |done: &mut Vec<(u64, Digest)>| {
            let mut all = digests.lock().unwrap_or_else(PoisonError::into_inner);
            all.extend(done.drain(..).filter(|(job, digest)| keep(*job, digest)));
        };
        while !failed.load(Ordering::Relaxed) {
            let first = next.fetch_add(per_claim, Ordering::Relaxed);
            if first >= jobs {
                break;
            }
            let last = (first + per_claim).min(jobs);
            // The claimed jobs, cut into runs of consecutive block numbers.
            let mut job = first;
            while job < last {
                let index = index_of(job);
                let mut end = job + 1;
                while end < last && index_of(end) == index + (end - job) {
                    end += 1;
                }
                let run = hash_run(
                    source,
                    (scheme, block_size),
                    virtual_size,
                    index,
                    end - job,
                    &mut bufs,
                    visitor,
                );
                match run {
                    Ok(run) => done.extend((job..end).zip(run)),
                    Err(e) => {
                        failed.store(true, Ordering::Relaxed);
                        return Err(e);
                    }
                }
                job = end;
            }
            if done.len() >= BATCH {
                store(&mut done);
            }
        }
        store(&mut done);
        Ok(())
    };

    let workers = worker_count(threads, jobs);
    if workers == 1 {
        worker()?;
    } else {
        let results: Vec<Result<()>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..workers).map(|_| scope.spawn(worker)).collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
                .collect()
        });
        results.into_iter().collect::<Result<Vec<()>>>()?;
    }
    let mut digests = digests.into_inner().unwrap_or_else(PoisonError::into_inner);
    digests.sort_unstable_by_key(|(job, _)| *job);
    Ok(digests)
}

/// The extents of `[offset, offset + len)` in order, without gaps (uncovered bytes are data) or overlaps,
/// neighbours of one kind merged.
fn normalize(offset: u64, len: u64, extents: &[Extent]) -> Vec<Extent> {
    let end = offset + len;
    let mut sorted = extents.to_vec();
    sorted.sort_by_key(|e| e.offset);
    let mut out: Vec<Extent> = Vec::with_capacity(sorted.len() + 1);
    let mut push = |offset: u64, len: u64, kind: ExtentKind| {
        if len == 0 {
            return;
        }
        match out.last_mut() {
            Some(last) if last.kind == kind && last.offset + last.len == offset => last.len += len,
            _ => out.push(Extent { offset, len, kind }),
        }
    };
    let mut cursor = offset;
    for e in &sorted {
        let start = e.offset.max(cursor);
        let stop = e.offset.saturating_add(e.len).min(end);
        if stop <= start {
            continue;
        }
        push(cursor, start - cursor, ExtentKind::Data);
        push(start, stop - start, e.kind);
        cursor = stop;
    }
    push(cursor, end - cursor, ExtentKind::Data);
    out
}

/// The digests of `count` blocks from block `first`: one extents query for them all, each data extent read
/// into a buffer of `bufs`, then every block hashed from those buffers (zero extents as zeros) and shown to the
/// visitor, if any.
fn hash_run<S: BlockSource + ?Sized>(
    source: &S,
    (scheme, block_size): (Scheme, u64),
    virtual_size: u64,
    first: u64,
    count: u64,
    bufs: &mut Vec<Vec<u8>>,
    visitor: Option<&dyn BlockVisitor>,
) -> Result<Vec<Digest>> {
    let failed = |at: u64, n: u64, e: io::Error| Error::SourceRead {
        source_name: source.name(),
        offset: at,
        len: n,
        source: e,
    };
    let start = first * block_size;
    let end = (first + count)
        .saturating_mul(block_size)
        .min(virtual_size)
        .max(start);
    let extents = source
        .extents(start, end - start)
        .map_err(|e| failed(start, end - start, e))?;
    let segments = normalize(start, end - start, &extents);

    // Read every data extent, each into its own buffer: segment i's bytes are in bufs[slot[i]].
    let mut slot = vec![usize::MAX; segments.len()];
    let mut used = 0;
    for (i, segment) in segments.iter().enumerate() {
        if segment.kind != ExtentKind::Data {
            continue;
        }
        if bufs.len() == used {
            bufs.push(Vec::new());
        }
        let n = segment.len as usize;
        let buf = &mut bufs[used];
        if let Err(e) = source.read_into(segment.offset, n, buf) {
            return Err(locate_failure(source, segment, block_size, buf)
                .unwrap_or_else(|| failed(segment.offset, segment.len, e)));
        }
        if buf.len() < n {
            return Err(failed(
                segment.offset,
                segment.len,
                io::Error::new(io::ErrorKind::UnexpectedEof, "the source returned fewer bytes"),
            ));
        }
        slot[i] = used;
        used += 1;
    }

    let mut digests = Vec::with_capacity(count as usize);
    let mut visited: Vec<Visited<'_>> = Vec::new();
    let mut first_segment = 0;
    for index in first..first + count {
        let (offset, len) = block_range(index, block_size, virtual_size);
        let block_end = offset + len;
        // The segments overlapping this block, clipped to it.
        while first_segment < segments.len()
            && segments[first_segment].offset + segments[first_segment].len <= offset
        {
            first_segment += 1;
        }
        let pieces = segments[first_segment..]
            .iter()
            .enumerate()
            .take_while(|(_, s)| s.offset < block_end)
            .map(|(k, s)| {
                let lo = s.offset.max(offset);
                let hi = (s.offset + s.len).min(block_end);
                (first_segment + k, lo, hi)
            });
        let mut hasher = BlockHasher::new(scheme, len);
        let mut seen: Vec<Piece<'_>> = Vec::new();
        for (k, lo, hi) in pieces {
            let segment = &segments[k];
            if segment.kind == ExtentKind::Data {
                let buf = &bufs[slot[k]];
                let data = &buf[(lo - segment.offset) as usize..(hi - segment.offset) as usize];
                hasher.data(data);
                if visitor.is_some() {
                    seen.push(Piece::Data(data));
                }
                continue;
            }
            hasher.zeros(hi - lo);
            if visitor.is_some() {
                seen.push(Piece::Zero(hi - lo));
            }
        }
        let digest = hasher.finish();
        if visitor.is_some() {
            visited.push(Visited {
                index,
                offset,
                len,
                digest,
                pieces: seen,
            });
        }
        digests.push(digest);
    }
    if let Some(visitor) = visitor {
        visitor
            .run(&visited)
            .map_err(|(index, e)| Error::BlockVisit { index, source: e })?;
    }
    drop(visited);
    // Buffers kept for the next run: a few, and not more bytes than about two runs' worth (a long run's
    // buffers would otherwise stay grown for the rest of the build).
    let keep = 2 * (count * block_size).max(RUN_BYTES);
    let mut kept = 0u64;
    bufs.truncate(KEPT_BUFFERS);
    bufs.retain(|b| {
        kept += b.capacity() as u64;
        kept <= keep
    });
    Ok(digests)
}

/// After a read of several blocks failed: reads `segment` block by block to name the first block that fails
/// (a bad sector should be reported where it is, not where the run began).
fn locate_failure<S: BlockSource + ?Sized>(
    source: &S,
    segment: &Extent,
    block_size: u64,
    buf: &mut Vec<u8>,
) -> Option<Error> {
    let end = segment.offset + segment.len;
    let mut at = segment.offset;
    while at < end {
        let n = (block_size - at % block_size).min(end - at);
        if let Err(e) = source.read_into(at, n as usize, buf) {
            return Some(Error::SourceRead {
                source_name: source.name(),
                offset: at,
                len: n,
                source: e,
            });
        }
        at += n;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(offset: u64, len: u64, kind: ExtentKind) -> Extent {
        Extent { offset, len, kind }
    }

    #[test]
    fn normalize_fills_gaps_clips_and_merges() {
        use ExtentKind::{Data, Zero};
        assert_eq!(normalize(0, 10, &[]), vec![ext(0, 10, Data)]);
        assert_eq!(
            normalize(10, 20, &[ext(0, 15, Zero), ext(20, 2, Zero), ext(22, 100, Zero)]),
            vec![ext(10, 5, Zero), ext(15, 5, Data), ext(20, 10, Zero)]
        );
        assert_eq!(
            normalize(0, 10, &[ext(2, 2, Data), ext(4, 2, Data)]),
            vec![ext(0, 10, Data)]
        );
    }

    /// A visited block: its offset, digest and bytes.
    type Seen = (u64, Digest, Vec<u8>);

    /// Reassembles every block it is shown.
    #[derive(Default)]
    struct Collect {
        blocks: Mutex<std::collections::BTreeMap<u64, Seen>>,
        fail_at: Option<u64>,
    }

    impl BlockVisitor for Collect {
        fn run(&self, blocks: &[Visited<'_>]) -> Result<(), (u64, io::Error)> {
            for (i, b) in blocks.iter().enumerate() {
                if i > 0 {
                    assert_eq!(b.index, blocks[i - 1].index + 1, "a run is consecutive");
                }
                if self.fail_at == Some(b.index) {
                    return Err((b.index, io::Error::other("no space left")));
                }
                let mut bytes = Vec::new();
                for piece in &b.pieces {
                    match piece {
                        Piece::Data(d) => bytes.extend_from_slice(d),
                        Piece::Zero(n) => bytes.resize(bytes.len() + *n as usize, 0),
                    }
                }
                assert_eq!(bytes.len() as u64, b.len);
                self.blocks
                    .lock()
                    .unwrap()
                    .insert(b.index, (b.offset, b.digest, bytes));
            }
            Ok(())
        }
    }

    #[test]
    fn a_visitor_sees_every_block_with_the_bytes_it_was_hashed_from() {
        use crate::table::MemSource;
        let block = 64 * 1024;
        let data: Vec<u8> = (0..(10 * block + 1000))
            .map(|i| (i * 7 % 251) as u8 + 1)
            .collect();
        let source = MemSource::with_holes(
            data.clone(),
            &[(0, 3000), (2 * block, 3 * block + 5), (9 * block, block)],
        );
        let visitor = Collect::default();
        let visited = Table::build_visiting(&source, Scheme::default(), block, 3, &visitor).unwrap();
        let plain = Table::build(&source, Scheme::default(), block, 1).unwrap();
        assert!(Table::diff(&plain, &visited).unwrap().is_empty());
        let blocks = visitor.blocks.into_inner().unwrap();
        assert_eq!(blocks.len() as u64, visited.len());
        let mut whole = Vec::new();
        for (index, (offset, digest, bytes)) in &blocks {
            assert_eq!(*offset, index * block);
            assert_eq!(Some(digest), visited.digest(*index));
            whole.extend_from_slice(bytes);
        }
        assert!(whole == source.data(), "the visited bytes are the source's");
    }

    #[test]
    fn a_visitor_error_stops_the_build_and_names_the_block() {
        use crate::table::MemSource;
        let source = MemSource::new(vec![1u8; 1 << 20]);
        let visitor = Collect {
            fail_at: Some(5),
            ..Collect::default()
        };
        let err = Table::build_visiting(&source, Scheme::default(), 64 * 1024, 2, &visitor).unwrap_err();
        assert!(matches!(err, Error::BlockVisit { index: 5, .. }), "{err:?}");
    }

    #[test]
    fn worker_counts() {
        assert_eq!(worker_count(4, 2), 2);
        assert_eq!(worker_count(4, 0), 1);
        assert!(worker_count(0, 1000) >= 1);
    }
}
