//! The copy phase of a full, incremental or differential backup: one `blockdev-backup` job per disk, all
//! started with the new bitmaps in one QMP transaction. Incremental and differential targets are qcow2 files
//! whose backing file is the parent's; in QEMU they are opened on top of the parent's recovery chain, so that a
//! zeroed cluster is recorded as zero rather than left to show the parent's data.
//!
//! Targets are opened with `cache.no-flush`: QEMU then never fsyncs them. A backup target that is not
//! complete is thrown away after a crash whatever its state, so QEMU's ordered metadata flushes (a dozen or more
//! `fdatasync` calls per GiB, which stall the job) buy nothing; qmpbak fsyncs each finished file once, before the
//! node is recorded as complete ([`super::Run::complete`]), and starts their writeback while the jobs run
//! ([`crate::writeback`]).

use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use qmp::commands::{BlockdevAdd, BlockdevBackup, BlockdevDel, JobDismiss, QueryJobs, TransactionAction};
use qmp::{BitmapSyncMode, MirrorSyncMode};
use serde_json::json;
use tokio::task::JoinSet;

use super::{Copied, Run, interrupted};
use crate::exit::{Exit, ExitCode};
use crate::graph;
use crate::plan::Method;
use crate::recovery;

/// How often job progress is read for the progress display.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(250);

/// Creates the targets, runs the copy jobs and removes them from QEMU again. Returns the bytes copied per disk.
pub(super) async fn copy(run: &mut Run<'_>) -> Result<Copied> {
    create_target_files(run).await?;
    add_targets(run).await?;
    let jobs: Vec<String> = run.targets.iter().map(|t| run.qemu_name("j", t.index)).collect();
    run.progress.phase("copying");
    let actions = transaction(run);
    run.transaction(actions, "starting the backup jobs (QMP transaction)")
        .await?;
    crate::crashpoint::crashpoint("backup-jobs-started");
    // Tests hold the run here to write to the disks while the jobs copy.
    crate::crashpoint::pause_point("backup-copying").await;
    let writeback =
        crate::writeback::EarlyWriteback::start(run.target_files()?, crate::writeback::Flush::Wait);
    let outcome = tokio::select! {
        outcome = wait_jobs(run, &jobs) => outcome,
        () = run.interrupt.wait() => {
            for job in &jobs {
                recovery::stop_job(run.qmp, job).await;
            }
            return Err(interrupted());
        }
    };
    writeback.stop();
    let bytes = outcome?;
    for job in &jobs {
        let _ = run.qmp.execute(&JobDismiss::new(job.as_str())).await;
    }
    remove_targets(run).await;
    Ok(Copied {
        bytes,
        tables: None,
        pulled: None,
        view: None,
    })
}

/// `qemu-img create` of each node file; incremental ones name the parent's file as backing file (relative).
pub(super) async fn create_target_files(run: &Run<'_>) -> Result<()> {
    for t in &run.targets {
        crate::crypt::unlock::create_node_file(
            &run.bins,
            &run.vm.resolve(&t.file)?,
            t.info.virtual_size,
            t.header_backing().as_deref(),
        )
        .await?;
    }
    Ok(())
}

/// Opens each target in the VM's QEMU, on top of the parent's chain when there is a parent.
pub(super) async fn add_targets(run: &Run<'_>) -> Result<()> {
    // An encrypted repository's key, for the targets and the parents' chains (removed in `Run::fail` or
    // `remove_targets`).
    crate::crypt::unlock::add_secret(run.qmp).await?;
    for t in &run.targets {
        let backing = run.add_parent_chain(run.qmp, t).await?;
        let path = run.vm.resolve(&t.file)?;
        let options = target_options(&run.qemu_name("t", t.index), &path, backing.as_deref());
        run.qmp
            .execute(&BlockdevAdd(options))
            .await
            .with_context(|| format!("opening the backup target {} in QEMU", path.display()))?;
    }
    Ok(())
}

/// Removes targets and parent chains from QEMU (the jobs are gone by now).
async fn remove_targets(run: &Run<'_>) {
    for name in &run.op.block_nodes {
        let _ = run.qmp.execute(&BlockdevDel::new(name.as_str())).await;
    }
    crate::crypt::unlock::remove_secret(run.qmp).await;
}

