//! The repository (a directory with `qmpbak-repo.json` and its settings) and the per-VM store inside it:
//! where each file lives, the VM's lock, and loading and saving its manifest.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use chrono::Utc;
use serde::{Deserialize, Serialize};

use crate::error::{Error, ManifestProblem, Result};
use crate::lock::{self, LockGuard, LockMode, LockWait};
use crate::manifest::Manifest;
use crate::names::{NodeId, RelPath, check_name};
use crate::retention::Policy;
use crate::store;

/// The settings file that makes a directory a repository.
pub const SETTINGS_FILE: &str = "qmpbak-repo.json";
/// A VM's manifest, in its directory.
pub const MANIFEST_FILE: &str = "manifest.json";
/// The settings format this qmpbak writes and the newest it reads: 1, or 2 for an encrypted repository (so
/// that a qmpbak that knows nothing of encryption refuses it rather than reading it as plain).
pub const SETTINGS_VERSION: u32 = 2;
/// The settings format of a repository that is not encrypted.
pub const SETTINGS_VERSION_PLAIN: u32 = 1;
/// Checking-table block size unless chosen otherwise: 1 MiB.
pub const DEFAULT_BLOCK_SIZE: u64 = 1 << 20;
/// The smallest block size a repository may use: 64 KiB.
pub const MIN_BLOCK_SIZE: u64 = 64 << 10;
/// The largest block size a repository may use: 16 MiB.
pub const MAX_BLOCK_SIZE: u64 = 16 << 20;
/// Incrementals after which an automatic backup takes a new full, unless chosen otherwise.
pub const DEFAULT_FULL_EVERY: u32 = 7;

/// The repository's settings (`qmpbak-repo.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settings {
    pub format_version: u32,
    /// Bytes per checking-table block: a power of two from 64 KiB to 16 MiB.
    #[serde(default = "default_block_size")]
    pub block_size: u64,
    /// An automatic backup takes a new full after this many incrementals since the last one; 0: never.
    #[serde(default = "default_full_every")]
    pub full_every: u32,
    /// The retention a `qmpbak prune` without a policy of its own applies; none: prune needs one given.
    /// Absent from the file when unset, so a qmpbak that predates it reads the file the same.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<Policy>,
    /// Set when every node file is encrypted and every checking table keyed ([`crate::crypt`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<crate::crypt::Encryption>,
}

fn default_block_size() -> u64 {
    DEFAULT_BLOCK_SIZE
}

fn default_full_every() -> u32 {
    DEFAULT_FULL_EVERY
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            format_version: SETTINGS_VERSION_PLAIN,
            block_size: DEFAULT_BLOCK_SIZE,
            full_every: DEFAULT_FULL_EVERY,
            retention: None,
            encryption: None,
        }
    }
}

impl Settings {
    /// Encrypted settings with the given `encryption` record (format version 2).
    #[must_use]
    pub fn encrypted(mut self, encryption: crate::crypt::Encryption) -> Settings {
        self.format_version = SETTINGS_VERSION;
        self.encryption = Some(encryption);
        self
    }

    /// Checks the block size ([`Error::InvalidBlockSize`]) and the encryption record.
    pub fn check(&self) -> Result<()> {
        if let Some(enc) = &self.encryption {
            enc.check()?;
        }
        let bs = self.block_size;
        if bs.is_power_of_two() && (MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&bs) {
            Ok(())
        } else {
            Err(Error::InvalidBlockSize {
                block_size: bs,
                min: MIN_BLOCK_SIZE,
                max: MAX_BLOCK_SIZE,
            })
        }
    }
}

/// A backup repository: a directory holding `qmpbak-repo.json` and one directory per VM.
#[derive(Debug, Clone)]
pub struct Repository {
    path: PathBuf,
    settings: Settings,
}

impl Repository {
    /// Creates a repository with default settings in `path`, which must not exist or be an empty directory.
    pub fn init(path: impl AsRef<Path>) -> Result<Repository> {
        Repository::init_with(path, Settings::default())
    }

