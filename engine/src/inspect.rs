//! What a running VM has: QEMU's version and each disk (its stable id, block node, image file, format, sizes)
//! with its dirty bitmaps, read over QMP. Backup uses this to find the disks it copies and the state of
//! qmpbak's bitmaps; `qmpbak info` prints it.
//!
//! A disk's id ([`disk_name`]) is one rule for every device type: the device's qdev id (`-device ...,id=X`),
//! else the drive name of a `-drive`, else the device's QOM path. Never a block node name: `snapshot`,
//! `revert` and a live restore put new nodes on top of a disk.

use std::time::Duration;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::exit::{Exit, ExitCode};
use crate::qmp_target::QmpTarget;

/// How long connecting and negotiating QMP may take.
pub const QMP_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A VM as QEMU describes it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmInfo {
    pub qemu: QemuInfo,
    pub disks: Vec<DiskInfo>,
    /// Drives without a medium (an empty CD-ROM drive): nothing to back up.
    pub empty_drives: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QemuInfo {
    pub version: String,
    pub package: String,
}

/// Where a disk's id comes from ([`disk_name`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NameSource {
    /// The device's qdev id, `-device ...,id=ID`.
    DeviceId,
    /// The drive name of a `-drive` (`id=`, or QEMU's `virtio0`, `ide0-hd0` … for `if=`).
    Drive,
    /// The QOM path of a device without an id attached to a `-blockdev`: stable while the command line is.
    DevicePath,
    /// The block node name: a backend with neither device nor name. Changes with `snapshot`.
    NodeName,
}

impl NameSource {
    /// In words, for `qmpbak info`.
    pub fn describe(self) -> &'static str {
        match self {
            NameSource::DeviceId => "named by its device id",
            NameSource::Drive => "named by its drive",
            NameSource::DevicePath => "named by its device path; give the device an id= to choose the name",
            NameSource::NodeName => "named by its block node, which snapshots change; give the device an id=",
        }
    }
}

/// One disk of the VM.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiskInfo {
    /// The stable name qmpbak uses ([`disk_name`]).
    pub id: String,
    /// Where `id` comes from.
    pub id_source: NameSource,
    /// QEMU's `qdev` of the device (its id, or its QOM path when it has none), when there is a device.
    pub qdev: Option<String>,
    /// The format node below any filters: where the image and its bitmaps live, what backup jobs read from.
    pub node_name: String,
    /// The node the device is attached to: `node_name`, or the filter on top of it (`throttle`, ...). Jobs
    /// that switch the device to another node (mirror, commit) start from here; QEMU wants a root node.
    pub root_node: String,
    pub file: String,
    /// The file QEMU has open below the format node (its protocol node's filename): which image the disk is.
    pub image: String,
    pub format: String,
    pub virtual_size: u64,
    /// Bytes the image takes on the host.
    pub allocated_size: Option<u64>,
    pub backing_file: Option<String>,
    /// Whether the format node has a backing image, named in its header or attached in QEMU: what the guest
    /// sees is then more than this image's own clusters, and a full backup must copy the whole chain's view.
    pub has_backing: bool,
    pub read_only: bool,
    /// Removable media (a CD-ROM, a floppy): backup skips it unless it is named with `--disk`.
    pub removable: bool,
    /// Whether QEMU can store this disk's bitmaps in its image, so that they survive a restart of QEMU.
    pub bitmaps_persist: bool,
    /// Why they cannot, when they cannot: they then live only in QEMU's memory.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bitmaps_volatile_why: Option<String>,
    /// Whether QEMU decrypts the disk's image or one of its backing images (LUKS, qcow2 `encrypt`): a copy of
    /// what the guest sees is then plaintext of what the user encrypted.
    pub encrypted: bool,
    pub bitmaps: Vec<BitmapInfo>,
}

