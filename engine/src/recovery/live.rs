//! Finishing a live restore: its stream jobs run inside QEMU, and once they end the repository's chain is
//! detached from the VM's disks. A live restore cannot be undone once the VM runs on the chain, so a restore
//! whose qmpbak died is finished from its record, never undone. Across hosts the chain came from the dead
//! qmpbak's NBD server: [`finish_served`] starts it again on the recorded address and port first.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use qmp::commands::{BlockStream, BlockdevDel, JobResume, ObjectDel, XDebugQueryBlockGraph};

use chain::{Manifest, Operation, ServedChain, VmStore};

use crate::progress::Progress;

/// Bound on streaming one disk.
pub const STREAM_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// How long a stream may stay paused on read errors, resumed again and again without progress, before the
/// restore gives up (the VM keeps running on the chain; a later cleanup tries again).
pub const STREAM_STALL_TIMEOUT: Duration = Duration::from_secs(300);
/// How often a stream paused on an error is resumed.
const RESUME_EVERY: Duration = Duration::from_secs(1);

/// Waits for a live restore's stream jobs and detaches the chain. Also used by cleanup to finish a restore whose
/// qmpbak died. A stream paused on a read error (`on-error: stop`, across hosts) is resumed until it makes
/// progress again, for at most [`STREAM_STALL_TIMEOUT`]. A failed stream leaves the chain attached (the VM
/// depends on it) and is an error.
pub async fn finish(qmp: &qmp::Qmp, op: &Operation, progress: &dyn Progress) -> Result<()> {
    // A run killed after a disk took the chain as backing but before its stream started: start it now, or the
    // VM would keep depending on the chain once the record is gone.
    for i in unstreamed(qmp, op).await? {
        let disk = &op.bitmaps[i].node;
        let mut job = BlockStream::new(op.jobs[i].as_str(), disk.as_str());
        job.on_error = Some("stop".to_owned());
        qmp.execute(&job)
            .await
            .with_context(|| format!("streaming the restored data into block node {disk}"))?;
    }
    for job in &op.jobs {
        let Some(info) = qmp.job_info(job).await? else {
            continue;
        };
        let outcome = if info.status == qmp::JobStatus::Concluded {
            qmp.wait_job(job, Duration::from_secs(5)).await?
        } else {
            let wait = qmp.wait_job(job, STREAM_TIMEOUT);
            tokio::pin!(wait);
            let mut ticker = tokio::time::interval(Duration::from_millis(250));
            let mut last = (info.current_progress, Instant::now());
            let mut resumed: Option<Instant> = None;
            loop {
                tokio::select! {
                    outcome = &mut wait => break outcome?,
                    _ = ticker.tick() => {
                        let Ok(Some(now)) = qmp.job_info(job).await else { continue };
                        progress.advance(job, now.current_progress, now.total_progress);
                        if now.current_progress != last.0 {
                            last = (now.current_progress, Instant::now());
                        }
                        if now.status == qmp::JobStatus::Paused {
                            if last.1.elapsed() > STREAM_STALL_TIMEOUT {
                                bail!(
                                    "streaming ({job}) stopped on read errors and made no progress for \
                                     {STREAM_STALL_TIMEOUT:?}; the VM still runs on the backup chain (the job \
                                     is paused): a later `qmpbak cleanup` resumes it"
                                );
                            }
                            if resumed.is_none_or(|at| at.elapsed() >= RESUME_EVERY) {
                                resumed = Some(Instant::now());
                                let _ = qmp.execute(&JobResume::new(job.as_str())).await;
                            }
                        }
                    }
                }
            }
        };
        qmp.dismiss_job(job).await?;
        if let Some(error) = outcome.error {
            bail!("streaming ({job}) failed: {error}; the VM still runs on the backup chain");
        }
        progress.finish_disk(job);
    }
    for node in &op.block_nodes {
        let _ = qmp.execute(&BlockdevDel::new(node.as_str())).await;
    }
    // The chain is gone: so goes the key of an encrypted repository, also when cleanup finishes the restore.
    crate::crypt::unlock::forget_secret(qmp).await;
    Ok(())
}

