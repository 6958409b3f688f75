//! `qmpbak prune` (thin a VM's backup tree out by a retention policy) and `qmpbak merge NODE` (fold a node's
//! recovery chain into a synthetic full). Both work offline, on the repository alone.

use std::io::IsTerminal as _;

use anyhow::Result;

use super::args::RepoVm;
use super::bars::Bars;
use qmpbak::merge::{self, MergeOptions};

use qmpbak::prune::{self, PruneOptions, PruneReport};
use qmpbak::render::bytes;

#[derive(clap::Args)]
#[command(group(
    clap::ArgGroup::new("policy")
        .required(true)
        .multiple(true)
        .args(["keep_last", "keep_daily", "keep_weekly", "keep_monthly", "keep_tag"])
))]
pub struct Args {
    #[command(flatten)]
    target: RepoVm,
    /// Keep the N newest backups of each branch (a branch: the path from a full to a leaf of the tree).
    #[arg(long, value_name = "N")]
    keep_last: Option<u32>,
    /// Keep the newest backup of each of the last D days that have backups (UTC), per branch.
    #[arg(long, value_name = "D")]
    keep_daily: Option<u32>,
    /// Keep the newest backup of each of the last W ISO weeks that have backups, per branch.
    #[arg(long, value_name = "W")]
    keep_weekly: Option<u32>,
    /// Keep the newest backup of each of the last M months that have backups, per branch.
    #[arg(long, value_name = "M")]
    keep_monthly: Option<u32>,
    /// Keep every tagged backup.
    #[arg(long)]
    keep_tag: bool,
    /// Print the plan and change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Print one JSON result (the plan and the bytes freed).
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
pub struct MergeArgs {
    /// Node id or tag to turn into a full.
    node: String,
    #[command(flatten)]
    target: RepoVm,
    /// Print one JSON result.
    #[arg(long)]
    json: bool,
}

pub fn run(args: &Args) -> Result<()> {
    let _key = args.target.unlock()?;
    let opts = PruneOptions {
        repo: args.target.repo.clone(),
        vm: args.target.vm.clone(),
        policy: chain::Policy {
            keep_last: args.keep_last.unwrap_or(0),
            keep_daily: args.keep_daily.unwrap_or(0),
            keep_weekly: args.keep_weekly.unwrap_or(0),
            keep_monthly: args.keep_monthly.unwrap_or(0),
            keep_tagged: args.keep_tag,
        },
        dry_run: args.dry_run,
        lock_wait: args.target.lock.lock_wait(),
    };
    let progress = Bars::new(!args.json && std::io::stderr().is_terminal());
    let report = prune::prune(&opts, &progress);
    progress.clear();
    let report = report?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_plan(&report);
    }
    Ok(())
}

fn print_plan(report: &PruneReport) {
    println!(
        "{:<6} {:<12} {:<19}  {:<28} WHY",
        "NODE", "KIND", "CREATED", "ACTION"
    );
    for d in &report.plan {
        let action = if d.into.is_empty() {
            d.action.to_string()
        } else {
            let into: Vec<&str> = d.into.iter().map(chain::NodeId::as_str).collect();
            format!("{} {}", d.action, into.join(","))
        };
        let why: Vec<String> = d.why.iter().map(ToString::to_string).collect();
        println!(
            "{:<6} {:<12} {:<19}  {:<28} {}",
            d.node.as_str(),
            d.kind.to_string(),
            d.created.format("%Y-%m-%d %H:%M:%S"),
            action,
            why.join("; ")
        );
    }
    if !report.leftovers.operations.is_empty() {
        println!(
            "finished interrupted operation(s) {} first: removed {} leftover file(s), {}",
            report.leftovers.operations.join(", "),
            report.leftovers.files.len(),
            bytes(report.leftovers.freed_bytes)
        );
    }
    let merged = report.merged.len();
    if report.dry_run {
        println!(
            "dry run: nothing was changed; {} node(s) would go ({merged} merged into their children), up to {}",
            report.removed.len(),
            bytes(report.removed_bytes)
        );
    } else if report.removed.is_empty() {
        println!("nothing to prune in VM {}", report.vm);
    } else {
        let freed = if report.freed_bytes >= 0 {
            bytes(report.freed_bytes.unsigned_abs())
        } else {
            format!("-{}", bytes(report.freed_bytes.unsigned_abs()))
        };
        println!(
            "removed {} node(s) of VM {} ({merged} merged into their children): freed {freed} (files removed {}, \
             children grew {}); `qmpbak verify` re-reads what stays",
            report.removed.len(),
            report.vm,
            bytes(report.removed_bytes),
            bytes(report.added_bytes)
        );
    }
}

pub async fn merge(args: MergeArgs) -> Result<()> {
    let _key = args.target.unlock()?;
    let opts = MergeOptions {
        repo: args.target.repo.clone(),
        vm: args.target.vm.clone(),
        node: args.node,
        lock_wait: args.target.lock.lock_wait(),
    };
    let progress = Bars::new(!args.json && std::io::stderr().is_terminal());
    let report = merge::merge(&opts, &progress).await;
    progress.clear();
    let report = report?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else if report.previous_parent.is_none() {
        println!(
            "node {} of {} is a full already: nothing to merge",
            report.node, report.vm
        );
    } else {
        println!(
            "node {} of {} is now a full: folded {} into it; its files grew by {}",
            report.node,
            report.vm,
            report.folded.join(", "),
            bytes(report.added_bytes.max(0).unsigned_abs())
        );
    }
    Ok(())
}
