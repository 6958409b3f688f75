//! Offline restore: a node's recovery chain is opened in a qemu-storage-daemon started for the purpose and
//! copied by a `blockdev-backup` job into a new standalone image per disk (qcow2, or sparse raw); holes stay
//! holes. Before success is reported, each image is read back over NBD and its checking table compared with the
//! node's.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use serde_json::json;

use chain::{LockWait, Repository, Table};

use crate::daemon::StorageDaemon;
use crate::exit::Exit;
use crate::graph;
use crate::qemu_bins::QemuBins;
use crate::tables::{NbdSource, load_node_table, threads};

/// Bound on one disk's copy job.
pub const RESTORE_JOB_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Qcow2,
    Raw,
}

impl Format {
    fn ext(self) -> &'static str {
        match self {
            Format::Qcow2 => "qcow2",
            Format::Raw => "raw",
        }
    }
}

#[derive(Debug, Clone)]
pub struct RestoreOptions {
    pub repo: PathBuf,
    pub vm: String,
    pub node: String,
    /// A directory (one image per disk, named `<disk>.<format>`) or, for one disk, a file.
    pub to: PathBuf,
    pub format: Format,
    pub disks: Vec<String>,
    /// Overwrite existing files; keep a result that does not match its table.
    pub force: bool,
    /// Make the restored node the VM's current node, so the next backup branches from it.
    pub set_current: bool,
    pub lock_wait: LockWait,
}

#[derive(Debug, Clone, Serialize)]
pub struct RestoreReport {
    pub vm: String,
    pub node: String,
    pub format: Format,
    pub disks: Vec<RestoredDisk>,
    pub duration_secs: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct RestoredDisk {
    pub disk: String,
    pub path: PathBuf,
    pub virtual_size: u64,
    /// Whether the image matched the node's checking table.
    pub verified: bool,
    pub mismatched_blocks: Vec<u64>,
}

/// Restores a node into image files.
pub async fn restore(opts: &RestoreOptions) -> Result<RestoreReport> {
    let started = Instant::now();
    let repo = Repository::open(&opts.repo)?;
    let vm = repo.vm(&opts.vm)?;
    let guard = if opts.set_current {
        vm.lock_exclusive(opts.lock_wait, "restore")?
    } else {
        vm.lock_shared(opts.lock_wait)?
    };
    let mut manifest = vm.load()?;
    let node = super::find_node(&manifest, &opts.node)?.clone();
    let disks = super::select_disks(&node, &opts.disks)?;
    let outputs = output_paths(&opts.to, &disks, opts.format)?;
    for path in &outputs {
        if path.exists() && !opts.force {
            bail!(Exit::usage(format!(
                "{} exists: choose another --to or pass --force to overwrite it",
                path.display()
            )));
        }
    }

    let bins = QemuBins::from_env();
    let daemon = StorageDaemon::start(&bins).await?;
    let mut restored = Vec::new();
    let mut error = None;
    let mut damage = None;
    for (i, (disk, path)) in disks.iter().zip(&outputs).enumerate() {
        let size = node
            .disks
            .iter()
            .find(|d| &d.disk == disk)
            .map_or(0, |d| d.virtual_size);
        match restore_disk(
            &daemon,
            &bins,
            &vm,
            &manifest,
            &node,
            disk,
            i,
            path,
            size,
            opts.format,
        )
        .await
        {
            Ok(mismatched) => {
                if !mismatched.is_empty() && damage.is_none() {
                    damage = Some(super::damaged(
                        &node,
                        disk,
                        &mismatched,
                        repo.settings().block_size,
                    ));
                }
                restored.push(RestoredDisk {
                    disk: disk.clone(),
                    path: path.clone(),
                    virtual_size: size,
                    verified: mismatched.is_empty(),
                    mismatched_blocks: mismatched,
                });
            }
            Err(e) => {
                error = Some(e.context(format!("restoring disk {disk} of node {}", node.id)));
                break;
            }
        }
    }
    daemon.stop().await?;
    // A failed copy, or a damaged result without --force, leaves no output behind.
    let fatal = match (error, damage) {
        (Some(e), _) => Some(e),
        (None, Some(d)) if !opts.force => Some(d),
        (None, Some(d)) => {
            eprintln!("qmpbak: warning (kept because of --force): {d:#}");
            None
        }
        (None, None) => None,
    };
    if let Some(err) = fatal {
        for path in &outputs {
            let _ = std::fs::remove_file(path);
        }
        return Err(err);
    }
    if opts.set_current {
        manifest.current = Some(node.id.clone());
        vm.save(&manifest, &guard)?;
    }
    Ok(RestoreReport {
        vm: opts.vm.clone(),
        node: node.id.to_string(),
        format: opts.format,
        disks: restored,
        duration_secs: started.elapsed().as_secs_f64(),
    })
}

/// Where each disk's image goes.
fn output_paths(to: &Path, disks: &[String], format: Format) -> Result<Vec<PathBuf>> {
    let as_dir = to.is_dir() || disks.len() > 1 || to.as_os_str().to_string_lossy().ends_with('/');
    if as_dir {
        if !to.exists() {
            std::fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
            // Restored images hold the VM's data: private to their owner, like the repository.
            std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o700))
                .with_context(|| format!("setting the mode of {}", to.display()))?;
        }
        Ok(disks
            .iter()
            .map(|d| to.join(format!("{d}.{}", format.ext())))
            .collect())
    } else {
        if let Some(parent) = to.parent().filter(|p| !p.as_os_str().is_empty() && !p.exists()) {
            std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
            std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o700))
                .with_context(|| format!("setting the mode of {}", parent.display()))?;
        }
        Ok(vec![to.to_path_buf()])
    }
}