/// Whether a format node can store persistent bitmaps: only qcow2 can, and only when it is writable. `None` if
/// it can, else why not, to follow "disk X ...".
pub fn volatile_bitmaps_why(format: &str, read_only: bool) -> Option<String> {
    if format != "qcow2" {
        Some(format!("is {format}: its bitmaps live only while QEMU runs"))
    } else if read_only {
        Some("is read-only: its bitmaps live only while QEMU runs".to_owned())
    } else {
        None
    }
}

/// A dirty bitmap of a disk: QEMU's flags, one field each as QEMU reports them.
#[allow(clippy::struct_excessive_bools)]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BitmapInfo {
    pub name: String,
    pub persistent: bool,
    pub recording: bool,
    pub busy: bool,
    pub inconsistent: bool,
    pub granularity: u64,
    /// Dirty bytes.
    pub count: u64,
}

/// Connects to the VM's QMP monitor (the one place that does), naming the socket or endpoint in every error
/// and saying what to check. A unix socket is looked at first, so a missing one or a file that is not a
/// socket is said plainly.
pub async fn connect(target: &QmpTarget) -> Result<qmp::Qmp> {
    use std::os::unix::fs::FileTypeExt as _;
    let qemu_error = |what: String| Exit::new(ExitCode::Qemu, what);
    if let Some(socket) = target.socket() {
        match std::fs::metadata(socket) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(qemu_error(format!(
                    "QMP socket {} does not exist: is QEMU running with -qmp unix:{},server=on,wait=off?",
                    socket.display(),
                    socket.display()
                ))
                .into());
            }
            Ok(meta) if !meta.file_type().is_socket() => {
                return Err(qemu_error(format!(
                    "{} is not a socket: pass the path of QEMU's QMP socket (-qmp unix:PATH,server=on)",
                    socket.display()
                ))
                .into());
            }
            _ => {}
        }
        return target
            .connect(QMP_CONNECT_TIMEOUT)
            .await
            .with_context(|| format!("connecting to QEMU's QMP socket {}", socket.display()));
    }
    target
        .connect(QMP_CONNECT_TIMEOUT)
        .await
        .with_context(|| format!("connecting to QEMU's QMP endpoint {target}"))
}

/// The qdev id in a qdev path: `/machine/peripheral/disk0/virtio-backend` → `disk0`.
pub fn qdev_id(qdev: &str) -> Option<&str> {
    let rest = qdev.strip_prefix("/machine/peripheral/")?;
    let id = rest.split('/').next()?;
    (!id.is_empty()).then_some(id)
}

/// A disk's stable name from what `query-block` says of its backend: `drive` (the BlockBackend's name, empty
/// for a `-blockdev`) and `qdev` (the device's id when it has one, else its QOM path; QEMU 7.2 and 10.0 alike:
/// `disk0` for scsi-hd, nvme and ide-hd, `/machine/peripheral/disk0/virtio-backend` for virtio-blk).
/// The rule: the device's qdev id, else the drive name, else the device's QOM path made a name
/// (`/machine/peripheral-anon/device[2]/virtio-backend` → `peripheral-anon-device2`). `None` without device
/// and drive name.
pub fn disk_name(drive: &str, qdev: Option<&str>) -> Option<(String, NameSource)> {
    let qdev = qdev.filter(|q| !q.is_empty());
    if let Some(q) = qdev {
        if !q.starts_with('/') {
            return Some((q.to_owned(), NameSource::DeviceId));
        }
        if let Some(id) = qdev_id(q) {
            return Some((id.to_owned(), NameSource::DeviceId));
        }
    }
    if !drive.is_empty() {
        return Some((drive.to_owned(), NameSource::Drive));
    }
    let path = qdev?;
    let path = path.strip_prefix("/machine/").unwrap_or(path);
    let path = path.strip_suffix("/virtio-backend").unwrap_or(path);
    let name: String = path
        .chars()
        .filter_map(|c| match c {
            '/' => Some('-'),
            c if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') => Some(c),
            _ => None,
        })
        .collect();
    let name = name.trim_matches('-').to_owned();
    (chain::names::name_problem(&name).is_none()).then_some((name, NameSource::DevicePath))
}

