//! The point-in-time view of the running disks that a pull and a checksum-diff read over NBD from the VM's
//! QEMU, one implementation for both. Chosen by QEMU's schema:
//!
//! - **copy-before-write** (QEMU 7.1+: the filter with `on-cbw-error`, and `snapshot-access`): a
//!   `copy-before-write` filter above each disk's root node whose target is the run's scratch image (`f`, no
//!   backing), the device switched to it with `qom-set <device> drive <filter>`, and a `snapshot-access` node
//!   over the filter, which reads as the disk at the instant. `qom-set` is no transaction action, so the VM is
//!   paused (only if it runs) while the filters are added, the devices switched and the bitmap transaction
//!   runs: one instant for every disk and the bitmaps. A copy that fails breaks the view, never the guest's
//!   write (`on-cbw-error: break-snapshot`).
//! - **fleece** (older QEMUs; `QMPBAK_VIEW=fleece` in tests): the scratch image is an overlay whose backing
//!   is the disk, and the transaction starts a `blockdev-backup sync=none` job into it.
//!
//! The operation record says whether the run paused the VM and which devices it switched
//! ([`chain::ViewRecord`]); [`crate::recovery::view`] undoes both after a kill.

use std::time::Duration;

use anyhow::{Context, Result};
use qmp::commands::{
    BlockdevAdd, BlockdevDel, Cont, JobCancel, JobDismiss, QomSet, QueryStatus, Stop, Transaction,
    TransactionAction,
};
use serde_json::json;

use super::{Run, Target};
use crate::crashpoint::crashpoint;
use crate::recovery;

/// How long a fleecing job may take to stop after `job-cancel`.
const FLEECE_STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a guest write may wait for the copy-before-write filter to copy the old data out (`cbw-timeout`):
/// past it the view breaks (the backup fails) and the write goes on.
const CBW_TIMEOUT_SECS: u64 = 60;

/// How the VM's QEMU keeps the disks' point-in-time view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum View {
    /// A `copy-before-write` filter above each disk's root node (the device switched to it with `qom-set
    /// drive` while the VM is paused for the instant), read through a `snapshot-access` node.
    CopyBeforeWrite,
    /// A `blockdev-backup sync=none` job into an overlay whose backing is the disk (image fleecing).
    Fleece,
}

impl View {
    /// Copy-before-write where the VM's QEMU has the filter with `on-cbw-error` and `snapshot-access` (from its
    /// schema, QEMU 7.1+) and every disk has a device to switch; the fleece otherwise (or when a test forces
    /// it, [`crate::crashpoint::force_fleece`]).
    pub async fn choose(run: &Run<'_>) -> Result<View> {
        refuse_leftover_filters(run).await?;
        if crate::crashpoint::force_fleece() {
            return Ok(View::Fleece);
        }
        let caps = run
            .qmp
            .capabilities()
            .await
            .context("reading what the VM's QEMU can do (query-qmp-schema)")?;
        let devices = run.targets.iter().all(|t| t.info.qdev.is_some());
        Ok(
            if caps.copy_before_write && caps.snapshot_access && caps.cbw_on_error && devices {
                View::CopyBeforeWrite
            } else {
                View::Fleece
            },
        )
    }

    /// The report's name of the view.
    pub fn name(self) -> &'static str {
        match self {
            View::CopyBeforeWrite => "copy-before-write",
            View::Fleece => "fleece",
        }
    }

    /// The backing of disk `t`'s scratch image `f`: the disk for the fleece, none for a copy-before-write
    /// target (`snapshot-access` knows which clusters it holds).
    pub fn overlay_backing(self, t: &Target) -> Option<&str> {
        match self {
            View::Fleece => Some(t.info.node_name.as_str()),
            View::CopyBeforeWrite => None,
        }
    }

    /// The node that reads as disk `t` at the instant: what is exported.
    pub fn read_node(self, run: &Run<'_>, t: &Target) -> String {
        match self {
            View::Fleece => run.qemu_name("f", t.index),
            View::CopyBeforeWrite => run.qemu_name("v", t.index),
        }
    }
}

