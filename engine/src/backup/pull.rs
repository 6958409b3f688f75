//! The pull backup (`backup --pull`): the repository lives only on the backup host, and QEMU writes nothing
//! into it. The VM's QEMU keeps a point-in-time view of every disk and exports the views over NBD on TCP with
//! TLS; qmpbak reads them, hashes them into the node's checking tables and writes the node's qcow2 files
//! locally through a qemu-storage-daemon of its own, in one pass ([`super::copy`]).
//!
//! The view, chosen by QEMU's schema: a `copy-before-write` filter above each disk (the device switched to it
//! with `qom-set drive`, with the VM paused for the instant, since that is no transaction action) read through
//! `snapshot-access`; or, where QEMU lacks them, image fleecing (a `blockdev-backup sync=none` job into a
//! scratch overlay whose backing is the disk). Either copies old data into a scratch image on the hypervisor
//! before the guest overwrites it.
//!
//! What is read over the network: a full reads the allocated extents (`base:allocation`), an incremental or
//! differential the extents of a frozen copy of its bitmap (`qemu:dirty-bitmap:NAME`), a checksum-diff the whole
//! disk (holes skipped), compared with the base node's table.
//!
//! The scratch overlay must live where the VM's QEMU can write: on the hypervisor, beside the disk's image by
//! default (`--scratch-dir` elsewhere). QMP can create files (`blockdev-create`) but not delete them, so after
//! the run each scratch file is emptied (created again with size 0) and an empty file stays. The operation
//! record names the scratch files, the temporary bitmaps, the exports and the NBD server, so the next run (or
//! `qmpbak cleanup`) removes them and empties the scratch after a kill.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use qmp::commands::{
    BitmapRef, BlockDirtyBitmapAdd, BlockDirtyBitmapMerge, BlockDirtyBitmapRemove, BlockExportAdd,
    BlockExportDel, BlockdevAdd, BlockdevCreate, BlockdevDel, JobDismiss, NbdServerStart, NbdServerStop,
    TransactionAction,
};
use serde_json::json;

use super::view::View;
use super::{Copied, Run, Target, copy, interrupted, jobs};
use crate::crashpoint::crashpoint;
use crate::daemon::{NBD_CONNECT_TIMEOUT, StorageDaemon};
use crate::direct::DirectSource;
use crate::plan::Method;
use crate::recovery;
use crate::tables::{NbdSource, load_node_table, touched_blocks};

/// How long creating (or emptying) a scratch image may take.
pub const SCRATCH_CREATE_TIMEOUT: Duration = Duration::from_secs(60);

/// The NBD address QEMU listens on when `--nbd-listen` is not given.
pub const DEFAULT_NBD_LISTEN: &str = "127.0.0.1:10809";

/// The NBD port QEMU listens on for a pull from another host, unless told otherwise (NBD's registered port).
pub const DEFAULT_NBD_PORT: u16 = 10809;

/// How many ports from the default one a pull without `--nbd-listen` tries when a port is taken on the VM's
/// host (another VM's pull running there at the same time): 10809 to 10824.
pub const DEFAULT_NBD_PORTS: u16 = 16;

/// Bytes of the export one block-status request of the dirty bitmap covers (32-bit requests: under 4 GiB).
const STATUS_ROUND: u64 = 1 << 31;

/// How a pull backup reaches the VM's disks.
#[derive(Debug, Clone)]
pub struct PullOptions {
    /// `HOST:PORT` QEMU's NBD server listens on; qmpbak connects to the same address.
    pub nbd_listen: String,
    /// How many successive ports from `nbd_listen`'s to try while QEMU finds the port taken: 1 for a port the
    /// user named, [`DEFAULT_NBD_PORTS`] for the default.
    pub nbd_ports: u16,
    /// Client credentials (QEMU's `tls-creds-x509` layout, `endpoint=client`).
    pub tls_dir: Option<PathBuf>,
    /// Plaintext NBD (no `--tls-dir`).
    pub insecure_plaintext: bool,
    /// The id of the `tls-creds-x509` object (endpoint=server) in the VM's QEMU; found when it is the only one.
    pub tls_creds: Option<String>,
    /// Where the scratch images go on the hypervisor (absolute); default: beside each disk's image.
    pub scratch_dir: Option<PathBuf>,
    /// The name of the host the VM's QEMU runs on, recorded with each node disk (`source_host`): this host's
    /// name for a QMP socket on this host.
    pub hypervisor: String,
}

