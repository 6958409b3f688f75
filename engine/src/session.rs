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

/// Opens a session for `command`; with `create`, a VM seen for the first time gets its directory. `local` says
/// why the command needs the VM's QEMU on this host (its QEMU reaches the repository's files, or it makes
/// files beside the VM's disks), `None` when it does not (a pull backup): a target over TCP is then refused
/// before anything is touched (the commands refuse earlier still, with the same reason).
pub async fn open(
    repo: &Path,
    vm: &str,
    target: &QmpTarget,
    local: Option<Local>,
    wait: LockWait,
    command: &str,
    create: bool,
) -> Result<Session> {
    if let Some(why) = local {
        target.require_local(command, why, repo)?;
    }
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
