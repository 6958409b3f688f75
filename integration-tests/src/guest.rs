//! [`TestGuest`]: a tiny real Linux guest (kernel and initramfs from `scripts/build-guest`) on one virtio-blk data
//! disk, for tests that need a file system being written while they back it up. The kernel command line picks the
//! guest's mode: [`GuestMode::Write`] formats a blank disk and keeps creating files whose sha256 it records in a
//! manifest only after they are synced; [`GuestMode::Verify`] fscks the disk, checks every recorded file and powers
//! off ([`verify_image`] runs it on a copy-on-write overlay of an image and returns the [`Verdict`]). The guest
//! talks in `QMPBAK-` lines on its serial console, which the fixture reads from a socket (see `scripts/guest/`).
//!
//! Like [`TestVm`](crate::TestVm): a client-mode fixture QMP monitor (start-up is an event), a server socket
//! [`TestGuest::socket`] for `qmpbak`, block node `node-<id>` under qdev id `<id>`, QEMU killed on drop and its
//! output printed when the test fails, every wait bounded by a named timeout.

use std::fs::File;
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader as AsyncBufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

use crate::image;
use crate::qemu::QemuBinaries;
use crate::timeouts::{PROCESS_EXIT_TIMEOUT, QMP_COMMAND_TIMEOUT, QMP_CONNECT_TIMEOUT};

/// From spawning QEMU until the guest prints `QMPBAK-READY` (about 3 s alone under TCG).
pub const GUEST_BOOT_TIMEOUT: Duration = Duration::from_secs(120);
/// For the next progress line of a running guest (`QMPBAK-FILE`: a few per second).
pub const GUEST_PROGRESS_TIMEOUT: Duration = Duration::from_secs(60);
/// A verify guest from spawning QEMU to powering off: boot, fsck, checking every recorded file.
pub const GUEST_VERIFY_TIMEOUT: Duration = Duration::from_secs(300);
/// Until the guest agent answers its first `guest-sync` after the guest started.
pub const QGA_SYNC_TIMEOUT: Duration = Duration::from_secs(120);
/// One guest agent command and its reply.
pub const QGA_COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one `guest-sync` waits before it is sent again with a new id (the agent may not run yet).
const QGA_SYNC_RETRY: Duration = Duration::from_secs(3);

/// The first line of the known file the write guest creates on a blank disk; it occurs once on the disk, so a
/// test can find the file's data in a raw image and damage it ([`damage_known_file`]).
pub const KNOWN_FILE_MARKER: &[u8] = b"QMPBAK-MARKER-0001";

/// The serial line prefixes of the guest protocol.
pub mod line {
    pub const READY: &str = "QMPBAK-READY";
    pub const FILE: &str = "QMPBAK-FILE ";
    pub const AGENT: &str = "QMPBAK-AGENT";
    pub const ERROR: &str = "QMPBAK-ERROR";
    pub const FSCK: &str = "QMPBAK-FSCK ";
    pub const VERIFY: &str = "QMPBAK-VERIFY ";
    pub const DONE: &str = "QMPBAK-DONE";
}

/// The guest's kernel and initramfs, as `scripts/build-guest` left them.
#[derive(Debug, Clone)]
pub struct GuestFiles {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

impl GuestFiles {
    /// `QMPBAK_GUEST_DIR`, else `/var/cache/qmpbak/guest` (where `scripts/setup` builds it). Panics with what to
    /// run when the guest is not built or is older than `scripts/guest/*` (asked once per test process with
    /// `scripts/build-guest --check`, which changes nothing).
    pub fn locate() -> GuestFiles {
        static CHECKED: OnceLock<Result<(), String>> = OnceLock::new();
        let dir = std::env::var_os("QMPBAK_GUEST_DIR")
            .filter(|d| !d.is_empty())
            .map_or_else(|| PathBuf::from("/var/cache/qmpbak/guest"), PathBuf::from);
        if let Err(why) = CHECKED.get_or_init(|| check_built(&dir)) {
            panic!("{why}");
        }
        GuestFiles {
            kernel: dir.join("vmlinux"),
            initrd: dir.join("initramfs.cpio.gz"),
        }
    }
}

fn check_built(dir: &Path) -> Result<(), String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/build-guest");
    if !script.exists() {
        return if dir.join("vmlinux").exists() && dir.join("initramfs.cpio.gz").exists() {
            Ok(())
        } else {
            Err(format!("no test guest in {}: run scripts/setup", dir.display()))
        };
    }
    let out = Command::new(&script)
        .arg("--check")
        .arg(dir)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "the test guest is not usable: {}(scripts/setup builds it)",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// What the guest does after boot (`qmpbak.mode=` on its kernel command line).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GuestMode {
    /// Format a blank disk (or continue on an existing one), print `READY`, then write files forever.
    #[default]
    Write,
    /// fsck, check every file in the manifest, print the verdict, power off.
    Verify,
}

