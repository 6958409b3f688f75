//! Per-VM locks on `VM/lock` (fs2, i.e. `flock`): exclusive for anything that changes the VM's backups,
//! shared for reading them. The OS drops the lock of a process that dies, so a lock is never stale; the
//! exclusive holder records who it is in `lock.holder.json` so that a refused process can say who holds it.
//! A shared lock opens an existing lock file read-only, and where none can be created (a read-only mount, a
//! write-protected copy) readers go on without one: nobody can change such a repository anyway.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use crate::holder::{HOLDER_FILE, LockHolder, holder_path, read_holder};
pub use crate::host::hostname;

use crate::error::{Error, Result};
use crate::fsio;

/// The name of the lock file in a VM directory.
pub const LOCK_FILE: &str = "lock";
/// How often a waiting lock tries again.
pub const RETRY_INTERVAL: Duration = Duration::from_millis(50);

/// What to do when the lock is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockWait {
    /// Fail at once with [`Error::LockHeld`].
    NoWait,
    /// Try again every 50 ms for up to this long, then fail with [`Error::LockHeld`].
    Wait(Duration),
}

/// Shared (readers) or exclusive (one writer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    Shared,
    Exclusive,
}

/// A held lock; dropping it releases it (and an exclusive holder removes its holder record first).
#[derive(Debug)]
pub struct LockGuard {
    /// `None` for a shared lock on a repository where no lock file can be created (read-only).
    file: Option<File>,
    mode: LockMode,
    vm: String,
    path: PathBuf,
}

impl LockGuard {
    pub fn mode(&self) -> LockMode {
        self.mode
    }

    pub fn is_exclusive(&self) -> bool {
        self.mode == LockMode::Exclusive
    }

    /// Whether a lock is really held: false for a reader of a repository where no lock file can be created.
    pub fn is_held(&self) -> bool {
        self.file.is_some()
    }

    /// The VM it locks.
    pub fn vm(&self) -> &str {
        &self.vm
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if self.mode == LockMode::Exclusive {
            // Still holding the lock, so no later holder's record can be removed by mistake.
            let _ = std::fs::remove_file(holder_path(&self.path));
        }
        // Closing the file releases the lock; say so explicitly for readability.
        if let Some(file) = &self.file {
            let _ = fs2::FileExt::unlock(file);
        }
    }
}

fn try_lock(file: &File, mode: LockMode) -> io::Result<bool> {
    let result = match mode {
        LockMode::Shared => fs2::FileExt::try_lock_shared(file),
        LockMode::Exclusive => fs2::FileExt::try_lock_exclusive(file),
    };
    match result {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
        Err(e) if e.raw_os_error() == fs2::lock_contended_error().raw_os_error() => Ok(false),
        Err(e) => Err(e),
    }
}

/// Opens (creating it if missing) the lock file, never through a symbolic link: a link could make qmpbak
/// create or lock a file outside the repository. For a shared lock an existing file is opened read-only, and
/// `None` means that there is none and none can be created (a read-only file system, or no write permission).
fn open_lock_file(path: &Path, mode: LockMode) -> Result<Option<File>> {
    let nofollow = nix::fcntl::OFlag::O_NOFOLLOW.bits();
    let refused = |e: &io::Error| {
        matches!(
            e.raw_os_error(),
            Some(nix::libc::EROFS | nix::libc::EACCES | nix::libc::EPERM)
        )
    };
    let opened = if mode == LockMode::Shared {
        match OpenOptions::new().read(true).custom_flags(nofollow).open(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            other => Some(other),
        }
    } else {
        None
    };
    let opened = if let Some(opened) = opened {
        opened
    } else {
        let created = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(fsio::FILE_MODE)
            .custom_flags(nofollow)
            .open(path);
        match created {
            Err(e) if mode == LockMode::Shared && refused(&e) => return Ok(None),
            other => other,
        }
    };
    let file = opened.map_err(|e| {
        if e.raw_os_error() == Some(nix::libc::ELOOP) {
            Error::LockFileNotRegular {
                path: path.to_owned(),
                what: "a symbolic link",
            }
        } else {
            Error::io("open lock file", path)(e)
        }
    })?;
    let meta = file.metadata().map_err(Error::io("stat lock file", path))?;
    if !meta.is_file() {
        return Err(Error::LockFileNotRegular {
            path: path.to_owned(),
            what: "not a regular file",
        });
    }
    Ok(Some(file))
}

