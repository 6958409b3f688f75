//! Which QEMU programs qmpbak runs itself (`qemu-img`, `qemu-storage-daemon`): from `PATH`, or from an unpacked
//! QEMU tree named by `QMPBAK_QEMU_PREFIX` (`DIR/usr/bin/...`), the same setting the test suite uses.

use std::path::PathBuf;

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
}

impl QemuBins {
    /// Creates a qcow2 image of `size` bytes, private to its owner (0600). `backing` is written into its header
    /// as given (a relative path is relative to the image's directory) and not opened.
    pub fn create_qcow2(
        &self,
        path: &std::path::Path,
        size: u64,
        backing: Option<&str>,
    ) -> anyhow::Result<()> {
        use anyhow::Context as _;
        use std::os::unix::fs::PermissionsExt as _;
        let mut cmd = crate::children::std_command(&self.img);
        cmd.args(["create", "-q", "-f", "qcow2"]);
        if let Some(backing) = backing {
            cmd.args(["-u", "-F", "qcow2", "-b", backing]);
        }
        let out = cmd
            .arg(path)
            .arg(size.to_string())
            .output()
            .with_context(|| format!("running {}", self.img.display()))?;
        if !out.status.success() {
            anyhow::bail!(
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
    pub fn qcow2_info(&self, path: &std::path::Path) -> anyhow::Result<Result<serde_json::Value, String>> {
        use anyhow::Context as _;
        let out = crate::children::std_command(&self.img)
            .args(["info", "-U", "--output=json", "-f", "qcow2"])
            .arg(path)
            .output()
            .with_context(|| format!("running {}", self.img.display()))?;
        if !out.status.success() {
            return Ok(Err(String::from_utf8_lossy(&out.stderr).trim().to_owned()));
        }
        Ok(Ok(
            serde_json::from_slice(&out.stdout).context("parsing qemu-img info")?
        ))
    }
}
