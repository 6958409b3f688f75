//! Runs the `qmpbak` binary under test. It is found next to the test binary, in the same target directory, or
//! at `QMPBAK_BIN`. Test runners do not build another package's binary: build it first (`cargo build -p
//! qmpbak`; scripts/test does).

use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::timeouts::CLI_TIMEOUT;

/// Path of the `qmpbak` binary built for this test run.
pub fn qmpbak_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("QMPBAK_BIN") {
        return PathBuf::from(path);
    }
    // target/<profile>/deps/<test binary> -> target/<profile>/qmpbak
    let exe = std::env::current_exe().expect("current test executable");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile> directory");
    let bin = profile_dir.join("qmpbak");
    assert!(
        bin.exists(),
        "{} not built: run the tests through cargo or nextest",
        bin.display()
    );
    bin
}

/// The result of one `qmpbak` run.
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// Panics with the whole output unless the run exited 0.
    // An assertion first: callers may ignore the returned output.
    #[allow(clippy::return_self_not_must_use)]
    #[track_caller]
    pub fn success(self) -> Output {
        assert!(
            self.status.success(),
            "qmpbak failed ({}):\n{}\n{}",
            self.status,
            self.stdout,
            self.stderr
        );
        self
    }

    /// Panics with the whole output unless the run failed and said it died at crash point `point` (see
    /// [`run_crashing_at`]).
    #[track_caller]
    pub fn assert_crashed_at(&self, point: &str) {
        assert!(!self.status.success() && self.stderr.contains(point), "{self:?}");
    }

    /// Parses stdout as JSON (for `--json` runs).
    #[track_caller]
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "qmpbak stdout is not JSON ({e}):\n{}\n{}",
                self.stdout, self.stderr
            )
        })
    }
}

/// A `qmpbak` command with the given arguments, not yet started.
pub fn command(args: &[&str]) -> Command {
    let mut cmd = Command::new(qmpbak_bin());
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// [`command`] for arguments built as owned strings.
pub fn command_owned(args: &[String]) -> Command {
    command(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// Runs `qmpbak ARGS` to completion within [`CLI_TIMEOUT`].
pub fn run(args: &[&str]) -> Output {
    let child = command(args).spawn().expect("spawn qmpbak");
    wait(child, CLI_TIMEOUT)
}

/// [`run`] for arguments built as owned strings.
pub fn run_owned(args: &[String]) -> Output {
    let child = command_owned(args).spawn().expect("spawn qmpbak");
    wait(child, CLI_TIMEOUT)
}

/// Runs `qmpbak ARGS` with `QMPBAK_CRASH_AT=POINT`, the test hook that makes it abort at that crash point, and
/// collects its output within `timeout` (see [`Output::assert_crashed_at`]).
pub fn run_crashing_at(args: &[String], point: &str, timeout: Duration) -> Output {
    let mut cmd = command_owned(args);
    cmd.env("QMPBAK_CRASH_AT", point);
    wait(cmd.spawn().expect("spawn qmpbak"), timeout)
}

/// Runs `qmpbak ARGS` with its standard output a pipe whose reading end is already closed (as after `| head
/// -1` has read its line), within [`CLI_TIMEOUT`]; its `stdout` is empty.
pub fn run_with_stdout_closed(args: &[&str]) -> Output {
    let (reader, writer) = nix::unistd::pipe().expect("pipe");
    drop(reader);
    let child = command(args)
        .stdout(Stdio::from(writer))
        .spawn()
        .expect("spawn qmpbak");
    wait(child, CLI_TIMEOUT)
}

/// Waits for a started `qmpbak` within `timeout` (killing it past that) and collects its output (an empty
/// `stdout` if it was not piped).
pub fn wait(mut child: Child, timeout: Duration) -> Output {
    let stdout = child.stdout.take();
    let mut stderr = child.stderr.take().expect("piped stderr");
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(mut stdout) = stdout {
            let _ = stdout.read_to_string(&mut s);
        }
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for qmpbak") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!("qmpbak did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
    }
}