/// Runs the copy phase of a pull backup: view, export, one pass per disk, teardown.
pub(super) async fn copy(run: &mut Run<'_>) -> Result<Copied> {
    let pull = run.opts.pull.clone().context("not a pull backup")?;
    // Everything that can be checked before anything is created.
    let (host, port) = split_listen(&pull.nbd_listen)?;
    let connect = connect_options(&pull)?;
    if let Some(t) = run.targets.iter().find(|t| t.info.encrypted) {
        bail!(
            "disk {} is encrypted: a pull backup would keep its old data decrypted in a scratch image on the \
             hypervisor; back it up without --pull",
            t.info.id
        );
    }
    let tls_creds = match &pull.tls_dir {
        None => None,
        Some(_) => Some(
            crate::tls_creds::server_creds(run.qmp, pull.tls_creds.as_deref(), "the pull's NBD server")
                .await?,
        ),
    };
    let scratch: Vec<PathBuf> = run
        .targets
        .iter()
        .map(|t| scratch_path(run, &pull, t))
        .collect::<Result<_>>()?;

    // The local side (the new node files, a qemu-storage-daemon of our own that writes them, each opened on
    // top of its parent's chain) is made while the VM's QEMU makes the views and exports: it touches only the
    // node's files, which `begin` recorded, and a child that dies with us. A failure of either side drops (so
    // kills and reaps) the daemon.
    let local = LocalSide::new(run)?;
    let bins = run.bins.clone();
    let vm = run.vm;
    let (opened, (view, exported)) = tokio::join!(
        local.open(&bins, vm),
        choose_and_export(run, &scratch, &host, port, tls_creds)
    );
    tracing::debug!("the views are exported and the node files open in the local daemon");
    // Nothing was made in the VM's QEMU before the view was chosen and recorded.
    let Some(view) = view else {
        drop(opened);
        return Err(exported.err().unwrap_or_else(|| anyhow!("no view was made")));
    };
    let (daemon, result) = match (opened, exported) {
        (Ok((daemon, targets)), Ok(port)) => {
            let result = pull_disks(run, targets, &host, port, &connect).await;
            (Some(daemon), result)
        }
        (Ok((daemon, _)), Err(e)) => (Some(daemon), Err(e)),
        (Err(e), _) => (None, Err(e)),
    };
    // The daemon quits while the VM's QEMU is tidied.
    let stop = async {
        match daemon {
            Some(daemon) => daemon.stop().await,
            None => Ok(()),
        }
    };
    let (stopped, torn_down) = tokio::join!(stop, teardown(run, view, &scratch));
    let mut copied = result?;
    torn_down?;
    stopped?;
    copied.view = Some(view.name());
    Ok(copied)
}

/// Chooses the view, records what the run makes in the VM's QEMU and makes it: the view when it was recorded
/// (so teardown has something to undo), and the NBD port or the error.
async fn choose_and_export(
    run: &mut Run<'_>,
    scratch: &[PathBuf],
    host: &str,
    port: u16,
    tls_creds: Option<String>,
) -> (Option<View>, Result<u16>) {
    let view = match View::choose(run).await {
        Ok(view) => view,
        Err(e) => return (None, Err(e)),
    };
    if let Err(e) = record(run, scratch, view) {
        return (None, Err(e));
    }
    crashpoint("pull-recorded");
    let exported = export_views(run, view, scratch, host, port, tls_creds).await;
    (Some(view), exported)
}

/// What the local side of a pull needs of the run, owned, so that it is made while the run makes the views.
struct LocalSide {
    manifest: chain::Manifest,
    parent: Option<chain::NodeId>,
    /// An incremental or differential (the clean rest of its touched blocks is read from the parent's chain) or
    /// a checksum-diff (a changed block is compared with the parent's chain, only differing clusters written).
    reads_parent: bool,
    targets: Vec<LocalTarget>,
}

/// One disk's side on the backup host, open: its new node file in the local daemon, connected writable, and
/// for an incremental the parent's chain read straight from its files when it can be ([`DirectSource`]).
struct Opened {
    target: nbd::Client,
    parent: Option<DirectSource>,
}

/// One disk's new node file and its names in the daemon.
struct LocalTarget {
    disk: String,
    index: usize,
    /// The node file, absolute.
    path: PathBuf,
    /// Its backing as its header names it (relative to its directory).
    backing: Option<String>,
    virtual_size: u64,
    /// Its block node in the daemon.
    node: String,
    /// The name prefix of its parent's chain's layers in the daemon.
    chain_prefix: String,
}

impl LocalSide {
    fn new(run: &Run<'_>) -> Result<LocalSide> {
        let targets = run
            .targets
            .iter()
            .map(|t| {
                Ok(LocalTarget {
                    disk: t.info.id.clone(),
                    index: t.index,
                    path: run.vm.resolve(&t.file)?,
                    backing: t.header_backing(),
                    virtual_size: t.info.virtual_size,
                    node: run.qemu_name("t", t.index),
                    chain_prefix: run.chain_prefix(t.index),
                })
            })
            .collect::<Result<_>>()?;
        Ok(LocalSide {
            manifest: run.manifest.clone(),
            parent: run.plan.parent.as_deref().map(str::parse).transpose()?,
            reads_parent: matches!(run.plan.method, Method::Bitmap | Method::ChecksumDiff),
            targets,
        })
    }

