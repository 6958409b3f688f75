//! Building a backup node's checking tables by reading its disk images through QEMU: the node's recovery chain
//! is opened in a qemu-storage-daemon and read over NBD, holes skipped by block status. A full node is hashed
//! whole; an incremental node rehashes only the blocks its own layer changed (found with `qemu-img map` on the
//! layer opened without its backing) and takes every other check value from its parent's table; it is stored as
//! a difference against that table. Loading a node's full table ([`load_table_of`], the one place that does)
//! derives it along the recovery chain, and prune and merge rewrite a table whose base goes away
//! ([`rewrites_for`], [`write_rewrite`]).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use anyhow::{Context, Result, bail};

use chain::{Digest, Manifest, NodeId, RelPath, Scheme, Table, TableDiff, TableFile, VmStore};

use crate::daemon::StorageDaemon;
use crate::direct::DirectSource;
use crate::graph;
use crate::qemu_bins::QemuBins;

/// Bytes of the export one block-status request asks about. The table builder wants the extents of one block
/// at a time; asking for a large window once and answering from it saves a round trip per block.
const STATUS_WINDOW: u64 = 1 << 30;

/// An NBD export read from worker threads, as the chain crate's block source.
pub struct NbdSource {
    client: nbd::BlockingClient,
    size: u64,
    /// Bytes read so far (data only: holes are not read).
    read: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// The extents of the last window asked for.
    window: Mutex<Window>,
}

/// Extents known for `[start, end)`, sorted and touching.
#[derive(Default)]
struct Window {
    start: u64,
    end: u64,
    extents: Vec<chain::Extent>,
}

impl NbdSource {
    pub fn new(client: nbd::BlockingClient, size: u64) -> NbdSource {
        NbdSource {
            client,
            size,
            read: std::sync::Arc::default(),
            window: Mutex::new(Window::default()),
        }
    }

    /// The count of bytes read (the data that crossed the connection), shared.
    pub fn read_counter(&self) -> std::sync::Arc<std::sync::atomic::AtomicU64> {
        std::sync::Arc::clone(&self.read)
    }

    fn count(&self, n: usize) {
        self.read
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
    }
}

fn io_error(e: nbd::Error) -> io::Error {
    io::Error::other(e)
}

impl chain::BlockSource for NbdSource {
    fn len(&self) -> u64 {
        self.size
    }

    fn extents(&self, offset: u64, len: u64) -> io::Result<Vec<chain::Extent>> {
        let end = offset.saturating_add(len).min(self.size);
        if end <= offset {
            return Ok(Vec::new());
        }
        let mut window = self.window.lock().unwrap_or_else(PoisonError::into_inner);
        if offset < window.start || end > window.end {
            // Workers take blocks in ascending order: the window runs ahead of the block asked for.
            let stop = offset.saturating_add(STATUS_WINDOW).min(self.size).max(end);
            let extents = self.client.extents(offset, stop - offset).map_err(io_error)?;
            *window = Window {
                start: offset,
                end: stop,
                extents: extents
                    .into_iter()
                    .map(|e| chain::Extent {
                        offset: e.offset,
                        len: e.len,
                        kind: if e.zero {
                            chain::ExtentKind::Zero
                        } else {
                            chain::ExtentKind::Data
                        },
                    })
                    .collect(),
            };
        }
        // The extents overlapping [offset, end); the builder clips them to the block.
        let first = window.extents.partition_point(|e| e.offset + e.len <= offset);
        Ok(window.extents[first..]
            .iter()
            .take_while(|e| e.offset < end)
            .copied()
            .collect())
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.count(buf.len());
        self.client.read_at(offset, buf).map_err(io_error)
    }

    fn read_into(&self, offset: u64, len: usize, buf: &mut Vec<u8>) -> io::Result<()> {
        self.count(len);
        *buf = self
            .client
            .read_owned(offset, len, std::mem::take(buf))
            .map_err(io_error)?;
        Ok(())
    }
}