/// The `blockdev-add` options of a new node file `path` as block node `node` (in the VM's QEMU, or a pull's
/// local qemu-storage-daemon), on top of `backing`: flushes off (the file is fsynced once complete; a target
/// that is not complete is thrown away), the test hooks' fault injection, and the repository's encryption.
pub(super) fn target_options(node: &str, path: &std::path::Path, backing: Option<&str>) -> serde_json::Value {
    let mut options = graph::qcow2_options(node, path, backing, false);
    options["cache"] = json!({ "no-flush": true });
    options["file"] = crate::crashpoint::target_file_options(options["file"].take());
    crate::crypt::unlock::encrypt_node(&mut options);
    options
}

/// The one transaction: per disk, the new bitmaps and the copy job. The bitmaps are persistent where the image
/// can store them (a writable qcow2); on a raw or read-only image they live in QEMU's memory, and after a restart
/// of QEMU the next backup compares checking tables instead ([`crate::inspect::volatile_bitmaps_why`]).
fn transaction(run: &Run<'_>) -> Vec<TransactionAction> {
    let mut actions = Vec::new();
    for t in &run.targets {
        let base = run.base_bitmap(t);
        actions.extend(run.new_bitmap_actions(t));
        let sync = full_or_bitmap_sync(run.plan.method, t.info.has_backing);
        let mut job = BlockdevBackup::new(
            run.qemu_name("j", t.index),
            t.info.node_name.as_str(),
            run.qemu_name("t", t.index),
            sync,
        );
        if run.plan.method == Method::Bitmap {
            job.bitmap = base;
            job.bitmap_mode = Some(BitmapSyncMode::Never);
        }
        if run.opts.speed_limit > 0 {
            job.speed = Some(run.opts.speed_limit);
        }
        if run.opts.compress {
            job.compress = Some(true);
        }
        actions.push(TransactionAction::BlockdevBackup(job));
    }
    actions
}

/// The job's sync mode. A full backup of a disk without a backing image copies only the clusters the image
/// has allocated (`sync=top`): everything else reads as zeros, and so does a new qcow2 target, so nothing is
/// lost, while `sync=full` would walk the whole virtual size and write zero clusters into the target (128 MiB of
/// metadata and seconds of work for a mostly empty 1 TiB disk). A disk with a backing image shows the backing's
/// data too: its full backup copies everything (`sync=full`).
fn full_or_bitmap_sync(method: Method, has_backing: bool) -> MirrorSyncMode {
    match method {
        Method::Bitmap => MirrorSyncMode::Bitmap,
        Method::Full | Method::ChecksumDiff if has_backing => MirrorSyncMode::Full,
        Method::Full | Method::ChecksumDiff => MirrorSyncMode::Top,
    }
}

/// Waits for every job to conclude, reporting progress; on the first failure cancels the others.
async fn wait_jobs(run: &Run<'_>, jobs: &[String]) -> Result<Vec<u64>> {
    let mut set = JoinSet::new();
    for (i, job) in jobs.iter().enumerate() {
        let qmp = run.qmp.clone();
        let job = job.clone();
        let timeout = run.opts.job_timeout;
        set.spawn(async move { (i, qmp.wait_job(&job, timeout).await) });
    }
    let mut bytes = vec![0; jobs.len()];
    let mut failure: Option<anyhow::Error> = None;
    let mut ticker = tokio::time::interval(PROGRESS_INTERVAL);
    while !set.is_empty() {
        tokio::select! {
            joined = set.join_next() => {
                let Some(joined) = joined else { break };
                let (i, outcome) = joined.map_err(|e| anyhow!("job waiter panicked: {e}"))?;
                let disk = &run.targets[i].info.id;
                match outcome {
                    Ok(o) if o.error.is_none() => {
                        bytes[i] = o.total_progress;
                        run.progress.advance(disk, o.total_progress, o.total_progress);
                        run.progress.finish_disk(disk);
                    }
                    Ok(o) => {
                        let why = o.error.unwrap_or_default();
                        failure.get_or_insert_with(|| {
                            Exit::new(ExitCode::Qemu, format!("the backup job of disk {disk} failed: {why}")).into()
                        });
                        for job in jobs {
                            recovery::stop_job(run.qmp, job).await;
                        }
                    }
                    Err(e) => {
                        failure.get_or_insert_with(|| anyhow::Error::new(e)
                            .context(format!("waiting for the backup job of disk {disk}")));
                    }
                }
            }
            _ = ticker.tick() => report_progress(run, jobs).await,
        }
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(bytes),
    }
}

async fn report_progress(run: &Run<'_>, jobs: &[String]) {
    let Ok(list) = run.qmp.execute(&QueryJobs).await else {
        return;
    };
    for job in list {
        let Some(i) = jobs.iter().position(|j| job.id == *j) else {
            continue;
        };
        run.progress
            .advance(&run.targets[i].info.id, job.current_progress, job.total_progress);
    }
}
