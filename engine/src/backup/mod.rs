//! `backup`: a full, incremental or differential backup of a running VM into its chain in a repository.
//!
//! One QMP `transaction` starts the copy jobs of every selected disk and adds the dirty bitmaps for the next
//! backup, so the disks are backed up at one instant and no write falls between two backups. Copy jobs use
//! `sync=bitmap` with `bitmap-mode=never`, so the bitmap a backup reads is left untouched whatever happens; only
//! after the new node is recorded as complete is the old bitmap removed. A failed, cancelled or killed backup
//! therefore never loses a change. When the bitmaps cannot be trusted, the disk is read at one instant through
//! an image-fleecing overlay and compared block by block with the base node's checking table ([`fleece`]).

mod copy;
mod fleece;
mod jobs;
mod pull;
mod view;

pub(crate) use pull::split_listen;
pub use pull::{
    DEFAULT_NBD_LISTEN, DEFAULT_NBD_PORT, DEFAULT_NBD_PORTS, PullOptions, is_frozen_bitmap_of, scratch_name,
};

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use chain::{
    BitmapRecord, Location, LockGuard, LockWait, Manifest, Node, NodeDisk, NodeId, NodeKind, NodeState,
    Operation, Payload, RelPath, VmStore,
};

use crate::bitmaps::{BitmapName, BitmapState, Role};
use crate::crashpoint::crashpoint;
use crate::exit::{Exit, ExitCode};
use crate::inspect::{self, DiskInfo};
use crate::plan::{self, ChainFacts, DiskFacts, Level, Method, Plan, Requested};
use crate::progress::Progress;
use crate::qemu_bins::QemuBins;
use crate::recovery;
use crate::signals::Interrupt;

/// Bound on one copy job, start to end. Large: a job's speed is the disk's; the progress output shows it moving.
pub const DEFAULT_JOB_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// What to back up and how.
#[derive(Debug, Clone)]
pub struct BackupOptions {
    pub qmp: crate::qmp_target::QmpTarget,
    pub repo: PathBuf,
    pub vm: String,
    pub level: Requested,
    /// Only these disks (ids as `qmpbak info` shows them); empty means all.
    pub disks: Vec<String>,
    pub exclude: Vec<String>,
    /// Bytes per second per disk, 0 = unlimited.
    pub speed_limit: u64,
    pub compress: bool,
    pub tag: Option<String>,
    /// Quiesce: freeze the guest's filesystems through the guest agent at this socket around the transaction.
    pub qga: Option<PathBuf>,
    pub lock_wait: LockWait,
    pub job_timeout: Duration,
    /// Back up encrypted disks into a repository that is not encrypted (their contents then stored decrypted).
    pub allow_plaintext: bool,
    /// Pull the disks over NBD instead of having QEMU write into the repository ([`pull`]).
    pub pull: Option<PullOptions>,
}

/// The outcome of a backup, as printed by `--json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackupReport {
    pub vm: String,
    pub node: String,
    pub parent: Option<String>,
    pub level: std::borrow::Cow<'static, str>,
    pub method: std::borrow::Cow<'static, str>,
    pub reason: String,
    pub disks: Vec<DiskReport>,
    pub duration_secs: f64,
    /// Of `duration_secs`, the time spent building checking tables after the copy (0 when the copy built them,
    /// as a checksum-diff does).
    pub tables_secs: f64,
    /// Whether the guest's filesystems were frozen for the backup instant.
    pub quiesced: bool,
    /// What an earlier, interrupted run left behind and this run removed.
    pub cleaned: recovery::Cleaned,
    /// Drives of the VM this backup did not copy, and why (removable media, empty drives).
    pub skipped: Vec<Skipped>,
    /// Encrypted disks stored decrypted in this repository (`--allow-plaintext`).
    pub plaintext_of_encrypted: Vec<String>,
    /// Of a pull: how the VM's QEMU kept the point-in-time view (`copy-before-write`: a filter and
    /// `snapshot-access`, the VM paused for the instant; `fleece`: a `blockdev-backup sync=none` job).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub view: Option<std::borrow::Cow<'static, str>>,
}

/// A drive a backup left out by itself (not one the user excluded).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Skipped {
    pub disk: String,
    pub reason: String,
}

/// Per-disk figures of a backup.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiskReport {
    pub disk: String,
    pub virtual_size: u64,
    /// Guest bytes the backup copied (for a checksum-diff: the blocks that differed).
    pub copied_bytes: u64,
    /// Bytes the node's file takes on the host.
    pub stored_bytes: u64,
    /// Of a pull backup: the disk's data bytes read over NBD (allocated or dirty extents only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pulled_bytes: Option<u64>,
    /// Whether the disk's bitmaps survive a restart of QEMU; when not, the next backup after one compares
    /// checking tables (see `bitmaps_volatile_why`).
    pub bitmaps_persist: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bitmaps_volatile_why: Option<String>,
}