    /// Creates the node files while the daemon starts, then opens each on top of its parent's chain in the
    /// daemon and connects to it writable (in target order); maps the parents' chains meanwhile.
    async fn open(
        self,
        bins: &crate::qemu_bins::QemuBins,
        vm: &chain::VmStore,
    ) -> Result<(StorageDaemon, Vec<Opened>)> {
        let create = async {
            for t in &self.targets {
                crate::crypt::unlock::create_node_file(bins, &t.path, t.virtual_size, t.backing.as_deref())
                    .await?;
            }
            Ok::<_, anyhow::Error>(())
        };
        // The parents' chains are mapped meanwhile: the copy needs them, opening the node files does not.
        let open = async {
            let (daemon, created) = tokio::join!(StorageDaemon::start(bins), create);
            let daemon = daemon?;
            created?;
            tracing::debug!("the node files are made and the local daemon runs");
            let mut targets = Vec::new();
            for t in &self.targets {
                targets.push(self.open_target(&daemon, vm, t).await?);
            }
            Ok::<_, anyhow::Error>((daemon, targets))
        };
        let (opened, mut parents) = tokio::join!(open, self.map_parents(bins, vm));
        let (daemon, targets) = opened?;
        let opened = targets
            .into_iter()
            .enumerate()
            .map(|(i, target)| Opened {
                target,
                parent: parents.get_mut(i).and_then(Option::take),
            })
            .collect();
        Ok((daemon, opened))
    }

    /// For an incremental, each disk's parent chain as a [`DirectSource`] (in target order): the clean rest of
    /// the touched blocks is then read with `pread` from the chain's files, as a local incremental's table is,
    /// not through the daemon. `None` for a disk whose chain cannot be read that way (compressed clusters, an
    /// encrypted repository), which is read through the daemon instead.
    async fn map_parents(
        &self,
        bins: &crate::qemu_bins::QemuBins,
        vm: &chain::VmStore,
    ) -> Vec<Option<DirectSource>> {
        let mut parents = Vec::new();
        for t in &self.targets {
            let source = match (&self.parent, self.reads_parent) {
                (Some(parent), true) => {
                    let opened = DirectSource::open_node(bins, vm, &self.manifest, parent, &t.disk).await;
                    // Reading through the daemon is always right: a chain that cannot be mapped is read there.
                    opened.unwrap_or_else(|e| {
                        tracing::debug!(disk = %t.disk, "the parent's chain is read through the daemon: {e:#}");
                        None
                    })
                }
                _ => None,
            };
            parents.push(source);
        }
        parents
    }

    /// Opens disk `t`'s new node file in the daemon, on top of the parent's chain, and connects to it writable.
    async fn open_target(
        &self,
        daemon: &StorageDaemon,
        vm: &chain::VmStore,
        t: &LocalTarget,
    ) -> Result<nbd::Client> {
        let qmp = daemon.qmp();
        let backing = super::add_parent_chain(
            qmp,
            vm,
            &self.manifest,
            self.parent.as_ref(),
            &t.disk,
            &t.chain_prefix,
        )
        .await?;
        let options = jobs::target_options(&t.node, &t.path, backing.as_deref());
        // Written with O_DIRECT where the filesystem allows it: a buffered write costs the daemon a fresh page
        // of page cache per page written, which on a 2-core backup host was most of a full pull's CPU (a 1.5 GiB
        // full: 11 s of system time buffered, 2.5 s direct). The file is fsynced before the node counts either
        // way. A filesystem without O_DIRECT (tmpfs on older kernels, some FUSE mounts) is written buffered.
        let mut direct = options.clone();
        direct["cache"]["direct"] = json!(true);
        let direct = crate::crashpoint::direct_target_options(direct);
        if let Err(e) = qmp.execute(&BlockdevAdd(direct)).await {
            tracing::info!(file = %t.path.display(), "the backup target is written through the page cache: {e}");
            qmp.execute(&BlockdevAdd(options))
                .await
                .with_context(|| format!("opening the backup target {}", t.path.display()))?;
        }
        let name = format!("w{}", t.index);
        daemon.export(&t.node, &name, true).await?;
        daemon.connect(&name).await
    }
}