/// The byte ranges allocated in this one qcow2 layer (data or zeroed clusters), not in its backing files.
pub async fn layer_extents(bins: &QemuBins, path: &Path) -> Result<Vec<(u64, u64)>> {
    let mut spec = serde_json::json!({
        "driver": "qcow2",
        "file": { "driver": "file", "filename": path },
        "backing": null,
    });
    crate::crypt::unlock::encrypt_node(&mut spec);
    let entries = crate::direct::qemu_img_map(bins, &spec, true)
        .await
        .with_context(|| format!("mapping {}", path.display()))?;
    Ok(entries
        .into_iter()
        .filter(|e| e.present)
        .map(|e| (e.start, e.length))
        .collect())
}

/// The indices of the `block_size` blocks that the byte ranges touch, sorted and unique; a block at or past
/// `count` (the disk's blocks) is [`chain::Error::BlockOutOfRange`].
pub fn touched_blocks(ranges: &[(u64, u64)], block_size: u64, count: u64) -> Result<Vec<u64>, chain::Error> {
    let mut blocks: Vec<u64> = Vec::new();
    for &(start, len) in ranges {
        if len == 0 {
            continue;
        }
        let first = start / block_size;
        // A range past the disk's `count` blocks (a layer larger than its table says) is refused before it
        // sizes anything.
        let last = start.saturating_add(len - 1) / block_size;
        if last >= count {
            return Err(chain::Error::BlockOutOfRange { index: last, count });
        }
        for b in first..=last {
            if blocks.last() != Some(&b) {
                blocks.push(b);
            }
        }
    }
    blocks.sort_unstable();
    blocks.dedup();
    Ok(blocks)
}

/// One disk of one node of a VM's repository, with what reading its recovery chain needs: the context of the
/// functions that hash, verify or flatten a node's disk.
#[derive(Clone, Copy)]
pub struct DiskAt<'a> {
    pub bins: &'a QemuBins,
    pub vm: &'a VmStore,
    pub manifest: &'a Manifest,
    pub node: &'a NodeId,
    pub disk: &'a str,
}

/// Builds the checking table of `node`'s disk `disk`. With `parent`, only the blocks changed in the node's own
/// layer are read, hashed as the parent's were: the parent's block size and scheme are the chain's, whatever
/// `scheme` and `block_size` say (the repository's settings, which a hand edit may have changed). Otherwise
/// the whole disk is, hashed by `scheme` in `block_size` blocks (the default for a new full; a table to be
/// compared with another, that one's). The chain is read straight from its files when it can be
/// ([`DirectSource`]), otherwise over NBD from a qemu-storage-daemon started for it.
pub async fn build(at: DiskAt<'_>, scheme: Scheme, block_size: u64, parent: Option<&Table>) -> Result<Table> {
    let DiskAt {
        bins,
        vm,
        manifest,
        node,
        disk,
    } = at;
    let files = crate::direct::chain_files(vm, manifest, node, disk)?;
    let direct = DirectSource::open(bins, &files).await?;
    // An incremental's table is its parent's with the blocks its own layer touched rehashed.
    let changed = match parent {
        None => None,
        Some(parent) => {
            let ranges = match &direct {
                Some(source) => source.top_layer_ranges().to_vec(),
                None => layer_extents(bins, files.last().context("empty recovery chain")?).await?,
            };
            Some((
                parent.clone(),
                touched_blocks(&ranges, parent.block_size(), parent.len())?,
            ))
        }
    };
    if let Some(source) = direct {
        return hash_node(source, (scheme, block_size), 0, changed).await;
    }
    let daemon = StorageDaemon::start(bins).await?;
    let prefix = format!("t{}-", disk_index(manifest, node, disk));
    let result = async {
        let chain = graph::add_chain(daemon.qmp(), vm, manifest, node, disk, &prefix).await?;
        let top = chain.top().context("empty recovery chain")?.to_owned();
        daemon.export(&top, &format!("{prefix}x"), false).await?;
        let client = daemon.connect(&format!("{prefix}x")).await?;
        let size = client.size();
        let source = NbdSource::new(
            nbd::BlockingClient::new(client, tokio::runtime::Handle::current()),
            size,
        );
        hash_node(source, (scheme, block_size), threads(), changed).await
    }
    .await;
    daemon.stop().await?;
    result
}

