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
    #[command(flatten)]
    pub key: KeyArgs,
}

impl RepoVm {
    /// Unlocks an encrypted repository with the key given ([`KeyArgs`]) for as long as the guard lives; a
    /// repository that is not encrypted needs none.
    pub fn unlock(&self) -> Result<Option<qmpbak::crypt::KeyGuard>> {
        let repo = chain::Repository::open(&self.repo)?;
        qmpbak::crypt::unlock(&repo, self.key.source().as_ref())
    }

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
    /// Directory with TLS credentials in the layout of QEMU's tls-creds-x509 (ca-cert.pem, client-cert.pem,
    /// client-key.pem), for `--qmp tls://` and for NBD over TCP.
    #[arg(long, value_name = "DIR")]
    pub tls_dir: Option<PathBuf>,
    /// Allow plaintext TCP for QMP and NBD (tests and trusted networks only).
    #[arg(long)]
    pub insecure_plaintext: bool,
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

/// `--key-file FILE | --key-fd N | --key-env NAME`: the key of an encrypted repository (else `QMPBAK_KEY`).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct KeyArgs {
    /// Read the key of an encrypted repository from FILE (also a systemd credential:
    /// `$CREDENTIALS_DIRECTORY/NAME`). One trailing newline is ignored. Without any key option, the
    /// environment variable QMPBAK_KEY holds the key, when set.
    #[arg(long = "key-file", value_name = "FILE", group = "key")]
    pub file: Option<PathBuf>,
    /// Read the key from open file descriptor N (e.g. a pipe).
    #[arg(long = "key-fd", value_name = "N", group = "key")]
    pub fd: Option<u32>,
    /// Read the key from environment variable NAME.
    #[arg(long = "key-env", value_name = "NAME", group = "key")]
    pub env: Option<String>,
}

impl KeyArgs {
    pub fn source(&self) -> Option<qmpbak::crypt::KeySource> {
        qmpbak::crypt::KeySource::choose(self.file.clone(), self.fd, self.env.clone())
    }
}
