//! Live (instant) restore into a running QEMU whose disks are empty images of the right size (typically
//! started paused with `-S`): each disk gets the node's recovery chain as its backing (`blockdev-reopen`), the
//! VM resumes at once, and `block-stream` copies the data into the VM's own images behind it. Guest writes win:
//! streaming only fills clusters the guest has not written. When streaming ends the chain is removed and the
//! VM depends on nothing in the repository.
//!
//! If qmpbak dies while streaming, the VM keeps running on the chain; the operation record lets
//! `qmpbak cleanup --socket` (or any later command on the VM) finish it.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use qmp::commands::{
    BlockDirtyBitmapAdd, BlockStream, BlockdevReopen, Cont, QueryStatus, XDebugQueryBlockGraph,
};
use serde::{Deserialize, Serialize};
use serde_json::json;

use chain::{BitmapRecord, LockWait, Operation, Payload};

use crate::bitmaps::BitmapName;
use crate::exit::{Exit, ExitCode};
use crate::graph;
use crate::inspect;
use crate::progress::Progress;
use crate::signals::Interrupt;

#[derive(Debug, Clone)]
pub struct LiveOptions {
    pub repo: PathBuf,
    pub vm: String,
    pub node: String,
    pub qmp: crate::qmp_target::QmpTarget,
    pub disks: Vec<String>,
    /// Bytes per second per disk for streaming, 0 = unlimited.
    pub speed_limit: u64,
    pub lock_wait: LockWait,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LiveReport {
    pub vm: String,
    pub node: String,
    pub disks: Vec<String>,
    /// Seconds from the start of the command until the VM ran on the restored data.
    pub running_after_secs: f64,
    /// Seconds until streaming finished and the repository was detached.
    pub duration_secs: f64,
}

/// Restores `node` into the running VM behind `socket`.
pub async fn restore_live(
    opts: &LiveOptions,
    progress: &dyn Progress,
    interrupt: &Interrupt,
) -> Result<LiveReport> {
    let started = Instant::now();
    // An encrypted repository needs its key, checked before anything changes.
    crate::crypt::require(&chain::Repository::open(&opts.repo)?)?;
    let crate::session::Session {
        vm,
        guard,
        mut manifest,
        qmp,
        ..
    } = crate::session::open(
        &opts.repo,
        &opts.vm,
        &opts.qmp,
        Some(crate::qmp_target::Local::QemuReadsRepository),
        opts.lock_wait,
        "restore --live",
        false,
    )
    .await?;
    let node = crate::nodes::find_node(&manifest, &opts.node)?.clone();
    let disks = super::select_disks(&node, &opts.disks)?;
    let info = inspect::inspect(&qmp).await?;

    // Every disk must exist in the VM, be writable, have the node's size and no backing file.
    let mut targets = Vec::new();
    for (i, id) in disks.iter().enumerate() {
        let Some(d) = info.disks.iter().find(|d| &d.id == id) else {
            let have: Vec<&str> = info.disks.iter().map(|d| d.id.as_str()).collect();
            bail!(Exit::usage(format!(
                "the VM has no disk {id:?} to restore into; its disks are: {}",
                have.join(", ")
            )));
        };
        let want = node
            .disks
            .iter()
            .find(|n| &n.disk == id)
            .map_or(0, |n| n.virtual_size);
        if d.virtual_size != want {
            bail!(Exit::usage(format!(
                "disk {id} of the VM has {} bytes but node {} has {want}: start the VM with an empty image of that size",
                d.virtual_size, node.id
            )));
        }
        if d.backing_file.is_some() || d.read_only {
            bail!(Exit::usage(format!(
                "disk {id} of the VM has a backing file or is read-only: live restore needs an empty, writable image"
            )));
        }
        if d.node_name.starts_with('#') {
            // QEMU names the nodes of a `-drive` itself, and refuses to reopen them with a backing node
            // ("Cannot change the option 'node-name'").
            bail!(Exit::usage(format!(
                "disk {id} of the VM was attached with -drive: live restore needs its disks as -blockdev (named \
                 block nodes), because QEMU cannot give a node it named itself a backing chain; restore offline \
                 and start the VM on the result, or start it with -blockdev"
            )));
        }
        targets.push((i, d.clone()));
    }

    let chain_id = manifest.chain_id.clone();
    // The disks become this node's from here on: their images and keys are recorded with the node made current.
    let infos: Vec<inspect::DiskInfo> = targets.iter().map(|(_, d)| d.clone()).collect();
    crate::identity::note_images(&mut manifest, &infos);
    let bitmap_of = |id: &str| {
        let key = crate::identity::key_of(&manifest, id).unwrap_or_default();
        BitmapName::incremental(&chain_id, key, node.id.as_str()).to_string()
    };
    let bitmaps: Vec<String> = targets.iter().map(|(_, d)| bitmap_of(&d.id)).collect();
    let name = |what: &str, i: usize| graph::short_name(&chain_id, what, node.id.as_str(), i);
    let depth = manifest.recovery_chain(&node.id)?.len();
    let mut op = Operation::new(Payload::LiveRestore, Some(node.id.clone()), chrono::Utc::now());
    op.id = format!("restore-{}", node.id);
    op.pid = std::process::id();
    for ((i, d), bitmap) in targets.iter().zip(&bitmaps) {
        op.jobs.push(name("s", *i));
        for layer in (0..depth).rev() {
            op.block_nodes.push(format!("{}-{layer}", name("l", *i)));
        }
        op.bitmaps.push(BitmapRecord {
            node: d.node_name.clone(),
            name: bitmap.clone(),
        });
    }
    // From here on the VM will run on this node: it becomes current, and its bitmap records the guest's writes.
    // The stream job's own writes do not mark it (QEMU writes them on its copy-on-read path, which bypasses
    // dirty tracking), so the next incremental holds only what the guest wrote; a test in restore.rs holds
    // QEMU to that.
    manifest.current = Some(node.id.clone());
    manifest.add_operation(op.clone());
    vm.save(&manifest, &guard)?;

    let graph_file_children = file_children(&qmp).await?;
    // The key of an encrypted repository, for the chain under the disks until streaming ends ([`finish`]).
    crate::crypt::unlock::add_secret(&qmp).await?;
    for ((i, d), bitmap) in targets.iter().zip(&bitmaps) {
        let chain = graph::add_chain(
            &qmp,
            &vm,
            &manifest,
            &node.id,
            &d.id,
            &format!("{}-", name("l", *i)),
        )
        .await?;
        let file = graph_file_children
            .iter()
            .find(|(parent, _)| parent == &d.node_name)
            .map(|(_, child)| child.clone())
            .with_context(|| format!("cannot find the file child of block node {}", d.node_name))?;
        let top = chain.top().context("empty recovery chain")?;
        let options = json!({ "driver": d.format, "node-name": d.node_name, "file": file, "backing": top });
        qmp.execute(&BlockdevReopen {
            options: vec![options],
        })
        .await
        .with_context(|| format!("putting node {}'s chain under disk {}", node.id, d.id))?;
        qmp.execute(&BlockDirtyBitmapAdd {
            persistent: Some(d.bitmaps_persist),
            ..BlockDirtyBitmapAdd::new(d.node_name.as_str(), bitmap.as_str())
        })
        .await
        .context("adding the dirty bitmap for the next backup")?;
    }
    let status = qmp.execute(&QueryStatus).await?;
    if !status.running {
        qmp.execute(&Cont).await.context("resuming the VM")?;
    }
    let running_after = started.elapsed().as_secs_f64();
    progress.phase(&format!(
        "VM running on node {} after {running_after:.2} s; streaming the data in",
        node.id
    ));

    for (i, d) in &targets {
        let mut job = BlockStream::new(name("s", *i), d.node_name.as_str());
        if opts.speed_limit > 0 {
            job.speed = Some(opts.speed_limit);
        }
        qmp.execute(&job)
            .await
            .with_context(|| format!("streaming disk {}", d.id))?;
    }
    crate::crashpoint::crashpoint("restore-streaming");

    let finish = crate::recovery::live::finish(&qmp, &op, progress);
    tokio::select! {
        result = finish => result?,
        () = interrupt.wait() => {
            return Err(Exit::new(ExitCode::Interrupted, format!(
                "interrupted: the VM runs on the restored data and streaming goes on inside QEMU; \
                 `qmpbak cleanup --socket {} --repo {} --vm {}` finishes it",
                opts.qmp, opts.repo.display(), opts.vm)).into());
        }
    }
    manifest.remove_operation(&op.id);
    vm.save(&manifest, &guard)?;
    Ok(LiveReport {
        vm: opts.vm.clone(),
        node: node.id.to_string(),
        disks,
        running_after_secs: running_after,
        duration_secs: started.elapsed().as_secs_f64(),
    })
}

/// `(parent node, file child node)` pairs from QEMU's block graph.
async fn file_children(qmp: &qmp::Qmp) -> Result<Vec<(String, String)>> {
    let graph = qmp
        .execute(&XDebugQueryBlockGraph)
        .await
        .context("reading QEMU's block graph (x-debug-query-block-graph)")?;
    let name_of = |id: u64| graph.nodes.iter().find(|n| n.id == id).map(|n| n.name.clone());
    Ok(graph
        .edges
        .iter()
        .filter(|e| e.name == "file")
        .filter_map(|e| Some((name_of(e.parent)?, name_of(e.child)?)))
        .collect())
}
