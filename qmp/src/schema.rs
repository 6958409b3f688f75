//! `Capabilities`: what this QEMU can do, read from `query-qmp-schema` rather than guessed from its version.
//!
//! QEMU hides most type names behind numbers, but command, event, member and enum value names are real, so a
//! question like "does blockdev-add accept driver copy-before-write" is answered by following `arg-type` to the
//! object, its `driver` member to an enum, and looking for the value.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use serde_json::Value;

use crate::types::{SchemaInfo, SchemaMetaType};

/// The shape of one schema type, reduced to what the questions below need.
#[derive(Debug)]
enum Shape {
    /// Members `(name, type)` and the types of union branches.
    Object {
        members: Vec<(String, String)>,
        branches: Vec<String>,
    },
    Enum(Vec<String>),
    Array(String),
    Alternate(Vec<String>),
}

#[derive(Debug, Default)]
struct Index {
    /// Command name → its `arg-type`.
    commands: HashMap<String, Option<String>>,
    events: HashSet<String>,
    types: HashMap<String, Shape>,
}

/// How deep type references are followed; QAPI schemas nest a handful of levels, and this also stops cycles.
const MAX_DEPTH: usize = 16;

impl Index {
    fn build(schema: &[SchemaInfo]) -> Index {
        let mut index = Index::default();
        for entry in schema {
            let name = entry.name.clone();
            match &entry.meta_type {
                SchemaMetaType::Command => {
                    index
                        .commands
                        .insert(name, entry.str_field("arg-type").map(str::to_owned));
                }
                SchemaMetaType::Event => {
                    index.events.insert(name);
                }
                SchemaMetaType::Object => {
                    let members = list(entry, "members")
                        .filter_map(|m| Some((text(m, "name")?, text(m, "type")?)))
                        .collect();
                    let branches = list(entry, "variants").filter_map(|v| text(v, "type")).collect();
                    index.types.insert(name, Shape::Object { members, branches });
                }
                SchemaMetaType::Enum => {
                    // `members` (QEMU 6.2+) has the values as `name`; `values` is the older spelling.
                    let mut values: Vec<String> =
                        list(entry, "members").filter_map(|m| text(m, "name")).collect();
                    if values.is_empty() {
                        values = list(entry, "values")
                            .filter_map(|v| v.as_str().map(str::to_owned))
                            .collect();
                    }
                    index.types.insert(name, Shape::Enum(values));
                }
                SchemaMetaType::Array => {
                    if let Some(element) = entry.str_field("element-type") {
                        index.types.insert(name, Shape::Array(element.to_owned()));
                    }
                }
                SchemaMetaType::Alternate => {
                    let types = list(entry, "members").filter_map(|m| text(m, "type")).collect();
                    index.types.insert(name, Shape::Alternate(types));
                }
                SchemaMetaType::Builtin | SchemaMetaType::Unknown(_) => {}
            }
        }
        index
    }

    /// Every `(member, type)` of an object type, including the members of every union branch.
    fn members<'a>(&'a self, ty: &'a str) -> Vec<(&'a str, &'a str)> {
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        self.collect_members(ty, 0, &mut seen, &mut out);
        out
    }

    fn collect_members<'a>(
        &'a self,
        ty: &'a str,
        depth: usize,
        seen: &mut HashSet<&'a str>,
        out: &mut Vec<(&'a str, &'a str)>,
    ) {
        if depth > MAX_DEPTH || !seen.insert(ty) {
            return;
        }
        if let Some(Shape::Object { members, branches }) = self.types.get(ty) {
            out.extend(members.iter().map(|(name, ty)| (name.as_str(), ty.as_str())));
            for branch in branches {
                self.collect_members(branch, depth + 1, seen, out);
            }
        }
    }

    /// The enum values a value of type `ty` can take: through arrays and alternates, empty for non-enums.
    fn enum_values(&self, ty: &str, depth: usize, out: &mut Vec<String>) {
        if depth > MAX_DEPTH {
            return;
        }
        match self.types.get(ty) {
            Some(Shape::Enum(values)) => out.extend(values.iter().cloned()),
            Some(Shape::Array(element)) => self.enum_values(element, depth + 1, out),
            Some(Shape::Alternate(types)) => {
                for ty in types {
                    self.enum_values(ty, depth + 1, out);
                }
            }
            Some(Shape::Object { .. }) | None => {}
        }
    }
}

