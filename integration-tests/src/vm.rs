//! [`TestVm`]: a real `qemu-system-x86_64` (TCG, `-nodefaults`, qboot, no guest OS) with qcow2 disks on
//! virtio-blk in a temporary directory. The VM has two monitors: the fixture's own QMP connection, on which QEMU
//! connects *to us* (so start-up is an event we wait for, not a socket we poll), and a server socket,
//! [`TestVm::socket`], for the `qmpbak` binary under test. QEMU is killed on drop, also when the test panics, and
//! its output is printed when the test fails.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;
use tokio::net::UnixListener;

use crate::image;
use crate::qemu::QemuBinaries;
use crate::timeouts::{PROCESS_EXIT_TIMEOUT, QMP_COMMAND_TIMEOUT, QMP_CONNECT_TIMEOUT};

/// A disk of the test VM: the id qmpbak knows it by, its virtual size, its image file and how it is attached.
/// The block node is named `node-<id>` on purpose, so code under test cannot assume node name and qdev id are
/// the same.
#[derive(Debug, Clone)]
pub struct DiskSpec {
    pub id: String,
    pub size: u64,
    /// blkdebug `inject-error` rules for a blkdebug layer between the qcow2 node and its file (host offsets).
    pub inject_errors: Option<serde_json::Value>,
    /// The qcow2 image's file name in the VM's directory (`<id>.qcow2` unless changed).
    pub image: String,
    pub device: Device,
    /// The LUKS passphrase of a qcow2 encrypted with `encrypt.format=luks`; QEMU gets it from a secret object
    /// reading [`TestVm::disk_key_file`].
    pub luks_passphrase: Option<String>,
}

/// How a disk is attached to the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    /// `-blockdev` and `-device virtio-blk-pci,id=<id>`.
    VirtioBlk,
    /// `-blockdev` and `-device virtio-blk-pci` without id. The disk's id must be `peripheral-anon-device<N>`,
    /// the name qmpbak gives the N-th device without id.
    VirtioBlkNoId,
    /// `-blockdev` and `-device scsi-hd,id=<id>` on a virtio-scsi controller.
    ScsiHd,
    /// `-blockdev` and `-device nvme,id=<id>`.
    Nvme,
    /// `-blockdev` and `-device ide-hd,id=<id>` on the q35 AHCI controller.
    IdeHd,
    /// `-drive file=...,if=virtio` without id: the disk's id must be QEMU's drive name, `virtio<N>` for the
    /// N-th such drive.
    DriveIfVirtio,
    /// `-drive if=none,id=drive-<id>` and `-device virtio-blk-pci,id=<id>` on it.
    DriveVirtioBlk,
    /// `-drive if=none,id=<id>` and `-device virtio-blk-pci` without id on it: known by the drive's name.
    DriveVirtioBlkNoId,
}

impl Device {
    /// Whether the disk is a `-drive` (its block nodes have names QEMU generated).
    pub fn is_drive(self) -> bool {
        matches!(
            self,
            Device::DriveIfVirtio | Device::DriveVirtioBlk | Device::DriveVirtioBlkNoId
        )
    }
}

impl DiskSpec {
    pub fn new(id: &str, size: u64) -> DiskSpec {
        DiskSpec {
            id: id.to_owned(),
            size,
            inject_errors: None,
            image: format!("{id}.qcow2"),
            device: Device::VirtioBlk,
            luks_passphrase: None,
        }
    }

    pub fn node_name(&self) -> String {
        match self.device {
            // QEMU's node names are at most 31 characters.
            Device::VirtioBlkNoId => format!("node-anon{}", self.anon_index()),
            _ => format!("node-{}", self.id),
        }
    }

    /// N in the id `peripheral-anon-device<N>` of a [`Device::VirtioBlkNoId`].
    fn anon_index(&self) -> &str {
        self.id.trim_start_matches("peripheral-anon-device")
    }

