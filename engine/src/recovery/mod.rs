//! Recovery: what happens to an operation that did not finish. Before qmpbak touches QEMU it writes an
//! operation record into the manifest naming every job, block node, bitmap and file it will create, and what
//! its kind needs ([`chain::Payload`]); on success the record goes away in the same atomic manifest write that
//! completes the node. A run that fails undoes what its record names ([`abandon`]); when a run dies (SIGKILL,
//! power loss), the next command finds the record ([`recover`]) and removes what is left, in QEMU
//! ([`undo_in_qemu`]) and on disk ([`undo_on_disk`]), and marks the node failed, except for the two kinds that
//! cannot be undone and are finished instead: a commit ([`commit`]) and a live restore ([`live`]). Removal is
//! idempotent: things already gone are skipped. Records are data from a file and are not trusted: what they
//! name is checked before anything is deleted ([`may_delete_in_repo`], [`outside_file_problem`]).
//!
//! This module depends on the `qmp` and `chain` crates and on naming and inspection helpers, never on the
//! commands whose records it finishes.

pub mod commit;
pub mod live;
pub mod view;

use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use anyhow::Result;
use qmp::commands::{
    BlockDirtyBitmapRemove, BlockExportDel, BlockdevDel, JobCancel, JobDismiss, NbdServerStop,
    QueryBlockExports, QueryNamedBlockNodes,
};

use chain::{LockGuard, Manifest, NodeId, NodeState, Operation, Payload, RelPath, VmStore};

/// How long a leftover job may take to stop after `job-cancel`.
pub const CANCEL_TIMEOUT: Duration = Duration::from_secs(60);

/// What a cleanup removed, for the output.
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
pub struct Cleaned {
    pub operations: Vec<String>,
    pub jobs: Vec<String>,
    pub block_nodes: Vec<String>,
    pub bitmaps: Vec<String>,
    pub files: Vec<String>,
    pub failed_nodes: Vec<String>,
    /// Records left in place, each with what it needs to be finished.
    pub pending: Vec<String>,
    /// Files a record named outside the repository that were not removed, each with the reason: only files
    /// provably qmpbak's own overlays, beside an image of the running VM, are ever removed.
    pub kept_outside: Vec<String>,
    /// Devices put back on the node they were attached to before a pull's copy-before-write view.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub devices_restored: Vec<String>,
    /// Whether a VM that an interrupted backup paused was resumed.
    #[serde(skip_serializing_if = "std::ops::Not::not", default)]
    pub resumed_vm: bool,
    /// Whether the guest's filesystems, which an interrupted backup froze (`--quiesce`), were thawed.
    #[serde(skip_serializing_if = "std::ops::Not::not", default)]
    pub thawed_guest: bool,
    /// What could not be undone in QEMU, each with the reason (a device left on a filter, a VM left paused).
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub left_in_qemu: Vec<String>,
}

impl Cleaned {
    pub fn is_empty(&self) -> bool {
        self.operations.is_empty()
            && self.pending.is_empty()
            && self.kept_outside.is_empty()
            && self.left_in_qemu.is_empty()
    }
}

/// Cancels (if still running) and dismisses a job; `false` if QEMU does not know it.
pub async fn stop_job(qmp: &qmp::Qmp, id: &str) -> bool {
    let Ok(Some(job)) = qmp.job_info(id).await else {
        return false;
    };
    if job.status != qmp::JobStatus::Concluded {
        let _ = qmp.execute(&JobCancel::new(id)).await;
        let _ = qmp.wait_job(id, CANCEL_TIMEOUT).await;
    }
    let _ = qmp.execute(&JobDismiss::new(id)).await;
    true
}