/// `HOST:PORT` (`[V6]:PORT`) of `--nbd-listen`.
pub(crate) fn split_listen(addr: &str) -> Result<(String, u16)> {
    let (host, port) = addr
        .rsplit_once(':')
        .with_context(|| format!("--nbd-listen {addr:?} is not HOST:PORT"))?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let port: u16 = port
        .parse()
        .ok()
        .filter(|&p| p != 0)
        .with_context(|| format!("--nbd-listen {addr:?}: the port must be 1-65535"))?;
    if host.is_empty() || host == "0.0.0.0" || host == "::" {
        bail!("--nbd-listen {addr:?}: name the address qmpbak connects to, not a wildcard");
    }
    Ok((host.to_owned(), port))
}

/// TLS with the client credentials of `--tls-dir`, or plaintext only with `--insecure-plaintext`.
fn connect_options(pull: &PullOptions) -> Result<nbd::ConnectOptions> {
    match (&pull.tls_dir, pull.insecure_plaintext) {
        (Some(dir), _) => {
            let creds = nbd::TlsCredentials::from_dir(dir)
                .with_context(|| format!("reading TLS credentials from {}", dir.display()))?;
            Ok(nbd::ConnectOptions::new().tls(creds))
        }
        (None, true) => Ok(nbd::ConnectOptions::new().insecure_plaintext()),
        (None, false) => bail!(crate::exit::Exit::usage(
            "a pull backup reads the disks over TCP: give --tls-dir (TLS credentials), or --insecure-plaintext"
                .to_owned()
        )),
    }
}

/// The scratch image of disk `t` on the hypervisor: `<dir>/<image name>.qmpbak-<chain>-<node>-scratch<i>.qcow2`.
fn scratch_path(run: &Run<'_>, pull: &PullOptions, t: &Target) -> Result<PathBuf> {
    let image = Path::new(&t.info.image);
    let dir = if let Some(dir) = &pull.scratch_dir {
        dir.clone()
    } else {
        if !image.is_absolute() {
            bail!(
                "disk {}'s image {:?} is not a file path: name a directory on the hypervisor for the scratch \
                 image with --scratch-dir",
                t.info.id,
                t.info.image
            );
        }
        image
            .parent()
            .context("the disk's image has no directory")?
            .to_owned()
    };
    if !dir.is_absolute()
        || dir
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        bail!(
            "--scratch-dir {} must be an absolute path without '..'",
            dir.display()
        );
    }
    let stem = image
        .file_name()
        .and_then(|n| n.to_str())
        .filter(|n| !n.is_empty())
        .unwrap_or("disk");
    Ok(dir.join(scratch_name(
        stem,
        &run.manifest.chain_id,
        run.node.as_str(),
        t.index,
    )))
}

/// The file name of a scratch image, which recovery checks before it empties a file a record names.
pub fn scratch_name(stem: &str, chain: &str, node: &str, disk: usize) -> String {
    format!("{stem}.qmpbak-{chain}-{node}-scratch{disk}.qcow2")
}

/// The name of disk `t`'s frozen copy of the bitmap an incremental reads (not a [`crate::bitmaps::BitmapName`]:
/// tidying never takes it for one of the chain's).
fn frozen_bitmap(run: &Run<'_>, t: &Target) -> String {
    format!("qmpbak.pull.{}.{}.{}", run.manifest.chain_id, run.node, t.index)
}

/// Whether `name` is a frozen bitmap ([`frozen_bitmap`]) of chain `chain_id`.
pub fn is_frozen_bitmap_of(chain_id: &str, name: &str) -> bool {
    name.starts_with(&format!("qmpbak.pull.{chain_id}."))
}

fn export_id(run: &Run<'_>, t: &Target) -> String {
    format!("{}-p{}", run.op.id, t.index)
}

/// Puts what this run creates in the VM's QEMU and on the hypervisor into the operation record, before any of it
/// exists: the NBD server, the scratch images and their nodes, the create jobs, the frozen bitmaps; for a
/// copy-before-write view its filters and `snapshot-access` nodes and the devices it switches to them.
fn record(run: &mut Run<'_>, scratch: &[PathBuf], view: View) -> Result<()> {
    for t in &run.targets {
        run.op.jobs.push(run.qemu_name("k", t.index));
        // After the overlay ("f", recorded by `begin`): removed after it.
        run.op.block_nodes.push(run.qemu_name("s", t.index));
        if run.plan.method == Method::Bitmap {
            run.op.bitmaps.push(chain::BitmapRecord {
                node: t.info.node_name.clone(),
                name: frozen_bitmap(run, t),
            });
        }
    }
    let view = super::view::record(run, view)?;
    // The NBD server is recorded only once it runs: a server that was already running is not ours to stop.
    run.op.payload = chain::Payload::Backup {
        nbd_server_started: false,
        scratch: scratch.to_vec(),
        view,
        frozen_by: None,
    };
    run.save_op()
}

