//! `mount`: a backup node's disk, read-only, without restoring it. The node's recovery chain is opened from the
//! manifest (layers named explicitly, as for restore) in a qemu-storage-daemon that exports the disk read-only
//! as a raw image file over FUSE; for file access a read-only loop device with partitions goes over that file,
//! and each file system is mounted read-only without replaying its journal (ext4 `noload`, xfs `norecovery`),
//! so a crash-consistent image mounts without a single write; a file system the kernel lacks but a FUSE driver
//! reads (vfat: fusefat) is mounted read-only through that driver. `--image-only` and `--list` need no root
//! (FUSE only; their records are the user's own, see [`state::runtime_dir`]). Before anything is exported, the
//! chain is checked against the node's checking table, as a restore does: a damaged node is refused unless
//! `--force`.
//!
//! What is set up is recorded step by step ([`state`]); [`umount`] undoes it, also after the mounting qmpbak
//! was killed, and [`clean_interrupted`] does so for every interrupted mount of a VM (`qmpbak cleanup`).

pub mod partitions;
pub mod state;

use std::ffi::OsStr;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};

use chain::{LockWait, Repository};

use crate::crashpoint::crashpoint;
use crate::exit::{Exit, ExitCode};
use crate::progress::Progress;
use crate::qemu_bins::QemuBins;
use crate::restore::Mismatched;
use crate::tables::load_node_table;
pub use partitions::Partition;
use partitions::{fuse_driver, kernel_has, mount_options, probe};
use state::{MountState, run};

/// How long qemu-storage-daemon may take to open the chain and set up its FUSE export (`--daemonize` returns
/// once it has).
pub const EXPORT_START_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a FUSE file system driver (fusefat) may take to mount a partition and detach.
pub const FUSE_MOUNT_TIMEOUT: Duration = Duration::from_secs(30);

/// What to do with the node's disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MountMode {
    /// Mount every file system read-only under the directory (needs root).
    Mount,
    /// Only list partitions, file systems and sizes; nothing stays set up.
    List,
    /// Only export the read-only disk image as `DIR/DISK.img` (no root needed).
    ImageOnly,
}