/// The checking table of `node`'s disk `disk` when its own layer allocates nothing: `parent`'s, unchanged, with
/// no read of the chain. `None` when the layer holds anything (data or zero clusters): build it then
/// ([`build`]). Only the top file is mapped (without its backing files), which costs the same on a 1 TiB disk
/// as on a small one, while mapping the whole chain walks every range the layer leaves to its backing files.
pub async fn unchanged_layer(at: DiskAt<'_>, parent: &Table) -> Result<Option<Table>> {
    let files = crate::direct::chain_files(at.vm, at.manifest, at.node, at.disk)?;
    let top = files.last().context("empty recovery chain")?;
    let ranges = layer_extents(at.bins, top).await?;
    // A range past the parent's blocks is refused here as it would be by `build`.
    Ok(touched_blocks(&ranges, parent.block_size(), parent.len())?
        .is_empty()
        .then(|| parent.clone()))
}

/// Hashes a node's disk from `source` on `threads` workers: whole, or only the `changed` blocks on top of the
/// parent's table.
async fn hash_node<S: chain::BlockSource + Send + 'static>(
    source: S,
    (scheme, block_size): (Scheme, u64),
    threads: usize,
    changed: Option<(Table, Vec<u64>)>,
) -> Result<Table> {
    // An encrypted repository's tables are keyed ([`chain::crypt`]).
    let key = crate::crypt::unlock::table_key();
    tokio::task::spawn_blocking(move || -> Result<Table> {
        Ok(match changed {
            None => chain::crypt::sealed(key.as_ref(), Table::build(&source, scheme, block_size, threads)?)?,
            Some((parent, blocks)) => {
                let hashes = Table::build_blocks(&source, &parent, &blocks, threads)?;
                Table::derive(&parent, &chain::crypt::sealed_blocks(key.as_ref(), hashes))?
            }
        })
    })
    .await
    .context("table builder panicked")?
}

/// Loads and verifies a node's checking table for one disk.
pub fn load_node_table(vm: &VmStore, manifest: &Manifest, node: &NodeId, disk: &str) -> Result<chain::Table> {
    Ok(load_node_table_with_id(vm, manifest, node, disk)?.0)
}

/// [`load_node_table`] and the table's content id ([`Table::content_id`]), which a child's difference table
/// names as its base.
pub fn load_node_table_with_id(
    vm: &VmStore,
    manifest: &Manifest,
    node: &NodeId,
    disk: &str,
) -> Result<(chain::Table, Digest)> {
    let n = manifest
        .node(node)
        .with_context(|| format!("node {node} is not in the manifest"))?;
    load_table_of(vm, manifest, n, disk)
}

/// A node's disk's table file as the manifest names it, checked against its sha256: whole or a difference.
pub fn load_table_file(vm: &VmStore, n: &chain::Node, disk: &str) -> Result<(TableFile, PathBuf)> {
    let node = &n.id;
    let d = n
        .disks
        .iter()
        .find(|d| d.disk == disk)
        .with_context(|| format!("node {node} has no disk {disk}"))?;
    let (Some(table), Some(sha)) = (&d.table, &d.table_sha256) else {
        bail!(crate::exit::Exit::new(
            crate::exit::ExitCode::Repository,
            format!("node {node} has no checking table for disk {disk} in the manifest")
        ));
    };
    let path = vm.resolve(table)?;
    Ok((TableFile::load_verified(&path, sha)?, path))
}

/// The full checking table of node `n`'s disk `disk`, and its content id: the ONE place a node's table is
/// loaded. A whole table is read as it is; a difference table is applied to its parent's table, derived the
/// same way, down the recovery chain to the nearest whole table. Each file is checked against the sha256 in
/// the manifest, each difference against the content id of the table it is applied to
/// ([`chain::Error::TableBaseMismatch`]), and the result against the content id the node's own file records:
/// a table that does not fit is an error, never a silently wrong table. The files are read once each and the
/// table stays sparse.
pub fn load_table_of(
    vm: &VmStore,
    manifest: &Manifest,
    n: &chain::Node,
    disk: &str,
) -> Result<(Table, Digest)> {
    load_table_above(vm, manifest, n, disk, None)
}