/// Set by [`interrupt_waits`]: every lock wait of this process ends.
static WAITS_INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Ends every lock wait of this process, now and later ([`Error::LockWaitInterrupted`]): called when SIGINT,
/// SIGTERM or SIGHUP arrives, so that `--wait` never keeps a stopped command waiting for the lock, only to go
/// on once it frees.
pub fn interrupt_waits() {
    WAITS_INTERRUPTED.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// Takes the lock of VM `vm` on file `path` (created if missing). `command` is recorded for an exclusive
/// lock. A wait ends early, with [`Error::LockWaitInterrupted`], after [`interrupt_waits`].
pub fn acquire(vm: &str, path: &Path, mode: LockMode, wait: LockWait, command: &str) -> Result<LockGuard> {
    let Some(file) = open_lock_file(path, mode)? else {
        // Nothing can change a repository where no lock file can be created, so there is nothing to wait for.
        return Ok(LockGuard {
            file: None,
            mode,
            vm: vm.to_owned(),
            path: path.to_owned(),
        });
    };
    let deadline = match wait {
        LockWait::NoWait => None,
        LockWait::Wait(d) => Some(Instant::now() + d),
    };
    loop {
        if try_lock(&file, mode).map_err(Error::io("lock", path))? {
            break;
        }
        let now = Instant::now();
        match deadline {
            Some(_) if WAITS_INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst) => {
                return Err(Error::LockWaitInterrupted {
                    vm: vm.to_owned(),
                    lock: path.to_owned(),
                });
            }
            Some(deadline) if now < deadline => std::thread::sleep(RETRY_INTERVAL.min(deadline - now)),
            _ => {
                let holder = read_holder(path);
                return Err(Error::LockHeld {
                    vm: vm.to_owned(),
                    lock: path.to_owned(),
                    stale: holder.as_ref().is_some_and(LockHolder::is_dead),
                    holder,
                });
            }
        }
    }
    let guard = LockGuard {
        file: Some(file),
        mode,
        vm: vm.to_owned(),
        path: path.to_owned(),
    };
    if mode == LockMode::Exclusive {
        // Temporary files of a holder record that a killed holder was writing; harmless if this fails.
        if let Some(dir) = path.parent() {
            let _ = fsio::remove_stale_temps(dir, HOLDER_FILE);
        }
        // The holder record only improves the "lock held" message: failing to write it (a full disk) must not
        // stop the holder, whose real work reports the real problem. A stale record is recognised by its pid.
        let holder = LockHolder::current(command);
        if let Ok(bytes) = serde_json::to_vec_pretty(&holder) {
            let _ = fsio::write_atomic(&holder_path(path), &bytes);
        }
    }
    Ok(guard)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;

    #[test]
    fn exclusive_excludes_within_a_process_too() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(LOCK_FILE);
        let first = acquire("vm", &path, LockMode::Exclusive, LockWait::NoWait, "test one").unwrap();
        let holder = read_holder(&path).unwrap();
        assert_eq!(holder.pid, std::process::id());
        assert_eq!(holder.command, "test one");
        assert!(!holder.is_dead());

        let err = acquire("vm", &path, LockMode::Shared, LockWait::NoWait, "").unwrap_err();
        let Error::LockHeld {
            vm, holder: Some(h), ..
        } = &err
        else {
            panic!("{err:?}")
        };
        assert_eq!(vm, "vm");
        assert_eq!(h.pid, std::process::id());
        assert!(err.to_string().contains("test one"), "{err}");

        let started = Instant::now();
        let err = acquire(
            "vm",
            &path,
            LockMode::Exclusive,
            LockWait::Wait(Duration::from_millis(200)),
            "x",
        );
        assert!(matches!(err, Err(Error::LockHeld { .. })));
        assert!(started.elapsed() >= Duration::from_millis(200));

        drop(first);
        assert!(
            read_holder(&path).is_none(),
            "the holder record goes with the lock"
        );
        let _again = acquire("vm", &path, LockMode::Exclusive, LockWait::NoWait, "x").unwrap();
    }

    #[test]
    fn readers_share() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(LOCK_FILE);
        let a = acquire("vm", &path, LockMode::Shared, LockWait::NoWait, "").unwrap();
        let b = acquire("vm", &path, LockMode::Shared, LockWait::NoWait, "").unwrap();
        assert!(!a.is_exclusive() && !b.is_exclusive());
        let err = acquire("vm", &path, LockMode::Exclusive, LockWait::NoWait, "w").unwrap_err();
        let Error::LockHeld { holder: None, .. } = &err else {
            panic!("{err:?}")
        };
        assert!(err.to_string().contains("did not record"), "{err}");
    }

    #[test]
    fn a_lock_file_that_is_a_symlink_is_refused_and_nothing_is_created_where_it_points() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let target = outside.path().join("created-by-qmpbak");
        let path = dir.path().join(LOCK_FILE);
        std::os::unix::fs::symlink(&target, &path).unwrap();
        for mode in [LockMode::Shared, LockMode::Exclusive] {
            let err = acquire("vm", &path, mode, LockWait::NoWait, "x").unwrap_err();
            assert!(matches!(err, Error::LockFileNotRegular { .. }), "{err:?}");
            assert!(err.to_string().contains("symbolic link"), "{err}");
            assert!(!target.exists(), "nothing is created outside");
        }
        // A symlink to an existing file is refused too, and the file is not touched.
        std::fs::write(&target, b"keep").unwrap();
        let err = acquire("vm", &path, LockMode::Exclusive, LockWait::NoWait, "x").unwrap_err();
        assert!(matches!(err, Error::LockFileNotRegular { .. }), "{err:?}");
        assert_eq!(std::fs::read(&target).unwrap(), b"keep");
        assert!(!dir.path().join(HOLDER_FILE).exists());
    }

    #[test]
    fn a_refusal_says_whether_the_recorded_holder_was_gone_when_it_was_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(LOCK_FILE);
        let _held = acquire("vm", &path, LockMode::Exclusive, LockWait::NoWait, "live").unwrap();
        let err = acquire("vm", &path, LockMode::Exclusive, LockWait::NoWait, "x").unwrap_err();
        assert!(matches!(err, Error::LockHeld { stale: false, .. }), "{err:?}");
        assert!(!err.to_string().contains("stale"), "{err}");
        // A record left by a process that is gone (this lock is really held by a live one: the record lies).
        let dead = LockHolder {
            pid: i32::MAX as u32,
            ..LockHolder::current("dead")
        };
        fsio::write_atomic(&holder_path(&path), &serde_json::to_vec(&dead).unwrap()).unwrap();
        let err = acquire("vm", &path, LockMode::Exclusive, LockWait::NoWait, "x").unwrap_err();
        assert!(matches!(err, Error::LockHeld { stale: true, .. }), "{err:?}");
        assert!(err.to_string().contains("stale"), "{err}");
        assert_eq!(err.kind(), crate::ErrorKind::LockHeld);
    }

    #[test]
    fn a_dead_holder_is_called_stale() {
        let holder = LockHolder {
            pid: i32::MAX as u32,
            command: "c".into(),
            host: hostname(),
            since: Utc::now(),
        };
        assert!(holder.is_dead());
        let elsewhere = LockHolder {
            host: "some-other-host.invalid".into(),
            ..holder.clone()
        };
        assert!(!elsewhere.is_dead());
    }
}
