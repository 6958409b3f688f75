//! The unlocked key of the encrypted repository this process works on, and how QEMU gets it: a `secret`
//! object that reads `/proc/self/fd/N` for `qemu-img` and `qemu-storage-daemon`, N an anonymous memory file
//! (`memfd_create`, sealed) that only QEMU's programs inherit ([`crate::children::qemu_command`]), or
//! `object-add` with the data over the QMP socket for the VM's QEMU. The key is never on a command line, in a
//! log or in a named file: the memory file is gone with the last process that holds it, also when qmpbak is
//! killed (a file under /dev/shm, as before, stayed after a SIGKILL).
//!
//! Every node file of an encrypted repository is a qcow2 with a LUKS header (`encrypt.format=luks`) whose
//! passphrase is derived from the user's key ([`chain::crypt`]): a 256-bit random-looking string, so LUKS's own
//! slow key derivation adds nothing and runs with a short iteration time (opening a layer stays fast).

use std::io::Write as _;
use std::os::fd::{AsRawFd as _, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use anyhow::{Context, Result};
use serde_json::{Value, json};

use chain::{RepoKeys, Repository, TableKey};

use super::key::KeySource;
use crate::qemu_bins::QemuBins;

/// The id of the secret object in every QEMU process qmpbak hands the key to.
pub const SECRET_ID: &str = "qmpbak-repo-key";
/// LUKS key-derivation time per node file, in milliseconds (see the module docs).
const LUKS_ITER_TIME_MS: u32 = 10;

/// The key of an unlocked repository and the memory file QEMU's programs read it from.
pub struct Unlocked {
    keys: RepoKeys,
    /// The repository's [`TEMPLATE_FILE`].
    template: PathBuf,
    salt: String,
    /// The LUKS passphrase in an anonymous memory file, shared with QEMU's programs.
    secret: OwnedFd,
}

impl Drop for Unlocked {
    fn drop(&mut self) {
        crate::children::stop_sharing(self.secret.as_raw_fd());
    }
}

static ACTIVE: Mutex<Option<Arc<Unlocked>>> = Mutex::new(None);

/// Keeps the repository unlocked; dropping it removes the secret file and forgets the key.
#[must_use = "the repository is locked again when the guard drops"]
pub struct KeyGuard(());

impl Drop for KeyGuard {
    fn drop(&mut self) {
        ACTIVE.lock().unwrap_or_else(PoisonError::into_inner).take();
    }
}

/// Unlocks `repo` with the key from `source`, for the rest of the guard's life. A missing or wrong key is a
/// repository error (exit 3), before anything is changed. So is a key given for a repository whose settings
/// say it is not encrypted: the settings are a file in the repository, and whoever can write it could
/// otherwise make the next backups of a user who still gives the key land in plaintext.
pub fn unlock(repo: &Repository, source: Option<&KeySource>) -> Result<Option<KeyGuard>> {
    if repo.settings().encryption.is_none() {
        return match source {
            None => Ok(None),
            Some(source) => Err(crate::exit::Exit::new(
                crate::exit::ExitCode::Repository,
                format!(
                    "a key was given ({}) but repository {} is not encrypted (its {} names no encryption): \
                     refusing to work on it, since a repository made with `init --encrypt` whose settings were \
                     changed would store the next backups in plaintext; for a repository that was never \
                     encrypted, give no key{}",
                    source.describe(),
                    repo.path().display(),
                    chain::repo::SETTINGS_FILE,
                    if matches!(source, KeySource::Env(name) if name == super::key::KEY_ENV) {
                        " (unset QMPBAK_KEY)"
                    } else {
                        ""
                    }
                ),
            )
            .into()),
        };
    }
    let Some(source) = source else {
        return Err(chain::Error::KeyMissing.into());
    };
    unlock_with(repo, &source.read()?).map(Some)
}

/// [`unlock`] with the key's bytes (read once: a pipe gives them only once).
pub fn unlock_with(repo: &Repository, key: &[u8]) -> Result<KeyGuard> {
    let Some(enc) = &repo.settings().encryption else {
        anyhow::bail!("repository {} is not encrypted", repo.path().display());
    };
    super::key::forbid_dumps()?;
    let keys = enc.unlock(key)?;
    let secret = secret_memfd(keys.luks_passphrase().as_bytes())?;
    crate::children::share_with_qemu(secret.as_raw_fd());
    let unlocked = Unlocked {
        keys,
        template: repo.path().join(TEMPLATE_FILE),
        salt: enc.salt.clone(),
        secret,
    };
    *ACTIVE.lock().unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(unlocked));
    Ok(KeyGuard(()))
}