impl GuestMode {
    fn as_str(self) -> &'static str {
        match self {
            GuestMode::Write => "write",
            GuestMode::Verify => "verify",
        }
    }
}

#[derive(Debug, Clone)]
enum DataDisk {
    /// A new blank qcow2 in the guest's directory.
    New { id: String, size: u64 },
    /// An image used in place.
    Existing { id: String, path: PathBuf },
}

/// How to start a [`TestGuest`].
#[derive(Debug, Clone)]
pub struct TestGuestBuilder {
    mode: GuestMode,
    disk: DataDisk,
    agent: bool,
    extra_args: Vec<String>,
}

impl Default for TestGuestBuilder {
    fn default() -> Self {
        TestGuestBuilder {
            mode: GuestMode::Write,
            disk: DataDisk::New {
                id: "disk0".into(),
                size: 64 * crate::MIB,
            },
            agent: false,
            extra_args: Vec::new(),
        }
    }
}

impl TestGuestBuilder {
    /// The data disk: a new blank qcow2 of `size` bytes, qdev id `id` (default `disk0`, 64 MiB).
    #[must_use]
    pub fn disk(mut self, id: &str, size: u64) -> Self {
        self.disk = DataDisk::New {
            id: id.to_owned(),
            size,
        };
        self
    }

    /// The data disk: the image at `path` (format as `qemu-img info` reports it), used in place.
    #[must_use]
    pub fn existing_disk(mut self, id: &str, path: &Path) -> Self {
        self.disk = DataDisk::Existing {
            id: id.to_owned(),
            path: path.to_owned(),
        };
        self
    }

    #[must_use]
    pub fn mode(mut self, mode: GuestMode) -> Self {
        self.mode = mode;
        self
    }

    /// Adds the guest agent's virtio-serial port; the host end is [`TestGuest::qga_socket`].
    #[must_use]
    pub fn agent(mut self) -> Self {
        self.agent = true;
        self
    }

    /// Extra QEMU command-line arguments.
    #[must_use]
    pub fn arg(mut self, arg: &str) -> Self {
        self.extra_args.push(arg.to_owned());
        self
    }

    /// Starts QEMU and returns once its fixture QMP monitor is connected; the guest is still booting (wait for
    /// [`line::READY`] in write mode).
    pub async fn start(self) -> TestGuest {
        let dir = tempfile::Builder::new()
            .prefix("qmpbak-guest-")
            .tempdir()
            .expect("create temp dir");
        if let DataDisk::New { id, size } = &self.disk {
            image::create_qcow2(&dir.path().join(format!("{id}.qcow2")), *size);
        }
        TestGuest::launch(self, dir).await
    }
}

/// A running guest. See the module docs.
pub struct TestGuest {
    config: TestGuestBuilder,
    dir: Option<TempDir>,
    child: Option<Child>,
    qmp: Option<qmp::Qmp>,
    bins: QemuBinaries,
    /// Every console line so far, appended by the reader thread.
    console: Arc<Mutex<Vec<String>>>,
    /// The number of console lines, changed by the reader thread; closed when the console closes.
    seen: watch::Receiver<usize>,
    /// Index of the first console line [`TestGuest::wait_for_line`] has not looked at yet.
    cursor: usize,
    /// The failure message already carried the output; `Drop` need not print it again.
    output_shown: bool,
}

impl TestGuest {
    pub fn builder() -> TestGuestBuilder {
        TestGuestBuilder::default()
    }

    /// A write-mode guest on a new blank qcow2 disk `id` of `size` bytes, returned once it printed `READY`.
    pub async fn start_writing(id: &str, size: u64) -> TestGuest {
        let mut guest = TestGuest::builder().disk(id, size).start().await;
        guest.wait_ready().await;
        guest
    }

