//! `qmpbak completions SHELL` (a completion script on stdout) and the hidden `qmpbak man DIR` (one man page per
//! command, for `scripts/man`): both generated from the clap definitions, so they never drift from `--help`.

use std::io::Write as _;
use std::path::PathBuf;

use anyhow::{Context as _, Result};

#[derive(clap::Args)]
pub struct Args {
    /// The shell to complete for.
    #[arg(value_enum)]
    shell: clap_complete::Shell,
}

#[derive(clap::Args)]
pub struct ManArgs {
    /// Directory to write the pages into (created): qmpbak.1 and qmpbak-COMMAND.1 for each command.
    dir: PathBuf,
}

pub fn run(args: &Args, mut command: clap::Command) -> Result<()> {
    // Generated into memory first: clap_complete panics on a write error (a closed pipe), we report it.
    let mut script = Vec::new();
    clap_complete::generate(args.shell, &mut command, "qmpbak", &mut script);
    let mut out = std::io::stdout().lock();
    match out.write_all(&script).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(e).context("cannot write the completion script to stdout"),
    }
}

pub fn man(args: &ManArgs, command: clap::Command) -> Result<()> {
    std::fs::create_dir_all(&args.dir).with_context(|| format!("cannot create {}", args.dir.display()))?;
    clap_mangen::generate_to(command, &args.dir)
        .with_context(|| format!("cannot write the man pages into {}", args.dir.display()))?;
    let mut pages: Vec<String> = std::fs::read_dir(&args.dir)
        .with_context(|| format!("cannot list {}", args.dir.display()))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".1"))
        .collect();
    pages.sort();
    outln!("wrote {} man page(s) into {}", pages.len(), args.dir.display())?;
    Ok(())
}
