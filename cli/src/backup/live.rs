//! A backup's checking tables, hashed from the live disks while the copy jobs run, so that a backup takes
//! about the longer of the copy and the hashing instead of their sum. A full hashes every block; an incremental
//! or differential the blocks its job copies (a disabled copy of the bitmap the job reads, made in the same
//! transaction and read over NBD), over its parent's table.
//!
//! The backup's transaction also adds a *watch* bitmap to each disk (in QEMU's memory, one bit per table
//! block). While the jobs copy, qmpbak reads each disk as the guest sees it now, over NBD from the VM's QEMU
//! (coherent with the guest's writes and with QEMU's qcow2 caches; the image file is never read behind QEMU's
//! back), and hashes every block. A block the guest has not written since the backup instant reads the same at
//! any later time, so its hash is the point-in-time one; every block it did write is marked in the watch
//! bitmap. Once the jobs are done and the hashing has finished, one transaction stops the watch bitmaps (a
//! transaction drains the I/O in flight first, so every write that overlapped a hashing read has completed and
//! marked its block), the bitmaps are read over NBD (`qemu:dirty-bitmap:NAME`), and the marked blocks are
//! rehashed from the finished node file ([`crate::tables::rehash`]). Once the jobs are done and the node's file
//! is closed, what is left to hash is read from that file (`pread`, [`DirectSource`]) rather than over NBD,
//! where the chain allows it: it holds the instant's data, and is read faster than through QEMU's NBD server.
//!
//! Everything this adds in QEMU (the bitmaps, the NBD server, the exports, named after the operation) is in
//! the operation record before it exists, so a killed run is undone by the next ([`crate::recovery`]). When
//! the NBD server cannot be started (the VM's QEMU already runs one) or anything of this fails, the backup
//! builds its tables after the copy as before, and says so.

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use anyhow::{Context, Result, anyhow, bail};
use chain::{BitmapRecord, BlockSource as _, Payload, Table};
use qmp::commands::{
    BitmapRef, BlockDirtyBitmapAdd, BlockDirtyBitmapDisable, BlockDirtyBitmapMerge, BlockDirtyBitmapRemove,
    BlockExportAdd, BlockExportDel, NbdServerStart, NbdServerStop, Transaction, TransactionAction,
};
use tokio::task::JoinHandle;

use super::{Run, interrupted};
use crate::daemon::NBD_CONNECT_TIMEOUT;
use crate::direct::DirectSource;
use crate::plan::Method;
use crate::tables::{NbdSource, threads, touched_blocks};

/// Per disk, the table hashed from the live disk and the blocks to rehash from the node's file.
pub(crate) type LiveTables = Vec<(Table, Vec<u64>)>;

/// The hashing of the live disks, running on worker threads.
pub(super) type Hashing = JoinHandle<Result<Vec<Table>>>;

/// The live hashing of one backup run: the NBD server it started and the watch bitmaps it added.
pub(super) struct Live {
    /// Holds the server's socket; removed with it.
    _sockdir: tempfile::TempDir,
    socket: PathBuf,
    /// Per target, the watch bitmap's name.
    watch: Vec<String>,
    /// For an incremental or differential, per target: the copy of the bitmap the job reads, made in the
    /// transaction (disabled, so QEMU exports it): the blocks the job copies, the ones to hash.
    snap: Option<Vec<String>>,
    /// Set when the run gives up: the hashing workers stop at their next read.
    cancel: Arc<AtomicBool>,
    /// Per target, the node's closed file, once the job is done: the rest of the hashing reads it.
    files: Vec<Arc<OnceLock<DirectSource>>>,
}

impl Drop for Live {
    fn drop(&mut self) {
        self.cancel.store(true, Ordering::Relaxed);
    }
}

/// The name of a disk's watch bitmap: this chain's, this disk's and this node's, and of a role that
/// [`crate::bitmaps::BitmapName::parse`] does not know, so nothing takes it for a backup's bitmap.
fn watch_name(run: &Run<'_>, t: &super::Target) -> String {
    format!("qmpbak-{}-{}-watch-{}", run.manifest.chain_id, t.key, run.node)
}

