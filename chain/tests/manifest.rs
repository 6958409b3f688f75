//! Loading manifests: a good one round-trips; every kind of damage gets its own error, which names the file and
//! the node or field; and a manifest that fails to load is left exactly as it was.

#![allow(clippy::unwrap_used, clippy::many_single_char_names)] // tests: nodes a, b, c …; unwrap fails the test

mod common;

use std::fs;

use chain::{Error, LockWait, Manifest, ManifestProblem, NodeId, NodeKind, Operation, Payload, RelPath};
use chrono::Utc;
use common::{TestRepo, add};
use serde_json::{Value, json};

/// A repository whose VM "vm1" has 0001 (full) ← 0002 ← 0003, and 0004 under 0001, current 0003.
fn saved() -> (TestRepo, Manifest) {
    let t = TestRepo::new();
    let guard = t.vm.lock_exclusive(LockWait::NoWait, "test").unwrap();
    let mut m = t.vm.load().unwrap();
    let a = add(&mut m, None);
    let b = add(&mut m, Some(&a));
    let c = add(&mut m, Some(&b));
    add(&mut m, Some(&a));
    m.current = Some(c);
    m.set_tag(&b, Some("weekly".into())).unwrap();
    let mut op = Operation::new(
        Payload::Backup {
            nbd_server_started: false,
            scratch: Vec::new(),
            view: None,
            frozen_by: None,
        },
        Some(b.clone()),
        Utc::now(),
    );
    op.files.push(RelPath::disk_image(&b, "disk0").unwrap());
    op.jobs.push("job-1".into());
    m.add_operation(op);
    m.add_operation(Operation::new(
        Payload::Other("defragment".into()),
        None,
        Utc::now(),
    ));
    t.vm.save(&m, &guard).unwrap();
    (t, m)
}

#[test]
fn a_manifest_round_trips_through_disk() {
    let (t, m) = saved();
    let loaded = t.vm.load().unwrap();
    assert_eq!(loaded, m);
    // Human-readable: pretty, snake_case, RFC 3339 times, relative paths.
    let text = fs::read_to_string(t.vm.manifest_path()).unwrap();
    assert!(text.contains("\n  \"format_version\": 2,"), "{text}");
    assert!(text.contains("\"chain_id\""));
    assert!(text.contains("\"kind\": \"incremental\""));
    assert!(text.contains("\"file\": \"0002/disk0.qcow2\""));
    assert!(
        text.contains("\"kind\": \"defragment\""),
        "unknown operation kinds are kept"
    );
    assert!(text.contains("T03:04:05Z"), "times are RFC 3339");
    assert_eq!(loaded.operations[1].payload, Payload::Other("defragment".into()));
}

/// Writes `edit`ed JSON over the saved manifest, loads it, checks the file was not touched, returns the error.
fn load_edited(edit: impl FnOnce(&mut Value)) -> (Error, String) {
    let (t, _) = saved();
    let path = t.vm.manifest_path();
    let mut value: Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    edit(&mut value);
    let bytes = serde_json::to_vec_pretty(&value).unwrap();
    load_bytes(&t, &bytes)
}

fn load_bytes(t: &TestRepo, bytes: &[u8]) -> (Error, String) {
    let path = t.vm.manifest_path();
    fs::write(&path, bytes).unwrap();
    let err = t.vm.load().unwrap_err();
    assert_eq!(fs::read(&path).unwrap(), bytes, "a bad manifest is left as it is");
    let text = err.to_string();
    assert!(
        text.contains(&path.display().to_string()),
        "the message names the file: {text}"
    );
    (err, text)
}

fn problem(err: &Error) -> &ManifestProblem {
    match err {
        Error::ManifestInvalid { problem, .. } => problem,
        other => panic!("expected ManifestInvalid, got {other:?}"),
    }
}

