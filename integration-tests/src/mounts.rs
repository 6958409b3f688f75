//! Helpers for `qmpbak mount` tests: checksums of every file of a repository (to show a mount changes nothing
//! in it), and the checks that a `qmpbak umount` left no mount, loop device, storage daemon or file behind.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use qmpbak_engine::mount::{MountReport, UmountReport};
use sha2::{Digest as _, Sha256};

/// Whether this process may mount (root); mount tests that need it say so and pass when it is not.
pub fn can_mount() -> bool {
    let root = nix::unistd::geteuid().is_root();
    if !root {
        eprintln!("not root: this test's mounts are not tried");
    }
    root
}

/// The sha256 and size of every file under `dir`, by path relative to it.
pub fn checksums(dir: &Path) -> BTreeMap<PathBuf, (String, u64)> {
    let mut sums = BTreeMap::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).expect("list directory") {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let bytes = std::fs::read(&path).expect("read file");
                let rel = path.strip_prefix(dir).expect("under dir").to_owned();
                sums.insert(rel, (hex(&Sha256::digest(&bytes)), bytes.len() as u64));
            }
        }
    }
    sums
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Mount points at or below `dir`, from /proc/self/mountinfo.
pub fn mounts_under(dir: &Path) -> Vec<String> {
    let prefix = dir.display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .expect("mountinfo")
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_owned))
        .filter(|t| t == &prefix || t.starts_with(&format!("{prefix}/")))
        .collect()
}

/// The fields of the /proc/self/mountinfo line of the mount at `target`.
fn mountinfo_fields(target: &Path) -> Option<Vec<String>> {
    let wanted = target.display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .expect("mountinfo")
        .lines()
        .map(|l| l.split(' ').map(str::to_owned).collect::<Vec<_>>())
        .find(|f| f.get(4) == Some(&wanted))
}

/// The mount options of the mount at `target`.
pub fn mount_options(target: &Path) -> Option<String> {
    mountinfo_fields(target)?.get(5).cloned()
}

/// Asserts that the mount at `target` is read-only and lets nothing in it count on the host: no set-user-id
/// bit, no device node, no program runs from it (`nosuid,nodev,noexec`).
#[track_caller]
pub fn assert_locked_down(target: &Path) {
    let options = mount_options(target).unwrap_or_else(|| panic!("{} is not mounted", target.display()));
    for wanted in ["ro", "nosuid", "nodev", "noexec"] {
        assert!(
            options.split(',').any(|o| o == wanted),
            "{} is mounted {options}, without {wanted}",
            target.display()
        );
    }
}

/// The file system type of the mount at `target` (`ext4`, `fuse.fusefat` ...).
pub fn fs_type(target: &Path) -> Option<String> {
    let f = mountinfo_fields(target)?;
    let dash = f.iter().position(|s| s == "-")?;
    f.get(dash + 1).cloned()
}

/// The file system's own (superblock) options of the mount at `target`: those after ` - TYPE SOURCE ` in
/// /proc/self/mountinfo, where `norecovery` shows.
pub fn super_options(target: &Path) -> Option<String> {
    let f = mountinfo_fields(target)?;
    let dash = f.iter().position(|s| s == "-")?;
    f.get(dash + 3).cloned()
}

/// What a mount set up that must be gone after it is undone: the report of `mount` ([`MountReport`]) or of
/// an `umount` or `cleanup` that undid it ([`UmountReport`]).
pub trait MountedParts {
    /// The exported raw image.
    fn image(&self) -> Option<&Path>;
    /// The loop device over the image.
    fn loop_device(&self) -> Option<&Path>;
}

impl MountedParts for MountReport {
    fn image(&self) -> Option<&Path> {
        self.image.as_deref()
    }
    fn loop_device(&self) -> Option<&Path> {
        self.loop_device.as_deref()
    }
}

impl MountedParts for UmountReport {
    fn image(&self) -> Option<&Path> {
        Some(&self.image)
    }
    fn loop_device(&self) -> Option<&Path> {
        self.loop_device.as_deref()
    }
}

/// Asserts that what the mount report `report` names is gone: nothing mounted under `dir`, which is empty
/// again, the loop device detached from the image, the image gone and no process using it.
pub fn assert_nothing_left(dir: &Path, report: &impl MountedParts) {
    assert!(
        mounts_under(dir).is_empty(),
        "still mounted: {:?}",
        mounts_under(dir)
    );
    let left: Vec<_> = std::fs::read_dir(dir).expect("list mount dir").collect();
    assert!(left.is_empty(), "{} is not empty again: {left:?}", dir.display());
    let image = report.image().map(Path::to_path_buf);
    if let Some(device) = report.loop_device() {
        let device = device.display().to_string();
        let name = device.trim_start_matches("/dev/");
        let backing =
            std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file")).unwrap_or_default();
        if let Some(image) = &image {
            assert_ne!(
                Path::new(backing.trim_end()),
                image.as_path(),
                "{device} still set up"
            );
        }
    }
    if let Some(image) = image {
        assert!(!image.exists(), "{} is still there", image.display());
        let needle = image.display().to_string();
        for entry in std::fs::read_dir("/proc").expect("list /proc").flatten() {
            if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
                let text = String::from_utf8_lossy(&cmdline);
                assert!(
                    !text.contains(&needle),
                    "a process still serves the image: {text}"
                );
            }
        }
    }
}

/// Runs `qmpbak umount DIR` when dropped, so that a failing test leaves no mount, loop device or storage
/// daemon behind. Declare it after the directory's `TempDir`, so that it drops first.
pub struct Unmount(pub PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        if let Some(dir) = self.0.to_str() {
            let _ = crate::cli::command(&["umount", dir]).output();
        }
    }
}
