//! Where a live restore's backing comes from, the one thing that differs between a live restore on the VM's
//! host and one across hosts: the VM's QEMU opens the node's chain in the repository itself ([`Source::Local`]),
//! or this host serves the chain read-only over NBD ([`crate::serve::ChainServer`]) and the VM's QEMU opens it
//! as an `nbd` block node per disk, with a client `tls-creds-x509` object it has or that qmpbak adds
//! ([`Source::Served`]). Either way each disk gets one top node as its backing; the rest (the record,
//! `blockdev-reopen`, `block-stream`, waiting, detaching) is [`super::live`]'s.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use qmp::commands::{BlockdevAdd, BlockdevDel, ObjectAddTlsCredsX509, ObjectDel};
use serde_json::json;

use chain::{Manifest, NodeId, Operation, Payload, ServedChain, VmStore};

use crate::exit::Exit;
use crate::graph;
use crate::serve::{self, ChainServer, ServeCredentials};

/// Where the chain comes from, as the command line said.
#[derive(Debug, Clone)]
pub enum Source {
    /// The VM's QEMU opens the repository's files (it runs on this host).
    Local,
    /// This host serves the chain over NBD to a QEMU that may be on another host.
    Served(ServedOptions),
}

/// A live restore across hosts, from the command line.
#[derive(Debug, Clone, Default)]
pub struct ServedOptions {
    /// Where the server listens (`--serve-listen`); default: this host's address towards the `--qmp` host,
    /// on a free port.
    pub listen: Option<SocketAddr>,
    pub creds: ServeCredentials,
    /// A client `tls-creds-x509` object the VM's QEMU has (`--target-tls-creds`).
    pub target_tls_creds: Option<String>,
    /// A directory on the VM's host with ca-cert.pem, client-cert.pem, client-key.pem, for a client object
    /// qmpbak adds for the run (`--target-tls-dir`, absolute).
    pub target_tls_dir: Option<PathBuf>,
    /// Seconds the VM's NBD client waits for the server to come back before a read fails (`reconnect-delay`).
    pub reconnect_delay: u32,
    /// `HOST:PORT` the VM's QEMU's NBD server listens on (and qmpbak connects to) while the target disks are
    /// proven empty (`--nbd-listen`); default: the `--qmp` host, port 10809.
    pub nbd_listen: Option<String>,
    /// The server `tls-creds-x509` object of the VM's QEMU for that NBD server (`--tls-creds`); default: its
    /// only one ([`crate::tls_creds::server_creds`]).
    pub tls_creds: Option<String>,
}

/// The decided backing of one run.
pub(super) enum Backing {
    Local,
    Served {
        opts: Box<ServedOptions>,
        addr: SocketAddr,
        /// The client credentials object in the VM's QEMU (`None`: plaintext), and whether qmpbak adds it.
        creds: Option<(String, bool)>,
        server: Option<Box<ChainServer>>,
    },
}

impl Backing {
    /// Decides where the chain comes from, asking the VM's QEMU (nothing is changed yet).
    pub(super) async fn prepare(
        source: &Source,
        target: &crate::qmp_target::QmpTarget,
        qmp: &qmp::Qmp,
        node: &NodeId,
    ) -> Result<Backing> {
        let Source::Served(opts) = source else {
            return Ok(Backing::Local);
        };
        if opts.creds.tls_dir.is_none() && !opts.creds.insecure_plaintext {
            bail!(Exit::usage(
                "a live restore across hosts serves the backup over TCP: give --serve-tls-dir DIR (ca-cert.pem, \
                 server-cert.pem, server-key.pem), or --insecure-plaintext"
            ));
        }
        let addr = if let Some(addr) = opts.listen {
            addr
        } else {
            let (host, port) = match &target.endpoint {
                qmp::Endpoint::Tls { host, port } | qmp::Endpoint::Tcp { host, port } => {
                    (host.clone(), *port)
                }
                qmp::Endpoint::Unix(_) => ("127.0.0.1".to_owned(), 0),
            };
            let ip = serve::local_address_towards(&host, port.max(1))?;
            SocketAddr::new(ip, serve::free_port(ip)?)
        };
        if addr.ip().is_unspecified() || addr.port() == 0 {
            bail!(Exit::usage(format!(
                "--serve-listen {addr}: give an address of this host and a port (never every address)"
            )));
        }
        let creds = if opts.creds.tls_dir.is_none() {
            None
        } else if let Some(id) = &opts.target_tls_creds {
            check_client_creds(qmp, id).await?;
            Some((id.clone(), false))
        } else if let Some(dir) = &opts.target_tls_dir {
            if !dir.is_absolute() {
                bail!(Exit::usage(format!(
                    "--target-tls-dir {}: give an absolute path (on the VM's host)",
                    dir.display()
                )));
            }
            Some((format!("{}{node}", serve::CLIENT_CREDS_PREFIX), true))
        } else {
            Some((find_client_creds(qmp).await?, false))
        };
        Ok(Backing::Served {
            opts: Box::new(opts.clone()),
            addr,
            creds,
            server: None,
        })
    }

