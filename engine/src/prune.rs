//! `prune`: thin a VM's backup tree out by a retention policy ([`chain::retention`]). Leaves that go are
//! deleted; an interior node that goes is first absorbed by each of its children: `qemu-img rebase` in safe mode
//! copies into the child whatever differs between the node's chain and its parent's, so the child reads exactly
//! as before and its checking table keeps its content; a child's table that is a difference against the node's
//! is written anew against the node's parent (or whole) before the node leaves. Nodes go one at a time,
//! bottom-up.
//!
//! Prune never needs QEMU running: the VM's dirty bitmaps count from the current node, which is always kept.
//! Before any file changes, an operation record (kind `prune`) lists the plan. Every step leaves a tree that
//! restores exactly: a half-rebased child still reads correctly through its old backing file, and a node leaves
//! the manifest (its files moving into the record) before its files are deleted. The next prune (or merge)
//! deletes what a killed one left in its record and plans afresh, which finishes the job; any other command's
//! cleanup deletes the recorded files too.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use chain::retention::{self, Action, Decision, Policy};
use chain::{
    LockGuard, LockWait, Manifest, NodeId, NodeKind, Operation, Payload, RelPath, Repository, VmStore,
};

use crate::crashpoint::crashpoint;
use crate::exit::Exit;
use crate::progress::Progress;
use crate::qemu_bins::QemuBins;

/// What to prune and how.
#[derive(Debug, Clone)]
pub struct PruneOptions {
    pub repo: PathBuf,
    pub vm: String,
    pub policy: Policy,
    /// Only plan: change nothing.
    pub dry_run: bool,
    pub lock_wait: LockWait,
}

/// The outcome of a prune, as printed by `--json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PruneReport {
    pub vm: String,
    pub dry_run: bool,
    pub policy: Policy,
    /// A decision per node, in tree order (preorder).
    pub plan: Vec<Decision>,
    /// The nodes removed (for a dry run: that would be), in the order they went.
    pub removed: Vec<String>,
    /// The removed nodes that were merged into their children first.
    pub merged: Vec<MergedNode>,
    /// Bytes of the files removed (for a dry run: the manifest's sizes of the nodes that would go).
    pub removed_bytes: u64,
    /// Bytes the children's files grew by absorbing their parents (a dry run cannot know: 0).
    pub added_bytes: u64,
    /// `removed_bytes - added_bytes`.
    pub freed_bytes: i64,
    /// Interrupted prunes and merges whose leftovers this run removed first.
    pub leftovers: Leftovers,
}

/// A node merged into its children.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MergedNode {
    pub node: String,
    pub into: Vec<String>,
}

/// What an interrupted prune or merge left behind and was removed.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Leftovers {
    pub operations: Vec<String>,
    pub files: Vec<String>,
    pub freed_bytes: u64,
}