/// An anonymous memory file holding `data`, sealed against any change, close-on-exec, numbered 3 or more (so
/// that a child's standard streams never take its number).
fn secret_memfd(data: &[u8]) -> Result<OwnedFd> {
    use nix::fcntl::{FcntlArg, SealFlag, fcntl};
    use nix::sys::memfd::{MemFdCreateFlag, memfd_create};
    use std::os::fd::FromRawFd as _;
    let created = memfd_create(
        c"qmpbak-key",
        MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING,
    )
    .context("creating an anonymous memory file for the key (memfd_create)")?;
    let raw = fcntl(created.as_raw_fd(), FcntlArg::F_DUPFD_CLOEXEC(3))
        .context("numbering the key's memory file")?;
    drop(created);
    // SAFETY: `raw` was just returned by F_DUPFD_CLOEXEC and is owned by nothing else.
    #[allow(unsafe_code)]
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut file = std::fs::File::from(fd);
    file.write_all(data).context("writing the key's memory file")?;
    fcntl(
        file.as_raw_fd(),
        FcntlArg::F_ADD_SEALS(
            SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_WRITE | SealFlag::F_SEAL_SEAL,
        ),
    )
    .context("sealing the key's memory file")?;
    Ok(OwnedFd::from(file))
}

/// The unlocked key, when there is one.
pub fn active() -> Option<Arc<Unlocked>> {
    ACTIVE.lock().unwrap_or_else(PoisonError::into_inner).clone()
}

/// Checks that `repo` can be worked on: not encrypted, or unlocked with its own key ([`unlock`]). Every
/// command that reads or writes node data calls this first.
pub fn require(repo: &Repository) -> Result<()> {
    let Some(enc) = &repo.settings().encryption else {
        return Ok(());
    };
    match active() {
        Some(u) if u.salt == enc.salt => Ok(()),
        _ => Err(chain::Error::KeyMissing.into()),
    }
}

impl Unlocked {
    pub fn table_key(&self) -> &TableKey {
        self.keys.table_key()
    }

    /// `secret,id=…,file=/proc/self/fd/N` for `qemu-img --object` and `qemu-storage-daemon --object` made by
    /// [`crate::children::qemu_command`] (which inherit N), never the key.
    pub fn object_arg(&self) -> String {
        secret_object(self.secret.as_raw_fd())
    }
}

/// The key for one QEMU program that outlives this qmpbak (`mount`'s daemon): a pipe that holds the
/// passphrase, its write end already closed, read to its end once when the program makes its secret object.
/// What the program keeps open after that is an empty pipe, where the shared memory file
/// ([`Unlocked::object_arg`]) would hold the key for as long as it runs, open to any process of the user
/// through `/proc/PID/fd`.
pub struct OneShotSecret {
    read: OwnedFd,
}

impl OneShotSecret {
    /// The descriptor the program must inherit ([`QemuBins::storage_daemon_command_inheriting`]).
    pub fn fd(&self) -> std::os::fd::RawFd {
        self.read.as_raw_fd()
    }

    /// `--object secret,…,file=/proc/self/fd/N` for the program, never the key.
    pub fn args(&self) -> [String; 2] {
        ["--object".to_owned(), secret_object(self.fd())]
    }
}

/// The `secret` object that reads the key from descriptor `fd` of the QEMU program that inherits it.
fn secret_object(fd: std::os::fd::RawFd) -> String {
    format!("secret,id={SECRET_ID},file=/proc/self/fd/{fd},format=raw")
}

/// [`OneShotSecret`] of the unlocked repository, if one is.
pub fn one_shot_secret() -> Result<Option<OneShotSecret>> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    use std::os::fd::FromRawFd as _;
    let Some(u) = active() else { return Ok(None) };
    let passphrase = u.keys.luks_passphrase();
    let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC).context("making a pipe for the key")?;
    // Numbered 3 or more, so that a child's standard streams never take its number.
    let raw = fcntl(read.as_raw_fd(), FcntlArg::F_DUPFD_CLOEXEC(3)).context("numbering the key's pipe")?;
    drop(read);
    // SAFETY: `raw` was just returned by F_DUPFD_CLOEXEC and is owned by nothing else.
    #[allow(unsafe_code)]
    let read = unsafe { OwnedFd::from_raw_fd(raw) };
    // A passphrase is far smaller than a pipe's buffer: this write never waits for a reader.
    std::fs::File::from(write)
        .write_all(passphrase.as_bytes())
        .context("writing the key into its pipe")?;
    Ok(Some(OneShotSecret { read }))
}

/// The table key of the unlocked repository, if any: checking tables are keyed with it.
pub fn table_key() -> Option<TableKey> {
    active().map(|u| u.table_key().clone())
}

/// Adds the encryption options to a qcow2 node's options (blockdev-add or a `json:` image spec) when a
/// repository is unlocked: for repository files only.
pub fn encrypt_node(options: &mut Value) {
    if active().is_some() {
        options["encrypt"] = json!({ "format": "luks", "key-secret": SECRET_ID });
    }
}

/// The arguments that give `qemu-img` the secret object (`--object secret,…`), when a repository is unlocked.
pub fn qemu_img_args() -> Vec<String> {
    active().map_or_else(Vec::new, |u| vec!["--object".to_owned(), u.object_arg()])
}