/// A node's full table already derived: where [`load_table_above`] may start instead of the nearest whole
/// table.
#[derive(Clone, Copy)]
pub struct Known<'a> {
    pub node: &'a NodeId,
    pub table: &'a Table,
    pub id: &'a Digest,
}

/// [`load_table_of`], starting from `known` when the walk down the recovery chain meets its node: a caller
/// that loads the tables of a chain's nodes in order (verify) applies one difference per node instead of
/// re-deriving each from the full. The same checks hold: the difference's base must be `known`'s content id.
pub fn load_table_above(
    vm: &VmStore,
    manifest: &Manifest,
    n: &chain::Node,
    disk: &str,
    known: Option<Known<'_>>,
) -> Result<(Table, Digest)> {
    let (file, path) = load_table_file(vm, n, disk)?;
    let want = *file.id();
    let mut diffs: Vec<(TableDiff, PathBuf)> = Vec::new();
    let mut below = manifest.recovery_chain(&n.id)?;
    below.pop(); // n itself
    let (mut table, mut id) = match file {
        TableFile::Whole { table, id } => return Ok((table, id)),
        TableFile::Diff(diff) => {
            diffs.push((diff, path));
            loop {
                let Some(parent) = below.pop() else {
                    let (_, path) = diffs.pop().context("no difference to apply")?;
                    return Err(chain::Error::TableBaseMissing {
                        path,
                        why: "its node has no parent in the tree".to_owned(),
                    }
                    .into());
                };
                let has_table = parent
                    .disks
                    .iter()
                    .any(|d| d.disk == disk && d.table.is_some() && d.table_sha256.is_some());
                if let Some(k) = known.filter(|k| *k.node == parent.id) {
                    break (k.table.clone(), *k.id);
                }
                if !has_table {
                    let (_, path) = diffs.pop().context("no difference to apply")?;
                    return Err(chain::Error::TableBaseMissing {
                        path,
                        why: format!(
                            "the parent node {} has no checking table for disk {disk}",
                            parent.id
                        ),
                    }
                    .into());
                }
                match load_table_file(vm, parent, disk)? {
                    (TableFile::Whole { table, id }, _) => break (table, id),
                    (TableFile::Diff(diff), path) => diffs.push((diff, path)),
                }
            }
        }
    };
    // Oldest first: each applied to the table below it.
    while let Some((diff, path)) = diffs.pop() {
        table.apply_diff(&id, &diff, &path)?;
        id = *diff.id();
    }
    let actual = table.content_id();
    if actual != want || id != want {
        return Err(chain::Error::TableBaseMismatch {
            path: vm.resolve(
                n.disks
                    .iter()
                    .find(|d| d.disk == disk)
                    .and_then(|d| d.table.as_ref())
                    .context("the node's table vanished")?,
            )?,
            expected: hex::encode(want),
            actual: format!("{} once derived", hex::encode(actual)),
        }
        .into());
    }
    Ok((table, want))
}

/// A node's table file written anew because the table it is a difference against is going away (prune merges
/// the node's parent into it, merge makes the node a full): the same content (the same content id, so the
/// tables that name it as their base stay valid), under a new name, as a difference against the node's new
/// parent or whole.
#[derive(Debug, Clone)]
pub struct Rewrite {
    pub node: NodeId,
    pub disk: String,
    /// The file the manifest names now.
    pub old: RelPath,
    /// The file it will name.
    pub new: RelPath,
}

/// The table files of `node` that must be rewritten before its parent changes to `new_parent` (`None`: it
/// becomes a root): those that are differences. Only headers are read. The new names say what they are
/// relative to (`DISK.table-on-NODE`, `DISK.table-whole`), so they never collide with the old ones.
pub fn rewrites_for(vm: &VmStore, node: &chain::Node, new_parent: Option<&NodeId>) -> Result<Vec<Rewrite>> {
    let mut out = Vec::new();
    for d in &node.disks {
        let Some(old) = &d.table else { continue };
        if !chain::is_difference_file(&vm.resolve(old)?)? {
            continue;
        }
        let stem = match new_parent {
            Some(p) => format!("{}/{}.table-on-{p}", node.id, d.disk),
            None => format!("{}/{}.table-whole", node.id, d.disk),
        };
        let mut new: RelPath = stem.parse()?;
        let mut n = 1;
        while new == *old {
            new = format!("{stem}.{n}").parse()?;
            n += 1;
        }
        out.push(Rewrite {
            node: node.id.clone(),
            disk: d.disk.clone(),
            old: old.clone(),
            new,
        });
    }
    Ok(out)
}

