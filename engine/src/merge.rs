//! `merge NODE`: fold a node's recovery chain into a synthetic full. For each disk, the chain is opened in a
//! qemu-storage-daemon from the manifest (as restore does) and copied by a `blockdev-backup` job into a
//! temporary qcow2 in the node's directory; the copy is read back on its own and compared with the node's
//! checking table, synced, and renamed over the node's file. The node then has no parent and is a full; its
//! descendants read the same data at the same path, and its old ancestors stay as they are. A node whose
//! checking table is a difference against its parent's gets it written whole (the same content id, so its
//! children's differences still fit), under a new name the manifest switches to.
//!
//! The copy is written with the parent's chain as its backing in QEMU, so every cluster the guest reads as zero
//! is recorded as a zero cluster rather than left unallocated: the new file reads the same with or without a
//! backing file. A merge killed after renaming some disks' files but before the manifest says so therefore
//! still restores exactly; its record holds only the temporary files, which the next prune, merge or cleanup
//! deletes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use qmp::commands::{BlockExportDel, BlockdevAdd, BlockdevBackup, BlockdevDel};
use serde::{Deserialize, Serialize};
use serde_json::json;

use chain::{LockWait, NodeId, NodeKind, Operation, Payload, RelPath, Repository, Table};

use crate::crashpoint::crashpoint;
use crate::daemon::StorageDaemon;
use crate::exit::{Exit, ExitCode};
use crate::graph;
use crate::progress::Progress;
use crate::prune::{self, Leftovers};
use crate::qemu_bins::QemuBins;
use crate::tables::DiskAt;
use crate::tables::{NbdSource, layer_extents, load_node_table, threads};

/// Bound on one disk's copy job.
pub const MERGE_JOB_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, Clone)]
pub struct MergeOptions {
    pub repo: PathBuf,
    pub vm: String,
    /// Node id or tag.
    pub node: String,
    pub lock_wait: LockWait,
}

/// The outcome of a merge, as printed by `--json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MergeReport {
    pub vm: String,
    pub node: String,
    /// The parent the node had; `None` if it already was a full (nothing was done).
    pub previous_parent: Option<String>,
    /// The ancestors whose data the node's files now hold, full first.
    pub folded: Vec<String>,
    pub disks: Vec<MergedDisk>,
    /// Bytes the node's files grew by.
    pub added_bytes: i64,
    /// Interrupted prunes and merges whose leftovers this run removed first.
    pub leftovers: Leftovers,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MergedDisk {
    pub disk: String,
    pub before_bytes: u64,
    pub after_bytes: u64,
}