/// The indexes of the record's disks that still have one of the record's block nodes as backing but no stream
/// job (jobs, disks and bitmaps are recorded in the same order).
async fn unstreamed(qmp: &qmp::Qmp, op: &Operation) -> Result<Vec<usize>> {
    let mut missing = Vec::new();
    for (i, job) in op.jobs.iter().enumerate() {
        if op.bitmaps.get(i).is_some() && qmp.job_info(job).await?.is_none() {
            missing.push(i);
        }
    }
    if missing.is_empty() {
        return Ok(missing);
    }
    let graph = qmp
        .execute(&XDebugQueryBlockGraph)
        .await
        .context("reading QEMU's block graph (x-debug-query-block-graph)")?;
    let driver = |id: u64| {
        graph
            .nodes
            .iter()
            .find(|n| n.id == id && n.node_type == "block-driver")
            .map(|n| n.name.as_str())
    };
    let backed = |disk: &str| {
        graph.edges.iter().any(|e| {
            e.name == "backing"
                && driver(e.parent) == Some(disk)
                && driver(e.child).is_some_and(|c| op.block_nodes.iter().any(|n| n == c))
        })
    };
    Ok(missing
        .into_iter()
        .filter(|&i| backed(&op.bitmaps[i].node))
        .collect())
}

/// Whether a disk of the record still reads from the record's block nodes (a stream to wait for or to start).
async fn depends_on_chain(qmp: &qmp::Qmp, op: &Operation) -> Result<bool> {
    for job in &op.jobs {
        if qmp
            .job_info(job)
            .await?
            .is_some_and(|info| info.status != qmp::JobStatus::Concluded)
        {
            return Ok(true);
        }
    }
    Ok(!unstreamed(qmp, op).await?.is_empty())
}

/// Why a live restore across hosts cannot be finished by this run (`None`: it can): the server must be
/// started again here, with the credentials this command was given.
pub fn served_problem(served: &ServedChain) -> Option<String> {
    let creds = crate::serve::credentials();
    let ok = match &creds {
        None => false,
        Some(c) if served.tls => c.tls_dir.is_some(),
        Some(c) => c.insecure_plaintext,
    };
    (!ok).then(|| {
        format!(
            "its chain was served from {}:{} on the backup host: run `qmpbak cleanup --qmp … {}` there to serve \
             it again and finish",
            served.host,
            served.port,
            if served.tls {
                "--serve-tls-dir DIR"
            } else {
                "--insecure-plaintext"
            }
        )
    })
}

/// Finishes a live restore across hosts whose qmpbak died: serves the node's chain again on the recorded
/// address and port (the VM's NBD client reconnects there), resumes and waits for the streams ([`finish`]),
/// removes the client credentials qmpbak added, stops the server.
pub async fn finish_served(
    qmp: &qmp::Qmp,
    vm: &VmStore,
    manifest: &Manifest,
    op: &Operation,
    served: &ServedChain,
    progress: &dyn Progress,
) -> Result<()> {
    let node = op
        .node
        .as_ref()
        .context("the live restore record names no node")?;
    // A record is data from a file: the address must be one of this host's (binding fails otherwise), never
    // every address.
    let ip: IpAddr = served.host.parse().with_context(|| {
        format!(
            "the record's server address {:?} is not an IP address",
            served.host
        )
    })?;
    if ip.is_unspecified() {
        bail!("the record's server address {ip} is every address: not serving there");
    }
    let running = depends_on_chain(qmp, op).await?;
    let creds = crate::serve::credentials().unwrap_or_default();
    let daemon = if running {
        Some(
            crate::serve::ChainServer::start(
                vm,
                manifest,
                node,
                &served.disks,
                SocketAddr::new(ip, served.port),
                &creds,
            )
            .await
            .context("serving the chain again for the interrupted live restore")?,
        )
    } else {
        None
    };
    let result = finish(qmp, op, progress).await;
    if result.is_ok() {
        if let Some(id) = served
            .creds_object
            .as_ref()
            .filter(|id| id.starts_with(crate::serve::CLIENT_CREDS_PREFIX))
        {
            let _ = qmp.execute(&ObjectDel { id: id.clone() }).await;
        }
    }
    if let Some(daemon) = daemon {
        daemon.stop().await?;
    }
    result
}
