//! The copy phase of a checksum-diff incremental, used when QEMU's dirty bitmaps cannot be trusted (missing
//! after a restart, inconsistent, busy, or relative to another node). Image fleecing gives a point-in-time
//! view of each running disk: a `blockdev-backup sync=none` job copies old data into a temporary overlay before
//! the guest overwrites it, and reads of the overlay see the disk as it was at the transaction. qmpbak reads
//! that view over NBD from the VM's QEMU and hashes it into a full checking table; each block whose check
//! value differs from the base node's is written into the new node's file as soon as it is hashed, from the
//! same buffer (nothing read twice): neighbouring changed blocks in one write, several writes in flight while
//! the hashing workers go on.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use chain::Piece;
use qmp::MirrorSyncMode;
use qmp::commands::{
    BlockDirtyBitmapAdd, BlockExportAdd, BlockExportDel, BlockdevAdd, BlockdevBackup, BlockdevDel, JobCancel,
    JobDismiss, NbdServerStart, NbdServerStop, TransactionAction,
};
use serde_json::json;
use tokio::sync::Semaphore;

use super::{Copied, Run, interrupted, jobs};
use crate::daemon::NBD_CONNECT_TIMEOUT;
use crate::graph;
use crate::recovery;
use crate::tables::load_node_table;
use crate::tables::{NbdSource, threads};

/// How often the progress display is updated while a disk is read.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(250);

/// How long a fleecing job may take to stop after `job-cancel`.
const FLEECE_STOP_TIMEOUT: Duration = Duration::from_secs(60);

pub(super) async fn copy(run: &mut Run<'_>) -> Result<Copied> {
    jobs::create_target_files(run)?;
    let sockdir = crate::daemon::private_temp_dir("qmpbak-nbd-")?;
    let socket = sockdir.path().join("nbd.sock");
    create_fleece_files(run)?;
    let result = fleece_and_copy(run, &socket).await;
    teardown(run).await;
    for t in &run.targets {
        let _ = std::fs::remove_file(run.vm.resolve(&fleece_file(run, t.index)?)?);
    }
    result
}

fn fleece_file(run: &Run<'_>, disk: usize) -> Result<chain::RelPath> {
    Ok(format!("{}/fleece-{disk}.qcow2", run.node).parse()?)
}

fn create_fleece_files(run: &mut Run<'_>) -> Result<()> {
    for i in 0..run.targets.len() {
        let rel = fleece_file(run, i)?;
        run.op.files.push(rel.clone());
    }
    run.op.payload = chain::Payload::Backup {
        nbd_server_started: true,
    };
    if let Some(op) = run.manifest.operations.iter_mut().find(|o| o.id == run.op.id) {
        *op = run.op.clone();
    }
    run.save()?;
    for t in &run.targets {
        // In the repository's directory, holding old data of the disk: encrypted like the node files.
        crate::crypt::unlock::create_node_file(
            &run.bins,
            &run.vm.resolve(&fleece_file(run, t.index)?)?,
            t.info.virtual_size,
            None,
        )?;
    }
    Ok(())
}

