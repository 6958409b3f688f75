//! Where qmpbak's private socket directories go ([`private_dir`]): qemu-storage-daemon's monitor and NBD
//! sockets, and the NBD server the VM's QEMU starts for a checksum-diff or an empty-disk check.
//!
//! They are made in one directory per process, `<pid namespace>-<pid>-<start time>`, under a base only this
//! user may enter: `$XDG_RUNTIME_DIR/qmpbak`, else `qmpbak-<uid>` in the temporary directory (`TMPDIR`). The
//! base must be a directory of this user with no access for others (not a link), or it is not used and the
//! socket directories go straight into the temporary directory, as they did before this module. A qmpbak that
//! ends normally removes its socket directories, then its process directory and the base once they are
//! empty. A qmpbak that is killed (SIGKILL, a crash) cannot: the next qmpbak that makes a socket directory
//! removes the process directories of processes of its own pid namespace that no longer run (a reused pid has
//! another start time). Nothing outside the base is removed, and in it only directories named so. A base so
//! deep that a socket's path in it could pass the 107 bytes a unix socket address holds is not used either.

use std::io;
use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, Weak};

use anyhow::{Context, Result};
use tempfile::TempDir;

/// A private directory for sockets (mode 0700), removed when dropped.
#[derive(Debug)]
pub struct PrivateDir {
    /// Dropped first: the socket directory goes before its process directory.
    dir: TempDir,
    _process: Option<Arc<ProcessDir>>,
}

impl PrivateDir {
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// This process's directory under the base, while a [`PrivateDir`] in it exists.
#[derive(Debug)]
struct ProcessDir {
    path: PathBuf,
    base: PathBuf,
}

/// The longest process directory used: a socket's path must fit in 107 bytes, and a socket directory and a socket
/// name (`qmpbak-empty-XXXXXX/nbd.sock`) add about 30.
const MAX_PROCESS_DIR_LEN: usize = 70;

/// The live process directory, if any: every [`PrivateDir`] holds it.
static PROCESS_DIR: Mutex<Weak<ProcessDir>> = Mutex::new(Weak::new());

impl Drop for ProcessDir {
    fn drop(&mut self) {
        let current = PROCESS_DIR.lock().unwrap_or_else(PoisonError::into_inner);
        // Another thread made a new handle on the same directory meanwhile: it stays.
        if current.upgrade().is_some() {
            return;
        }
        // Only once empty; the base too, unless another process of this user has its directory in it.
        if std::fs::remove_dir(&self.path).is_ok() {
            let _ = std::fs::remove_dir(&self.base);
        }
    }
}

/// A new directory that only its owner may enter (0700, whatever the umask), named `prefix…`, in this process's
/// directory under the base (see the module docs), or in the temporary directory when there is no usable base.
pub fn private_dir(prefix: &str) -> Result<PrivateDir> {
    let process = process_dir();
    let mut builder = tempfile::Builder::new();
    builder
        .prefix(prefix)
        .permissions(std::fs::Permissions::from_mode(0o700));
    let dir = match &process {
        Some(p) => builder.tempdir_in(&p.path),
        None => builder.tempdir(),
    }
    .context("creating a socket directory")?;
    // The mode given at creation is masked by the umask; this one is not.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("setting the mode of {}", dir.path().display()))?;
    Ok(PrivateDir {
        dir,
        _process: process,
    })
}

/// This process's directory, made (and the base swept) if no [`PrivateDir`] holds it; `None` without a usable
/// base (said at debug level).
fn process_dir() -> Option<Arc<ProcessDir>> {
    let mut current = PROCESS_DIR.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(live) = current.upgrade() {
        return Some(live);
    }
    let made = make_process_dir();
    match made {
        Ok(dir) => {
            let dir = Arc::new(dir);
            *current = Arc::downgrade(&dir);
            Some(dir)
        }
        Err(e) => {
            tracing::debug!("socket directories go straight into the temporary directory: {e}");
            None
        }
    }
}

fn make_process_dir() -> io::Result<ProcessDir> {
    let base = base_dir()?;
    let ns = pid_namespace();
    let me = std::process::id();
    let start = start_time(me).ok_or_else(|| io::Error::other("no start time of this process in /proc"))?;
    let path = base.join(format!("{ns}-{me}-{start}"));
    if path.as_os_str().len() > MAX_PROCESS_DIR_LEN {
        return Err(io::Error::other(format!(
            "{} is too long a directory for sockets in it",
            path.display()
        )));
    }
    // Only a base that is used is swept.
    sweep(&base, ns);
    match make_private(&path) {
        // Another qmpbak of this user removed the base, empty, just now: once more.
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            base_dir()?;
            make_private(&path)?;
        }
        made => made?,
    }
    Ok(ProcessDir { path, base })
}

