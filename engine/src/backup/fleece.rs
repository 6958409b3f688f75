//! The copy phase of a checksum-diff incremental, used when QEMU's dirty bitmaps cannot be trusted (missing
//! after a restart, inconsistent, busy, or relative to another node). Image fleecing gives a point-in-time
//! view of each running disk: a `blockdev-backup sync=none` job copies old data into a temporary overlay before
//! the guest overwrites it, and reads of the overlay see the disk as it was at the transaction. qmpbak reads
//! that view over NBD from the VM's QEMU and hashes it into a full checking table; each block whose check
//! value differs from the base node's is written into the new node's file as soon as it is hashed, from the
//! same buffer (nothing read twice): neighbouring changed blocks in one write, several writes in flight while
//! the hashing workers go on.

use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use qmp::commands::{
    BlockExportAdd, BlockExportDel, BlockdevAdd, BlockdevDel, JobCancel, JobDismiss, NbdServerStart,
    NbdServerStop,
};
use serde_json::json;

use super::{Copied, Run, copy, interrupted, jobs};
use crate::daemon::NBD_CONNECT_TIMEOUT;
use crate::graph;
use crate::recovery;
use crate::tables::NbdSource;
use crate::tables::load_node_table;

/// How long a fleecing job may take to stop after `job-cancel`.
const FLEECE_STOP_TIMEOUT: Duration = Duration::from_secs(60);

pub(super) async fn copy(run: &mut Run<'_>) -> Result<Copied> {
    jobs::create_target_files(run).await?;
    let sockdir = crate::daemon::private_temp_dir("qmpbak-nbd-")?;
    let socket = sockdir.path().join("nbd.sock");
    create_fleece_files(run).await?;
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

async fn create_fleece_files(run: &mut Run<'_>) -> Result<()> {
    for i in 0..run.targets.len() {
        let rel = fleece_file(run, i)?;
        run.op.files.push(rel.clone());
    }
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
        )
        .await?;
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
        actions.extend(run.new_bitmap_actions(t));
        actions.push(run.view_action(t));
    }
    run.transaction(actions, "starting image fleecing (QMP transaction)")
        .await?;

    qmp.execute(&NbdServerStart::unix(socket.display().to_string()))
    .await
    .map_err(|e| anyhow!(e))
    .context(
        "starting an NBD server in the VM's QEMU to read the disks (is another NBD server running in it?)",
    )?;
    run.record_nbd_server_started()?;

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
        let source = NbdSource::new(
            nbd::BlockingClient::new(fleece.clone(), tokio::runtime::Handle::current()),
            size,
        );
        let pass = copy::Pass {
            disk: &t.info.id,
            source,
            blocks: None,
            base: Some(base),
            target: target.clone(),
        };
        let (table, copied) = copy::hash_and_copy(run, pass).await?;
        target.flush().await?;
        run.progress.finish_disk(&t.info.id);
        let _ = fleece.disconnect().await;
        let _ = target.disconnect().await;
        bytes.push(copied);
        tables.push(table);
    }
    Ok(Copied {
        bytes,
        tables: Some(tables),
        pulled: None,
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

/// Stops exports, the NBD server, and the fleecing jobs; removes the block nodes.
async fn teardown(run: &Run<'_>) {
    let qmp = run.qmp;
    for t in &run.targets {
        for kind in ["f", "t"] {
            let id = format!("{}-{kind}{}", run.op.id, t.index);
            let _ = qmp.execute(&BlockExportDel::hard(id)).await;
        }
    }
    if run.op.payload.started_nbd_server() {
        let _ = qmp.execute(&NbdServerStop).await;
    }
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
