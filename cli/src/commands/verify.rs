//! `qmpbak verify [NODE...]`: re-read backup files and compare them with their checking tables. Exit code 0
//! when everything verifies, 6 when something is damaged.

use anyhow::{Result, bail};

use super::args::RepoVm;
use qmpbak::exit::{Exit, ExitCode};
use qmpbak::verify::{self, VerifyOptions};

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
    #[arg(long)]
    json: bool,
}

pub async fn run(args: Args) -> Result<()> {
    let _key = args.target.unlock()?;
    let opts = VerifyOptions {
        repo: args.target.repo.clone(),
        vm: args.target.vm.clone(),
        nodes: if args.all { Vec::new() } else { args.nodes },
        lock_wait: args.target.lock.lock_wait(),
    };
    let report = verify::verify(&opts).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for node in &report.nodes {
            for d in &node.disks {
                match (&d.error, d.ok) {
                    (Some(e), _) => println!("node {} disk {}: ERROR {e}", node.node, d.disk),
                    (None, true) => println!(
                        "node {} disk {}: ok ({} blocks)",
                        node.node, d.disk, d.blocks_checked
                    ),
                    (None, false) => {
                        for b in &d.bad_blocks {
                            println!(
                                "node {} disk {}: BAD block {} (offset {})",
                                node.node, d.disk, b.index, b.offset
                            );
                        }
                    }
                }
            }
        }
    }
    if !report.ok {
        bail!(Exit::new(
            ExitCode::Damaged,
            format!(
                "damaged: nodes {}; restoring any of {} would give wrong data",
                report.damaged_nodes.join(", "),
                report.broken_restores.join(", ")
            )
        ));
    }
    if !args.json {
        println!("verified {} node(s): all ok", report.nodes.len());
    }
    Ok(())
}