/// Writes `rewrite.new`: the node's full table, derived in `manifest` as it is now (the old base still in
/// it), as a difference against `new_parent`'s table for the disk (when it has one of the same shape) or
/// whole. Returns the file's sha256 for the manifest. The content id is checked to be unchanged.
pub fn write_rewrite(
    vm: &VmStore,
    manifest: &Manifest,
    rewrite: &Rewrite,
    new_parent: Option<&NodeId>,
) -> Result<String> {
    let (table, id) = load_node_table_with_id(vm, manifest, &rewrite.node, &rewrite.disk)?;
    let base = match new_parent {
        Some(p) => {
            let has_table = manifest
                .node(p)
                .and_then(|n| n.disks.iter().find(|d| d.disk == rewrite.disk))
                .is_some_and(|d| d.table.is_some() && d.table_sha256.is_some());
            if has_table {
                Some(load_node_table_with_id(vm, manifest, p, &rewrite.disk)?)
            } else {
                None
            }
        }
        None => None,
    };
    let path = vm.resolve(&rewrite.new)?;
    let sha = table.save_against(base.as_ref().map(|(t, i)| (t, i)), &path)?;
    // What was written reads back as the same content.
    let check = TableFile::load_verified(&path, &sha)?;
    if *check.id() != id {
        bail!(
            "rewriting the checking table of node {} disk {} changed its content id: {} is not {}",
            rewrite.node,
            rewrite.disk,
            hex::encode(check.id()),
            hex::encode(id)
        );
    }
    Ok(sha)
}

/// Makes the manifest name the rewritten tables (in memory; the caller saves).
pub fn switch_rewrites(manifest: &mut Manifest, rewrites: &[(Rewrite, String)]) -> Result<()> {
    for (r, sha) in rewrites {
        let d = manifest
            .node_mut(&r.node)
            .and_then(|n| n.disks.iter_mut().find(|d| d.disk == r.disk))
            .with_context(|| format!("node {} disk {} vanished from the manifest", r.node, r.disk))?;
        d.table = Some(r.new.clone());
        d.table_sha256 = Some(sha.clone());
    }
    Ok(())
}

fn disk_index(manifest: &Manifest, node: &NodeId, disk: &str) -> usize {
    manifest
        .node(node)
        .and_then(|n| n.disks.iter().position(|d| d.disk == disk))
        .unwrap_or(0)
}

/// Hashing threads for a source read over NBD: two per core, so that while one waits for its read, the core
/// hashes what another received, and the server always has a request to work on.
pub fn threads() -> usize {
    2 * std::thread::available_parallelism().map_or(2, std::num::NonZero::get)
}

#[cfg(test)]
mod tests {
    use super::touched_blocks;

    #[test]
    fn touched_blocks_cover_partial_and_spanning_ranges() {
        let mib = 1 << 20;
        let ok = |ranges: &[(u64, u64)]| touched_blocks(ranges, mib, 8).unwrap();
        assert_eq!(ok(&[(0, 1)]), vec![0]);
        assert_eq!(ok(&[(mib - 1, 2)]), vec![0, 1]);
        assert_eq!(ok(&[(3 * mib, 2 * mib), (0, 10), (4 * mib, 1)]), vec![0, 3, 4]);
        assert_eq!(ok(&[(5, 0)]), Vec::<u64>::new());
    }

    #[test]
    fn touched_blocks_past_the_disk_are_refused_before_they_are_listed() {
        let mib = 1 << 20;
        assert_eq!(touched_blocks(&[(7 * mib, mib)], mib, 8).unwrap(), vec![7]);
        for range in [(7 * mib, mib + 1), (0, 1 << 50), (u64::MAX - 5, 10)] {
            assert!(matches!(
                touched_blocks(&[range], mib, 8),
                Err(chain::Error::BlockOutOfRange { count: 8, .. })
            ));
        }
    }
}