/// The base (see the module docs), made if missing and checked.
fn base_dir() -> io::Result<PathBuf> {
    let runtime = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute() && p.is_dir());
    let base = match runtime {
        Some(run) => run.join("qmpbak"),
        None => std::env::temp_dir().join(format!("qmpbak-{}", nix::unistd::geteuid())),
    };
    make_private(&base)?;
    Ok(base)
}

/// Makes `dir` (0700) unless it exists, then checks that it is a directory of this user that nobody else may
/// enter, not a link.
fn make_private(dir: &Path) -> io::Result<()> {
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let meta = std::fs::symlink_metadata(dir)?;
    if !meta.file_type().is_dir() || meta.uid() != nix::unistd::geteuid().as_raw() || meta.mode() & 0o077 != 0
    {
        return Err(io::Error::other(format!(
            "{} is not a directory of this user closed to others",
            dir.display()
        )));
    }
    Ok(())
}

/// The inode of this process's pid namespace (`/proc/self/ns/pid` reads `pid:[N]`), 0 when unknown: a pid
/// means a process only within its namespace.
fn pid_namespace() -> u64 {
    std::fs::read_link("/proc/self/ns/pid")
        .ok()
        .and_then(|link| {
            let link = link.to_str()?.to_owned();
            link.strip_prefix("pid:[")?.strip_suffix(']')?.parse().ok()
        })
        .unwrap_or(0)
}

/// The start time of process `pid` (clock ticks after boot, field 22 of `/proc/PID/stat`), if it runs.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_start_time(&stat)
}

/// Field 22 of a `/proc/PID/stat` line. The second field, the command in parentheses, may hold spaces and
/// parentheses itself: the fields after it start at the last `)`.
fn parse_start_time(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    // `rest` starts with field 3 (the state): field 22 is its 20th.
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Removes the process directories in `base` of processes of pid namespace `ns` that no longer run.
fn sweep(base: &Path, ns: u64) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some((entry_ns, pid, start)) = name.to_str().and_then(parse_process_dir_name) else {
            continue;
        };
        if entry_ns != ns || start_time(pid) == Some(start) {
            continue;
        }
        // A directory, never a link (remove_dir_all does not follow links below it either).
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let dir = entry.path();
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            tracing::debug!(dir = %dir.display(), "could not remove a dead qmpbak's socket directories: {e}");
        } else {
            tracing::debug!(dir = %dir.display(), "removed the socket directories of a qmpbak that no longer runs");
        }
    }
}

/// `(pid namespace, pid, start time)` of a process directory's name.
fn parse_process_dir_name(name: &str) -> Option<(u64, u32, u64)> {
    let mut parts = name.split('-');
    let ns = parts.next()?.parse().ok()?;
    let pid = parts.next()?.parse().ok()?;
    let start = parts.next()?.parse().ok()?;
    parts.next().is_none().then_some((ns, pid, start))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_is_field_22_even_when_the_command_has_spaces_and_parentheses() {
        let fields: Vec<String> = (3..=30).map(|f| f.to_string()).collect();
        let line = format!("123 (a (b) c) {}", fields.join(" "));
        assert_eq!(parse_start_time(&line), Some(22));
        assert_eq!(parse_start_time("123 (x) S 1"), None);
        assert!(start_time(std::process::id()).is_some());
    }

    #[test]
    fn process_directory_names_parse_and_nothing_else_does() {
        assert_eq!(
            parse_process_dir_name("4026531836-77-1234"),
            Some((4_026_531_836, 77, 1234))
        );
        for other in ["qmpbak-qsd-abc", "1-2", "1-2-3-4", "a-2-3", "1-2-x", ""] {
            assert_eq!(parse_process_dir_name(other), None, "{other}");
        }
    }

    #[test]
    fn sweep_removes_dead_processes_directories_of_its_namespace_only() {
        let base = tempfile::tempdir().unwrap();
        let me = std::process::id();
        let live = format!("7-{me}-{}", start_time(me).unwrap());
        // A pid that is taken by this process but with another start time: a dead process's.
        let reused = format!("7-{me}-1");
        let other_ns = format!("8-{me}-1");
        let unknown = "qmpbak-qsd-x".to_owned();
        for name in [&live, &reused, &other_ns, &unknown] {
            std::fs::create_dir(base.path().join(name)).unwrap();
            std::fs::create_dir(base.path().join(name).join("inner")).unwrap();
        }
        std::os::unix::fs::symlink(base.path().join(&live), base.path().join("7-1-1")).unwrap();
        sweep(base.path(), 7);
        let mut left: Vec<String> = std::fs::read_dir(base.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        let mut expected = vec![live.clone(), other_ns, unknown, "7-1-1".to_owned()];
        expected.sort();
        assert_eq!(left, expected);
        // The link was not followed.
        assert!(base.path().join(&live).join("inner").is_dir());
    }
}