/// Prunes a VM's tree by `opts.policy`.
pub async fn prune(opts: &PruneOptions, progress: &dyn Progress) -> Result<PruneReport> {
    if opts.policy.is_empty() {
        bail!(Exit::usage(
            "prune needs a policy: give --keep-last, --keep-daily, --keep-weekly, --keep-monthly or --keep-tag"
        ));
    }
    let repo = Repository::open(&opts.repo)?;
    crate::crypt::require(&repo)?;
    let vm = repo.vm(&opts.vm)?;
    let guard = if opts.dry_run {
        vm.lock_shared(opts.lock_wait)?
    } else {
        vm.lock_exclusive(opts.lock_wait, "prune")?
    };
    let mut manifest = vm.load()?;
    let leftovers = if opts.dry_run {
        Leftovers::default()
    } else {
        finish_leftovers(&vm, &mut manifest, &guard)?
    };
    refuse_other_operations(&manifest)?;
    refuse_symlinks(&vm, &manifest)?;
    let plan = retention::plan(&manifest, &opts.policy)?;
    let mut report = PruneReport {
        vm: opts.vm.clone(),
        dry_run: opts.dry_run,
        policy: opts.policy,
        plan: plan.decisions.clone(),
        removed: plan.order.iter().map(ToString::to_string).collect(),
        merged: plan
            .removals()
            .filter(|d| d.action == Action::MergeIntoChildren)
            .map(|d| MergedNode {
                node: d.node.to_string(),
                into: d.into.iter().map(ToString::to_string).collect(),
            })
            .collect(),
        removed_bytes: 0,
        added_bytes: 0,
        freed_bytes: 0,
        leftovers,
    };
    if opts.dry_run {
        report.removed_bytes = plan
            .order
            .iter()
            .filter_map(|id| manifest.node(id))
            .map(crate::render::node_size)
            .sum();
        report.freed_bytes = signed(report.removed_bytes);
        return Ok(report);
    }
    if plan.order.is_empty() {
        return Ok(report);
    }

    let payload = Payload::Prune {
        policy: describe(&opts.policy),
        removing: plan.order.clone(),
    };
    let mut op = Operation::new(payload, None, chrono::Utc::now());
    op.id = format!("prune-{}", op.id);
    manifest.add_operation(op.clone());
    vm.save(&manifest, &guard)?;

    let mut run = Run {
        vm: &vm,
        guard: &guard,
        bins: QemuBins::from_env(),
        op_id: op.id.clone(),
        manifest,
        rebased: 0,
        removed_bytes: 0,
        added_bytes: 0,
    };
    for decision in plan.removals() {
        match decision.action {
            Action::Delete => {
                progress.phase(&format!("deleting {}", decision.node));
                run.delete(&decision.node)?;
            }
            Action::MergeIntoChildren => {
                progress.phase(&format!(
                    "merging {} into {}",
                    decision.node,
                    report
                        .merged
                        .iter()
                        .find(|m| m.node == decision.node.as_str())
                        .map(|m| m.into.join(", "))
                        .unwrap_or_default()
                ));
                run.merge_into_children(&decision.node).await?;
            }
            Action::Keep | Action::Skip => {}
        }
    }
    run.manifest.remove_operation(&run.op_id);
    vm.save(&run.manifest, &guard)?;
    report.removed_bytes = run.removed_bytes;
    report.added_bytes = run.added_bytes;
    report.freed_bytes = signed(run.removed_bytes) - signed(run.added_bytes);
    Ok(report)
}

fn signed(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The policy in words, for the operation record.
fn describe(policy: &Policy) -> String {
    let mut parts = Vec::new();
    for (n, what) in [
        (policy.keep_last, "last"),
        (policy.keep_daily, "daily"),
        (policy.keep_weekly, "weekly"),
        (policy.keep_monthly, "monthly"),
    ] {
        if n > 0 {
            parts.push(format!("keep-{what} {n}"));
        }
    }
    if policy.keep_tagged {
        parts.push("keep-tag".to_owned());
    }
    parts.join(", ")
}

/// Refuses to work beside an unfinished operation of another kind: a backup or restore that died may still
/// have files of the chain open in QEMU, and only `qmpbak cleanup` (with the VM's socket) can tell. An
/// interrupted prune or merge is no obstacle: every step of theirs leaves a tree that restores exactly.
pub(crate) fn refuse_other_operations(manifest: &Manifest) -> Result<()> {
    let others: Vec<&Operation> = manifest.operations.iter().filter(|o| !is_ours(o)).collect();
    if let Some(op) = others.first() {
        bail!(
            "VM {} has an unfinished {} operation ({}, pid {} on {}, started {}); run `qmpbak cleanup --repo … --vm {} \
             --socket …` first",
            manifest.vm,
            op.kind(),
            op.id,
            op.pid,
            op.host,
            op.started.format("%Y-%m-%d %H:%M:%S"),
            manifest.vm
        );
    }
    Ok(())
}

/// Refuses a repository in which a node's directory or file is a symlink. Prune and merge rewrite and delete
/// node files, and `qemu-img` follows the relative backing names in their headers through any symlink: one
/// that points out of the repository would let them change files elsewhere.
pub(crate) fn refuse_symlinks(vm: &VmStore, manifest: &Manifest) -> Result<()> {
    for node in &manifest.nodes {
        let dir = vm.node_dir(&node.id);
        let files = node
            .disks
            .iter()
            .flat_map(|d| std::iter::once(&d.file).chain(&d.table))
            .map(|rel| vm.dir().join(rel.as_path()));
        for path in std::iter::once(dir).chain(files) {
            if std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink()) {
                bail!(Exit::new(
                    crate::exit::ExitCode::Repository,
                    format!(
                        "{} is a symlink: prune and merge change files only in a repository without symlinks \
                         (replace it with the directory or file it points to); nothing was changed",
                        path.display()
                    )
                ));
            }
        }
    }
    Ok(())
}