/// The `-o` options of `qemu-img create` for a new repository file, when a repository is unlocked.
pub fn create_options() -> Option<String> {
    active().map(|_| {
        format!("encrypt.format=luks,encrypt.key-secret={SECRET_ID},encrypt.iter-time={LUKS_ITER_TIME_MS}")
    })
}

/// Gives the QEMU behind `qmp` the key (`object-add` of a secret, over the socket), when a repository is
/// unlocked. A secret left by a qmpbak that was killed is replaced.
pub async fn add_secret(qmp: &qmp::Qmp) -> Result<()> {
    let Some(u) = active() else { return Ok(()) };
    let _ = qmp
        .execute(&qmp::commands::ObjectDel {
            id: SECRET_ID.to_owned(),
        })
        .await;
    qmp.execute(&qmp::commands::ObjectAddSecret::new(
        SECRET_ID,
        u.keys.luks_passphrase(),
    ))
    .await
    .context("giving QEMU the repository key (object-add of a secret)")?;
    Ok(())
}

/// Removes the secret from the QEMU behind `qmp` whether or not this process holds a key (cleanup finishing a
/// live restore of a qmpbak that died); errors (no such object) are ignored.
pub async fn forget_secret(qmp: &qmp::Qmp) {
    let _ = qmp
        .execute(&qmp::commands::ObjectDel {
            id: SECRET_ID.to_owned(),
        })
        .await;
}

/// Removes the key from the QEMU behind `qmp` again; errors are ignored (cleanup paths).
pub async fn remove_secret(qmp: &qmp::Qmp) {
    if active().is_some() {
        let _ = qmp
            .execute(&qmp::commands::ObjectDel {
                id: SECRET_ID.to_owned(),
            })
            .await;
    }
}

/// The LUKS-encrypted qcow2 in an encrypted repository's directory that every node file starts as.
pub const TEMPLATE_FILE: &str = "qmpbak-luks-template.qcow2";
/// The template's virtual size; node files are resized from it.
const TEMPLATE_SIZE: u64 = 64 << 10;

/// Makes the template of a new encrypted repository (unlocked by the caller): the one LUKS header `qemu-img
/// create` formats, with a volume key of its own. Formatting is slow (QEMU times its key derivation for a
/// second or more of CPU, and on a busy machine sometimes fails to) so it is done once per repository; every
/// node file is then a copy of the template, resized ([`create_node_file`]). All node files of a repository
/// thus share one volume key, protected by the repository key.
pub async fn create_template(bins: &QemuBins, repo: &Path) -> Result<()> {
    let options = create_options().context("the repository is not unlocked")?;
    let path = repo.join(TEMPLATE_FILE);
    super::output::create_luks_qcow2(bins, &path, TEMPLATE_SIZE, &qemu_img_args(), &options).await?;
    chain::store::sync_files(&[path]).context("syncing the template")?;
    Ok(())
}

fn set_private(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("setting the mode of {}", path.display()))
}

/// Runs `qemu-img ARGS` and fails with its message.
async fn qemu_img(bins: &QemuBins, args: &[String], what: &str) -> Result<()> {
    let out = bins.img(args).await?;
    if !out.status.success() {
        anyhow::bail!("{what} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Creates a repository file: a qcow2 of `size` bytes (0600); in an unlocked encrypted repository a copy of
/// its LUKS template ([`create_template`]), resized. `backing` is written into its header as given and not
/// opened (see [`QemuBins::create_qcow2`]).
pub async fn create_node_file(bins: &QemuBins, path: &Path, size: u64, backing: Option<&str>) -> Result<()> {
    let Some(unlocked) = active() else {
        return bins.create_qcow2(path, size, backing).await;
    };
    let _ = std::fs::remove_file(path);
    std::fs::copy(&unlocked.template, path).with_context(|| {
        format!(
            "copying the repository's encrypted template {} to {}",
            unlocked.template.display(),
            path.display()
        )
    })?;
    set_private(path)?;
    let mut spec = json!({ "driver": "qcow2", "file": { "driver": "file", "filename": path } });
    encrypt_node(&mut spec);
    let image = format!("json:{spec}");
    let mut resize = vec!["resize".to_owned(), "-q".to_owned()];
    resize.extend(qemu_img_args());
    resize.extend([image.clone(), size.to_string()]);
    qemu_img(bins, &resize, &format!("resizing {}", path.display())).await?;
    if let Some(backing) = backing {
        let mut rebase = vec!["rebase".to_owned(), "-q".to_owned(), "-u".to_owned()];
        rebase.extend(qemu_img_args());
        rebase.extend([
            "-F".to_owned(),
            "qcow2".to_owned(),
            "-b".to_owned(),
            backing.to_owned(),
            image,
        ]);
        qemu_img(
            bins,
            &rebase,
            &format!("setting the backing file of {}", path.display()),
        )
        .await?;
    }
    Ok(())
}
