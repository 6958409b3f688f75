//! Runs the `qmpbak` binary under test. It is found next to the test binary, in the same target directory, or
//! at `QMPBAK_BIN`. Test runners do not build another package's binary: build it first (`cargo build -p
//! qmpbak`; scripts/test does).

use std::io::Read;
use std::path::Path;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::timeouts::{CLI_TIMEOUT, PAUSE_REACHED_TIMEOUT};

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

    /// Panics with the whole output unless the run failed and its error output says `message`.
    #[track_caller]
    pub fn assert_failed_saying(&self, message: &str) {
        assert!(
            !self.status.success() && self.stderr.contains(message),
            "expected a failure saying {message:?}: {self:?}"
        );
    }

    /// Panics with the whole output unless the run failed and said it died at crash point `point` (see
    /// [`run_crashing_at`]).
    #[track_caller]
    pub fn assert_crashed_at(&self, point: &str) {
        assert!(!self.status.success() && self.stderr.contains(point), "{self:?}");
    }

    /// Parses stdout as the report type `T` that the command prints with `--json`: the engine's own type
    /// (`qmpbak_engine::backup::BackupReport`, `…::verify::VerifyReport` …), so a test reads fields, not keys.
    #[track_caller]
    pub fn report<T: serde::de::DeserializeOwned>(&self) -> T {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "qmpbak stdout is not a {} ({e}):\n{}\n{}",
                std::any::type_name::<T>(),
                self.stdout,
                self.stderr
            )
        })
    }

    /// Parses stdout as JSON (for `--json` runs). Tests read a report as its type ([`Output::report`]); the raw
    /// JSON is for checking the printed shape itself (key names, [`assert_keys`]) and for output that has no
    /// engine type.
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

/// Runs `qmpbak ARGS` (a `--json` run), asserts that it succeeded and reads its report as `T`
/// ([`Output::report`]).
#[track_caller]
pub fn run_json<T: serde::de::DeserializeOwned>(args: &[&str]) -> T {
    run(args).success().report()
}

/// Asserts that the JSON object `value` has exactly the keys `keys`: the documented shape of a report, so that
/// renaming or dropping a field of a report type is caught where the typed reads would not notice.
#[track_caller]
pub fn assert_keys(value: &serde_json::Value, keys: &[&str]) {
    let mut have: Vec<&str> = value
        .as_object()
        .unwrap_or_else(|| panic!("not a JSON object: {value}"))
        .keys()
        .map(String::as_str)
        .collect();
    have.sort_unstable();
    let mut want = keys.to_vec();
    want.sort_unstable();
    assert_eq!(have, want, "the keys of {value}");
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

/// A `qmpbak` run held at a pause point (`QMPBAK_PAUSE_AT`): the test acts on it (a signal, a look at what
/// exists) and then collects its output.
pub struct Paused {
    child: Child,
    stderr: std::sync::mpsc::Receiver<String>,
    seen: Vec<String>,
}

/// Starts `qmpbak ARGS` with `QMPBAK_PAUSE_AT=POINT` and the extra environment `env`, and returns once it says
/// it reached the point (within [`PAUSE_REACHED_TIMEOUT`]). `umask`, when given, is set for the run.
pub fn run_paused_at(args: &[String], point: &str, env: &[(&str, &Path)], umask: Option<u32>) -> Paused {
    let mut cmd = match umask {
        Some(mask) => {
            let mut sh = Command::new("sh");
            sh.arg("-c")
                .arg(format!("umask {mask:03o} && exec \"$0\" \"$@\""))
                .arg(qmpbak_bin())
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            sh
        }
        None => command_owned(args),
    };
    for (k, v) in env {
        cmd.env(k, v);
    }
    paused_at(cmd, point)
}

/// [`run_paused_at`] for a command made elsewhere (e.g. `qmpbak` in a network namespace, with piped output).
pub fn paused_at(mut cmd: Command, point: &str) -> Paused {
    cmd.env("QMPBAK_PAUSE_AT", point);
    let mut child = cmd.spawn().expect("spawn qmpbak");
    let stderr = child.stderr.take().expect("piped stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead as _;
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut paused = Paused {
        child,
        stderr: rx,
        seen: Vec::new(),
    };
    let marker = format!("paused at {point}");
    let deadline = Instant::now() + PAUSE_REACHED_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(line) = paused.stderr.recv_timeout(left) else {
            let _ = paused.child.kill();
            panic!(
                "qmpbak did not reach pause point {point} within {PAUSE_REACHED_TIMEOUT:?}; stderr:\n{}",
                paused.seen.join("\n")
            );
        };
        let reached = line.contains(&marker);
        paused.seen.push(line);
        if reached {
            return paused;
        }
    }
}

impl Paused {
    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).expect("pid fits")
    }

    /// Sends `signal` to the paused `qmpbak` (only to it, not to its children).
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), signal).expect("send signal");
    }

    /// Waits for the run to end (within [`CLI_TIMEOUT`]) and returns its output.
    pub fn finish(mut self) -> Output {
        let mut stdout = self.child.stdout.take().expect("piped stdout");
        let out_reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stdout.read_to_string(&mut s);
            s
        });
        let deadline = Instant::now() + CLI_TIMEOUT;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("wait for qmpbak") {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "qmpbak did not finish within {CLI_TIMEOUT:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut stderr = self.seen.join("\n");
        while let Ok(line) = self.stderr.recv_timeout(Duration::from_secs(1)) {
            stderr.push('\n');
            stderr.push_str(&line);
        }
        Output {
            status,
            stdout: out_reader.join().unwrap_or_default(),
            stderr,
        }
    }
}

/// The pids of the live children of process `pid`.
pub fn children_of(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(child) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid …: comm may hold spaces, so split after its closing parenthesis.
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.first() != Some(&"Z") && fields.get(1).and_then(|p| p.parse().ok()) == Some(pid) {
            out.push(child);
        }
    }
    out
}

/// The pids of live processes (not zombies) whose command line mentions `marker`.
pub fn processes_mentioning(marker: &str) -> Vec<i32> {
    let mut pids = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        // A zombie's command line is empty: it holds nothing open and writes nothing.
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if String::from_utf8_lossy(&cmdline).contains(marker) {
            pids.push(pid);
        }
    }
    pids
}

/// Waits (within `timeout`) until no live process mentions `marker`; panics naming them otherwise.
pub fn assert_no_process_mentions(marker: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let left = processes_mentioning(marker);
        if left.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "processes {left:?} mentioning {marker} still run {timeout:?} after qmpbak ended"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
