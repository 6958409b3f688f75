//! The capabilities probe on QEMU 10.0.2's real (trimmed) schema, directly and over a connection.

mod support;

use std::time::Duration;

use qmp::Capabilities;
use qmp::types::SchemaInfo;
use serde_json::{Value, json};
use support::connected;

fn qemu_10_schema() -> Value {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/qemu-10.0.2-schema.json"
    ))
    .expect("schema test data");
    serde_json::from_str(&text).expect("schema JSON")
}

fn capabilities(schema: Value) -> Capabilities {
    let entries: Vec<SchemaInfo> = serde_json::from_value(schema).expect("schema entries");
    Capabilities::from_schema(&entries)
}

#[test]
fn qemu_10_has_everything_qmpbak_prefers() {
    let caps = capabilities(qemu_10_schema());
    assert!(caps.blockdev_reopen);
    assert!(caps.copy_before_write);
    assert!(caps.snapshot_access);
    assert!(caps.backup_discard_source);
    assert!(caps.block_export_add);
    assert!(caps.backup_bitmap_mode);

    assert!(caps.has_command("query-named-block-nodes") && caps.has_command("system_powerdown"));
    assert!(!caps.has_command("blockdev-teleport"));
    assert!(caps.has_event("JOB_STATUS_CHANGE") && caps.has_event("BLOCK_EXPORT_DELETED"));
    assert!(caps.command_has_arg("block-commit", "top-node"));
    assert!(
        caps.command_has_arg("blockdev-add", "filename"),
        "a member of the file driver's branch"
    );
    assert!(caps.command_has_arg("query-named-block-nodes", "flat"));
    assert!(!caps.command_has_arg("blockdev-backup", "x-no-such-arg"));
    assert!(
        caps.blockdev_driver("qcow2") && caps.blockdev_driver("raw") && !caps.blockdev_driver("teleport")
    );
    let sync = caps.command_arg_values("blockdev-backup", "sync");
    assert_eq!(sync, ["bitmap", "full", "incremental", "none", "top"]);
    assert_eq!(
        caps.command_arg_values("block-export-del", "mode"),
        ["hard", "safe"]
    );
    assert!(
        caps.command_args("blockdev-del")
            .contains(&"node-name".to_owned())
    );
}

#[test]
fn an_older_qemu_without_the_new_pieces() {
    // What QEMU 6.0 lacked: blockdev-reopen was x-blockdev-reopen, no copy-before-write or snapshot-access,
    // no discard-source; and enums still spelled their values in `values` only.
    let mut schema = qemu_10_schema();
    let entries = schema.as_array_mut().unwrap();
    entries.retain(|e| e["name"] != "blockdev-reopen");
    for entry in entries.iter_mut() {
        if let Some(members) = entry.get_mut("members").and_then(Value::as_array_mut) {
            members.retain(|m| m["name"] != "discard-source");
        }
        if entry["meta-type"] == "enum" {
            let values = entry["values"].as_array().unwrap().clone();
            let kept: Vec<Value> = values
                .into_iter()
                .filter(|v| v != "copy-before-write" && v != "snapshot-access")
                .collect();
            entry["values"] = json!(kept);
            entry.as_object_mut().unwrap().remove("members");
        }
    }
    let caps = capabilities(schema);
    assert!(!caps.blockdev_reopen && !caps.copy_before_write && !caps.snapshot_access);
    assert!(!caps.backup_discard_source);
    assert!(caps.backup_bitmap_mode && caps.block_export_add);
    assert!(
        caps.blockdev_driver("qcow2"),
        "values read from the old `values` list"
    );
}

#[tokio::test]
async fn capabilities_are_asked_once_per_connection() {
    let (qmp, mut peer) = connected(&["oob"]).await;
    let probe = tokio::spawn({
        let qmp = qmp.clone();
        async move { qmp.capabilities().await }
    });
    peer.answer("query-qmp-schema", qemu_10_schema()).await;
    let caps = probe.await.unwrap().unwrap();
    assert!(caps.copy_before_write);

    // Cached: the next thing the peer sees is the next command, not a second schema query.
    let again = tokio::time::timeout(Duration::from_secs(2), qmp.capabilities())
        .await
        .unwrap()
        .unwrap();
    assert!(again.snapshot_access);
    let call = tokio::spawn({
        let qmp = qmp.clone();
        async move { qmp.execute_raw("query-version", None).await }
    });
    peer.answer(
        "query-version",
        json!({"qemu": {"major": 10, "minor": 0, "micro": 2}, "package": ""}),
    )
    .await;
    call.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_failed_probe_is_retried() {
    let (qmp, mut peer) = connected(&[]).await;
    let probe = tokio::spawn({
        let qmp = qmp.clone();
        async move { qmp.capabilities().await }
    });
    let command = peer.expect("query-qmp-schema").await;
    peer.send(json!({"id": command["id"], "error": {"class": "GenericError", "desc": "busy"}}))
        .await;
    assert!(probe.await.unwrap().is_err());
    let probe = tokio::spawn({
        let qmp = qmp.clone();
        async move { qmp.capabilities().await }
    });
    peer.answer("query-qmp-schema", json!([])).await;
    let caps = probe.await.unwrap().unwrap();
    assert!(!caps.has_command("query-status"));
}