/// The name of the copy of a disk's base bitmap at the instant (see [`Live::snap`]), of an unknown role too.
fn snap_name(run: &Run<'_>, t: &super::Target) -> String {
    format!("qmpbak-{}-{}-snap-{}", run.manifest.chain_id, t.key, run.node)
}

/// An NBD export's id: the operation's id first, as recovery finds the exports an operation left.
fn export_id(run: &Run<'_>, kind: &str, disk: usize) -> String {
    format!("{}-{kind}{disk}", run.op.id)
}

impl Live {
    /// For a full, incremental or differential backup: records the bitmaps and the NBD server in the operation
    /// record, then starts the server. `None` for a checksum-diff (which hashes as it copies anyway), and when
    /// the server cannot be started (said on the progress output, in the log and in the report): the tables
    /// are then built after the copy.
    pub(super) async fn prepare(run: &mut Run<'_>) -> Result<Option<Live>> {
        let snap = match run.plan.method {
            Method::Full => None,
            Method::Bitmap => Some(run.targets.iter().map(|t| snap_name(run, t)).collect::<Vec<_>>()),
            Method::ChecksumDiff => return Ok(None),
        };
        let sockdir = crate::daemon::private_temp_dir("qmpbak-nbd-")?;
        let socket = sockdir.path().join("nbd.sock");
        let watch: Vec<String> = run.targets.iter().map(|t| watch_name(run, t)).collect();
        let before = run.op.clone();
        for (i, t) in run.targets.iter().enumerate() {
            let names = [Some(&watch[i]), snap.as_ref().map(|s| &s[i])];
            for name in names.into_iter().flatten() {
                run.op.bitmaps.push(BitmapRecord {
                    node: t.info.node_name.clone(),
                    name: name.clone(),
                });
            }
        }
        run.op.payload = Payload::Backup {
            nbd_server_started: true,
        };
        run.record()?;
        crate::crashpoint::crashpoint("backup-live-recorded");
        if let Err(e) = run
            .qmp
            .execute(&NbdServerStart::unix(socket.display().to_string()))
            .await
        {
            // Not ours to stop: the record must not say so.
            run.op = before;
            run.record()?;
            fallback(
                run,
                &format!(
                    "no NBD server could be started in the VM's QEMU (is another one running in it?): {e}"
                ),
            );
            return Ok(None);
        }
        Ok(Some(Live {
            _sockdir: sockdir,
            socket,
            watch,
            snap,
            cancel: Arc::new(AtomicBool::new(false)),
            files: run.targets.iter().map(|_| Arc::new(OnceLock::new())).collect(),
        }))
    }

    /// The transaction's actions that add the watch bitmaps (one bit per table block, in QEMU's memory only)
    /// and, for an incremental, the copies of the bitmaps its jobs read.
    pub(super) fn actions(&self, run: &Run<'_>) -> Result<Vec<TransactionAction>> {
        let granularity = u32::try_from(run.block_size).context("table block size too large for a bitmap")?;
        let mut actions = Vec::new();
        for (i, t) in run.targets.iter().enumerate() {
            let node = t.info.node_name.as_str();
            actions.push(TransactionAction::BlockDirtyBitmapAdd(BlockDirtyBitmapAdd {
                granularity: Some(granularity),
                persistent: Some(false),
                ..BlockDirtyBitmapAdd::new(node, self.watch[i].as_str())
            }));
            if let Some(snap) = &self.snap {
                let base = run
                    .base_bitmap(t)
                    .context("an incremental without a base bitmap")?;
                actions.push(TransactionAction::BlockDirtyBitmapAdd(BlockDirtyBitmapAdd {
                    granularity: Some(granularity),
                    persistent: Some(false),
                    disabled: Some(true),
                    ..BlockDirtyBitmapAdd::new(node, snap[i].as_str())
                }));
                actions.push(TransactionAction::BlockDirtyBitmapMerge(BlockDirtyBitmapMerge {
                    node: node.to_owned(),
                    target: snap[i].clone(),
                    bitmaps: vec![BitmapRef::Name(base)],
                }));
            }
        }
        Ok(actions)
    }

