//! Finishing a commit (`qmpbak commit`): the steps the command and recovery share. A commit cannot be undone
//! once one disk's increment left its chain, so an interrupted one is finished from its record
//! ([`CommitRecord`]), and only while the manifest's time points still say what the record says.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use qmp::commands::{BlockCommit, BlockdevDel, JobComplete, QueryBlock, QueryNamedBlockNodes};

use chain::{CommitDisk, CommitRecord, Manifest, NodeId, NodeKind, Operation};

use crate::graph::short_name;
use crate::inspect;

/// Bound on one commit job.
pub const COMMIT_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// Commits disk `i` of `record` in the VM: the increment's file into the parent's, through a `block-commit` job
/// (completed at once when it is an active commit), then drops the increment's block node.
pub async fn commit_disk(
    qmp: &qmp::Qmp,
    info: &inspect::VmInfo,
    chain_id: &str,
    record: &CommitRecord,
    i: usize,
) -> Result<()> {
    let CommitDisk {
        disk,
        increment: top,
        into: base,
    } = &record.disks[i];
    let Some(d) = info.disks.iter().find(|d| &d.id == disk) else {
        bail!("the VM has no disk {disk}");
    };
    let names = block_nodes_by_file(qmp).await?;
    let (Some(top_node), Some(base_node)) = (names.get(top), names.get(base)) else {
        bail!(
            "the files of time points {} and {} are not both in disk {disk}'s live chain",
            record.node,
            record.parent
        );
    };
    let job = short_name(chain_id, "m", record.node.as_str(), i);
    qmp.execute(&BlockCommit {
        top_node: Some(top_node.clone()),
        base_node: Some(base_node.clone()),
        ..BlockCommit::new(job.as_str(), d.root_node.as_str())
    })
    .await
    .with_context(|| format!("starting the commit of disk {disk}"))?;
    let status = qmp
        .wait_job_status(&job, &[qmp::JobStatus::Ready], COMMIT_TIMEOUT)
        .await?;
    if status == qmp::JobStatus::Ready {
        // Active commit: the increment was the top of the graph; pivot onto the base.
        qmp.execute(&JobComplete::new(job.as_str())).await?;
    }
    let outcome = qmp.wait_job(&job, COMMIT_TIMEOUT).await?;
    qmp.dismiss_job(&job).await?;
    if let Some(error) = outcome.error {
        bail!("committing disk {disk} failed: {error}");
    }
    // The increment left the chain; its node may still exist by name (qmpbak added it): drop it.
    let _ = qmp.execute(&BlockdevDel::new(top_node.as_str())).await;
    Ok(())
}