async fn fleece_and_copy(run: &mut Run<'_>, socket: &std::path::Path) -> Result<Copied> {
    let qmp = run.qmp;
    crate::crypt::unlock::add_secret(qmp).await?;
    // The fleecing overlays, on top of the live disks.
    for t in &run.targets {
        let path = run.vm.resolve(&fleece_file(run, t.index)?)?;
        let mut options = graph::qcow2_options(&run.qemu_name("f", t.index), &path, None, false);
        options["backing"] = json!(t.info.node_name);
        // A scratch file, deleted after the run: its durability does not matter.
        options["cache"] = json!({ "no-flush": true });
        crate::crypt::unlock::encrypt_node(&mut options);
        qmp.execute(&BlockdevAdd(options))
            .await
            .context("adding the fleecing overlay")?;
    }
    // The new node files, on top of the parent's chain.
    jobs::add_targets(run).await?;

    // One instant for every disk: fleecing jobs and the new bitmaps.
    let mut actions = Vec::new();
    for t in &run.targets {
        for name in run.new_bitmaps(t) {
            actions.push(TransactionAction::BlockDirtyBitmapAdd(BlockDirtyBitmapAdd {
                persistent: Some(t.info.bitmaps_persist),
                ..BlockDirtyBitmapAdd::new(t.info.node_name.as_str(), name)
            }));
        }
        actions.push(TransactionAction::BlockdevBackup(BlockdevBackup::new(
            run.qemu_name("j", t.index),
            t.info.node_name.as_str(),
            run.qemu_name("f", t.index),
            MirrorSyncMode::None,
        )));
    }
    run.transaction(actions, "starting image fleecing (QMP transaction)")
        .await?;

    qmp.execute(&NbdServerStart::unix(socket.display().to_string()))
    .await
    .map_err(|e| anyhow!(e))
    .context(
        "starting an NBD server in the VM's QEMU to read the disks (is another NBD server running in it?)",
    )?;

    let mut bytes = Vec::new();
    let mut tables = Vec::new();
    for t in &run.targets {
        if run.interrupt.arrived().await {
            return Err(interrupted());
        }
        let parent = run
            .plan
            .parent
            .as_ref()
            .context("a checksum-diff needs a base node")?;
        let base = load_node_table(run.vm, &run.manifest, &parent.parse()?, &t.info.id)?;
        let fleece = export(
            run,
            &format!("{}-f{}", run.op.id, t.index),
            &run.qemu_name("f", t.index),
            false,
            socket,
        )
        .await?;
        let target = export(
            run,
            &format!("{}-t{}", run.op.id, t.index),
            &run.qemu_name("t", t.index),
            true,
            socket,
        )
        .await?;
        run.progress.phase(&format!(
            "reading disk {}, comparing checksums and copying what changed",
            t.info.id
        ));
        let size = fleece.size();
        let handle = tokio::runtime::Handle::current();
        let source = NbdSource::new(nbd::BlockingClient::new(fleece.clone(), handle.clone()), size);
        let visitor = Arc::new(CopyChanged::new(base, target.clone(), handle));
        let block_size = run.block_size;
        if visitor.base.block_size() != block_size {
            bail!(
                "the base node's checking table of disk {} has {}-byte blocks, the repository {}-byte blocks",
                t.info.id,
                visitor.base.block_size(),
                block_size
            );
        }
        let worker = Arc::clone(&visitor);
        let mut build = tokio::task::spawn_blocking(move || {
            chain::Table::build_visiting(&source, block_size, threads(), worker.as_ref())
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
                    run.progress.advance(&t.info.id, visitor.hashed.load(Ordering::Relaxed), size);
                }
            }
        };
        // Every write is answered before the table counts: a failed one is the error, even when the build
        // stopped for another reason meanwhile.
        let finished = visitor.finish().await;
        let table = outcome?;
        finished?;
        // Keyed like the base's table in an encrypted repository.
        let table = match &visitor.key {
            Some(key) => key.seal_table(&table)?,
            None => table,
        };
        target.flush().await?;
        run.progress.finish_disk(&t.info.id);
        let copied = visitor.copied.load(Ordering::Relaxed);
        let _ = fleece.disconnect().await;
        let _ = target.disconnect().await;
        bytes.push(copied);
        tables.push(table);
    }
    Ok(Copied {
        bytes,
        tables: Some(tables),
    })
}

async fn export(
    run: &Run<'_>,
    id: &str,
    node: &str,
    writable: bool,
    socket: &std::path::Path,
) -> Result<nbd::Client> {
    run.qmp
        .execute(&BlockExportAdd::nbd(id, node, writable))
        .await
        .with_context(|| format!("exporting block node {node} over NBD"))?;
    nbd::Client::connect_unix(socket, id, NBD_CONNECT_TIMEOUT)
        .await
        .with_context(|| format!("connecting to NBD export {id}"))
}