/// Refuses a view of a disk whose device is still attached to a copy-before-write filter of qmpbak's (named
/// as its block nodes are, `qb…`) that no record names any more: recovery, which runs first, puts back every
/// device a record names, so such a filter is one whose record was lost. Stacking another filter on it would
/// work, but the device could then never be put back where it was; the user decides.
async fn refuse_leftover_filters(run: &Run<'_>) -> Result<()> {
    let blocks = run
        .qmp
        .execute(&qmp::commands::QueryBlock)
        .await
        .context("listing the VM's disks (query-block)")?;
    for t in &run.targets {
        let leftover = blocks.iter().filter_map(|b| b.inserted.as_ref()).find(|i| {
            i.node_name.as_deref() == Some(t.info.root_node.as_str())
                && i.drv == "copy-before-write"
                && t.info.root_node.starts_with("qb")
        });
        if leftover.is_some() {
            anyhow::bail!(
                "disk {}'s device is attached to {}, a copy-before-write filter an earlier qmpbak run left \
                 without a record: put the device back on the node below it (qom-set <device> drive <node>) \
                 and remove the filter (blockdev-del), then back up again",
                t.info.id,
                t.info.root_node
            );
        }
    }
    Ok(())
}

/// For a copy-before-write view: puts its `snapshot-access` nodes and filters into the record's block nodes
/// (newest first, before the filters' targets `f` that `begin` recorded) and returns the record of the
/// devices it will switch, each with the node it is attached to now. Nothing for the fleece.
pub(super) fn record(run: &mut Run<'_>, view: View) -> Result<Option<chain::ViewRecord>> {
    if view == View::Fleece {
        return Ok(None);
    }
    let mut front = Vec::new();
    let mut switched = Vec::new();
    for t in &run.targets {
        front.push(run.qemu_name("v", t.index));
        front.push(run.qemu_name("b", t.index));
        let qdev = t.info.qdev.as_deref().context("a disk without a device")?;
        switched.push(chain::DriveSwitch {
            device: recovery::view::device_path(qdev),
            original: t.info.root_node.clone(),
            filter: run.qemu_name("b", t.index),
        });
    }
    run.op.block_nodes.splice(0..0, front);
    Ok(Some(chain::ViewRecord {
        paused_vm: false,
        switched,
    }))
}

/// Starts the view of every disk at one instant with the bitmap transaction `actions`: the fleece adds its
/// jobs to the transaction; copy-before-write pauses the VM around filters, switches and transaction
/// ([`cbw_instant`]) and then opens the `snapshot-access` nodes.
pub(super) async fn start(run: &mut Run<'_>, view: View, mut actions: Vec<TransactionAction>) -> Result<()> {
    match view {
        View::Fleece => {
            for t in &run.targets {
                actions.push(run.view_action(t));
            }
            run.transaction(actions, "starting the point-in-time views (QMP transaction)")
                .await
        }
        View::CopyBeforeWrite => {
            cbw_instant(run, actions).await?;
            for t in &run.targets {
                run.qmp
                    .execute(&BlockdevAdd(json!({
                        "driver": "snapshot-access",
                        "node-name": run.qemu_name("v", t.index),
                        "file": run.qemu_name("b", t.index),
                    })))
                    .await
                    .with_context(|| format!("opening the point-in-time view of disk {}", t.info.id))?;
            }
            Ok(())
        }
    }
}