/// Creates an image in the VM's QEMU with `blockdev-create` and waits for the job.
async fn create(qmp: &qmp::Qmp, job: &str, options: serde_json::Value) -> Result<()> {
    qmp.execute(&BlockdevCreate {
        job_id: job.to_owned(),
        options,
    })
    .await?;
    let outcome = qmp.wait_job(job, SCRATCH_CREATE_TIMEOUT).await;
    let _ = qmp.execute(&JobDismiss::new(job)).await;
    match outcome?.error {
        Some(e) => Err(anyhow!(e)),
        None => Ok(()),
    }
}

/// Makes the scratch images, the views (one instant for every disk), the NBD server and the exports in the VM's
/// QEMU.
async fn export_views(
    run: &mut Run<'_>,
    view: View,
    scratch: &[PathBuf],
    host: &str,
    port: u16,
    tls_creds: Option<String>,
) -> Result<u16> {
    let qmp = run.qmp;
    // The scratch overlays on the hypervisor, on top of the live disks.
    for (t, path) in run.targets.iter().zip(scratch) {
        let job = run.qemu_name("k", t.index);
        let file = run.qemu_name("s", t.index);
        create(qmp, &job, json!({"driver": "file", "filename": path, "size": 0}))
            .await
            .with_context(|| format!("creating the scratch file {} on the hypervisor", path.display()))?;
        qmp.execute(&BlockdevAdd(
            json!({"driver": "file", "node-name": file, "filename": path}),
        ))
        .await
        .with_context(|| format!("opening the scratch file {}", path.display()))?;
        create(
            qmp,
            &job,
            json!({"driver": "qcow2", "file": file, "size": t.info.virtual_size}),
        )
        .await
        .with_context(|| format!("formatting the scratch image {}", path.display()))?;
        let mut options = json!({
            "driver": "qcow2",
            "node-name": run.qemu_name("f", t.index),
            "file": file,
            // Old data for the run only, emptied afterwards: its durability does not matter.
            "cache": {"no-flush": true},
        });
        // The fleece reads the disk through the overlay's backing; a copy-before-write target holds only the
        // old data (snapshot-access knows which clusters it has).
        if let Some(backing) = view.overlay_backing(t) {
            options["backing"] = json!(backing);
        }
        options["file"] = crate::crashpoint::scratch_file_options(options["file"].take());
        qmp.execute(&BlockdevAdd(options))
            .await
            .context("adding the scratch overlay")?;
    }
    crashpoint("pull-scratch-added");
    if run.interrupt.arrived().await {
        return Err(interrupted());
    }

    // One instant for every disk: the views, the new bitmaps and the frozen copies of the bitmaps read.
    let mut actions = Vec::new();
    for t in &run.targets {
        actions.extend(bitmap_actions(run, t)?);
    }
    super::view::start(run, view, actions).await?;
    crashpoint("pull-view-started");

    let port = start_nbd_server(run, host, port, tls_creds).await?;
    run.record_nbd_server_started()?;
    crashpoint("pull-server-started");
    for t in &run.targets {
        let id = export_id(run, t);
        let frozen = frozen_bitmap(run, t);
        let node = view.read_node(run, t);
        let export = match (view, run.plan.method) {
            (View::Fleece, Method::Bitmap) => BlockExportAdd::nbd_with_bitmap(&id, &node, &frozen),
            // QEMU looks for an export's bitmap through filters and backing files, not below snapshot-access.
            (View::CopyBeforeWrite, Method::Bitmap) => {
                BlockExportAdd::nbd_with_node_bitmap(&id, &node, &t.info.node_name, &frozen)
            }
            (_, Method::Full | Method::ChecksumDiff) => BlockExportAdd::nbd(&id, &node, false),
        };
        qmp.execute(&export)
            .await
            .with_context(|| format!("exporting the view of disk {} over NBD", t.info.id))?;
    }
    crashpoint("pull-exported");
    tokio::select! {
        () = crate::crashpoint::pause_point("pull-exported") => {}
        () = run.interrupt.wait() => return Err(interrupted()),
    }
    Ok(port)
}

/// Starts QEMU's NBD server on `host:port`, or, when the port is taken on the VM's host and the port was not
/// named by the user, on the next of [`PullOptions::nbd_ports`] ports; returns the port it listens on. Another
/// NBD server already running in this QEMU is an error, never stopped or used.
async fn start_nbd_server(run: &Run<'_>, host: &str, port: u16, tls_creds: Option<String>) -> Result<u16> {
    let tries = run.opts.pull.as_ref().map_or(1, |p| p.nbd_ports.max(1));
    let mut last = None;
    for p in (port..=u16::MAX).take(usize::from(tries)) {
        match run
            .qmp
            .execute(&NbdServerStart::tcp(host, p, tls_creds.clone()))
            .await
        {
            Ok(_) => return Ok(p),
            // QEMU's words for a port another process listens on (the bind's EADDRINUSE).
            Err(e) if e.to_string().contains("Address already in use") => {
                tracing::info!(
                    port = p,
                    "the NBD port is taken on the VM's host; trying the next"
                );
                last = Some(e);
            }
            Err(e) => {
                return Err(anyhow!(e)).with_context(|| {
                    format!(
                        "starting an NBD server on {host}:{p} in the VM's QEMU (is another NBD server running in it?)"
                    )
                });
            }
        }
    }
    let last = last.map_or_else(|| anyhow!("no port to try"), |e| anyhow!(e));
    Err(last).with_context(|| {
        format!(
            "starting an NBD server in the VM's QEMU: every port from {host}:{port} on ({tries}) is taken; name a \
             free one with --nbd-listen"
        )
    })
}

