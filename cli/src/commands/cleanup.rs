//! `qmpbak cleanup`: finish what an interrupted qmpbak left behind for a VM (jobs, block nodes, bitmaps, partial
//! files), and mark its node failed. Every command that changes a VM does this first; this command does only
//! that.

use anyhow::{Result, bail};

use super::args::{Monitor, RepoVm, ServeArgs};
use qmpbak_engine::cleanup::CleanupReport;
use qmpbak_engine::exit::Exit;
use qmpbak_engine::{inspect, recovery};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    target: RepoVm,
    /// QEMU's QMP monitor (`--socket` or `--qmp`), to remove leftover jobs, block nodes and bitmaps in the
    /// running VM too.
    #[command(flatten)]
    monitor: Monitor,
    /// To finish a live restore across hosts whose qmpbak died: how to serve its chain again (on the address
    /// and port the record names).
    #[command(flatten)]
    serve: ServeArgs,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub async fn run(args: Args) -> Result<()> {
    let target = args.monitor.target()?;
    qmpbak_engine::serve::set_credentials(args.serve.credentials(args.monitor.insecure_plaintext)?);
    // An encrypted repository's key, to serve its chain again.
    let _key = if args.serve.serve_tls_dir.is_some() {
        args.target.unlock()?
    } else {
        None
    };
    let (_repo, vm) = args.target.open()?;
    let guard = vm.lock_exclusive(args.target.lock.lock_wait(), "cleanup")?;
    let mut manifest = vm.load()?;
    let qmp = match &target {
        Some(target) => Some(inspect::connect(target).await?),
        None => None,
    };
    let cleaned = recovery::recover(qmp.as_ref(), &vm, &mut manifest, &guard).await?;
    // Mounts of this VM's nodes whose qmpbak was killed while setting them up.
    let mounts = qmpbak_engine::mount::clean_interrupted(&manifest.vm).await?;
    let report = CleanupReport { cleaned, mounts };
    let CleanupReport { cleaned, mounts } = &report;
    if args.json {
        // Through a `Value`, as before the type: its keys print sorted, the same bytes as ever.
        outln!(
            "{}",
            serde_json::to_string_pretty(&serde_json::to_value(&report)?)?
        )?;
        // A record still pending is exit 2 all the same; the report above is the output, not an error object.
        super::mark_report_printed();
    } else {
        print_text(cleaned, mounts, &manifest.vm, qmp.is_some())?;
    }
    if !cleaned.pending.is_empty() {
        bail!(Exit::usage(format!(
            "VM {} still has unfinished operations: {}",
            manifest.vm,
            cleaned.pending.join("; ")
        )));
    }
    Ok(())
}

/// The text report: mounts undone, what was cleaned, and files left in place.
fn print_text(
    cleaned: &recovery::Cleaned,
    mounts: &[qmpbak_engine::mount::UmountReport],
    vm: &str,
    in_qemu: bool,
) -> Result<(), super::out::StdoutError> {
    for m in mounts {
        outln!(
            "undid the interrupted mount of node {} (disk {}) at {}",
            m.node,
            m.disk,
            m.dir.display()
        )?;
    }
    if cleaned.is_empty() {
        outln!("nothing to clean up for VM {vm}")?;
    } else if cleaned.operations.is_empty() {
        outln!("nothing was cleaned up for VM {vm}")?;
    } else {
        outln!(
            "cleaned up {} interrupted operation(s) of VM {vm}",
            cleaned.operations.len()
        )?;
        outln!("  jobs: {}", cleaned.jobs.join(", "))?;
        outln!("  block nodes: {}", cleaned.block_nodes.join(", "))?;
        outln!("  bitmaps: {}", cleaned.bitmaps.join(", "))?;
        outln!("  files: {}", cleaned.files.join(", "))?;
        outln!("  nodes marked failed: {}", cleaned.failed_nodes.join(", "))?;
        if !cleaned.devices_restored.is_empty() {
            outln!(
                "  devices put back on their disks: {}",
                cleaned.devices_restored.join(", ")
            )?;
        }
        if cleaned.resumed_vm {
            outln!("  resumed the VM the interrupted backup had paused")?;
        }
        if cleaned.thawed_guest {
            outln!("  thawed the guest's filesystems the interrupted backup had frozen (--quiesce)")?;
        }
        if !in_qemu {
            outln!("  (without --socket or --qmp, nothing was removed inside QEMU)")?;
        }
    }
    for file in &cleaned.kept_outside {
        outln!("  left in place: {file}")?;
    }
    for what in &cleaned.left_in_qemu {
        outln!("  left in QEMU: {what}")?;
    }
    Ok(())
}