/// Ends the view once its exports are gone: cancels the fleecing jobs, or removes the `snapshot-access` nodes
/// and puts every device back on its node (an error if one cannot be: the filters then stay, and so does the
/// record). The filters and scratch nodes are removed by the caller with its other nodes.
pub(super) async fn stop(run: &Run<'_>, view: View) -> Result<()> {
    let qmp = run.qmp;
    match view {
        View::Fleece => {
            for t in &run.targets {
                let job = run.qemu_name("j", t.index);
                let _ = qmp.execute(&JobCancel::new(job.as_str())).await;
                let _ = qmp.wait_job(&job, FLEECE_STOP_TIMEOUT).await;
                let _ = qmp.execute(&JobDismiss::new(job.as_str())).await;
                recovery::stop_job(qmp, &job).await;
            }
            Ok(())
        }
        View::CopyBeforeWrite => {
            for t in &run.targets {
                let _ = qmp.execute(&BlockdevDel::new(run.qemu_name("v", t.index))).await;
            }
            if let chain::Payload::Backup { view: Some(v), .. } = &run.op.payload {
                recovery::view::switch_back(qmp, &run.op, v).await?;
            }
            Ok(())
        }
    }
}

/// The copy-before-write view's instant: the VM is paused (if it runs) while each disk's filter is added, its
/// device switched to it and the bitmap transaction runs; the guest sees a pause of a few milliseconds. With
/// `--quiesce` the guest's filesystems are frozen around it.
async fn cbw_instant(run: &mut Run<'_>, actions: Vec<TransactionAction>) -> Result<()> {
    run.freeze().await?;
    let result = paused_instant(run, actions).await;
    let thawed = run.thaw().await;
    result?;
    thawed
}

async fn paused_instant(run: &mut Run<'_>, actions: Vec<TransactionAction>) -> Result<()> {
    let qmp = run.qmp;
    let running = qmp
        .execute(&QueryStatus)
        .await
        .context("asking whether the VM runs (query-status)")?
        .running;
    if running {
        // Recorded before the VM stops: recovery resumes a VM the record says the run paused, if paused.
        set_paused(run, true)?;
        qmp.execute(&Stop)
            .await
            .context("pausing the VM for the backup instant")?;
        crashpoint("view-vm-paused");
    }
    let paused = std::time::Instant::now();
    let result = switch_to_filters(run, actions).await;
    if running {
        qmp.execute(&Cont)
            .await
            .context("resuming the VM after the backup instant")?;
        let ms = paused.elapsed().as_millis();
        tracing::info!(ms, "the VM was paused for the backup instant");
        run.progress
            .phase(&format!("the VM was paused for {ms} ms at the backup instant"));
        set_paused(run, false)?;
    }
    result
}

/// Records whether the run has the VM paused.
fn set_paused(run: &mut Run<'_>, paused: bool) -> Result<()> {
    if let chain::Payload::Backup { view: Some(view), .. } = &mut run.op.payload {
        view.paused_vm = paused;
    }
    run.save_op()
}

/// With the VM paused: a copy-before-write filter above each disk's root node, writing old data into the
/// scratch image (a failed copy breaks the view, never the guest's write), each device switched to its
/// filter, then the bitmap transaction.
async fn switch_to_filters(run: &Run<'_>, actions: Vec<TransactionAction>) -> Result<()> {
    let qmp = run.qmp;
    for t in &run.targets {
        let filter = run.qemu_name("b", t.index);
        qmp.execute(&BlockdevAdd(json!({
            "driver": "copy-before-write",
            "node-name": filter,
            "file": t.info.root_node,
            "target": run.qemu_name("f", t.index),
            "on-cbw-error": "break-snapshot",
            "cbw-timeout": CBW_TIMEOUT_SECS,
        })))
        .await
        .with_context(|| format!("adding the copy-before-write filter of disk {}", t.info.id))?;
        let qdev = t.info.qdev.as_deref().context("a disk without a device")?;
        let device = recovery::view::device_path(qdev);
        qmp.execute(&QomSet::drive(device.as_str(), filter.as_str()))
            .await
            .with_context(|| {
                format!(
                    "attaching disk {}'s device {device} to its copy-before-write filter (qom-set drive)",
                    t.info.id
                )
            })?;
    }
    crashpoint("view-drives-switched");
    qmp.execute(&Transaction::new(actions))
        .await
        .context("adding the bitmaps at the backup instant (QMP transaction)")?;
    Ok(())
}
