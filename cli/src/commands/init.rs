//! `qmpbak init REPO`: create a new, empty repository.

use std::path::PathBuf;

use anyhow::Result;

#[derive(clap::Args)]
pub struct Args {
    /// Directory of the new repository (created; must not exist or be empty).
    repo: PathBuf,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(args: &Args) -> Result<()> {
    let repo = chain::Repository::init(&args.repo)?;
    let settings = repo.settings();
    if args.json {
        outln!(
            "{}",
            serde_json::json!({
                "repo": repo.path(),
                "block_size": settings.block_size,
                "full_every": settings.full_every,
            })
        )?;
    } else {
        outln!(
            "initialised repository {} (checking-table block size {} KiB, a new full every {} backups)",
            repo.path().display(),
            settings.block_size / 1024,
            settings.full_every
        )?;
    }
    Ok(())
}
