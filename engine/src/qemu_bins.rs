//! The QEMU programs qmpbak runs itself (`qemu-img`, `qemu-storage-daemon`; it runs no `qemu-nbd`): where they
//! are, from `PATH` or from an unpacked QEMU tree named by `QMPBAK_QEMU_PREFIX` (`DIR/usr/bin/...`, the same
//! setting the test suite uses), and the one place their commands are made. Each is a
//! [`tokio::process::Command`] from [`crate::children::qemu_command`]: it dies with qmpbak (`PR_SET_PDEATHSIG`),
//! inherits no key in its environment (an encrypted repository's derived key only as the descriptor
//! [`crate::children::share_with_qemu`] names), and runs as an [`crate::children::Owned`] child, killed and reaped when the
//! run that started it is dropped unfinished. Nothing here blocks a runtime thread on a child.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Output;

use anyhow::{Context as _, Result, bail};

/// Paths of the QEMU helper programs.
#[derive(Debug, Clone)]
pub struct QemuBins {
    pub img: PathBuf,
    pub storage_daemon: PathBuf,
}

impl QemuBins {
    pub fn from_env() -> QemuBins {
        match std::env::var_os("QMPBAK_QEMU_PREFIX") {
            Some(prefix) if !prefix.is_empty() => {
                let bin = PathBuf::from(prefix).join("usr/bin");
                QemuBins {
                    img: bin.join("qemu-img"),
                    storage_daemon: bin.join("qemu-storage-daemon"),
                }
            }
            _ => QemuBins {
                img: "qemu-img".into(),
                storage_daemon: "qemu-storage-daemon".into(),
            },
        }
    }

    /// A `qemu-img` command (owned, see the module doc); run it with [`QemuBins::img_output`] or
    /// [`crate::children::spawn`].
    pub fn img_command(&self) -> tokio::process::Command {
        crate::children::qemu_command(&self.img)
    }

    /// A `qemu-storage-daemon` command (owned, see the module doc).
    pub fn storage_daemon_command(&self) -> tokio::process::Command {
        crate::children::qemu_command(&self.storage_daemon)
    }

    /// A `qemu-storage-daemon` command that inherits `fds` and not the key's shared descriptor
    /// ([`crate::children::qemu_command_inheriting`]): for a daemon that outlives this qmpbak, which gets
    /// the key once ([`crate::crypt::unlock::one_shot_secret`]).
    pub fn storage_daemon_command_inheriting(&self, fds: Vec<std::os::fd::RawFd>) -> tokio::process::Command {
        crate::children::qemu_command_inheriting(&self.storage_daemon, fds)
    }

    /// Runs the `qemu-img` command `cmd` (from [`QemuBins::img_command`]) to its end with no input, collecting
    /// its output. The error is failing to run it at all; its exit status is the caller's to judge.
    pub async fn img_output(&self, cmd: &mut tokio::process::Command) -> Result<Output> {
        crate::children::output(cmd)
            .await
            .with_context(|| format!("running {}", self.img.display()))
    }

    /// Runs `qemu-img ARGS` to its end, collecting its output (see [`QemuBins::img_output`]).
    pub async fn img<I, S>(&self, args: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.img_output(self.img_command().args(args)).await
    }

    /// Creates a qcow2 image of `size` bytes, private to its owner (0600). `backing` is written into its header
    /// as given (a relative path is relative to the image's directory) and not opened.
    pub async fn create_qcow2(&self, path: &Path, size: u64, backing: Option<&str>) -> Result<()> {
        use std::os::unix::fs::PermissionsExt as _;
        let mut cmd = self.img_command();
        cmd.args(["create", "-q", "-f", "qcow2"]);
        if let Some(backing) = backing {
            cmd.args(["-u", "-F", "qcow2", "-b", backing]);
        }
        let out = self.img_output(cmd.arg(path).arg(size.to_string())).await?;
        if !out.status.success() {
            bail!(
                "creating {} failed: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("setting the mode of {}", path.display()))
    }

    /// `qemu-img info -U` of the qcow2 image at `path` (never probed as another format): its JSON, or the inner
    /// error with what qemu-img said when it could not read the image. The outer error is failing to run
    /// qemu-img at all, or output that is not JSON.
    pub async fn qcow2_info(&self, path: &Path) -> Result<Result<serde_json::Value, String>> {
        let out = self
            .img_output(
                self.img_command()
                    .args(["info", "-U", "--output=json", "-f", "qcow2"])
                    .arg(path),
            )
            .await?;
        if !out.status.success() {
            return Ok(Err(String::from_utf8_lossy(&out.stderr).trim().to_owned()));
        }
        Ok(Ok(
            serde_json::from_slice(&out.stdout).context("parsing qemu-img info")?
        ))
    }
}
