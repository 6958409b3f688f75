//! The copy phase of a checksum-diff incremental, used when QEMU's dirty bitmaps cannot be trusted (missing
//! after a restart, inconsistent, busy, or relative to another node). The pull's point-in-time view
//! ([`super::view`]: copy-before-write + `snapshot-access`, or image fleecing on older QEMUs) keeps each
//! running disk as it was at the instant, its old data in a temporary image in the repository. qmpbak reads
//! that view over NBD from the VM's QEMU and hashes it into a full checking table; each block whose check
//! value differs from the base node's is written into the new node's file as soon as it is hashed, from the
//! same buffer (nothing read twice): neighbouring changed blocks in one write, several writes in flight while
//! the hashing workers go on.

use anyhow::{Context, Result, anyhow};
use qmp::commands::{
    BlockExportAdd, BlockExportDel, BlockdevAdd, BlockdevDel, NbdServerStart, NbdServerStop,
};
use serde_json::json;

use super::view::View;
use super::{Copied, Run, copy, interrupted, jobs};
use crate::daemon::NBD_CONNECT_TIMEOUT;
use crate::graph;
use crate::tables::NbdSource;
use crate::tables::load_node_table;

pub(super) async fn copy(run: &mut Run<'_>) -> Result<Copied> {
    // The scratch images are in the record before they exist.
    record_fleece_files(run)?;
    // QEMU builds its schema (tens of milliseconds, for `View::choose`) while the node files and the scratch
    // images are created and the parent's chains mapped: each of these touches only what the record names.
    let (view, (), (), parents) = tokio::try_join!(
        View::choose(run),
        jobs::create_target_files(run),
        create_fleece_files(run),
        parents(run),
    )?;
    let recorded = super::view::record(run, view)?;
    if let chain::Payload::Backup { view, .. } = &mut run.op.payload {
        *view = recorded;
    }
    run.save_op()?;
    let sockdir = crate::rundir::private_dir("qmpbak-nbd-")?;
    let socket = sockdir.path().join("nbd.sock");
    let result = fleece_and_copy(run, view, parents, &socket).await;
    let torn_down = teardown(run, view).await;
    if torn_down.is_ok() {
        for t in &run.targets {
            let _ = std::fs::remove_file(run.vm.resolve(&fleece_file(run, t.index)?)?);
        }
    }
    let mut copied = result?;
    torn_down?;
    copied.view = Some(view.name());
    Ok(copied)
}

fn fleece_file(run: &Run<'_>, disk: usize) -> Result<chain::RelPath> {
    Ok(format!("{}/fleece-{disk}.qcow2", run.node).parse()?)
}

/// Puts each disk's scratch image into the operation record and saves it.
fn record_fleece_files(run: &mut Run<'_>) -> Result<()> {
    for i in 0..run.targets.len() {
        let rel = fleece_file(run, i)?;
        run.op.files.push(rel);
    }
    run.save_op()
}

/// Creates each disk's scratch image (recorded by [`record_fleece_files`]).
async fn create_fleece_files(run: &Run<'_>) -> Result<()> {
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

/// A disk's base: the base node's table and its chain, read straight from its files where it can be.
type Base = (chain::Table, Option<crate::direct::DirectSource>);

/// Per disk (in target order), its [`Base`].
async fn parents(run: &Run<'_>) -> Result<Vec<Base>> {
    let parent = run
        .plan
        .parent
        .as_ref()
        .context("a checksum-diff needs a base node")?;
    let parent_id: chain::NodeId = parent.parse()?;
    let mut parents = Vec::new();
    for t in &run.targets {
        let base = load_node_table(run.vm, &run.manifest, &parent_id, &t.info.id)?;
        parents.push((base, open_parent_chain(run, &parent_id, &t.info.id).await));
    }
    Ok(parents)
}

async fn fleece_and_copy(
    run: &mut Run<'_>,
    view: View,
    parents: Vec<Base>,
    socket: &std::path::Path,
) -> Result<Copied> {
    let qmp = run.qmp;
    crate::crypt::unlock::add_secret(qmp).await?;
    // The fleecing overlays, on top of the live disks.
    for t in &run.targets {
        let path = run.vm.resolve(&fleece_file(run, t.index)?)?;
        let mut options = graph::qcow2_options(&run.qemu_name("f", t.index), &path, None, false);
        if let Some(backing) = view.overlay_backing(t) {
            options["backing"] = json!(backing);
        }
        // A scratch file, deleted after the run: its durability does not matter.
        options["cache"] = json!({ "no-flush": true });
        crate::crypt::unlock::encrypt_node(&mut options);
        qmp.execute(&BlockdevAdd(options))
            .await
            .context("adding the fleecing overlay")?;
    }
    // The new node files, on top of the parent's chain.
    jobs::add_targets(run).await?;

    // One instant for every disk: the views and the new bitmaps.
    let mut actions = Vec::new();
    for t in &run.targets {
        actions.extend(run.new_bitmap_actions(t));
    }
    super::view::start(run, view, actions).await?;

    qmp.execute(&NbdServerStart::unix(socket.display().to_string()))
    .await
    .map_err(|e| anyhow!(e))
    .context(
        "starting an NBD server in the VM's QEMU to read the disks (is another NBD server running in it?)",
    )?;
    run.record_nbd_server_started()?;

    let mut bytes = Vec::new();
    let mut tables = Vec::new();
    for (t, (base, parent_chain)) in run.targets.iter().zip(parents) {
        if run.interrupt.arrived().await {
            return Err(interrupted());
        }
        let fleece = export(
            run,
            &format!("{}-f{}", run.op.id, t.index),
            &view.read_node(run, t),
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
            write_only: None,
            parent: parent_chain,
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
        view: None,
    })
}

/// The base node's chain of disk `disk` (the new node file's backing), read straight from its files, so that
/// only the clusters that differ from it are written ([`copy::Pass::parent`]). `None` when it cannot be read so
/// (compressed clusters, an encrypted repository): changed blocks are then written whole, which is always right.
async fn open_parent_chain(
    run: &Run<'_>,
    parent: &chain::NodeId,
    disk: &str,
) -> Option<crate::direct::DirectSource> {
    let opened = crate::direct::DirectSource::open_node(&run.bins, run.vm, &run.manifest, parent, disk).await;
    opened.unwrap_or_else(|e| {
        tracing::warn!(
            disk,
            "changed blocks are written whole: the parent's chain cannot be read directly: {e:#}"
        );
        None
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

/// Stops exports, the NBD server, and the view; removes the block nodes. A device that cannot be put back on
/// its node is an error, and the filters, the fleece files and the record stay for recovery.
async fn teardown(run: &Run<'_>, view: View) -> Result<()> {
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
    let stopped = super::view::stop(run, view)
        .await
        .context("putting the VM's devices back on their disks after the checksum-diff");
    for name in &run.op.block_nodes {
        let _ = qmp.execute(&BlockdevDel::new(name.as_str())).await;
    }
    crate::crypt::unlock::remove_secret(qmp).await;
    stopped
}