/// The selected disks and everything a run needs to know about them.
pub(crate) struct Target {
    pub info: DiskInfo,
    /// Position in the node's disk list; used in short QEMU names.
    pub index: usize,
    /// The node's file for this disk, relative to the VM directory.
    pub file: RelPath,
    pub table: RelPath,
    /// The parent's file for this disk (the qcow2 backing file), relative to the VM directory.
    pub backing: Option<RelPath>,
    /// The disk's key ([`chain::DiskIdentity::key`]), in its bitmaps' names.
    pub key: String,
}

impl Target {
    /// The backing file the new node file's header names: the parent's file, relative to the node file's
    /// directory. `None` for a full.
    pub fn header_backing(&self) -> Option<String> {
        self.backing.as_ref().map(|b| format!("../{b}"))
    }
}

/// Opens `parent`'s recovery chain of disk `disk` in `qmp` under names starting with `prefix` and returns its
/// top node: the backing of the new node file. `None` without a parent (a full).
pub(crate) async fn add_parent_chain(
    qmp: &qmp::Qmp,
    vm: &VmStore,
    manifest: &chain::Manifest,
    parent: Option<&chain::NodeId>,
    disk: &str,
    prefix: &str,
) -> Result<Option<String>> {
    let Some(parent) = parent else {
        return Ok(None);
    };
    let chain = crate::graph::add_chain(qmp, vm, manifest, parent, disk, prefix).await?;
    Ok(chain.top().map(str::to_owned))
}

/// A backup in progress: what has been decided and created so far.
pub(crate) struct Run<'a> {
    pub qmp: &'a qmp::Qmp,
    pub vm: &'a VmStore,
    pub guard: &'a LockGuard,
    pub manifest: Manifest,
    pub bins: QemuBins,
    pub block_size: u64,
    pub node: NodeId,
    pub plan: Plan,
    pub targets: Vec<Target>,
    pub op: Operation,
    pub opts: &'a BackupOptions,
    pub progress: &'a dyn Progress,
    pub interrupt: &'a Interrupt,
    pub agent: Option<qmp::qga::GuestAgent>,
}