/// Removes in QEMU what an operation record names: jobs, then block nodes (in the recorded order, newest
/// first), then bitmaps. Safe to call on things that no longer exist.
pub async fn undo_in_qemu(
    qmp: &qmp::Qmp,
    vm: &VmStore,
    chain_id: &str,
    op: &Operation,
    cleaned: &mut Cleaned,
) {
    // A record is data from a file: it never makes qmpbak cancel, delete or remove what is not its own of
    // this chain (another tool's job or bitmap, another repository's backup of the same VM).
    let (jobs, block_nodes, bitmaps) = owned_by_chain(op, chain_id);
    let view = match &op.payload {
        Payload::Backup { view: Some(v), .. } => Some(v),
        _ => None,
    };
    // A VM a pull paused for its view's instant runs again first.
    if let Some(v) = view {
        match view::resume(qmp, v).await {
            Ok(resumed) => cleaned.resumed_vm |= resumed,
            Err(e) => cleaned.left_in_qemu.push(format!(
                "THE VM MAY STILL BE PAUSED: {e:#}; resume it with `cont`"
            )),
        }
    }
    // Then a guest an interrupted `--quiesce` froze is thawed (its agent answers only while the VM runs).
    if let Payload::Backup {
        frozen_by: Some(agent),
        ..
    } = &op.payload
    {
        match thaw_guest(agent).await {
            Ok(true) => cleaned.thawed_guest = true,
            Ok(false) => {}
            Err(e) => cleaned.left_in_qemu.push(format!(
                "THE GUEST'S FILESYSTEMS MAY STILL BE FROZEN: {e:#}; thaw them with guest-fsfreeze-thaw through \
                 the guest agent"
            )),
        }
    }
    // NBD exports an operation made are named after its id; the NBD server is stopped only if it started it.
    if let Ok(exports) = qmp.execute(&QueryBlockExports).await {
        for export in exports.iter().filter(|e| e.id.starts_with(op.id.as_str())) {
            let _ = qmp.execute(&BlockExportDel::hard(export.id.as_str())).await;
        }
    }
    if op.payload.started_nbd_server() {
        let _ = qmp.execute(&NbdServerStop).await;
    }
    for job in jobs {
        if stop_job(qmp, job).await {
            cleaned.jobs.push(job.clone());
        }
    }
    let mut left: Vec<&String> = Vec::new();
    for node in block_nodes {
        if qmp.execute(&BlockdevDel::new(node.as_str())).await.is_ok() {
            cleaned.block_nodes.push(node.clone());
        } else {
            left.push(node);
        }
    }
    // A pull's copy-before-write view: once its snapshot-access nodes are gone (they take the filter's file
    // child's write permission), each device goes back to its node, and then the filters and what they held
    // can go.
    if let Some(v) = view {
        match view::switch_back(qmp, op, v).await {
            Ok(devices) => cleaned.devices_restored.extend(devices),
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "a device stays on a copy-before-write filter");
                cleaned.left_in_qemu.push(format!("{e:#}"));
            }
        }
        for node in left {
            if qmp.execute(&BlockdevDel::new(node.as_str())).await.is_ok() {
                cleaned.block_nodes.push(node.clone());
            }
        }
    }
    // An encrypted repository's key, given to QEMU for the run (`crypt::unlock::add_secret`): anyone with the
    // VM's QMP socket could read it back. Taken out whether or not this process holds a key (`cleanup` needs
    // none), once the nodes that opened files with it are gone; no such object is no error.
    crate::crypt::unlock::forget_secret(qmp).await;
    for bitmap in bitmaps {
        let remove = BlockDirtyBitmapRemove::new(bitmap.node.as_str(), bitmap.name.as_str());
        if qmp.execute(&remove).await.is_ok() {
            cleaned.bitmaps.push(format!("{}:{}", bitmap.node, bitmap.name));
        }
    }
    if let Payload::Backup { scratch, .. } = &op.payload {
        for (i, path) in scratch.iter().enumerate() {
            if let Some(why) = scratch_problem(path, op, chain_id, vm.dir().parent().unwrap_or(vm.dir())) {
                tracing::warn!(path = %path.display(), why, "not emptying a scratch image the record names");
                continue;
            }
            if empty_scratch(qmp, &format!("qmpbak-empty-{i}"), path)
                .await
                .is_ok()
            {
                cleaned.files.push(path.display().to_string());
            }
        }
    }
}

/// Thaws the guest's filesystems through the guest agent at `agent`, which the record names as the one a run
/// froze them through: `Ok(true)` when thawed, `Ok(false)` when no such socket exists any more (the VM it
/// belonged to is gone, and its guest with it). A record is data from a file: only an absolute path to a
/// socket is ever connected to.
async fn thaw_guest(agent: &Path) -> Result<bool> {
    use std::os::unix::fs::FileTypeExt as _;
    match std::fs::symlink_metadata(agent) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            tracing::warn!(agent = %agent.display(), "the guest agent an interrupted --quiesce froze the guest through is gone: nothing to thaw");
            return Ok(false);
        }
        Ok(meta) if agent.is_absolute() && meta.file_type().is_socket() => {}
        _ => anyhow::bail!(
            "the record names {} as the guest agent, which is not an absolute path to a socket",
            agent.display()
        ),
    }
    let n = qmp::qga::GuestAgent::connect(agent)
        .await?
        .thaw_retrying()
        .await?;
    tracing::info!(
        filesystems = n,
        "thawed the guest's filesystems an interrupted backup froze"
    );
    Ok(true)
}

