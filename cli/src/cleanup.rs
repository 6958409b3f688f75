//! Undoing what an interrupted operation left behind. Before qmpbak touches QEMU it writes an operation record
//! into the manifest naming every job, block node, bitmap and file it will create; on success the record goes
//! away in the same atomic manifest write that completes the node. When a run dies (SIGKILL, power loss), the
//! next run finds the record and removes what is left, in QEMU and on disk, and marks the node failed.
//! Removal is idempotent: things already gone are skipped.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use serde_json::json;

use chain::{LockGuard, Manifest, NodeState, Operation, OperationKind, VmStore};

/// Prefix of an operation note that lists files created outside the repository, one per line.
pub const OUTSIDE_FILES: &str = "files outside the repository:\n";

/// How long a leftover job may take to stop after `job-cancel`.
pub const CANCEL_TIMEOUT: Duration = Duration::from_secs(60);

/// What a cleanup removed, for the output.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Cleaned {
    pub operations: Vec<String>,
    pub jobs: Vec<String>,
    pub block_nodes: Vec<String>,
    pub bitmaps: Vec<String>,
    pub files: Vec<String>,
    pub failed_nodes: Vec<String>,
}

impl Cleaned {
    pub fn is_empty(&self) -> bool {
        self.operations.is_empty()
    }
}

/// Cancels (if still running) and dismisses a job; `false` if QEMU does not know it.
pub async fn stop_job(qmp: &qmp::Qmp, id: &str) -> bool {
    let Ok(jobs) = qmp.execute_raw("query-jobs", None).await else {
        return false;
    };
    let Some(job) = jobs.as_array().into_iter().flatten().find(|j| j["id"] == id) else {
        return false;
    };
    if job["status"] != "concluded" {
        let _ = qmp.execute_raw("job-cancel", Some(json!({ "id": id }))).await;
        let _ = qmp.wait_job(id, CANCEL_TIMEOUT).await;
    }
    let _ = qmp.execute_raw("job-dismiss", Some(json!({ "id": id }))).await;
    true
}

/// Removes in QEMU what an operation record names: jobs, then block nodes (in the recorded order, newest
/// first), then bitmaps. Safe to call on things that no longer exist.
pub async fn undo_in_qemu(qmp: &qmp::Qmp, op: &Operation, cleaned: &mut Cleaned) {
    // NBD exports an operation made are named after its id; the NBD server is stopped only if it started it.
    if let Ok(exports) = qmp.execute_raw("query-block-exports", None).await {
        for export in exports.as_array().into_iter().flatten() {
            if let Some(id) = export["id"].as_str().filter(|id| id.starts_with(op.id.as_str())) {
                let _ = qmp
                    .execute_raw("block-export-del", Some(json!({ "id": id, "mode": "hard" })))
                    .await;
            }
        }
    }
    if op.note.as_deref() == Some(crate::backup::NBD_SERVER_NOTE) {
        let _ = qmp.execute_raw("nbd-server-stop", None).await;
    }
    for job in &op.jobs {
        if stop_job(qmp, job).await {
            cleaned.jobs.push(job.clone());
        }
    }
    for node in &op.block_nodes {
        if qmp
            .execute_raw("blockdev-del", Some(json!({ "node-name": node })))
            .await
            .is_ok()
        {
            cleaned.block_nodes.push(node.clone());
        }
    }
    for bitmap in &op.bitmaps {
        let args = json!({ "node": bitmap.node, "name": bitmap.name });
        if qmp
            .execute_raw("block-dirty-bitmap-remove", Some(args))
            .await
            .is_ok()
        {
            cleaned.bitmaps.push(format!("{}:{}", bitmap.node, bitmap.name));
        }
    }
}

/// The image files QEMU has open, so that cleanup never deletes one a VM is using.
pub async fn open_files(qmp: Option<&qmp::Qmp>) -> Vec<PathBuf> {
    let Some(qmp) = qmp else { return Vec::new() };
    let Ok(nodes) = qmp
        .execute_raw("query-named-block-nodes", Some(json!({ "flat": true })))
        .await
    else {
        return Vec::new();
    };
    nodes
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| n["file"].as_str())
        .map(PathBuf::from)
        .collect()
}