/// Copies one disk and checks it; returns the blocks that do not match the node's table.
#[allow(clippy::too_many_arguments)]
async fn restore_disk(
    daemon: &StorageDaemon,
    bins: &QemuBins,
    vm: &chain::VmStore,
    manifest: &chain::Manifest,
    node: &chain::Node,
    disk: &str,
    index: usize,
    path: &Path,
    size: u64,
    format: Format,
) -> Result<Vec<u64>> {
    let expected = load_node_table(vm, manifest, &node.id, disk)?;
    create_image(bins, path, size, format)?;
    let qmp = daemon.qmp();
    let chain = graph::add_chain(qmp, vm, manifest, &node.id, disk, &format!("r{index}-")).await?;
    let target = format!("out{index}");
    let job = format!("restore{index}");
    let export = format!("out{index}-x");
    let result = async {
        let driver = match format {
            Format::Qcow2 => "qcow2",
            Format::Raw => "raw",
        };
        qmp.execute_raw(
            "blockdev-add",
            Some(json!({
                "driver": driver, "node-name": target,
                "file": { "driver": "file", "filename": path, "discard": "unmap" },
                "discard": "unmap",
            })),
        )
        .await
        .with_context(|| format!("opening {} in qemu-storage-daemon", path.display()))?;
        let top = chain.top().context("empty recovery chain")?;
        qmp.execute_raw(
            "blockdev-backup",
            Some(json!({ "job-id": job, "device": top, "target": target, "sync": "full", "auto-dismiss": false })),
        )
        .await
        .context("starting the restore copy job")?;
        let outcome = qmp.wait_job(&job, RESTORE_JOB_TIMEOUT).await?;
        let _ = qmp.dismiss_job(&job).await;
        if let Some(error) = outcome.error {
            bail!(crate::exit::Exit::new(crate::exit::ExitCode::Qemu, format!("the restore copy job failed: {error}")));
        }
        if format == Format::Raw {
            punch_zero_blocks(path, &expected)?;
        }
        // Read the result back through QEMU and compare with the node's table.
        daemon.export(&target, &export, false).await?;
        let client = daemon.connect(&export).await?;
        let size = client.size();
        let source = NbdSource::new(nbd::BlockingClient::new(client, tokio::runtime::Handle::current()), size);
        let block_size = expected.block_size();
        let actual = tokio::task::spawn_blocking(move || Table::build(&source, block_size, threads()))
            .await
            .context("table builder panicked")??;
        Ok(Table::diff(&expected, &actual)?)
    }
    .await;
    let _ = qmp
        .execute_raw("block-export-del", Some(json!({ "id": export, "mode": "hard" })))
        .await;
    let _ = qmp
        .execute_raw("blockdev-del", Some(json!({ "node-name": target })))
        .await;
    graph::remove_chain(qmp, &chain).await;
    result
}

/// Makes a raw image sparse where the node's table says a block is all zero: the copy job writes zeroes as
/// allocated ranges. The read-back check that follows proves nothing else changed.
fn punch_zero_blocks(path: &Path, table: &Table) -> Result<()> {
    use nix::fcntl::{FallocateFlags, fallocate};
    use std::os::fd::AsRawFd as _;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let flags = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
    for index in (0..table.len()).filter(|&i| table.is_zero(i)) {
        let (offset, len) = table.block_range(index);
        let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
            bail!(
                "block {index} of {} lies beyond what the OS can address",
                path.display()
            );
        };
        fallocate(file.as_raw_fd(), flags, offset, len)
            .with_context(|| format!("punching a hole into {} at {offset}", path.display()))?;
    }
    file.sync_all()
        .with_context(|| format!("syncing {}", path.display()))?;
    Ok(())
}

fn create_image(bins: &QemuBins, path: &Path, size: u64, format: Format) -> Result<()> {
    let _ = std::fs::remove_file(path);
    match format {
        Format::Raw => {
            let file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(path)
                .with_context(|| format!("creating {}", path.display()))?;
            file.set_len(size)
                .with_context(|| format!("sizing {}", path.display()))?;
        }
        Format::Qcow2 => bins.create_qcow2(path, size, None)?,
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("setting the mode of {}", path.display()))?;
    Ok(())
}
