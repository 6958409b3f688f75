//! `qmpbak init REPO`: create a new, empty repository.

use std::path::PathBuf;

use anyhow::Result;

use super::policy::KeepArgs;

#[derive(clap::Args)]
pub struct Args {
    /// Directory of the new repository (created; must not exist or be empty).
    repo: PathBuf,
    /// A default retention, applied by `qmpbak prune` when it is given no --keep options (see `qmpbak policy`).
    #[command(flatten)]
    keep: KeepArgs,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(args: &Args) -> Result<()> {
    let settings = chain::Settings {
        retention: args.keep.checked_policy()?,
        ..chain::Settings::default()
    };
    let repo = chain::Repository::init_with(&args.repo, settings)?;
    let settings = repo.settings();
    if args.json {
        outln!(
            "{}",
            serde_json::json!({
                "repo": repo.path(),
                "block_size": settings.block_size,
                "full_every": settings.full_every,
                "retention": settings.retention,
            })
        )?;
    } else {
        outln!(
            "initialised repository {} (checking-table block size {} KiB, a new full every {} backups)",
            repo.path().display(),
            settings.block_size / 1024,
            settings.full_every
        )?;
        if let Some(policy) = settings.retention {
            outln!("default retention: {policy}")?;
        }
    }
    Ok(())
}
