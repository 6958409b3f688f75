//! A `qemu-storage-daemon` that qmpbak starts and stops itself, to read or write backup files through QEMU's
//! own block layer: the daemon's monitor connects to a socket qmpbak listens on (so start-up is awaited, not
//! polled), block graphs are built in it over QMP, and their nodes are exported over NBD on a private socket.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use crate::children::{self, Owned};
use anyhow::{Context, Result, bail};
use tokio::net::UnixListener;

use crate::qemu_bins::QemuBins;

/// How long the daemon may take to start and connect its monitor.
pub const DAEMON_START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the daemon may take to exit after `quit`.
pub const DAEMON_STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one NBD connection may take to negotiate.
pub const NBD_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The environment variable through which glibc's allocator is tuned.
const GLIBC_TUNABLES: &str = "GLIBC_TUNABLES";

/// glibc's allocator settings for the daemon (unless the environment sets its own): every NBD request gets a
/// new bounce buffer, and with glibc's defaults a request of 128 KiB or more (a pull writes up to 1 MiB at a
/// time) is a fresh `mmap`, faulted in and zeroed page by page by the kernel and unmapped again when it is
/// answered. Kept in the heap (up to 32 MiB each, 32 MiB of free heap kept rather than given back), the
/// buffers are reused: a pull's daemon spent about a quarter less CPU (0.48 -> 0.36 s for 96 MiB, qmpbak
/// included). The allocator's choices never change what is read or written.
const MALLOC_TUNABLES: &str = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=33554432";

/// A running `qemu-storage-daemon`; killed and reaped when dropped.
pub struct StorageDaemon {
    child: Owned,
    qmp: qmp::Qmp,
    nbd_socket: PathBuf,
    // Holds the sockets; removed with the daemon.
    _dir: crate::rundir::PrivateDir,
}

impl StorageDaemon {
    /// Starts a daemon with an NBD server on a private unix socket.
    pub async fn start(bins: &QemuBins) -> Result<StorageDaemon> {
        Self::launch(bins, None).await
    }

    /// Starts a daemon whose NBD server listens on TCP `addr` instead (for a QEMU on another host), with TLS
    /// from `tls_dir` (QEMU's server layout: ca-cert.pem, server-cert.pem, server-key.pem; the client's
    /// certificate is required and verified), or plaintext without it.
    pub async fn start_tcp(
        bins: &QemuBins,
        addr: std::net::SocketAddr,
        tls_dir: Option<&Path>,
    ) -> Result<StorageDaemon> {
        Self::launch(bins, Some((addr, tls_dir))).await
    }

    async fn launch(
        bins: &QemuBins,
        tcp: Option<(std::net::SocketAddr, Option<&Path>)>,
    ) -> Result<StorageDaemon> {
        let dir = crate::rundir::private_dir("qmpbak-qsd-")?;
        let monitor = dir.path().join("monitor.sock");
        let nbd_socket = dir.path().join("nbd.sock");
        let mut server_args: Vec<String> = Vec::new();
        match tcp {
            None => {
                server_args.push("--nbd-server".to_owned());
                server_args.push(format!("addr.type=unix,addr.path={}", nbd_socket.display()));
            }
            Some((addr, tls_dir)) => {
                let mut nbd = format!("addr.type=inet,addr.host={},addr.port={}", addr.ip(), addr.port());
                if let Some(tls) = tls_dir {
                    if !tls.is_absolute() || tls.to_str().is_none_or(|t| t.contains(',')) {
                        bail!(
                            "the TLS credentials directory {} must be an absolute path without commas",
                            tls.display()
                        );
                    }
                    server_args.push("--object".to_owned());
                    server_args.push(format!(
                        "tls-creds-x509,id=qmpbak-serve-tls,dir={},endpoint=server,verify-peer=on",
                        tls.display()
                    ));
                    nbd.push_str(",tls-creds=qmpbak-serve-tls");
                }
                server_args.push("--nbd-server".to_owned());
                server_args.push(nbd);
            }
        }
        let listener =
            UnixListener::bind(&monitor).with_context(|| format!("listening on {}", monitor.display()))?;
        let mut command = bins.storage_daemon_command();
        if std::env::var_os(GLIBC_TUNABLES).is_none() {
            command.env(GLIBC_TUNABLES, MALLOC_TUNABLES);
        }
        let mut child = children::spawn(
            command
                .arg("--chardev")
                .arg(format!("socket,id=qmpbak,path={}", monitor.display()))
                .args(["--monitor", "chardev=qmpbak"])
                .args(&server_args)
                // An encrypted repository's key, as a secret object reading a private file.
                .args(crate::crypt::unlock::qemu_img_args())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped()),
        )
        .with_context(|| format!("starting {}", bins.storage_daemon.display()))?;
        tracing::info!(pid = child.pid(), program = %bins.storage_daemon.display(), "started qemu-storage-daemon");
        let accepted = tokio::select! {
            accepted = tokio::time::timeout(DAEMON_START_TIMEOUT, listener.accept()) => accepted,
            status = child.wait() => {
                let stderr = read_stderr(&mut child).await;
                bail!("{} exited at start ({}): {stderr}", bins.storage_daemon.display(),
                    status.map_or_else(|e| e.to_string(), |s| s.to_string()));
            }
        };
        let stream = match accepted {
            Ok(Ok((stream, _))) => stream,
            Ok(Err(e)) => return Err(e).context("accepting qemu-storage-daemon's monitor connection"),
            Err(_) => {
                bail!("qemu-storage-daemon did not connect its monitor within {DAEMON_START_TIMEOUT:?}")
            }
        };
        let qmp = qmp::Qmp::from_stream(stream, DAEMON_START_TIMEOUT)
            .await
            .context("negotiating QMP with qemu-storage-daemon")?;
        Ok(StorageDaemon {
            child,
            qmp,
            nbd_socket,
            _dir: dir,
        })
    }

    pub fn qmp(&self) -> &qmp::Qmp {
        &self.qmp
    }

    pub fn nbd_socket(&self) -> &Path {
        &self.nbd_socket
    }

    /// Exports block node `node` over NBD under the export name `name`.
    pub async fn export(&self, node: &str, name: &str, writable: bool) -> Result<()> {
        self.qmp
            .execute(&qmp::commands::BlockExportAdd::nbd(name, node, writable))
            .await
            .with_context(|| format!("exporting block node {node} over NBD"))?;
        Ok(())
    }

    /// Connects an NBD client to export `name`.
    pub async fn connect(&self, name: &str) -> Result<nbd::Client> {
        nbd::Client::connect_unix(&self.nbd_socket, name, NBD_CONNECT_TIMEOUT)
            .await
            .with_context(|| format!("connecting to NBD export {name} of qemu-storage-daemon"))
    }

    /// Asks the daemon to quit and waits for it; kills it if it does not.
    pub async fn stop(mut self) -> Result<()> {
        let _ = self.qmp.execute(&qmp::commands::Quit).await;
        if tokio::time::timeout(DAEMON_STOP_TIMEOUT, self.child.wait())
            .await
            .is_err()
        {
            self.child.kill().await.context("killing qemu-storage-daemon")?;
        }
        Ok(())
    }
}

async fn read_stderr(child: &mut Owned) -> String {
    use tokio::io::AsyncReadExt as _;
    let mut out = String::new();
    if let Some(mut stderr) = child.stderr() {
        let _ = tokio::time::timeout(Duration::from_secs(2), stderr.read_to_string(&mut out)).await;
    }
    out.trim().to_owned()
}