    /// The block node in the VM's QEMU that disk `index` gets as backing.
    fn nbd_node(chain_id: &str, node: &NodeId, index: usize) -> String {
        graph::short_name(chain_id, "n", node.as_str(), index)
    }

    /// Names in the record what [`Self::attach`] will add for disk `disks`: `(payload, block nodes per disk)`.
    pub(super) fn record(
        &self,
        op: &mut Operation,
        manifest: &Manifest,
        node: &NodeId,
        disks: &[String],
    ) -> Result<()> {
        let depth = manifest.recovery_chain(node)?.len();
        for i in 0..disks.len() {
            match self {
                Backing::Local => {
                    let prefix = graph::short_name(&manifest.chain_id, "l", node.as_str(), i);
                    for layer in (0..depth).rev() {
                        op.block_nodes.push(format!("{prefix}-{layer}"));
                    }
                }
                Backing::Served { .. } => op.block_nodes.push(Self::nbd_node(&manifest.chain_id, node, i)),
            }
        }
        op.payload = Payload::LiveRestore {
            served: match self {
                Backing::Local => None,
                Backing::Served { addr, creds, .. } => Some(ServedChain {
                    host: addr.ip().to_string(),
                    port: addr.port(),
                    disks: disks.to_vec(),
                    tls: creds.is_some(),
                    creds_object: creds.as_ref().filter(|(_, made)| *made).map(|(id, _)| id.clone()),
                }),
            },
        };
        Ok(())
    }

    /// Opens the chain of each disk in `disks` where the VM's QEMU reads it; returns each disk's top node. On
    /// failure what was added is removed again ([`Self::detach`]).
    pub(super) async fn attach(
        &mut self,
        qmp: &qmp::Qmp,
        vm: &VmStore,
        manifest: &Manifest,
        node: &NodeId,
        disks: &[String],
    ) -> Result<Vec<String>> {
        let result = self.attach_inner(qmp, vm, manifest, node, disks).await;
        if result.is_err() {
            self.detach(qmp, manifest, node, disks.len()).await;
        }
        result
    }

    async fn attach_inner(
        &mut self,
        qmp: &qmp::Qmp,
        vm: &VmStore,
        manifest: &Manifest,
        node: &NodeId,
        disks: &[String],
    ) -> Result<Vec<String>> {
        let chain_id = manifest.chain_id.clone();
        match self {
            Backing::Local => {
                // The key of an encrypted repository, for the chain under the disks until streaming ends.
                crate::crypt::unlock::add_secret(qmp).await?;
                let mut tops = Vec::new();
                for (i, disk) in disks.iter().enumerate() {
                    let prefix = format!("{}-", graph::short_name(&chain_id, "l", node.as_str(), i));
                    let chain = graph::add_chain(qmp, vm, manifest, node, disk, &prefix).await?;
                    tops.push(chain.top().context("empty recovery chain")?.to_owned());
                }
                Ok(tops)
            }
            Backing::Served {
                opts,
                addr,
                creds,
                server,
            } => {
                *server = Some(Box::new(
                    ChainServer::start(vm, manifest, node, disks, *addr, &opts.creds).await?,
                ));
                if let (Some((id, true)), Some(dir)) = (creds.as_ref(), &opts.target_tls_dir) {
                    qmp.execute(&ObjectAddTlsCredsX509::client(
                        id.as_str(),
                        dir.display().to_string(),
                    ))
                    .await
                    .with_context(|| {
                        format!(
                            "adding TLS client credentials from {} (on the VM's host) to the VM's QEMU",
                            dir.display()
                        )
                    })?;
                }
                let mut tops = Vec::new();
                for (i, disk) in disks.iter().enumerate() {
                    let name = Self::nbd_node(&chain_id, node, i);
                    let mut options = json!({
                        "driver": "nbd",
                        "node-name": name,
                        "read-only": true,
                        "server": { "type": "inet", "host": addr.ip().to_string(), "port": addr.port().to_string() },
                        "export": serve::export_name(&chain_id, node, i),
                        "reconnect-delay": opts.reconnect_delay,
                    });
                    if let Some((id, _)) = creds {
                        options["tls-creds"] = json!(id);
                    }
                    qmp.execute(&BlockdevAdd(options)).await.with_context(|| {
                        format!("connecting the VM's QEMU to this host's NBD server {addr} for disk {disk}")
                    })?;
                    tops.push(name);
                }
                Ok(tops)
            }
        }
    }