fn list<'a>(entry: &'a SchemaInfo, key: &str) -> impl Iterator<Item = &'a Value> + 'a {
    entry
        .rest
        .get(key)
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
}

fn text(value: &Value, key: &str) -> Option<String> {
    value.get(key).and_then(Value::as_str).map(str::to_owned)
}

/// What the connected QEMU supports, from its schema. Cheap to clone.
///
/// The named booleans are the features qmpbak chooses strategies by; the methods answer any other question.
/// `Capabilities::default()` supports nothing (useful in tests of code that decides by capabilities).
#[derive(Debug, Clone, Default)]
#[allow(
    clippy::struct_excessive_bools,
    reason = "independent feature flags, named for callers to read"
)]
pub struct Capabilities {
    /// `blockdev-reopen` exists (QEMU 6.1+).
    pub blockdev_reopen: bool,
    /// The `copy-before-write` filter driver exists (QEMU 6.2+).
    pub copy_before_write: bool,
    /// The `snapshot-access` driver exists (QEMU 7.0+), for reading a copy-before-write snapshot.
    pub snapshot_access: bool,
    /// The `copy-before-write` filter takes `on-cbw-error` (QEMU 7.1+): a failed copy breaks the snapshot
    /// instead of failing the guest's write.
    pub cbw_on_error: bool,
    /// `blockdev-backup` takes `discard-source` (QEMU 9.1+).
    pub backup_discard_source: bool,
    /// `block-export-add` exists (QEMU 5.2+).
    pub block_export_add: bool,
    /// `blockdev-backup` takes `bitmap-mode`.
    pub backup_bitmap_mode: bool,
    index: Arc<Index>,
}

impl Capabilities {
    /// Builds the capabilities from a `query-qmp-schema` reply.
    pub fn from_schema(schema: &[SchemaInfo]) -> Capabilities {
        let mut caps = Capabilities {
            index: Arc::new(Index::build(schema)),
            ..Capabilities::default()
        };
        caps.blockdev_reopen = caps.has_command("blockdev-reopen");
        caps.copy_before_write = caps.blockdev_driver("copy-before-write");
        caps.snapshot_access = caps.blockdev_driver("snapshot-access");
        caps.cbw_on_error = caps.command_has_arg("blockdev-add", "on-cbw-error");
        caps.backup_discard_source = caps.command_has_arg("blockdev-backup", "discard-source");
        caps.block_export_add = caps.has_command("block-export-add");
        caps.backup_bitmap_mode = caps.command_has_arg("blockdev-backup", "bitmap-mode");
        caps
    }

    /// Whether QEMU has the command `name`.
    pub fn has_command(&self, name: &str) -> bool {
        self.index.commands.contains_key(name)
    }

    /// Whether QEMU can emit the event `name`.
    pub fn has_event(&self, name: &str) -> bool {
        self.index.events.contains(name)
    }

    /// The argument names of `command` (including those of every union branch), empty if unknown.
    pub fn command_args(&self, command: &str) -> Vec<String> {
        let Some(Some(arg_type)) = self.index.commands.get(command) else {
            return Vec::new();
        };
        let mut names: Vec<String> = self
            .index
            .members(arg_type)
            .into_iter()
            .map(|(name, _)| name.to_owned())
            .collect();
        names.sort_unstable();
        names.dedup();
        names
    }

    /// Whether `command` takes the argument `arg` (in any union branch).
    pub fn command_has_arg(&self, command: &str, arg: &str) -> bool {
        let Some(Some(arg_type)) = self.index.commands.get(command) else {
            return false;
        };
        self.index.members(arg_type).iter().any(|(name, _)| *name == arg)
    }

    /// The values the enum-typed argument `arg` of `command` accepts, empty if it is not an enum.
    pub fn command_arg_values(&self, command: &str, arg: &str) -> Vec<String> {
        let Some(Some(arg_type)) = self.index.commands.get(command) else {
            return Vec::new();
        };
        let mut values = Vec::new();
        for (_, ty) in self
            .index
            .members(arg_type)
            .into_iter()
            .filter(|(name, _)| *name == arg)
        {
            self.index.enum_values(ty, 0, &mut values);
        }
        values.sort_unstable();
        values.dedup();
        values
    }