/// The jobs, block nodes and bitmaps of `op`'s record that qmpbak names for chain `chain_id`
/// ([`crate::graph::short_name`], [`crate::bitmaps::BitmapName`], a pull's frozen bitmaps); each other one is
/// left alone, with a warning.
fn owned_by_chain<'o>(
    op: &'o Operation,
    chain_id: &str,
) -> (Vec<&'o String>, Vec<&'o String>, Vec<&'o chain::BitmapRecord>) {
    let prefix = crate::graph::chain_prefix(chain_id);
    let refuse = |what: &str, name: &str| {
        tracing::warn!(
            what,
            name,
            chain = chain_id,
            "the record names what is not qmpbak's of this chain: left alone"
        );
    };
    let named = |what: &'static str, names: &'o [String]| -> Vec<&'o String> {
        names
            .iter()
            .filter(|n| {
                n.starts_with(&prefix) || {
                    refuse(what, n);
                    false
                }
            })
            .collect()
    };
    let bitmaps = op
        .bitmaps
        .iter()
        .filter(|b| {
            let ours = crate::bitmaps::BitmapName::parse(&b.name).is_some_and(|n| n.chain_id == chain_id)
                || crate::backup::is_frozen_bitmap_of(chain_id, &b.name);
            if !ours {
                refuse("bitmap", &b.name);
            }
            ours
        })
        .collect();
    (
        named("job", &op.jobs),
        named("block node", &op.block_nodes),
        bitmaps,
    )
}

/// Why a scratch image that `op`'s record names may not be emptied (`None`: it may). A record is data from a
/// file: only an absolute, plain path outside the repository `repo_dir` whose name is a scratch image of
/// chain `chain_id` and the record's own node qualifies ([`crate::backup::scratch_name`]), and, where this
/// host can see it, only a regular file or none: QEMU follows a symlink and would empty what it points to.
pub fn scratch_problem(path: &Path, op: &Operation, chain_id: &str, repo_dir: &Path) -> Option<&'static str> {
    if !path.is_absolute()
        || path
            .components()
            .any(|c| !matches!(c, Component::RootDir | Component::Normal(_)))
    {
        return Some("not an absolute plain path");
    }
    if path.starts_with(repo_dir) {
        return Some("inside the repository, where no scratch image is ever made");
    }
    let name = path.file_name().and_then(|n| n.to_str())?;
    let node = op.node.as_ref()?;
    let suffix_ok = name
        .strip_suffix(".qcow2")
        .and_then(|n| n.rsplit_once("-scratch"))
        .is_some_and(|(rest, disk)| {
            !disk.is_empty()
                && disk.bytes().all(|b| b.is_ascii_digit())
                && rest.ends_with(&format!(".qmpbak-{chain_id}-{node}"))
        });
    if !suffix_ok {
        return Some("not named as a scratch image of the record's chain and node");
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.is_file() => Some("not a regular file (a symlink?)"),
        _ => None,
    }
}

/// Empties a scratch image in the VM's QEMU (QMP cannot delete files): `blockdev-create` of the file again with
/// size 0, through job `job`.
pub async fn empty_scratch(qmp: &qmp::Qmp, job: &str, path: &Path) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let options = serde_json::json!({"driver": "file", "filename": path, "size": 0});
    qmp.execute(&qmp::commands::BlockdevCreate {
        job_id: job.to_owned(),
        options,
    })
    .await
    .with_context(|| format!("emptying {}", path.display()))?;
    let outcome = qmp.wait_job(job, CANCEL_TIMEOUT).await;
    let _ = qmp.execute(&JobDismiss::new(job)).await;
    match outcome?.error {
        Some(e) => anyhow::bail!("emptying {}: {e}", path.display()),
        None => Ok(()),
    }
}

