//! The proof that a live restore's target disks are empty, before anything in the VM changes. A block the
//! disk's own image holds (data, or a zero cluster) shadows the chain put under it, and `block-stream` does not
//! copy over it: the guest would see a mix of the image's old blocks and the backup's. So every byte of each
//! disk's top layer must be unallocated.
//!
//! QEMU's own view, the same for a local and a remote QEMU: the disk's format node is exported read-only over
//! NBD from the VM's QEMU with `qemu:allocation-depth` (0: no layer holds the range; the disk has no backing,
//! so anything else is its own image's), read over the whole disk with the `nbd` crate, and the export and the
//! server are removed again. `base:allocation` is not enough: a qcow2 zero cluster reads as a hole there, yet
//! it is allocated and would hide the backup's data. Locally the server listens on a Unix socket in a private
//! directory; across hosts on `--nbd-listen` (default: the `--qmp` host's address, port
//! [`crate::backup::DEFAULT_NBD_PORT`]), with TLS
//! from the VM's one server `tls-creds-x509` object (qmpbak connects with `--tls-dir`), as the pull does. An
//! NBD server already running in the VM's QEMU (another tool's) is left alone: QMP does not tell where it
//! listens, so qmpbak cannot read through it, and the restore is refused with that reason.
//!
//! QMP alone offers no exact proof: `query-named-block-nodes` gives an image's size on the host file system,
//! not which guest ranges it maps.

use anyhow::{Context, Result, anyhow, bail};
use qmp::commands::{BlockExportAdd, BlockExportDel, NbdServerStart, NbdServerStop};

use crate::daemon::NBD_CONNECT_TIMEOUT;
use crate::exit::Exit;
use crate::inspect::DiskInfo;
use crate::qmp_target::QmpTarget;

/// The metadata context that tells which layer of a node's chain holds each range.
const ALLOCATION_DEPTH: &str = "qemu:allocation-depth";

/// Bytes one block-status request covers (32-bit requests: under 4 GiB).
const STATUS_ROUND: u64 = 1 << 31;

/// How qmpbak reaches the NBD server it starts in the VM's QEMU.
enum Reach {
    Unix {
        _dir: tempfile::TempDir,
        socket: std::path::PathBuf,
    },
    Tcp {
        addr: String,
        options: nbd::ConnectOptions,
    },
}

/// Refuses (exit 2) unless every disk in `disks` has nothing allocated in its image. Export ids are
/// `<prefix><index>`. Leaves no export and no server of its own behind; a server it did not start is never
/// stopped.
pub(super) async fn require_empty(
    qmp: &qmp::Qmp,
    target: &QmpTarget,
    listen: Option<&str>,
    disks: &[&DiskInfo],
    prefix: &str,
) -> Result<()> {
    let (start, reach) = server(qmp, target, listen).await?;
    qmp.execute(&start).await.map_err(|e| anyhow!(e)).context(
        "starting an NBD server in the VM's QEMU to check that the target disks are empty (is another NBD \
         server running in it? QMP does not tell where one listens, so qmpbak cannot read through it: stop \
         it for the restore)",
    )?;
    let result = check_all(qmp, &reach, disks, prefix).await;
    for i in 0..disks.len() {
        let _ = qmp.execute(&BlockExportDel::hard(format!("{prefix}{i}"))).await;
    }
    // The server is this run's: it started above.
    if let Err(e) = qmp.execute(&NbdServerStop).await {
        tracing::warn!(error = %e, "stopping the NBD server of the emptiness check");
    }
    let allocated = result?;
    let full: Vec<String> = allocated
        .iter()
        .filter(|(_, bytes)| *bytes > 0)
        .map(|(id, bytes)| format!("disk {id} has {bytes} bytes allocated"))
        .collect();
    if full.is_empty() {
        return Ok(());
    }
    bail!(Exit::usage(format!(
        "the VM's target disks are not empty ({}): a live restore would leave those blocks over the backup's \
         data; nothing was changed. Start the VM with empty images (fresh qcow2) of the node's sizes",
        full.join("; ")
    )))
}