#[test]
fn json_syntax_errors_give_line_and_column() {
    let (t, _) = saved();
    let good = fs::read(t.vm.manifest_path()).unwrap();
    let (err, text) = load_bytes(&t, &good[..good.len() / 2]);
    let Error::ManifestSyntax { line, column, .. } = err else {
        panic!("{err:?}")
    };
    // Column 0 is legitimate when the cut falls right after a newline.
    assert!(line > 1, "line {line} column {column}");
    assert!(text.contains(&format!("line {line} column {column}")), "{text}");

    let (err, text) = load_bytes(&t, b"{\n  \"format_version\": 1,\n  \"vm\": \"vm1\",, \n}");
    assert!(matches!(err, Error::ManifestSyntax { line: 3, .. }), "{err:?}");
    assert!(text.contains("line 3"), "{text}");
}

#[test]
fn schema_errors_give_line_and_column() {
    let (err, text) = load_edited(|v| v["next_seq"] = json!("five"));
    assert!(matches!(err, Error::ManifestSyntax { .. }), "{err:?}");
    assert!(text.contains("invalid type"), "{text}");
    let (err, text) = load_edited(|v| v["nodes"][1]["colour"] = json!("red"));
    assert!(matches!(err, Error::ManifestSyntax { .. }), "{err:?}");
    assert!(text.contains("unknown field `colour`"), "{text}");
    let (err, text) = load_edited(|v| v["nodes"][1]["kind"] = json!("partial"));
    assert!(matches!(err, Error::ManifestSyntax { .. }), "{err:?}");
    assert!(text.contains("partial"), "{text}");
}