    /// Whether `blockdev-add` accepts `driver: name`.
    pub fn blockdev_driver(&self, name: &str) -> bool {
        self.command_arg_values("blockdev-add", "driver")
            .iter()
            .any(|d| d == name)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn schema(value: Value) -> Vec<SchemaInfo> {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn answers_from_a_small_schema() {
        let caps = Capabilities::from_schema(&schema(json!([
            {"name": "blockdev-add", "meta-type": "command", "arg-type": "1", "ret-type": "0"},
            {"name": "blockdev-backup", "meta-type": "command", "arg-type": "2", "ret-type": "0"},
            {"name": "query-jobs", "meta-type": "command", "arg-type": "0", "ret-type": "[9]"},
            {"name": "orphan", "meta-type": "command", "arg-type": "404", "ret-type": "0"},
            {"name": "JOB_STATUS_CHANGE", "meta-type": "event", "arg-type": "5"},
            {"name": "0", "meta-type": "object", "members": []},
            {"name": "1", "meta-type": "object", "tag": "driver",
             "members": [{"name": "driver", "type": "3"}, {"name": "node-name", "type": "str", "default": null}],
             "variants": [{"case": "file", "type": "4"}, {"case": "qcow2", "type": "6"}]},
            {"name": "2", "meta-type": "object", "members": [
                {"name": "job-id", "type": "str"}, {"name": "sync", "type": "7"},
                {"name": "bitmap-mode", "type": "8", "default": null}]},
            {"name": "3", "meta-type": "enum", "members": [{"name": "file"}, {"name": "qcow2"}],
             "values": ["file", "qcow2"]},
            {"name": "4", "meta-type": "object", "members": [{"name": "filename", "type": "str"}]},
            {"name": "6", "meta-type": "object", "members": [{"name": "file", "type": "10"}]},
            {"name": "7", "meta-type": "enum", "values": ["full", "bitmap"]},
            {"name": "8", "meta-type": "enum", "members": [{"name": "on-success"}], "values": ["on-success"]},
            {"name": "10", "meta-type": "alternate", "members": [{"type": "1"}, {"type": "str"}]},
            {"name": "str", "meta-type": "builtin", "json-type": "string"},
            {"name": "x", "meta-type": "quantum", "whatever": 1}
        ])));
        assert!(caps.has_command("blockdev-add") && caps.has_command("orphan"));
        assert!(!caps.has_command("blockdev-reopen") && !caps.blockdev_reopen);
        assert!(caps.has_event("JOB_STATUS_CHANGE") && !caps.has_event("BLOCK_JOB_READY"));
        assert!(caps.command_has_arg("blockdev-add", "node-name"));
        assert!(
            caps.command_has_arg("blockdev-add", "filename"),
            "union branch members count"
        );
        assert!(!caps.command_has_arg("orphan", "x") && !caps.command_has_arg("nope", "x"));
        assert!(caps.blockdev_driver("qcow2") && !caps.blockdev_driver("copy-before-write"));
        assert_eq!(
            caps.command_arg_values("blockdev-backup", "sync"),
            ["bitmap", "full"]
        );
        assert_eq!(
            caps.command_args("blockdev-backup"),
            ["bitmap-mode", "job-id", "sync"]
        );
        assert!(caps.backup_bitmap_mode && !caps.backup_discard_source);
        assert!(!caps.copy_before_write && !caps.snapshot_access && !caps.block_export_add);
        assert!(!caps.cbw_on_error);
    }

    #[test]
    fn cyclic_and_empty_schemas_do_not_hang() {
        let caps = Capabilities::from_schema(&schema(json!([
            {"name": "c", "meta-type": "command", "arg-type": "a"},
            {"name": "a", "meta-type": "object", "members": [{"name": "m", "type": "b"}], "variants": [{"type": "a"}]},
            {"name": "b", "meta-type": "array", "element-type": "b"}
        ])));
        assert!(caps.command_has_arg("c", "m"));
        assert!(caps.command_arg_values("c", "m").is_empty());
        let none = Capabilities::from_schema(&[]);
        assert!(!none.has_command("c") && !none.blockdev_driver("file"));
    }
}