    async fn launch(config: TestGuestBuilder, dir: TempDir) -> TestGuest {
        let bins = QemuBinaries::from_env();
        let files = GuestFiles::locate();
        let path = |name: &str| dir.path().join(name);
        let fixture_sock = path("fixture-qmp.sock");
        let console_sock = path("console.sock");
        let qmp_listener = UnixListener::bind(&fixture_sock).expect("bind fixture QMP socket");
        let console_listener = UnixListener::bind(&console_sock).expect("bind console socket");

        let (id, disk_file) = match &config.disk {
            DataDisk::New { id, .. } => (id.clone(), path(&format!("{id}.qcow2"))),
            DataDisk::Existing { id, path } => (id.clone(), path.clone()),
        };
        let format = image::info(&disk_file)["format"]
            .as_str()
            .unwrap_or("raw")
            .to_owned();
        let node = format!("node-{id}");
        let append = format!(
            "console=ttyS0 quiet panic=-1 mitigations=off cryptomgr.notests=1 qmpbak.mode={}",
            config.mode.as_str()
        );

        let mut cmd = Command::new(&bins.system);
        cmd.args(bins.data_dir_args())
            .args([
                "-M",
                "q35,accel=tcg",
                "-cpu",
                "max",
                "-m",
                "256",
                "-nodefaults",
                "-no-reboot",
            ])
            .args(["-display", "none", "-no-user-config"])
            .args(bins.bios_args())
            .arg("-kernel")
            .arg(&files.kernel)
            .arg("-initrd")
            .arg(&files.initrd)
            .arg("-append")
            .arg(append)
            .arg("-chardev")
            .arg(format!(
                "socket,id=console,path={},server=off",
                console_sock.display()
            ))
            .args(["-serial", "chardev:console"])
            // The server socket comes first: it exists by the time QEMU connects to the fixture's listener.
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", path("qmp.sock").display()))
            .arg("-qmp")
            .arg(format!("unix:{},server=off", fixture_sock.display()));
        let file = json!({ "driver": "file", "filename": disk_file, "node-name": format!("{node}-file") });
        let fmt = json!({ "driver": format, "file": format!("{node}-file"), "node-name": node });
        cmd.arg("-blockdev")
            .arg(file.to_string())
            .arg("-blockdev")
            .arg(fmt.to_string());
        cmd.arg("-device")
            .arg(format!("virtio-blk-pci,drive={node},id={id}"));
        if config.agent {
            cmd.args(["-device", "virtio-serial-pci,id=vser0", "-chardev"])
                .arg(format!(
                    "socket,id=qga0,path={},server=on,wait=off",
                    path("qga.sock").display()
                ))
                .args([
                    "-device",
                    "virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0",
                ]);
        }
        cmd.args(&config.extra_args);
        cmd.stdin(Stdio::null())
            .stdout(File::create(path("qemu.stdout")).expect("create qemu.stdout"))
            .stderr(File::create(path("qemu.stderr")).expect("create qemu.stderr"));
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bins.system.display()));

        let (seen_tx, seen) = watch::channel(0);
        let console = Arc::new(Mutex::new(Vec::new()));
        let mut guest = TestGuest {
            config,
            dir: Some(dir),
            child: Some(child),
            qmp: None,
            bins,
            console,
            seen,
            cursor: 0,
            output_shown: false,
        };

        // QEMU connects its client-mode chardevs while it parses its command line, before the machine runs.
        let stream = guest.accept(&console_listener, "console").await;
        let log = File::create(guest.dir().join("console.log")).expect("create console.log");
        let stream = stream.into_std().expect("console socket");
        stream.set_nonblocking(false).expect("blocking console socket");
        let console = Arc::clone(&guest.console);
        std::thread::spawn(move || read_console(stream, &console, &seen_tx, log));
        let stream = guest.accept(&qmp_listener, "QMP monitor").await;
        match qmp::Qmp::from_stream(stream, QMP_CONNECT_TIMEOUT).await {
            Ok(qmp) => {
                qmp.set_command_timeout(QMP_COMMAND_TIMEOUT);
                guest.qmp = Some(qmp);
            }
            Err(e) => guest.fail(&format!("QMP negotiation failed: {e}")),
        }
        guest
    }

    /// Accepts QEMU's connection to `listener` within [`QMP_CONNECT_TIMEOUT`]; fails at once if QEMU exits first
    /// (a bad command line).
    async fn accept(&mut self, listener: &UnixListener, what: &str) -> UnixStream {
        const EXIT_CHECK: Duration = Duration::from_millis(100);
        let deadline = Instant::now() + QMP_CONNECT_TIMEOUT;
        loop {
            match tokio::time::timeout(EXIT_CHECK, listener.accept()).await {
                Ok(Ok((stream, _))) => return stream,
                Ok(Err(e)) => self.fail(&format!("accepting QEMU's {what} connection failed: {e}")),
                Err(_) => {}
            }
            if !self.alive() {
                self.fail(&format!("QEMU exited before it connected its {what}"));
            }
            if Instant::now() >= deadline {
                self.fail(&format!(
                    "QEMU did not connect its {what} within {QMP_CONNECT_TIMEOUT:?}"
                ));
            }
        }
    }

    /// Waits for the next console line, after the last one this method returned, that starts with `prefix`,
    /// and returns it. Fails the test when the guest reports an error, its console closes (QEMU exited) or
    /// `timeout` passes.
    pub async fn wait_for_line(&mut self, prefix: &str, timeout: Duration) -> String {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut closed = false;
        loop {
            // Mark the current count seen before scanning, so a line added meanwhile wakes the wait below.
            self.seen.borrow_and_update();
            let found = {
                let lines = self.console.lock().expect("console lines");
                let fresh = &lines[self.cursor..];
                let error = fresh
                    .iter()
                    .find(|l| l.starts_with(line::ERROR) && !prefix.starts_with(line::ERROR));
                if let Some(error) = error {
                    Err(error.clone())
                } else {
                    Ok(fresh
                        .iter()
                        .position(|l| l.starts_with(prefix))
                        .map(|i| (self.cursor + i, fresh[i].clone())))
                }
            };
            match found {
                Err(error) => self.fail(&format!(
                    "the guest reported an error waiting for {prefix:?}: {error}"
                )),
                Ok(Some((index, text))) => {
                    self.cursor = index + 1;
                    return text;
                }
                Ok(None) if closed => {
                    self.fail(&format!(
                        "the guest's console closed before a line starting with {prefix:?}"
                    ));
                }
                Ok(None) => {}
            }
            match tokio::time::timeout_at(deadline, self.seen.changed()).await {
                Ok(Ok(())) => {}
                // The reader thread ended: QEMU closed the console. Scan what it added last, once more.
                Ok(Err(_)) => closed = true,
                Err(_) => self.fail(&format!(
                    "no console line starting with {prefix:?} within {timeout:?}"
                )),
            }
        }
    }

    /// Waits for `QMPBAK-READY` within [`GUEST_BOOT_TIMEOUT`].
    pub async fn wait_ready(&mut self) {
        self.wait_for_line(line::READY, GUEST_BOOT_TIMEOUT).await;
    }

    /// Waits until the guest has created file `f<n>` or a later one (within [`GUEST_PROGRESS_TIMEOUT`] per file)
    /// and returns the number of the file it reported.
    pub async fn wait_for_file(&mut self, n: u64) -> u64 {
        loop {
            let text = self.wait_for_line(line::FILE, GUEST_PROGRESS_TIMEOUT).await;
            let got: u64 = text[line::FILE.len()..].trim().parse().unwrap_or(0);
            if got >= n {
                return got;
            }
        }
    }

    /// The number of the last file the guest reported creating so far (0 before the first).
    pub fn files_written(&self) -> u64 {
        let lines = self.console.lock().expect("console lines");
        lines
            .iter()
            .rev()
            .find_map(|l| l.strip_prefix(line::FILE))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Every console line so far.
    pub fn console_lines(&self) -> Vec<String> {
        self.console.lock().expect("console lines").clone()
    }

    /// The fixture's own QMP connection.
    pub fn qmp(&self) -> &qmp::Qmp {
        self.qmp.as_ref().expect("QMP connection of a started TestGuest")
    }

    /// The QMP server socket for the program under test (`qmpbak --socket`).
    pub fn socket(&self) -> PathBuf {
        self.dir().join("qmp.sock")
    }

    /// The host end of the guest agent's port (`guest-*` commands); only with [`TestGuestBuilder::agent`].
    pub fn qga_socket(&self) -> PathBuf {
        assert!(
            self.config.agent,
            "this TestGuest has no guest agent: start it with .agent()"
        );
        self.dir().join("qga.sock")
    }

    /// Connects to the guest agent and synchronises with it ([`Qga::connect`]).
    pub async fn qga(&self) -> Qga {
        Qga::connect(&self.qga_socket()).await
    }

    /// The guest's temporary directory (its new disk image, sockets, QEMU's output, `console.log`).
    pub fn dir(&self) -> &Path {
        self.dir.as_ref().expect("TestGuest directory").path()
    }

    /// The qdev id of the data disk.
    pub fn disk_id(&self) -> &str {
        match &self.config.disk {
            DataDisk::New { id, .. } | DataDisk::Existing { id, .. } => id,
        }
    }

    /// The block node of the data disk, `node-<id>`.
    pub fn node_name(&self) -> String {
        format!("node-{}", self.disk_id())
    }

    /// The image behind the data disk.
    pub fn disk_path(&self) -> PathBuf {
        match &self.config.disk {
            DataDisk::New { id, .. } => self.dir().join(format!("{id}.qcow2")),
            DataDisk::Existing { path, .. } => path.clone(),
        }
    }

    pub fn binaries(&self) -> &QemuBinaries {
        &self.bins
    }

    /// Copies the data disk as the guest sees it at this instant into a standalone qcow2 at `dst`: pauses the VM
    /// (`stop` flushes QEMU's caches), copies with `qemu-img convert -U`, resumes it if it was running. The guest's own page cache
    /// is not flushed: the copy is crash-consistent, like a backup without the guest agent.
    pub async fn capture_disk(&self, dst: &Path) {
        let status = self
            .qmp()
            .execute_raw("query-status", None)
            .await
            .expect("query-status");
        let was_running = status["running"].as_bool().unwrap_or(false);
        if was_running {
            self.qmp().execute_raw("stop", None).await.expect("stop");
        }
        image::convert_to_qcow2(&self.disk_path(), dst);
        if was_running {
            self.qmp().execute_raw("cont", None).await.expect("cont");
        }
    }

    /// Waits up to `timeout` for QEMU to exit by itself (a verify guest powers off) and returns its status.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.child.as_mut().map(Child::try_wait);
            match status {
                Some(Ok(Some(status))) => return status,
                Some(Ok(None)) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Some(Ok(None)) => self.fail(&format!("QEMU did not exit within {timeout:?}")),
                Some(Err(e)) => self.fail(&format!("waiting for QEMU failed: {e}")),
                None => self.fail("QEMU was already killed"),
            }
        }
    }

    /// Kills QEMU with SIGKILL (a crash) and waits for it; the disk image stays.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            crate::vm::wait_exit(&mut child, PROCESS_EXIT_TIMEOUT);
        }
    }

    /// Whether the QEMU process is still alive (not reaped).
    pub fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// The process id of QEMU, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The guest's console (its last lines) and QEMU's stdout and stderr so far.
    pub fn output(&self) -> String {
        const CONSOLE_TAIL: usize = 200;
        let lines = self.console_lines();
        let skipped = lines.len().saturating_sub(CONSOLE_TAIL);
        let mut out = format!(
            "--- guest console ({} lines, {skipped} not shown) ---\n",
            lines.len()
        );
        for l in &lines[skipped..] {
            out.push_str(l);
            out.push('\n');
        }
        if let Some(dir) = self.dir.as_ref() {
            let read = |name: &str| std::fs::read_to_string(dir.path().join(name)).unwrap_or_default();
            out.push_str("--- qemu stdout ---\n");
            out.push_str(&read("qemu.stdout"));
            out.push_str("--- qemu stderr ---\n");
            out.push_str(&read("qemu.stderr"));
        }
        out
    }

    fn fail(&mut self, what: &str) -> ! {
        self.kill();
        self.output_shown = true;
        panic!("{what}\n{}", self.output());
    }
}

