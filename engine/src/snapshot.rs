//! External-snapshot time points and revert, for CI pipelines that want cheap named points to return to.
//!
//! `snapshot`: one `transaction` of `blockdev-snapshot` puts a new, empty qcow2 overlay on every disk; the files
//! below are frozen and become the increments of a `snapshot` node, recorded with where they live (host, path,
//! predecessor). No data is copied, so it takes milliseconds whatever the disk size. Overlays are created next
//! to the disk images and named `<stem>.qmpbak-<chain>-<node>[.<n>].qcow2`: the node a file's writes start
//! from can be read from its name, which makes the next snapshot that node's child. qmpbak's dirty bitmaps are
//! carried onto the overlays in the same transaction, so backups go on with bitmap incrementals.
//!
//! `revert`: with the VM paused, each disk gets a new overlay on top of the time point's frozen file, and a
//! `blockdev-mirror sync=none` job whose completion pivots the device onto it. The writes made since are
//! dropped; later time points stay as another branch of the tree.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use qmp::commands::{
    BitmapRef, BlockDirtyBitmapAdd, BlockDirtyBitmapMerge, BlockdevAdd, BlockdevDel, BlockdevMirror,
    BlockdevSnapshot, Cont, JobComplete, QueryNamedBlockNodes, QueryStatus, Stop, Transaction,
    TransactionAction,
};
use serde::{Deserialize, Serialize};
use serde_json::json;

use chain::{
    Location, LockWait, Manifest, Node, NodeDisk, NodeId, NodeKind, NodeState, Operation, Payload, RelPath,
};

use crate::bitmaps::BitmapName;
use crate::exit::Exit;
use crate::graph::short_name;
use crate::inspect::{self, DiskInfo};
use crate::progress::Progress;
use crate::qemu_bins::QemuBins;
use crate::qmp_target::Local;
use crate::recovery;
use crate::session::{self, Session};

