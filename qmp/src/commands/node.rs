//! Commands that add, remove, create, reopen and snapshot block nodes.
//!
//! Node options are a union of some forty drivers, so they are plain JSON (`serde_json::json!`).

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{Empty, command};

/// `blockdev-add`: adds a node graph described by `BlockdevOptions`, e.g.
/// `{"driver": "qcow2", "node-name": "n1", "file": {"driver": "file", "filename": "/x.qcow2"}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct BlockdevAdd(pub Value);
command!(BlockdevAdd, "blockdev-add", Empty);

/// `blockdev-del`: removes a node added with `blockdev-add` that nothing uses any more.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockdevDel {
    pub node_name: String,
}
command!(BlockdevDel, "blockdev-del", Empty);

impl BlockdevDel {
    pub fn new(node_name: impl Into<String>) -> BlockdevDel {
        BlockdevDel {
            node_name: node_name.into(),
        }
    }
}

/// `blockdev-create`: starts a `create` job that formats an image (`BlockdevCreateOptions` in `options`).
/// Such jobs are never auto-dismissed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockdevCreate {
    pub job_id: String,
    pub options: Value,
}
command!(BlockdevCreate, "blockdev-create", Empty);

/// `blockdev-reopen`: changes options of existing nodes (each entry a full `BlockdevOptions`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BlockdevReopen {
    pub options: Vec<Value>,
}
command!(BlockdevReopen, "blockdev-reopen", Empty);

/// `blockdev-snapshot`: makes the added node `overlay` the new active layer on top of `node`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockdevSnapshot {
    pub node: String,
    pub overlay: String,
}
command!(BlockdevSnapshot, "blockdev-snapshot", Empty);