impl Drop for TestGuest {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            if !self.output_shown {
                eprintln!("{}", self.output());
            }
            if std::env::var_os("QMPBAK_KEEP_TEST_DIRS").is_some() {
                if let Some(dir) = self.dir.take() {
                    eprintln!("keeping {}", dir.keep().display());
                }
            }
        }
    }
}

/// The console reader: one thread per guest, so the console is drained even while a test blocks its runtime
/// (running `qmpbak` or `qemu-img`). Ends when QEMU closes the socket; `seen` is dropped then, which tells
/// waiters.
fn read_console(
    stream: std::os::unix::net::UnixStream,
    console: &Mutex<Vec<String>>,
    seen: &watch::Sender<usize>,
    mut log: File,
) {
    let mut reader = BufReader::new(stream);
    let mut raw = Vec::new();
    loop {
        raw.clear();
        match reader.read_until(b'\n', &mut raw) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let _ = log.write_all(&raw);
        let text = String::from_utf8_lossy(&raw)
            .trim_end_matches(['\r', '\n'])
            .to_owned();
        let count = {
            let mut lines = console.lock().expect("console lines");
            lines.push(text);
            lines.len()
        };
        seen.send_replace(count);
    }
}

/// A guest agent connection (QGA's JSON protocol on the virtio-serial port's host socket).
pub struct Qga {
    reader: AsyncBufReader<tokio::net::unix::OwnedReadHalf>,
    writer: tokio::net::unix::OwnedWriteHalf,
    /// Bytes of a reply line read so far: kept across a timed-out read so nothing is lost.
    pending: Vec<u8>,
    next_sync_id: u64,
}

