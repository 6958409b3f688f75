//! `qmpbak policy REPO [--keep-...] [--clear]`: show or set the repository's default retention, the one a
//! plain `qmpbak prune` applies; and the `--keep-...` options that `prune`, `init` and `policy` share.

use std::path::PathBuf;

use anyhow::{Result, bail};

use qmpbak_engine::exit::Exit;
use qmpbak_engine::repo_reports::PolicyReport;

/// `--keep-last N --keep-daily D --keep-weekly W --keep-monthly M --keep-tag` (named as the options).
#[allow(clippy::struct_field_names)]
#[derive(clap::Args, Debug, Clone, Default)]
pub struct KeepArgs {
    /// Keep the N newest backups of each branch (a branch: the path from a full to a leaf of the tree).
    #[arg(long, value_name = "N")]
    pub keep_last: Option<u32>,
    /// Keep the newest backup of each of the last D days that have backups (UTC), per branch.
    #[arg(long, value_name = "D")]
    pub keep_daily: Option<u32>,
    /// Keep the newest backup of each of the last W ISO weeks that have backups, per branch.
    #[arg(long, value_name = "W")]
    pub keep_weekly: Option<u32>,
    /// Keep the newest backup of each of the last M months that have backups, per branch.
    #[arg(long, value_name = "M")]
    pub keep_monthly: Option<u32>,
    /// Keep every tagged backup.
    #[arg(long)]
    pub keep_tag: bool,
}

impl KeepArgs {
    /// The policy these options give; `None` when no option was given.
    pub fn policy(&self) -> Option<chain::Policy> {
        let given = self.keep_last.is_some()
            || self.keep_daily.is_some()
            || self.keep_weekly.is_some()
            || self.keep_monthly.is_some()
            || self.keep_tag;
        given.then(|| chain::Policy {
            keep_last: self.keep_last.unwrap_or(0),
            keep_daily: self.keep_daily.unwrap_or(0),
            keep_weekly: self.keep_weekly.unwrap_or(0),
            keep_monthly: self.keep_monthly.unwrap_or(0),
            keep_tagged: self.keep_tag,
        })
    }

    /// The policy given, refusing one that keeps nothing (`--keep-last 0` alone): as a default it would
    /// make every plain prune remove all but the current node.
    pub fn checked_policy(&self) -> Result<Option<chain::Policy>> {
        match self.policy() {
            Some(p) if p.is_empty() => {
                bail!(Exit::usage(
                    "a retention policy that keeps nothing is refused: give a count above 0"
                ))
            }
            other => Ok(other),
        }
    }
}

#[derive(clap::Args)]
pub struct Args {
    /// The repository.
    #[arg(env = "QMPBAK_REPO")]
    repo: PathBuf,
    #[command(flatten)]
    keep: KeepArgs,
    /// Remove the default retention (a plain `qmpbak prune` then refuses to run).
    #[arg(long, conflicts_with_all = ["keep_last", "keep_daily", "keep_weekly", "keep_monthly", "keep_tag"])]
    clear: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(args: &Args) -> Result<()> {
    let mut repo = chain::Repository::open(&args.repo)?;
    let new = args.keep.checked_policy()?;
    if new.is_some() || args.clear {
        let mut settings = repo.settings().clone();
        settings.retention = new;
        repo.save_settings(settings)?;
    }
    let retention = repo.settings().retention;
    if args.json {
        outln!(
            "{}",
            serde_json::to_value(PolicyReport {
                repo: repo.path().to_path_buf(),
                retention,
            })?
        )?;
    } else {
        match retention {
            Some(p) => outln!(
                "retention of {}: {p} (applied by `qmpbak prune` without --keep options)",
                repo.path().display()
            )?,
            None => outln!(
                "{} has no default retention: `qmpbak prune` needs --keep options (set one with `qmpbak policy \
                 {} --keep-daily 7 ...`)",
                repo.path().display(),
                repo.path().display()
            )?,
        }
    }
    Ok(())
}