#[test]
fn format_versions() {
    let (err, text) = load_edited(|v| v["format_version"] = json!(3));
    assert!(
        matches!(
            err,
            Error::ManifestTooNew {
                found: 3,
                supported: 2,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(text.contains("newer qmpbak"), "{text}");
    // Even when the rest is something this version cannot parse.
    let (err, _) = load_edited(|v| {
        v["format_version"] = json!(7);
        v["nodes"] = json!({"a new": "shape"});
    });
    assert!(matches!(err, Error::ManifestTooNew { found: 7, .. }), "{err:?}");
    let (err, _) = load_edited(|v| v["format_version"] = json!(0));
    assert!(
        matches!(err, Error::ManifestFormatUnknown { found: 0, .. }),
        "{err:?}"
    );
}

#[test]
fn duplicate_node_ids() {
    let (err, text) = load_edited(|v| v["nodes"][3]["id"] = json!("0002"));
    assert!(
        matches!(problem(&err), ManifestProblem::DuplicateNode { node } if node == "0002"),
        "{err:?}"
    );
    assert!(text.contains("0002"), "{text}");
}

#[test]
fn missing_parents() {
    let (err, text) = load_edited(|v| v["nodes"][2]["parent"] = json!("0042"));
    assert!(
        matches!(problem(&err), ManifestProblem::MissingParent { node, parent } if node == "0003" && parent == "0042"),
        "{err:?}"
    );
    assert!(text.contains("0003") && text.contains("0042"), "{text}");
}

#[test]
fn cycles() {
    let (err, text) = load_edited(|v| v["nodes"][0]["parent"] = json!("0003"));
    let ManifestProblem::Cycle { nodes } = problem(&err) else {
        panic!("{err:?}")
    };
    for id in ["0001", "0002", "0003"] {
        assert!(nodes.iter().any(|n| n == id), "{nodes:?}");
    }
    assert!(text.contains("cycle"), "{text}");
    let (err, _) = load_edited(|v| v["nodes"][3]["parent"] = json!("0004"));
    assert!(matches!(problem(&err), ManifestProblem::Cycle { nodes } if nodes.contains(&"0004".to_owned())));
}

#[test]
fn numbering_that_disagrees_with_the_tree() {
    let (err, text) = load_edited(|v| v["nodes"][1]["tid"] = json!(2));
    assert!(
        matches!(problem(&err), ManifestProblem::Numbering { node, stored: (2, 2), expected: (2, 3) } if node == "0002"),
        "{err:?}"
    );
    assert!(
        text.contains("node 0002 has lid/tid 2/2, but the tree gives 2/3"),
        "{text}"
    );
}

#[test]
fn current_must_exist() {
    let (err, text) = load_edited(|v| v["current"] = json!("0009"));
    assert!(matches!(problem(&err), ManifestProblem::CurrentMissing { current } if current == "0009"));
    assert!(text.contains("0009"), "{text}");
}

#[test]
fn invalid_ids_and_paths() {
    let (err, text) = load_edited(|v| v["nodes"][1]["id"] = json!("../0002"));
    assert!(
        matches!(problem(&err), ManifestProblem::InvalidValue { field, .. } if field == "nodes[1].id"),
        "{err:?}"
    );
    assert!(text.contains("../0002"), "{text}");

    let (err, text) = load_edited(|v| v["nodes"][2]["disks"][0]["file"] = json!("/etc/passwd"));
    assert!(
        matches!(problem(&err), ManifestProblem::InvalidValue { field, .. } if field == "node 0003 disks[0].file"),
        "{err:?}"
    );
    assert!(
        text.contains("absolute") && text.contains("/etc/passwd"),
        "{text}"
    );

    let (err, text) = load_edited(|v| v["nodes"][2]["disks"][0]["backing"] = json!("0002/../../../x"));
    assert!(
        text.contains("node 0003 disks[0].backing") && text.contains(".."),
        "{text}"
    );
    assert!(matches!(problem(&err), ManifestProblem::InvalidValue { .. }));

    let (_, text) = load_edited(|v| v["nodes"][1]["disks"][0]["disk"] = json!("a/b"));
    assert!(text.contains("node 0002 disks[0].disk"), "{text}");
    let (_, text) = load_edited(|v| v["nodes"][1]["parent"] = json!(""));
    assert!(text.contains("node 0002 parent"), "{text}");
    let (_, text) = load_edited(|v| v["operations"][0]["files"][0] = json!("../../elsewhere"));
    assert!(text.contains("operations[0].files[0]"), "{text}");
    let (_, text) = load_edited(|v| v["chain_id"] = json!("not-hex!"));
    assert!(text.contains("chain_id"), "{text}");
    let (_, text) = load_edited(|v| v["nodes"][0]["disks"][0]["table_sha256"] = json!("abc"));
    assert!(text.contains("table_sha256"), "{text}");
    let (_, text) = load_edited(|v| {
        v["disks"] =
            json!([{"id": "x y", "node_name": null, "virtual_size": 1, "serial": null, "filename": null}]);
    });
    assert!(text.contains("disks[0].id"), "{text}");
    let (_, text) = load_edited(|v| {
        v["disks"] = json!([{"id": "d", "node_name": null, "virtual_size": 1, "serial": null, "filename": null,
                             "key": "../x"}]);
    });
    assert!(text.contains("disks[0].key"), "{text}");
}

#[test]
fn disks_recorded_by_older_versions_load_without_a_key() {
    let (t, _) = saved();
    let path = t.vm.manifest_path();
    let mut value: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    value["disks"] =
        json!([{"id": "d", "node_name": "n", "virtual_size": 1, "serial": null, "filename": "/vm/d.qcow2"}]);
    fs::write(&path, serde_json::to_vec_pretty(&value).unwrap()).unwrap();
    let loaded = t.vm.load().unwrap();
    assert_eq!(loaded.disks[0].key, None);
    assert_eq!(loaded.disks[0].filename.as_deref(), Some("/vm/d.qcow2"));
}

#[test]
fn other_contents_problems() {
    let (err, text) = load_edited(|v| v["vm"] = json!("vm2"));
    assert!(
        matches!(problem(&err), ManifestProblem::WrongVm { expected, found } if expected == "vm1" && found == "vm2")
    );
    assert!(text.contains("vm2"), "{text}");
    let (err, text) = load_edited(|v| v["nodes"][3]["tag"] = json!("weekly"));
    assert!(
        matches!(problem(&err), ManifestProblem::DuplicateTag { .. }),
        "{err:?}"
    );
    assert!(
        text.contains("weekly") && text.contains("0002") && text.contains("0004"),
        "{text}"
    );
    let (err, _) = load_edited(|v| v["nodes"][3]["tag"] = json!("0001"));
    assert!(
        matches!(problem(&err), ManifestProblem::DuplicateTag { .. }),
        "{err:?}"
    );
    let (err, text) = load_edited(|v| v["next_seq"] = json!(3));
    assert!(
        matches!(problem(&err), ManifestProblem::NextSeqTooLow { next_seq: 3, .. }),
        "{err:?}"
    );
    assert!(text.contains("0003") || text.contains("0004"), "{text}");
}

#[test]
fn a_missing_manifest() {
    let (t, _) = saved();
    fs::remove_file(t.vm.manifest_path()).unwrap();
    let err = t.vm.load().unwrap_err();
    assert!(matches!(err, Error::ManifestMissing { .. }), "{err:?}");
    assert!(err.to_string().contains("manifest.json"), "{err}");
}

#[test]
fn saving_refuses_an_invalid_manifest_and_keeps_the_old_one() {
    let (t, mut m) = saved();
    let before = fs::read(t.vm.manifest_path()).unwrap();
    let guard = t.vm.lock_exclusive(LockWait::NoWait, "test").unwrap();
    m.current = Some(NodeId::new("0077").unwrap());
    let err = t.vm.save(&m, &guard).unwrap_err();
    assert!(matches!(
        &err,
        Error::ManifestInconsistent {
            problem: ManifestProblem::CurrentMissing { .. },
            ..
        }
    ));
    m.current = None;
    m.vm = "other".into();
    assert!(matches!(
        t.vm.save(&m, &guard),
        Err(Error::ManifestInconsistent { .. })
    ));
    assert_eq!(fs::read(t.vm.manifest_path()).unwrap(), before);
}

#[test]
fn node_ids_count_up() {
    let mut m = Manifest::new("vm1", Utc::now());
    assert_eq!(m.next_node_id().unwrap().as_str(), "0001");
    assert_eq!(m.next_node_id().unwrap().as_str(), "0002");
    m.next_seq = 9999;
    assert_eq!(m.next_node_id().unwrap().as_str(), "9999");
    assert_eq!(m.next_node_id().unwrap().as_str(), "10000");
    assert_eq!(m.chain_id.len(), 8);
    assert_ne!(Manifest::new("vm1", Utc::now()).chain_id, m.chain_id);
    let _ = NodeKind::Full;
}

#[test]
fn node_ids_never_wrap_at_the_end_of_the_sequence() {
    let mut m = Manifest::new("vm1", Utc::now());
    m.next_seq = u64::MAX - 1;
    assert_eq!(m.next_node_id().unwrap().as_str(), (u64::MAX - 1).to_string());
    assert_eq!(m.next_seq, u64::MAX);
    let err = m.next_node_id().unwrap_err();
    assert!(matches!(err, Error::NodeIdsExhausted { .. }), "{err:?}");
    assert_eq!(m.next_seq, u64::MAX, "a failed call changes nothing");
    assert!(err.to_string().contains(&u64::MAX.to_string()), "{err}");
}

#[test]
fn a_node_id_at_the_end_of_the_sequence_is_refused() {
    let mut m = Manifest::new("vm1", Utc::now());
    let id = NodeId::new(u64::MAX.to_string()).unwrap();
    let err = m.add_node(common::node(&id, None, NodeKind::Full)).unwrap_err();
    assert!(matches!(err, Error::NodeIdsExhausted { .. }), "{err:?}");
    assert!(m.nodes.is_empty());
}

#[test]
fn a_next_seq_that_cannot_produce_an_id_is_refused_on_load() {
    let (err, text) = load_edited(|v| v["next_seq"] = json!(u64::MAX));
    let ManifestProblem::InvalidValue { field, value, .. } = problem(&err) else {
        panic!("{err:?}")
    };
    assert_eq!(field, "next_seq");
    assert_eq!(value, &u64::MAX.to_string());
    assert!(text.contains(&u64::MAX.to_string()), "{text}");
}

#[test]
fn a_format_1_manifest_is_read_with_its_records_converted_and_left_as_it_was() {
    let (t, m) = saved();
    let path = t.vm.manifest_path();
    let mut value: Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    value["format_version"] = json!(1);
    let b = m.operations[0].node.clone().unwrap();
    value["operations"] = json!([
        {
            "id": "backup-x", "kind": "backup", "node": b, "started": "2026-01-01T00:00:00Z", "pid": 1,
            "host": "h", "jobs": ["job-1"], "block_nodes": [], "bitmaps": [], "files": ["0002/disk0.qcow2"],
            "note": "started the VM's NBD server",
        },
        {
            "id": "revert-0001", "kind": "snapshot", "node": null, "started": "2026-01-01T00:00:00Z", "pid": 1,
            "host": "h", "note": "files outside the repository:\n/vm/disk0.qmpbak-x-0001.qcow2",
        },
    ]);
    let bytes = serde_json::to_vec_pretty(&value).unwrap();
    fs::write(&path, &bytes).unwrap();
    let loaded = t.vm.load().unwrap();
    assert_eq!(loaded.format_version, chain::FORMAT_VERSION);
    assert_eq!(loaded.nodes, m.nodes);
    assert_eq!(
        loaded.operations[0].payload,
        Payload::Backup {
            nbd_server_started: true,
            scratch: Vec::new(),
            view: None,
            frozen_by: None,
        }
    );
    assert_eq!(loaded.operations[0].files, m.operations[0].files);
    assert_eq!(
        loaded.operations[1].payload,
        Payload::Revert {
            time_point: "0001".parse().unwrap(),
            outside_files: vec!["/vm/disk0.qmpbak-x-0001.qcow2".into()],
        }
    );
    // Reading converts in memory only: the file is rewritten by the next save, not by a load.
    assert_eq!(fs::read(&path).unwrap(), bytes);
    // A format-1 record with a field of format 2 is no format-1 record.
    let (err, text) = load_edited(|v| {
        v["format_version"] = json!(1);
        v["operations"][0]["note"] = json!(null);
    });
    assert!(matches!(err, Error::ManifestSyntax { .. }), "{err:?}");
    assert!(text.contains("operations[0] (format 1)"), "{text}");
}

#[test]
fn a_malformed_record_of_a_known_kind_fails_the_load() {
    let (err, text) = load_edited(|v| v["operations"][0]["payload"]["nbd_server_started"] = json!("yes"));
    assert!(matches!(err, Error::ManifestSyntax { .. }), "{err:?}");
    assert!(text.contains("manifest"), "{text}");
    let (err, _) = load_edited(|v| v["operations"][0]["payload"] = json!({"kind": "commit", "node": "0002"}));
    assert!(matches!(err, Error::ManifestSyntax { .. }), "{err:?}");
    let (err, _) = load_edited(|v| {
        v["operations"][0]["payload"] = json!({"kind": "revert", "time_point": "../x", "outside_files": []});
    });
    assert!(matches!(err, Error::ManifestInvalid { .. }), "{err:?}");
}

#[test]
fn a_live_restore_record_reads_as_before_and_keeps_how_its_chain_was_served() {
    let (t, _) = saved();
    let path = t.vm.manifest_path();
    let mut value: Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    let served = json!({
        "kind": "live_restore", "served": {"host": "10.0.0.2", "port": 10810, "disks": ["disk0"], "tls": true,
        "creds_object": "qmpbak-nbd-client-0002"},
    });
    value["operations"][0]["payload"] = json!({"kind": "live_restore"});
    value["operations"][1] = value["operations"][0].clone();
    value["operations"][1]["id"] = json!("restore-0002");
    value["operations"][1]["payload"] = served.clone();
    fs::write(&path, serde_json::to_vec_pretty(&value).unwrap()).unwrap();
    let loaded = t.vm.load().unwrap();
    // A record of an older qmpbak: a live restore on the VM's host.
    assert_eq!(
        loaded.operations[0].payload,
        Payload::LiveRestore { served: None }
    );
    match &loaded.operations[1].payload {
        Payload::LiveRestore { served: Some(s) } => {
            assert_eq!((s.host.as_str(), s.port, s.tls), ("10.0.0.2", 10810, true));
            assert_eq!(s.creds_object.as_deref(), Some("qmpbak-nbd-client-0002"));
        }
        other => panic!("{other:?}"),
    }
    // Written back as read: the local one without `served`.
    let written = serde_json::to_value(&loaded.operations).unwrap();
    assert_eq!(written[0]["payload"], json!({"kind": "live_restore"}));
    assert_eq!(written[1]["payload"], served);
    let (err, _) = load_edited(|v| {
        v["operations"][0]["payload"] = json!({"kind": "live_restore", "served": {"host": "h", "port": "x"}});
    });
    assert!(matches!(err, Error::ManifestSyntax { .. }), "{err:?}");
}
