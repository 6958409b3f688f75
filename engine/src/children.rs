//! The programs qmpbak runs (`qemu-img`, `qemu-storage-daemon`) are owned by the run that started them:
//!
//! - each dies with qmpbak, also when qmpbak is SIGKILLed: the kernel sends it SIGKILL when its parent goes
//!   (`PR_SET_PDEATHSIG`), so no orphan goes on writing a node file or serving the repository after the lock
//!   is released;
//! - an [`Owned`] child that is dropped before it finished (its run failed, or SIGINT/SIGTERM made qmpbak drop
//!   the command's future, see [`crate::signals::Interrupt::run`]) is killed and *reaped* in the drop, before
//!   anything declared before it — the VM's lock among them — is released;
//! - each runs in its own process group, so a terminal's Ctrl-C or hang-up, `timeout`, or a `kill` of
//!   qmpbak's group reaches qmpbak alone, which stops its children itself, in the order its run needs;
//! - none inherits the repository key: `QMPBAK_KEY` and the variable `--key-env` named are removed from every
//!   child's environment, so no `/proc/PID/environ` of a child shows it. QEMU's programs get the key they need
//!   (the LUKS passphrase of the node files) as an inherited descriptor of an anonymous memory file
//!   ([`share_with_qemu`], [`qemu_command`]), which no other child inherits and no file name outlives.
//!
//! Every child is a [`tokio::process::Command`] made here ([`command`]) and run as an [`Owned`] child
//! ([`spawn`], [`output`]): no code of the engine runs a program through blocking `std::process`, so no async
//! task blocks a runtime thread on a child. QEMU's programs are made by [`crate::qemu_bins::QemuBins`] (which
//! calls [`qemu_command`]); other programs (`blkid`, `losetup`, `mount`, a FUSE driver …) by [`command`] directly.

use std::io;
use std::os::fd::RawFd;
use std::path::Path;
use std::process::{ExitStatus, Output, Stdio};
use std::sync::{Mutex, PoisonError};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::AsyncReadExt as _;

/// The environment variable read for the repository key when no other source is named (`crypt::key::KEY_ENV`;
/// defined here so that this module imports nothing of `crypt`, which uses it).
pub const KEY_ENV: &str = "QMPBAK_KEY";

/// The other environment variables that hold a key in this process (`--key-env NAME`).
static KEY_VARIABLES: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Keeps the environment variable `name`, which holds a key, out of every child's environment.
pub fn keep_env_from_children(name: &str) {
    let mut names = KEY_VARIABLES.lock().unwrap_or_else(PoisonError::into_inner);
    if !names.iter().any(|n| n == name) {
        names.push(name.to_owned());
    }
}

/// Removes the key's environment variables from `cmd`'s environment: `QMPBAK_KEY` always, and those named by
/// [`keep_env_from_children`]. The parent's own environment is left alone (changing it is unsafe in a threaded
/// process).
fn scrub_env(cmd: &mut std::process::Command) {
    cmd.env_remove(KEY_ENV);
    for name in KEY_VARIABLES
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
    {
        cmd.env_remove(name);
    }
}

/// The descriptors QEMU's programs inherit ([`share_with_qemu`]).
static SHARED_WITH_QEMU: Mutex<Vec<RawFd>> = Mutex::new(Vec::new());

/// Lets the programs [`qemu_command`] makes from now on inherit `fd` (open in this process, number 3 or more,
/// close-on-exec here), under the same number: QEMU reads it as `/proc/self/fd/N`. Until [`stop_sharing`].
pub fn share_with_qemu(fd: RawFd) {
    let mut fds = SHARED_WITH_QEMU.lock().unwrap_or_else(PoisonError::into_inner);
    if !fds.contains(&fd) {
        fds.push(fd);
    }
}

/// Undoes [`share_with_qemu`] for `fd`, before it is closed.
pub fn stop_sharing(fd: RawFd) {
    SHARED_WITH_QEMU
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .retain(|&f| f != fd);
}

/// [`command`] for one of QEMU's programs (`qemu-img`, `qemu-storage-daemon`): it also inherits the descriptors
/// shared with [`share_with_qemu`] when it is made.
pub fn qemu_command(program: &Path) -> tokio::process::Command {
    let fds = SHARED_WITH_QEMU
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    qemu_command_inheriting(program, fds)
}

