//! `transaction`: several actions applied atomically, e.g. a backup job started at the same instant as a
//! dirty bitmap is cleared or added, so no write falls between them.

use serde::{Deserialize, Serialize};

use super::bitmap::{
    BlockDirtyBitmapAdd, BlockDirtyBitmapClear, BlockDirtyBitmapDisable, BlockDirtyBitmapEnable,
    BlockDirtyBitmapMerge, BlockDirtyBitmapRemove,
};
use super::job::BlockdevBackup;
use super::node::BlockdevSnapshot;
use super::{Empty, command};
use crate::types::ActionCompletionMode;

/// One action of a transaction, sent as `{"type": "<command>", "data": {<its arguments>}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data", rename_all = "kebab-case")]
pub enum TransactionAction {
    /// Makes the transaction fail (for testing rollback).
    Abort(Empty),
    BlockDirtyBitmapAdd(BlockDirtyBitmapAdd),
    BlockDirtyBitmapRemove(BlockDirtyBitmapRemove),
    BlockDirtyBitmapClear(BlockDirtyBitmapClear),
    BlockDirtyBitmapEnable(BlockDirtyBitmapEnable),
    BlockDirtyBitmapDisable(BlockDirtyBitmapDisable),
    BlockDirtyBitmapMerge(BlockDirtyBitmapMerge),
    BlockdevBackup(BlockdevBackup),
    BlockdevSnapshot(BlockdevSnapshot),
}

/// Options of the whole transaction.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct TransactionProperties {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_mode: Option<ActionCompletionMode>,
}

/// `transaction`: applies every action or none.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Transaction {
    pub actions: Vec<TransactionAction>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub properties: Option<TransactionProperties>,
}
command!(Transaction, "transaction", Empty);

impl Transaction {
    /// A transaction with QEMU's default (`individual`) completion mode.
    pub fn new(actions: Vec<TransactionAction>) -> Transaction {
        Transaction {
            actions,
            properties: None,
        }
    }

