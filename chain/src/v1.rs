//! Reading manifests of format 1, whose operation records had a `kind` string and a free-text `note` that
//! carried what recovery needed: a newline list of files outside the repository (`snapshot`, and `revert`,
//! which was recorded as a `snapshot` with an id `revert-<time point>`), a sentinel for a backup that started
//! the VM's NBD server, `commit:` and JSON for a commit, or words for the reader (prune, merge). Each record is
//! converted to a typed [`Payload`]; a note that fits none of these is kept as [`Operation::legacy_note`] and
//! never acted on, and a commit whose note cannot be read becomes [`Payload::Unreadable`], which recovery
//! does not act on. Records are data from a file: the conversion trusts nothing, and recovery checks what they name
//! as it does for records of the current format.

use chrono::{DateTime, Utc};
use serde::Deserialize;

use crate::ids::{NodeId, RelPath};
use crate::model::{BitmapRecord, CommitDisk, CommitRecord, Operation, Payload};

/// The note of a format-1 backup record whose run started the VM's NBD server.
pub const NBD_SERVER_NOTE: &str = "started the VM's NBD server";

/// The prefix of a format-1 note listing files created outside the repository, one per line.
pub const OUTSIDE_FILES: &str = "files outside the repository:\n";

/// The prefix of a format-1 commit note, followed by [`CommitNote`] as JSON.
pub const COMMIT_PREFIX: &str = "commit:";

/// An operation record of format 1.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperationV1 {
    pub id: String,
    pub kind: String,
    pub node: Option<NodeId>,
    pub started: DateTime<Utc>,
    pub pid: u32,
    pub host: String,
    #[serde(default)]
    pub jobs: Vec<String>,
    #[serde(default)]
    pub block_nodes: Vec<String>,
    #[serde(default)]
    pub bitmaps: Vec<BitmapRecord>,
    #[serde(default)]
    pub files: Vec<RelPath>,
    pub note: Option<String>,
}

/// The JSON after [`COMMIT_PREFIX`] in a format-1 commit note.
#[derive(Debug, Clone, Deserialize)]
struct CommitNote {
    node: String,
    parent: String,
    /// Per disk: the disk, the increment's file, the parent's file.
    files: Vec<(String, String, String)>,
}

impl From<OperationV1> for Operation {
    fn from(old: OperationV1) -> Operation {
        let note = old.note;
        let (payload, legacy_note) = match old.kind.as_str() {
            "backup" if note.as_deref() == Some(NBD_SERVER_NOTE) => (
                Payload::Backup {
                    nbd_server_started: true,
                    scratch: Vec::new(),
                    view: None,
                    frozen_by: None,
                },
                None,
            ),
            "backup" => (
                Payload::Backup {
                    nbd_server_started: false,
                    scratch: Vec::new(),
                    view: None,
                    frozen_by: None,
                },
                note,
            ),
            "snapshot" => {
                let (outside_files, rest) = outside_files(note);
                // A revert was a `snapshot` record with no node and the id `revert-<time point>`.
                let time_point = old
                    .id
                    .strip_prefix("revert-")
                    .filter(|_| old.node.is_none())
                    .and_then(|n| n.parse::<NodeId>().ok());
                let payload = match time_point {
                    Some(time_point) => Payload::Revert {
                        time_point,
                        outside_files,
                    },
                    None => Payload::Snapshot { outside_files },
                };
                (payload, rest)
            }
            "commit" => match note.as_deref().and_then(commit_record) {
                Some(record) => (Payload::Commit(record), None),
                None => (
                    Payload::Unreadable {
                        was: "commit".to_owned(),
                    },
                    note,
                ),
            },
            "restore" => (Payload::LiveRestore { served: None }, note),
            "prune" => (
                Payload::Prune {
                    policy: String::new(),
                    removing: Vec::new(),
                },
                note,
            ),
            "merge" => (Payload::Merge { folded: Vec::new() }, note),
            // Not a kind of format 1: a name format 2 gives a meaning would be read as one.
            other if Payload::KINDS.contains(&other) => (
                Payload::Unreadable {
                    was: other.to_owned(),
                },
                note,
            ),
            other => (Payload::Other(other.to_owned()), note),
        };
        Operation {
            id: old.id,
            node: old.node,
            started: old.started,
            pid: old.pid,
            host: old.host,
            jobs: old.jobs,
            block_nodes: old.block_nodes,
            bitmaps: old.bitmaps,
            files: old.files,
            payload,
            legacy_note,
        }
    }
}

