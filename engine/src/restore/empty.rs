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
//! from the VM's server `tls-creds-x509` object chosen as for a pull ([`crate::tls_creds::server_creds`]:
//! `--tls-creds ID`, else its only one; qmpbak connects with `--tls-dir`). An
//! NBD server already running in the VM's QEMU (another tool's) is left alone: QMP does not tell where it
//! listens, so qmpbak cannot read through it, and the restore is refused with that reason.
//!
//! QMP alone offers no exact proof: `query-named-block-nodes` gives an image's size on the host file system,
//! not which guest ranges it maps.

use anyhow::{Context, Result, anyhow, bail};
use qmp::commands::{BlockExportAdd, BlockExportDel, NbdServerStart, NbdServerStop, QueryBlockExports};

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
        _dir: crate::rundir::PrivateDir,
        socket: std::path::PathBuf,
    },
    Tcp {
        addr: String,
        options: nbd::ConnectOptions,
    },
}

/// Where the check writes its operation record (the live restore's session: its VM store, manifest and lock).
pub(super) struct Record<'a> {
    pub vm: &'a chain::VmStore,
    pub manifest: &'a mut chain::Manifest,
    pub guard: &'a chain::LockGuard,
}

/// Refuses (exit 2) unless every disk in `disks` has nothing allocated in its image. Leaves no export and no
/// server of its own behind; a server it did not start is never stopped. The server and the exports
/// (`<record id>-<index>`) are named in an operation record ([`chain::Payload::EmptyCheck`]) before they are
/// made, and the record is dropped once they are gone: a run killed in between leaves them to the next run's
/// recovery (or `qmpbak cleanup`).
pub(super) async fn require_empty(
    qmp: &qmp::Qmp,
    target: &QmpTarget,
    listen: Option<&str>,
    tls_creds: Option<&str>,
    disks: &[&DiskInfo],
    record: Record<'_>,
) -> Result<()> {
    let (start, reach) = server(qmp, target, listen, tls_creds).await?;
    let mut op = chain::Operation::new(chain::Payload::EmptyCheck {}, None, chrono::Utc::now());
    // QEMU ids start with a letter (the default operation id starts with the date).
    op.id = format!("empty-check-{}", op.id);
    let prefix = format!("{}-", op.id);
    let op_id = op.id.clone();
    record.manifest.add_operation(op);
    record.vm.save(record.manifest, record.guard)?;
    let drop_record = |record: Record<'_>| -> Result<()> {
        record.manifest.remove_operation(&op_id);
        record.vm.save(record.manifest, record.guard)?;
        Ok(())
    };
    if let Err(e) = qmp.execute(&start).await {
        // Not started: a server running is another tool's, and the record must not let recovery stop it.
        drop_record(record)?;
        return Err(anyhow!(e).context(
            "starting an NBD server in the VM's QEMU to check that the target disks are empty (is another NBD \
             server running in it? QMP does not tell where one listens, so qmpbak cannot read through it: stop \
             it for the restore)",
        ));
    }
    let result = check_all(qmp, &reach, disks, &prefix).await;
    let mut removed = true;
    for i in 0..disks.len() {
        let id = format!("{prefix}{i}");
        if let Err(e) = qmp.execute(&BlockExportDel::hard(id.as_str())).await {
            // An export that was never added is no failure; one still there keeps the record.
            removed &= !export_exists(qmp, &id).await;
            tracing::debug!(error = %e, id, "removing an export of the emptiness check");
        }
    }
    // The server is this run's: it started above.
    if let Err(e) = qmp.execute(&NbdServerStop).await {
        removed = false;
        tracing::warn!(error = %e, "stopping the NBD server of the emptiness check");
    }
    if removed {
        drop_record(record)?;
    } else {
        tracing::warn!(
            "the emptiness check's NBD server or an export could not be removed: its record stays for the next \
             run or `qmpbak cleanup`"
        );
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

/// Whether QEMU still has the export `id` (when it cannot be asked: assume so).
async fn export_exists(qmp: &qmp::Qmp, id: &str) -> bool {
    qmp.execute(&QueryBlockExports)
        .await
        .map_or(true, |exports| exports.iter().any(|e| e.id == id))
}

/// The `nbd-server-start` for this target and how qmpbak reaches it.
async fn server(
    qmp: &qmp::Qmp,
    target: &QmpTarget,
    listen: Option<&str>,
    tls_creds: Option<&str>,
) -> Result<(NbdServerStart, Reach)> {
    let Some(host) = target.host() else {
        let dir = crate::rundir::private_dir("qmpbak-empty-")?;
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
    let creds = crate::tls_creds::server_creds(
        qmp,
        tls_creds,
        "the NBD server that proves the target disks empty",
    )
    .await?;
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
        if i == 0 {
            crate::crashpoint::crashpoint("restore-checking-empty");
            crate::crashpoint::pause_point("restore-checking-empty").await;
        }
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
