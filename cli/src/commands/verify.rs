//! `qmpbak verify [NODE...]`: re-read backup files and compare them with their checking tables. Exit code 0
//! when everything verifies, 6 when something is damaged.

use anyhow::{Result, bail};

use super::args::RepoVm;
use qmpbak_engine::exit::{Exit, ExitCode};
use qmpbak_engine::verify::{self, VerifyOptions};

#[derive(clap::Args)]
pub struct Args {
    /// Node ids or tags to verify.
    nodes: Vec<String>,
    /// Verify every complete node (the default when no node is named).
    #[arg(long, conflicts_with = "nodes")]
    all: bool,
    #[command(flatten)]
    target: RepoVm,
    /// Print JSON.
    #[arg(long, conflicts_with = "summary")]
    json: bool,
    /// Print one line, `qmpbak verify VM: OK ...` or `... FAILED (exit N): ...`, for a mail or a monitoring
    /// check.
    #[arg(long)]
    summary: bool,
}

impl Args {
    /// `qmpbak verify VM`, when a one-line summary was asked for.
    pub fn summary_subject(&self) -> Option<String> {
        self.summary.then(|| format!("qmpbak verify {}", self.target.vm))
    }
}

pub async fn run(args: Args) -> Result<()> {
    let _key = args.target.unlock()?;
    let opts = VerifyOptions {
        repo: args.target.repo.clone(),
        vm: args.target.vm.clone(),
        nodes: if args.all { Vec::new() } else { args.nodes },
        lock_wait: args.target.lock.lock_wait(),
    };
    let interrupt = qmpbak_engine::signals::Interrupt::new()?;
    let report = interrupt
        .run(
            verify::verify(&opts),
            "verify was stopped before it finished; nothing was changed",
        )
        .await?;
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&report)?)?;
        super::mark_report_printed();
    } else if !args.summary {
        for node in &report.nodes {
            for d in &node.disks {
                match (&d.error, d.ok) {
                    (Some(e), _) if d.checked => {
                        outln!("node {} disk {}: DAMAGED {e}", node.node, d.disk)?;
                    }
                    (Some(e), _) => outln!("node {} disk {}: NOT CHECKED {e}", node.node, d.disk)?,
                    (None, true) => outln!(
                        "node {} disk {}: ok ({} blocks)",
                        node.node,
                        d.disk,
                        d.blocks_checked
                    )?,
                    (None, false) => {
                        for b in &d.bad_blocks {
                            outln!(
                                "node {} disk {}: BAD block {} (offset {})",
                                node.node,
                                d.disk,
                                b.index,
                                b.offset
                            )?;
                        }
                    }
                }
            }
        }
    }
    if report.damaged_nodes.is_empty() && !report.unchecked_nodes.is_empty() {
        bail!(Exit::new(
            ExitCode::Qemu,
            format!(
                "could not check nodes {}: reading them through qemu-storage-daemon failed (see above), while \
                 their files look sound: this is not damage; run verify again",
                report.unchecked_nodes.join(", ")
            )
        ));
    }
    if !report.ok {
        bail!(Exit::new(
            ExitCode::Damaged,
            format!(
                "damaged: nodes {}; restoring any of {} would give wrong data",
                some_of(&report.damaged_nodes),
                some_of(&report.broken_restores)
            )
        ));
    }
    if args.summary {
        outln!(
            "qmpbak verify {}: OK {} node(s) verified",
            args.target.vm,
            report.nodes.len()
        )?;
    } else if !args.json {
        outln!("verified {} node(s): all ok", report.nodes.len())?;
    }
    Ok(())
}

/// Node ids for a message: all of a few, the first ones of many (the report has them all).
fn some_of(ids: &[String]) -> String {
    const SHOWN: usize = 10;
    if ids.len() <= SHOWN {
        ids.join(", ")
    } else {
        format!("{} … ({} in all)", ids[..SHOWN].join(", "), ids.len())
    }
}
