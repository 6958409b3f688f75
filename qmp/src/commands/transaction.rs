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
}
