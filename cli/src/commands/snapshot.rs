//! `qmpbak snapshot` and `qmpbak revert`: cheap time points by external snapshot, and going back to one.

use anyhow::Result;

use super::args::LiveVm;
use super::bars::Bars;
use qmpbak_engine::qmp_target::Local;
use qmpbak_engine::snapshot::{self, RevertOptions, SnapshotOptions};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    vm: LiveVm,
    /// A name for the time point, usable wherever a node id is (unique per VM).
    #[arg(long)]
    tag: Option<String>,
    /// Also copy the frozen increments into the repository, so the time point survives the loss of the VM's
    /// storage (takes as long as the copy); in an encrypted repository they are encrypted there, with its key.
    #[arg(long)]
    copy: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub async fn run(args: Args) -> Result<()> {
    // Overlays are made and checked beside the VM's disks, and a copy is read by QEMU into the repository.
    let qmp = args.vm.qmp_target()?;
    qmp.require_local("snapshot", Local::FilesBesideDisks, &args.vm.target.repo)?;
    // A copy into an encrypted repository is encrypted with its key; a time point without a copy writes no data
    // into the repository and needs none (a key given is checked all the same).
    let _key = if args.copy || args.vm.target.key.source().is_some() {
        args.vm.target.unlock()?
    } else {
        None
    };
    let opts = SnapshotOptions {
        qmp: qmp.clone(),
        repo: args.vm.target.repo,
        vm: args.vm.target.vm,
        tag: args.tag,
        copy: args.copy,
        lock_wait: args.vm.target.lock.lock_wait(),
    };
    let report = snapshot::snapshot(&opts, &Bars::new(false)).await?;
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&report)?)?;
    } else {
        outln!(
            "time point {} of {} taken in {:.1} ms{}",
            report.node,
            report.vm,
            report.transaction_ms,
            report
                .parent
                .as_ref()
                .map_or_else(String::new, |p| format!(" (after {p})"))
        )?;
        for d in &report.disks {
            outln!(
                "  disk {}: frozen {}, writes go to {}",
                d.disk,
                d.frozen.display(),
                d.overlay.display()
            )?;
        }
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct RevertArgs {
    /// The time point: node id or tag.
    node: String,
    #[command(flatten)]
    vm: LiveVm,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub async fn revert(args: RevertArgs) -> Result<()> {
    let qmp = args.vm.qmp_target()?;
    qmp.require_local("revert", Local::FilesBesideDisks, &args.vm.target.repo)?;
    let opts = RevertOptions {
        qmp: qmp.clone(),
        repo: args.vm.target.repo,
        vm: args.vm.target.vm,
        node: args.node,
        lock_wait: args.vm.target.lock.lock_wait(),
    };
    let report = snapshot::revert(&opts).await?;
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&report)?)?;
    } else {
        outln!(
            "{} continues from time point {} ({:.2} s)",
            report.vm,
            report.node,
            report.duration_secs
        )?;
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct CommitArgs {
    /// The time point whose increment is merged into its parent's file (node id or tag).
    node: String,
    #[command(flatten)]
    vm: LiveVm,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub async fn commit(args: CommitArgs) -> Result<()> {
    let qmp = args.vm.qmp_target()?;
    qmp.require_local("commit", Local::FilesBesideDisks, &args.vm.target.repo)?;
    // Needed when a copied time point's copy must absorb its parent's copy (encrypted repositories).
    let _key = if args.vm.target.key.source().is_some() {
        args.vm.target.unlock()?
    } else {
        None
    };
    let opts = qmpbak_engine::commit::CommitOptions {
        qmp: qmp.clone(),
        repo: args.vm.target.repo,
        vm: args.vm.target.vm,
        node: args.node,
        lock_wait: args.vm.target.lock.lock_wait(),
    };
    let report = qmpbak_engine::commit::commit(&opts, &Bars::new(false)).await?;
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&report)?)?;
    } else {
        outln!(
            "time point {} now lives in the files of {}, which left the tree{} ({:.1} s)",
            report.node,
            report.removed,
            report
                .removed_tag
                .as_ref()
                .map_or_else(String::new, |t| format!(" with its tag {t}")),
            report.duration_secs
        )?;
    }
    Ok(())
}