/// The `nbd-server-start` for this target and how qmpbak reaches it.
async fn server(qmp: &qmp::Qmp, target: &QmpTarget, listen: Option<&str>) -> Result<(NbdServerStart, Reach)> {
    let Some(host) = target.host() else {
        let dir = crate::daemon::private_temp_dir("qmpbak-empty-")?;
        let socket = dir.path().join("nbd.sock");
        let start = NbdServerStart::unix(socket.display().to_string());
        return Ok((start, Reach::Unix { _dir: dir, socket }));
    };
    let (host, port) = match listen {
        Some(listen) => crate::backup::split_listen(listen)?,
        None => (host.to_owned(), crate::backup::DEFAULT_NBD_PORT),
    };
    let host = host.as_str();
    let addr = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let Some(dir) = &target.tls_dir else {
        // `tcp://` QMP (`--insecure-plaintext`): the check's NBD is plaintext too.
        let options = nbd::ConnectOptions::new().insecure_plaintext();
        return Ok((
            NbdServerStart::tcp(host, port, None),
            Reach::Tcp { addr, options },
        ));
    };
    let servers = super::backing::creds_with_endpoint(qmp, "server").await?;
    let creds = match servers.as_slice() {
        [one] => one.clone(),
        [] => bail!(Exit::usage(
            "the VM's QEMU has no server tls-creds-x509 object: qmpbak reads the target disks' allocation over \
             NBD+TLS from it to prove them empty; start it with -object \
             tls-creds-x509,id=ID,dir=DIR,endpoint=server,verify-peer=on"
        )),
        many => bail!(Exit::usage(format!(
            "the VM's QEMU has several server tls-creds-x509 objects ({}); qmpbak needs one for the NBD server \
             that proves the target disks empty",
            many.join(", ")
        ))),
    };
    let tls = nbd::TlsCredentials::from_dir(dir)
        .with_context(|| format!("reading TLS credentials from {}", dir.display()))?;
    let options = nbd::ConnectOptions::new().tls(tls);
    Ok((
        NbdServerStart::tcp(host, port, Some(creds)),
        Reach::Tcp { addr, options },
    ))
}

/// Each disk's id and its allocated bytes.
async fn check_all(
    qmp: &qmp::Qmp,
    reach: &Reach,
    disks: &[&DiskInfo],
    prefix: &str,
) -> Result<Vec<(String, u64)>> {
    let mut out = Vec::new();
    for (i, d) in disks.iter().enumerate() {
        let id = format!("{prefix}{i}");
        qmp.execute(&BlockExportAdd::nbd_with_allocation_depth(&id, &d.node_name))
            .await
            .with_context(|| format!("exporting disk {} read-only over NBD to check it is empty", d.id))?;
        let client = match reach {
            Reach::Unix { socket, .. } => {
                let options = nbd::ConnectOptions::new().meta_context(ALLOCATION_DEPTH);
                nbd::Client::connect_unix_with(socket, &id, &options, NBD_CONNECT_TIMEOUT).await
            }
            Reach::Tcp { addr, options } => {
                let options = options.clone().meta_context(ALLOCATION_DEPTH);
                nbd::Client::connect_tcp(addr, &id, &options, NBD_CONNECT_TIMEOUT).await
            }
        }
        .with_context(|| format!("connecting to the NBD export of disk {}", d.id))?;
        let allocated = allocated_bytes(&client).await;
        let _ = client.disconnect().await;
        let allocated =
            allocated.with_context(|| format!("reading the allocation of disk {} over NBD", d.id))?;
        out.push((d.id.clone(), allocated));
    }
    Ok(out)
}

/// The bytes of the export that some layer holds (`qemu:allocation-depth` not 0), over the whole export.
async fn allocated_bytes(client: &nbd::Client) -> Result<u64> {
    if !client.has_meta_context(ALLOCATION_DEPTH) {
        bail!("the NBD server did not offer {ALLOCATION_DEPTH}: qmpbak cannot prove the disk empty");
    }
    let size = client.size();
    let mut allocated = 0u64;
    let mut offset = 0;
    while offset < size {
        let len = (size - offset).min(STATUS_ROUND);
        let extents = client.context_status(ALLOCATION_DEPTH, offset, len).await?;
        let mut next = offset;
        for e in &extents {
            if e.flags != 0 {
                allocated = allocated.saturating_add(e.len);
            }
            next = next.max(e.end());
        }
        if next <= offset {
            bail!("the NBD server answered no extent at byte {offset}");
        }
        offset = next;
    }
    Ok(allocated)
}