/// The files listed in an outside-files note, and the note itself when it is not one.
fn outside_files(note: Option<String>) -> (Vec<std::path::PathBuf>, Option<String>) {
    match note.as_deref().and_then(|n| n.strip_prefix(OUTSIDE_FILES)) {
        Some(list) => (
            list.split('\n')
                .filter(|p| !p.is_empty())
                .map(std::path::PathBuf::from)
                .collect(),
            None,
        ),
        None => (Vec::new(), note),
    }
}

/// A commit note's record, `None` when it is not one that names two node ids.
fn commit_record(note: &str) -> Option<CommitRecord> {
    let json = note.strip_prefix(COMMIT_PREFIX)?;
    let note: CommitNote = serde_json::from_str(json).ok()?;
    Some(CommitRecord {
        node: note.node.parse().ok()?,
        parent: note.parent.parse().ok()?,
        disks: note
            .files
            .into_iter()
            .map(|(disk, increment, into)| CommitDisk {
                disk,
                increment,
                into,
            })
            .collect(),
    })
}

/// Converts a format-1 manifest, as JSON, to the current format in place: each operation record is read as
/// [`OperationV1`] and written as an [`Operation`], and the format version becomes the current one. The rest of
/// the manifest did not change between the formats and is read as it is.
pub fn upgrade(manifest: &mut serde_json::Value) -> serde_json::Result<()> {
    use serde::de::Error as _;
    if let Some(operations) = manifest.get_mut("operations").and_then(|o| o.as_array_mut()) {
        for (i, op) in operations.iter_mut().enumerate() {
            let old = OperationV1::deserialize(op.take())
                .map_err(|e| serde_json::Error::custom(format!("operations[{i}] (format 1): {e}")))?;
            *op = serde_json::to_value(Operation::from(old))?;
        }
    }
    manifest["format_version"] = serde_json::json!(crate::model::FORMAT_VERSION);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v1(id: &str, kind: &str, for_node: Option<&str>, note: Option<&str>) -> Operation {
        let old: OperationV1 = serde_json::from_value(serde_json::json!({
            "id": id, "kind": kind, "node": for_node, "started": "2026-01-01T00:00:00Z", "pid": 7, "host": "h",
            "jobs": ["j"], "block_nodes": ["b"], "bitmaps": [{ "node": "n", "name": "m" }],
            "files": ["0002/disk0.qcow2"], "note": note,
        }))
        .unwrap();
        Operation::from(old)
    }

    #[test]
    fn a_pending_backup_keeps_its_lists_and_whether_it_started_the_nbd_server() {
        let op = v1("backup-0002", "backup", Some("0002"), Some(NBD_SERVER_NOTE));
        assert_eq!(
            op.payload,
            Payload::Backup {
                nbd_server_started: true,
                scratch: Vec::new(),
                view: None,
                frozen_by: None,
            }
        );
        assert_eq!(op.legacy_note, None);
        assert_eq!(
            (op.id.as_str(), op.node.as_ref().map(NodeId::as_str)),
            ("backup-0002", Some("0002"))
        );
        assert_eq!((op.pid, op.host.as_str()), (7, "h"));
        assert_eq!(
            (op.jobs, op.block_nodes),
            (vec!["j".to_owned()], vec!["b".to_owned()])
        );
        assert_eq!(
            op.bitmaps,
            vec![BitmapRecord {
                node: "n".into(),
                name: "m".into()
            }]
        );
        assert_eq!(op.files, vec!["0002/disk0.qcow2".parse::<RelPath>().unwrap()]);
        let op = v1("backup-0002", "backup", Some("0002"), None);
        assert_eq!(
            op.payload,
            Payload::Backup {
                nbd_server_started: false,
                scratch: Vec::new(),
                view: None,
                frozen_by: None,
            }
        );
        // Any other note is words: kept, and it starts nothing.
        let op = v1(
            "backup-0002",
            "backup",
            Some("0002"),
            Some("started the VM's NBD server, maybe"),
        );
        assert!(!op.payload.started_nbd_server());
        assert_eq!(
            op.legacy_note.as_deref(),
            Some("started the VM's NBD server, maybe")
        );
    }

    #[test]
    fn a_pending_snapshot_lists_its_outside_files() {
        let note = format!(
            "{OUTSIDE_FILES}/vm/disk0.qmpbak-ab12cd34-0003.qcow2\n\n/vm/disk1.qmpbak-ab12cd34-0003.qcow2"
        );
        let op = v1("snapshot-0003", "snapshot", Some("0003"), Some(&note));
        assert_eq!(
            op.payload,
            Payload::Snapshot {
                outside_files: vec![
                    "/vm/disk0.qmpbak-ab12cd34-0003.qcow2".into(),
                    "/vm/disk1.qmpbak-ab12cd34-0003.qcow2".into()
                ]
            }
        );
        assert_eq!(op.legacy_note, None);
        // A note that is not a list names no file.
        let op = v1("snapshot-0003", "snapshot", Some("0003"), Some("/etc/passwd"));
        assert_eq!(
            op.payload,
            Payload::Snapshot {
                outside_files: vec![]
            }
        );
        assert_eq!(op.legacy_note.as_deref(), Some("/etc/passwd"));
    }

    #[test]
    fn a_pending_revert_was_a_snapshot_record_without_a_node() {
        let note = format!("{OUTSIDE_FILES}/vm/disk0.qmpbak-ab12cd34-0003.1.qcow2");
        let op = v1("revert-0003", "snapshot", None, Some(&note));
        assert_eq!(
            op.payload,
            Payload::Revert {
                time_point: "0003".parse().unwrap(),
                outside_files: vec!["/vm/disk0.qmpbak-ab12cd34-0003.1.qcow2".into()]
            }
        );
        assert_eq!(op.node, None);
        // With a node, or an id that names no node, it is a snapshot.
        let op = v1("revert-0003", "snapshot", Some("0004"), Some(&note));
        assert!(matches!(op.payload, Payload::Snapshot { .. }));
        let op = v1("revert-../x", "snapshot", None, Some(&note));
        assert!(matches!(op.payload, Payload::Snapshot { .. }));
    }

    #[test]
    fn a_pending_commit_keeps_its_record_and_an_unreadable_one_is_not_a_commit() {
        let note =
            r#"commit:{"node":"0003","parent":"0002","files":[["disk0","/vm/b.qcow2","/vm/a.qcow2"]]}"#;
        let op = v1("commit-0003", "commit", None, Some(note));
        assert_eq!(
            op.payload,
            Payload::Commit(CommitRecord {
                node: "0003".parse().unwrap(),
                parent: "0002".parse().unwrap(),
                disks: vec![CommitDisk {
                    disk: "disk0".into(),
                    increment: "/vm/b.qcow2".into(),
                    into: "/vm/a.qcow2".into()
                }]
            })
        );
        for bad in [
            None,
            Some("commit:{"),
            Some("words"),
            Some(r#"commit:{"node":"../x","parent":"0002","files":[]}"#),
        ] {
            let op = v1("commit-0003", "commit", None, bad);
            assert_eq!(
                op.payload,
                Payload::Unreadable { was: "commit".into() },
                "{bad:?}"
            );
            assert_eq!(op.legacy_note.as_deref(), bad);
        }
    }

    #[test]
    fn pending_restore_prune_merge_and_unknown_records_convert() {
        let op = v1("restore-0002", "restore", Some("0002"), None);
        assert_eq!(op.payload, Payload::LiveRestore { served: None });
        let op = v1(
            "prune-x",
            "prune",
            None,
            Some("prune by keep-last 2: removing 0001 in this order"),
        );
        assert_eq!(
            op.payload,
            Payload::Prune {
                policy: String::new(),
                removing: vec![]
            }
        );
        assert_eq!(
            op.legacy_note.as_deref(),
            Some("prune by keep-last 2: removing 0001 in this order")
        );
        let op = v1("merge-0003-x", "merge", Some("0003"), Some("merge 0003: …"));
        assert_eq!(op.payload, Payload::Merge { folded: vec![] });
        assert_eq!(op.legacy_note.as_deref(), Some("merge 0003: …"));
        let op = v1("x", "defragment", Some("0003"), Some("later"));
        assert_eq!(op.payload, Payload::Other("defragment".into()));
        assert_eq!(op.legacy_note.as_deref(), Some("later"));
        assert_eq!(op.jobs, vec!["j".to_owned()]);
        let op = v1("x", "live_restore", Some("0003"), None);
        assert_eq!(
            op.payload,
            Payload::Unreadable {
                was: "live_restore".into()
            }
        );
    }

    #[test]
    fn converted_records_are_written_and_read_back_alike() {
        for op in [
            v1("backup-0002", "backup", Some("0002"), Some(NBD_SERVER_NOTE)),
            v1(
                "revert-0003",
                "snapshot",
                None,
                Some(&format!("{OUTSIDE_FILES}/vm/a.qcow2")),
            ),
            v1("x", "defragment", None, Some("later")),
            v1("commit-0003", "commit", None, Some("words")),
        ] {
            let text = serde_json::to_string(&op).unwrap();
            let back: Operation = serde_json::from_str(&text).unwrap();
            assert_eq!(back, op, "{text}");
        }
    }
}