#[derive(Debug, Clone)]
pub struct MountOptions {
    pub repo: PathBuf,
    pub vm: String,
    pub node: String,
    /// The disk (qdev id); `None` for a node with one disk.
    pub disk: Option<String>,
    /// The mount point (an existing, empty directory); unused by `List`.
    pub dir: Option<PathBuf>,
    pub mode: MountMode,
    /// Mount a node whose data does not match its checking table.
    pub force: bool,
    pub lock_wait: LockWait,
    /// The key of an encrypted repository.
    pub key: Option<crate::crypt::KeySource>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MountReport {
    pub vm: String,
    pub node: String,
    pub disk: String,
    pub mode: MountMode,
    pub dir: Option<PathBuf>,
    /// The read-only raw image (FUSE export), while mounted.
    pub image: Option<PathBuf>,
    pub loop_device: Option<PathBuf>,
    pub virtual_size: u64,
    /// The partition table type (`dos`, `gpt`), if any.
    pub partition_table: Option<String>,
    pub partitions: Vec<Partition>,
    /// Whether the chain matched the node's checking table (false only with --force).
    pub verified: bool,
    pub mismatched_blocks: Vec<u64>,
}

/// The message for a mount that needs root.
fn needs_root() -> Exit {
    Exit::usage(
        "mounting file systems needs root (loop devices and mount(2)); run qmpbak mount as root, or use \
         --image-only for the read-only disk image as a file (for guestfish, qemu-img or 7z), which needs no root",
    )
}

/// Mounts, lists or exports a node's disk as `opts.mode` says.
pub async fn mount(opts: &MountOptions, progress: &dyn Progress) -> Result<MountReport> {
    if opts.mode == MountMode::Mount && !nix::unistd::geteuid().is_root() {
        bail!(needs_root());
    }
    let dir = match (&opts.dir, opts.mode) {
        (Some(dir), _) => Some(check_mount_point(dir, opts.mode).await?),
        (None, MountMode::List) => None,
        (None, _) => bail!(Exit::usage("mount needs a directory to mount into")),
    };
    let repo = Repository::open(&opts.repo)?;
    // An encrypted repository's chain is decrypted by the daemon with the key; without it, exit 3.
    let _key = crate::crypt::unlock(&repo, opts.key.as_ref())?;
    let vm = repo.vm(&opts.vm)?;
    let guard = vm.lock_shared(opts.lock_wait)?;
    let manifest = vm.load()?;
    let node = crate::nodes::find_node(&manifest, &opts.node)?.clone();
    let disk = match &opts.disk {
        Some(disk) => crate::restore::select_disks(&node, std::slice::from_ref(disk))?.remove(0),
        None if node.disks.len() == 1 => node.disks[0].disk.clone(),
        None => bail!(Exit::usage(format!(
            "node {} has {} disks: choose one with --disk ({})",
            node.id,
            node.disks.len(),
            node.disks
                .iter()
                .map(|d| d.disk.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    };
    let virtual_size = node
        .disks
        .iter()
        .find(|d| d.disk == disk)
        .map_or(0, |d| d.virtual_size);
    let bins = QemuBins::from_env();

    // The chain is checked against the node's table before anything is exported, as a restore checks it.
    let mismatched = check_chain(&bins, &vm, &manifest, &node, &disk, opts.force, progress).await?;
    if !mismatched.is_empty() {
        let damage = crate::restore::damaged(&node, &disk, &mismatched);
        if !opts.force {
            return Err(damage.context(format!(
                "refusing to mount node {} (pass --force to mount it all the same)",
                node.id
            )));
        }
        progress.warning(&format!("mounting all the same because of --force: {damage:#}"));
    }
    let files: Vec<PathBuf> = crate::direct::chain_files(&vm, &manifest, &node.id, &disk)?
        .iter()
        .map(|f| std::fs::canonicalize(f).with_context(|| format!("resolving {}", f.display())))
        .collect::<Result<_>>()?;

    let state_key = match &dir {
        Some(dir) => dir.clone(),
        // --list exports into a private place of its own, keyed by this process.
        None => PathBuf::from(format!("/list/{}", std::process::id())),
    };
    let state_dir = state::state_dir(&state_key)?;
    chain::store::create_private_dir(&state_dir)?;
    let image_created_in_dir = opts.mode == MountMode::ImageOnly;
    let image = match (&dir, image_created_in_dir) {
        (Some(dir), true) => dir.join(format!("{disk}.img")),
        _ => state_dir.join(format!("{disk}.img")),
    };
    let mut st = MountState {
        dir: state_key,
        repo: std::fs::canonicalize(&opts.repo).unwrap_or_else(|_| opts.repo.clone()),
        vm: opts.vm.clone(),
        node: node.id.to_string(),
        disk: disk.clone(),
        image: image.clone(),
        pidfile: state_dir.join("qsd.pid"),
        owner_pid: std::process::id(),
        ..MountState::default()
    };
    st.save()?;

    let outcome = async {
        export(&bins, &files, &mut st).await?;
        // The daemon has the chain open: the manifest may change from here on without affecting it.
        drop(guard);
        crashpoint("mount-exported");
        let mut report = MountReport {
            vm: opts.vm.clone(),
            node: node.id.to_string(),
            disk: disk.clone(),
            mode: opts.mode,
            dir: dir.clone(),
            image: Some(image.clone()),
            loop_device: None,
            virtual_size,
            partition_table: None,
            partitions: Vec::new(),
            verified: mismatched.is_empty(),
            mismatched_blocks: mismatched.blocks.clone(),
        };
        if opts.mode == MountMode::ImageOnly {
            return Ok(report);
        }
        let (table, partitions) = probe(&image).await?;
        report.partition_table = table;
        report.partitions = partitions;
        if opts.mode == MountMode::Mount {
            if let Some(dir) = &dir {
                mount_all(&mut st, dir, &mut report).await?;
            }
        }
        Ok::<_, anyhow::Error>(report)
    }
    .await;

    match outcome {
        Ok(mut report) if opts.mode != MountMode::List => {
            if opts.mode == MountMode::Mount && !report.partitions.iter().any(|p| p.mounted_at.is_some()) {
                let why = describe_unmounted(&report.partitions);
                state::teardown(&st).await?;
                bail!(Exit::new(
                    ExitCode::Failure,
                    format!(
                        "nothing on disk {disk} of node {} could be mounted: {why}",
                        node.id
                    )
                ));
            }
            st.complete = true;
            st.save()?;
            report.loop_device.clone_from(&st.loop_device);
            Ok(report)
        }
        Ok(mut report) => {
            state::teardown(&st).await?;
            report.image = None;
            Ok(report)
        }
        Err(e) => {
            if let Err(undo) = state::teardown(&st).await {
                return Err(e.context(format!("and undoing the mount failed too: {undo:#}")));
            }
            Err(e)
        }
    }
}

/// Checks that `dir` can be a mount point: an existing, empty directory that is not mounted by qmpbak already.
/// An earlier mount of it whose qmpbak was killed, or whose export is gone (a restart), is undone first.
async fn check_mount_point(dir: &Path, mode: MountMode) -> Result<PathBuf> {
    let dir = std::fs::canonicalize(dir).map_err(|e| {
        Exit::usage(format!(
            "{}: {e} (give an existing, empty directory)",
            dir.display()
        ))
    })?;
    if !dir.is_dir() {
        bail!(Exit::usage(format!("{} is not a directory", dir.display())));
    }
    if let Some(old) = MountState::load(&dir)? {
        if old.interrupted() || old.stale()? {
            tracing::info!(dir = %dir.display(), "undoing an interrupted or stale mount first");
            state::teardown(&old).await?;
        } else {
            bail!(Exit::usage(format!(
                "{} already holds node {} of VM {} (mounted by qmpbak): `qmpbak umount {}` first",
                dir.display(),
                old.node,
                old.vm,
                dir.display()
            )));
        }
    }
    if mode == MountMode::Mount {
        let mut entries = std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))?;
        if entries.next().is_some() {
            bail!(Exit::usage(format!(
                "{} is not empty: mount into an empty directory",
                dir.display()
            )));
        }
    }
    Ok(dir)
}

/// Hashes the node's chain and compares it with the node's checking table; the blocks that differ. A node
/// without a table cannot be checked: refused unless `force`.
async fn check_chain(
    bins: &QemuBins,
    vm: &chain::VmStore,
    manifest: &chain::Manifest,
    node: &chain::Node,
    disk: &str,
    force: bool,
    progress: &dyn Progress,
) -> Result<Mismatched> {
    let expected = match load_node_table(vm, manifest, &node.id, disk) {
        Ok(table) => table,
        Err(e) if force => {
            progress.warning(&format!("mounting unchecked because of --force: {e:#}"));
            return Ok(Mismatched::default());
        }
        Err(e) => {
            return Err(e.context(
                "the node's data cannot be checked before mounting it (--force mounts it unchecked)",
            ));
        }
    };
    let actual = crate::tables::build(
        crate::tables::DiskAt {
            bins,
            vm,
            manifest,
            node: &node.id,
            disk,
        },
        expected.scheme(),
        expected.block_size(),
        None,
    )
    .await?;
    Mismatched::between(&expected, &actual)
}

/// Starts a qemu-storage-daemon that opens the chain read-only and exports its top as the raw file
/// `st.image` over FUSE, read-only; it detaches once the export is up, and its pid is recorded.
async fn export(bins: &QemuBins, files: &[PathBuf], st: &mut MountState) -> Result<()> {
    // The FUSE mount point: an empty regular file, private to its owner.
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&st.image)
        .with_context(|| format!("creating {}", st.image.display()))?;
    // Only a file qmpbak created is ever removed again.
    st.image_created = true;
    st.save()?;
    state::make_private(&st.image, 0o600)?;
    // The starter is an owned child (dies with qmpbak, killed and reaped if the start is given up); the daemon
    // it forks with `--daemonize` is not its child, and fork clears `PR_SET_PDEATHSIG`, so the export outlives
    // this qmpbak (until `umount`).
    // An encrypted repository's key reaches the daemon through a pipe it reads once at start: what the daemon
    // keeps open while the mount lasts holds no key.
    let secret = crate::crypt::unlock::one_shot_secret()?;
    let mut cmd = bins.storage_daemon_command_inheriting(
        secret
            .iter()
            .map(crate::crypt::unlock::OneShotSecret::fd)
            .collect(),
    );
    if let Some(secret) = &secret {
        cmd.args(secret.args());
    }
    let mut below: Option<String> = None;
    for (i, file) in files.iter().enumerate() {
        let name = format!("mnt{i}");
        let mut options = crate::graph::qcow2_options(&name, file, below.as_deref(), true);
        crate::crypt::unlock::encrypt_node(&mut options);
        cmd.arg("--blockdev").arg(options.to_string());
        below = Some(name);
    }
    let top = below.context("empty recovery chain")?;
    let export = serde_json::json!({
        "type": "fuse", "id": "qmpbak", "node-name": top, "mountpoint": st.image,
        "writable": false, "allow-other": "off",
    });
    cmd.arg("--export")
        .arg(export.to_string())
        .arg("--pidfile")
        .arg(&st.pidfile)
        .arg("--daemonize")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    tracing::info!(program = %bins.storage_daemon.display(), layers = files.len(), image = %st.image.display(),
        "starting qemu-storage-daemon with a read-only FUSE export");
    let child = crate::children::spawn(&mut cmd)
        .with_context(|| format!("starting {}", bins.storage_daemon.display()))?;
    drop(secret);
    let out = tokio::time::timeout(EXPORT_START_TIMEOUT, child.output())
        .await
        .map_err(|_| {
            anyhow::anyhow!("qemu-storage-daemon did not set up its export within {EXPORT_START_TIMEOUT:?}")
        })?
        .context("waiting for qemu-storage-daemon")?;
    // Read the pid even on failure: a daemon that half started must be stopped by the teardown.
    st.daemon_pid = std::fs::read_to_string(&st.pidfile)
        .ok()
        .and_then(|t| t.trim().parse().ok());
    st.save()?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let hint = if stderr.contains("fusermount") || stderr.contains("/dev/fuse") {
            " (FUSE is needed: /dev/fuse, and fusermount3 from the fuse3 package when not root)"
        } else {
            ""
        };
        bail!(Exit::new(
            ExitCode::Qemu,
            format!(
                "qemu-storage-daemon could not export the disk ({}): {}{hint}",
                out.status,
                stderr.trim()
            )
        ));
    }
    Ok(())
}

/// Sets up the read-only loop device with partitions over the image and mounts every file system it knows
/// read-only: a whole disk at `dir`, partition N at `dir/pN`, with the kernel's driver or, where the kernel
/// lacks the file system, a FUSE driver ([`fuse_mount`]). Each step is recorded before the next.
async fn mount_all(st: &mut MountState, dir: &Path, report: &mut MountReport) -> Result<()> {
    let device = run(
        "losetup",
        &[
            "--find".as_ref(),
            "--show".as_ref(),
            "--read-only".as_ref(),
            "--partscan".as_ref(),
            st.image.as_os_str(),
        ],
    )
    .await?;
    let device = PathBuf::from(device.trim());
    st.loop_device = Some(device.clone());
    st.save()?;
    crashpoint("mount-loop");
    let partition_device = |n: u32| PathBuf::from(format!("{}p{n}", device.display()));
    let numbered: Vec<u32> = report
        .partitions
        .iter()
        .map(|p| p.number)
        .filter(|n| *n > 0)
        .collect();
    if numbered.iter().any(|n| !partition_device(*n).exists()) {
        // Some kernels (or their loop driver's settings) do not scan a loop device's partitions even with
        // --partscan: add them from the table ourselves.
        run("partx", &["--add".as_ref(), device.as_os_str()]).await?;
    }
    for part in &mut report.partitions {
        let Some(fstype) = part.fstype.clone() else {
            continue;
        };
        let Some((kind, options)) = mount_options(&fstype) else {
            part.error = Some(format!("{fstype} is not mounted (no read-only way known)"));
            continue;
        };
        let (source, target) = if part.number == 0 {
            (device.clone(), dir.to_owned())
        } else {
            let target = dir.join(format!("p{}", part.number));
            std::fs::create_dir(&target).with_context(|| format!("creating {}", target.display()))?;
            st.created_dirs.push(target.clone());
            st.save()?;
            (partition_device(part.number), target)
        };
        let mounted = match run(
            "mount",
            &[
                "-t".as_ref(),
                OsStr::new(kind),
                "-o".as_ref(),
                OsStr::new(options),
                source.as_os_str(),
                target.as_os_str(),
            ],
        )
        .await
        {
            Ok(_) => Ok(None),
            // The kernel lacks the file system (asked after the attempt, which loads its module if there is
            // one): its FUSE driver mounts it instead, where there is one.
            Err(e) if !kernel_has(kind) => match fuse_driver(kind) {
                Some(driver) => fuse_mount(driver, &source, &target, &st.state_dir()?)
                    .await
                    .map(|()| {
                        crashpoint("mount-fuse-driver");
                        Some(driver.to_owned())
                    })
                    .map_err(|fuse| {
                        fuse.context(format!("this kernel has no {kind}, and its FUSE driver failed"))
                    }),
                None => Err(e),
            },
            Err(e) => Err(e),
        };
        match mounted {
            Ok(driver) => {
                st.mounts.push(target.clone());
                st.save()?;
                part.mounted_at = Some(target);
                part.fuse_driver = driver;
            }
            Err(e) => {
                part.error = Some(format!("{e:#}"));
                if part.number > 0 && std::fs::remove_dir(&target).is_ok() {
                    st.created_dirs.retain(|d| d != &target);
                    st.save()?;
                }
            }
        }
    }
    Ok(())
}

/// Mounts the file system on device `source` at `target` read-only with FUSE driver `driver` (`fusefat`), which
/// detaches once the file system is mounted and serves it until it is unmounted. It only reads: read-only is
/// its default (writing needs its `rw+`), `ro` makes the mount itself read-only too, and `source` is a
/// partition of a read-only loop device over a read-only export, so no write could reach the image anyway.
/// The mount names `source` as its source (`fsname`), so that a teardown finds it even when it was not
/// recorded. The starting process is owned: if qmpbak dies while it starts, it dies too.
async fn fuse_mount(driver: &str, source: &Path, target: &Path, state_dir: &Path) -> Result<()> {
    if !source.is_absolute() || !target.is_absolute() {
        bail!(
            "{driver} is only given absolute paths ({}, {})",
            source.display(),
            target.display()
        );
    }
    let program = state::find_program(driver).ok_or_else(|| {
        anyhow::anyhow!("{driver} is not installed (Debian package {driver}); nothing else can mount it")
    })?;
    // Its error output goes to a private file, not a pipe: the detached driver could keep a pipe open.
    let log = state_dir.join(format!("{driver}.stderr"));
    let log_file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&log)
        .with_context(|| format!("creating {}", log.display()))?;
    let mut cmd = crate::children::command(&program);
    cmd.arg("-o")
        .arg(format!(
            "{},fsname={},subtype={driver}",
            partitions::LOCKED_DOWN,
            source.display()
        ))
        .arg(source)
        .arg(target)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log_file));
    tracing::info!(program = %program.display(), source = %source.display(), target = %target.display(),
        "mounting read-only through FUSE");
    let mut child =
        crate::children::spawn(&mut cmd).with_context(|| format!("starting {}", program.display()))?;
    let status = tokio::time::timeout(FUSE_MOUNT_TIMEOUT, child.wait())
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "{driver} did not mount {} within {FUSE_MOUNT_TIMEOUT:?}",
                source.display()
            )
        })?
        .with_context(|| format!("waiting for {driver}"))?;
    let stderr = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    if !status.success() {
        bail!("{} failed ({status}): {}", program.display(), stderr.trim());
    }
    if !state::mounts()?.iter().any(|(_, t)| t == target) {
        bail!(
            "{} exited without mounting {}: {}",
            program.display(),
            target.display(),
            stderr.trim()
        );
    }
    Ok(())
}