impl Run<'_> {
    /// A QEMU block node or job name for this run: short (QEMU limits node names to 31 characters) and unique
    /// per chain and node.
    pub fn qemu_name(&self, what: &str, disk: usize) -> String {
        crate::graph::short_name(&self.manifest.chain_id, what, self.node.as_str(), disk)
    }

    /// The paths of the new node's files, one per target.
    fn target_files(&self) -> Result<Vec<PathBuf>> {
        Ok(self
            .targets
            .iter()
            .map(|t| self.vm.resolve(&t.file))
            .collect::<Result<Vec<_>, _>>()?)
    }

    /// The bitmap a disk's copy reads: the disk's, relative to the plan's parent.
    pub fn base_bitmap(&self, t: &Target) -> Option<String> {
        let parent = self.plan.parent.as_ref()?;
        let chain = &self.manifest.chain_id;
        Some(match self.plan.level {
            Level::Differential => BitmapName::differential(chain, &t.key, parent).to_string(),
            _ => BitmapName::incremental(chain, &t.key, parent).to_string(),
        })
    }

    /// Bitmaps this backup creates on a disk: the base of the next incremental and, for a full, of the
    /// next differentials.
    pub fn new_bitmaps(&self, t: &Target) -> Vec<String> {
        let chain = &self.manifest.chain_id;
        let mut names = vec![BitmapName::incremental(chain, &t.key, self.node.as_str()).to_string()];
        if self.plan.level == Level::Full {
            names.push(BitmapName::differential(chain, &t.key, self.node.as_str()).to_string());
        }
        names
    }

    /// Opens the parent node's recovery chain of disk `t` in `qmp` (the VM's QEMU, or a pull's local
    /// qemu-storage-daemon) and returns its top node: the backing of the new node file. `None` for a full.
    pub async fn add_parent_chain(&self, qmp: &qmp::Qmp, t: &Target) -> Result<Option<String>> {
        let parent = self.plan.parent.as_deref().map(str::parse).transpose()?;
        add_parent_chain(
            qmp,
            self.vm,
            &self.manifest,
            parent.as_ref(),
            &t.info.id,
            &self.chain_prefix(t.index),
        )
        .await
    }

    /// The transaction's actions that add the new node's bitmaps to disk `t` (persistent where QEMU can store
    /// them), the same for every method.
    pub fn new_bitmap_actions(&self, t: &Target) -> Vec<qmp::commands::TransactionAction> {
        self.new_bitmaps(t)
            .into_iter()
            .map(|name| {
                qmp::commands::TransactionAction::BlockDirtyBitmapAdd(qmp::commands::BlockDirtyBitmapAdd {
                    persistent: Some(t.info.bitmaps_persist),
                    ..qmp::commands::BlockDirtyBitmapAdd::new(t.info.node_name.as_str(), name)
                })
            })
            .collect()
    }

    /// The transaction's action that starts disk `t`'s point-in-time view: a `blockdev-backup sync=none` job
    /// into the overlay `f<index>` (QEMU's copy-before-write filter), for a checksum-diff and a pull.
    pub fn view_action(&self, t: &Target) -> qmp::commands::TransactionAction {
        qmp::commands::TransactionAction::BlockdevBackup(qmp::commands::BlockdevBackup::new(
            self.qemu_name("j", t.index),
            t.info.node_name.as_str(),
            self.qemu_name("f", t.index),
            qmp::MirrorSyncMode::None,
        ))
    }

    /// Runs the backup's one QMP transaction; with `--quiesce` the guest's filesystems are frozen just before
    /// it and thawed right after it, whether it succeeded or not.
    pub async fn transaction(
        &mut self,
        actions: Vec<qmp::commands::TransactionAction>,
        what: &str,
    ) -> Result<()> {
        self.freeze().await?;
        let result = self.qmp.execute(&qmp::commands::Transaction::new(actions)).await;
        self.thaw().await?;
        result.with_context(|| what.to_owned())?;
        Ok(())
    }

    /// With `--quiesce`, freezes the guest's filesystems for the backup instant (nothing without). The record
    /// names the agent first, so that a run killed before its thaw leaves the next command (or `cleanup`) what
    /// it needs to thaw them ([`crate::recovery`]).
    pub async fn freeze(&mut self) -> Result<()> {
        if self.agent.is_none() {
            return Ok(());
        }
        self.set_frozen_by(self.opts.qga.clone())?;
        if let Some(agent) = self.agent.as_mut() {
            let n = agent
                .freeze()
                .await
                .context("freezing the guest's filesystems (--quiesce)")?;
            self.progress.phase(&format!("froze {n} guest filesystem(s)"));
            crashpoint("backup-frozen");
        }
        Ok(())
    }

    /// Records in the operation record the guest agent through which the guest's filesystems may be frozen.
    fn set_frozen_by(&mut self, agent: Option<PathBuf>) -> Result<()> {
        if let chain::Payload::Backup { frozen_by, .. } = &mut self.op.payload {
            *frozen_by = agent;
        }
        self.save_op()
    }

    /// Thaws what [`Run::freeze`] froze, trying three times; an error says the guest may still be frozen.
    pub async fn thaw(&mut self) -> Result<()> {
        if let Some(agent) = self.agent.as_mut() {
            if let Err(e) = agent.thaw_retrying().await {
                return Err(anyhow::Error::new(e).context("THE GUEST'S FILESYSTEMS MAY STILL BE FROZEN: thawing failed; run guest-fsfreeze-thaw through the guest agent"));
            }
            self.progress.phase("thawed the guest's filesystems");
            self.set_frozen_by(None)?;
        }
        Ok(())
    }

    /// Saves the manifest (atomically).
    pub fn save(&self) -> Result<()> {
        self.vm.save(&self.manifest, self.guard)?;
        Ok(())
    }

    /// Records that this run started the NBD server in the VM's QEMU, once `nbd-server-start` has succeeded:
    /// only then may teardown or recovery stop it. A server that was already running (another tool's, which
    /// makes ours fail to start) is never recorded, so never stopped.
    pub fn record_nbd_server_started(&mut self) -> Result<()> {
        if let chain::Payload::Backup {
            nbd_server_started, ..
        } = &mut self.op.payload
        {
            *nbd_server_started = true;
        }
        self.save_op()
    }

    /// Puts the run's operation record, as it now stands, into the manifest and saves it: what the record names
    /// is on disk before the step it announces.
    pub(super) fn save_op(&mut self) -> Result<()> {
        if let Some(op) = self.manifest.operations.iter_mut().find(|o| o.id == self.op.id) {
            *op = self.op.clone();
        }
        self.save()
    }
}