/// Block drivers that pass I/O through to a child: a disk's bitmaps and image live below them. QEMU inserts
/// some of them itself (a running backup job's copy-before-write filter).
const FILTERS: &[&str] = &[
    "copy-before-write",
    "backup-top",
    "throttle",
    "copy-on-read",
    "compress",
    "preallocate",
    "blkdebug",
    "blkverify",
];

/// Reads the VM's version and disks.
pub async fn inspect(qmp: &qmp::Qmp) -> Result<VmInfo> {
    let version = qmp.execute(&qmp::commands::QueryVersion {}).await?;
    let blocks = qmp.execute(&qmp::commands::QueryBlock {}).await?;
    let nodes = qmp
        .execute(&qmp::commands::QueryNamedBlockNodes { flat: Some(true) })
        .await?;
    let graph = qmp.execute(&qmp::commands::XDebugQueryBlockGraph).await.ok();
    let mut disks = Vec::new();
    let mut empty_drives = Vec::new();
    for block in blocks {
        let Some(inserted) = block.inserted else {
            // A device with an id and no backend of its own (`-device ide-cd,id=cd1`) reports the bare id.
            let qdev = block
                .qdev
                .as_deref()
                .and_then(|q| qdev_id(q).or((!q.is_empty() && !q.contains('/')).then_some(q)))
                .map(str::to_owned);
            empty_drives.extend(qdev.or_else(|| (!block.device.is_empty()).then(|| block.device.clone())));
            continue;
        };
        let qdev = block.qdev.clone().filter(|q| !q.is_empty());
        let top = inserted.node_name.clone().unwrap_or_default();
        let (id, id_source) =
            disk_name(&block.device, qdev.as_deref()).unwrap_or_else(|| (top.clone(), NameSource::NodeName));
        // Below any filters: the node that holds the image and its bitmaps.
        let root_node = top.clone();
        let mut name = top;
        let mut node = nodes
            .iter()
            .find(|n| n.node_name.as_deref() == Some(name.as_str()));
        while node.is_some_and(|n| FILTERS.contains(&n.drv.as_str())) {
            let Some(child) = graph.as_ref().and_then(|g| filtered_child(g, &name)) else {
                break;
            };
            name = child;
            node = nodes
                .iter()
                .find(|n| n.node_name.as_deref() == Some(name.as_str()));
        }
        let encrypted = inserted.encrypted || image_encrypted(&inserted.image);
        let info = node.cloned().unwrap_or(inserted);
        // The protocol node below the format node: its filename stays the image's path whatever options the
        // format node was opened or reopened with (its own filename may then be a `json:` pseudo-filename).
        let image = graph
            .as_ref()
            .and_then(|g| g.child(&name, "file"))
            .and_then(|file| nodes.iter().find(|n| n.node_name.as_deref() == Some(file)))
            .map_or_else(|| info.file.clone(), |n| n.file.clone());
        let encrypted = encrypted || info.encrypted || image_encrypted(&info.image);
        let bitmaps = info
            .dirty_bitmaps
            .unwrap_or_default()
            .into_iter()
            .map(|b| BitmapInfo {
                name: b.name,
                persistent: b.persistent,
                recording: b.recording,
                busy: b.busy,
                inconsistent: b.inconsistent.unwrap_or(false),
                granularity: b.granularity,
                count: b.count,
            })
            .collect();
        let bitmaps_volatile_why = volatile_bitmaps_why(&info.drv, info.ro);
        let has_backing = info.backing_file.is_some()
            || info.backing_file_depth > 0
            || graph
                .as_ref()
                .is_some_and(|g| g.child(&name, "backing").is_some());
        disks.push(DiskInfo {
            id,
            id_source,
            qdev,
            node_name: name,
            root_node,
            file: info.file,
            image,
            format: info.drv,
            virtual_size: info.image.virtual_size,
            allocated_size: info.image.actual_size,
            backing_file: info.backing_file,
            has_backing,
            read_only: info.ro,
            removable: block.removable,
            bitmaps_persist: bitmaps_volatile_why.is_none(),
            bitmaps_volatile_why,
            encrypted,
            bitmaps,
        });
    }
    Ok(VmInfo {
        qemu: QemuInfo {
            version: format!(
                "{}.{}.{}",
                version.qemu.major, version.qemu.minor, version.qemu.micro
            ),
            package: version.package.trim().to_owned(),
        },
        disks,
        empty_drives,
    })
}

