//! What a `qmpbak mount` set up, recorded in a state file in a private directory ([`runtime_dir`]:
//! `/run/qmpbak/mounts` for root, `$XDG_RUNTIME_DIR/qmpbak/mounts` or `~/.cache/qmpbak/mounts` for another
//! user), one directory per mount point: so `qmpbak umount` and `qmpbak cleanup` can undo it after the mounting
//! qmpbak was killed. Teardown does not trust the record alone: it also finds the loop devices backed by the
//! exported image, the mounts of those devices (a FUSE driver's mount names its device as its source) and the
//! FUSE drivers serving them, so a kill between a step and its record leaves nothing behind either.

use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// How long the storage daemon may take to exit after SIGTERM before it is killed.
pub const DAEMON_EXIT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a FUSE file system driver (fusefat) may take to exit after its file system was unmounted before
/// it is killed.
pub const FUSE_DRIVER_EXIT_TIMEOUT: Duration = Duration::from_secs(10);

/// The name of the record in a mount's state directory.
const STATE_FILE: &str = "state.json";

/// What one mount set up, in the order it was set up.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MountState {
    /// The mount point the user named (absolute).
    pub dir: PathBuf,
    pub repo: PathBuf,
    pub vm: String,
    pub node: String,
    pub disk: String,
    /// The FUSE-exported raw image of the node's disk (inside the state directory, or `DIR/DISK.img` for
    /// `--image-only`).
    pub image: PathBuf,
    /// Whether qmpbak created `image` (an empty file that is the FUSE mount point) and must remove it.
    pub image_created: bool,
    /// The qemu-storage-daemon's pid file, and its pid once read.
    pub pidfile: PathBuf,
    pub daemon_pid: Option<u32>,
    /// The read-only loop device over `image`.
    pub loop_device: Option<PathBuf>,
    /// Directories qmpbak created for partitions (`DIR/p1` ...), removed again when empty.
    pub created_dirs: Vec<PathBuf>,
    /// File systems mounted, in order.
    pub mounts: Vec<PathBuf>,
    /// The qmpbak that is setting this up; `complete` once it finished.
    pub owner_pid: u32,
    pub complete: bool,
}

/// The directory holding every mount's state: private to its owner (0700), created if needed. Root's is
/// `/run/qmpbak/mounts`; another user's is their own, so that `--image-only` and `--list` work without root:
/// `qmpbak/mounts` in their cache directory (`$XDG_CACHE_HOME`, or `~/.cache`), else in the session's runtime
/// directory (`$XDG_RUNTIME_DIR`). The cache comes first: it is the same for a login and a cron job, and it
/// outlives a logout, which removes the runtime directory but not the mounts; a record that outlives its
/// mount (a reboot) is found stale and undone. A shared place such as `/tmp` is never used: another user
/// could create the name first.
pub fn runtime_dir() -> Result<PathBuf> {
    if nix::unistd::geteuid().is_root() {
        let base = PathBuf::from("/run/qmpbak");
        let dir = base.join("mounts");
        private_dir(&base)?;
        private_dir(&dir)?;
        return Ok(dir);
    }
    let env = |name: &str| std::env::var_os(name).map(PathBuf::from);
    let parent =
        user_records_parent(env("XDG_RUNTIME_DIR"), env("XDG_CACHE_HOME"), env("HOME")).ok_or_else(|| {
            anyhow::anyhow!(
                "no private place for qmpbak's mount records: neither XDG_CACHE_HOME, HOME nor \
                 XDG_RUNTIME_DIR (an existing directory) is set to an absolute path"
            )
        })?;
    let base = parent.join("qmpbak");
    // The cache directory itself may not exist yet: made as the user's own, private.
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&parent)
        .with_context(|| format!("creating {} for qmpbak's mount records", parent.display()))?;
    let dir = base.join("mounts");
    private_dir(&base)?;
    private_dir(&dir)?;
    Ok(dir)
}

/// Where a user other than root keeps `qmpbak/mounts`, given `$XDG_RUNTIME_DIR`, `$XDG_CACHE_HOME` and `$HOME`:
/// the cache directory (`~/.cache` by default), else the session's runtime directory if it exists. Relative
/// values are ignored, as the XDG base directory specification says.
fn user_records_parent(
    runtime: Option<PathBuf>,
    cache: Option<PathBuf>,
    home: Option<PathBuf>,
) -> Option<PathBuf> {
    let absolute = |d: Option<PathBuf>| d.filter(|d| d.is_absolute());
    absolute(cache)
        .or_else(|| absolute(home).map(|home| home.join(".cache")))
        .or_else(|| absolute(runtime).filter(|d| d.is_dir()))
}