/// [`command`] for one of QEMU's programs that inherits `fds` (open here, numbered 3 or more, close-on-exec
/// here) and none of those shared with [`share_with_qemu`].
#[allow(unsafe_code)]
pub fn qemu_command_inheriting(program: &Path, fds: Vec<RawFd>) -> tokio::process::Command {
    let mut cmd = command(program);
    if !fds.is_empty() {
        // SAFETY: the closure runs in the forked child before exec. It only calls fcntl, which is
        // async-signal-safe, and allocates nothing (the list was copied before the fork).
        unsafe {
            cmd.pre_exec(move || {
                for &fd in &fds {
                    if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                        return Err(io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
    }
    cmd
}

/// An async command for `program` whose process dies with qmpbak and inherits no key; spawn it with [`spawn`]
/// (or [`output`]).
pub fn command(program: &Path) -> tokio::process::Command {
    use std::os::unix::process::CommandExt as _;
    let mut cmd = std::process::Command::new(program);
    // Its own process group: the signals a terminal (Ctrl-C, a hang-up) or `timeout` send to qmpbak's group
    // reach qmpbak alone, which then stops its children when and as it must (a live restore across hosts
    // first finishes the streams its server feeds; killed with the rest, the server left the guest with read
    // errors and qmpbak waiting).
    cmd.process_group(0);
    // No child reads the terminal: in a process group of its own it would be stopped (SIGTTIN) if it tried.
    cmd.stdin(std::process::Stdio::null());
    die_with_parent(&mut cmd);
    scrub_env(&mut cmd);
    // Not `kill_on_drop`: an [`Owned`] child is killed and reaped by its own drop, and a second kill by pid
    // after the reaping could hit an unrelated process that reused the pid.
    tokio::process::Command::from(cmd)
}

/// Makes the child get SIGKILL when qmpbak exits, however it exits.
#[allow(unsafe_code)]
fn die_with_parent(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt as _;
    let parent = nix::unistd::getpid();
    // SAFETY: the closure runs in the forked child before exec. It only makes system calls that are
    // async-signal-safe (prctl, getppid, kill) and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(io::Error::from)?;
            // qmpbak may have died between fork and prctl: then nobody would ever send the signal.
            if nix::unistd::getppid() != parent {
                let _ = kill(nix::unistd::getpid(), Signal::SIGKILL);
            }
            Ok(())
        });
    }
}

/// A running child that is killed and reaped when dropped before it finished.
pub struct Owned {
    child: tokio::process::Child,
    pid: Option<Pid>,
    finished: bool,
}

/// Starts `cmd` as an [`Owned`] child.
pub fn spawn(cmd: &mut tokio::process::Command) -> io::Result<Owned> {
    let child = cmd.spawn()?;
    let pid = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .map(Pid::from_raw);
    Ok(Owned {
        child,
        pid,
        finished: false,
    })
}

/// Runs `cmd` to its end with no input, collecting its output, as [`tokio::process::Command::output`] does,
/// but owned: dropping the future kills and reaps the process.
pub async fn output(cmd: &mut tokio::process::Command) -> io::Result<Output> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    spawn(cmd)?.output().await
}

impl Owned {
    /// The child's process id, while it runs.
    pub fn pid(&self) -> Option<i32> {
        self.pid.map(Pid::as_raw)
    }

    /// The child's standard error, if piped and not taken yet.
    pub fn stderr(&mut self) -> Option<tokio::process::ChildStderr> {
        self.child.stderr.take()
    }

    /// Waits for the child to exit.
    pub async fn wait(&mut self) -> io::Result<ExitStatus> {
        let status = self.child.wait().await?;
        self.finished = true;
        Ok(status)
    }

    /// Kills the child and waits for it.
    pub async fn kill(&mut self) -> io::Result<()> {
        self.child.kill().await?;
        self.finished = true;
        Ok(())
    }

    /// Waits for the child to exit, reading its piped standard output and error meanwhile.
    pub async fn output(mut self) -> io::Result<Output> {
        let stdout = self.child.stdout.take();
        let stderr = self.child.stderr.take();
        let (status, stdout, stderr) = tokio::join!(self.wait(), read_all(stdout), read_all(stderr));
        Ok(Output {
            status: status?,
            stdout: stdout?,
            stderr: stderr?,
        })
    }
}

async fn read_all<R: tokio::io::AsyncRead + Unpin>(pipe: Option<R>) -> io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    if let Some(mut pipe) = pipe {
        pipe.read_to_end(&mut buf).await?;
    }
    Ok(buf)
}

impl Drop for Owned {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let Some(pid) = self.pid else { return };
        let _ = kill(pid, Signal::SIGKILL);
        // Reaped here, not in the background: until it is, the process may still be writing. A SIGKILLed
        // process exits as soon as the kernel lets it; this waits for nothing else.
        let _ = nix::sys::wait::waitpid(pid, None);
    }
}