fn is_ours(op: &Operation) -> bool {
    matches!(op.payload, Payload::Prune { .. } | Payload::Merge { .. })
}

/// Finishes what an interrupted prune or merge left: deletes the files its record names that no node of the
/// manifest uses (the files of nodes that had already left the manifest, a merge's temporary files) and their
/// directories when empty, and drops the record. Whatever step the run died at, the tree it left restores
/// exactly; the next prune plans afresh from it, and a merge can simply be run again.
pub fn finish_leftovers(vm: &VmStore, manifest: &mut Manifest, guard: &LockGuard) -> Result<Leftovers> {
    let mut leftovers = Leftovers::default();
    let ours: Vec<Operation> = manifest
        .operations
        .iter()
        .filter(|o| is_ours(o))
        .cloned()
        .collect();
    if ours.is_empty() {
        return Ok(leftovers);
    }
    for op in &ours {
        let mut dirs = Vec::new();
        for file in &op.files {
            // Only files of node directories that no node uses: a record cannot name the manifest, a lock or
            // a kept node's file.
            if !crate::recovery::may_delete_in_repo(manifest, op, file) {
                continue;
            }
            let path = vm.resolve(file)?;
            if let Ok(meta) = std::fs::symlink_metadata(&path) {
                if meta.is_file() {
                    std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
                    leftovers.freed_bytes += chain::fsio::allocated(&meta);
                    leftovers.files.push(path.display().to_string());
                }
            }
            if let Some(dir) = path.parent() {
                if !dirs.iter().any(|d: &PathBuf| d == dir) {
                    dirs.push(dir.to_owned());
                }
            }
        }
        for dir in dirs {
            let node_gone = dir
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.parse::<NodeId>().ok())
                .is_some_and(|id| manifest.node(&id).is_none());
            if node_gone && dir != vm.dir() {
                let _ = std::fs::remove_dir(&dir);
            }
        }
        manifest.remove_operation(&op.id);
        leftovers.operations.push(op.id.clone());
    }
    vm.save(manifest, guard)?;
    Ok(leftovers)
}

/// After a prune or merge was stopped by SIGINT/SIGTERM (its children reaped, its lock released): finishes its
/// operation record at once, as the next prune or merge would, and returns `err` saying what was done.
pub fn finish_interrupted(repo: &Path, vm: &str, err: anyhow::Error) -> anyhow::Error {
    let finish = || -> Result<Leftovers> {
        let repo = Repository::open(repo)?;
        let vm = repo.vm(vm)?;
        let guard = vm.lock_exclusive(LockWait::NoWait, "prune")?;
        let mut manifest = vm.load()?;
        finish_leftovers(&vm, &mut manifest, &guard)
    };
    match finish() {
        Ok(left) if left.operations.is_empty() => err,
        Ok(left) => err.context(format!(
            "finished its record: removed {} file(s) that had already left the tree",
            left.files.len()
        )),
        Err(e) => err.context(format!(
            "its record stays and the next prune or merge finishes it ({e:#})"
        )),
    }
}

/// A prune being carried out.
struct Run<'a> {
    vm: &'a VmStore,
    guard: &'a LockGuard,
    bins: QemuBins,
    op_id: String,
    manifest: Manifest,
    /// Children rebased so far (for the crash point after the first).
    rebased: usize,
    removed_bytes: u64,
    added_bytes: u64,
}