/// The transaction's bitmap actions for disk `t`: the new node's bitmaps and, for an incremental or
/// differential, a disabled copy of the bitmap it reads (frozen at the instant, exported with the view).
fn bitmap_actions(run: &Run<'_>, t: &Target) -> Result<Vec<TransactionAction>> {
    let mut actions = run.new_bitmap_actions(t);
    if run.plan.method == Method::Bitmap {
        let base = run
            .base_bitmap(t)
            .context("an incremental without a base bitmap")?;
        let granularity = t
            .info
            .bitmaps
            .iter()
            .find(|b| b.name == base)
            .and_then(|b| u32::try_from(b.granularity).ok());
        let frozen = frozen_bitmap(run, t);
        actions.push(TransactionAction::BlockDirtyBitmapAdd(BlockDirtyBitmapAdd {
            persistent: Some(false),
            disabled: Some(true),
            granularity,
            ..BlockDirtyBitmapAdd::new(t.info.node_name.as_str(), frozen.as_str())
        }));
        actions.push(TransactionAction::BlockDirtyBitmapMerge(BlockDirtyBitmapMerge {
            node: t.info.node_name.clone(),
            target: frozen,
            bitmaps: vec![BitmapRef::Name(base)],
        }));
    }
    Ok(actions)
}

/// Reads, hashes and writes each disk in turn.
async fn pull_disks(
    run: &Run<'_>,
    targets: Vec<Opened>,
    host: &str,
    port: u16,
    connect: &nbd::ConnectOptions,
) -> Result<Copied> {
    let addr = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let mut bytes = Vec::new();
    let mut pulled = Vec::new();
    let mut tables = Vec::new();
    for (t, Opened { target, parent }) in run.targets.iter().zip(targets) {
        if run.interrupt.arrived().await {
            return Err(interrupted());
        }
        let base = match &run.plan.parent {
            Some(parent) => Some(load_node_table(
                run.vm,
                &run.manifest,
                &parent.parse()?,
                &t.info.id,
            )?),
            None => None,
        };
        let frozen = frozen_bitmap(run, t);
        let options = match run.plan.method {
            Method::Bitmap => connect.clone().dirty_bitmap(&frozen),
            Method::Full | Method::ChecksumDiff => connect.clone(),
        };
        let export = export_id(run, t);
        let view = nbd::Client::connect_tcp(&addr, &export, &options, NBD_CONNECT_TIMEOUT)
            .await
            .with_context(|| {
                format!(
                    "connecting to the NBD export {export} of disk {} at {addr}",
                    t.info.id
                )
            })?;
        if view.size() != t.info.virtual_size {
            bail!(
                "the NBD export of disk {} has {} bytes, the disk {}",
                t.info.id,
                view.size(),
                t.info.virtual_size
            );
        }
        let dirty = match run.plan.method {
            Method::Bitmap => Some(
                dirty_ranges(&view, &frozen)
                    .await
                    .with_context(|| broken_view(&t.info.id))?,
            ),
            Method::Full | Method::ChecksumDiff => None,
        };
        let blocks = match &dirty {
            Some(dirty) => {
                let count = chain::table::check_size(view.size(), run.block_size)?;
                Some(touched_blocks(dirty, run.block_size, count)?)
            }
            None => None,
        };
        run.progress.phase(&format!(
            "pulling disk {} over NBD{}",
            t.info.id,
            if run.opts.pull.as_ref().is_some_and(|p| p.tls_dir.is_some()) {
                " (TLS)"
            } else {
                " (plaintext)"
            }
        ));
        let handle = tokio::runtime::Handle::current();
        let remote = NbdSource::new(
            nbd::BlockingClient::new(view.clone(), handle.clone()),
            view.size(),
        );
        let counter = remote.read_counter();
        // The parts of the touched blocks that the bitmap leaves clean are the parent's: read here, from the
        // parent's chain (the new node file's backing), not over the network.
        let (table, copied) = if let Some(dirty) = dirty {
            let local = match parent {
                Some(direct) if chain::BlockSource::len(&direct) == view.size() => Local::Direct(direct),
                _ => Local::Daemon(NbdSource::new(
                    nbd::BlockingClient::new(target.clone(), handle),
                    target.size(),
                )),
            };
            let dirty: Arc<[(u64, u64)]> = dirty.into();
            let source = DirtyOrParent {
                remote,
                local,
                dirty: Arc::clone(&dirty),
            };
            // The clean rest of a changed block reads as the parent's in the new file already (its backing,
            // where it was just read from): only the dirty ranges are written.
            let pass = copy::Pass {
                disk: &t.info.id,
                source,
                blocks,
                base,
                target: target.clone(),
                write_only: Some(dirty),
                parent: None,
            };
            copy::hash_and_copy(run, pass)
                .await
                .with_context(|| broken_view(&t.info.id))?
        } else {
            let pass = copy::Pass {
                disk: &t.info.id,
                source: remote,
                blocks,
                base,
                target: target.clone(),
                write_only: None,
                parent,
            };
            copy::hash_and_copy(run, pass)
                .await
                .with_context(|| broken_view(&t.info.id))?
        };
        tracing::debug!(disk = %t.info.id, copied, "the disk's view is read, hashed and written");
        target.flush().await?;
        run.progress.finish_disk(&t.info.id);
        let _ = view.disconnect().await;
        let _ = target.disconnect().await;
        bytes.push(copied);
        pulled.push(counter.load(std::sync::atomic::Ordering::Relaxed));
        tables.push(table);
    }
    crashpoint("pull-copied");
    Ok(Copied {
        bytes,
        tables: Some(tables),
        pulled: Some(pulled),
        view: None,
    })
}