    /// After the transaction: exports each disk read-only and starts hashing them on worker threads: all of a
    /// full's blocks; for an incremental, the blocks its job copies, over the parent's table.
    pub(super) async fn start(&self, run: &Run<'_>) -> Result<Hashing> {
        let handle = tokio::runtime::Handle::current();
        let mut sources = Vec::new();
        let mut over = Vec::new();
        for t in &run.targets {
            let id = export_id(run, "l", t.index);
            let snap = self.snap.as_ref().map(|s| s[t.index].as_str());
            let (export, options) = match snap {
                None => (
                    BlockExportAdd::nbd(&id, &t.info.node_name, false),
                    nbd::ConnectOptions::new(),
                ),
                Some(snap) => (
                    BlockExportAdd::nbd_with_bitmap(&id, &t.info.node_name, snap),
                    nbd::ConnectOptions::new().dirty_bitmap(snap),
                ),
            };
            run.qmp
                .execute(&export)
                .await
                .with_context(|| format!("exporting disk {} over NBD", t.info.id))?;
            let client = nbd::Client::connect_unix_with(&self.socket, &id, &options, NBD_CONNECT_TIMEOUT)
                .await
                .with_context(|| format!("connecting to NBD export {id}"))?;
            let size = client.size();
            if size != t.info.virtual_size {
                bail!(
                    "the NBD export of disk {} has {size} bytes, the disk {}",
                    t.info.id,
                    t.info.virtual_size
                );
            }
            if let Some(snap) = snap {
                let parent = run
                    .plan
                    .parent
                    .as_ref()
                    .context("an incremental without a parent")?;
                let parent =
                    crate::tables::load_node_table(run.vm, &run.manifest, &parent.parse()?, &t.info.id)?;
                if parent.virtual_size() != size || parent.block_size() != run.block_size {
                    bail!(
                        "the parent's checking table of disk {} does not fit the disk",
                        t.info.id
                    );
                }
                let copied = client
                    .dirty_extents(snap, 0, size)
                    .await
                    .with_context(|| format!("reading the copied blocks of disk {}", t.info.id))?;
                let ranges: Vec<(u64, u64)> = copied
                    .iter()
                    .filter(|e| e.dirty())
                    .map(|e| (e.offset, e.len))
                    .collect();
                let blocks = touched_blocks(&ranges, run.block_size, parent.len())?;
                over.push((parent, blocks));
            }
            sources.push(LiveSource {
                nbd: NbdSource::new(nbd::BlockingClient::new(client, handle.clone()), size),
                file: Arc::clone(&self.files[t.index]),
                cancel: Arc::clone(&self.cancel),
            });
        }
        crate::crashpoint::pause_point("backup-hashing-live").await;
        let block_size = run.block_size;
        // An encrypted repository's tables are keyed ([`chain::crypt`]).
        let key = crate::crypt::unlock::table_key();
        Ok(tokio::task::spawn_blocking(move || {
            let mut over = over.into_iter();
            sources
                .iter()
                .map(|source| {
                    Ok(match over.next() {
                        None => {
                            let table = Table::build(source, block_size, threads())?;
                            match &key {
                                Some(key) => key.seal_table(&table)?,
                                None => table,
                            }
                        }
                        Some((parent, blocks)) => {
                            let hashes = Table::build_blocks(source, block_size, &blocks, threads())?;
                            match &key {
                                Some(key) => Table::derive(&parent, &key.seal_blocks(&hashes))?,
                                None => Table::derive(&parent, &hashes)?,
                            }
                        }
                    })
                })
                .collect()
        }))
    }