impl Qga {
    /// Connects to the agent's socket and synchronises: sends `guest-sync` with a fresh id until the agent
    /// answers the latest one (it may not run yet, and a previous client may have left replies behind), within
    /// [`QGA_SYNC_TIMEOUT`].
    pub async fn connect(path: &Path) -> Qga {
        let stream = tokio::time::timeout(QMP_CONNECT_TIMEOUT, UnixStream::connect(path))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "connecting to the guest agent socket {} timed out",
                    path.display()
                )
            })
            .unwrap_or_else(|e| panic!("cannot connect to the guest agent socket {}: {e}", path.display()));
        let (read, writer) = stream.into_split();
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_secs());
        let mut qga = Qga {
            reader: AsyncBufReader::new(read),
            writer,
            pending: Vec::new(),
            next_sync_id: seed % 1_000_000,
        };
        qga.sync().await;
        qga
    }

    async fn sync(&mut self) {
        let deadline = Instant::now() + QGA_SYNC_TIMEOUT;
        loop {
            self.next_sync_id += 1;
            let id = self.next_sync_id;
            self.send(&json!({ "execute": "guest-sync", "arguments": { "id": id } }))
                .await;
            let retry = Instant::now() + QGA_SYNC_RETRY;
            while let Some(reply) = self.read_reply(retry.min(deadline)).await {
                if reply["return"] == json!(id) {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "the guest agent did not answer guest-sync within {QGA_SYNC_TIMEOUT:?}"
            );
        }
    }

    /// Runs `command` and returns its `return` value, or the agent's `error` object.
    pub async fn try_execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, Value> {
        let mut request = json!({ "execute": command });
        if let Some(arguments) = arguments {
            request["arguments"] = arguments;
        }
        self.send(&request).await;
        let reply = self
            .read_reply(Instant::now() + QGA_COMMAND_TIMEOUT)
            .await
            .unwrap_or_else(|| {
                panic!("the guest agent did not answer {command} within {QGA_COMMAND_TIMEOUT:?}")
            });
        match reply.get("return") {
            Some(value) => Ok(value.clone()),
            None => Err(reply.get("error").cloned().unwrap_or(reply)),
        }
    }

    /// Runs `command`; panics when the agent returns an error.
    pub async fn execute(&mut self, command: &str, arguments: Option<Value>) -> Value {
        self.try_execute(command, arguments)
            .await
            .unwrap_or_else(|error| panic!("guest agent command {command} failed: {error}"))
    }

    async fn send(&mut self, request: &Value) {
        let mut bytes = request.to_string().into_bytes();
        bytes.push(b'\n');
        tokio::time::timeout(QGA_COMMAND_TIMEOUT, self.writer.write_all(&bytes))
            .await
            .expect("writing to the guest agent timed out")
            .expect("write to the guest agent");
    }

    /// The next JSON reply line, or `None` when `deadline` passes first.
    async fn read_reply(&mut self, deadline: Instant) -> Option<Value> {
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            match tokio::time::timeout(left, self.reader.read_until(b'\n', &mut self.pending)).await {
                Err(_) => return None,
                Ok(Err(e)) => panic!("reading from the guest agent failed: {e}"),
                Ok(Ok(0)) => panic!("the guest agent socket closed"),
                Ok(Ok(_)) => {}
            }
            if self.pending.last() != Some(&b'\n') {
                continue;
            }
            let line = std::mem::take(&mut self.pending);
            // A 0xff byte may precede a reply after guest-sync-delimited; it is not JSON.
            let text = String::from_utf8_lossy(&line)
                .trim_matches(|c: char| c.is_whitespace() || c == '\u{fffd}')
                .to_owned();
            if text.is_empty() {
                continue;
            }
            match serde_json::from_str(&text) {
                Ok(value) => return Some(value),
                Err(e) => panic!("the guest agent sent a line that is not JSON ({e}): {text}"),
            }
        }
    }
}