/// Makes `opts.node` a synthetic full.
pub async fn merge(opts: &MergeOptions, progress: &dyn Progress) -> Result<MergeReport> {
    let repo = Repository::open(&opts.repo)?;
    crate::crypt::require(&repo)?;
    let vm = repo.vm(&opts.vm)?;
    let guard = vm.lock_exclusive(opts.lock_wait, "merge")?;
    let mut manifest = vm.load()?;
    let leftovers = prune::finish_leftovers(&vm, &mut manifest, &guard)?;
    prune::refuse_other_operations(&manifest)?;
    prune::refuse_symlinks(&vm, &manifest)?;
    let node = crate::nodes::find_node(&manifest, &opts.node)?.clone();
    let chain: Vec<NodeId> = manifest
        .recovery_chain(&node.id)?
        .iter()
        .map(|n| n.id.clone())
        .collect();
    if let Some(snapshot) = chain
        .iter()
        .filter_map(|id| manifest.node(id))
        .find(|n| n.kind == NodeKind::Snapshot)
    {
        bail!(Exit::usage(format!(
            "node {} is based on snapshot {}, whose files live in the VM's storage: merge works on backups only",
            node.id, snapshot.id
        )));
    }
    let mut report = MergeReport {
        vm: opts.vm.clone(),
        node: node.id.to_string(),
        previous_parent: node.parent.as_ref().map(ToString::to_string),
        folded: chain[..chain.len() - 1].iter().map(ToString::to_string).collect(),
        disks: Vec::new(),
        added_bytes: 0,
        leftovers,
    };
    if node.parent.is_none() {
        progress.phase(&format!("node {} is a full already: nothing to merge", node.id));
        return Ok(report);
    }

    let temps: Vec<RelPath> = node
        .disks
        .iter()
        .map(|d| format!("{}/{}.merging.qcow2", node.id, d.disk).parse())
        .collect::<chain::Result<_>>()?;
    // Its recovery chain is copied into the temporary files, which then replace the node's files; every step
    // restores exactly, and `qmpbak merge` run again finishes it.
    let payload = Payload::Merge {
        folded: chain[..chain.len() - 1].to_vec(),
    };
    let mut op = Operation::new(payload, Some(node.id.clone()), chrono::Utc::now());
    op.id = format!("merge-{}-{}", node.id, op.id);
    op.files.clone_from(&temps);
    // A full's tables are whole: the node's difference tables are written anew, whole (the same content, so
    // its children's differences still fit). Both names are in the record: the new files until the manifest
    // names them, the old ones once it no longer does.
    let rewrites = crate::tables::rewrites_for(&vm, &node, None)?;
    for r in &rewrites {
        op.files.push(r.new.clone());
        op.files.push(r.old.clone());
    }
    manifest.add_operation(op.clone());
    vm.save(&manifest, &guard)?;

    let bins = QemuBins::from_env();
    let temp_paths: Vec<PathBuf> = temps
        .iter()
        .map(|t| vm.resolve(t))
        .collect::<chain::Result<_>>()?;
    let flattened = async {
        let daemon = StorageDaemon::start(&bins).await?;
        crate::crashpoint::pause_point("merge-copying").await;
        let mut result = Ok(());
        for (i, (disk, temp)) in node.disks.iter().zip(&temp_paths).enumerate() {
            progress.phase(&format!("flattening disk {} of {}", disk.disk, node.id));
            let at = DiskAt {
                bins: &bins,
                vm: &vm,
                manifest: &manifest,
                node: &node.id,
                disk: &disk.disk,
            };
            result = flatten(&daemon, at, disk.virtual_size, i, temp)
                .await
                .with_context(|| format!("merging disk {} of node {}", disk.disk, node.id));
            if result.is_err() {
                break;
            }
        }
        daemon.stop().await?;
        result
    }
    .await;
    if let Err(err) = flattened {
        for temp in &temp_paths {
            let _ = std::fs::remove_file(temp);
        }
        manifest.remove_operation(&op.id);
        vm.save(&manifest, &guard)?;
        return Err(err);
    }
    crashpoint("merge-flattened");

    let mut sizes = Vec::new();
    for (disk, temp) in node.disks.iter().zip(&temp_paths) {
        let file = vm.resolve(&disk.file)?;
        let before = crate::nodes::allocated_bytes(&file)?;
        std::fs::rename(temp, &file)
            .with_context(|| format!("renaming {} to {}", temp.display(), file.display()))?;
        crashpoint("merge-renamed");
        let after = crate::nodes::allocated_bytes(&file)?;
        sizes.push(after);
        report.disks.push(MergedDisk {
            disk: disk.disk.clone(),
            before_bytes: before,
            after_bytes: after,
        });
        report.added_bytes += i64::try_from(after).unwrap_or(i64::MAX) - i64::try_from(before).unwrap_or(0);
    }
    let mut written = Vec::new();
    for r in rewrites {
        let sha = crate::tables::write_rewrite(&vm, &manifest, &r, None)?;
        written.push((r, sha));
    }
    chain::store::sync_dir(&vm.node_dir(&node.id))?;
    crashpoint("merge-tables-rewritten");

    let was = node.kind;
    let updated = manifest
        .node_mut(&node.id)
        .with_context(|| format!("node {} vanished from the manifest", node.id))?;
    updated.kind = NodeKind::Full;
    updated.reason = Some(format!(
        "a synthetic full: `qmpbak merge` folded {} into it (it was {was})",
        report.folded.join(", ")
    ));
    for (disk, size) in updated.disks.iter_mut().zip(sizes) {
        disk.backing = None;
        disk.allocated_bytes = size;
        disk.location.predecessor = None;
    }
    manifest.reparent(&node.id, None)?;
    crate::tables::switch_rewrites(&mut manifest, &written)?;
    if written.is_empty() {
        manifest.remove_operation(&op.id);
        vm.save(&manifest, &guard)?;
        return Ok(report);
    }
    // The old tables leave with the record: deleted once no node names them, as the next prune, merge or
    // cleanup would.
    vm.save(&manifest, &guard)?;
    crashpoint("merge-tables-switched");
    for (r, _) in &written {
        let old = vm.resolve(&r.old)?;
        std::fs::remove_file(&old).with_context(|| format!("removing {}", old.display()))?;
    }
    manifest.remove_operation(&op.id);
    vm.save(&manifest, &guard)?;
    Ok(report)
}