/// Bound on the pivot job of a revert (nothing is copied: the VM is paused).
pub const PIVOT_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
pub struct SnapshotOptions {
    pub qmp: crate::qmp_target::QmpTarget,
    pub repo: PathBuf,
    pub vm: String,
    pub tag: Option<String>,
    /// Also copy the frozen increments into the repository (with checking tables), so the time point survives
    /// the loss of the VM's storage.
    pub copy: bool,
    pub lock_wait: LockWait,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotReport {
    pub vm: String,
    pub node: String,
    pub parent: Option<String>,
    /// Per disk: the frozen file (the node's increment) and the new overlay.
    pub disks: Vec<SnapshotDisk>,
    /// Milliseconds the QMP transaction took: how long the guest's I/O could notice.
    pub transaction_ms: f64,
    /// Whether the increments were copied into the repository.
    pub copied: bool,
    pub duration_secs: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotDisk {
    pub disk: String,
    pub frozen: PathBuf,
    pub overlay: PathBuf,
}

/// The image name without qmpbak's overlay suffix: `disk0.qmpbak-ab12-0003.2.qcow2` → `disk0`.
fn stem(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    match name.find(".qmpbak-") {
        Some(i) => name[..i].to_owned(),
        None => name.strip_suffix(".qcow2").unwrap_or(&name).to_owned(),
    }
}

/// A new overlay path for `disk_file` starting from `node`, not yet existing.
fn overlay_path(disk_file: &Path, chain_id: &str, node: &str) -> PathBuf {
    let dir = disk_file.parent().unwrap_or(Path::new("/"));
    let base = format!("{}.qmpbak-{chain_id}-{node}", stem(disk_file));
    let mut path = dir.join(format!("{base}.qcow2"));
    let mut n = 1;
    while path.exists() {
        path = dir.join(format!("{base}.{n}.qcow2"));
        n += 1;
    }
    path
}

fn absolute(disk: &DiskInfo) -> Result<PathBuf> {
    let path = PathBuf::from(&disk.file);
    if !path.is_absolute() || disk.format != "qcow2" {
        bail!(Exit::usage(format!(
            "disk {} is {} image {:?}: snapshots need qcow2 images opened by absolute path",
            disk.id, disk.format, disk.file
        )));
    }
    Ok(path)
}

fn operation(kind: &str, node: &NodeId, outside: &[PathBuf]) -> Operation {
    let outside_files = outside.to_vec();
    // A revert makes no node: its record names the time point in its payload.
    let (payload, makes) = if kind == "revert" {
        let time_point = node.clone();
        (
            Payload::Revert {
                time_point,
                outside_files,
            },
            None,
        )
    } else {
        (Payload::Snapshot { outside_files }, Some(node.clone()))
    };
    let mut op = Operation::new(payload, makes, chrono::Utc::now());
    op.id = format!("{kind}-{node}");
    op
}

/// Takes a time point of every disk of the VM.
pub async fn snapshot(opts: &SnapshotOptions, progress: &dyn Progress) -> Result<SnapshotReport> {
    let started = Instant::now();
    // The frozen files stay in the VM's storage, as the VM's disks do; a copy into an encrypted repository is
    // encrypted there like a backup's files, so it needs the key (the command unlocked it).
    if opts.copy {
        crate::crypt::require(&chain::Repository::open(&opts.repo)?)?;
    }
    let Session {
        repo,
        vm,
        guard,
        mut manifest,
        qmp,
        ..
    } = session::open(
        &opts.repo,
        &opts.vm,
        &opts.qmp,
        Some(Local::FilesBesideDisks),
        opts.lock_wait,
        "snapshot",
        true,
    )
    .await?;
    if let Some(tag) = &opts.tag {
        if manifest.find(tag).is_some() {
            bail!(Exit::usage(format!(
                "tag {tag:?} is already used in VM {}: tags are unique per VM",
                opts.vm
            )));
        }
    }
    let mut info = inspect::inspect(&qmp).await?;
    // Removable media (a CD-ROM's ISO) are not the VM's data: they get no overlay.
    info.disks.retain(|d| !d.removable);
    if info.disks.is_empty() {
        bail!(Exit::usage("the VM has no disks"));
    }
    refuse_encrypted_disks(&info.disks)?;
    let node = manifest.next_node_id()?;
    let chain_id = manifest.chain_id.clone();
    let bins = QemuBins::from_env();

    // The parent: the time point the frozen files' writes start from (the same for every disk, or none).
    let mut parent: Option<NodeId> = None;
    let mut frozen = Vec::new();
    for d in &info.disks {
        let file = absolute(d)?;
        let base = crate::graph::overlay_base(&file, &chain_id).and_then(|n| n.parse::<NodeId>().ok());
        let base = base.filter(|b| manifest.node(b).is_some_and(|n| n.kind == NodeKind::Snapshot));
        if frozen.is_empty() {
            parent = base;
        } else if parent != base {
            parent = None;
        }
        frozen.push(file);
    }
    let overlays: Vec<PathBuf> = frozen
        .iter()
        .map(|f| overlay_path(f, &chain_id, node.as_str()))
        .collect();
    let host = chain::host::hostname();
    let disks = info
        .disks
        .iter()
        .zip(&frozen)
        .map(|(d, f)| {
            Ok(NodeDisk {
                source_host: None,
                disk: d.id.clone(),
                file: RelPath::disk_image(&node, &d.id)?,
                backing: match &parent {
                    Some(p) => Some(RelPath::disk_image(p, &d.id)?),
                    None => None,
                },
                virtual_size: d.virtual_size,
                allocated_bytes: d.allocated_size.unwrap_or(0),
                bitmap: None,
                table: None,
                table_sha256: None,
                location: Location {
                    host: host.clone(),
                    path: f.display().to_string(),
                    predecessor: d.backing_file.clone(),
                },
            })
        })
        .collect::<Result<Vec<_>>>()?;
    manifest.add_node(Node {
        id: node.clone(),
        parent: parent.clone(),
        kind: NodeKind::Snapshot,
        created: chrono::Utc::now(),
        state: NodeState::Pending,
        tag: opts.tag.clone(),
        reason: Some("external snapshot".into()),
        lid: 0,
        tid: 0,
        disks,
    })?;
    let mut op = operation("snapshot", &node, &overlays);
    for i in 0..info.disks.len() {
        op.block_nodes.push(short_name(&chain_id, "o", node.as_str(), i));
    }
    manifest.add_operation(op.clone());
    vm.save(&manifest, &guard)?;

    let result = async {
        let mut actions = Vec::new();
        for (i, (d, (f, o))) in info.disks.iter().zip(frozen.iter().zip(&overlays)).enumerate() {
            bins.create_qcow2(o, d.virtual_size, Some(&f.display().to_string()))
                .await?;
            let name = short_name(&chain_id, "o", node.as_str(), i);
            qmp.execute(&BlockdevAdd(json!({ "driver": "qcow2", "node-name": name,
                             "file": { "driver": "file", "filename": o }, "backing": null })))
                .await
                .with_context(|| format!("opening the overlay {}", o.display()))?;
            actions.push(TransactionAction::BlockdevSnapshot(BlockdevSnapshot {
                node: d.node_name.clone(),
                overlay: name.clone(),
            }));
            // qmpbak's bitmaps move up with the disk: each is added to the overlay and filled from the frozen
            // top in the same transaction (no write falls between), so the next backup still knows everything
            // written since its base, before the time point and after it.
            for b in d.bitmaps.iter().filter(|b| carried(b, &chain_id)) {
                let granularity = u32::try_from(b.granularity)
                    .with_context(|| format!("bitmap {} has granularity {}", b.name, b.granularity))?;
                actions.push(TransactionAction::BlockDirtyBitmapAdd(BlockDirtyBitmapAdd {
                    persistent: Some(true),
                    granularity: Some(granularity),
                    ..BlockDirtyBitmapAdd::new(name.as_str(), b.name.as_str())
                }));
                actions.push(TransactionAction::BlockDirtyBitmapMerge(BlockDirtyBitmapMerge {
                    node: name.clone(),
                    target: b.name.clone(),
                    bitmaps: vec![BitmapRef::Node {
                        node: d.node_name.clone(),
                        name: b.name.clone(),
                    }],
                }));
            }
        }
        let t = Instant::now();
        qmp.execute(&Transaction::new(actions))
            .await
            .context("taking the snapshot (QMP transaction)")?;
        Ok::<_, anyhow::Error>(t.elapsed().as_secs_f64() * 1000.0)
    }
    .await;
    let transaction_ms = match result {
        Ok(ms) => ms,
        Err(err) => {
            return Err(recovery::abandon(&qmp, &vm, &mut manifest, &guard, &op, err).await);
        }
    };
    crate::crashpoint::crashpoint("snapshot-taken");
    // The time point exists in QEMU: it is recorded complete before any copy, so that a copy that fails, is
    // stopped or killed costs the copy only, never the time point.
    if let Some(n) = manifest.node_mut(&node) {
        n.state = NodeState::Complete;
    }
    // The disks are the new overlays now, carrying their bitmaps: recorded as the images the bitmaps are on.
    // Not read: the disks stay unproven, and the next backup takes the safe way.
    if let Ok(now) = inspect::inspect(&qmp).await {
        crate::identity::follow(&mut manifest, &info.disks, &now.disks);
    }
    manifest.remove_operation(&op.id);
    // The copy's own record names the files it makes in the node's directory: the next command removes what
    // a killed copy left ([`recovery::may_delete_in_repo`]: a time point without a copy uses none of them).
    let copy_op = if opts.copy {
        let mut copy_op = operation("snapshot", &node, &[]);
        copy_op.id = format!("snapshot-copy-{node}");
        for d in &info.disks {
            copy_op.files.push(RelPath::disk_image(&node, &d.id)?);
            copy_op.files.push(RelPath::disk_table(&node, &d.id)?);
        }
        manifest.add_operation(copy_op.clone());
        Some(copy_op)
    } else {
        None
    };
    vm.save(&manifest, &guard)?;
    let mut stopped = None;
    if let Some(copy_op) = copy_op {
        let interrupt = crate::signals::Interrupt::new()?;
        let copy = copy_into_repo(&vm, &mut manifest, &node, &bins, repo.settings().block_size);
        if let Err(err) = interrupt
            .run(copy, "copying the time point into the repository")
            .await
        {
            // The time point itself exists in QEMU; record it without the copy and say why.
            progress.warning(&format!(
                "copying time point {node} into the repository failed: {err:#}"
            ));
            let _ = std::fs::remove_dir_all(vm.node_dir(&node));
            if let Some(n) = manifest.node_mut(&node) {
                for d in &mut n.disks {
                    d.table = None;
                    d.table_sha256 = None;
                }
            }
            if crate::exit::classify(&err) == crate::exit::ExitCode::Interrupted {
                stopped = Some(err.context(format!(
                    "time point {node} was taken; only its copy into the repository was stopped"
                )));
            }
        }
        manifest.remove_operation(&copy_op.id);
        vm.save(&manifest, &guard)?;
    }
    if let Some(stopped) = stopped {
        return Err(stopped);
    }
    Ok(SnapshotReport {
        vm: opts.vm.clone(),
        node: node.to_string(),
        parent: parent.map(|p| p.to_string()),
        disks: info
            .disks
            .iter()
            .zip(frozen.into_iter().zip(overlays))
            .map(|(d, (frozen, overlay))| SnapshotDisk {
                disk: d.id.clone(),
                frozen,
                overlay,
            })
            .collect(),
        transaction_ms,
        copied: opts.copy && vm.node_dir(&node).exists(),
        duration_secs: started.elapsed().as_secs_f64(),
    })
}

/// Refuses a time point of a VM with an encrypted disk (LUKS, or a qcow2 with `encrypt.format=luks`, in its
/// chain): the new overlay would be a plain qcow2 holding the guest's later writes unencrypted beside the
/// encrypted image. A usage error (exit 2), before anything is changed.
fn refuse_encrypted_disks(disks: &[DiskInfo]) -> Result<()> {
    let encrypted: Vec<&str> = disks
        .iter()
        .filter(|d| d.encrypted)
        .map(|d| d.id.as_str())
        .collect();
    if encrypted.is_empty() {
        return Ok(());
    }
    bail!(Exit::usage(format!(
        "disk {} is encrypted: a time point's overlay would hold the guest's new writes unencrypted, so qmpbak \
         takes no time points of encrypted disks; back the VM up instead (into an encrypted repository); \
         nothing was changed",
        encrypted.join(", ")
    )))
}

/// Whether a bitmap of the disk moves onto a new overlay: one of this chain's, and sound (a busy, disabled or
/// inconsistent one would carry a wrong record; without it the next backup compares checking tables instead).
fn carried(b: &inspect::BitmapInfo, chain_id: &str) -> bool {
    BitmapName::parse(&b.name).is_some_and(|n| n.chain_id == chain_id)
        && b.persistent
        && b.recording
        && !b.busy
        && !b.inconsistent
}

/// Copies each frozen increment into the repository: on top of the parent's copy when there is one (the qcow2
/// backing chain then equals the tree path), flattened into a self-contained image otherwise; then builds its
/// checking table through QEMU.
async fn copy_into_repo(
    vm: &chain::VmStore,
    manifest: &mut Manifest,
    node: &NodeId,
    bins: &QemuBins,
    block_size: u64,
) -> Result<()> {
    let n = manifest.node(node).context("node vanished")?.clone();
    vm.create_node_dir(node)?;
    let parent_copied = |disk: &str| {
        n.parent
            .as_ref()
            .and_then(|p| manifest.node(p))
            .and_then(|p| p.disks.iter().find(|d| d.disk == disk))
            .filter(|d| d.table.is_some() && vm.resolve(&d.file).is_ok_and(|f| f.exists()))
    };
    let mut on_parent = Vec::new();
    let files = n
        .disks
        .iter()
        .map(|d| vm.resolve(&d.file))
        .collect::<Result<Vec<_>, _>>()?;
    let writeback = crate::writeback::EarlyWriteback::start(files.clone(), crate::writeback::Flush::Queue);
    let encrypted = crate::crypt::unlock::active().is_some();
    for (d, dst) in n.disks.iter().zip(&files) {
        let frozen = Path::new(&d.location.path);
        let stacked = parent_copied(&d.disk).is_some();
        let mut cmd = bins.img_command();
        if encrypted {
            let parent = stacked.then(|| n.parent.clone()).flatten();
            let copy = CopyOf {
                disk: d,
                frozen,
                dst,
                parent: parent.as_ref(),
            };
            encrypted_copy(&mut cmd, vm, manifest, bins, &copy).await?;
        } else if stacked {
            // The increment alone, then its header pointed at the parent's copy.
            cmd.args(["convert", "-U", "-O", "qcow2", "-B"])
                .arg(format!(
                    "../{}",
                    d.backing.as_ref().map(ToString::to_string).unwrap_or_default()
                ))
                .args(["-F", "qcow2"]);
            cmd.arg(format!(
                "json:{}",
                json!({ "driver": "qcow2", "file": { "driver": "file", "filename": frozen },
                        "backing": { "driver": "qcow2", "file": { "driver": "file",
                                     "filename": vm.resolve(d.backing.as_ref().context("no backing")?)? } } })
            ));
        } else {
            cmd.args(["convert", "-U", "-O", "qcow2"]).arg(frozen);
        }
        if !encrypted {
            cmd.arg(dst);
        }
        crate::crashpoint::pause_point("snapshot-copying").await;
        let out = bins.img_output(&mut cmd).await?;
        if !out.status.success() {
            bail!(
                "copying {} failed: {}",
                frozen.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        std::fs::set_permissions(dst, std::fs::Permissions::from_mode(0o600))?;
        on_parent.push(stacked);
    }
    writeback.stop();
    // `qemu-img convert` writes with cache=unsafe: nothing it wrote is on disk until this.
    chain::store::sync_files(&files)?;
    // Record what was copied, then build the tables (a stacked copy from its parent's table).
    if let Some(m) = manifest.node_mut(node) {
        for (d, stacked) in m.disks.iter_mut().zip(&on_parent) {
            if !stacked {
                d.backing = None;
            }
        }
    }
    let disks: Vec<(String, bool)> = n
        .disks
        .iter()
        .zip(&on_parent)
        .map(|(d, s)| (d.disk.clone(), *s))
        .collect();
    for (disk, stacked) in disks {
        let parent_table = match (stacked, &n.parent) {
            (true, Some(p)) => Some(crate::tables::load_node_table(vm, manifest, p, &disk)?),
            _ => None,
        };
        let table = crate::tables::build(
            crate::tables::DiskAt {
                bins,
                vm,
                manifest,
                node,
                disk: &disk,
            },
            chain::Scheme::default(),
            block_size,
            parent_table.as_ref(),
        )
        .await?;
        let rel = RelPath::disk_table(node, &disk)?;
        let sha = table.save(vm.resolve(&rel)?)?;
        let file = manifest
            .node(node)
            .and_then(|m| m.disks.iter().find(|d| d.disk == disk))
            .map(|d| d.file.clone());
        let stored = match file {
            Some(f) => crate::nodes::allocated_bytes(&vm.resolve(&f)?)?,
            None => 0,
        };
        if let Some(d) = manifest
            .node_mut(node)
            .and_then(|m| m.disks.iter_mut().find(|d| d.disk == disk))
        {
            d.table = Some(rel);
            d.table_sha256 = Some(sha);
            d.allocated_bytes = stored;
        }
    }
    Ok(())
}

/// The `qemu-img convert` of one frozen increment into an encrypted repository: `dst` is made first as every
/// node file there is (a copy of the repository's LUKS template, [`crate::crypt::unlock::create_node_file`]),
/// with its parent's copy as the backing named in its header when stacked, and the copy writes into it (`-n`)
/// opened with the key. The source's layers below the frozen file are the parent's copies, opened explicitly
/// with the key; a flattened copy reads the frozen file's own chain in the VM's storage.
async fn encrypted_copy(
    cmd: &mut tokio::process::Command,
    vm: &chain::VmStore,
    manifest: &Manifest,
    bins: &QemuBins,
    copy: &CopyOf<'_>,
) -> Result<()> {
    let CopyOf {
        disk: d,
        frozen,
        dst,
        parent,
    } = *copy;
    let stacked = match parent {
        Some(p) => Some((p, format!("../{}", d.backing.as_ref().context("no backing")?))),
        None => None,
    };
    let header = stacked.as_ref().map(|(_, b)| b.as_str());
    crate::crypt::unlock::create_node_file(bins, dst, d.virtual_size, header).await?;
    cmd.args(["convert", "-U", "-n", "-O", "qcow2"])
        .args(crate::crypt::unlock::qemu_img_args());
    let source = if let Some((p, b)) = &stacked {
        let below = crate::direct::chain_files(vm, manifest, p, &d.disk)?;
        cmd.args(["-B", b.as_str(), "-F", "qcow2"]);
        json!({ "driver": "qcow2", "file": { "driver": "file", "filename": frozen },
                "backing": crate::direct::chain_spec(&below) })
    } else {
        cmd.arg("--target-is-zero");
        json!({ "driver": "qcow2", "file": { "driver": "file", "filename": frozen } })
    };
    let mut target =
        json!({ "driver": "qcow2", "file": { "driver": "file", "filename": dst }, "backing": null });
    crate::crypt::unlock::encrypt_node(&mut target);
    cmd.arg(format!("json:{source}")).arg(format!("json:{target}"));
    Ok(())
}

/// One disk's copy of a time point: its record, the frozen file in the VM's storage, the new file in the
/// repository, and the parent node whose copy it stacks on (`None`: flattened).
#[derive(Clone, Copy)]
struct CopyOf<'a> {
    disk: &'a NodeDisk,
    frozen: &'a Path,
    dst: &'a Path,
    parent: Option<&'a NodeId>,
}

#[derive(Debug, Clone)]
pub struct RevertOptions {
    pub qmp: crate::qmp_target::QmpTarget,
    pub repo: PathBuf,
    pub vm: String,
    pub node: String,
    pub lock_wait: LockWait,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RevertReport {
    pub vm: String,
    pub node: String,
    pub disks: Vec<SnapshotDisk>,
    pub duration_secs: f64,
}

/// Makes the running VM continue from time point `node` on new overlays.
pub async fn revert(opts: &RevertOptions) -> Result<RevertReport> {
    let started = Instant::now();
    let Session {
        vm,
        guard,
        mut manifest,
        qmp,
        ..
    } = session::open(
        &opts.repo,
        &opts.vm,
        &opts.qmp,
        Some(Local::FilesBesideDisks),
        opts.lock_wait,
        "revert",
        false,
    )
    .await?;
    let target = crate::nodes::find_node(&manifest, &opts.node)?.clone();
    if target.kind != NodeKind::Snapshot {
        bail!(Exit::usage(format!(
            "node {} is a {} backup, not a time point: use `qmpbak restore` for backups",
            target.id, target.kind
        )));
    }
    let info = inspect::inspect(&qmp).await?;
    let chain_id = manifest.chain_id.clone();
    let bins = QemuBins::from_env();
    let mut plan = Vec::new();
    for (i, nd) in target.disks.iter().enumerate() {
        let Some(d) = info.disks.iter().find(|d| d.id == nd.disk) else {
            bail!(Exit::usage(format!(
                "the VM has no disk {} that time point {} has",
                nd.disk, target.id
            )));
        };
        let frozen = PathBuf::from(&nd.location.path);
        if !frozen.exists() {
            bail!(
                "the frozen file {} of time point {} is gone",
                frozen.display(),
                target.id
            );
        }
        let overlay = overlay_path(&absolute(d)?, &chain_id, target.id.as_str());
        plan.push((i, d.clone(), frozen, overlay));
    }
    let overlays: Vec<PathBuf> = plan.iter().map(|p| p.3.clone()).collect();
    let mut op = operation("revert", &target.id, &overlays);
    // A suffix no block node uses yet: the previous revert's overlay may still be the disks' top.
    let existing = qmp.execute(&QueryNamedBlockNodes { flat: Some(true) }).await?;
    let seq = (0u32..10_000)
        .find(|n| {
            let name = short_name(&chain_id, &format!("a{n}"), target.id.as_str(), 0);
            !existing
                .iter()
                .any(|node| node.node_name.as_deref() == Some(name.as_str()))
        })
        .unwrap_or(0);
    for (i, ..) in &plan {
        op.jobs.push(short_name(&chain_id, "p", target.id.as_str(), *i));
        op.block_nodes
            .push(short_name(&chain_id, &format!("a{seq}"), target.id.as_str(), *i));
        op.block_nodes
            .push(short_name(&chain_id, "f", target.id.as_str(), *i));
    }
    manifest.add_operation(op.clone());
    vm.save(&manifest, &guard)?;

    let was_running = qmp.execute(&QueryStatus).await?.running;
    if was_running {
        qmp.execute(&Stop)
            .await
            .context("pausing the VM for the switch")?;
    }
    let result = switch(&qmp, &bins, &chain_id, &target, seq, &plan).await;
    if was_running {
        qmp.execute(&Cont).await.context("resuming the VM")?;
    }
    if let Err(err) = result {
        return Err(recovery::abandon(&qmp, &vm, &mut manifest, &guard, &op, err).await);
    }
    manifest.remove_operation(&op.id);
    manifest.current = Some(target.id.clone());
    // The disks continue from the time point on new overlays: the images its checking tables are compared with.
    // Not read: the disks stay unproven, and the next backup takes the safe way.
    if let Ok(now) = inspect::inspect(&qmp).await {
        let reverted: Vec<DiskInfo> = now
            .disks
            .into_iter()
            .filter(|d| target.disks.iter().any(|nd| nd.disk == d.id))
            .collect();
        crate::identity::note_images(&mut manifest, &reverted);
    }
    vm.save(&manifest, &guard)?;
    Ok(RevertReport {
        vm: opts.vm.clone(),
        node: target.id.to_string(),
        disks: plan
            .into_iter()
            .map(|(_, d, frozen, overlay)| SnapshotDisk {
                disk: d.id,
                frozen,
                overlay,
            })
            .collect(),
        duration_secs: started.elapsed().as_secs_f64(),
    })
}

/// Pivots each disk onto a new overlay over the time point's frozen file, then drops the old overlay if it
/// was one of qmpbak's and no time point froze it.
async fn switch(
    qmp: &qmp::Qmp,
    bins: &QemuBins,
    chain_id: &str,
    target: &Node,
    seq: u32,
    plan: &[(usize, DiskInfo, PathBuf, PathBuf)],
) -> Result<()> {
    let nodes = qmp.execute(&QueryNamedBlockNodes { flat: Some(true) }).await?;
    let node_for = |path: &Path| {
        nodes.iter().find_map(|n| {
            (n.drv == "qcow2" && n.file == path.display().to_string())
                .then(|| n.node_name.clone())
                .flatten()
        })
    };
    for (i, d, frozen, overlay) in plan {
        let backing = if let Some(name) = node_for(frozen) {
            name
        } else {
            // Not in the graph any more: open it (and what its header names below it) read-only.
            let name = short_name(chain_id, "f", target.id.as_str(), *i);
            qmp.execute(&BlockdevAdd(
                json!({ "driver": "qcow2", "node-name": name, "read-only": true,
                             "file": { "driver": "file", "filename": frozen } }),
            ))
            .await
            .with_context(|| format!("opening {}", frozen.display()))?;
            name
        };
        bins.create_qcow2(overlay, d.virtual_size, Some(&frozen.display().to_string()))
            .await?;
        let name = short_name(chain_id, &format!("a{seq}"), target.id.as_str(), *i);
        qmp.execute(&BlockdevAdd(json!({ "driver": "qcow2", "node-name": name,
                         "file": { "driver": "file", "filename": overlay }, "backing": backing })))
            .await
            .with_context(|| format!("opening the overlay {}", overlay.display()))?;
        let job = short_name(chain_id, "p", target.id.as_str(), *i);
        // QEMU starts a mirror only from a root node. Under a filter (throttle, ...) that is the filter; the
        // pivot then replaces the format node below it, so the filter stays on top of the new overlay.
        let mut mirror = BlockdevMirror::new(
            job.as_str(),
            d.root_node.as_str(),
            name.as_str(),
            qmp::MirrorSyncMode::None,
        );
        if d.root_node != d.node_name {
            mirror.replaces = Some(d.node_name.clone());
        }
        qmp.execute(&mirror)
            .await
            .with_context(|| format!("starting the switch of disk {}", d.id))?;
        let status = qmp
            .wait_job_status(&job, &[qmp::JobStatus::Ready], PIVOT_TIMEOUT)
            .await?;
        if status != qmp::JobStatus::Ready {
            let outcome = qmp.wait_job(&job, PIVOT_TIMEOUT).await?;
            let _ = qmp.dismiss_job(&job).await;
            bail!(
                "the switch of disk {} failed: {}",
                d.id,
                outcome.error.unwrap_or_default()
            );
        }
        qmp.execute(&JobComplete::new(job.as_str())).await?;
        let outcome = qmp.wait_job(&job, PIVOT_TIMEOUT).await?;
        qmp.dismiss_job(&job).await?;
        if let Some(error) = outcome.error {
            bail!("the switch of disk {} failed: {error}", d.id);
        }
        // The old top is detached now; drop it if it is a qmpbak overlay that no time point froze.
        let old = PathBuf::from(&d.file);
        let ours = old
            .file_name()
            .is_some_and(|n| n.to_string_lossy().contains(&format!(".qmpbak-{chain_id}-")));
        if ours
            && &old != frozen
            && crate::graph::names_overlay_node(chain_id, &d.node_name)
            && qmp.execute(&BlockdevDel::new(d.node_name.as_str())).await.is_ok()
        {
            let _ = std::fs::remove_file(&old);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_names_carry_their_base_node() {
        let p = overlay_path(Path::new("/vm/disk0.qcow2"), "ab12cd34", "0003");
        assert_eq!(p, Path::new("/vm/disk0.qmpbak-ab12cd34-0003.qcow2"));
        assert_eq!(
            crate::graph::overlay_base(&p, "ab12cd34").as_deref(),
            Some("0003")
        );
        assert_eq!(
            crate::graph::overlay_base(Path::new("/vm/disk0.qmpbak-ab12cd34-0007.4.qcow2"), "ab12cd34")
                .as_deref(),
            Some("0007")
        );
        assert_eq!(
            crate::graph::overlay_base(Path::new("/vm/disk0.qcow2"), "ab12cd34"),
            None
        );
        assert_eq!(crate::graph::overlay_base(&p, "ffffffff"), None);
        assert_eq!(stem(Path::new("/vm/disk0.qmpbak-ab12cd34-0007.4.qcow2")), "disk0");
    }
}