/// What a failed read of disk `id`'s view says: a copy-before-write view that could not keep old data (its
/// scratch image full or failing, or a copy slower than the timeout) is broken on purpose, so that the guest's
/// write goes on, and every read of it fails.
fn broken_view(id: &str) -> String {
    format!(
        "reading the point-in-time view of disk {id} (if QEMU could not keep the old data in the scratch image, \
         the view breaks instead of the guest's write; see QEMU's log)"
    )
}

/// An incremental's view of a disk: the ranges its bitmap marks dirty are read from the hypervisor's export
/// (`remote`), every other byte from the parent's chain (`local`: its files, or the new node's file, which reads
/// as the parent there). The bitmap counts every write since the parent (as for a local incremental), so outside
/// `dirty` the disk at the backup instant is the parent's; only the dirty ranges cross the network. Read through
/// the new node's file, each block is read before the pass writes it, and a write writes only dirty ranges, so
/// the clean rest still reads as the parent's while the pass writes.
struct DirtyOrParent {
    remote: NbdSource,
    local: Local,
    /// Sorted, disjoint `(offset, len)`.
    dirty: Arc<[(u64, u64)]>,
}

/// Where an incremental reads the parent's data: its chain's files, or the new node's file in the local daemon
/// (which reads as the parent's chain wherever the pass has not written yet).
enum Local {
    Direct(DirectSource),
    Daemon(NbdSource),
}

impl Local {
    fn source(&self) -> &dyn chain::BlockSource {
        match self {
            Local::Direct(d) => d,
            Local::Daemon(n) => n,
        }
    }
}

impl DirtyOrParent {
    fn source(&self, dirty: bool) -> &dyn chain::BlockSource {
        if dirty { &self.remote } else { self.local.source() }
    }

    fn pieces(&self, offset: u64, len: u64) -> Vec<(u64, u64, bool)> {
        copy::cut(&self.dirty, offset, len)
    }
}

impl chain::BlockSource for DirtyOrParent {
    fn len(&self) -> u64 {
        chain::BlockSource::len(&self.remote)
    }

    fn extents(&self, offset: u64, len: u64) -> std::io::Result<Vec<chain::Extent>> {
        let mut out = Vec::new();
        for (start, n, dirty) in self.pieces(offset, len) {
            let source = self.source(dirty);
            // Each source's extents clipped to its piece (the builder fills gaps as data).
            for e in source.extents(start, n)? {
                let lo = e.offset.max(start);
                let hi = e.offset.saturating_add(e.len).min(start + n);
                if hi > lo {
                    out.push(chain::Extent {
                        offset: lo,
                        len: hi - lo,
                        kind: e.kind,
                    });
                }
            }
        }
        Ok(out)
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let len = buf.len() as u64;
        for (start, n, dirty) in self.pieces(offset, len) {
            let source = self.source(dirty);
            let from = usize::try_from(start - offset).map_err(std::io::Error::other)?;
            let to = usize::try_from(start - offset + n).map_err(std::io::Error::other)?;
            source.read_at(start, &mut buf[from..to])?;
        }
        Ok(())
    }