/// What a commit that stopped after `committed` of its disks means for the user.
pub fn half_done(record: &CommitRecord, committed: usize) -> String {
    let disks = |range: std::ops::Range<usize>| {
        record.disks[range]
            .iter()
            .map(|d| d.disk.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "the commit of time point {} into {} is half done: committed {}, not yet {}. A commit \
         cannot be undone, so time point {} no longer holds its own data for the committed disks; the next \
         qmpbak command on this VM (or `qmpbak cleanup`) finishes the commit once the cause is fixed",
        record.node,
        record.parent,
        disks(0..committed),
        disks(committed..record.disks.len()),
        record.parent
    )
}

/// The manifest after a commit: the node now lives in its parent's files, the parent leaves the tree.
pub fn apply(manifest: &mut Manifest, record: &CommitRecord) -> Result<()> {
    let node = record.node.clone();
    let parent = record.parent.clone();
    let grand = manifest.node(&parent).and_then(|p| p.parent.clone());
    let parent_disks = manifest
        .node(&parent)
        .map(|p| p.disks.clone())
        .unwrap_or_default();
    if let Some(n) = manifest.node_mut(&node) {
        for d in &mut n.disks {
            if let Some(p) = parent_disks.iter().find(|p| p.disk == d.disk) {
                d.location = p.location.clone();
                // A self-contained copy in the repository stays one; a copy stacked on the parent's copy was
                // rebased onto the parent's base first (the `commit` command's `restack_copies`).
                if d.table.is_none() || d.backing.is_some() {
                    d.backing = p.backing.clone();
                }
            }
        }
    }
    manifest.remove_node_reparent(&parent)?;
    if manifest.node(&node).and_then(|n| n.parent.clone()) != grand {
        manifest.reparent(&node, grand)?;
    }
    Ok(())
}

/// Block node names of the QEMU graph by the file they open (qcow2 nodes).
async fn block_nodes_by_file(qmp: &qmp::Qmp) -> Result<std::collections::HashMap<String, String>> {
    let nodes = qmp.execute(&QueryNamedBlockNodes { flat: Some(true) }).await?;
    Ok(nodes
        .into_iter()
        .filter(|n| n.drv == "qcow2" && !n.file.is_empty())
        .filter_map(|n| Some((n.file, n.node_name?)))
        .collect())
}

/// Every image file in the backing chains of the VM's disks (`query-block`, following `backing-image`).
async fn live_chain_files(qmp: &qmp::Qmp) -> Result<Vec<String>> {
    let blocks = qmp.execute(&QueryBlock).await?;
    let mut files = Vec::new();
    for block in blocks {
        let mut image = block.inserted.map(|i| i.image);
        while let Some(i) = image {
            if !i.filename.is_empty() {
                files.push(i.filename);
            }
            image = i.backing_image.map(|b| *b);
        }
    }
    Ok(files)
}

/// Finishes an interrupted commit (called by cleanup with the VM's QMP connection), after letting a running
/// job finish. If no increment left its disk's graph, nothing changed and there is nothing to do (false). If
/// some did, the commit cannot be undone: the disks left are committed now, then the manifest is updated
/// (true). An error leaves the record for the next try. An increment file left in place (not provably ours) is
/// added to `kept`, with the reason.
pub async fn finish(
    qmp: &qmp::Qmp,
    manifest: &mut Manifest,
    op: &Operation,
    note: &CommitRecord,
    kept: &mut Vec<String>,
) -> Result<bool> {
    // The record names the nodes; their files come from the manifest, as when the commit began. A record whose
    // list differs was not written by qmpbak: nothing is done.
    let from_manifest = record_from_manifest(manifest, &note.node)?;
    if from_manifest != *note {
        bail!(
            "the commit record {} does not match the manifest's time points {} and {}: it was not written by \
             this qmpbak for this repository; nothing was done (remove the record only if you know why)",
            op.id,
            note.node,
            note.parent
        );
    }
    let note = from_manifest;
    for job in &op.jobs {
        if let Some(info) = qmp.job_info(job).await? {
            if info.status != qmp::JobStatus::Concluded {
                // Let a running commit finish: cancelling it midway would leave the parent half-written.
                let status = qmp
                    .wait_job_status(job, &[qmp::JobStatus::Ready], COMMIT_TIMEOUT)
                    .await?;
                if status == qmp::JobStatus::Ready {
                    qmp.execute(&JobComplete::new(job.as_str())).await?;
                }
            }
            let _ = qmp.wait_job(job, COMMIT_TIMEOUT).await;
            let _ = qmp.dismiss_job(job).await;
        }
    }
    let live = live_chain_files(qmp).await?;
    let committed = note.disks.iter().filter(|d| !live.contains(&d.increment)).count();
    if committed == 0 {
        // Nothing changed: the surviving time point is as it was.
        return Ok(false);
    }
    if committed < note.disks.len() {
        // Half done: a commit cannot be undone, so commit the disks that are left.
        let info = inspect::inspect(qmp).await?;
        for (i, d) in note.disks.iter().enumerate() {
            if live.contains(&d.increment) {
                commit_disk(qmp, &info, &manifest.chain_id, &note, i)
                    .await
                    .with_context(|| format!("finishing: {}", half_done(&note, committed)))?;
            }
        }
    }
    apply(manifest, &note)?;
    let names = block_nodes_by_file(qmp).await?;
    for d in &note.disks {
        if let Some(node) = names.get(&d.increment) {
            let _ = qmp.execute(&BlockdevDel::new(node.as_str())).await;
        }
        kept.extend(remove_increment(
            &d.increment,
            &manifest.chain_id,
            note.parent.as_str(),
        ));
    }
    Ok(true)
}

/// What a commit of time point `node` into its parent does, from the manifest: the per-disk increment files
/// (they leave the chain) and the parent's files (they absorb them).
pub fn record_from_manifest(manifest: &Manifest, node: &NodeId) -> Result<CommitRecord> {
    let n = manifest
        .node(node)
        .with_context(|| format!("time point {node} is not in the manifest"))?;
    let parent_id = n
        .parent
        .clone()
        .with_context(|| format!("time point {node} has no parent"))?;
    let parent = manifest
        .node(&parent_id)
        .with_context(|| format!("time point {parent_id} is not in the manifest"))?;
    if n.kind != NodeKind::Snapshot || parent.kind != NodeKind::Snapshot {
        bail!("{node} and {parent_id} are not both time points");
    }
    let mut disks = Vec::new();
    for d in &n.disks {
        let p = parent
            .disks
            .iter()
            .find(|p| p.disk == d.disk)
            .with_context(|| format!("time point {parent_id} has no disk {}", d.disk))?;
        disks.push(CommitDisk {
            disk: d.disk.clone(),
            increment: d.location.path.clone(),
            into: p.location.path.clone(),
        });
    }
    Ok(CommitRecord {
        node: node.clone(),
        parent: parent_id,
        disks,
    })
}

/// Removes a committed increment file, which has just left its disk's chain. It is always the overlay that the
/// parent time point's snapshot created (`<stem>.qmpbak-<chain>-<parent>….qcow2`); a path that is not named so,
/// or not a regular file, is left alone whatever the manifest says, and the returned line says so.
pub fn remove_increment(top: &str, chain_id: &str, parent: &str) -> Option<String> {
    let path = std::path::Path::new(top);
    let ours = path.is_absolute()
        && crate::graph::overlay_base(path, chain_id).as_deref() == Some(parent)
        && std::fs::symlink_metadata(path).is_ok_and(|m| m.is_file());
    if ours {
        let _ = std::fs::remove_file(path);
        None
    } else {
        Some(format!(
            "left {top} in place: it is not one of qmpbak's overlays for time point {parent}"
        ))
    }
}