    /// After the jobs: waits for the hashing, stops and reads the watch bitmaps and removes what this added in
    /// QEMU. Per disk the live table and the blocks the guest wrote since the instant; `None` (said) when
    /// something failed: the tables are then built after the copy.
    pub(super) async fn finish(self, run: &mut Run<'_>, hashing: Hashing) -> Result<Option<LiveTables>> {
        run.progress.phase("hashing the disks (the copy is done)");
        if !hashing.is_finished() {
            self.switch_to_files(run).await;
        }
        let hashed = tokio::select! {
            joined = hashing => joined.map_err(|e| anyhow!("the hashing workers panicked: {e}")).and_then(|r| r),
            () = run.interrupt.wait() => {
                self.cancel.store(true, Ordering::Relaxed);
                return Err(interrupted());
            }
        };
        let result = match hashed {
            Ok(tables) => self.read_watch(run, tables).await,
            Err(e) => Err(e),
        };
        self.teardown(run).await?;
        if run.interrupt.arrived().await {
            return Err(interrupted());
        }
        match result {
            Ok(live) => Ok(Some(live)),
            Err(e) => {
                fallback(run, &format!("hashing the live disks failed: {e:#}"));
                Ok(None)
            }
        }
    }

    /// When the hashing could not start: removes what this added in QEMU and says that the tables are built
    /// after the copy.
    pub(super) async fn give_up(self, run: &mut Run<'_>, why: &anyhow::Error) -> Result<()> {
        self.teardown(run).await?;
        fallback(
            run,
            &format!("the disks could not be read while they are copied: {why:#}"),
        );
        Ok(())
    }

