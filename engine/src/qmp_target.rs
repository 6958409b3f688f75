//! [`QmpTarget`]: how this run reaches the VM's QEMU, as the command line said: a unix socket (`--socket
//! PATH`, or `--qmp unix:PATH`), or a TCP endpoint (`--qmp tls://HOST:PORT` with `--tls-dir`, or `--qmp
//! tcp://HOST:PORT` with `--insecure-plaintext`). [`crate::inspect::connect`] is the one place that connects.
//!
//! A QEMU reached over TCP may run on another host: the paths it names (its images, the files it would
//! open) are not paths on this one. Commands that need that QEMU to open repository files, or that make and
//! check files beside the VM's disks, refuse such a target with [`QmpTarget::require_local`] before they
//! touch anything.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Result;

use crate::exit::Exit;

/// Why a command needs QEMU on this host ([`QmpTarget::require_local`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Local {
    /// QEMU writes files into the repository (a backup, until backups are pulled over NBD).
    QemuWritesRepository,
    /// QEMU opens files in the repository (a live restore, a snapshot's copy).
    QemuReadsRepository,
    /// Files beside the VM's disks are made, judged or removed (time points).
    FilesBesideDisks,
}

/// The VM's QMP monitor and what is needed to reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QmpTarget {
    pub endpoint: qmp::Endpoint,
    /// TLS credentials in the layout of QEMU's `tls-creds-x509,endpoint=client` (for `tls://`).
    pub tls_dir: Option<PathBuf>,
    /// Plaintext TCP is allowed (for `tcp://`).
    pub insecure_plaintext: bool,
}

impl QmpTarget {
    /// A unix socket on this host.
    pub fn unix(path: impl Into<PathBuf>) -> QmpTarget {
        QmpTarget {
            endpoint: qmp::Endpoint::Unix(path.into()),
            tls_dir: None,
            insecure_plaintext: false,
        }
    }

    /// From the command line's `--socket` or `--qmp` (at most one; `None` without either), with
    /// `--tls-dir` and `--insecure-plaintext`. A `tls://` endpoint without `--tls-dir` is a usage error.
    pub fn from_args(
        socket: Option<PathBuf>,
        qmp: Option<qmp::Endpoint>,
        tls_dir: Option<PathBuf>,
        insecure_plaintext: bool,
    ) -> Result<Option<QmpTarget>> {
        let endpoint = match (socket, qmp) {
            (Some(_), Some(_)) => return Err(Exit::usage("give either --socket or --qmp, not both").into()),
            (Some(path), None) => qmp::Endpoint::Unix(path),
            (None, Some(endpoint)) => endpoint,
            (None, None) => return Ok(None),
        };
        if matches!(endpoint, qmp::Endpoint::Tls { .. }) && tls_dir.is_none() {
            return Err(Exit::usage(format!(
                "--qmp {endpoint} needs --tls-dir DIR (ca-cert.pem, client-cert.pem, client-key.pem)"
            ))
            .into());
        }
        Ok(Some(QmpTarget {
            endpoint,
            tls_dir,
            insecure_plaintext,
        }))
    }

    /// Whether QEMU is reached over the network (and so may run on another host).
    pub fn is_remote(&self) -> bool {
        self.endpoint.is_remote()
    }

    /// The host named in a TCP endpoint (the VM's host as this one reaches it); `None` for a unix socket.
    pub fn host(&self) -> Option<&str> {
        match &self.endpoint {
            qmp::Endpoint::Tls { host, .. } | qmp::Endpoint::Tcp { host, .. } => Some(host),
            qmp::Endpoint::Unix(_) => None,
        }
    }

    /// The unix socket, for a local target.
    pub fn socket(&self) -> Option<&Path> {
        match &self.endpoint {
            qmp::Endpoint::Unix(path) => Some(path),
            _ => None,
        }
    }

    /// Refuses (exit 2, before anything is touched) a target over TCP for `command`, which needs the
    /// VM's QEMU to open files in the repository `repo` (`why` says which), or makes and checks files beside
    /// the VM's disks: neither is reachable across hosts.
    pub fn require_local(&self, command: &str, why: Local, repo: &Path) -> Result<()> {
        if !self.is_remote() {
            return Ok(());
        }
        let why = match why {
            Local::QemuWritesRepository => format!(
                "the VM's QEMU writes the backup's files itself, and the repository {} is not reachable by a \
                 QEMU on another host",
                repo.display()
            ),
            Local::QemuReadsRepository => format!(
                "the VM's QEMU opens the node's files in the repository {}, which is not reachable by a QEMU \
                 on another host",
                repo.display()
            ),
            Local::FilesBesideDisks => {
                "it makes and checks files beside the VM's disks, which are on the VM's \
                 host, not this one"
                    .to_owned()
            }
        };
        Err(Exit::usage(format!(
            "{command} cannot work over {}: {why}; run qmpbak on the VM's host with --socket (nothing was done)",
            self.endpoint
        ))
        .into())
    }

    /// Connects, within `timeout`: reads the TLS credentials first (for `tls://`), so a bad directory is
    /// reported before anything is sent.
    pub async fn connect(&self, timeout: Duration) -> Result<qmp::Qmp, qmp::Error> {
        let mut options = qmp::TcpOptions::new().insecure_plaintext(self.insecure_plaintext);
        if let (qmp::Endpoint::Tls { .. }, Some(dir)) = (&self.endpoint, &self.tls_dir) {
            options = options.tls(qmp::pki::ClientCredentials::from_dir(dir)?);
        }
        qmp::Qmp::connect_endpoint(&self.endpoint, &options, timeout).await
    }
}

impl fmt::Display for QmpTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.endpoint {
            qmp::Endpoint::Unix(path) => write!(f, "{}", path.display()),
            other => write!(f, "{other}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_and_qmp_are_one_or_the_other() {
        let unix = QmpTarget::from_args(Some("/run/vm.sock".into()), None, None, false)
            .unwrap()
            .unwrap();
        assert_eq!(unix, QmpTarget::unix("/run/vm.sock"));
        assert!(!unix.is_remote());
        let same = QmpTarget::from_args(None, Some("unix:/run/vm.sock".parse().unwrap()), None, false)
            .unwrap()
            .unwrap();
        assert_eq!(same, unix);
        assert!(QmpTarget::from_args(None, None, None, false).unwrap().is_none());
        let both = QmpTarget::from_args(Some("/s".into()), Some("tcp://h:1".parse().unwrap()), None, true);
        assert!(both.is_err());
        let no_creds = QmpTarget::from_args(None, Some("tls://hv1:4444".parse().unwrap()), None, false);
        assert!(no_creds.unwrap_err().to_string().contains("--tls-dir"));
    }

    #[test]
    fn remote_targets_are_refused_where_files_must_be_shared() {
        let remote = QmpTarget::from_args(None, Some("tcp://hv1:4444".parse().unwrap()), None, true)
            .unwrap()
            .unwrap();
        assert!(remote.is_remote());
        let err = remote
            .require_local("backup", Local::QemuWritesRepository, Path::new("/backup/repo"))
            .unwrap_err();
        assert_eq!(crate::exit::classify(&err), crate::exit::ExitCode::Usage);
        assert!(err.to_string().contains("not reachable"), "{err}");
        assert!(
            QmpTarget::unix("/s")
                .require_local("backup", Local::FilesBesideDisks, Path::new("/r"))
                .is_ok()
        );
    }
}