/// The image files QEMU has open, so that cleanup never deletes one a VM is using; `None` when QEMU cannot be
/// asked (then no file outside the repository is removed).
pub async fn open_files(qmp: Option<&qmp::Qmp>) -> Option<Vec<PathBuf>> {
    let nodes = qmp?
        .execute(&QueryNamedBlockNodes { flat: Some(true) })
        .await
        .ok()?;
    Some(
        nodes
            .into_iter()
            .filter(|n| !n.file.is_empty())
            .map(|n| PathBuf::from(n.file))
            .collect(),
    )
}

/// Whether a file that operation `op`'s record names inside the repository may be deleted. A record is data
/// from a file, so it is not trusted: only a file directly in a node's directory (`<node>/<name>`) qualifies,
/// never one that a node of the manifest uses — except the files of the record's own node while that node is
/// not complete (the backup being undone).
pub fn may_delete_in_repo(manifest: &Manifest, op: &Operation, file: &RelPath) -> bool {
    let parts: Vec<Component<'_>> = file.as_path().components().collect();
    let in_node_dir = parts.len() == 2
        && matches!(parts[0], Component::Normal(dir) if dir.to_str().is_some_and(|d| d.parse::<NodeId>().is_ok()));
    if !in_node_dir {
        return false;
    }
    !manifest
        .nodes
        .iter()
        .filter(|n| !(Some(&n.id) == op.node.as_ref() && n.state != NodeState::Complete))
        .flat_map(|n| n.disks.iter().map(move |d| (n, d)))
        .any(|(n, d)| {
            // A time point's disk has a file in the repository only when it was copied there (with a table).
            let file_used = n.kind != chain::NodeKind::Snapshot || d.table.is_some();
            (file_used && d.file == *file) || d.table.as_ref() == Some(file)
        })
}

/// Why a file that `op`'s record names outside the repository may not be deleted (`None`: it may). It must be
/// an absolute, plain path to a regular file named as one of this chain's overlays for the record's node
/// (`<stem>.qmpbak-<chain>-<node>….qcow2`, as `snapshot` and `revert` create them), beside an image the running
/// VM has open, and not open itself. A tampered record can therefore name nothing else.
pub fn outside_file_problem(
    path: &Path,
    manifest: &Manifest,
    op: &Operation,
    in_use: Option<&[PathBuf]>,
) -> Option<String> {
    if !path.is_absolute()
        || path
            .components()
            .any(|c| !matches!(c, Component::RootDir | Component::Normal(_)))
    {
        return Some("not an absolute path of plain names".into());
    }
    let node = op.node.as_ref().map(NodeId::as_str);
    if crate::graph::overlay_base(path, &manifest.chain_id).as_deref() != node || node.is_none() {
        return Some(format!(
            "not named as an overlay of chain {} for node {}",
            manifest.chain_id,
            node.unwrap_or("-")
        ));
    }
    let Some(in_use) = in_use else {
        return Some("QEMU could not be asked which files the VM uses (give --socket)".into());
    };
    if !in_use.iter().any(|f| f.parent() == path.parent()) {
        return Some("not beside any image the VM has open".into());
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.is_file() => Some("not a regular file".into()),
        _ => None,
    }
}

/// Removes the files an operation record names (inside the repository, and `outside`: absolute paths a
/// snapshot created next to the VM's disks) and the node's directory if it is left empty. A file QEMU still
/// has open (`in_use`) is never deleted, nor one the record may not name ([`may_delete_in_repo`],
/// [`outside_file_problem`]); those outside the repository are listed in `cleaned.kept_outside`. With
/// `qemu_remote` (QEMU reached over TCP, perhaps on another host) the files beside the VM's disks are not
/// this host's to judge: none is deleted, each is listed.
pub fn undo_on_disk(
    vm: &VmStore,
    manifest: &Manifest,
    op: &Operation,
    in_use: Option<&[PathBuf]>,
    qemu_remote: bool,
    cleaned: &mut Cleaned,
) {
    let inside = op
        .files
        .iter()
        .filter(|f| may_delete_in_repo(manifest, op, f))
        .filter_map(|f| vm.resolve(f).ok());
    let outside = op.payload.outside_files().iter().filter(|path| {
        if qemu_remote {
            cleaned.kept_outside.push(format!(
                "{}: beside the VM's disks on the VM's host (QEMU is reached over TCP); remove it there",
                path.display()
            ));
            return false;
        }
        match outside_file_problem(path, manifest, op, in_use) {
            None => true,
            Some(why) => {
                if path.exists() {
                    cleaned.kept_outside.push(format!("{}: {why}", path.display()));
                }
                false
            }
        }
    });
    for path in inside.chain(outside.cloned()) {
        if in_use.is_some_and(|open| open.contains(&path)) {
            continue;
        }
        // Never through a symlink: what is removed is the file the record names, or nothing.
        if !std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_file()) {
            continue;
        }
        if std::fs::remove_file(&path).is_ok() {
            cleaned.files.push(path.display().to_string());
        }
    }
    if let Some(node) = &op.node {
        let _ = std::fs::remove_dir(vm.node_dir(node));
    }
}

