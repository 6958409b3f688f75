//! The copy phase of a checksum-diff incremental, used when QEMU's dirty bitmaps cannot be trusted (missing
//! after a restart, inconsistent, busy, or relative to another node). Image fleecing gives a point-in-time
//! view of each running disk: a `blockdev-backup sync=none` job copies old data into a temporary overlay before
//! the guest overwrites it, and reads of the overlay see the disk as it was at the transaction. qmpbak reads
//! that view over NBD from the VM's QEMU, hashes it into a full checking table, diffs it against the base
//! node's table, and writes only the blocks that differ into the new node's file.

use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use serde_json::json;

use super::{Copied, Run, interrupted, jobs};
use crate::cleanup;
use crate::daemon::NBD_CONNECT_TIMEOUT;
use crate::graph;
use crate::tables::load_node_table;
use crate::tables::{NbdSource, threads};

/// Marks an operation record whose run started the VM's NBD server (so cleanup stops it).
pub const NBD_SERVER_NOTE: &str = "started the VM's NBD server";

/// How long a fleecing job may take to stop after `job-cancel`.
const FLEECE_STOP_TIMEOUT: Duration = Duration::from_secs(60);

pub(super) async fn copy(run: &mut Run<'_>) -> Result<Copied> {
    jobs::create_target_files(run)?;
    let sockdir = tempfile::Builder::new()
        .prefix("qmpbak-nbd-")
        .tempdir()
        .context("creating a socket directory")?;
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
    run.op.note = Some(NBD_SERVER_NOTE.to_owned());
    if let Some(op) = run.manifest.operations.iter_mut().find(|o| o.id == run.op.id) {
        *op = run.op.clone();
    }
    run.save()?;
    for t in &run.targets {
        run.bins.create_qcow2(
            &run.vm.resolve(&fleece_file(run, t.index)?)?,
            t.info.virtual_size,
            None,
        )?;
    }
    Ok(())
}

async fn fleece_and_copy(run: &mut Run<'_>, socket: &std::path::Path) -> Result<Copied> {
    let qmp = run.qmp;
    // The fleecing overlays, on top of the live disks.
    for t in &run.targets {
        let path = run.vm.resolve(&fleece_file(run, t.index)?)?;
        let mut options = graph::qcow2_options(&run.qemu_name("f", t.index), &path, None, false);
        options["backing"] = json!(t.info.node_name);
        qmp.execute_raw("blockdev-add", Some(options))
            .await
            .context("adding the fleecing overlay")?;
    }
    // The new node files, on top of the parent's chain.
    jobs::add_targets(run).await?;

    // One instant for every disk: fleecing jobs and the new bitmaps.
    let mut actions = Vec::new();
    for t in &run.targets {
        for name in run.new_bitmaps() {
            actions.push(json!({
                "type": "block-dirty-bitmap-add",
                "data": { "node": t.info.node_name, "name": name, "persistent": true },
            }));
        }
        actions.push(json!({
            "type": "blockdev-backup",
            "data": {
                "job-id": run.qemu_name("j", t.index), "device": t.info.node_name,
                "target": run.qemu_name("f", t.index), "sync": "none", "auto-dismiss": false,
            },
        }));
    }
    run.transaction(actions, "starting image fleecing (QMP transaction)")
        .await?;

    qmp.execute_raw(
        "nbd-server-start",
        Some(json!({ "addr": { "type": "unix", "data": { "path": socket } } })),
    )
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
        run.progress
            .phase(&format!("reading disk {} and comparing checksums", t.info.id));
        let size = fleece.size();
        let source = NbdSource::new(
            nbd::BlockingClient::new(fleece.clone(), tokio::runtime::Handle::current()),
            size,
        );
        let block_size = run.block_size;
        let table = tokio::task::spawn_blocking(move || chain::Table::build(&source, block_size, threads()))
            .await
            .context("table builder panicked")??;
        let changed = chain::Table::diff(&base, &table)?;
        let mut copied = 0;
        let mut buf = vec![0u8; block_size as usize];
        for (n, &block) in changed.iter().enumerate() {
            let offset = block * block_size;
            let len = block_size.min(size - offset) as usize;
            let data = &mut buf[..len];
            fleece.read(offset, data).await?;
            if data.iter().all(|&b| b == 0) {
                target.write_zeroes(offset, len as u64, false).await?;
            } else {
                target.write(offset, data, false).await?;
            }
            copied += len as u64;
            run.progress.advance(
                &t.info.id,
                (n as u64 + 1) * block_size,
                changed.len() as u64 * block_size,
            );
        }
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
        .execute_raw(
            "block-export-add",
            Some(json!({ "type": "nbd", "id": id, "node-name": node, "name": id, "writable": writable })),
        )
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
            let _ = qmp
                .execute_raw("block-export-del", Some(json!({ "id": id, "mode": "hard" })))
                .await;
        }
    }
    let _ = qmp.execute_raw("nbd-server-stop", None).await;
    for t in &run.targets {
        let job = run.qemu_name("j", t.index);
        let _ = qmp.execute_raw("job-cancel", Some(json!({ "id": job }))).await;
        let _ = qmp.wait_job(&job, FLEECE_STOP_TIMEOUT).await;
        let _ = qmp.execute_raw("job-dismiss", Some(json!({ "id": job }))).await;
        cleanup::stop_job(qmp, &job).await;
    }
    for name in &run.op.block_nodes {
        let _ = qmp
            .execute_raw("blockdev-del", Some(json!({ "node-name": name })))
            .await;
    }
}