fn describe_unmounted(partitions: &[Partition]) -> String {
    if partitions.iter().all(|p| p.fstype.is_none()) {
        return "no file system found".to_owned();
    }
    partitions
        .iter()
        .map(|p| {
            format!(
                "{}: {}",
                if p.number == 0 {
                    "disk".to_owned()
                } else {
                    format!("p{}", p.number)
                },
                p.error.as_deref().unwrap_or("no file system")
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// What `umount` undid.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UmountReport {
    pub dir: PathBuf,
    pub vm: String,
    pub node: String,
    pub disk: String,
    /// The exported image and the loop device over it that were undone.
    pub image: PathBuf,
    pub loop_device: Option<PathBuf>,
    /// Whether the mount had been interrupted (its qmpbak killed) before it was complete.
    pub interrupted: bool,
}

impl UmountReport {
    fn of(st: &MountState) -> UmountReport {
        UmountReport {
            dir: st.dir.clone(),
            vm: st.vm.clone(),
            node: st.node.clone(),
            disk: st.disk.clone(),
            image: st.image.clone(),
            loop_device: st.loop_device.clone(),
            interrupted: !st.complete,
        }
    }
}

/// Undoes the mount at `dir` (complete, or left by a killed qmpbak).
pub async fn umount(dir: &Path) -> Result<UmountReport> {
    let abs = std::fs::canonicalize(dir)
        .unwrap_or_else(|_| std::path::absolute(dir).unwrap_or_else(|_| dir.to_owned()));
    let Some(st) = MountState::load(&abs)? else {
        bail!(Exit::usage(format!(
            "{} is not mounted by qmpbak (no record of it in {})",
            abs.display(),
            state::runtime_dir()?.display()
        )));
    };
    state::teardown(&st).await?;
    Ok(UmountReport::of(&st))
}

/// Undoes every mount of VM `vm` whose qmpbak was killed before it finished (complete mounts stay).
pub async fn clean_interrupted(vm: &str) -> Result<Vec<UmountReport>> {
    let mut undone = Vec::new();
    for st in MountState::all()? {
        if st.vm == vm && st.interrupted() {
            state::teardown(&st).await?;
            undone.push(UmountReport::of(&st));
        }
    }
    Ok(undone)
}
