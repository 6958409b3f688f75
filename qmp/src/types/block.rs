//! Replies about block devices and nodes: `query-block`, `query-named-block-nodes` and their parts.
//!
//! Only the fields qmpbak uses are typed; unknown fields are ignored and fields that some QEMU versions lack
//! are `Option` or default, so a schema change does not make the whole reply undecodable.

use serde::{Deserialize, Serialize};

use super::enums::BlockDeviceIoStatus;

/// One entry of `query-block`: a guest-visible block backend (`BlockInfo`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BlockInfo {
    /// The backend name (empty for `-blockdev` + `-device` setups, which are named by `qdev`).
    #[serde(default)]
    pub device: String,
    /// The qdev id or QOM path of the device this backend is attached to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qdev: Option<String>,
    #[serde(default)]
    pub removable: bool,
    #[serde(default)]
    pub locked: bool,
    #[serde(default, rename = "io-status", skip_serializing_if = "Option::is_none")]
    pub io_status: Option<BlockDeviceIoStatus>,
    /// The root node of the medium, absent when the drive is empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inserted: Option<BlockDeviceInfo>,
}

/// A block node as `query-named-block-nodes` or `query-block` describe it (`BlockDeviceInfo`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BlockDeviceInfo {
    /// The node name; auto-generated ones start with `#`.
    #[serde(default, rename = "node-name", skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// The filename or JSON description of the node.
    #[serde(default)]
    pub file: String,
    /// The block driver, e.g. `qcow2`, `file`, `copy-before-write`.
    #[serde(default)]
    pub drv: String,
    #[serde(default)]
    pub ro: bool,
    #[serde(default, rename = "backing_file", skip_serializing_if = "Option::is_none")]
    pub backing_file: Option<String>,
    #[serde(default, rename = "backing_file_depth")]
    pub backing_file_depth: u64,
    #[serde(default)]
    pub encrypted: bool,
    #[serde(default, rename = "write_threshold")]
    pub write_threshold: u64,
    #[serde(default)]
    pub image: ImageInfo,
    /// The node's dirty bitmaps; absent on QEMUs that report them elsewhere.
    #[serde(default, rename = "dirty-bitmaps", skip_serializing_if = "Option::is_none")]
    pub dirty_bitmaps: Option<Vec<DirtyBitmapInfo>>,
}

/// The image a node presents (`ImageInfo`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ImageInfo {
    #[serde(default)]
    pub filename: String,
    /// The format as QEMU names it, e.g. `qcow2`, `raw`, `file`.
    #[serde(default)]
    pub format: String,
    /// The guest-visible size in bytes.
    #[serde(default)]
    pub virtual_size: u64,
    /// Bytes allocated on the host, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actual_size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dirty_flag: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing_filename: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub full_backing_filename: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing_filename_format: Option<String>,
    /// Driver-specific details (`ImageInfoSpecific`), left as JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format_specific: Option<serde_json::Value>,
    /// The backing image, when QEMU describes the chain (`query-block` without `flat`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing_image: Option<Box<ImageInfo>>,
}

/// A dirty bitmap on a node (`BlockDirtyInfo`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirtyBitmapInfo {
    /// The bitmap's name; empty for an anonymous bitmap (QEMU leaves the field out).
    #[serde(default)]
    pub name: String,
    /// Dirty bytes.
    #[serde(default)]
    pub count: u64,
    /// Bytes per bit.
    #[serde(default)]
    pub granularity: u64,
    /// Whether writes are being recorded (the bitmap is enabled).
    #[serde(default)]
    pub recording: bool,
    /// Whether a job or export is using the bitmap, so it cannot be changed.
    #[serde(default)]
    pub busy: bool,
    /// Whether the bitmap is stored in the qcow2 image when QEMU closes it.
    #[serde(default)]
    pub persistent: bool,
    /// Whether QEMU could not save it properly last time; such a bitmap cannot be trusted or used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inconsistent: Option<bool>,
}

impl DirtyBitmapInfo {
    /// Whether the bitmap is marked inconsistent.
    pub fn is_inconsistent(&self) -> bool {
        self.inconsistent.unwrap_or(false)
    }
}

