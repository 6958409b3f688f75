//! `qmpbak prune` (thin a VM's backup tree out by a retention policy) and `qmpbak merge NODE` (fold a node's
//! recovery chain into a synthetic full). Both work offline, on the repository alone.

use std::io::IsTerminal as _;

use anyhow::{Result, bail};

use super::args::RepoVm;
use super::bars::Bars;
use super::policy::KeepArgs;
use qmpbak_engine::exit::Exit;
use qmpbak_engine::merge::{self, MergeOptions};

use qmpbak_engine::prune::{self, PruneOptions, PruneReport};
use qmpbak_engine::render::bytes;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    target: RepoVm,
    /// The policy; without any --keep option, the repository's default retention (`qmpbak policy`).
    #[command(flatten)]
    keep: KeepArgs,
    /// Print the plan and change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Print one JSON result (the plan and the bytes freed).
    #[arg(long, conflicts_with = "summary")]
    json: bool,
    /// Print one line, `qmpbak prune VM: OK ...` or `... FAILED (exit N): ...`, for a mail or a monitoring check.
    #[arg(long)]
    summary: bool,
}

impl Args {
    /// `qmpbak prune VM`, when a one-line summary was asked for.
    pub fn summary_subject(&self) -> Option<String> {
        self.summary.then(|| format!("qmpbak prune {}", self.target.vm))
    }
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

/// Where the policy of a prune came from.
fn policy(args: &Args) -> Result<(chain::Policy, &'static str)> {
    if let Some(policy) = args.keep.policy() {
        return Ok((policy, "given"));
    }
    let repo = chain::Repository::open(&args.target.repo)?;
    match repo.settings().retention {
        Some(policy) => Ok((policy, "the repository's default")),
        None => bail!(Exit::usage(format!(
            "prune needs a policy: give --keep-last, --keep-daily, --keep-weekly, --keep-monthly or --keep-tag, or \
             set a default retention for the repository with `qmpbak policy {} --keep-daily 7 ...` \
             (it has none)",
            args.target.repo.display()
        ))),
    }
}

pub async fn run(args: &Args) -> Result<()> {
    let (policy, source) = policy(args)?;
    tracing::info!(%policy, source, "prune policy");
    let _key = args.target.unlock()?;
    let opts = PruneOptions {
        repo: args.target.repo.clone(),
        vm: args.target.vm.clone(),
        policy,
        dry_run: args.dry_run,
        lock_wait: args.target.lock.lock_wait(),
    };
    let progress = Bars::new(!args.json && !args.summary && std::io::stderr().is_terminal());
    let report = stoppable(
        &opts.repo,
        &opts.vm,
        prune::prune(&opts, &progress),
        "prune was stopped; every node left restores exactly",
    )
    .await;
    progress.clear();
    let report = report?;
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&report)?)?;
    } else if args.summary {
        let what = if report.dry_run { "would remove" } else { "removed" };
        outln!(
            "qmpbak prune {}: OK {what} {} node(s), freed {} (policy {policy}, {source})",
            report.vm,
            report.removed.len(),
            signed_bytes(report.freed_bytes)
        )?;
    } else {
        outln!("policy: {policy} ({source})")?;
        print_plan(&report)?;
    }
    Ok(())
}

fn signed_bytes(n: i64) -> String {
    if n >= 0 {
        bytes(n.unsigned_abs())
    } else {
        format!("-{}", bytes(n.unsigned_abs()))
    }
}

fn print_plan(report: &PruneReport) -> Result<(), super::out::StdoutError> {
    outln!(
        "{:<6} {:<12} {:<19}  {:<28} WHY",
        "NODE",
        "KIND",
        "CREATED",
        "ACTION"
    )?;
    for d in &report.plan {
        let action = if d.into.is_empty() {
            d.action.to_string()
        } else {
            let into: Vec<&str> = d.into.iter().map(chain::NodeId::as_str).collect();
            format!("{} {}", d.action, into.join(","))
        };
        let why: Vec<String> = d.why.iter().map(ToString::to_string).collect();
        outln!(
            "{:<6} {:<12} {:<19}  {:<28} {}",
            d.node.as_str(),
            d.kind.to_string(),
            d.created.format("%Y-%m-%d %H:%M:%S"),
            action,
            why.join("; ")
        )?;
    }
    if !report.leftovers.operations.is_empty() {
        outln!(
            "finished interrupted operation(s) {} first: removed {} leftover file(s), {}",
            report.leftovers.operations.join(", "),
            report.leftovers.files.len(),
            bytes(report.leftovers.freed_bytes)
        )?;
    }
    let merged = report.merged.len();
    if report.dry_run {
        outln!(
            "dry run: nothing was changed; {} node(s) would go ({merged} merged into their children), up to {}",
            report.removed.len(),
            bytes(report.removed_bytes)
        )?;
    } else if report.removed.is_empty() {
        outln!("nothing to prune in VM {}", report.vm)?;
    } else {
        let freed = signed_bytes(report.freed_bytes);
        outln!(
            "removed {} node(s) of VM {} ({merged} merged into their children): freed {freed} (files removed {}, \
             children grew {}); `qmpbak verify` re-reads what stays",
            report.removed.len(),
            report.vm,
            bytes(report.removed_bytes),
            bytes(report.added_bytes)
        )?;
    }
    Ok(())
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
    let report = stoppable(
        &opts.repo,
        &opts.vm,
        merge::merge(&opts, &progress),
        "merge was stopped; the node restores exactly as before",
    )
    .await;
    progress.clear();
    let report = report?;
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&report)?)?;
    } else if report.previous_parent.is_none() {
        outln!(
            "node {} of {} is a full already: nothing to merge",
            report.node,
            report.vm
        )?;
    } else {
        outln!(
            "node {} of {} is now a full: folded {} into it; its files grew by {}",
            report.node,
            report.vm,
            report.folded.join(", "),
            bytes(report.added_bytes.max(0).unsigned_abs())
        )?;
    }
    Ok(())
}

/// Runs a prune or merge that SIGINT/SIGTERM may stop ([`qmpbak_engine::signals::Interrupt::run`]); a stopped one has
/// its operation record finished at once ([`prune::finish_interrupted`]).
async fn stoppable<T>(
    repo: &std::path::Path,
    vm: &str,
    work: impl std::future::Future<Output = Result<T>>,
    what: &str,
) -> Result<T> {
    let interrupt = qmpbak_engine::signals::Interrupt::new()?;
    match interrupt.run(work, what).await {
        Err(e) if qmpbak_engine::exit::classify(&e) == qmpbak_engine::exit::ExitCode::Interrupted => {
            Err(prune::finish_interrupted(repo, vm, e))
        }
        other => other,
    }
}