/// Finishes every operation record in the manifest, as its kind says ([`Payload`]): a commit or a live restore
/// is finished in the running VM (without one it stays, listed in `pending`); a record that could not be read
/// stops recovery; any other is undone in QEMU (when connected) and on disk, and its node marked failed. The
/// manifest is saved once. Called at the start of every command that changes a VM, under the exclusive lock,
/// so no other qmpbak can own these records. On an error, the record at fault and those after it stay.
pub async fn recover(
    qmp: Option<&qmp::Qmp>,
    vm: &VmStore,
    manifest: &mut Manifest,
    guard: &LockGuard,
) -> Result<Cleaned> {
    let mut cleaned = Cleaned::default();
    if manifest.operations.is_empty() {
        return Ok(cleaned);
    }
    let operations = std::mem::take(&mut manifest.operations);
    for (i, op) in operations.iter().enumerate() {
        let failed = match (&op.payload, qmp) {
            (Payload::Unreadable { was }, _) => Some(anyhow::anyhow!(
                "the {was} record {} could not be read (its note: {:?}): nothing was done; remove the record \
                 from the manifest only if you know what that operation did",
                op.id,
                op.legacy_note.as_deref().unwrap_or("")
            )),
            // Finished only in the running VM, and (both judge and remove files beside the VM's disks) only
            // from the VM's host.
            // Across hosts: finished here, with the chain served again, when the command can serve it.
            (Payload::LiveRestore { served: Some(served) }, Some(qmp)) => {
                if let Some(how) = live::served_problem(served) {
                    cleaned.pending.push(format!(
                        "{}: an interrupted live restore across hosts, {how}",
                        op.id
                    ));
                    manifest.operations.push(op.clone());
                    continue;
                }
                match live::finish_served(qmp, vm, manifest, op, served, &crate::progress::Silent).await {
                    Ok(()) => {
                        cleaned.jobs.extend(op.jobs.iter().cloned());
                        cleaned.block_nodes.extend(op.block_nodes.iter().cloned());
                        None
                    }
                    Err(e) => Some(e.context(format!("finishing the interrupted live restore {}", op.id))),
                }
            }
            (Payload::Commit(_) | Payload::LiveRestore { .. }, qmp)
                if qmp.is_none_or(qmp::Qmp::is_remote) =>
            {
                let what = if matches!(op.payload, Payload::LiveRestore { .. }) {
                    "live restore"
                } else {
                    "commit"
                };
                let how = match (qmp, &op.payload) {
                    (None, Payload::LiveRestore { served: Some(_) }) => {
                        "finished only in the running VM: give --qmp (and --serve-tls-dir)"
                    }
                    (None, _) => "finished only in the running VM: give --socket",
                    (Some(_), _) => "finished only from the VM's host: give --socket there",
                };
                cleaned
                    .pending
                    .push(format!("{}: an interrupted {what}, {how}", op.id));
                manifest.operations.push(op.clone());
                continue;
            }
            // An emptiness check's record names only things in QEMU: without QEMU it stays, or they would be
            // left there unknown.
            (Payload::EmptyCheck {}, None) => {
                cleaned.pending.push(format!(
                    "{}: an interrupted live restore's emptiness check, its NBD server and exports are in the \
                     VM's QEMU: give --socket (or --qmp)",
                    op.id
                ));
                manifest.operations.push(op.clone());
                continue;
            }
            // Finished if any increment left its graph (a commit cannot be undone), else nothing changed.
            (Payload::Commit(record), Some(qmp)) => {
                commit::finish(qmp, manifest, op, record, &mut cleaned.kept_outside)
                    .await
                    .err()
                    .map(|e| e.context(format!("finishing the interrupted commit {}", op.id)))
            }
            // A live restore cannot be undone once the VM runs on the chain: finish it instead.
            (Payload::LiveRestore { .. }, Some(qmp)) => {
                match live::finish(qmp, op, &crate::progress::Silent).await {
                    Ok(()) => {
                        cleaned.jobs.extend(op.jobs.iter().cloned());
                        cleaned.block_nodes.extend(op.block_nodes.iter().cloned());
                        None
                    }
                    Err(e) => Some(e.context(format!("finishing the interrupted live restore {}", op.id))),
                }
            }
            _ => {
                let left = cleaned.left_in_qemu.len();
                match undo(qmp, vm, manifest, op, &mut cleaned).await {
                    Err(e) => Some(e),
                    Ok(()) => (cleaned.left_in_qemu.len() > left).then(|| {
                        anyhow::anyhow!(
                            "the interrupted {} could not be undone in QEMU: {}; its record stays, and the next \
                             qmpbak command on this VM (or `qmpbak cleanup`) tries again",
                            op.id,
                            cleaned.left_in_qemu[left..].join("; ")
                        )
                    }),
                }
            }
        };
        if let Some(err) = failed {
            manifest.operations.extend(operations[i..].iter().cloned());
            vm.save(manifest, guard)?;
            return Err(err);
        }
        cleaned.operations.push(op.id.clone());
    }
    vm.save(manifest, guard)?;
    Ok(cleaned)
}