/// A child's disk after it absorbed its parent's layer.
struct Absorbed {
    child: NodeId,
    disk: String,
    backing: Option<RelPath>,
    allocated: u64,
}

impl Run<'_> {
    /// Removes a node that nothing is based on: out of the manifest (its files into the record), then its
    /// files.
    fn delete(&mut self, id: &NodeId) -> Result<()> {
        let files = node_files(self.vm, id)?;
        self.manifest.remove_node(id)?;
        self.drop_files(id, &files)
    }

    /// Each child of `id` absorbs its layer (`qemu-img rebase` onto `id`'s own backing); then `id` leaves the
    /// manifest, its children moving up to its parent (a child of a root becomes a full), and its files go.
    async fn merge_into_children(&mut self, id: &NodeId) -> Result<()> {
        let node = self
            .manifest
            .node(id)
            .with_context(|| format!("node {id} vanished from the manifest"))?
            .clone();
        let children: Vec<chain::Node> = self.manifest.children(id)?.into_iter().cloned().collect();
        let mut absorbed = Vec::new();
        for child in &children {
            for disk in &child.disks {
                let Some(backing) = &disk.backing else {
                    continue;
                };
                let Some(layer) = node.disks.iter().find(|d| d.disk == disk.disk) else {
                    bail!(
                        "cannot merge node {id} into {}: its disk {} is based on {id}, which has no such disk",
                        child.id,
                        disk.disk
                    );
                };
                if *backing != layer.file {
                    bail!(
                        "cannot merge node {id} into {}: its disk {} is based on {backing}, not on {}",
                        child.id,
                        disk.disk,
                        layer.file
                    );
                }
                let path = self.vm.resolve(&disk.file)?;
                // Every layer is checked before any program opens one.
                let files = crate::direct::chain_files(self.vm, &self.manifest, &child.id, &disk.disk)?;
                let before = crate::nodes::allocated_bytes(&path)?;
                repair_header(&self.bins, &path, Some(backing)).await?;
                rebase(&self.bins, &files, layer.backing.as_ref()).await?;
                self.rebased += 1;
                if self.rebased == 1 {
                    crashpoint("prune-rebased");
                }
                let after = crate::nodes::allocated_bytes(&path)?;
                self.added_bytes += after.saturating_sub(before);
                self.removed_bytes += before.saturating_sub(after);
                absorbed.push(Absorbed {
                    child: child.id.clone(),
                    disk: disk.disk.clone(),
                    backing: layer.backing.clone(),
                    allocated: after,
                });
            }
        }
        // The children's difference tables name this node's table as their base: each is written anew, as a
        // difference against the node's parent or whole, before the node leaves. The new files enter the record
        // first (a run killed before the switch leaves them to be deleted; that manifest write happens before
        // the children's new backing files are noted, which only the write that removes the node may say), the
        // switch happens in the write that removes the node, and the old files are deleted with the node's.
        let rewrites = self.rewrite_tables(&children, node.parent.as_ref())?;
        for a in absorbed {
            let predecessor = match &a.backing {
                Some(b) => Some(self.vm.resolve(b)?.display().to_string()),
                None => None,
            };
            let disk = self
                .manifest
                .node_mut(&a.child)
                .and_then(|c| c.disks.iter_mut().find(|d| d.disk == a.disk))
                .with_context(|| format!("node {} vanished from the manifest", a.child))?;
            disk.backing = a.backing;
            disk.allocated_bytes = a.allocated;
            disk.location.predecessor = predecessor;
        }
        let mut files = node_files(self.vm, id)?;
        crate::tables::switch_rewrites(&mut self.manifest, &rewrites)?;
        for (r, _) in &rewrites {
            files.push((Some(r.old.clone()), self.vm.resolve(&r.old)?));
        }
        self.manifest.remove_node_reparent(id)?;
        for child in &children {
            if let Some(c) = self.manifest.node_mut(&child.id) {
                if c.parent.is_none() && c.kind != NodeKind::Full {
                    c.kind = NodeKind::Full;
                    c.reason = Some(format!(
                        "a full since prune merged its parent {id} into it (it was {})",
                        child.kind
                    ));
                }
            }
        }
        self.drop_files(id, &files)
    }

    /// Writes the tables of `children` that are differences against their parent's (the node about to go)
    /// anew, against `new_parent` or whole ([`crate::tables::write_rewrite`]), after recording their names in
    /// the operation record. Returns them with their sha256s, for the manifest to switch to.
    fn rewrite_tables(
        &mut self,
        children: &[chain::Node],
        new_parent: Option<&NodeId>,
    ) -> Result<Vec<(crate::tables::Rewrite, String)>> {
        let mut planned = Vec::new();
        for child in children {
            planned.extend(crate::tables::rewrites_for(self.vm, child, new_parent)?);
        }
        if planned.is_empty() {
            return Ok(Vec::new());
        }
        let op = self
            .manifest
            .operations
            .iter_mut()
            .find(|o| o.id == self.op_id)
            .context("the prune's operation record vanished")?;
        op.files.extend(planned.iter().map(|r| r.new.clone()));
        self.vm.save(&self.manifest, self.guard)?;
        let mut written = Vec::new();
        for r in planned {
            let sha = crate::tables::write_rewrite(self.vm, &self.manifest, &r, new_parent)?;
            // The old file goes with the node's (counted as removed); the new one stays.
            self.added_bytes += crate::nodes::allocated_bytes(&self.vm.resolve(&r.new)?)?;
            written.push((r, sha));
        }
        crashpoint("prune-tables-rewritten");
        Ok(written)
    }

    /// Records `files` (of node `id`, which has just left the manifest) in the operation record in the same
    /// manifest write, then deletes them and the node's directory.
    fn drop_files(&mut self, id: &NodeId, files: &[(Option<RelPath>, PathBuf)]) -> Result<()> {
        let op = self
            .manifest
            .operations
            .iter_mut()
            .find(|o| o.id == self.op_id)
            .context("the prune's operation record vanished")?;
        op.files.extend(files.iter().filter_map(|(rel, _)| rel.clone()));
        self.vm.save(&self.manifest, self.guard)?;
        crashpoint("prune-dropped");
        for (_, path) in files {
            let bytes = crate::nodes::allocated_bytes(path)?;
            std::fs::remove_file(path).with_context(|| format!("removing {}", path.display()))?;
            self.removed_bytes += bytes;
        }
        let dir = self.vm.node_dir(id);
        if is_real_dir(&dir) {
            std::fs::remove_dir(&dir).with_context(|| {
                format!(
                    "removing {} (it holds files that are not the node's)",
                    dir.display()
                )
            })?;
        }
        Ok(())
    }
}

