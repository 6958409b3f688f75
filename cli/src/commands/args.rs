//! Arguments several subcommands share: which repository and VM, and how to treat a held lock.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;

use qmpbak_engine::exit::Exit;
use qmpbak_engine::qmp_target::QmpTarget;

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
    pub fn unlock(&self) -> Result<Option<qmpbak_engine::crypt::KeyGuard>> {
        let repo = chain::Repository::open(&self.repo)?;
        qmpbak_engine::crypt::unlock(&repo, self.key.source().as_ref())
    }

    /// Opens the repository and the VM's store (which must exist).
    pub fn open(&self) -> Result<(chain::Repository, chain::VmStore)> {
        let repo = chain::Repository::open(&self.repo)?;
        let vm = repo.vm(&self.vm)?;
        Ok((repo, vm))
    }
}

/// `--socket SOCK | --qmp URL, --repo REPO --vm NAME [--wait]`: a running VM and its chain in a repository.
#[derive(clap::Args, Debug, Clone)]
pub struct LiveVm {
    /// QEMU's QMP socket (the same as `--qmp unix:PATH`).
    #[arg(long, required_unless_present = "qmp", conflicts_with = "qmp")]
    pub socket: Option<PathBuf>,
    /// QEMU's QMP monitor: `unix:PATH`, `tls://HOST:PORT` (with --tls-dir) or `tcp://HOST:PORT` (with
    /// --insecure-plaintext).
    #[arg(long, value_name = "URL")]
    pub qmp: Option<qmp::Endpoint>,
    /// Directory with TLS credentials in the layout of QEMU's tls-creds-x509 (ca-cert.pem, client-cert.pem,
    /// client-key.pem), for `--qmp tls://` and for NBD over TCP.
    #[arg(long, value_name = "DIR")]
    pub tls_dir: Option<PathBuf>,
    /// Allow plaintext TCP for QMP and NBD (tests and trusted networks only).
    #[arg(long)]
    pub insecure_plaintext: bool,
    #[command(flatten)]
    pub target: RepoVm,
}

impl LiveVm {
    /// How to reach the VM's QEMU (clap makes sure one of `--socket` and `--qmp` is there).
    pub fn qmp_target(&self) -> Result<QmpTarget> {
        QmpTarget::from_args(
            self.socket.clone(),
            self.qmp.clone(),
            self.tls_dir.clone(),
            self.insecure_plaintext,
        )?
        .ok_or_else(|| Exit::usage("give --socket PATH or --qmp URL").into())
    }
}

/// `--socket SOCK | --qmp URL [--tls-dir DIR] [--insecure-plaintext]`: QEMU's QMP monitor, for commands that
/// need no repository (`info`, `qmp`) or may go without one (`cleanup`). Which of the two is required is the
/// command's choice ([`Monitor::target`]).
#[derive(clap::Args, Debug, Clone)]
pub struct Monitor {
    /// QEMU's QMP socket (`-qmp unix:PATH,server=on,wait=off`; the same as `--qmp unix:PATH`).
    #[arg(long, conflicts_with = "qmp")]
    pub socket: Option<PathBuf>,
    /// QEMU's QMP monitor: `unix:PATH`, `tls://HOST:PORT` (with --tls-dir) or `tcp://HOST:PORT` (with
    /// --insecure-plaintext).
    #[arg(long, value_name = "URL")]
    pub qmp: Option<qmp::Endpoint>,
    /// Directory with TLS credentials in the layout of QEMU's tls-creds-x509 (ca-cert.pem, client-cert.pem,
    /// client-key.pem), for `--qmp tls://`.
    #[arg(long, value_name = "DIR")]
    pub tls_dir: Option<PathBuf>,
    /// Allow plaintext TCP for QMP (tests and trusted networks only).
    #[arg(long)]
    pub insecure_plaintext: bool,
}

impl Monitor {
    /// The monitor, if `--socket` or `--qmp` was given.
    pub fn target(&self) -> Result<Option<QmpTarget>> {
        QmpTarget::from_args(
            self.socket.clone(),
            self.qmp.clone(),
            self.tls_dir.clone(),
            self.insecure_plaintext,
        )
    }

    /// The monitor, which the command cannot do without.
    pub fn required(&self) -> Result<QmpTarget> {
        self.target()?
            .ok_or_else(|| Exit::usage("give --socket PATH or --qmp URL").into())
    }
}

/// How this host serves a node's chain over TCP (a live restore across hosts, and cleanup finishing one).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ServeArgs {
    /// TLS credentials for serving the backup over NBD, in QEMU's server layout (ca-cert.pem,
    /// server-cert.pem, server-key.pem; the certificate names this host's address); the VM's QEMU must present
    /// a client certificate of that CA. Without it, only with --insecure-plaintext.
    #[arg(long, value_name = "DIR")]
    pub serve_tls_dir: Option<PathBuf>,
    /// Address and port of this host to serve the backup on (default: the address that reaches the --qmp host,
    /// a free port). Never every address.
    #[arg(long, value_name = "IP:PORT")]
    pub serve_listen: Option<std::net::SocketAddr>,
}

impl ServeArgs {
    /// The credentials, the directory made absolute (QEMU is given it).
    pub fn credentials(&self, insecure_plaintext: bool) -> Result<qmpbak_engine::serve::ServeCredentials> {
        let tls_dir = match &self.serve_tls_dir {
            Some(dir) => Some(
                std::fs::canonicalize(dir)
                    .map_err(|e| Exit::usage(format!("--serve-tls-dir {}: {e}", dir.display())))?,
            ),
            None => None,
        };
        Ok(qmpbak_engine::serve::ServeCredentials {
            tls_dir,
            insecure_plaintext,
        })
    }
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
    pub fn source(&self) -> Option<qmpbak_engine::crypt::KeySource> {
        qmpbak_engine::crypt::KeySource::choose(self.file.clone(), self.fd, self.env.clone())
    }
}