/// Undoes an interrupted operation that can be undone: in QEMU (when connected) and on disk, then marks its node
/// failed, saying by whom and when it was interrupted. Fails, leaving everything to the next run, when the
/// connection to a remote QEMU is lost meanwhile ([`lost_remote_qemu`]).
async fn undo(
    qmp: Option<&qmp::Qmp>,
    vm: &VmStore,
    manifest: &mut Manifest,
    op: &Operation,
    cleaned: &mut Cleaned,
) -> Result<()> {
    if let Some(qmp) = qmp {
        undo_in_qemu(qmp, vm, &manifest.chain_id, op, cleaned).await;
        if let Some(why) = lost_remote_qemu(qmp, op) {
            anyhow::bail!(why);
        }
    }
    let in_use = open_files(qmp).await;
    let remote = qmp.is_some_and(qmp::Qmp::is_remote);
    undo_on_disk(vm, manifest, op, in_use.as_deref(), remote, cleaned);
    if let Some(node) = op.node.as_ref().and_then(|id| manifest.node_mut(id)) {
        if node.state == NodeState::Pending {
            node.state = NodeState::Failed;
            let why = format!(
                "interrupted (pid {} on {}, started {})",
                op.pid, op.host, op.started
            );
            node.reason = Some(match node.reason.take() {
                Some(r) => format!("{r}; {why}"),
                None => why,
            });
            cleaned.failed_nodes.push(node.id.to_string());
        }
    }
    Ok(())
}

/// Why `op`'s record must stay after an undo in QEMU (`None`: it may go): the connection to a QEMU on another
/// host ended, so what the run made there (NBD server, exports, fleece job and overlay, frozen bitmaps, scratch)
/// may still be there, reachable only through this record. A QEMU on this host whose monitor closed has
/// exited, and its nodes, jobs and exports with it.
pub fn lost_remote_qemu(qmp: &qmp::Qmp, op: &Operation) -> Option<String> {
    (qmp.is_remote() && qmp.is_closed()).then(|| {
        format!(
            "the connection to QEMU at {} was lost before the {} {} could be undone there: its record stays, and \
             `qmpbak cleanup --qmp ...` (or the next backup of this VM) finishes the undo once QEMU is reachable",
            qmp.path().display(),
            op.kind(),
            op.id
        )
    })
}

