//! Finishing a live restore: its stream jobs run inside QEMU, and once they end the repository's chain is
//! detached from the VM's disks. A live restore cannot be undone once the VM runs on the chain, so a restore
//! whose qmpbak died is finished from its record, never undone.

use std::time::Duration;

use anyhow::{Result, bail};
use qmp::commands::BlockdevDel;

use chain::Operation;

use crate::progress::Progress;

/// Bound on streaming one disk.
pub const STREAM_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// Waits for a live restore's stream jobs and detaches the chain. Also used by cleanup to finish a restore whose
/// qmpbak died. A failed stream leaves the chain attached (the VM depends on it) and is an error.
pub async fn finish(qmp: &qmp::Qmp, op: &Operation, progress: &dyn Progress) -> Result<()> {
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
            loop {
                tokio::select! {
                    outcome = &mut wait => break outcome?,
                    _ = ticker.tick() => {
                        if let Ok(Some(now)) = qmp.job_info(job).await {
                            progress.advance(job, now.current_progress, now.total_progress);
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