/// Removes the files an operation record names (inside the repository, and `outside`: absolute paths a
/// snapshot created next to the VM's disks) and the node's directory if it is left empty. A file QEMU still
/// has open (`in_use`) is never deleted.
pub fn undo_on_disk(vm: &VmStore, op: &Operation, in_use: &[PathBuf], cleaned: &mut Cleaned) {
    let outside = op
        .note
        .as_deref()
        .and_then(|n| n.strip_prefix(OUTSIDE_FILES))
        .unwrap_or_default();
    let paths = op
        .files
        .iter()
        .filter_map(|f| vm.resolve(f).ok())
        .chain(outside.split('\n').filter(|p| !p.is_empty()).map(PathBuf::from));
    for path in paths {
        if in_use.contains(&path) {
            continue;
        }
        if std::fs::remove_file(&path).is_ok() {
            cleaned.files.push(path.display().to_string());
        }
    }
    if let Some(node) = &op.node {
        let _ = std::fs::remove_dir(vm.node_dir(node));
    }
}

/// Finishes every operation record in the manifest: undoes it in QEMU (when connected) and on disk, marks its
/// node failed, and saves the manifest once. Called at the start of every command that changes a VM, under the
/// exclusive lock, so no other qmpbak can own these records.
pub async fn recover(
    qmp: Option<&qmp::Qmp>,
    vm: &VmStore,
    manifest: &mut Manifest,
    guard: &LockGuard,
) -> Result<Cleaned> {
    let mut cleaned = Cleaned::default();
    if manifest.operations.is_empty() {
        return Ok(cleaned);
    }
    let operations = std::mem::take(&mut manifest.operations);
    for op in &operations {
        if op.kind == OperationKind::Commit {
            // Finished if any increment left its graph (a commit cannot be undone), else nothing changed.
            let Some(qmp) = qmp else {
                manifest.operations.push(op.clone());
                continue;
            };
            if let Err(e) = crate::commit::recover(qmp, manifest, op).await {
                manifest.operations.push(op.clone());
                vm.save(manifest, guard)?;
                return Err(e.context(format!("finishing the interrupted commit {}", op.id)));
            }
            cleaned.operations.push(op.id.clone());
            continue;
        }
        if op.kind == OperationKind::Restore {
            // A live restore cannot be undone once the VM runs on the chain: finish it instead.
            let Some(qmp) = qmp else {
                manifest.operations.push(op.clone());
                continue;
            };
            if let Err(e) = crate::restore::live::finish(qmp, op, &crate::progress::Silent).await {
                manifest.operations.push(op.clone());
                vm.save(manifest, guard)?;
                return Err(e.context(format!("finishing the interrupted live restore {}", op.id)));
            }
            cleaned.jobs.extend(op.jobs.iter().cloned());
            cleaned.block_nodes.extend(op.block_nodes.iter().cloned());
            cleaned.operations.push(op.id.clone());
            continue;
        }
        if let Some(qmp) = qmp {
            undo_in_qemu(qmp, op, &mut cleaned).await;
        }
        let in_use = open_files(qmp).await;
        undo_on_disk(vm, op, &in_use, &mut cleaned);
        if let Some(node_id) = &op.node {
            if let Some(node) = manifest.node_mut(node_id) {
                if node.state == NodeState::Pending {
                    node.state = NodeState::Failed;
                    let why = format!(
                        "interrupted (pid {} on {}, started {})",
                        op.pid, op.host, op.started
                    );
                    node.reason = Some(match node.reason.take() {
                        Some(r) => format!("{r}; {why}"),
                        None => why,
                    });
                    cleaned.failed_nodes.push(node_id.to_string());
                }
            }
        }
        cleaned.operations.push(op.id.clone());
    }
    vm.save(manifest, guard)?;
    Ok(cleaned)
}