/// Copies each block whose check value differs from the base node's into the new node's file, from the bytes
/// the table build just read and hashed. It runs on the build's worker threads, which see runs of consecutive
/// blocks: neighbouring changed blocks of one kind become one write (data, or zeroes), and writes go on in the
/// background, up to [`WRITE_BYTES_IN_FLIGHT`] of them, while the workers read and hash on.
struct CopyChanged {
    base: chain::Table,
    /// The table key of an encrypted repository: the base's digests are keyed.
    key: Option<chain::TableKey>,
    target: nbd::Client,
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
    fn new(base: chain::Table, target: nbd::Client, handle: tokio::runtime::Handle) -> CopyChanged {
        CopyChanged {
            base,
            key: crate::crypt::unlock::table_key(),
            target,
            handle,
            in_flight: Arc::new(Semaphore::new(WRITE_PERMITS as usize)),
            write_error: Arc::new(Mutex::new(None)),
            hashed: AtomicU64::new(0),
            copied: AtomicU64::new(0),
            cancelled: AtomicBool::new(false),
        }
    }

    /// `None` when the block is the base's; else whether it reads as zeros.
    fn change(&self, block: &chain::Visited<'_>) -> Option<bool> {
        let keyed = self.key.as_ref().map(|k| k.seal(block.index, &block.digest));
        if self.base.digest(block.index) == Some(keyed.as_ref().unwrap_or(&block.digest)) {
            return None;
        }
        Some(block.pieces.iter().all(|p| match p {
            Piece::Data(d) => d.iter().all(|&b| b == 0),
            Piece::Zero(_) => true,
        }))
    }

    /// The first failed write, as an I/O error.
    fn failed_write(&self) -> Option<io::Error> {
        let failed = self.write_error.lock().unwrap_or_else(PoisonError::into_inner);
        failed
            .as_ref()
            .map(|(offset, e)| io::Error::other(format!("writing the new node at byte {offset}: {e}")))
    }

    /// Starts the write of `blocks` (consecutive, changed, all zero or not) as one request, after waiting for
    /// room among the writes in flight.
    fn write(&self, blocks: &[chain::Visited<'_>], zero: bool) -> io::Result<()> {
        let Some(first) = blocks.first() else {
            return Ok(());
        };
        let offset = first.offset;
        let len: u64 = blocks.iter().map(|b| b.len).sum();
        let data = (!zero).then(|| {
            let mut bytes = Vec::with_capacity(len as usize);
            for p in blocks.iter().flat_map(|b| &b.pieces) {
                match p {
                    Piece::Data(d) => bytes.extend_from_slice(d),
                    Piece::Zero(n) => bytes.resize(bytes.len() + *n as usize, 0),
                }
            }
            bytes
        });
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

/// Stops exports, the NBD server, and the fleecing jobs; removes the block nodes.
async fn teardown(run: &Run<'_>) {
    let qmp = run.qmp;
    for t in &run.targets {
        for kind in ["f", "t"] {
            let id = format!("{}-{kind}{}", run.op.id, t.index);
            let _ = qmp.execute(&BlockExportDel::hard(id)).await;
        }
    }
    let _ = qmp.execute(&NbdServerStop).await;
    for t in &run.targets {
        let job = run.qemu_name("j", t.index);
        let _ = qmp.execute(&JobCancel::new(job.as_str())).await;
        let _ = qmp.wait_job(&job, FLEECE_STOP_TIMEOUT).await;
        let _ = qmp.execute(&JobDismiss::new(job.as_str())).await;
        recovery::stop_job(qmp, &job).await;
    }
    for name in &run.op.block_nodes {
        let _ = qmp.execute(&BlockdevDel::new(name.as_str())).await;
    }
    crate::crypt::unlock::remove_secret(qmp).await;
}
