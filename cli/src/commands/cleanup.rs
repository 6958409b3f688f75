//! `qmpbak cleanup`: finish what an interrupted qmpbak left behind for a VM (jobs, block nodes, bitmaps, partial
//! files), and mark its node failed. Every command that changes a VM does this first; this command does only
//! that.

use std::path::PathBuf;

use anyhow::Result;

use super::args::RepoVm;
use qmpbak::{cleanup, inspect};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    target: RepoVm,
    /// QEMU's QMP socket, to remove leftover jobs, block nodes and bitmaps in the running VM too.
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub async fn run(args: Args) -> Result<()> {
    let (_repo, vm) = args.target.open()?;
    let guard = vm.lock_exclusive(args.target.lock.lock_wait(), "cleanup")?;
    let mut manifest = vm.load()?;
    let qmp = match &args.socket {
        Some(socket) => Some(inspect::connect(socket).await?),
        None => None,
    };
    let cleaned = cleanup::recover(qmp.as_ref(), &vm, &mut manifest, &guard).await?;
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&cleaned)?)?;
    } else if cleaned.is_empty() {
        outln!("nothing to clean up for VM {}", manifest.vm)?;
    } else {
        outln!(
            "cleaned up {} interrupted operation(s) of VM {}",
            cleaned.operations.len(),
            manifest.vm
        )?;
        outln!("  jobs: {}", cleaned.jobs.join(", "))?;
        outln!("  block nodes: {}", cleaned.block_nodes.join(", "))?;
        outln!("  bitmaps: {}", cleaned.bitmaps.join(", "))?;
        outln!("  files: {}", cleaned.files.join(", "))?;
        outln!("  nodes marked failed: {}", cleaned.failed_nodes.join(", "))?;
        if qmp.is_none() {
            outln!("  (without --socket, nothing was removed inside QEMU)")?;
        }
    }
    Ok(())
}
