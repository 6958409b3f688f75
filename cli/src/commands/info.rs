//! `qmpbak info --socket PATH | --qmp URL`: QEMU's version, each disk and its dirty bitmaps.

use std::time::{Duration, Instant};

use anyhow::Result;

use super::args::Monitor;
use qmpbak_engine::inspect;
use qmpbak_engine::qmp_target::QmpTarget;
use qmpbak_engine::render::bytes;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    monitor: Monitor,
    /// Wait up to SECS seconds for the socket to appear and accept (for a QEMU that is still starting).
    #[arg(long, value_name = "SECS")]
    wait_socket: Option<u64>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub async fn run(args: Args) -> Result<()> {
    let target = args.monitor.required()?;
    let qmp = match args.wait_socket {
        Some(secs) => connect_waiting(&target, Duration::from_secs(secs)).await?,
        None => inspect::connect(&target).await?,
    };
    let info = inspect::inspect(&qmp).await?;
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&info)?)?;
        return Ok(());
    }
    outln!("QEMU {} ({})", info.qemu.version, info.qemu.package)?;
    for disk in &info.disks {
        outln!(
            "disk {} ({}): node {}, {} {}, {} virtual, {} allocated{}",
            disk.id,
            disk.id_source.describe(),
            disk.node_name,
            disk.format,
            disk.file,
            bytes(disk.virtual_size),
            disk.allocated_size.map_or_else(|| "?".to_owned(), bytes),
            if disk.read_only { ", read-only" } else { "" }
        )?;
        if disk.removable {
            outln!(
                "  removable medium: backup skips it unless named with --disk {}",
                disk.id
            )?;
        }
        match &disk.bitmaps_volatile_why {
            None => outln!("  bitmaps persist across restarts: yes")?,
            Some(why) => outln!("  bitmaps persist across restarts: no (disk {} {why})", disk.id)?,
        }
        if disk.bitmaps.is_empty() {
            outln!("  no dirty bitmaps")?;
        }
        for b in &disk.bitmaps {
            let mut flags = vec![if b.persistent { "persistent" } else { "transient" }];
            flags.push(if b.recording { "recording" } else { "disabled" });
            if b.busy {
                flags.push("busy");
            }
            if b.inconsistent {
                flags.push("INCONSISTENT");
            }
            outln!(
                "  bitmap {}: {}, granularity {}, {} dirty",
                b.name,
                flags.join(", "),
                bytes(b.granularity),
                bytes(b.count)
            )?;
        }
    }
    for id in &info.empty_drives {
        outln!("drive {id}: no medium")?;
    }
    Ok(())
}

/// Retries the connection until it succeeds or `limit` passes (QEMU creates its socket while starting). A TLS
/// failure is not retried: waiting does not make a certificate trusted.
async fn connect_waiting(target: &QmpTarget, limit: Duration) -> Result<qmp::Qmp> {
    let deadline = Instant::now() + limit;
    loop {
        match inspect::connect(target).await {
            Ok(qmp) => return Ok(qmp),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(e)
                if e.chain()
                    .filter_map(|c| c.downcast_ref::<qmp::Error>())
                    .any(|q| q.kind() == qmp::ErrorKind::Tls) =>
            {
                return Err(e);
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}