    /// Creates a repository with the given settings.
    pub fn init_with(path: impl AsRef<Path>, settings: Settings) -> Result<Repository> {
        let path = path.as_ref();
        settings.check()?;
        match fs::symlink_metadata(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::DirBuilder::new()
                    .recursive(true)
                    .mode(store::DIR_MODE)
                    .create(path)
                    .map_err(Error::io("create directory", path))?;
            }
            Err(e) => {
                return Err(Error::Io {
                    action: "inspect",
                    path: path.to_owned(),
                    source: e,
                });
            }
            Ok(_) if !path.is_dir() => {
                return Err(Error::NotADirectory {
                    path: path.to_owned(),
                });
            }
            Ok(_) => {
                if path.join(SETTINGS_FILE).exists() {
                    return Err(Error::AlreadyARepository {
                        path: path.to_owned(),
                    });
                }
                let mut entries = fs::read_dir(path).map_err(Error::io("list", path))?;
                if entries.next().is_some() {
                    return Err(Error::DirectoryNotEmpty {
                        path: path.to_owned(),
                    });
                }
                fs::set_permissions(path, fs::Permissions::from_mode(store::DIR_MODE))
                    .map_err(Error::io("set permissions of", path))?;
            }
        }
        let path = &absolute_dir(path)?;
        let settings_path = path.join(SETTINGS_FILE);
        let bytes = settings_bytes(&settings, &settings_path)?;
        store::write_atomic_with(&settings_path, false, |w| w.write_all(&bytes)).map_err(|e| match e {
            Error::Io { source, .. } if source.kind() == io::ErrorKind::AlreadyExists => {
                Error::AlreadyARepository {
                    path: path.to_owned(),
                }
            }
            other => other,
        })?;
        Ok(Repository {
            path: path.to_owned(),
            settings,
        })
    }

    /// Opens an existing repository. Its path is made absolute and free of symlinks first
    /// ([`absolute_dir`]): every path derived from it may be handed to QEMU, whose working directory is not ours.
    pub fn open(path: impl AsRef<Path>) -> Result<Repository> {
        let path = &absolute_dir(path.as_ref()).map_err(|e| match e {
            Error::Io { source, .. } if source.kind() == io::ErrorKind::NotFound => Error::NotARepository {
                path: path.as_ref().to_owned(),
            },
            other => other,
        })?;
        let settings_path = path.join(SETTINGS_FILE);
        let bytes = match crate::fsio::read_bounded(&settings_path, crate::fsio::MAX_SMALL_FILE_BYTES) {
            Ok(bytes) => bytes,
            Err(e) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::NotADirectory) => {
                return Err(Error::NotARepository {
                    path: path.to_owned(),
                });
            }
            Err(e) => {
                return Err(Error::Io {
                    action: "read",
                    path: settings_path,
                    source: e,
                });
            }
        };
        let invalid = |detail: String| Error::SettingsInvalid {
            path: settings_path.clone(),
            detail,
        };
        let settings: Settings = serde_json::from_slice(&bytes).map_err(|e| {
            invalid(format!(
                "{} at line {} column {}",
                store::serde_detail(&e),
                e.line(),
                e.column()
            ))
        })?;
        if settings.format_version > SETTINGS_VERSION {
            return Err(Error::RepositoryTooNew {
                path: settings_path,
                found: settings.format_version,
                supported: SETTINGS_VERSION,
            });
        }
        if settings.format_version == 0 {
            return Err(invalid(
                "format_version 0 is not a version qmpbak ever wrote".to_owned(),
            ));
        }
        settings.check().map_err(|e| invalid(e.to_string()))?;
        // Version 2 is exactly an encrypted repository, so that a qmpbak that knows nothing of encryption
        // refuses it; an encryption record under version 1 would have been ignored by such a qmpbak.
        if (settings.format_version >= SETTINGS_VERSION) != settings.encryption.is_some() {
            return Err(invalid(format!(
                "format_version {} {} an encryption record",
                settings.format_version,
                if settings.encryption.is_some() {
                    "must not have"
                } else {
                    "needs"
                }
            )));
        }
        Ok(Repository {
            path: path.to_owned(),
            settings,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Checks and atomically replaces the repository's settings (the block size cannot change: the checking
    /// tables already written use it, [`Error::SettingsInvalid`]).
    pub fn save_settings(&mut self, settings: Settings) -> Result<()> {
        settings.check()?;
        let path = self.path.join(SETTINGS_FILE);
        if settings.block_size != self.settings.block_size {
            return Err(Error::SettingsInvalid {
                path,
                detail: "the checking-table block size of an existing repository cannot change".to_owned(),
            });
        }
        let bytes = settings_bytes(&settings, &path)?;
        store::write_atomic(&path, &bytes)?;
        self.settings = settings;
        Ok(())
    }

    /// The store of an existing VM ([`Error::VmNotFound`] if the repository has no directory for it).
    pub fn vm(&self, name: &str) -> Result<VmStore> {
        check_name("VM name", name)?;
        let dir = self.path.join(name);
        // A directory that a crash left before its manifest was written does not count as a VM.
        if !dir.is_dir() || (!dir.join(MANIFEST_FILE).exists() && only_leftovers(&dir)?) {
            return Err(Error::VmNotFound {
                repo: self.path.clone(),
                vm: name.to_owned(),
            });
        }
        Ok(VmStore {
            dir,
            name: name.to_owned(),
        })
    }

    /// Creates a VM's directory and an empty manifest ([`Error::VmExists`] if it already has one). A directory
    /// left without a manifest by a crash is reused if it holds nothing else (a lock file at most); one that
    /// holds other files is refused ([`Error::VmDirectoryNotEmpty`]): its manifest was lost, and a new one
    /// would hand out node ids whose directories are still there.
    pub fn create_vm(&self, name: &str) -> Result<VmStore> {
        check_name("VM name", name)?;
        let dir = self.path.join(name);
        store::create_private_dir(&dir)?;
        if !dir.join(MANIFEST_FILE).exists() && !only_leftovers(&dir)? {
            return Err(Error::VmDirectoryNotEmpty {
                vm: name.to_owned(),
                dir,
            });
        }
        let vm = VmStore {
            dir,
            name: name.to_owned(),
        };
        let path = vm.manifest_path();
        let bytes = store::manifest_bytes(&Manifest::new(name, Utc::now()), &path)?;
        store::write_atomic_with(&path, false, |w| w.write_all(&bytes)).map_err(|e| match e {
            Error::Io { source, .. } if source.kind() == io::ErrorKind::AlreadyExists => Error::VmExists {
                vm: name.to_owned(),
                dir: vm.dir.clone(),
            },
            other => other,
        })?;
        Ok(vm)
    }

    /// The VMs that have a manifest, sorted by name.
    pub fn vms(&self) -> Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in fs::read_dir(&self.path).map_err(Error::io("list", &self.path))? {
            let entry = entry.map_err(Error::io("list", &self.path))?;
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            if check_name("VM name", &name).is_ok() && entry.path().join(MANIFEST_FILE).is_file() {
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
    }
}

/// The absolute, symlink-free form of an existing directory. A relative repository path would be resolved
/// again in each process that is handed a path below it: QEMU resolves it in its own working directory, which
/// may hold another repository.
pub fn absolute_dir(path: &Path) -> Result<PathBuf> {
    fs::canonicalize(path).map_err(Error::io("resolve", path))
}

/// Whether a VM directory holds nothing but what an interrupted `create_vm` or a lock leaves: the lock file,
/// the holder record, and our temporary files.
fn only_leftovers(dir: &Path) -> Result<bool> {
    for entry in fs::read_dir(dir).map_err(Error::io("list", dir))? {
        let name = entry.map_err(Error::io("list", dir))?.file_name();
        let name = name.to_string_lossy();
        let leftover = name == lock::LOCK_FILE
            || name == lock::HOLDER_FILE
            || (name.starts_with('.') && name.ends_with(".tmp"));
        if !leftover {
            return Ok(false);
        }
    }
    Ok(true)
}

fn settings_bytes(settings: &Settings, path: &Path) -> Result<Vec<u8>> {
    let mut bytes = serde_json::to_vec_pretty(settings).map_err(|e| Error::Io {
        action: "serialise",
        path: path.to_owned(),
        source: io::Error::other(e),
    })?;
    bytes.push(b'\n');
    Ok(bytes)
}

/// One VM's directory: its manifest, lock and node data.
#[derive(Debug, Clone)]
pub struct VmStore {
    dir: PathBuf,
    name: String,
}

impl VmStore {
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The VM's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn manifest_path(&self) -> PathBuf {
        self.dir.join(MANIFEST_FILE)
    }

    pub fn lock_path(&self) -> PathBuf {
        self.dir.join(lock::LOCK_FILE)
    }

    /// Takes the VM's lock for reading.
    pub fn lock_shared(&self, wait: LockWait) -> Result<LockGuard> {
        lock::acquire(&self.name, &self.lock_path(), LockMode::Shared, wait, "")
    }

    /// Takes the VM's lock for changing it; `command` ("qmpbak backup" …) is recorded for others to see.
    pub fn lock_exclusive(&self, wait: LockWait, command: &str) -> Result<LockGuard> {
        lock::acquire(&self.name, &self.lock_path(), LockMode::Exclusive, wait, command)
    }

    /// Who holds the VM's exclusive lock, as recorded (possibly stale).
    pub fn lock_holder(&self) -> Option<lock::LockHolder> {
        lock::read_holder(&self.lock_path())
    }

    /// Loads and validates the manifest. Hold a lock (shared at least) while using what it says.
    pub fn load(&self) -> Result<Manifest> {
        store::load_manifest(&self.manifest_path(), &self.name)
    }

    /// Validates and atomically writes the manifest. `guard` must be this VM's exclusive lock.
    pub fn save(&self, manifest: &Manifest, guard: &LockGuard) -> Result<()> {
        if guard.path() != self.lock_path() {
            return Err(Error::LockOfOtherVm {
                vm: self.name.clone(),
                lock: guard.path().to_owned(),
            });
        }
        if !guard.is_exclusive() {
            return Err(Error::LockNotExclusive {
                vm: self.name.clone(),
            });
        }
        let inconsistent = |problem| Error::ManifestInconsistent {
            vm: self.name.clone(),
            problem,
        };
        if manifest.vm != self.name {
            return Err(inconsistent(ManifestProblem::WrongVm {
                expected: self.name.clone(),
                found: manifest.vm.clone(),
            }));
        }
        manifest.validate().map_err(inconsistent)?;
        store::remove_stale_temps(&self.dir, MANIFEST_FILE)?;
        let path = self.manifest_path();
        let bytes = store::manifest_bytes(manifest, &path)?;
        store::write_atomic(&path, &bytes)
    }

    /// The directory of a node's files (not created).
    pub fn node_dir(&self, node: &NodeId) -> PathBuf {
        self.dir.join(node.as_str())
    }

    /// Creates a node's directory (mode 0700) if needed, and returns it.
    pub fn create_node_dir(&self, node: &NodeId) -> Result<PathBuf> {
        node.check()?;
        let dir = self.node_dir(node);
        store::create_private_dir(&dir)?;
        Ok(dir)
    }

    /// The absolute location of a manifest path. Refuses a path that leaves the VM directory through a
    /// symlink, including a dangling one ([`Error::PathEscapes`]); the parts that do not exist yet are fine.
    pub fn resolve(&self, rel: &RelPath) -> Result<PathBuf> {
        rel.check()?;
        let base = fs::canonicalize(&self.dir).map_err(Error::io("resolve", &self.dir))?;
        let joined = self.dir.join(rel.as_path());
        let mut prefix = self.dir.clone();
        for component in rel.as_path().components() {
            let Component::Normal(part) = component else {
                // RelPath allows only plain names; anything else is refused all the same.
                return Err(Error::InvalidPath {
                    path: rel.to_string(),
                    reason: "not a plain path".into(),
                });
            };
            prefix.push(part);
            match fs::symlink_metadata(&prefix) {
                Ok(meta) if meta.file_type().is_symlink() => {
                    let escapes = |target: PathBuf| Error::PathEscapes {
                        vm_dir: self.dir.clone(),
                        rel: rel.to_string(),
                        target,
                    };
                    match fs::canonicalize(&prefix) {
                        Ok(target) if target.starts_with(&base) => {}
                        Ok(target) => return Err(escapes(target)),
                        // A dangling link: we cannot tell where a file created through it would go.
                        Err(_) => {
                            return Err(escapes(fs::read_link(&prefix).unwrap_or_else(|_| prefix.clone())));
                        }
                    }
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                Err(e) => {
                    return Err(Error::Io {
                        action: "inspect",
                        path: prefix,
                        source: e,
                    });
                }
            }
        }
        Ok(joined)
    }
}
