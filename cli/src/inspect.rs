//! What a running VM has: QEMU's version and each disk (its stable id, block node, image file, format, sizes)
//! with its dirty bitmaps, read over QMP. Backup uses this to find the disks it copies and the state of
//! qmpbak's bitmaps; `qmpbak info` prints it.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::exit::{Exit, ExitCode};

/// How long connecting and negotiating QMP may take.
pub const QMP_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A VM as QEMU describes it.
#[derive(Debug, Clone, Serialize)]
pub struct VmInfo {
    pub qemu: QemuInfo,
    pub disks: Vec<DiskInfo>,
}

#[derive(Debug, Clone, Serialize)]
pub struct QemuInfo {
    pub version: String,
    pub package: String,
}

/// One disk of the VM.
#[derive(Debug, Clone, Serialize)]
pub struct DiskInfo {
    /// The stable name qmpbak uses: the device's qdev id (`-device ...,id=ID`), else the drive name.
    pub id: String,
    /// QEMU's qdev path of the device, when there is a device.
    pub qdev: Option<String>,
    /// The block node at the top of the device's graph: what backup jobs read from.
    pub node_name: String,
    pub file: String,
    pub format: String,
    pub virtual_size: u64,
    /// Bytes the image takes on the host.
    pub allocated_size: Option<u64>,
    pub backing_file: Option<String>,
    pub read_only: bool,
    /// Whether QEMU decrypts the disk's image or one of its backing images (LUKS, qcow2 `encrypt`): a copy of
    /// what the guest sees is then plaintext of what the user encrypted.
    pub encrypted: bool,
    pub bitmaps: Vec<BitmapInfo>,
}

/// A dirty bitmap of a disk: QEMU's flags, one field each as QEMU reports them.
#[allow(clippy::struct_excessive_bools)]
#[derive(Debug, Clone, Serialize)]
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

/// Connects to a QMP socket, naming the socket in every error and saying what to check.
pub async fn connect(socket: &Path) -> Result<qmp::Qmp> {
    use std::os::unix::fs::FileTypeExt as _;
    let qemu_error = |what: String| Exit::new(ExitCode::Qemu, what);
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
    qmp::Qmp::connect(socket, QMP_CONNECT_TIMEOUT)
        .await
        .with_context(|| format!("connecting to QEMU's QMP socket {}", socket.display()))
}

/// The stable disk id from a qdev path: `/machine/peripheral/disk0/virtio-backend` → `disk0`.
pub fn qdev_id(qdev: &str) -> Option<&str> {
    let rest = qdev.strip_prefix("/machine/peripheral/")?;
    let id = rest.split('/').next()?;
    (!id.is_empty()).then_some(id)
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
    let graph = qmp.execute_raw("x-debug-query-block-graph", None).await.ok();
    let mut disks = Vec::new();
    for block in blocks {
        let Some(inserted) = block.inserted else { continue };
        let qdev = block.qdev.clone().filter(|q| !q.is_empty());
        let top = inserted.node_name.clone().unwrap_or_default();
        let id = qdev
            .as_deref()
            .and_then(qdev_id)
            .map(str::to_owned)
            .or_else(|| (!block.device.is_empty()).then(|| block.device.clone()))
            .unwrap_or_else(|| top.clone());
        // Below any filters: the node that holds the image and its bitmaps.
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
        let encrypted = inserted.encrypted || crate::crypt::image_encrypted(&inserted.image);
        let info = node.cloned().unwrap_or(inserted);
        let encrypted = encrypted || info.encrypted || crate::crypt::image_encrypted(&info.image);
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
        disks.push(DiskInfo {
            id,
            qdev,
            node_name: name,
            file: info.file,
            format: info.drv,
            virtual_size: info.image.virtual_size,
            allocated_size: info.image.actual_size,
            backing_file: info.backing_file,
            read_only: info.ro,
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
    })
}

/// The child a filter node passes I/O to (`file`, or `backing` for older filters), from
/// `x-debug-query-block-graph`.
fn filtered_child(graph: &serde_json::Value, parent: &str) -> Option<String> {
    let nodes = graph["nodes"].as_array()?;
    let id_of = |name: &str| nodes.iter().find(|n| n["name"] == name).map(|n| n["id"].clone());
    let name_of = |id: &serde_json::Value| {
        nodes.iter().find(|n| n["id"] == *id)?["name"]
            .as_str()
            .map(str::to_owned)
    };
    let parent_id = id_of(parent)?;
    let edges = graph["edges"].as_array()?;
    ["file", "backing"].iter().find_map(|child| {
        edges
            .iter()
            .find(|e| e["parent"] == parent_id && e["name"] == *child)
            .and_then(|e| name_of(&e["child"]))
    })
}

#[cfg(test)]
mod tests {
    use super::qdev_id;

    #[test]
    fn qdev_ids() {
        assert_eq!(qdev_id("/machine/peripheral/disk0/virtio-backend"), Some("disk0"));
        assert_eq!(qdev_id("/machine/peripheral/scsi-hd0"), Some("scsi-hd0"));
        assert_eq!(qdev_id("/machine/peripheral-anon/device[0]/virtio-backend"), None);
    }
}
