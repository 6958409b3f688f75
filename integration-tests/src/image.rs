//! `qemu-img` helpers: create test disks, compare images the way QEMU's iotests do, read image facts.

use std::path::Path;
use std::process::Command;

use crate::qemu::QemuBinaries;

/// Runs a qemu-img subcommand and returns its stdout; panics with stderr on failure (test helper).
pub fn qemu_img(args: &[&str]) -> String {
    let bins = QemuBinaries::from_env();
    let out = Command::new(&bins.img)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", bins.img.display()));
    assert!(
        out.status.success(),
        "qemu-img {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Creates a qcow2 image of `size` bytes.
pub fn create_qcow2(path: &Path, size: u64) {
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        &path.to_string_lossy(),
        &size.to_string(),
    ]);
}

/// Creates a qcow2 image of `size` bytes encrypted with LUKS (`encrypt.format=luks`), its passphrase read from
/// `key_file` (a fast key derivation: test images need no brute-force resistance). QEMU 7.2 times its key
/// derivation with a CPU clock that now and then reads nothing and then fails ("Unable to get accurate CPU
/// usage"): that is tried again, a bounded number of times.
pub fn create_luks_qcow2(path: &Path, key_file: &Path, size: u64) {
    const ATTEMPTS: usize = 10;
    let bins = QemuBinaries::from_env();
    let mut report = String::new();
    for _ in 0..ATTEMPTS {
        let out = Command::new(&bins.img)
            .args(["create", "-q", "--object"])
            .arg(format!("secret,id=sec0,file={}", opt_value(key_file)))
            .args([
                "-f",
                "qcow2",
                "-o",
                "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
            ])
            .arg(path)
            .arg(size.to_string())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", bins.img.display()));
        if out.status.success() {
            return;
        }
        report = String::from_utf8_lossy(&out.stderr).into_owned();
        if !report.contains("accurate CPU usage") {
            break;
        }
    }
    panic!(
        "qemu-img create of the LUKS image {} failed: {report}",
        path.display()
    );
}

/// A path as a value in a QEMU option string: commas doubled.
fn opt_value(path: &Path) -> String {
    path.display().to_string().replace(',', ",,")
}

/// [`convert_to_qcow2`] for a LUKS-encrypted qcow2 whose passphrase is in `key_file`; the copy is plain.
pub fn convert_luks_to_qcow2(src: &Path, key_file: &Path, dst: &Path) {
    qemu_img(&[
        "convert",
        "-U",
        "--object",
        &format!("secret,id=sec0,file={}", opt_value(key_file)),
        "--image-opts",
        &format!(
            "driver=qcow2,file.filename={},encrypt.key-secret=sec0",
            opt_value(src)
        ),
        "-O",
        "qcow2",
        &dst.to_string_lossy(),
    ]);
}

/// Copies an image (through its backing chain) into a standalone qcow2: a reference snapshot. `-U` because the
/// source may be open in a paused QEMU.
pub fn convert_to_qcow2(src: &Path, dst: &Path) {
    qemu_img(&[
        "convert",
        "-U",
        "-O",
        "qcow2",
        &src.to_string_lossy(),
        &dst.to_string_lossy(),
    ]);
}

/// A standalone qcow2 at `dst` whose guest-visible contents are `bytes` (made through a raw file beside it).
pub fn qcow2_from_bytes(dst: &Path, bytes: &[u8]) {
    let raw = dst.with_extension("raw");
    std::fs::write(&raw, bytes).expect("write the raw image");
    qemu_img(&[
        "convert",
        "-q",
        "-f",
        "raw",
        "-O",
        "qcow2",
        &raw.to_string_lossy(),
        &dst.to_string_lossy(),
    ]);
}

/// `qemu-img compare -U`: `Ok(())` when the guest-visible contents are equal, `Err(report)` otherwise.
pub fn compare(a: &Path, b: &Path) -> Result<(), String> {
    let bins = QemuBinaries::from_env();
    let out = Command::new(&bins.img)
        .args(["compare", "-U"])
        .arg(a)
        .arg(b)
        .output()
        .unwrap_or_else(|e| panic!("cannot run qemu-img compare: {e}"));
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{} vs {}: {}{}",
            a.display(),
            b.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Asserts two images are equal as the guest sees them.
#[track_caller]
pub fn assert_same(a: &Path, b: &Path) {
    if let Err(report) = compare(a, b) {
        panic!("images differ: {report}");
    }
}

/// `qemu-img info --output=json -U` as JSON.
pub fn info(path: &Path) -> serde_json::Value {
    let out = qemu_img(&["info", "-U", "--output=json", &path.to_string_lossy()]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("qemu-img info output is not JSON: {e}"))
}

/// Bytes of guest data allocated in this one image file (not its backing chain), from `qemu-img map`.
pub fn allocated_data_bytes(path: &Path) -> u64 {
    let out = qemu_img(&["map", "-U", "--output=json", &path.to_string_lossy()]);
    let extents: Vec<serde_json::Value> =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("qemu-img map output is not JSON: {e}"));
    extents
        .iter()
        .filter(|e| e["data"] == true && e["depth"] == 0)
        .map(|e| e["length"].as_u64().unwrap_or(0))
        .sum()
}

/// Asserts that the guest-visible bytes `[offset, offset + len)` of image `path` all are `pattern` (read from a
/// raw copy made with `qemu-img convert -U`).
#[track_caller]
pub fn assert_pattern(path: &Path, offset: u64, len: u64, pattern: u8) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let raw = dir.path().join("raw");
    let (src, dst) = (
        path.to_str().expect("UTF-8 path"),
        raw.to_str().expect("UTF-8 path"),
    );
    qemu_img(&["convert", "-U", "-O", "raw", src, dst]);
    let bytes = std::fs::read(&raw).expect("read the raw copy");
    let start = usize::try_from(offset).expect("offset");
    let end = usize::try_from(offset + len).expect("length");
    let bad = bytes[start..end].iter().position(|&b| b != pattern);
    assert!(
        bad.is_none(),
        "{}: byte {} is not {pattern:#x}",
        path.display(),
        offset + bad.unwrap_or(0) as u64
    );
}
