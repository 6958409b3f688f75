//! Serving a node's recovery chain read-only over NBD on TCP, for a QEMU on another host (a live restore across
//! hosts): a qemu-storage-daemon qmpbak starts and owns ([`crate::daemon`], so it dies with qmpbak) opens each
//! disk's layers with explicit backing ([`crate::graph::add_chain`]; an encrypted repository's key as for
//! verify) and exports the top read-only, on an address of this host only, with TLS (the client's certificate
//! verified) unless plaintext was allowed.
//!
//! Recovery restarts the server on the same address and port after a kill, with the credentials the command
//! line of the recovering command gives ([`set_credentials`]): a record is data from a file and names no
//! credentials.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Mutex;

use anyhow::{Context, Result, bail};

use chain::{Manifest, NodeId, VmStore};

use crate::daemon::StorageDaemon;
use crate::graph;
use crate::qemu_bins::QemuBins;

/// How this host serves chains over TCP, as the command line said.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServeCredentials {
    /// QEMU's server layout: ca-cert.pem, server-cert.pem, server-key.pem (absolute).
    pub tls_dir: Option<PathBuf>,
    /// Plaintext allowed without `tls_dir`.
    pub insecure_plaintext: bool,
}

static CREDENTIALS: Mutex<Option<ServeCredentials>> = Mutex::new(None);

/// Sets the credentials this process serves chains with (also for recovery of a killed run).
pub fn set_credentials(creds: ServeCredentials) {
    if let Ok(mut slot) = CREDENTIALS.lock() {
        *slot = Some(creds);
    }
}

/// The credentials set with [`set_credentials`].
pub fn credentials() -> Option<ServeCredentials> {
    CREDENTIALS.lock().ok().and_then(|slot| slot.clone())
}

/// The prefix of the client credentials objects qmpbak adds to a VM's QEMU for a run (and only objects so named
/// are ever removed by recovery).
pub const CLIENT_CREDS_PREFIX: &str = "qmpbak-nbd-client-";

/// The export name of disk `index`'s chain of `node`.
pub fn export_name(chain_id: &str, node: &NodeId, index: usize) -> String {
    graph::short_name(chain_id, "x", node.as_str(), index)
}

/// The address of this host that reaches `host:port` (the route's source address; no packet is sent).
pub fn local_address_towards(host: &str, port: u16) -> Result<IpAddr> {
    use std::net::ToSocketAddrs as _;
    let peer = (host, port)
        .to_socket_addrs()
        .with_context(|| format!("resolving {host}"))?
        .next()
        .with_context(|| format!("{host} has no address"))?;
    let any: SocketAddr = if peer.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let socket = std::net::UdpSocket::bind(any).context("finding this host's address")?;
    socket
        .connect(peer)
        .with_context(|| format!("finding this host's address towards {peer}"))?;
    Ok(socket.local_addr()?.ip())
}

/// A TCP port on `ip` that was free a moment ago.
pub fn free_port(ip: IpAddr) -> Result<u16> {
    let listener = std::net::TcpListener::bind((ip, 0)).with_context(|| format!("binding a port on {ip}"))?;
    Ok(listener.local_addr()?.port())
}

/// A running server of one node's chains.
pub struct ChainServer {
    daemon: StorageDaemon,
    addr: SocketAddr,
}

impl ChainServer {
    /// Resolves once the daemon is gone (its monitor closed): it crashed, or was killed.
    pub async fn exited(&self) {
        self.daemon.qmp().closed().await;
    }

    /// Starts a daemon listening on `addr` (TLS per `creds`) and exports disk `disks[i]`'s chain of `node` as
    /// [`export_name`]`(…, i)`.
    pub async fn start(
        vm: &VmStore,
        manifest: &Manifest,
        node: &NodeId,
        disks: &[String],
        addr: SocketAddr,
        creds: &ServeCredentials,
    ) -> Result<ChainServer> {
        if addr.ip().is_unspecified() {
            bail!(crate::exit::Exit::usage(format!(
                "will not serve the backup on every address ({addr}): give the address of this host"
            )));
        }
        if creds.tls_dir.is_none() && !creds.insecure_plaintext {
            bail!(crate::exit::Exit::usage(
                "serving the backup over TCP needs --serve-tls-dir DIR (ca-cert.pem, server-cert.pem, \
                 server-key.pem), or --insecure-plaintext"
            ));
        }
        let daemon = StorageDaemon::start_tcp(&QemuBins::from_env(), addr, creds.tls_dir.as_deref())
            .await
            .with_context(|| format!("starting the NBD server for node {node} on {addr}"))?;
        for (i, disk) in disks.iter().enumerate() {
            let prefix = format!(
                "{}-",
                graph::short_name(&manifest.chain_id, "l", node.as_str(), i)
            );
            let chain = graph::add_chain(daemon.qmp(), vm, manifest, node, disk, &prefix).await?;
            let top = chain.top().context("empty recovery chain")?;
            daemon
                .export(top, &export_name(&manifest.chain_id, node, i), false)
                .await?;
        }
        tracing::info!(%addr, node = %node, "serving the chain over NBD");
        Ok(ChainServer { daemon, addr })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops the daemon (its clients must be gone).
    pub async fn stop(self) -> Result<()> {
        self.daemon.stop().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_local_address_towards_loopback_is_loopback() {
        let ip = local_address_towards("127.0.0.1", 4444).unwrap();
        assert!(ip.is_loopback(), "{ip}");
        assert_ne!(free_port(ip).unwrap(), 0);
    }
}
