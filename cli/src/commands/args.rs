//! Arguments several subcommands share: which repository and VM, and how to treat a held lock.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;

/// `--repo REPO --vm NAME`.
#[derive(clap::Args, Debug, Clone)]
pub struct RepoVm {
    /// The backup repository (made with `qmpbak init`).
    #[arg(long, env = "QMPBAK_REPO")]
    pub repo: PathBuf,
    /// The VM's name in the repository.
    #[arg(long)]
    pub vm: String,
    #[command(flatten)]
    pub lock: LockArgs,
}

impl RepoVm {
    /// Opens the repository and the VM's store (which must exist).
    pub fn open(&self) -> Result<(chain::Repository, chain::VmStore)> {
        let repo = chain::Repository::open(&self.repo)?;
        let vm = repo.vm(&self.vm)?;
        Ok((repo, vm))
    }
}

/// `--socket SOCK --repo REPO --vm NAME [--wait]`: a running VM and its chain in a repository.
#[derive(clap::Args, Debug, Clone)]
pub struct LiveVm {
    /// QEMU's QMP socket.
    #[arg(long)]
    pub socket: PathBuf,
    #[command(flatten)]
    pub target: RepoVm,
}

/// `--wait [SECS]`: wait for a held lock instead of failing at once.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct LockArgs {
    /// Wait up to SECS seconds (default: a day) for another qmpbak working on this VM, instead of failing at once.
    #[arg(long, value_name = "SECS", num_args = 0..=1, default_missing_value = "86400")]
    pub wait: Option<u64>,
}

impl LockArgs {
    pub fn lock_wait(&self) -> chain::LockWait {
        match self.wait {
            Some(secs) => chain::LockWait::Wait(Duration::from_secs(secs)),
            None => chain::LockWait::NoWait,
        }
    }
}
