//! Live (instant) restore into a running QEMU whose disks are empty images of the right size (typically
//! started paused with `-S`; proven empty first, [`super::empty`]): each disk gets the node's recovery chain as its backing (`blockdev-reopen`), the
//! VM resumes at once, and `block-stream` copies the data into the VM's own images behind it. Guest writes win:
//! streaming only fills clusters the guest has not written. When streaming ends the chain is removed and the
//! VM depends on nothing in the repository.
//!
//! The chain comes from the repository opened by the VM's QEMU itself, or, across hosts, from this host's NBD
//! server ([`super::backing`] holds that difference).
//!
//! If qmpbak dies while streaming, the VM keeps running on the chain; the operation record lets
//! `qmpbak cleanup --socket` (or any later command on the VM) finish it. Across hosts the server dies with
//! qmpbak: the streams pause on the read errors (`on-error: stop`), the VM's NBD client reconnects for
//! `reconnect-delay` seconds and then fails the guest's reads of blocks not yet streamed, and `qmpbak cleanup
//! --qmp … --serve-tls-dir …` on the backup host restarts the server on the recorded address and finishes.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use qmp::commands::{
    BlockDirtyBitmapAdd, BlockDirtyBitmapRemove, BlockJobSetSpeed, BlockStream, BlockdevReopen, Cont,
    QueryStatus, XDebugQueryBlockGraph,
};
use serde::{Deserialize, Serialize};
use serde_json::json;

use chain::{BitmapRecord, LockWait, Operation, Payload};

use super::backing::Backing;
pub use super::backing::{ServedOptions, Source};

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
    /// Where the VM's QEMU reads the chain from.
    pub source: Source,
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