    /// Has the hashing read the rest of each disk from the node's closed file, where it can be read directly (an
    /// uncompressed, unencrypted chain); else it goes on over NBD. A failure only leaves it on NBD.
    async fn switch_to_files(&self, run: &Run<'_>) {
        for t in &run.targets {
            let files = match crate::direct::chain_files(run.vm, &run.manifest, &run.node, &t.info.id) {
                Ok(files) => files,
                Err(e) => {
                    tracing::debug!("hashing disk {} goes on over NBD: {e:#}", t.info.id);
                    continue;
                }
            };
            let bins = run.bins.clone();
            let opened = tokio::task::spawn_blocking(move || DirectSource::open(&bins, &files)).await;
            match opened {
                Ok(Ok(Some(file))) if file.len() == t.info.virtual_size => {
                    let _ = self.files[t.index].set(file);
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::debug!("hashing disk {} goes on over NBD: {e:#}", t.info.id),
                Err(e) => tracing::debug!("hashing disk {} goes on over NBD: {e}", t.info.id),
            }
        }
    }

    /// Stops the watch bitmaps and reads, per disk, which table blocks the guest wrote since the instant.
    async fn read_watch(&self, run: &Run<'_>, tables: Vec<Table>) -> Result<LiveTables> {
        // One transaction: QEMU drains all I/O in flight before it acts, so every guest write that began while
        // a block was being hashed has completed and set its bit before the bitmaps stop recording.
        let actions = run
            .targets
            .iter()
            .zip(&self.watch)
            .map(|(t, name)| {
                TransactionAction::BlockDirtyBitmapDisable(BlockDirtyBitmapDisable::new(
                    t.info.node_name.as_str(),
                    name.as_str(),
                ))
            })
            .collect();
        run.qmp
            .execute(&Transaction::new(actions))
            .await
            .context("stopping the watch bitmaps")?;
        let mut live = Vec::new();
        for ((t, name), table) in run.targets.iter().zip(&self.watch).zip(tables) {
            if table.virtual_size() != t.info.virtual_size || table.block_size() != run.block_size {
                bail!("the table hashed from disk {} does not fit the disk", t.info.id);
            }
            let id = export_id(run, "w", t.index);
            run.qmp
                .execute(&BlockExportAdd::nbd_with_bitmap(&id, &t.info.node_name, name))
                .await
                .with_context(|| format!("exporting the watch bitmap of disk {}", t.info.id))?;
            let options = nbd::ConnectOptions::new().dirty_bitmap(name);
            let client = nbd::Client::connect_unix_with(&self.socket, &id, &options, NBD_CONNECT_TIMEOUT)
                .await
                .with_context(|| format!("connecting to NBD export {id}"))?;
            let extents = client
                .dirty_extents(name, 0, t.info.virtual_size)
                .await
                .with_context(|| format!("reading the watch bitmap of disk {}", t.info.id))?;
            let _ = client.disconnect().await;
            let written: Vec<(u64, u64)> = extents
                .iter()
                .filter(|e| e.dirty())
                .map(|e| (e.offset, e.len))
                .collect();
            let blocks = touched_blocks(&written, run.block_size, table.len())?;
            if !blocks.is_empty() {
                tracing::debug!(
                    disk = %t.info.id,
                    blocks = blocks.len(),
                    "blocks the guest wrote during the copy, rehashed from the node's file"
                );
            }
            live.push((table, blocks));
        }
        crate::crashpoint::crashpoint("backup-live-read");
        Ok(live)
    }

    /// Removes the exports, the NBD server and the watch bitmaps, and then drops them from the operation record.
    async fn teardown(&self, run: &mut Run<'_>) -> Result<()> {
        self.cancel.store(true, Ordering::Relaxed);
        for t in &run.targets {
            for kind in ["l", "w"] {
                let _ = run
                    .qmp
                    .execute(&BlockExportDel::hard(export_id(run, kind, t.index)))
                    .await;
            }
        }
        // Stopping the server waits until its exports are gone, so the bitmaps are no longer busy.
        let _ = run.qmp.execute(&NbdServerStop).await;
        let mut ours = Vec::new();
        let mut left = Vec::new();
        for (i, t) in run.targets.iter().enumerate() {
            let names = [Some(&self.watch[i]), self.snap.as_ref().map(|s| &s[i])];
            for name in names.into_iter().flatten() {
                ours.push(name.clone());
                let remove = BlockDirtyBitmapRemove::new(t.info.node_name.as_str(), name.as_str());
                if run.qmp.execute(&remove).await.is_err() {
                    left.push(name.clone());
                }
            }
        }
        run.op
            .bitmaps
            .retain(|b| !ours.contains(&b.name) || left.contains(&b.name));
        run.op.payload = Payload::Backup {
            nbd_server_started: false,
        };
        run.record()
    }
}

/// Says why the tables are built after the copy this time.
fn fallback(run: &mut Run<'_>, why: &str) {
    let text = format!("checking tables are built after the copy (slower): {why}");
    tracing::warn!("{text}");
    run.progress.phase(&text);
    run.warnings.push(text);
}

/// A disk read for hashing: over NBD from the live disk until the node's file is closed, then from the file
/// ([`DirectSource`], when the chain can be read directly), which is faster than QEMU's NBD server. Either
/// reads every block the guest has not written since the instant as it was then, and the blocks it wrote are
/// rehashed anyway, so a block may even mix the two. Reads fail once the run is given up, so the hashing
/// workers stop.
struct LiveSource {
    nbd: NbdSource,
    file: Arc<OnceLock<DirectSource>>,
    cancel: Arc<AtomicBool>,
}

impl LiveSource {
    fn check(&self) -> io::Result<()> {
        if self.cancel.load(Ordering::Relaxed) {
            return Err(io::Error::new(
                io::ErrorKind::Interrupted,
                "the backup was given up",
            ));
        }
        Ok(())
    }
}

impl chain::BlockSource for LiveSource {
    fn len(&self) -> u64 {
        self.nbd.len()
    }

    fn extents(&self, offset: u64, len: u64) -> io::Result<Vec<chain::Extent>> {
        self.check()?;
        match self.file.get() {
            Some(file) => file.extents(offset, len),
            None => self.nbd.extents(offset, len),
        }
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check()?;
        match self.file.get() {
            Some(file) => file.read_at(offset, buf),
            None => self.nbd.read_at(offset, buf),
        }
    }

    fn read_into(&self, offset: u64, len: usize, buf: &mut Vec<u8>) -> io::Result<()> {
        self.check()?;
        match self.file.get() {
            Some(file) => file.read_into(offset, len, buf),
            None => self.nbd.read_into(offset, len, buf),
        }
    }

    fn name(&self) -> String {
        self.nbd.name()
    }
}