    /// How HMP `qemu-io` reaches the disk's block backend (`-d` and a qdev id or path, or a drive name).
    fn qemu_io_target(&self) -> String {
        match self.device {
            Device::VirtioBlk | Device::DriveVirtioBlk => format!("-d {}/virtio-backend", self.id),
            Device::VirtioBlkNoId => format!(
                "-d /machine/peripheral-anon/device[{}]/virtio-backend",
                self.anon_index()
            ),
            Device::ScsiHd | Device::Nvme | Device::IdeHd => format!("-d {}", self.id),
            Device::DriveIfVirtio | Device::DriveVirtioBlkNoId => self.id.clone(),
        }
    }

    /// Whether a `query-block` entry is this disk's.
    fn is_block(&self, block: &serde_json::Value) -> bool {
        let qdev = block["qdev"].as_str().unwrap_or_default();
        match self.device {
            Device::VirtioBlk | Device::DriveVirtioBlk => {
                qdev.starts_with(&format!("/machine/peripheral/{}/", self.id))
            }
            Device::VirtioBlkNoId => {
                qdev == format!(
                    "/machine/peripheral-anon/device[{}]/virtio-backend",
                    self.anon_index()
                )
            }
            Device::ScsiHd | Device::Nvme | Device::IdeHd => qdev == self.id,
            Device::DriveIfVirtio | Device::DriveVirtioBlkNoId => block["device"] == self.id.as_str(),
        }
    }
}

/// How to start a [`TestVm`].
#[derive(Debug, Clone, Default)]
pub struct TestVmBuilder {
    disks: Vec<DiskSpec>,
    paused: bool,
    extra_args: Vec<String>,
    netns: Option<String>,
}

impl TestVmBuilder {
    /// Adds a virtio-blk disk backed by a new qcow2 image of `size` bytes.
    #[must_use]
    pub fn disk(mut self, id: &str, size: u64) -> Self {
        self.disks.push(DiskSpec::new(id, size));
        self
    }

    /// Attaches disk `id` as `device` instead of virtio-blk with an id.
    #[must_use]
    pub fn device(mut self, id: &str, device: Device) -> Self {
        if let Some(disk) = self.disks.iter_mut().find(|d| d.id == id) {
            disk.device = device;
        }
        self
    }

    /// Gives disk `id` the image file `image` (a name in the VM's directory) instead of `<id>.qcow2`.
    #[must_use]
    pub fn image(mut self, id: &str, image: &str) -> Self {
        if let Some(disk) = self.disks.iter_mut().find(|d| d.id == id) {
            image.clone_into(&mut disk.image);
        }
        self
    }

    /// Removes disk `id` (its image stays).
    #[must_use]
    pub fn without_disk(mut self, id: &str) -> Self {
        self.disks.retain(|d| d.id != id);
        self
    }

    /// Renames disk `id` to `new` (same image and device type).
    #[must_use]
    pub fn rename_disk(mut self, id: &str, new: &str) -> Self {
        if let Some(disk) = self.disks.iter_mut().find(|d| d.id == id) {
            new.clone_into(&mut disk.id);
        }
        self
    }

    /// Adds a virtio-blk disk backed by a new LUKS-encrypted qcow2 image of `size` bytes (`encrypt.format=luks`)
    /// with this passphrase.
    #[must_use]
    pub fn encrypted_disk(mut self, id: &str, size: u64, passphrase: &str) -> Self {
        let mut disk = DiskSpec::new(id, size);
        disk.luks_passphrase = Some(passphrase.to_owned());
        self.disks.push(disk);
        self
    }

    /// Puts a blkdebug layer under disk `id`'s qcow2 node with these `inject-error` rules (host offsets).
    #[must_use]
    pub fn inject_errors(mut self, id: &str, rules: serde_json::Value) -> Self {
        if let Some(disk) = self.disks.iter_mut().find(|d| d.id == id) {
            disk.inject_errors = Some(rules);
        }
        self
    }

    /// Starts QEMU with `-S`: the VM exists but its CPUs do not run until `cont`.
    #[must_use]
    pub fn paused(mut self) -> Self {
        self.paused = true;
        self
    }

    /// Runs QEMU in network namespace `name` (`ip netns exec`; see [`crate::netns`]).
    #[must_use]
    pub fn netns(mut self, name: &str) -> Self {
        self.netns = Some(name.to_owned());
        self
    }