/// Creates `dir` (0700) or checks that the existing one is a directory of ours that nobody else can write:
/// a shared `/tmp` must not let another user plant the state qmpbak acts on.
fn private_dir(dir: &Path) -> Result<()> {
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => return Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e).with_context(|| format!("creating {}", dir.display())),
    }
    let meta = fs::symlink_metadata(dir).with_context(|| format!("inspecting {}", dir.display()))?;
    if !meta.is_dir() || meta.uid() != nix::unistd::geteuid().as_raw() || meta.mode() & 0o022 != 0 {
        bail!(
            "{} is not a private directory of this user: qmpbak keeps its mount records there; remove it",
            dir.display()
        );
    }
    Ok(())
}

/// The state directory of mount point `dir` (not created).
pub fn state_dir(dir: &Path) -> Result<PathBuf> {
    let digest = Sha256::digest(dir.as_os_str().as_encoded_bytes());
    Ok(runtime_dir()?.join(hex::encode(&digest[..8])))
}

impl MountState {
    /// The state directory this record lives in.
    pub fn state_dir(&self) -> Result<PathBuf> {
        state_dir(&self.dir)
    }

    /// Writes the record atomically.
    pub fn save(&self) -> Result<()> {
        let dir = self.state_dir()?;
        let bytes = serde_json::to_vec_pretty(self).context("serialising the mount record")?;
        chain::store::write_atomic(&dir.join(STATE_FILE), &bytes)?;
        Ok(())
    }

