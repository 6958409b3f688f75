//! `commit`: keeps a VM's live backing chain short by merging a time point's frozen increment into its
//! parent's file inside the running VM (`block-commit`: intermediate, or active when the increment is the top
//! of the disk's graph). The later time point survives, now stored in the parent's file; the parent's own time
//! point is gone, so a parent that other branches still build on is refused.
//!
//! The operation record names the commit jobs, and its payload the time points and files
//! ([`chain::CommitRecord`]). If qmpbak dies or a disk's commit fails midway, the next command looks at QEMU
//! ([`crate::recovery::commit::finish`]): if no increment has left its disk's graph nothing changed; if some have,
//! the commit cannot be undone, so the other disks are committed too and the manifest is brought up to date.
//! Until that succeeds the record stays, and the error says which disks are committed.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use chain::{LockWait, Manifest, NodeId, NodeKind, Operation, Payload};

use crate::exit::Exit;
use crate::graph::short_name;
use crate::inspect;
use crate::progress::Progress;
use crate::recovery::commit as finish;

#[derive(Debug, Clone)]
pub struct CommitOptions {
    pub qmp: crate::qmp_target::QmpTarget,
    pub repo: PathBuf,
    pub vm: String,
    pub node: String,
    pub lock_wait: LockWait,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CommitReport {
    pub vm: String,
    /// The time point whose increment was merged, still in the tree.
    pub node: String,
    /// The parent that absorbed it and left the tree.
    pub removed: String,
    pub removed_tag: Option<String>,
    pub duration_secs: f64,
}

pub async fn commit(opts: &CommitOptions, progress: &dyn Progress) -> Result<CommitReport> {
    let started = Instant::now();
    let crate::session::Session {
        repo,
        vm,
        guard,
        mut manifest,
        qmp,
        ..
    } = crate::session::open(
        &opts.repo,
        &opts.vm,
        &opts.qmp,
        Some(crate::qmp_target::Local::FilesBesideDisks),
        opts.lock_wait,
        "commit",
        false,
    )
    .await?;
    let node = crate::nodes::find_node(&manifest, &opts.node)?.clone();
    let Some(parent_id) = node.parent.clone() else {
        bail!(Exit::usage(format!(
            "node {} has no parent to commit into",
            node.id
        )));
    };
    let parent = manifest.node(&parent_id).context("parent missing")?.clone();
    if node.kind != NodeKind::Snapshot || parent.kind != NodeKind::Snapshot {
        bail!(Exit::usage(format!(
            "commit merges a time point into its parent time point; {} ({}) and {} ({}) are not both snapshots: \
             use `qmpbak prune` or `qmpbak merge` for backups",
            node.id, node.kind, parent.id, parent.kind
        )));
    }
    let siblings = manifest.children(&parent_id)?.len();
    if siblings > 1 {
        bail!(Exit::usage(format!(
            "time point {} has {siblings} branches: committing {} into it would change what the others build on",
            parent.id, node.id
        )));
    }
    let info = inspect::inspect(&qmp).await?;
    let chain_id = manifest.chain_id.clone();
    let record = finish::record_from_manifest(&manifest, &node.id)?;
    restack_copies(&repo, &vm, &manifest, &node, &parent).await?;
    let files = record.disks.clone();
    let mut op = Operation::new(Payload::Commit(record.clone()), None, chrono::Utc::now());
    op.id = format!("commit-{}", node.id);
    for i in 0..files.len() {
        op.jobs.push(short_name(&chain_id, "m", node.id.as_str(), i));
    }
    manifest.add_operation(op.clone());
    vm.save(&manifest, &guard)?;

    let mut committed = 0;
    for i in 0..files.len() {
        crate::crashpoint::pause_point("commit-disk").await;
        let done = finish::commit_disk(&qmp, &info, &chain_id, &record, i).await;
        match done {
            Ok(()) => committed += 1,
            Err(e) if committed == 0 => {
                // Nothing changed yet: the record goes, and the error is the whole story.
                manifest.remove_operation(&op.id);
                vm.save(&manifest, &guard)?;
                return Err(e);
            }
            // A commit cannot be undone: the record stays, and the next command on the VM finishes it.
            Err(e) => return Err(e.context(finish::half_done(&record, committed))),
        }
        crate::crashpoint::crashpoint("commit-disk-done");
    }
    finish::apply(&mut manifest, &record)?;
    // An active commit leaves a disk on its parent's file, with the same content: still the same disk.
    // Not read: the disks stay unproven, and the next backup takes the safe way.
    if let Ok(now) = inspect::inspect(&qmp).await {
        crate::identity::follow(&mut manifest, &info.disks, &now.disks);
    }
    manifest.remove_operation(&op.id);
    vm.save(&manifest, &guard)?;
    // The increment files left every chain: remove them.
    for d in &files {
        if let Some(kept) = finish::remove_increment(&d.increment, &chain_id, record.parent.as_str()) {
            progress.warning(&kept);
        }
    }
    // So did the parent's copies in the repository (the node's own copies absorbed them first).
    if let Some(kept) = remove_node_dir(&vm, &parent_id) {
        progress.warning(&kept);
    }
    Ok(CommitReport {
        vm: opts.vm.clone(),
        node: node.id.to_string(),
        removed: parent_id.to_string(),
        removed_tag: parent.tag.clone(),
        duration_secs: started.elapsed().as_secs_f64(),
    })
}

/// Makes the node's copies in the repository (`snapshot --copy`) that hold only their increment over the
/// parent's copy hold the parent's layer too, before the parent leaves the tree: each is rebased (safe mode, as
/// `prune` does) onto what the parent's copy is based on, or onto nothing. A copy reads the same over either
/// base, so this changes no content and is safe to stop at any point; it runs before anything else changes.
/// In an encrypted repository this needs the key (exit 3 without it).
async fn restack_copies(
    repo: &chain::Repository,
    vm: &chain::VmStore,
    manifest: &Manifest,
    node: &chain::Node,
    parent: &chain::Node,
) -> Result<()> {
    let mut stacked = Vec::new();
    for d in node.disks.iter().filter(|d| d.table.is_some()) {
        let Some(p) = parent.disks.iter().find(|p| p.disk == d.disk) else {
            continue;
        };
        if d.backing.as_ref() == Some(&p.file) && p.table.is_some() {
            stacked.push((d.disk.clone(), p.backing.clone()));
        }
    }
    if stacked.is_empty() {
        return Ok(());
    }
    crate::crypt::require(repo)?;
    let bins = crate::qemu_bins::QemuBins::from_env();
    for (disk, backing) in stacked {
        let files = crate::direct::chain_files(vm, manifest, &node.id, &disk)?;
        crate::prune::rebase(&bins, &files, backing.as_ref()).await?;
    }
    Ok(())
}

/// Removes the regular files in the directory of `node`, which has left the tree (a time point's copies), and
/// the directory; a symlink is left alone. A failure only leaves unused files behind, so it is a warning,
/// which this returns.
fn remove_node_dir(vm: &chain::VmStore, node: &NodeId) -> Option<String> {
    let dir = vm.node_dir(node);
    if !std::fs::symlink_metadata(&dir).is_ok_and(|m| m.is_dir()) {
        return None;
    }
    let removed = std::fs::read_dir(&dir).and_then(|entries| {
        for entry in entries {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                std::fs::remove_file(entry.path())?;
            }
        }
        std::fs::remove_dir(&dir)
    });
    removed.err().map(|e| {
        format!(
            "could not remove {} of time point {node}, which left the tree: {e}",
            dir.display()
        )
    })
}
