//! The NBD server and block exports, through which qmpbak reads a point-in-time view of a disk.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{Empty, command};
use crate::types::{BlockExportInfo, BlockExportRemoveMode};

/// `nbd-server-start`: starts QEMU's NBD server on `addr` (a `SocketAddressLegacy`, e.g.
/// `{"type": "unix", "data": {"path": "/run/x.sock"}}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct NbdServerStart {
    pub addr: Value,
    /// The id of a `tls-creds-x509` object (endpoint=server): clients must negotiate TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_creds: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
}
command!(NbdServerStart, "nbd-server-start", Empty);

impl NbdServerStart {
    /// A server on a Unix socket.
    pub fn unix(path: impl Into<String>) -> NbdServerStart {
        let addr = serde_json::json!({"type": "unix", "data": {"path": path.into()}});
        NbdServerStart {
            addr,
            tls_creds: None,
            max_connections: None,
        }
    }

    /// A server on TCP `host`:`port`, with TLS when `tls_creds` names a credentials object.
    pub fn tcp(host: impl Into<String>, port: u16, tls_creds: Option<String>) -> NbdServerStart {
        let addr =
            serde_json::json!({"type": "inet", "data": {"host": host.into(), "port": port.to_string()}});
        NbdServerStart {
            addr,
            tls_creds,
            max_connections: None,
        }
    }
}

impl BlockExportAdd {
    /// A read-only NBD export of `node_name` that also offers the dirty bitmap `bitmap` (found on the node or
    /// below it) as the metadata context `qemu:dirty-bitmap:BITMAP`.
    pub fn nbd_with_bitmap(id: &str, node_name: &str, bitmap: &str) -> BlockExportAdd {
        BlockExportAdd(serde_json::json!({
            "type": "nbd", "id": id, "node-name": node_name, "name": id, "writable": false,
            "bitmaps": [bitmap],
        }))
    }

    /// Like [`BlockExportAdd::nbd_with_bitmap`], with the bitmap named by its node: for an export of a node
    /// the bitmap is not found below by QEMU's search (a `snapshot-access` node over a copy-before-write
    /// filter). The metadata context is still `qemu:dirty-bitmap:BITMAP`.
    pub fn nbd_with_node_bitmap(
        id: &str,
        node_name: &str,
        bitmap_node: &str,
        bitmap: &str,
    ) -> BlockExportAdd {
        BlockExportAdd(serde_json::json!({
            "type": "nbd", "id": id, "node-name": node_name, "name": id, "writable": false,
            "bitmaps": [{"node": bitmap_node, "name": bitmap}],
        }))
    }

    /// A read-only NBD export of `node_name` that also offers `qemu:allocation-depth` (QEMU 5.2+): per
    /// extent, 0 where no layer of the node's chain holds it, 1 where the node itself does (its zero clusters
    /// too), 2+ where a backing layer does.
    pub fn nbd_with_allocation_depth(id: &str, node_name: &str) -> BlockExportAdd {
        BlockExportAdd(serde_json::json!({
            "type": "nbd", "id": id, "node-name": node_name, "name": id, "writable": false,
            "allocation-depth": true,
        }))
    }
}

/// `nbd-server-stop`: stops the NBD server and removes its exports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NbdServerStop;
command!(NbdServerStop, "nbd-server-stop", Empty);

/// `block-export-add`: exports a node (`BlockExportOptions`, e.g. `{"type": "nbd", "id": …, "node-name": …}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct BlockExportAdd(pub Value);
command!(BlockExportAdd, "block-export-add", Empty);

impl BlockExportAdd {
    /// An NBD export of `node_name`, with export id and NBD export name both `id`.
    pub fn nbd(id: &str, node_name: &str, writable: bool) -> BlockExportAdd {
        BlockExportAdd(serde_json::json!({
            "type": "nbd", "id": id, "node-name": node_name, "name": id, "writable": writable,
        }))
    }
}

/// `block-export-del`: removes an export; it is gone when `BLOCK_EXPORT_DELETED` arrives.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockExportDel {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<BlockExportRemoveMode>,
}
command!(BlockExportDel, "block-export-del", Empty);

impl BlockExportDel {
    pub fn new(id: impl Into<String>) -> BlockExportDel {
        BlockExportDel {
            id: id.into(),
            mode: None,
        }
    }

    /// Removes the export even while clients are connected (`mode: hard`).
    pub fn hard(id: impl Into<String>) -> BlockExportDel {
        BlockExportDel {
            id: id.into(),
            mode: Some(BlockExportRemoveMode::Hard),
        }
    }
}

/// `query-block-exports`: the exports QEMU has.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueryBlockExports;
command!(QueryBlockExports, "query-block-exports", Vec<BlockExportInfo>);