/// Whether `path` is a directory itself (not a symlink to one).
fn is_real_dir(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.is_dir())
}

/// The regular files in a node's directory, as manifest paths and absolute paths (none if it has no
/// directory: a failed backup may not).
fn node_files(vm: &VmStore, id: &NodeId) -> Result<Vec<(Option<RelPath>, PathBuf)>> {
    let dir = vm.node_dir(id);
    if !is_real_dir(&dir) {
        return Ok(Vec::new());
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        if !entry.file_type().is_ok_and(|t| t.is_file()) {
            continue;
        }
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        // A name qmpbak does not write (a hidden temporary file …) is deleted too, but cannot be recorded.
        files.push((format!("{id}/{name}").parse::<RelPath>().ok(), entry.path()));
    }
    files.sort();
    Ok(files)
}

/// The backing file name in a qcow2 header (`None` for a standalone image).
pub async fn header_backing(bins: &QemuBins, path: &Path) -> Result<Option<String>> {
    let out = bins
        .img_output(
            bins.img_command()
                .args(["info", "-U", "-f", "qcow2", "--output=json"])
                .arg(path),
        )
        .await?;
    if !out.status.success() {
        bail!(
            "qemu-img info {} failed: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).context("parsing qemu-img info")?;
    Ok(info["backing-filename"].as_str().map(str::to_owned))
}

/// The header form of a manifest backing path: relative to the node file's directory.
fn header_form(backing: &RelPath) -> String {
    format!("../{backing}")
}

/// Makes the backing file named in `path`'s header the one the manifest says (`qemu-img rebase -u`, a header
/// change only). They differ only after an interrupted prune or merge, where the image reads the same over
/// either: a child that absorbed its parent before the manifest said so, or a merged node that is complete by
/// itself.
async fn repair_header(bins: &QemuBins, path: &Path, backing: Option<&RelPath>) -> Result<()> {
    let want = backing.map(header_form);
    if header_backing(bins, path).await? == want {
        return Ok(());
    }
    let mut cmd = bins.img_command();
    cmd.args(["rebase", "-q", "-u"]);
    match &want {
        Some(b) => cmd.args(["-F", "qcow2", "-b", b]),
        None => cmd.args(["-b", ""]),
    };
    if crate::crypt::unlock::active().is_some() {
        // An encrypted file opens only with its key: named by a `json:` description, not a path.
        cmd.args(crate::crypt::unlock::qemu_img_args())
            .arg(format!("json:{}", image_spec(path, &serde_json::Value::Null)));
    } else {
        cmd.args(["-f", "qcow2"]).arg(path);
    }
    run_img(&mut cmd, bins, path).await
}

/// The `json:` description of the qcow2 at `path` (writable) over `backing` (a chain spec or null), with the
/// repository key's options when one is unlocked.
fn image_spec(path: &Path, backing: &serde_json::Value) -> serde_json::Value {
    let mut spec = serde_json::json!({
        "driver": "qcow2",
        "file": { "driver": "file", "filename": path },
        "backing": backing,
    });
    crate::crypt::unlock::encrypt_node(&mut spec);
    spec
}

/// `qemu-img rebase` (safe mode) of the image at the top of `files` onto `backing`, or onto nothing: copies
/// into the image whatever reads differently through the new backing chain, then rewrites its header.
/// `files` is the image's recovery chain from the manifest ([`crate::direct::chain_files`], whose files are
/// checked before any program opens them), bottom first, the image last and the layer it absorbs just below
/// it. No layer is found through a header, which a tampered repository could point anywhere (and an encrypted
/// layer opens only with the key): the safe rebase copies with the old and new backing chains described in
/// full (`json:`), which leaves a `json:` description in the header; a second, header-only rebase writes the
/// relative path there. Killed between the two, the image reads the same, and [`repair_header`] finishes the
/// header on the next run.
///
/// The child is owned ([`crate::children`]): if the command is stopped, it is killed and reaped before the
/// lock goes. A half-rebased image still reads correctly through its old backing file.
pub(crate) async fn rebase(bins: &QemuBins, files: &[PathBuf], backing: Option<&RelPath>) -> Result<()> {
    let (Some((path, old)), true) = (files.split_last(), files.len() >= 2) else {
        bail!("a rebase needs the image and the layer it absorbs");
    };
    let new = &old[..old.len() - 1];
    let image = format!("json:{}", image_spec(path, &crate::direct::chain_spec(old)));
    let mut cmd = bins.img_command();
    cmd.args(["rebase", "-q"])
        .args(crate::crypt::unlock::qemu_img_args());
    match backing {
        Some(_) => cmd.args([
            "-F",
            "qcow2",
            "-b",
            &format!("json:{}", crate::direct::chain_spec(new)),
        ]),
        None => cmd.args(["-b", ""]),
    };
    run_img(cmd.arg(image), bins, path).await?;
    if backing.is_some() {
        // The header names the new chain as a `json:` description here, until the next rebase.
        crashpoint("prune-explicit-rebased");
        repair_header(bins, path, backing).await?;
    }
    Ok(())
}

async fn run_img(cmd: &mut tokio::process::Command, bins: &QemuBins, path: &Path) -> Result<()> {
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let child = crate::children::spawn(cmd).with_context(|| format!("running {}", bins.img.display()))?;
    crate::crashpoint::pause_point("prune-rebasing").await;
    let out = child
        .output()
        .await
        .with_context(|| format!("running {}", bins.img.display()))?;
    if !out.status.success() {
        bail!(
            "qemu-img rebase of {} failed: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
