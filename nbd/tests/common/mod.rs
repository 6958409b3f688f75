//! Test fixture: qcow2 images made with qemu-img/qemu-io in a temp dir, and a qemu-nbd or
//! qemu-storage-daemon serving one, killed and reaped when the fixture is dropped (its log is printed if
//! the test failed). The QEMU programs come from `PATH`, or from `QMPBAK_QEMU_PREFIX/usr/bin` (the
//! setting the rest of the test suite uses to run against a second QEMU version).

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

/// A QEMU program: from `QMPBAK_QEMU_PREFIX/usr/bin` if that is set, else from `PATH`.
pub fn qemu_bin(name: &str) -> PathBuf {
    match std::env::var_os("QMPBAK_QEMU_PREFIX") {
        Some(prefix) if !prefix.is_empty() => Path::new(&prefix).join("usr/bin").join(name),
        _ => PathBuf::from(name),
    }
}

pub fn run(cmd: &mut Command) -> String {
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
        run(Command::new(qemu_bin("qemu-img"))
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&path)
            .arg(size.to_string()));
        Image { dir, path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The image's temp dir (for the server's socket, log and other files of the test).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Runs qemu-io commands (e.g. `write -P 0x5a 1M 64k`) on the image; only while no server has it open.
    pub fn qemu_io(&self, commands: &[String]) {
        let mut cmd = Command::new(qemu_bin("qemu-io"));
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
        let json = run(Command::new(qemu_bin("qemu-img"))
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
        let mut cmd = Command::new(qemu_bin("qemu-nbd"));
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
        let mut cmd = Command::new(qemu_bin("qemu-storage-daemon"));
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

    /// `qemu-storage-daemon` with the image read-only as a `file` + `qcow2` node, an NBD server on
    /// 127.0.0.1 with `server_opts` appended (e.g. `,tls-creds=tls0`), `objects` given as `--object`, and
    /// an export of the node named `export` with `export_opts` appended (e.g. `,bitmaps.0=bm0`).
    pub fn storage_daemon_ro(
        image: &Image,
        export: &str,
        objects: &[String],
        server_opts: &str,
        export_opts: &str,
    ) -> NbdServer {
        Self::try_storage_daemon_ro(image, export, objects, server_opts, export_opts)
            .unwrap_or_else(|log| panic!("NBD server exited before listening:\n{log}"))
    }

    /// [`NbdServer::storage_daemon_ro`], or the daemon's log if it exited before listening.
    pub fn try_storage_daemon_ro(
        image: &Image,
        export: &str,
        objects: &[String],
        server_opts: &str,
        export_opts: &str,
    ) -> Result<NbdServer, String> {
        let port = {
            let probe = TcpListener::bind("127.0.0.1:0").expect("bind a probe port");
            probe.local_addr().expect("probe port").port()
        };
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let log = image.dir.path().join("qsd.log");
        let mut cmd = Command::new(qemu_bin("qemu-storage-daemon"));
        for object in objects {
            cmd.arg("--object").arg(object);
        }
        cmd.arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=file0,read-only=on,filename={}",
                image.path().display()
            ))
            .args([
                "--blockdev",
                "driver=qcow2,node-name=disk0,read-only=on,file=file0",
            ])
            .arg("--nbd-server")
            .arg(format!(
                "addr.type=inet,addr.host=127.0.0.1,addr.port={port}{server_opts}"
            ))
            .arg("--export")
            .arg(format!(
                "type=nbd,id=exp0,node-name=disk0,name={export}{export_opts}"
            ));
        Self::try_spawn(cmd, Address::Tcp(addr), log)
    }

    /// The TCP address the server listens on, if it is on TCP.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        match &self.address {
            Address::Tcp(addr) => Some(*addr),
            Address::Unix(_) => None,
        }
    }

    fn spawn(cmd: Command, address: Address, log: PathBuf) -> NbdServer {
        Self::try_spawn(cmd, address, log)
            .unwrap_or_else(|log| panic!("NBD server exited before listening:\n{log}"))
    }

    /// Starts the server and waits until it listens; its log if it exits first.
    fn try_spawn(mut cmd: Command, address: Address, log: PathBuf) -> Result<NbdServer, String> {
        let log_file = std::fs::File::create(&log).expect("create the server log");
        cmd.stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("dup the log file"))
            .stderr(log_file);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        let mut server = NbdServer { child, address, log };
        server.wait_until_listening()?;
        Ok(server)
    }

    /// Polls until a connection is accepted: the server is up once it listens, and a process start has no
    /// event to wait for. The log if the server exits first (it has been reaped then).
    fn wait_until_listening(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + SERVER_START_TIMEOUT;
        loop {
            let up = match &self.address {
                Address::Unix(path) => UnixStream::connect(path).is_ok(),
                Address::Tcp(addr) => TcpStream::connect_timeout(addr, POLL_INTERVAL).is_ok(),
            };
            if up {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait().expect("poll the server process") {
                return Err(format!("exit {status}: {}", self.log()));
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
            Address::Tcp(addr) => {
                let options = nbd::ConnectOptions::new().insecure_plaintext();
                Client::connect_tcp(&addr.to_string(), export, &options, CONNECT_TIMEOUT).await
            }
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