    fn name(&self) -> String {
        "the disk's view (dirty ranges) and the parent's data".to_owned()
    }
}

/// The byte ranges the export's dirty bitmap marks, in rounds of under 4 GiB.
async fn dirty_ranges(view: &nbd::Client, bitmap: &str) -> Result<Vec<(u64, u64)>> {
    let size = view.size();
    let mut ranges = Vec::new();
    let mut offset = 0;
    while offset < size {
        let len = (size - offset).min(STATUS_ROUND);
        let extents = view
            .dirty_extents(bitmap, offset, len)
            .await
            .with_context(|| format!("reading the dirty bitmap {bitmap} over NBD"))?;
        let mut next = offset;
        for e in &extents {
            if e.dirty() {
                ranges.push((e.offset, e.len));
            }
            next = next.max(e.end());
        }
        if next <= offset {
            bail!("the NBD server answered no extent for the dirty bitmap at byte {offset}");
        }
        offset = next;
    }
    Ok(ranges)
}

/// Removes the exports, the NBD server, the views and the frozen bitmaps from the VM's QEMU and empties the
/// scratch images. A copy-before-write view's devices go back to their nodes first; if one cannot, the error
/// says so and the filters, the scratch and the record stay for recovery.
async fn teardown(run: &Run<'_>, view: View, scratch: &[PathBuf]) -> Result<()> {
    let qmp = run.qmp;
    for t in &run.targets {
        let _ = qmp.execute(&BlockExportDel::hard(export_id(run, t))).await;
    }
    if run.op.payload.started_nbd_server() {
        let _ = qmp.execute(&NbdServerStop).await;
    }
    super::view::stop(run, view)
        .await
        .context("putting the VM's devices back on their disks after the pull")?;
    for t in &run.targets {
        for what in ["b", "f", "s"] {
            let _ = qmp.execute(&BlockdevDel::new(run.qemu_name(what, t.index))).await;
        }
        if run.plan.method == Method::Bitmap {
            let remove = BlockDirtyBitmapRemove::new(t.info.node_name.as_str(), frozen_bitmap(run, t));
            let _ = qmp.execute(&remove).await;
        }
    }
    for (t, path) in run.targets.iter().zip(scratch) {
        if let Err(e) = recovery::empty_scratch(qmp, &run.qemu_name("k", t.index), path).await {
            run.progress.phase(&format!(
                "could not empty the scratch image {}: {e:#}",
                path.display()
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_listen_address_is_a_host_and_a_port_qmpbak_can_connect_to() {
        assert_eq!(
            split_listen("127.0.0.1:10809").unwrap(),
            ("127.0.0.1".to_owned(), 10809)
        );
        assert_eq!(split_listen("[::1]:5000").unwrap(), ("::1".to_owned(), 5000));
        assert_eq!(
            split_listen("hv1.example:7").unwrap(),
            ("hv1.example".to_owned(), 7)
        );
        for bad in [
            "127.0.0.1",
            "127.0.0.1:0",
            "127.0.0.1:x",
            ":10809",
            "0.0.0.0:10809",
            "[::]:1",
        ] {
            assert!(split_listen(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn only_a_scratch_image_of_the_records_node_is_emptied() {
        let op = chain::Operation::new(
            chain::Payload::Backup {
                nbd_server_started: true,
                scratch: Vec::new(),
                view: None,
                frozen_by: None,
            },
            Some("0007".parse().unwrap()),
            chrono::Utc::now(),
        );
        let repo = Path::new("/srv/backups");
        let ok = format!("/var/lib/vm/{}", scratch_name("disk0.qcow2", "abcd", "0007", 1));
        assert_eq!(recovery::scratch_problem(Path::new(&ok), &op, "abcd", repo), None);
        for bad in [
            format!("/var/lib/vm/{}", scratch_name("disk0.qcow2", "abcd", "0006", 1)),
            format!("/var/lib/vm/{}", scratch_name("disk0.qcow2", "abce", "0007", 1)),
            format!(
                "/srv/backups/vm1/{}",
                scratch_name("disk0.qcow2", "abcd", "0007", 1)
            ),
            format!(
                "/var/lib/vm/../{}",
                scratch_name("disk0.qcow2", "abcd", "0007", 1)
            ),
            scratch_name("disk0.qcow2", "abcd", "0007", 1),
            "/var/lib/vm/disk0.qcow2".to_owned(),
            "/var/lib/vm/disk0.qmpbak-abcd-0007-scratchX.qcow2".to_owned(),
            "/etc/passwd".to_owned(),
        ] {
            assert!(
                recovery::scratch_problem(Path::new(&bad), &op, "abcd", repo).is_some(),
                "{bad}"
            );
        }
    }
}