/// What a verify guest reported about a disk image.
#[derive(Debug, Clone)]
pub struct Verdict {
    /// `clean`, `fixed` (e2fsck repaired something, as after any crash: journal replay, free counts) or `errors`.
    pub fsck: String,
    /// e2fsck's exit code.
    pub fsck_code: i32,
    /// The number of manifest files that matched, when all of them did.
    pub verified: Option<u64>,
    /// The files that were missing or differed (or `mount`, `MANIFEST`, `MANIFEST:<line>`).
    pub failed: Vec<String>,
    /// Every console line of the verify guest.
    pub console: Vec<String>,
}

impl Verdict {
    /// fsck left no errors and every recorded file matched.
    pub fn is_ok(&self) -> bool {
        self.fsck != "errors" && self.failed.is_empty() && self.verified.is_some()
    }

    /// Panics with the whole verify console unless [`Verdict::is_ok`].
    #[track_caller]
    pub fn assert_ok(&self) {
        assert!(
            self.is_ok(),
            "verify guest: {self:?}\n{}",
            self.console.join("\n")
        );
    }

    fn parse(console: Vec<String>) -> Verdict {
        let mut verdict = Verdict {
            fsck: String::new(),
            fsck_code: -1,
            verified: None,
            failed: Vec::new(),
            console: Vec::new(),
        };
        for l in &console {
            if let Some(rest) = l.strip_prefix(line::FSCK) {
                let mut words = rest.split_whitespace();
                verdict.fsck = words.next().unwrap_or_default().to_owned();
                verdict.fsck_code = words.next().and_then(|c| c.parse().ok()).unwrap_or(-1);
            } else if let Some(rest) = l.strip_prefix(line::VERIFY) {
                if let Some(n) = rest.strip_prefix("OK ") {
                    verdict.verified = n.trim().parse().ok();
                } else if let Some(file) = rest.strip_prefix("FAIL ") {
                    verdict.failed.push(file.trim().to_owned());
                }
            }
        }
        verdict.console = console;
        verdict
    }
}