    /// The record of mount point `dir`, if there is one.
    pub fn load(dir: &Path) -> Result<Option<MountState>> {
        let path = state_dir(dir)?.join(STATE_FILE);
        match fs::read(&path) {
            Ok(bytes) => Ok(Some(
                serde_json::from_slice(&bytes).with_context(|| format!("reading {}", path.display()))?,
            )),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Every record in the runtime directory.
    pub fn all() -> Result<Vec<MountState>> {
        let root = runtime_dir()?;
        let mut states = Vec::new();
        for entry in fs::read_dir(&root).with_context(|| format!("listing {}", root.display()))? {
            let path = entry?.path().join(STATE_FILE);
            if let Ok(bytes) = fs::read(&path) {
                if let Ok(state) = serde_json::from_slice::<MountState>(&bytes) {
                    states.push(state);
                }
            }
        }
        states.sort_by(|a, b| a.dir.cmp(&b.dir));
        Ok(states)
    }

    /// Whether the qmpbak that set this up died before finishing it.
    pub fn interrupted(&self) -> bool {
        !self.complete && !pid_alive(self.owner_pid)
    }

    /// Whether this complete mount is gone already: its export is no longer mounted (the machine restarted,
    /// or the storage daemon was stopped by hand). What may be left of it is for a teardown.
    pub fn stale(&self) -> Result<bool> {
        Ok(self.complete && !mounts()?.iter().any(|(_, t)| t == &self.image))
    }
}

fn pid_alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}

/// Undoes everything `state` names (and what a kill may have left unrecorded), in reverse order: the file
/// systems, the FUSE drivers serving some of them, the loop devices over the image, the storage daemon, a FUSE
/// mount left by a killed daemon, the directories and image file qmpbak created, and the record. A busy file system stops it with an error
/// saying so, having changed nothing after it; running it again finishes the job.
pub async fn teardown(state: &MountState) -> Result<()> {
    let loops = loop_devices(state).await;
    let mountinfo = mounts()?;
    // Recorded mounts first, then any mount of our loop devices (a kill after `mount`, before the record).
    let mut targets: Vec<PathBuf> = state.mounts.iter().rev().cloned().collect();
    for (source, target) in &mountinfo {
        let ours = loops.iter().any(|l| {
            source == l
                || source
                    .to_str()
                    .zip(l.to_str())
                    .is_some_and(|(s, l)| s.strip_prefix(l).is_some_and(|rest| rest.starts_with('p')))
        });
        if ours && !targets.contains(target) {
            targets.push(target.clone());
        }
    }
    for target in &targets {
        if mountinfo.iter().any(|(_, t)| t == target) {
            run("umount", &[target.as_os_str()]).await.map_err(|e| {
                e.context(format!(
                    "cannot unmount {}: is a shell or a program using it? Leave it and run `qmpbak umount {}` again",
                    target.display(),
                    state.dir.display()
                ))
            })?;
        }
    }
    // A FUSE driver exits once its file system is unmounted; one still serving a device of ours (its mount
    // gone with a kill of the driver, say) is stopped before the device is detached.
    stop_fuse_drivers(&loops).await;
    for device in &loops {
        // Partitions added with partx stay until deleted; ignore "none there".
        let _ = run("partx", &["--delete".as_ref(), device.as_os_str()]).await;
        run("losetup", &["--detach".as_ref(), device.as_os_str()]).await?;
    }
    stop_daemon(state).await;
    if mounts()?.iter().any(|(_, t)| t == &state.image) {
        // The daemon died without unmounting its FUSE export (SIGKILL): the mount point is left dangling.
        if run("umount", &[state.image.as_os_str()]).await.is_err() {
            run("fusermount3", &["-u".as_ref(), state.image.as_os_str()]).await?;
        }
    }
    for dir in state.created_dirs.iter().rev() {
        let _ = fs::remove_dir(dir);
    }
    if state.image_created {
        let _ = fs::remove_file(&state.image);
    }
    let dir = state.state_dir()?;
    if dir.exists() {
        fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    Ok(())
}

/// The loop devices over the image: the recorded one and any other `losetup` reports for that file.
async fn loop_devices(state: &MountState) -> Vec<PathBuf> {
    let mut devices: Vec<PathBuf> = state.loop_device.iter().cloned().collect();
    let found = crate::children::output(
        crate::children::command(Path::new("losetup"))
            .args(["--noheadings", "--output", "NAME", "--associated"])
            .arg(&state.image),
    )
    .await;
    if let Ok(out) = found {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let device = PathBuf::from(line.trim());
            if !line.trim().is_empty() && !devices.contains(&device) {
                devices.push(device);
            }
        }
    }
    // The recorded device may have been detached (and reused by someone else) already.
    devices.retain(|d| backing_file(d).is_some_and(|b| b == state.image));
    devices
}

/// The backing file of loop device `device` (`/sys/block/loopN/loop/backing_file`).
fn backing_file(device: &Path) -> Option<PathBuf> {
    let name = device.file_name()?.to_str()?;
    let text = fs::read_to_string(format!("/sys/block/{name}/loop/backing_file")).ok()?;
    Some(PathBuf::from(text.trim_end()))
}

/// `(source, mount point)` of every mount, from `/proc/self/mountinfo` (octal escapes decoded).
pub fn mounts() -> Result<Vec<(PathBuf, PathBuf)>> {
    let text = fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    Ok(text
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let target = fields.get(4)?;
            let sep = fields.iter().position(|f| *f == "-")?;
            let source = fields.get(sep + 2)?;
            Some((PathBuf::from(unescape(source)), PathBuf::from(unescape(target))))
        })
        .collect())
}

fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) if bytes[i] == b'\\' => {
                let value = d.iter().fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
                out.push(u8::try_from(value).unwrap_or(b'?'));
                i += 4;
            }
            _ => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Stops the recorded storage daemon, if it is still the daemon we started: its command line must be