    /// A QMP monitor on TCP `host:port` (besides the unix ones), with TLS from the credentials in `dir`
    /// (QEMU's `endpoint=server` layout, the client's certificate required), or plaintext without `dir`.
    #[must_use]
    pub fn tcp_qmp(mut self, host: &str, port: u16, tls_dir: Option<&Path>) -> Self {
        let n = self.extra_args.len();
        let mut chardev = format!("socket,id=tcpmon{n},host={host},port={port},server=on,wait=off");
        if let Some(dir) = tls_dir {
            chardev = format!("{chardev},tls-creds=tls{n}");
            self.extra_args.push("-object".into());
            self.extra_args.push(format!(
                "tls-creds-x509,id=tls{n},dir={},endpoint=server,verify-peer=on",
                dir.display()
            ));
        }
        self.extra_args.push("-chardev".into());
        self.extra_args.push(chardev);
        self.extra_args.push("-mon".into());
        self.extra_args.push(format!("chardev=tcpmon{n},mode=control"));
        self
    }

    /// Extra QEMU command-line arguments.
    #[must_use]
    pub fn arg(mut self, arg: &str) -> Self {
        self.extra_args.push(arg.to_owned());
        self
    }

    /// Creates the disk images in a new temporary directory and boots the VM.
    pub async fn start(self) -> TestVm {
        let dir = tempfile::Builder::new()
            .prefix("qmpbak-vm-")
            .tempdir()
            .expect("create temp dir");
        for disk in &self.disks {
            let path = dir.path().join(&disk.image);
            match &disk.luks_passphrase {
                Some(passphrase) => {
                    let key = key_file(dir.path(), &disk.id);
                    std::fs::write(&key, passphrase).expect("write disk key file");
                    image::create_luks_qcow2(&path, &key, disk.size);
                }
                None => image::create_qcow2(&path, disk.size),
            }
        }
        TestVm::launch(self, dir).await
    }
}

/// A running QEMU under test. See the module docs.
pub struct TestVm {
    config: TestVmBuilder,
    dir: Option<TempDir>,
    child: Option<Child>,
    qmp: Option<qmp::Qmp>,
    bins: QemuBinaries,
}

impl TestVm {
    pub fn builder() -> TestVmBuilder {
        TestVmBuilder::default()
    }

    /// A builder with the given `(qdev id, size)` disks.
    fn with_disks(disks: &[(&str, u64)]) -> TestVmBuilder {
        let mut builder = TestVm::builder();
        for (id, size) in disks {
            builder = builder.disk(id, *size);
        }
        builder
    }

    /// A running VM with the given `(qdev id, size)` disks.
    pub async fn start(disks: &[(&str, u64)]) -> TestVm {
        TestVm::with_disks(disks).start().await
    }

    /// A VM with the given `(qdev id, size)` disks, blank and paused (`-S`): a target for a live restore.
    pub async fn start_paused(disks: &[(&str, u64)]) -> TestVm {
        TestVm::with_disks(disks).paused().start().await
    }