/// The child a filter node passes I/O to (`file`, or `backing` for older filters), from
/// `x-debug-query-block-graph`.
fn filtered_child(graph: &qmp::BlockGraph, parent: &str) -> Option<String> {
    ["file", "backing"]
        .iter()
        .find_map(|edge| graph.child(parent, edge))
        .map(str::to_owned)
}

/// Whether QEMU reports this image, or any image in its backing chain, as encrypted: a LUKS image (`luks`
/// format) or a qcow2 with an `encrypt` section.
pub fn image_encrypted(image: &qmp::ImageInfo) -> bool {
    let own = image.format == "luks"
        || image.format_specific.as_ref().is_some_and(|spec| {
            spec["type"] == "luks" || spec["data"].get("encrypt").is_some_and(|e| !e.is_null())
        });
    own || image.backing_image.as_deref().is_some_and(image_encrypted)
}

#[cfg(test)]
mod tests {
    use super::{NameSource, disk_name, qdev_id};

    #[test]
    fn qdev_ids() {
        assert_eq!(qdev_id("/machine/peripheral/disk0/virtio-backend"), Some("disk0"));
        assert_eq!(qdev_id("/machine/peripheral/scsi-hd0"), Some("scsi-hd0"));
        assert_eq!(qdev_id("/machine/peripheral-anon/device[0]/virtio-backend"), None);
    }

    /// What `query-block` reports (QEMU 7.2 and 10.0) for each way of attaching a disk.
    #[test]
    fn one_naming_rule_for_every_device_type() {
        let cases = [
            // virtio-blk with id, on -blockdev and on -drive
            (
                "",
                Some("/machine/peripheral/vd/virtio-backend"),
                "vd",
                NameSource::DeviceId,
            ),
            (
                "drv2",
                Some("/machine/peripheral/vd2/virtio-backend"),
                "vd2",
                NameSource::DeviceId,
            ),
            // scsi-hd, nvme, ide-hd with id (QEMU reports the id itself)
            ("", Some("sd4"), "sd4", NameSource::DeviceId),
            ("", Some("nv5"), "nv5", NameSource::DeviceId),
            ("", Some("ide6"), "ide6", NameSource::DeviceId),
            // -drive if=virtio, and a device without id on a named drive
            (
                "virtio0",
                Some("/machine/peripheral-anon/device[2]/virtio-backend"),
                "virtio0",
                NameSource::Drive,
            ),
            (
                "drv7",
                Some("/machine/peripheral-anon/device[1]"),
                "drv7",
                NameSource::Drive,
            ),
            // a device without id on a -blockdev
            (
                "",
                Some("/machine/peripheral-anon/device[0]/virtio-backend"),
                "peripheral-anon-device0",
                NameSource::DevicePath,
            ),
            (
                "",
                Some("/machine/peripheral-anon/device[3]"),
                "peripheral-anon-device3",
                NameSource::DevicePath,
            ),
            // a drive without a device
            ("drv8", None, "drv8", NameSource::Drive),
            ("drv9", Some(""), "drv9", NameSource::Drive),
        ];
        for (drive, qdev, name, source) in cases {
            assert_eq!(
                disk_name(drive, qdev),
                Some((name.to_owned(), source)),
                "{drive} {qdev:?}"
            );
        }
        assert_eq!(disk_name("", None), None);
    }
}