    /// A transaction whose jobs all succeed or all fail (`completion-mode: grouped`).
    pub fn grouped(actions: Vec<TransactionAction>) -> Transaction {
        let properties = TransactionProperties {
            completion_mode: Some(ActionCompletionMode::Grouped),
        };
        Transaction {
            actions,
            properties: Some(properties),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;
    use crate::commands::{BitmapRef, Command};
    use crate::types::{BitmapSyncMode, MirrorSyncMode};

    fn wire<C: Command>(cmd: &C) -> Value {
        serde_json::to_value(cmd).unwrap()
    }

    #[test]
    fn transaction_wire_format() {
        let mut backup = BlockdevBackup::new("b0", "disk0", "tgt0", MirrorSyncMode::Bitmap);
        backup.bitmap = Some("qmpbak-1".into());
        backup.bitmap_mode = Some(BitmapSyncMode::OnSuccess);
        backup.auto_finalize = Some(false);
        let actions = vec![
            TransactionAction::BlockDirtyBitmapAdd(BlockDirtyBitmapAdd {
                persistent: Some(true),
                ..BlockDirtyBitmapAdd::new("disk0", "qmpbak-2")
            }),
            TransactionAction::BlockDirtyBitmapMerge(BlockDirtyBitmapMerge {
                node: "disk0".into(),
                target: "qmpbak-2".into(),
                bitmaps: vec![
                    "a".into(),
                    BitmapRef::Node {
                        node: "other".into(),
                        name: "b".into(),
                    },
                ],
            }),
            TransactionAction::BlockdevBackup(backup),
            TransactionAction::Abort(Empty),
        ];
        assert_eq!(Transaction::NAME, "transaction");
        assert_eq!(
            wire(&Transaction::grouped(actions)),
            json!({
                "actions": [
                    {"type": "block-dirty-bitmap-add",
                     "data": {"node": "disk0", "name": "qmpbak-2", "persistent": true}},
                    {"type": "block-dirty-bitmap-merge",
                     "data": {"node": "disk0", "target": "qmpbak-2",
                              "bitmaps": ["a", {"node": "other", "name": "b"}]}},
                    {"type": "blockdev-backup",
                     "data": {"job-id": "b0", "device": "disk0", "target": "tgt0", "sync": "bitmap",
                              "bitmap": "qmpbak-1", "bitmap-mode": "on-success", "auto-finalize": false,
                              "auto-dismiss": false}},
                    {"type": "abort", "data": {}}
                ],
                "properties": {"completion-mode": "grouped"}
            })
        );
        assert_eq!(wire(&Transaction::new(vec![])), json!({"actions": []}));
    }

    #[test]
    fn other_commands_wire_format() {
        use crate::commands::*;
        assert_eq!(wire(&QueryVersion), Value::Null);
        assert_eq!(
            wire(&QueryNamedBlockNodes { flat: Some(true) }),
            json!({"flat": true})
        );
        assert_eq!(wire(&QueryNamedBlockNodes::default()), json!({}));
        assert_eq!(wire(&BlockdevDel::new("n1")), json!({"node-name": "n1"}));
        assert_eq!(
            wire(&HumanMonitorCommand::new("info block")),
            json!({"command-line": "info block"})
        );
        assert_eq!(
            wire(&BlockdevAdd(json!({"driver": "null-co"}))),
            json!({"driver": "null-co"})
        );
        assert_eq!(
            wire(&BlockCommit {
                base_node: Some("base".into()),
                ..BlockCommit::new("c0", "disk0")
            }),
            json!({"job-id": "c0", "device": "disk0", "base-node": "base", "auto-dismiss": false})
        );
        assert_eq!(wire(&JobDismiss::new("j")), json!({"id": "j"}));
        assert_eq!(
            wire(&BlockExportDel {
                mode: Some(crate::types::BlockExportRemoveMode::Hard),
                ..BlockExportDel::new("e")
            }),
            json!({"id": "e", "mode": "hard"})
        );
        assert_eq!(
            wire(&NbdServerStart::unix("/s")),
            json!({"addr": {"type": "unix", "data": {"path": "/s"}}})
        );
        assert_eq!(SystemPowerdown::NAME, "system_powerdown");
    }

    #[test]
    fn mirror_export_and_graph_commands_wire_format() {
        use crate::commands::*;
        assert_eq!(BlockdevMirror::NAME, "blockdev-mirror");
        assert_eq!(
            wire(&BlockdevMirror {
                replaces: Some("fmt0".into()),
                ..BlockdevMirror::new("p0", "throttle0", "ov0", MirrorSyncMode::None)
            }),
            json!({"job-id": "p0", "device": "throttle0", "target": "ov0", "sync": "none",
                   "replaces": "fmt0", "auto-dismiss": false})
        );
        assert_eq!(
            wire(&BlockExportAdd::nbd("e0", "n0", false)),
            json!({"type": "nbd", "id": "e0", "node-name": "n0", "name": "e0", "writable": false})
        );
        assert_eq!(
            wire(&BlockExportDel::hard("e0")),
            json!({"id": "e0", "mode": "hard"})
        );
        assert_eq!(QueryBlockExports::NAME, "query-block-exports");
        assert_eq!(wire(&QueryBlockExports), Value::Null);
        assert_eq!(XDebugQueryBlockGraph::NAME, "x-debug-query-block-graph");
        assert_eq!(wire(&XDebugQueryBlockGraph), Value::Null);
        assert_eq!(wire(&QueryStatus), Value::Null);
        assert_eq!(wire(&Cont), Value::Null);
        assert_eq!(
            wire(&BlockdevReopen {
                options: vec![json!({"driver": "qcow2", "node-name": "n"})]
            }),
            json!({"options": [{"driver": "qcow2", "node-name": "n"}]})
        );
        assert_eq!(
            wire(&BlockdevSnapshot {
                node: "d".into(),
                overlay: "o".into()
            }),
            json!({"node": "d", "overlay": "o"})
        );
    }

    #[test]
    fn export_list_and_block_graph_replies_decode_tolerantly() {
        use crate::types::{BlockExportInfo, BlockGraph};
        let exports: Vec<BlockExportInfo> = serde_json::from_value(json!([
            {"id": "e0", "type": "nbd", "node-name": "n0", "shutting-down": false, "new": 1}
        ]))
        .unwrap();
        assert_eq!(exports[0].id, "e0");
        assert_eq!(exports[0].node_name, "n0");
        let graph: BlockGraph = serde_json::from_value(json!({
            "nodes": [{"id": 1, "type": "block-driver", "name": "fmt0"},
                      {"id": 2, "type": "block-driver", "name": "file0"},
                      {"id": 3, "type": "block-driver", "name": "base0"},
                      {"id": 4, "type": "something-new", "name": "x"}],
            "edges": [{"parent": 1, "child": 2, "name": "file", "perm": ["consistent-read"], "shared-perm": []},
                      {"parent": 1, "child": 3, "name": "backing", "perm": [], "shared-perm": []}]
        }))
        .unwrap();
        assert_eq!(graph.child("fmt0", "file"), Some("file0"));
        assert_eq!(graph.child("fmt0", "backing"), Some("base0"));
        assert_eq!(graph.child("file0", "file"), None);
        assert_eq!(graph.child("nope", "file"), None);
    }
}