/// One entry of `query-block-exports` (`BlockExportInfo`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockExportInfo {
    pub id: String,
    /// The export type (`nbd`, `fuse`, …).
    #[serde(default, rename = "type")]
    pub export_type: String,
    #[serde(default)]
    pub node_name: String,
    #[serde(default)]
    pub shutting_down: bool,
}

/// The reply of `x-debug-query-block-graph` (`XDbgBlockGraph`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BlockGraph {
    #[serde(default)]
    pub nodes: Vec<BlockGraphNode>,
    #[serde(default)]
    pub edges: Vec<BlockGraphEdge>,
}

/// A node of the block graph: a block node, a backend or a job (`XDbgBlockGraphNode`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BlockGraphNode {
    /// Graph-local id that edges refer to.
    pub id: u64,
    /// `block-backend`, `block-job` or `block-driver`.
    #[serde(default, rename = "type")]
    pub node_type: String,
    /// The node name (or backend/job name).
    #[serde(default)]
    pub name: String,
}

/// An edge from a parent to a child node (`XDbgBlockGraphEdge`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BlockGraphEdge {
    pub parent: u64,
    pub child: u64,
    /// The child's role: `file`, `backing`, `root`, …
    #[serde(default)]
    pub name: String,
}

impl BlockGraph {
    /// The name of the node `parent`'s child on edge `edge` (`file`, `backing`, …).
    pub fn child(&self, parent: &str, edge: &str) -> Option<&str> {
        let parent_id = self.nodes.iter().find(|n| n.name == parent)?.id;
        let child_id = self
            .edges
            .iter()
            .find(|e| e.parent == parent_id && e.name == edge)?
            .child;
        self.nodes
            .iter()
            .find(|n| n.id == child_id)
            .map(|n| n.name.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_block_node_from_qemu_10() {
        let json = r#"{"iops_rd": 0, "detect_zeroes": "off", "active": true, "image": {"virtual-size": 67108864,
            "filename": "/tmp/d.qcow2", "cluster-size": 65536, "format": "qcow2", "actual-size": 200704,
            "format-specific": {"type": "qcow2", "data": {"compat": "1.1"}}, "dirty-flag": false},
            "iops_wr": 0, "ro": false, "node-name": "disk0", "backing_file_depth": 0, "drv": "qcow2",
            "iops": 0, "bps_wr": 0, "write_threshold": 0, "encrypted": false, "bps": 0, "bps_rd": 0,
            "cache": {"no-flush": false, "direct": false, "writeback": true}, "file": "/tmp/d.qcow2",
            "dirty-bitmaps": [{"name": "b0", "recording": true, "persistent": true, "busy": false,
            "granularity": 65536, "count": 131072}, {"recording": false, "persistent": false, "busy": true,
            "granularity": 65536, "count": 0, "inconsistent": true}], "some-new-field": [1, 2]}"#;
        let node: BlockDeviceInfo = serde_json::from_str(json).unwrap();
        assert_eq!(node.node_name.as_deref(), Some("disk0"));
        assert_eq!(node.drv, "qcow2");
        assert_eq!(node.image.virtual_size, 64 << 20);
        assert_eq!(node.image.actual_size, Some(200_704));
        let bitmaps = node.dirty_bitmaps.unwrap();
        assert_eq!(bitmaps[0].name, "b0");
        assert_eq!(bitmaps[0].count, 131_072);
        assert!(bitmaps[0].recording && bitmaps[0].persistent && !bitmaps[0].is_inconsistent());
        assert_eq!(bitmaps[1].name, "");
        assert!(bitmaps[1].is_inconsistent());
    }

    #[test]
    fn block_info_without_medium() {
        let json = r#"{"io-status": "ok", "device": "", "locked": false, "removable": true,
            "qdev": "/machine/peripheral/cd0/virtio-backend", "tray_open": false, "type": "unknown"}"#;
        let info: BlockInfo = serde_json::from_str(json).unwrap();
        assert!(info.inserted.is_none());
        assert_eq!(info.io_status, Some(BlockDeviceIoStatus::Ok));
    }
}
