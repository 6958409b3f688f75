//! Test fixture: qcow2 images made with qemu-img/qemu-io in a temp dir, and a qemu-nbd or
//! qemu-storage-daemon serving one, killed when the fixture is dropped (its log is printed if the test
//! failed).

#![allow(dead_code)] // each test binary uses a different part of the fixture

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use nbd::{Client, Extent};
use tempfile::TempDir;

/// How long a server may take from spawn to accepting connections.
pub const SERVER_START_TIMEOUT: Duration = Duration::from_secs(10);
/// Connect plus handshake.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How soon requests must fail once the server is gone.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause between checks while waiting for a server to come up.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

pub const MIB: u64 = 1 << 20;
pub const KIB: u64 = 1 << 10;

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A qcow2 image in its own temp dir, next to the server's socket and log.
pub struct Image {
    dir: TempDir,
    path: PathBuf,
}

impl Image {
    pub fn create(size: u64) -> Image {
        let dir = tempfile::tempdir().expect("create a temp dir");
        let path = dir.path().join("disk.qcow2");
        run(Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&path)
            .arg(size.to_string()));
        Image { dir, path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs qemu-io commands (e.g. `write -P 0x5a 1M 64k`) on the image; only while no server has it open.
    pub fn qemu_io(&self, commands: &[String]) {
        let mut cmd = Command::new("qemu-io");
        cmd.args(["-f", "qcow2"]);
        for c in commands {
            cmd.arg("-c").arg(c);
        }
        run(cmd.arg(&self.path));
    }

    pub fn write_pattern(&self, pattern: u8, offset: u64, len: u64) {
        self.qemu_io(&[format!("write -P {pattern:#x} {offset} {len}")]);
    }

    /// What `qemu-img map` says, in NBD terms (`hole` = not data), neighbours with equal status merged.
    pub fn map(&self) -> Vec<Extent> {
        let json = run(Command::new("qemu-img")
            .args(["map", "-U", "--output=json", "-f", "qcow2"])
            .arg(&self.path));
        let entries: Vec<serde_json::Value> = serde_json::from_str(&json).expect("qemu-img map JSON");
        let extents = entries.iter().map(|e| Extent {
            offset: e["start"].as_u64().expect("map start"),
            len: e["length"].as_u64().expect("map length"),
            hole: !e["data"].as_bool().expect("map data"),
            zero: e["zero"].as_bool().expect("map zero"),
        });
        merged(extents)
    }
}

/// Extents with touching neighbours of equal status merged.
pub fn merged(extents: impl IntoIterator<Item = Extent>) -> Vec<Extent> {
    let mut out: Vec<Extent> = Vec::new();
    for e in extents {
        match out.last_mut() {
            Some(last) if last.end() == e.offset && last.hole == e.hole && last.zero == e.zero => {
                last.len += e.len;
            }
            _ => out.push(e),
        }
    }
    out
}

/// Where a server listens.
enum Address {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

/// A running NBD server process.
pub struct NbdServer {
    child: Child,
    address: Address,
    log: PathBuf,
}

impl NbdServer {
    /// `qemu-nbd` on a Unix socket next to the image, exporting it as `export`; `extra` are more options
    /// (e.g. `--read-only`).
    pub fn qemu_nbd(image: &Image, export: &str, extra: &[&str]) -> NbdServer {
        let socket = image.dir.path().join("nbd.sock");
        let log = image.dir.path().join("qemu-nbd.log");
        let mut cmd = Command::new("qemu-nbd");
        cmd.arg(format!("--socket={}", socket.display()))
            .arg(format!("--export-name={export}"))
            .args(["--format=qcow2", "--persistent", "--shared=8"])
            .args(extra)
            .arg(image.path());
        Self::spawn(cmd, Address::Unix(socket), log)
    }

    /// `qemu-storage-daemon` with the image as a `file` + `qcow2` node, exported writable over TCP on
    /// 127.0.0.1.
    pub fn storage_daemon_tcp(image: &Image, export: &str) -> NbdServer {
        let port = {
            let probe = TcpListener::bind("127.0.0.1:0").expect("bind a probe port");
            probe.local_addr().expect("probe port").port()
        };
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let log = image.dir.path().join("qsd.log");
        let mut cmd = Command::new("qemu-storage-daemon");
        cmd.arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=file0,filename={}",
                image.path().display()
            ))
            .args(["--blockdev", "driver=qcow2,node-name=disk0,file=file0"])
            .arg("--nbd-server")
            .arg(format!("addr.type=inet,addr.host=127.0.0.1,addr.port={port}"))
            .arg("--export")
            .arg(format!(
                "type=nbd,id=exp0,node-name=disk0,name={export},writable=on"
            ));
        Self::spawn(cmd, Address::Tcp(addr), log)
    }

    fn spawn(mut cmd: Command, address: Address, log: PathBuf) -> NbdServer {
        let log_file = std::fs::File::create(&log).expect("create the server log");
        cmd.stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("dup the log file"))
            .stderr(log_file);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        let mut server = NbdServer { child, address, log };
        server.wait_until_listening();
        server
    }

    /// Polls until a connection is accepted: the server is up once it listens, and a process start has no
    /// event to wait for.
    fn wait_until_listening(&mut self) {
        let deadline = Instant::now() + SERVER_START_TIMEOUT;
        loop {
            let up = match &self.address {
                Address::Unix(path) => UnixStream::connect(path).is_ok(),
                Address::Tcp(addr) => TcpStream::connect_timeout(addr, POLL_INTERVAL).is_ok(),
            };
            if up {
                return;
            }
            if let Some(status) = self.child.try_wait().expect("poll the server process") {
                panic!(
                    "NBD server exited with {status} before listening:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "NBD server not listening after {SERVER_START_TIMEOUT:?}:\n{}",
                self.log()
            );
            thread::sleep(POLL_INTERVAL);
        }
    }

    pub async fn connect(&self, export: &str) -> Client {
        self.try_connect(export)
            .await
            .unwrap_or_else(|e| panic!("connect to {export:?}: {e}\n{}", self.log()))
    }

    pub async fn try_connect(&self, export: &str) -> nbd::Result<Client> {
        match &self.address {
            Address::Unix(path) => Client::connect_unix(path, export, CONNECT_TIMEOUT).await,
            Address::Tcp(addr) => Client::connect_tcp(*addr, export, CONNECT_TIMEOUT).await,
        }
    }

    /// SIGKILL, as if the server crashed.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        self.kill();
        if thread::panicking() {
            eprintln!("--- NBD server log ({}) ---\n{}", self.log.display(), self.log());
        }
    }
}

/// `len` bytes of a pattern that differs per position and per `seed`, to catch misplaced data.
pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ ((i >> 9) as u8))
        .collect()
}