/// qemu-storage-daemon's and name our image (a recycled pid is left alone).
async fn stop_daemon(state: &MountState) {
    let pid = state.daemon_pid.or_else(|| {
        fs::read_to_string(&state.pidfile)
            .ok()
            .and_then(|t| t.trim().parse().ok())
    });
    let Some(pid) = pid else { return };
    if !is_our_daemon(pid, &state.image) {
        return;
    }
    let Ok(raw) = i32::try_from(pid) else {
        return;
    };
    let target = nix::unistd::Pid::from_raw(raw);
    let _ = nix::sys::signal::kill(target, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + DAEMON_EXIT_TIMEOUT;
    while is_our_daemon(pid, &state.image) {
        if Instant::now() >= deadline {
            let _ = nix::sys::signal::kill(target, nix::sys::signal::Signal::SIGKILL);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn is_our_daemon(pid: u32, image: &Path) -> bool {
    let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    // A zombie has an empty command line: it is gone for our purposes.
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let is_daemon = args.first().is_some_and(|a| a.ends_with(b"qemu-storage-daemon"));
    let image = image.as_os_str().as_encoded_bytes();
    is_daemon && args.iter().any(|a| a.windows(image.len()).any(|w| w == image))
}

/// The running FUSE file system drivers ([`super::partitions::FUSE_DRIVERS`]) whose command line names one of
/// `devices` or a partition of one (`/dev/loop3`, `/dev/loop3p2`).
fn fuse_drivers(devices: &[PathBuf]) -> Vec<nix::unistd::Pid> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let names_ours = |arg: &[u8]| {
        devices.iter().any(|d| {
            let d = d.as_os_str().as_encoded_bytes();
            arg.strip_prefix(d).is_some_and(|rest| {
                rest.is_empty()
                    || rest
                        .strip_prefix(b"p")
                        .is_some_and(|n| !n.is_empty() && n.iter().all(u8::is_ascii_digit))
            })
        })
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid: i32 = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = fs::read(entry.path().join("cmdline")).ok()?;
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            let program = Path::new(std::ffi::OsStr::from_bytes(args.first()?));
            let is_driver = program
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| super::partitions::FUSE_DRIVERS.contains(&n));
            (is_driver && args.iter().any(|a| names_ours(a))).then(|| nix::unistd::Pid::from_raw(pid))
        })
        .collect()
}

/// Waits for the FUSE drivers serving `devices` to exit (they do once unmounted), and kills those that do not
/// within [`FUSE_DRIVER_EXIT_TIMEOUT`].
async fn stop_fuse_drivers(devices: &[PathBuf]) {
    let deadline = Instant::now() + FUSE_DRIVER_EXIT_TIMEOUT;
    loop {
        let left = fuse_drivers(devices);
        if left.is_empty() {
            return;
        }
        if Instant::now() >= deadline {
            for pid in left {
                tracing::warn!(%pid, "a FUSE driver did not exit after its unmount: killing it");
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            }
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The absolute path of `program` on `PATH` (absolute entries only) or in the system's program directories.
pub fn find_program(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .filter(|d| d.is_absolute())
        .chain(["/usr/local/bin", "/usr/bin", "/bin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(program))
        .find(|p| fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

/// Runs a program to completion; a failure carries its stderr.
pub async fn run(program: &str, args: &[&std::ffi::OsStr]) -> Result<String> {
    tracing::info!(program, ?args, "running");
    let out = crate::children::output(crate::children::command(Path::new(program)).args(args))
        .await
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed ({}): {}",
            args.iter()
                .map(|a| a.to_string_lossy())
                .collect::<Vec<_>>()
                .join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Makes `path` private (0600 file or 0700 directory).
pub fn make_private(path: &Path, mode: u32) -> Result<()> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_users_records_are_in_the_cache_dir_else_the_runtime_dir() {
        let run = std::env::temp_dir();
        let some = |p: &str| Some(PathBuf::from(p));
        assert_eq!(
            user_records_parent(Some(run.clone()), some("/c"), some("/h")),
            some("/c")
        );
        assert_eq!(
            user_records_parent(Some(run.clone()), None, some("/h")),
            some("/h/.cache")
        );
        // Relative values are passed over; so is a runtime directory that does not exist.
        assert_eq!(
            user_records_parent(None, some("cache"), some("/h")),
            some("/h/.cache")
        );
        assert_eq!(
            user_records_parent(Some(run.clone()), some("c"), some("h")),
            Some(run)
        );
        assert_eq!(
            user_records_parent(some("/nonexistent/run/user/1"), None, None),
            None
        );
        assert_eq!(user_records_parent(some("run"), None, None), None);
        assert_eq!(user_records_parent(None, None, None), None);
    }

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape(r"/mnt/with\040space"), "/mnt/with space");
        assert_eq!(unescape(r"/a\011tab\134back"), "/a\ttab\\back");
        assert_eq!(unescape(r"/plain\"), r"/plain\");
        assert_eq!(unescape(r"/not\9octal"), r"/not\9octal");
        assert_eq!(unescape("/ünïcode"), "/ünïcode");
    }
}
