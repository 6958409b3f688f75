//! The start every command that changes a running VM's chain shares: open the repository (creating the VM's
//! directory on first use where that makes sense), take the VM's exclusive lock, load the manifest, connect to
//! QEMU, and finish whatever an interrupted qmpbak left behind.

use std::path::Path;

use anyhow::Result;

use chain::{LockGuard, LockWait, Manifest, Repository, VmStore};

use crate::inspect;
use crate::qmp_target::{Local, QmpTarget};
use crate::recovery::{self, Cleaned};

/// An open, locked VM with its manifest and QEMU connection.
pub struct Session {
    pub repo: Repository,
    pub vm: VmStore,
    pub guard: LockGuard,
    pub manifest: Manifest,
    pub qmp: qmp::Qmp,
    /// What an earlier, interrupted run left and this one removed.
    pub cleaned: Cleaned,
}

/// Opens a session for `command`; with `create`, a VM seen for the first time gets its directory.
pub async fn open(
    repo: &Path,
    vm: &str,
    target: &QmpTarget,
    wait: LockWait,
    command: &str,
    create: bool,
) -> Result<Session> {
    // Until backups are pulled over NBD, every command that opens a session needs the VM's QEMU to reach
    // the repository's files or makes files beside the VM's disks: refused over TCP before anything (the
    // commands refuse earlier still, with their own reason).
    target.require_local(command, Local::QemuWritesRepository, repo)?;
    let repo = Repository::open(repo)?;
    let vm = match repo.vm(vm) {
        Ok(store) if store.dir().exists() => store,
        _ if create => repo.create_vm(vm)?,
        Err(e) => return Err(e.into()),
        Ok(store) => store,
    };
    let guard = vm.lock_exclusive(wait, command)?;
    let mut manifest = vm.load()?;
    tracing::info!(
        vm = vm.name(),
        nodes = manifest.nodes.len(),
        "locked the VM and loaded its manifest"
    );
    let qmp = inspect::connect(target).await?;
    tracing::info!(qmp = %target, qemu = %qmp.greeting().version, "connected to QEMU");
    let cleaned = recovery::recover(Some(&qmp), &vm, &mut manifest, &guard).await?;
    Ok(Session {
        repo,
        vm,
        guard,
        manifest,
        qmp,
        cleaned,
    })
}