/// Boots a verify guest on `image` (any format `qemu-img` reads, e.g. a restored disk or a backup node) and
/// returns its verdict. The guest runs on a temporary qcow2 overlay, so fsck's repairs leave `image` as it was.
pub async fn verify_image(image: &Path) -> Verdict {
    let overlay_dir = tempfile::Builder::new()
        .prefix("qmpbak-verify-")
        .tempdir()
        .expect("create temp dir");
    let overlay = overlay_dir.path().join("verify.qcow2");
    let format = image::info(image)["format"].as_str().unwrap_or("raw").to_owned();
    let absolute = std::path::absolute(image).expect("absolute image path");
    image::qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        &absolute.to_string_lossy(),
        "-F",
        &format,
        &overlay.to_string_lossy(),
    ]);
    let mut guest = TestGuest::builder()
        .mode(GuestMode::Verify)
        .existing_disk("disk0", &overlay)
        .start()
        .await;
    guest.wait_for_line(line::DONE, GUEST_VERIFY_TIMEOUT).await;
    guest.wait_exit(PROCESS_EXIT_TIMEOUT).await;
    Verdict::parse(guest.console_lines())
}

/// Overwrites `len` bytes of the known file's data in the raw image at `path`, at the one place where
/// [`KNOWN_FILE_MARKER`] occurs, and returns that offset. Panics unless the marker occurs exactly once.
pub fn damage_known_file(path: &Path, len: usize) -> u64 {
    let data = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let hits: Vec<usize> = data
        .windows(KNOWN_FILE_MARKER.len())
        .enumerate()
        .filter(|(_, w)| *w == KNOWN_FILE_MARKER)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(
        hits.len(),
        1,
        "the known file's marker occurs {} times in {}",
        hits.len(),
        path.display()
    );
    let at = hits[0];
    let damaged: Vec<u8> = data[at..at + len].iter().map(|b| b ^ 0x5a).collect();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open raw image for writing");
    file.seek(SeekFrom::Start(at as u64)).expect("seek in raw image");
    file.write_all(&damaged).expect("damage raw image");
    at as u64
}