/// Undoes a failed operation from its record (in QEMU, then on disk, never touching files QEMU uses), marks its
/// node failed with the error, and drops the record: the one way a command gives up on a run it started
/// (backup, snapshot, revert). The old bitmaps are untouched, so the next backup still sees every change.
/// Returns the error to report: `err`, with a word on the record left in place if the manifest could not be
/// written (the next command finishes the undo from it).
pub async fn abandon(
    qmp: &qmp::Qmp,
    vm: &VmStore,
    manifest: &mut Manifest,
    guard: &LockGuard,
    op: &Operation,
    err: anyhow::Error,
) -> anyhow::Error {
    let mut cleaned = Cleaned::default();
    undo_in_qemu(qmp, vm, &manifest.chain_id, op, &mut cleaned).await;
    let lost = lost_remote_qemu(qmp, op);
    // The repository key's secret, if this process gave QEMU one for the run (an encrypted backup).
    crate::crypt::unlock::remove_secret(qmp).await;
    let in_use = open_files(Some(qmp)).await;
    undo_on_disk(vm, manifest, op, in_use.as_deref(), qmp.is_remote(), &mut cleaned);
    if let Some(n) = op.node.as_ref().and_then(|id| manifest.node_mut(id)) {
        if n.state == NodeState::Pending {
            n.state = NodeState::Failed;
            n.reason = Some(format!("{err:#}"));
        }
    }
    // What could not be undone in QEMU (a device left on a filter), or a remote QEMU that was lost, keeps the
    // record for the next command.
    let err = if lost.is_some() {
        err
    } else if cleaned.left_in_qemu.is_empty() {
        manifest.remove_operation(&op.id);
        err
    } else {
        err.context(format!(
            "the failed {} could not be undone in QEMU: {}; its record stays, and the next qmpbak command on \
             this VM (or `qmpbak cleanup`) tries again",
            op.kind(),
            cleaned.left_in_qemu.join("; ")
        ))
    };
    match vm.save(manifest, guard) {
        Ok(()) => match lost {
            Some(why) => err.context(why),
            None => err,
        },
        Err(e) => err.context(format!(
            "the failed {} could not be recorded in the manifest ({e:#}); its record stays, and the next \
             qmpbak command on this VM (or `qmpbak cleanup`) finishes the undo",
            op.kind()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, payload: Payload) -> Operation {
        let mut op = Operation::new(payload, None, chrono::Utc::now());
        op.id = id.to_owned();
        op
    }

    #[tokio::test]
    async fn an_unreadable_record_stops_recovery_and_it_and_the_records_after_it_stay() {
        let dir = tempfile::tempdir().unwrap();
        let repo = chain::Repository::init(dir.path().join("repo")).unwrap();
        let vm = repo.create_vm("vm1").unwrap();
        let guard = vm.lock_exclusive(chain::LockWait::NoWait, "test").unwrap();
        let mut manifest = vm.load().unwrap();
        let before = record(
            "prune-a",
            Payload::Prune {
                policy: String::new(),
                removing: Vec::new(),
            },
        );
        let unreadable = record("commit-0003", Payload::Unreadable { was: "commit".into() });
        let after = record(
            "backup-0004",
            Payload::Backup {
                nbd_server_started: false,
                scratch: Vec::new(),
                view: None,
                frozen_by: None,
            },
        );
        for op in [&before, &unreadable, &after] {
            manifest.add_operation(op.clone());
        }
        vm.save(&manifest, &guard).unwrap();
        let err = recover(None, &vm, &mut manifest, &guard).await.unwrap_err();
        assert!(format!("{err:#}").contains("could not be read"), "{err:#}");
        let kept: Vec<&str> = manifest.operations.iter().map(|o| o.id.as_str()).collect();
        assert_eq!(kept, ["commit-0003", "backup-0004"]);
        assert_eq!(vm.load().unwrap().operations, manifest.operations);
    }

    #[tokio::test]
    async fn without_qemu_a_commit_a_live_restore_and_an_emptiness_check_stay_pending() {
        let dir = tempfile::tempdir().unwrap();
        let repo = chain::Repository::init(dir.path().join("repo")).unwrap();
        let vm = repo.create_vm("vm1").unwrap();
        let guard = vm.lock_exclusive(chain::LockWait::NoWait, "test").unwrap();
        let mut manifest = vm.load().unwrap();
        manifest.add_operation(record("restore-0002", Payload::LiveRestore { served: None }));
        manifest.add_operation(record(
            "commit-0003",
            Payload::Commit(chain::CommitRecord {
                node: "0003".parse().unwrap(),
                parent: "0002".parse().unwrap(),
                disks: Vec::new(),
            }),
        ));
        manifest.add_operation(record("empty-check-x", Payload::EmptyCheck {}));
        let cleaned = recover(None, &vm, &mut manifest, &guard).await.unwrap();
        assert_eq!(cleaned.pending.len(), 3, "{cleaned:?}");
        assert!(cleaned.pending[0].contains("live restore"), "{cleaned:?}");
        assert!(cleaned.pending[2].contains("emptiness check"), "{cleaned:?}");
        assert!(cleaned.operations.is_empty());
        assert_eq!(manifest.operations.len(), 3);
    }
}