    async fn launch(config: TestVmBuilder, dir: TempDir) -> TestVm {
        let bins = QemuBinaries::from_env();
        let fixture_sock = dir.path().join("fixture-qmp.sock");
        let _ = std::fs::remove_file(&fixture_sock);
        let listener = UnixListener::bind(&fixture_sock).expect("bind fixture QMP socket");
        let server_sock = dir.path().join("qmp.sock");
        let _ = std::fs::remove_file(&server_sock);

        let mut cmd = match &config.netns {
            Some(ns) => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", ns]).arg(&bins.system);
                cmd
            }
            None => Command::new(&bins.system),
        };
        if let Some(data) = &bins.data_dir {
            cmd.arg("-L").arg(data);
        }
        cmd.args([
            "-M",
            "q35,accel=tcg",
            "-m",
            "128",
            "-nodefaults",
            "-display",
            "none",
            "-no-user-config",
        ])
        .arg("-bios")
        .arg(bins.bios())
        // The server socket comes first: it exists by the time QEMU connects to the fixture's listener.
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", server_sock.display()))
        .arg("-qmp")
        .arg(format!("unix:{},server=off", fixture_sock.display()));
        if config.paused {
            cmd.arg("-S");
        }
        if config.disks.iter().any(|d| d.device == Device::ScsiHd) {
            cmd.args(["-device", "virtio-scsi-pci,id=scsi0"]);
        }
        let mut ide_bus = 0;
        for disk in &config.disks {
            let path = dir.path().join(&disk.image);
            let id = &disk.id;
            match disk.device {
                Device::DriveIfVirtio => {
                    cmd.arg("-drive")
                        .arg(format!("file={},if=virtio,format=qcow2", path.display()));
                    continue;
                }
                Device::DriveVirtioBlk => {
                    cmd.arg("-drive")
                        .arg(format!(
                            "file={},if=none,id=drive-{id},format=qcow2",
                            path.display()
                        ))
                        .arg("-device")
                        .arg(format!("virtio-blk-pci,drive=drive-{id},id={id}"));
                    continue;
                }
                Device::DriveVirtioBlkNoId => {
                    cmd.arg("-drive")
                        .arg(format!("file={},if=none,id={id},format=qcow2", path.display()))
                        .arg("-device")
                        .arg(format!("virtio-blk-pci,drive={id}"));
                    continue;
                }
                _ => {}
            }
            let file = serde_json::json!({
                "driver": "file",
                "filename": path,
                "node-name": format!("{}-file", disk.node_name()),
            });
            let mut below = format!("{}-file", disk.node_name());
            cmd.arg("-blockdev").arg(file.to_string());
            if let Some(rules) = &disk.inject_errors {
                let debug = serde_json::json!({
                    "driver": "blkdebug",
                    "node-name": format!("{}-debug", disk.node_name()),
                    "image": below,
                    "inject-error": rules,
                });
                cmd.arg("-blockdev").arg(debug.to_string());
                below = format!("{}-debug", disk.node_name());
            }
            let mut fmt =
                serde_json::json!({ "driver": "qcow2", "file": below, "node-name": disk.node_name() });
            if disk.luks_passphrase.is_some() {
                let secret = format!("sec-{}", disk.id);
                cmd.arg("-object").arg(format!(
                    "secret,id={secret},file={}",
                    key_file(dir.path(), &disk.id).display()
                ));
                fmt["encrypt"] = serde_json::json!({ "format": "luks", "key-secret": secret });
            }
            cmd.arg("-blockdev").arg(fmt.to_string());
            let (node, id) = (disk.node_name(), &disk.id);
            let device = match disk.device {
                Device::VirtioBlk => format!("virtio-blk-pci,drive={node},id={id}"),
                Device::VirtioBlkNoId => format!("virtio-blk-pci,drive={node}"),
                Device::ScsiHd => format!("scsi-hd,drive={node},id={id},bus=scsi0.0"),
                Device::Nvme => format!("nvme,drive={node},id={id},serial={id}"),
                Device::IdeHd => {
                    ide_bus += 1;
                    format!("ide-hd,drive={node},id={id},bus=ide.{}", ide_bus - 1)
                }
                Device::DriveIfVirtio | Device::DriveVirtioBlk | Device::DriveVirtioBlkNoId => {
                    unreachable!("handled above")
                }
            };
            cmd.arg("-device").arg(device);
        }
        cmd.args(&config.extra_args);
        // QEMU works in its own directory, as a real one does (not the test's): a relative path that qmpbak
        // handed on would be resolved there.
        cmd.current_dir(dir.path());
        cmd.stdin(Stdio::null())
            .stdout(File::create(dir.path().join("qemu.stdout")).expect("create qemu.stdout"))
            .stderr(File::create(dir.path().join("qemu.stderr")).expect("create qemu.stderr"));
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bins.system.display()));

        let mut vm = TestVm {
            config,
            dir: Some(dir),
            child: Some(child),
            qmp: None,
            bins,
        };
        let accepted = tokio::time::timeout(QMP_CONNECT_TIMEOUT, listener.accept()).await;
        let stream = match accepted {
            Ok(Ok((stream, _))) => stream,
            Ok(Err(e)) => vm.fail(&format!("accepting QEMU's QMP connection failed: {e}")),
            Err(_) => vm.fail(&format!(
                "QEMU did not connect its QMP monitor within {QMP_CONNECT_TIMEOUT:?}"
            )),
        };
        match qmp::Qmp::from_stream(stream, QMP_CONNECT_TIMEOUT).await {
            Ok(qmp) => {
                qmp.set_command_timeout(QMP_COMMAND_TIMEOUT);
                vm.qmp = Some(qmp);
            }
            Err(e) => vm.fail(&format!("QMP negotiation failed: {e}")),
        }
        vm
    }

    /// The fixture's own QMP connection.
    pub fn qmp(&self) -> &qmp::Qmp {
        self.qmp.as_ref().expect("QMP connection of a started TestVm")
    }

    /// The QMP server socket for the program under test (`qmpbak --socket`).
    pub fn socket(&self) -> PathBuf {
        self.dir().join("qmp.sock")
    }

    /// The VM's temporary directory (disk images, sockets, QEMU's output).
    pub fn dir(&self) -> &Path {
        self.dir.as_ref().expect("TestVm directory").path()
    }

    /// The qcow2 image behind disk `id` (as started; see [`TestVm::active_image`]).
    pub fn disk_path(&self, id: &str) -> PathBuf {
        let image = self
            .config
            .disks
            .iter()
            .find(|d| d.id == id)
            .map_or_else(|| format!("{id}.qcow2"), |d| d.image.clone());
        self.dir().join(image)
    }

    fn spec(&self, id: &str) -> DiskSpec {
        self.config
            .disks
            .iter()
            .find(|d| d.id == id)
            .cloned()
            .unwrap_or_else(|| DiskSpec::new(id, 0))
    }

    /// The file holding the LUKS passphrase of encrypted disk `id`.
    pub fn disk_key_file(&self, id: &str) -> PathBuf {
        key_file(self.dir(), id)
    }

    pub fn disks(&self) -> &[DiskSpec] {
        &self.config.disks
    }

    pub fn binaries(&self) -> &QemuBinaries {
        &self.bins
    }

    /// Runs a `qemu-io` command against disk `id` as the guest would see it (through the device's block
    /// backend; a node name would conflict with the device's write permission). Panics if it fails.
    pub async fn qemu_io(&self, id: &str, command: &str) {
        let line = format!("qemu-io {} \"{command}\"", self.spec(id).qemu_io_target());
        let reply = self
            .qmp()
            .execute_raw(
                "human-monitor-command",
                Some(serde_json::json!({ "command-line": line })),
            )
            .await
            .unwrap_or_else(|e| panic!("HMP {line}: {e}"));
        let text = reply.as_str().unwrap_or_default();
        // QEMU 7.2 returns qemu-io's report in the reply; 10.0 prints it on stdout and returns "". Either way an
        // error is returned as text without the success report.
        let failed = ["failed", "error", "Error", "conflict", "not found"]
            .iter()
            .any(|w| text.contains(w));
        assert!(!failed, "HMP {line} failed: {text}");
    }

    /// Writes `len` bytes of `pattern` at `offset` of disk `id`, as a guest write.
    pub async fn write_pattern(&self, id: &str, pattern: u8, offset: u64, len: u64) {
        self.qemu_io(id, &format!("write -P 0x{pattern:02x} {offset} {len}"))
            .await;
    }

    /// Writes zeroes (`write -z`) as a guest discard-like write.
    pub async fn write_zeroes(&self, id: &str, offset: u64, len: u64) {
        self.qemu_io(id, &format!("write -z {offset} {len}")).await;
    }

    /// Whether the VM's CPUs are running (`query-status`).
    pub async fn running(&self) -> bool {
        let status = self
            .qmp()
            .execute_raw("query-status", None)
            .await
            .expect("query-status");
        status["running"].as_bool().unwrap_or(false)
    }

    /// The node each disk's device is attached to (`query-block`), with its driver, in QEMU's order.
    pub async fn attached(&self) -> Vec<(String, String)> {
        let blocks = self
            .qmp()
            .execute_raw("query-block", None)
            .await
            .expect("query-block");
        blocks
            .as_array()
            .expect("query-block returns a list")
            .iter()
            .map(|b| {
                let i = &b["inserted"];
                (
                    i["node-name"].as_str().unwrap_or_default().to_owned(),
                    i["drv"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect()
    }

    /// `(node name, bitmap name)` of every dirty bitmap on the VM's disks (`query-block`).
    pub async fn bitmaps(&self) -> Vec<(String, String)> {
        let blocks = self
            .qmp()
            .execute_raw("query-block", None)
            .await
            .expect("query-block");
        let mut out = Vec::new();
        for block in blocks.as_array().expect("array") {
            let node = block["inserted"]["node-name"].as_str().unwrap_or_default();
            for b in block["inserted"]["dirty-bitmaps"]
                .as_array()
                .into_iter()
                .flatten()
            {
                out.push((node.to_owned(), b["name"].as_str().unwrap_or_default().to_owned()));
            }
        }
        out
    }

    /// The block nodes that are not the fixture's own (its disks' `node-…` nodes and QEMU's implicit `#…`
    /// ones): what a run left behind (`query-named-block-nodes`).
    pub async fn foreign_block_nodes(&self) -> Vec<String> {
        let nodes = self
            .qmp()
            .execute_raw("query-named-block-nodes", Some(serde_json::json!({"flat": true})))
            .await
            .expect("query-named-block-nodes");
        nodes
            .as_array()
            .expect("query-named-block-nodes returns a list")
            .iter()
            .map(|n| n["node-name"].as_str().expect("a node name").to_owned())
            .filter(|name| !(name.starts_with("node-") || name.starts_with('#')))
            .collect()
    }

    /// The QOM objects of the VM's QEMU, as `qom-list /objects` returns them.
    pub async fn objects(&self) -> serde_json::Value {
        self.qmp()
            .execute_raw("qom-list", Some(serde_json::json!({"path": "/objects"})))
            .await
            .expect("qom-list /objects")
    }

    /// Asserts that a pull's scratch images are beside the image of disk `id`, and empty (QMP cannot delete a
    /// file: a pull empties its scratch images).
    pub fn assert_scratch_empty(&self, id: &str) {
        let dir = self
            .disk_path(id)
            .parent()
            .expect("a disk's directory")
            .to_owned();
        let scratch: Vec<PathBuf> = std::fs::read_dir(&dir)
            .expect("the disks' directory")
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.to_string_lossy().contains("-scratch"))
            .collect();
        assert!(!scratch.is_empty(), "no scratch image in {}", dir.display());
        for s in scratch {
            let len = std::fs::metadata(&s).expect("scratch metadata").len();
            assert_eq!(len, 0, "{} not emptied", s.display());
        }
    }

    /// Captures the guest-visible contents of disk `id` at this instant into a standalone qcow2 at `dst`: pauses
    /// the VM (`stop` flushes), copies with `qemu-img convert -U`, resumes if it was running.
    pub async fn capture_reference(&self, id: &str, dst: &Path) {
        let was_running = self.running().await;
        if was_running {
            self.qmp().execute_raw("stop", None).await.expect("stop");
        }
        match self
            .config
            .disks
            .iter()
            .find(|d| d.id == id && d.luks_passphrase.is_some())
        {
            // QEMU names an encrypted image with a `json:` description: the disk's own file (no snapshots).
            Some(_) => image::convert_luks_to_qcow2(&self.disk_path(id), &self.disk_key_file(id), dst),
            None => image::convert_to_qcow2(&self.active_image(id).await, dst),
        }
        if was_running {
            self.qmp().execute_raw("cont", None).await.expect("cont");
        }
    }

    /// Captures references of disks `ids`, one after the other, into `dir` as `ref-<label>-<id>.qcow2` (see
    /// [`TestVm::capture_reference`]); returns their paths in the order of `ids`.
    pub async fn capture_references(&self, ids: &[&str], dir: &Path, label: &str) -> Vec<PathBuf> {
        let mut refs = Vec::new();
        for id in ids {
            let path = dir.join(format!("ref-{label}-{id}.qcow2"));
            self.capture_reference(id, &path).await;
            refs.push(path);
        }
        refs
    }

    /// The image file on top of disk `id`'s graph right now (after a snapshot, the overlay).
    pub async fn active_image(&self, id: &str) -> PathBuf {
        let blocks = self
            .qmp()
            .execute_raw("query-block", None)
            .await
            .expect("query-block");
        let spec = self.spec(id);
        blocks
            .as_array()
            .into_iter()
            .flatten()
            .find(|b| spec.is_block(b))
            .and_then(|b| b["inserted"]["file"].as_str())
            .map_or_else(|| self.disk_path(id), PathBuf::from)
    }

    /// Kills QEMU with SIGKILL (a crash) and waits for it; the disk images stay.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            wait_exit(&mut child, PROCESS_EXIT_TIMEOUT);
        }
    }

    /// Kills QEMU and starts it again on the same disk images (as after a host crash and reboot).
    pub async fn restart(mut self) -> TestVm {
        self.kill();
        let dir = self.dir.take().expect("TestVm directory");
        let config = self.config.clone();
        drop(self);
        TestVm::launch(config, dir).await
    }

    /// Kills QEMU (if it still runs) and starts it again on the same images with a changed configuration.
    pub async fn restart_with(mut self, change: impl FnOnce(TestVmBuilder) -> TestVmBuilder) -> TestVm {
        self.config = change(self.config.clone());
        self.restart().await
    }

    /// Quits QEMU cleanly (its persistent bitmaps stored in the images) and starts it again with a changed
    /// configuration: disks in another order, removed, renamed or on other images.
    pub async fn quit_and_restart_with(
        mut self,
        change: impl FnOnce(TestVmBuilder) -> TestVmBuilder,
    ) -> TestVm {
        self.quit().await;
        self.restart_with(change).await
    }

    /// The configuration the VM was started with, to change for [`TestVm::quit_and_restart_with`].
    pub fn config(&self) -> &TestVmBuilder {
        &self.config
    }

    /// Kills QEMU and starts it again on the same images without any blkdebug layers (the fault is gone).
    pub async fn restart_without_faults(self) -> TestVm {
        self.restart_with(|mut b| {
            for disk in &mut b.disks {
                disk.inject_errors = None;
            }
            b
        })
        .await
    }

    /// Asks QEMU to quit on its own (`quit`), storing persistent bitmaps cleanly, and waits for it to exit.
    pub async fn quit(&mut self) {
        let _ = self.qmp().execute_raw("quit", None).await;
        if let Some(mut child) = self.child.take() {
            wait_exit(&mut child, PROCESS_EXIT_TIMEOUT);
        }
    }

    /// The process id of QEMU, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the QEMU process is still alive (not reaped).
    pub fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// QEMU's stdout and stderr so far.
    pub fn output(&self) -> String {
        let Some(dir) = self.dir.as_ref() else {
            return String::new();
        };
        let read = |name: &str| std::fs::read_to_string(dir.path().join(name)).unwrap_or_default();
        format!(
            "--- qemu stdout ---\n{}--- qemu stderr ---\n{}",
            read("qemu.stdout"),
            read("qemu.stderr")
        )
    }

    fn fail(&mut self, what: &str) -> ! {
        self.kill();
        panic!("{what}\n{}", self.output());
    }
}

/// Where an encrypted disk's passphrase lives in the VM's directory.
fn key_file(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!("{id}.luks-key"))
}

impl Drop for TestVm {
    fn drop(&mut self) {
        // A QEMU that died on its own (a crash leaves its stderr empty): say how, before it is killed anyway.
        let exited = if std::thread::panicking() {
            self.child.as_mut().and_then(|c| c.try_wait().ok().flatten())
        } else {
            None
        };
        self.kill();
        if std::thread::panicking() {
            if let Some(status) = exited {
                eprintln!("--- QEMU had exited before the test ended: {status} ---");
            }
            eprintln!("{}", self.output());
            if std::env::var_os("QMPBAK_KEEP_TEST_DIRS").is_some() {
                if let Some(dir) = self.dir.take() {
                    eprintln!("keeping {}", dir.keep().display());
                }
            }
        }
    }
}

/// Waits (bounded) for a killed QEMU to be reaped.
pub(crate) fn wait_exit(child: &mut Child, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(_)) | Err(_) => return,
            Ok(None) if Instant::now() >= deadline => {
                eprintln!(
                    "QEMU pid {} did not exit within {timeout:?} after SIGKILL",
                    child.id()
                );
                return;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}