/// Removes every qmpbak bitmap of target disk `d` (of any chain, any repository's) before the restore puts
/// data under it: the stream job's writes mark no bitmap, so after the restore each would say that nothing
/// changed since a backup whose content the disk no longer has, and an incremental or differential on it would
/// miss everything the restore brought in. Such bitmaps were left on an empty image, a copy of a disk taken
/// while it was empty, say. Without them the next backup of that chain is a checksum-diff or a full. Another
/// tool's bitmaps are not qmpbak's to remove: each gets a warning, as it no longer records what changed.
async fn drop_stale_bitmaps(qmp: &qmp::Qmp, d: &inspect::DiskInfo, progress: &dyn Progress) -> Result<()> {
    for b in &d.bitmaps {
        if BitmapName::parse(&b.name).is_some() {
            qmp.execute(&BlockDirtyBitmapRemove::new(
                d.node_name.as_str(),
                b.name.as_str(),
            ))
            .await
            .with_context(|| format!("removing the stale bitmap {} of disk {}", b.name, d.id))?;
            tracing::info!(disk = %d.id, bitmap = %b.name, "removed a qmpbak bitmap the restore makes stale");
        } else {
            progress.warning(&format!(
                "disk {}'s bitmap {} (not qmpbak's) does not record the data this restore brings in: whoever \
                 uses it must take a full copy next",
                d.id, b.name
            ));
        }
    }
    Ok(())
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
    // Across hosts the VM's QEMU reads nothing of the repository: this host serves the chain.
    let local = match opts.source {
        Source::Local => Some(crate::qmp_target::Local::QemuReadsRepository),
        Source::Served(_) => None,
    };
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
        local,
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

    // A block the image holds would hide the backup's: prove each disk empty before anything changes.
    let checked: Vec<&inspect::DiskInfo> = targets.iter().map(|(_, d)| d).collect();
    let (listen, tls_creds) = match &opts.source {
        Source::Served(served) => (served.nbd_listen.as_deref(), served.tls_creds.as_deref()),
        Source::Local => (None, None),
    };
    let record = super::empty::Record {
        vm: &vm,
        manifest: &mut manifest,
        guard: &guard,
    };
    super::empty::require_empty(&qmp, &opts.qmp, listen, tls_creds, &checked, record).await?;
    // A signal during the check: nothing in the VM has changed yet, so stop here.
    if interrupt.arrived().await {
        return Err(Exit::new(
            ExitCode::Interrupted,
            "interrupted before anything changed in the VM (the target disks were checked empty and are untouched)",
        )
        .into());
    }

    let mut backing = Backing::prepare(&opts.source, &opts.qmp, &qmp, &node.id).await?;
    let before = manifest.clone();
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
    let mut op = Operation::new(
        Payload::LiveRestore { served: None },
        Some(node.id.clone()),
        chrono::Utc::now(),
    );
    op.id = format!("restore-{}", node.id);
    op.pid = std::process::id();
    backing.record(&mut op, &manifest, &node.id, &disks)?;
    for ((i, d), bitmap) in targets.iter().zip(&bitmaps) {
        op.jobs.push(name("s", *i));
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

    // Until a disk takes the chain as backing, a failure leaves the VM and the manifest as they were.
    let attached = async {
        let graph_file_children = file_children(&qmp).await?;
        let tops = backing.attach(&qmp, &vm, &manifest, &node.id, &disks).await?;
        let mut files = Vec::new();
        for (_, d) in &targets {
            let file = graph_file_children
                .iter()
                .find(|(parent, _)| parent == &d.node_name)
                .map(|(_, child)| child.clone())
                .with_context(|| format!("cannot find the file child of block node {}", d.node_name))?;
            files.push(file);
        }
        anyhow::Ok((tops, files))
    }
    .await;
    let (tops, files) = match attached {
        Ok(attached) => attached,
        Err(e) => {
            backing.detach(&qmp, &manifest, &node.id, disks.len()).await;
            vm.save(&before, &guard)?;
            return Err(e);
        }
    };
    // From the first reopen on the VM reads from the chain: a failure can no longer be undone.
    let mut reopened_any = false;
    let mut running_after = 0.0;
    let begun: Result<()> = async {
        for (((_, d), bitmap), (top, file)) in targets.iter().zip(&bitmaps).zip(tops.iter().zip(&files)) {
            drop_stale_bitmaps(&qmp, d, progress).await?;
            let options =
                json!({ "driver": d.format, "node-name": d.node_name, "file": file, "backing": top });
            qmp.execute(&BlockdevReopen {
                options: vec![options],
            })
            .await
            .with_context(|| format!("putting node {}'s chain under disk {}", node.id, d.id))?;
            reopened_any = true;
            crate::crashpoint::fail_point("restore-bitmap-add")
                .context("adding the dirty bitmap for the next backup")?;
            qmp.execute(&BlockDirtyBitmapAdd {
                persistent: Some(d.bitmaps_persist),
                ..BlockDirtyBitmapAdd::new(d.node_name.as_str(), bitmap.as_str())
            })
            .await
            .context("adding the dirty bitmap for the next backup")?;
        }
        crate::crashpoint::crashpoint("restore-attached");
        let status = qmp.execute(&QueryStatus).await?;
        if !status.running {
            qmp.execute(&Cont).await.context("resuming the VM")?;
        }
        running_after = started.elapsed().as_secs_f64();
        progress.phase(&format!(
            "VM running on node {} after {running_after:.2} s; streaming the data in",
            node.id
        ));
        for (i, d) in &targets {
            let mut job = BlockStream::new(name("s", *i), d.node_name.as_str());
            if opts.speed_limit > 0 {
                job.speed = Some(opts.speed_limit);
            }
            if backing.is_served() {
                // A read error over the network (the server gone a while) pauses the job instead of failing
                // it, so that it can go on once the server is back (`recovery::live::finish` resumes it).
                job.on_error = Some("stop".to_owned());
            }
            qmp.execute(&job)
                .await
                .with_context(|| format!("streaming disk {}", d.id))?;
        }
        Ok(())
    }
    .await;
    if let Err(e) = begun {
        if !reopened_any {
            backing.detach(&qmp, &manifest, &node.id, disks.len()).await;
            vm.save(&before, &guard)?;
            return Err(e);
        }
        if !backing.is_served() {
            // The chain stays where it is, in the repository: the record lets cleanup finish.
            return Err(e);
        }
        // Across hosts the chain leaves with this process: stream what a disk reads from it before that.
        return match crate::recovery::live::finish(&qmp, &op, progress).await {
            Ok(()) => {
                backing.release(&qmp).await;
                manifest.remove_operation(&op.id);
                vm.save(&manifest, &guard)?;
                Err(e.context(
                    "the live restore failed after the VM took the served chain; the disks were streamed all the \
                     same and the VM no longer depends on this host",
                ))
            }
            Err(f) => Err(e.context(format!(
                "the live restore failed after the VM took the served chain, and streaming it failed too ({f:#}); \
                 `qmpbak cleanup --qmp … --serve-tls-dir …` on this host finishes it"
            ))),
        };
    }
    crate::crashpoint::crashpoint("restore-streaming");

    let finish = crate::recovery::live::finish(&qmp, &op, progress);
    tokio::pin!(finish);
    let mut interrupted = false;
    tokio::select! {
        result = &mut finish => result?,
        () = backing.server_exited() => {
            // The record stays: cleanup serves the chain again and finishes.
            bail!(Exit::new(ExitCode::Failure, format!(
                "this host's NBD server of the chain exited while the VM still reads from it: its reads of the \
                 blocks not streamed yet fail until `qmpbak cleanup --qmp {} --repo {} --vm {} --serve-tls-dir …` \
                 (or --insecure-plaintext) on this host serves the chain again and finishes the restore",
                opts.qmp, opts.repo.display(), opts.vm)));
        }
        () = interrupt.wait() => {
            if !backing.is_served() {
                return Err(Exit::new(ExitCode::Interrupted, format!(
                    "interrupted: the VM runs on the restored data and streaming goes on inside QEMU; \
                     `qmpbak cleanup --socket {} --repo {} --vm {}` finishes it",
                    opts.qmp, opts.repo.display(), opts.vm)).into());
            }
            // The VM reads the blocks not streamed yet from this process's server: stopping now would take them
            // away. Stream at full speed and finish first.
            interrupted = true;
            progress.phase("interrupted: the VM reads unstreamed data from this host; finishing the streams \
                            at full speed first");
            for job in &op.jobs {
                let _ = qmp.execute(&BlockJobSetSpeed { device: job.clone(), speed: 0 }).await;
            }
            finish.await?;
        }
    }
    backing.release(&qmp).await;
    manifest.remove_operation(&op.id);
    vm.save(&manifest, &guard)?;
    if interrupted {
        return Err(Exit::new(
            ExitCode::Interrupted,
            "interrupted: the restore was finished first (the VM depended on this host's server); the VM no \
             longer depends on the backup",
        )
        .into());
    }
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