/// Copies disk `disk` of `node` as its recovery chain reads into `temp`, a new qcow2, and proves the copy
/// reads the same on its own: every cluster allocated (data or zero) and its checking table equal to the
/// node's. Syncs it.
async fn flatten(daemon: &StorageDaemon, at: DiskAt<'_>, size: u64, index: usize, temp: &Path) -> Result<()> {
    let DiskAt {
        bins,
        vm,
        manifest,
        node,
        disk,
    } = at;
    let expected = load_node_table(vm, manifest, node, disk)?;
    // Encrypted like every node file in an encrypted repository.
    crate::crypt::unlock::create_node_file(bins, temp, size, None).await?;
    let qmp = daemon.qmp();
    let chain = graph::add_chain(qmp, vm, manifest, node, disk, &format!("m{index}-")).await?;
    let target = format!("mt{index}");
    let job = format!("merge{index}");
    let copied = async {
        let top = chain.top().context("empty recovery chain")?;
        // The parent's chain as the copy's backing in QEMU: zeroes are then written as zero clusters.
        let below = chain
            .layers
            .len()
            .checked_sub(2)
            .and_then(|i| chain.layers.get(i))
            .context("the node has no parent")?;
        let mut options = json!({
            "driver": "qcow2", "node-name": target,
            "file": { "driver": "file", "filename": temp },
            "backing": below,
        });
        crate::crypt::unlock::encrypt_node(&mut options);
        qmp.execute(&BlockdevAdd(options))
            .await
            .with_context(|| format!("opening {} in qemu-storage-daemon", temp.display()))?;
        qmp.execute(&BlockdevBackup::new(
            job.as_str(),
            top,
            target.as_str(),
            qmp::MirrorSyncMode::Full,
        ))
        .await
        .context("starting the merge copy job")?;
        let outcome = qmp.wait_job(&job, MERGE_JOB_TIMEOUT).await?;
        let _ = qmp.dismiss_job(&job).await;
        if let Some(error) = outcome.error {
            bail!("the merge copy job failed: {error}");
        }
        Ok(())
    }
    .await;
    let _ = qmp.execute(&BlockdevDel::new(target.as_str())).await;
    graph::remove_chain(qmp, &chain).await;
    copied?;

    let mut covered = 0;
    let mut gaps = Vec::new();
    for (start, len) in layer_extents(bins, temp).await? {
        if start > covered {
            gaps.push((covered, start - covered));
        }
        covered = covered.max(start + len);
    }
    if covered < size {
        gaps.push((covered, size - covered));
    }
    if !gaps.is_empty() {
        bail!(
            "the merged copy {} leaves {} range(s) unallocated (first at offset {}): it would not read the same \
             under its old parent",
            temp.display(),
            gaps.len(),
            gaps[0].0
        );
    }

    // Read the copy back on its own and compare with the node's table.
    let check = format!("mc{index}");
    let export = format!("mc{index}-x");
    let checked = async {
        let mut options = json!({
            "driver": "qcow2", "node-name": check, "read-only": true,
            "file": { "driver": "file", "filename": temp, "read-only": true },
            "backing": null,
        });
        crate::crypt::unlock::encrypt_node(&mut options);
        qmp.execute(&BlockdevAdd(options))
            .await
            .with_context(|| format!("opening {} to check it", temp.display()))?;
        daemon.export(&check, &export, false).await?;
        let client = daemon.connect(&export).await?;
        let size = client.size();
        let source = NbdSource::new(
            nbd::BlockingClient::new(client, tokio::runtime::Handle::current()),
            size,
        );
        let (scheme, block_size) = (expected.scheme(), expected.block_size());
        let key = crate::crypt::unlock::table_key();
        let actual = tokio::task::spawn_blocking(move || -> Result<Table> {
            let table = Table::build(&source, scheme, block_size, threads())?;
            Ok(chain::crypt::sealed(key.as_ref(), table)?)
        })
        .await
        .context("table builder panicked")??;
        Ok::<_, anyhow::Error>(Table::diff(&expected, &actual)?)
    }
    .await;
    let _ = qmp.execute(&BlockExportDel::hard(export.as_str())).await;
    let _ = qmp.execute(&BlockdevDel::new(check.as_str())).await;
    let mismatched = checked?;
    if !mismatched.is_empty() {
        bail!(Exit::new(
            ExitCode::Damaged,
            format!(
                "the merged copy of disk {disk} of node {node} differs from the node's checking table in {} \
                 block(s) (first: block {}); the node's chain is damaged: run `qmpbak verify`. Nothing was changed",
                mismatched.len(),
                mismatched[0]
            )
        ));
    }
    std::fs::File::open(temp)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("syncing {}", temp.display()))?;
    Ok(())
}