/// Runs a backup. The VM keeps running throughout; on any failure what was started is undone and the node is
/// recorded as failed, with every change still covered by the old bitmaps.
pub async fn backup(
    opts: &BackupOptions,
    progress: &dyn Progress,
    interrupt: &Interrupt,
) -> Result<BackupReport> {
    let started = Instant::now();
    check_encrypted_sources(opts).await?;
    let crate::session::Session {
        repo,
        vm,
        guard,
        mut manifest,
        qmp,
        cleaned,
    } = crate::session::open(
        &opts.repo,
        &opts.vm,
        &opts.qmp,
        opts.pull
            .is_none()
            .then_some(crate::qmp_target::Local::QemuWritesRepository),
        opts.lock_wait,
        "backup",
        true,
    )
    .await?;
    let info = inspect::inspect(&qmp).await?;
    let (disks, skipped) = select_disks(&info, &opts.disks, &opts.exclude)?;
    let plaintext_of_encrypted =
        crate::crypt::check_sources(&disks, repo.settings().encryption.is_some(), opts.allow_plaintext)?;
    for s in &skipped {
        progress.phase(&format!("skipping disk {}: {}", s.disk, s.reason));
    }

    crate::identity::assign_keys(&mut manifest, &disks);
    let facts = chain_facts(&manifest, repo.settings().full_every);
    let disk_facts: Vec<DiskFacts> = disks.iter().map(|d| disk_facts(&manifest, &facts, d)).collect();
    let plan = plan::plan(opts.level, &facts, &disk_facts).map_err(|e| Exit::usage(e.to_string()))?;
    progress.phase(&format!("{} backup: {}", level_name(plan.level), plan.reason));

    let node = manifest.next_node_id()?;
    let targets = disks
        .iter()
        .enumerate()
        .map(|(index, info)| {
            let file: RelPath = format!("{node}/{}.qcow2", info.id).parse()?;
            let table: RelPath = format!("{node}/{}.table", info.id).parse()?;
            let backing = match &plan.parent {
                Some(parent) => Some(format!("{parent}/{}.qcow2", info.id).parse()?),
                None => None,
            };
            let key = crate::identity::key_of(&manifest, &info.id)
                .context("disk without a key")?
                .to_owned();
            Ok(Target {
                info: info.clone(),
                index,
                file,
                table,
                backing,
                key,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    if let Some(tag) = &opts.tag {
        if manifest.find(tag).is_some() {
            bail!(Exit::usage(format!(
                "tag {tag:?} is already used in VM {}: tags are unique per VM",
                opts.vm
            )));
        }
    }

    // Reach the guest agent before anything changes, so a wrong socket fails early.
    let agent = match &opts.qga {
        Some(path) => Some(
            qmp::qga::GuestAgent::connect(path)
                .await
                .context("--quiesce needs the guest agent")?,
        ),
        None => None,
    };
    let op = Operation {
        id: format!("backup-{node}"),
        node: Some(node.clone()),
        started: chrono::Utc::now(),
        pid: std::process::id(),
        host: chain::host::hostname(),
        jobs: Vec::new(),
        block_nodes: Vec::new(),
        bitmaps: Vec::new(),
        files: Vec::new(),
        payload: Payload::Backup {
            nbd_server_started: false,
            scratch: Vec::new(),
            view: None,
            frozen_by: None,
        },
        legacy_note: None,
    };
    let mut run = Run {
        qmp: &qmp,
        vm: &vm,
        guard: &guard,
        manifest,
        bins: QemuBins::from_env(),
        block_size: repo.settings().block_size,
        node,
        plan,
        targets,
        op,
        opts,
        progress,
        interrupt,
        agent,
    };
    run.begin()?;
    crashpoint("backup-begun");
    if run.plan.method == Method::ChecksumDiff && opts.pull.is_none() {
        // The checksum-diff reads the whole disk over NBD and writes what changed itself: QEMU's job, which
        // the two options set, does not run.
        for (given, what) in [
            (opts.speed_limit > 0, "--speed-limit"),
            (opts.compress, "--compress"),
        ] {
            if given {
                progress.warning(&format!(
                    "{what} does not apply to this checksum-diff incremental ({}): it runs without it",
                    run.plan.reason
                ));
            }
        }
    }

    let result = match run.plan.method {
        _ if opts.pull.is_some() => pull::copy(&mut run).await,
        Method::Full | Method::Bitmap => jobs::copy(&mut run).await,
        Method::ChecksumDiff => fleece::copy(&mut run).await,
    };
    let copied = match result {
        Ok(copied) => {
            crashpoint("backup-copied");
            copied
        }
        Err(err) => {
            return Err(run.fail(err).await);
        }
    };
    // A signal while the tables are built or the files synced (the awaits of `complete`; what follows them
    // writes the tables and the manifest without one) undoes the backup like any failure.
    let completed = tokio::select! {
        completed = run.complete(&copied) => completed,
        () = interrupt.wait() => Err(interrupted()),
    };
    let (report_disks, tables_secs) = match completed {
        Ok(done) => done,
        Err(err) => {
            return Err(run.fail(err).await);
        }
    };
    crashpoint("backup-completed");
    run.tidy_bitmaps().await;
    Ok(BackupReport {
        vm: opts.vm.clone(),
        node: run.node.to_string(),
        parent: run.plan.parent.clone(),
        level: level_name(run.plan.level).into(),
        method: match run.plan.method {
            Method::Full => "full",
            Method::Bitmap => "bitmap",
            Method::ChecksumDiff => "checksum-diff",
        }
        .into(),
        reason: run.plan.reason.clone(),
        disks: report_disks,
        duration_secs: started.elapsed().as_secs_f64(),
        tables_secs,
        quiesced: opts.qga.is_some(),
        cleaned,
        skipped,
        plaintext_of_encrypted,
        view: copied.view.map(std::borrow::Cow::Borrowed),
    })
}

/// Checks, before the session opens, what can be checked without writing: the key of an encrypted repository
/// ([`crate::crypt::require`]) and, for a VM's first backup, whether it would copy encrypted disks into a
/// repository that is not encrypted ([`crate::crypt::check_sources`]), so that a refused first backup does not
/// even leave the VM's directory. Later backups check the disks under the VM's lock, on the session's QMP
/// connection (QEMU serves one client per QMP socket: a check here would wait for a running backup's
/// connection instead of failing at once on its lock).
async fn check_encrypted_sources(opts: &BackupOptions) -> Result<()> {
    let repo = chain::Repository::open(&opts.repo)?;
    // A missing or wrong key fails here, before anything is written.
    crate::crypt::require(&repo)?;
    if repo.vm(&opts.vm).is_ok_and(|vm| vm.dir().exists()) {
        return Ok(());
    }
    let qmp = inspect::connect(&opts.qmp).await?;
    let info = inspect::inspect(&qmp).await?;
    let (disks, _skipped) = select_disks(&info, &opts.disks, &opts.exclude)?;
    crate::crypt::check_sources(&disks, repo.settings().encryption.is_some(), opts.allow_plaintext)?;
    Ok(())
}

/// The result of the copy phase, per target: guest bytes copied, and the node's checking table when the copy
/// already computed it (checksum-diff).
pub(crate) struct Copied {
    pub bytes: Vec<u64>,
    pub tables: Option<Vec<chain::Table>>,
    /// Data bytes read over NBD per target, for a pull.
    pub pulled: Option<Vec<u64>>,
    /// Of a pull: the kind of point-in-time view read ([`BackupReport::view`]).
    pub view: Option<&'static str>,
}

impl Run<'_> {
    /// Records the pending node and the operation record in the manifest before QEMU is touched.
    fn begin(&mut self) -> Result<()> {
        let kind = match self.plan.level {
            Level::Full => NodeKind::Full,
            Level::Incremental => NodeKind::Incremental,
            Level::Differential => NodeKind::Differential,
        };
        let host = chain::host::hostname();
        let disks = self
            .targets
            .iter()
            .map(|t| {
                Ok(NodeDisk {
                    source_host: self.opts.pull.as_ref().map(|p| p.hypervisor.clone()),
                    disk: t.info.id.clone(),
                    file: t.file.clone(),
                    backing: t.backing.clone(),
                    virtual_size: t.info.virtual_size,
                    allocated_bytes: 0,
                    bitmap: self.base_bitmap(t),
                    table: None,
                    table_sha256: None,
                    location: Location {
                        host: host.clone(),
                        path: self.vm.resolve(&t.file)?.display().to_string(),
                        predecessor: match &t.backing {
                            Some(b) => Some(self.vm.resolve(b)?.display().to_string()),
                            None => None,
                        },
                    },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let node = Node {
            id: self.node.clone(),
            parent: self.plan.parent.as_ref().map(|p| p.parse()).transpose()?,
            kind,
            created: chrono::Utc::now(),
            state: NodeState::Pending,
            tag: self.opts.tag.clone(),
            reason: Some(self.plan.reason.clone()),
            lid: 0,
            tid: 0,
            disks,
        };
        self.manifest.add_node(node)?;
        for t in &self.targets {
            self.op.files.push(t.file.clone());
            self.op.files.push(t.table.clone());
            for name in self.new_bitmaps(t) {
                self.op.bitmaps.push(BitmapRecord {
                    node: t.info.node_name.clone(),
                    name,
                });
            }
        }
        self.record_qemu_names();
        self.manifest.operations.push(self.op.clone());
        self.save()?;
        self.vm.create_node_dir(&self.node)?;
        Ok(())
    }

    /// Puts every QEMU job and block node name this run may create into the operation record, newest first
    /// (the order cleanup removes them in).
    fn record_qemu_names(&mut self) {
        let depth = self
            .plan
            .parent
            .as_ref()
            .and_then(|p| p.parse::<NodeId>().ok())
            .and_then(|p| self.manifest.recovery_chain(&p).ok().map(|c| c.len()))
            .unwrap_or(0);
        for t in &self.targets {
            let i = t.index;
            self.op.jobs.push(self.qemu_name("j", i));
            self.op.block_nodes.push(self.qemu_name("f", i));
            self.op.block_nodes.push(self.qemu_name("t", i));
            for layer in (0..depth).rev() {
                self.op
                    .block_nodes
                    .push(format!("{}{layer}", self.chain_prefix(i)));
            }
        }
    }

    /// Name prefix of the parent chain's layers for disk `i` in the VM's QEMU.
    pub fn chain_prefix(&self, disk: usize) -> String {
        format!("{}-", self.qemu_name("c", disk))
    }

    /// Writes tables, marks the node complete, makes it current and drops the operation record, in one
    /// manifest write. Returns the disks' figures and the seconds spent building tables.
    async fn complete(&mut self, copied: &Copied) -> Result<(Vec<DiskReport>, f64)> {
        let started = Instant::now();
        // The node files are synced while the tables are built (which read them from the page cache).
        let files = self.target_files()?;
        // QEMU wrote them with `cache.no-flush` (see [`jobs`]): until this is done they may be only in memory.
        let sync = tokio::task::spawn_blocking(move || chain::store::sync_files(&files));
        // The parent's tables: what the new ones are built on and stored as differences against.
        let (tables, bases) = if let Some(tables) = &copied.tables {
            // A checksum-diff built its tables against them already; one that cannot be read again (it just
            // was) only costs the difference: the table is stored whole.
            (tables.clone(), self.base_tables().unwrap_or_default())
        } else {
            let bases = self.base_tables()?;
            (self.build_tables(&bases, &copied.bytes).await?, bases)
        };
        let tables_secs = started.elapsed().as_secs_f64();
        let synced = Instant::now();
        sync.await.context("fsync task panicked")??;
        tracing::debug!(
            tables_secs,
            fsync_after_tables_secs = synced.elapsed().as_secs_f64(),
            "node files synced"
        );
        crashpoint("backup-files-synced");
        // The manifest in memory never runs ahead of the one on disk: the node is completed in a copy, which
        // replaces it only once saved. A failed save (a full disk) leaves the pending node and the record for
        // `fail` to undo, and `current` where it was.
        let mut next = self.manifest.clone();
        let mut reports = Vec::new();
        for (i, (t, table)) in self.targets.iter().zip(&tables).enumerate() {
            let table_path = self.vm.resolve(&t.table)?;
            // An incremental's or differential's table holds only the blocks that differ from its parent's.
            let base = bases.get(i).and_then(Option::as_ref).map(|(b, id)| (b, id));
            let sha = table.save_against(base, &table_path)?;
            let file_path = self.vm.resolve(&t.file)?;
            let stored = crate::nodes::allocated_bytes(&file_path)?;
            let node = next
                .node_mut(&self.node)
                .context("pending node vanished from the manifest")?;
            let disk = node
                .disks
                .iter_mut()
                .find(|d| d.disk == t.info.id)
                .context("node disk vanished")?;
            disk.allocated_bytes = stored;
            disk.table = Some(t.table.clone());
            disk.table_sha256 = Some(sha);
            reports.push(DiskReport {
                disk: t.info.id.clone(),
                virtual_size: t.info.virtual_size,
                copied_bytes: copied.bytes.get(t.index).copied().unwrap_or(0),
                stored_bytes: stored,
                pulled_bytes: copied.pulled.as_ref().and_then(|p| p.get(t.index).copied()),
                bitmaps_persist: t.info.bitmaps_persist,
                bitmaps_volatile_why: t.info.bitmaps_volatile_why.clone(),
            });
        }
        crashpoint("backup-tables-written");
        let node = next
            .node_mut(&self.node)
            .context("pending node vanished from the manifest")?;
        node.state = NodeState::Complete;
        next.current = Some(self.node.clone());
        // The disks' new bitmaps count from this node, made of these images.
        let infos: Vec<DiskInfo> = self.targets.iter().map(|t| t.info.clone()).collect();
        crate::identity::note_images(&mut next, &infos);
        next.operations.retain(|o| o.id != self.op.id);
        crate::crashpoint::fail_point("backup-save-complete").context("writing the VM's manifest")?;
        self.vm.save(&next, self.guard)?;
        self.manifest = next;
        Ok((reports, tables_secs))
    }

    /// Builds each disk's checking table ([`crate::tables::build`]): derived from the parent's table for an
    /// incremental or differential, whole for a full. A disk whose job copied nothing (`copied`, bytes per
    /// target) has its layer mapped alone first: when that shows the layer empty, its table is the parent's,
    /// and the chain is not mapped at all (on a large sparse disk that map is most of an empty incremental).
    async fn build_tables(
        &self,
        bases: &[Option<(chain::Table, chain::Digest)>],
        copied: &[u64],
    ) -> Result<Vec<chain::Table>> {
        self.progress.phase("building checking tables");
        crate::crashpoint::pause_point("backup-tables").await;
        let mut tables = Vec::new();
        for (i, t) in self.targets.iter().enumerate() {
            let parent_table = bases.get(i).and_then(Option::as_ref).map(|(table, _)| table);
            let at = crate::tables::DiskAt {
                bins: &self.bins,
                vm: self.vm,
                manifest: &self.manifest,
                node: &self.node,
                disk: &t.info.id,
            };
            let context = || format!("building the checking table of disk {}", t.info.id);
            let unchanged = match parent_table {
                Some(parent) if copied.get(t.index) == Some(&0) => crate::tables::unchanged_layer(at, parent)
                    .await
                    .with_context(context)?,
                _ => None,
            };
            let table = match unchanged {
                Some(table) => table,
                None => crate::tables::build(at, chain::Scheme::default(), self.block_size, parent_table)
                    .await
                    .with_context(context)?,
            };
            self.progress.finish_disk(&t.info.id);
            tables.push(table);
        }
        Ok(tables)
    }

    /// Each target's parent table and its content id (none for a full), in target order.
    fn base_tables(&self) -> Result<Vec<Option<(chain::Table, chain::Digest)>>> {
        let Some(parent) = &self.plan.parent else {
            return Ok(self.targets.iter().map(|_| None).collect());
        };
        let parent: NodeId = parent.parse()?;
        self.targets
            .iter()
            .map(|t| {
                crate::tables::load_node_table_with_id(self.vm, &self.manifest, &parent, &t.info.id).map(Some)
            })
            .collect()
    }

    /// Undoes everything this run created and records the node as failed with the error
    /// ([`recovery::abandon`]); the old bitmaps are untouched, so the next backup still sees every change.
    async fn fail(&mut self, err: anyhow::Error) -> anyhow::Error {
        recovery::abandon(self.qmp, self.vm, &mut self.manifest, self.guard, &self.op, err).await
    }

    /// After success: removes qmpbak bitmaps of this chain that no longer mean anything: everything but the
    /// disk's own incremental bitmap of the new node and differential bitmap of its full (also the bitmaps
    /// named for another disk or for none, which a disk brought along from elsewhere or from an older qmpbak).
    async fn tidy_bitmaps(&self) {
        let chain = &self.manifest.chain_id;
        let last_full = self
            .manifest
            .last_full(&self.node)
            .ok()
            .flatten()
            .map(|n| n.id.to_string());
        for t in &self.targets {
            let keep: HashSet<String> = [
                Some(BitmapName::incremental(chain, &t.key, self.node.as_str()).to_string()),
                last_full
                    .as_ref()
                    .map(|f| BitmapName::differential(chain, &t.key, f).to_string()),
            ]
            .into_iter()
            .flatten()
            .collect();
            for b in &t.info.bitmaps {
                let ours = BitmapName::parse(&b.name).is_some_and(|n| &n.chain_id == chain);
                if ours && !keep.contains(&b.name) {
                    let remove = qmp::commands::BlockDirtyBitmapRemove::new(
                        t.info.node_name.as_str(),
                        b.name.as_str(),
                    );
                    let _ = self.qmp.execute(&remove).await;
                }
            }
        }
    }
}

fn level_name(level: Level) -> &'static str {
    match level {
        Level::Full => "full",
        Level::Incremental => "incremental",
        Level::Differential => "differential",
    }
}

/// The disks to back up, in QEMU's order, and the drives left out by themselves: removable media (a CD-ROM's
/// ISO is not the VM's data, and the guest may eject it at any time) unless named with `--disk`, and empty
/// drives. Read-only disks are backed up.
fn select_disks(
    info: &inspect::VmInfo,
    only: &[String],
    exclude: &[String],
) -> Result<(Vec<DiskInfo>, Vec<Skipped>)> {
    let all = &info.disks;
    let known: Vec<&str> = all.iter().map(|d| d.id.as_str()).collect();
    for id in only.iter().chain(exclude) {
        if !known.contains(&id.as_str()) {
            bail!(Exit::usage(format!(
                "the VM has no disk {id:?}; its disks are: {}",
                known.join(", ")
            )));
        }
    }
    let mut skipped: Vec<Skipped> = info
        .empty_drives
        .iter()
        .filter(|id| only.is_empty() && !exclude.contains(id))
        .map(|id| Skipped {
            disk: id.clone(),
            reason: "no medium".to_owned(),
        })
        .collect();
    let mut selected = Vec::new();
    for d in all {
        if !(only.is_empty() || only.contains(&d.id)) || exclude.contains(&d.id) {
            continue;
        }
        if d.removable && !only.contains(&d.id) {
            skipped.push(Skipped {
                disk: d.id.clone(),
                reason: format!(
                    "removable medium ({} {}); name it with --disk {} to back it up",
                    d.format, d.file, d.id
                ),
            });
            continue;
        }
        selected.push(d.clone());
    }
    if selected.is_empty() {
        let media: Vec<String> = skipped
            .iter()
            .map(|s| format!("{} ({})", s.disk, s.reason))
            .collect();
        bail!(Exit::usage(if media.is_empty() {
            "no disks selected: the VM has none, or --exclude removed them all".to_owned()
        } else {
            format!("no disks selected; skipped: {}", media.join(", "))
        }));
    }
    Ok((selected, skipped))
}

/// Facts about the VM's chain for the planner.
fn chain_facts(manifest: &Manifest, full_every: u32) -> ChainFacts {
    let Some(current) = manifest.current.clone() else {
        return ChainFacts::default();
    };
    let has_tables = |id: &NodeId| {
        manifest
            .node(id)
            .is_some_and(|n| !n.disks.is_empty() && n.disks.iter().all(|d| d.table.is_some()))
    };
    let last_full = manifest.last_full(&current).ok().flatten().map(|n| n.id.clone());
    let since_full = manifest.recovery_chain(&current).map_or(0, |chain| {
        chain.iter().filter(|n| n.kind != NodeKind::Full).count() as u32
    });
    ChainFacts {
        current_has_tables: has_tables(&current),
        last_full_has_tables: last_full.as_ref().is_some_and(has_tables),
        current: Some(current.to_string()),
        last_full: last_full.map(|f| f.to_string()),
        since_full,
        full_every,
    }
}

/// Facts about one disk: its size against the current node's, whether it is still the image recorded for it,
/// and the state of its bitmaps (only those named with its key are its own).
fn disk_facts(manifest: &Manifest, facts: &ChainFacts, disk: &DiskInfo) -> DiskFacts {
    let chain = &manifest.chain_id;
    let key = crate::identity::key_of(manifest, &disk.id).unwrap_or_default();
    let size_in_base = facts
        .current
        .as_ref()
        .and_then(|c| c.parse::<NodeId>().ok())
        .and_then(|c| manifest.node(&c).cloned())
        .and_then(|n| n.disks.iter().find(|d| d.disk == disk.id).map(|d| d.virtual_size));
    let state_of = |name: Option<BitmapName>| {
        let Some(name) = name else {
            return BitmapState::Missing;
        };
        let text = name.to_string();
        if let Some(b) = disk.bitmaps.iter().find(|b| b.name == text) {
            return BitmapState::from_report(b.recording, b.busy, b.inconsistent);
        }
        // Relative to the right node but named for no disk or another: proves nothing about this disk.
        let unproven = disk
            .bitmaps
            .iter()
            .filter_map(|b| BitmapName::parse(&b.name))
            .any(|n| n.chain_id == name.chain_id && n.role == name.role && n.node == name.node);
        if unproven {
            BitmapState::Unproven
        } else {
            BitmapState::Missing
        }
    };
    let inc_name = facts
        .current
        .as_ref()
        .map(|c| BitmapName::incremental(chain, key, c));
    let diff_name = facts
        .last_full
        .as_ref()
        .map(|f| BitmapName::differential(chain, key, f));
    let inc = inc_name.as_ref().map(ToString::to_string);
    let diff = diff_name.as_ref().map(ToString::to_string);
    let stray_bitmaps = disk
        .bitmaps
        .iter()
        .filter_map(|b| BitmapName::parse(&b.name).map(|n| (b, n)))
        .filter(|(b, n)| {
            &n.chain_id == chain
                && Some(&b.name) != inc.as_ref()
                && !(n.role == Role::Differential && Some(&b.name) == diff.as_ref())
        })
        .map(|(b, _)| b.name.clone())
        .collect();
    DiskFacts {
        id: disk.id.clone(),
        size_now: disk.virtual_size,
        size_in_base,
        inc_bitmap: state_of(inc_name),
        diff_bitmap: state_of(diff_name),
        stray_bitmaps,
        volatile_why: disk.bitmaps_volatile_why.clone(),
        image_changed: crate::identity::image_change(manifest.disk(&disk.id), disk),
    }
}

/// Exit code helper for interrupted runs.
pub fn interrupted() -> anyhow::Error {
    Exit::new(
        ExitCode::Interrupted,
        "interrupted: the backup was cancelled and cleaned up",
    )
    .into()
}