    /// Whether the chain is served over the network (streams then pause on read errors instead of failing,
    /// and the server must outlive them).
    pub(super) fn is_served(&self) -> bool {
        matches!(self, Backing::Served { .. })
    }

    /// Resolves if this host's server of the chain exits (never for a local chain): the VM's reads of the
    /// blocks not streamed yet fail from then on.
    pub(super) async fn server_exited(&self) {
        let Backing::Served {
            server: Some(server), ..
        } = self
        else {
            return std::future::pending().await;
        };
        server.exited().await;
    }

    /// Removes what [`Self::attach`] added, before any disk uses it; errors are ignored (things may be gone).
    pub(super) async fn detach(&mut self, qmp: &qmp::Qmp, manifest: &Manifest, node: &NodeId, disks: usize) {
        match self {
            Backing::Local => {
                let depth = manifest.recovery_chain(node).map_or(0, |c| c.len());
                for i in 0..disks {
                    let prefix = graph::short_name(&manifest.chain_id, "l", node.as_str(), i);
                    for layer in (0..depth).rev() {
                        let _ = qmp.execute(&BlockdevDel::new(format!("{prefix}-{layer}"))).await;
                    }
                }
                crate::crypt::unlock::forget_secret(qmp).await;
            }
            Backing::Served { .. } => {
                for i in 0..disks {
                    let name = Self::nbd_node(&manifest.chain_id, node, i);
                    let _ = qmp.execute(&BlockdevDel::new(name)).await;
                }
                self.release(qmp).await;
            }
        }
    }

    /// After the streams: removes the client credentials qmpbak added and stops the server.
    pub(super) async fn release(&mut self, qmp: &qmp::Qmp) {
        if let Backing::Served { creds, server, .. } = self {
            if let Some((id, true)) = creds.as_ref() {
                let _ = qmp.execute(&ObjectDel { id: id.clone() }).await;
            }
            if let Some(server) = server.take() {
                if let Err(e) = server.stop().await {
                    tracing::warn!(error = %e, "stopping the NBD server");
                }
            }
        }
    }
}

/// Refuses `--target-tls-creds ID` unless it is a client object (QEMU refuses server credentials for a client).
async fn check_client_creds(qmp: &qmp::Qmp, id: &str) -> Result<()> {
    match crate::tls_creds::endpoint_of(qmp, id).await?.as_deref() {
        Some("client") => Ok(()),
        other => bail!(Exit::usage(format!(
            "--target-tls-creds {id}: the VM's object has endpoint {other:?}; the VM's QEMU needs a \
             tls-creds-x509 object with endpoint=client to connect to this host"
        ))),
    }
}

/// The one client `tls-creds-x509` object of the VM's QEMU.
async fn find_client_creds(qmp: &qmp::Qmp) -> Result<String> {
    let clients = crate::tls_creds::creds_with_endpoint(qmp, "client").await?;
    match clients.as_slice() {
        [one] => Ok(one.clone()),
        [] => bail!(Exit::usage(
            "the VM's QEMU has no TLS client credentials to reach this host's NBD server: start it with \
             -object tls-creds-x509,id=ID,dir=DIR,endpoint=client (DIR on the VM's host: ca-cert.pem, \
             client-cert.pem, client-key.pem), or give --target-tls-dir DIR (qmpbak adds the object for the run)"
        )),
        many => bail!(Exit::usage(format!(
            "the VM's QEMU has several TLS client credentials ({}): name one with --target-tls-creds",
            many.join(", ")
        ))),
    }
}
