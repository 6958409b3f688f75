//! Encrypted restore output (`restore --encrypt-output KEYFILE`): the restored qcow2 images are LUKS-encrypted
//! with a passphrase QEMU reads from the user's file, so the plaintext of an encrypted backup never lands on disk
//! on the way back either. Also the one place that formats a LUKS qcow2 with `qemu-img create`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::exit::Exit;
use crate::qemu_bins::QemuBins;

/// The id of the output's secret object in `qemu-img`.
const OUTPUT_SECRET_ID: &str = "qmpbak-output-key";
/// How many more times `qemu-img create` runs when QEMU's LUKS timing fails (see [`create_luks_qcow2`]).
const CREATE_ATTEMPTS: usize = 9;

/// A value inside a QEMU option string (`key=value,…`): commas are doubled.
pub fn qemu_opt_value(path: &Path) -> String {
    path.display().to_string().replace(',', ",,")
}

/// The key file of `--encrypt-output`: must be a regular file; returned absolute.
pub fn output_key_file(path: &Path) -> Result<PathBuf> {
    let abs = std::fs::canonicalize(path)
        .with_context(|| format!("reading the --encrypt-output key file {}", path.display()))?;
    if !abs.is_file() {
        bail!(Exit::usage(format!(
            "--encrypt-output {}: not a regular file",
            path.display()
        )));
    }
    Ok(abs)
}

/// `--object secret,…` arguments giving `qemu-img` the output passphrase from `key_file` (the path, never the
/// key, is on the command line).
pub fn output_object_args(key_file: &Path) -> [String; 2] {
    [
        "--object".to_owned(),
        format!("secret,id={OUTPUT_SECRET_ID},file={}", qemu_opt_value(key_file)),
    ]
}

/// The `--target-image-opts` description of an encrypted output image at `path`.
pub fn output_target_opts(path: &Path) -> String {
    format!(
        "driver=qcow2,file.driver=file,file.filename={},encrypt.key-secret={OUTPUT_SECRET_ID}",
        qemu_opt_value(path)
    )
}

/// Creates an encrypted output image of `size` bytes (0600) whose passphrase is in `key_file`, with QEMU's
/// default key-derivation time: the passphrase is the user's, maybe a weak one.
pub async fn create_output(bins: &QemuBins, path: &Path, size: u64, key_file: &Path) -> Result<()> {
    let [flag, object] = output_object_args(key_file);
    create_luks_qcow2(
        bins,
        path,
        size,
        &[flag, object],
        &format!("encrypt.format=luks,encrypt.key-secret={OUTPUT_SECRET_ID}"),
    )
    .await
}

/// `qemu-img create -f qcow2 OBJECT_ARGS -o OPTIONS PATH SIZE` for a LUKS-encrypted qcow2 (mode 0600). QEMU
/// times its LUKS key derivation with the thread's CPU clock and gives up when that reads no time at all
/// ("Unable to get accurate CPU usage", QEMU 7.2 does now and then): nothing usable was made then, so it runs
/// again, a bounded number of times.
pub(crate) async fn create_luks_qcow2(
    bins: &QemuBins,
    path: &Path,
    size: u64,
    object_args: &[String],
    options: &str,
) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let create = || async {
        bins.img_output(
            bins.img_command()
                .args(["create", "-q", "-f", "qcow2"])
                .args(object_args)
                .args(["-o", options])
                .arg(path)
                .arg(size.to_string()),
        )
        .await
    };
    let mut out = create().await?;
    for _ in 0..CREATE_ATTEMPTS {
        let flaky = String::from_utf8_lossy(&out.stderr).contains("Unable to get accurate CPU usage");
        if out.status.success() || !flaky {
            break;
        }
        out = create().await?;
    }
    if !out.status.success() {
        let _ = std::fs::remove_file(path);
        bail!(
            "creating the encrypted image {} failed: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("setting the mode of {}", path.display()))
}
