//! Names that become file names: VM names, disk ids, node ids and tags (`[A-Za-z0-9][A-Za-z0-9._-]{0,63}`), and
//! [`RelPath`], a path inside a VM directory that cannot climb out of it.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The longest VM name, disk id, node id or tag.
pub const MAX_NAME_LEN: usize = 64;

/// Why `name` is not a valid VM name, disk id, node id or tag, or `None` if it is.
pub fn name_problem(name: &str) -> Option<String> {
    let mut chars = name.chars();
    let Some(first) = chars.next() else {
        return Some("it is empty".to_owned());
    };
    if name.len() > MAX_NAME_LEN {
        return Some(format!("it is longer than {MAX_NAME_LEN} characters"));
    }
    if !first.is_ascii_alphanumeric() {
        return Some(format!("it must start with a letter or digit, not {first:?}"));
    }
    if let Some(bad) = chars.find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
        return Some(format!(
            "{bad:?} is not allowed (only letters, digits, '.', '_' and '-')"
        ));
    }
    None
}

/// Checks a VM name, disk id, node id or tag; `what` names it in the error ("VM name", "tag" …).
pub fn check_name(what: &'static str, name: &str) -> Result<()> {
    match name_problem(name) {
        None => Ok(()),
        Some(reason) => Err(Error::InvalidName {
            what,
            name: name.to_owned(),
            reason,
        }),
    }
}

/// The id of a backup node: a valid name (see [`check_name`]), normally a zero-padded sequence number such as
/// `0003`.
///
/// Constructors validate. Deserialising does *not* (so that a bad id in a manifest is reported by
/// [`Manifest::validate`](crate::Manifest::validate) with the field it is in, rather than as a parse error):
/// validate what you deserialise yourself with [`NodeId::check`].
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct NodeId(String);

impl NodeId {
    /// A node id from a string, validated.
    pub fn new(id: impl Into<String>) -> Result<NodeId> {
        let id = NodeId(id.into());
        id.check()?;
        Ok(id)
    }

    /// The id for sequence number `seq`: at least four digits, zero-padded.
    pub fn from_seq(seq: u64) -> NodeId {
        NodeId(format!("{seq:04}"))
    }

    /// The sequence number, if this id is one (all digits).
    pub fn seq(&self) -> Option<u64> {
        if self.0.bytes().all(|b| b.is_ascii_digit()) {
            self.0.parse().ok()
        } else {
            None
        }
    }

    /// Checks the id (needed only for one that was deserialised).
    pub fn check(&self) -> Result<()> {
        check_name("node id", &self.0)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for NodeId {
    type Err = Error;
    fn from_str(s: &str) -> Result<NodeId> {
        NodeId::new(s)
    }
}

impl AsRef<str> for NodeId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl PartialEq<str> for NodeId {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for NodeId {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

/// The longest component of a [`RelPath`].
pub const MAX_COMPONENT_LEN: usize = 255;

/// A relative path inside a VM directory, `/`-separated: not empty, not absolute, every component a plain
/// file name (`[A-Za-z0-9][A-Za-z0-9._-]*`), so never `.`, `..`, empty or hidden.
///
/// It cannot name anything outside the VM directory by itself; symlinks on disk are checked by
/// [`VmStore::resolve`](crate::VmStore::resolve). Like [`NodeId`], deserialising does not validate.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RelPath(String);

/// Why `path` is not a valid [`RelPath`], or `None` if it is.
pub fn rel_path_problem(path: &str) -> Option<String> {
    if path.is_empty() {
        return Some("it is empty".to_owned());
    }
    if path.starts_with('/') {
        return Some("it is absolute; paths in a manifest are relative to the VM directory".to_owned());
    }
    for component in path.split('/') {
        if component.is_empty() {
            return Some("it has an empty component (`//` or a trailing `/`)".to_owned());
        }
        if component == ".." {
            return Some("it contains `..`".to_owned());
        }
        if component == "." {
            return Some("it contains `.`".to_owned());
        }
        if component.len() > MAX_COMPONENT_LEN {
            return Some(format!(
                "component {component:?} is longer than {MAX_COMPONENT_LEN} bytes"
            ));
        }
        let mut chars = component.chars();
        if chars.next().is_some_and(|c| !c.is_ascii_alphanumeric()) {
            return Some(format!(
                "component {component:?} must start with a letter or digit"
            ));
        }
        if let Some(bad) = chars.find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
            return Some(format!(
                "component {component:?} contains {bad:?} (only letters, digits, '.', '_', '-')"
            ));
        }
    }
    None
}

impl RelPath {
    /// A relative path from a string, validated.
    pub fn new(path: impl Into<String>) -> Result<RelPath> {
        let path = RelPath(path.into());
        path.check()?;
        Ok(path)
    }

    /// `NODE/DISK.qcow2`, where a node keeps its backup of disk `disk`.
    pub fn disk_image(node: &NodeId, disk: &str) -> Result<RelPath> {
        check_name("disk id", disk)?;
        RelPath::new(format!("{node}/{disk}.qcow2"))
    }

    /// `NODE/DISK.table`, the checking table of a node's disk.
    pub fn disk_table(node: &NodeId, disk: &str) -> Result<RelPath> {
        check_name("disk id", disk)?;
        RelPath::new(format!("{node}/{disk}.table"))
    }

    /// Checks the path (needed only for one that was deserialised).
    pub fn check(&self) -> Result<()> {
        match rel_path_problem(&self.0) {
            None => Ok(()),
            Some(reason) => Err(Error::InvalidPath {
                path: self.0.clone(),
                reason,
            }),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn as_path(&self) -> &Path {
        Path::new(&self.0)
    }
}

impl fmt::Display for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for RelPath {
    type Err = Error;
    fn from_str(s: &str) -> Result<RelPath> {
        RelPath::new(s)
    }
}

impl AsRef<Path> for RelPath {
    fn as_ref(&self) -> &Path {
        self.as_path()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_pattern() {
        for good in ["a", "vm1", "0001", "disk-0.main_x", &"x".repeat(64)] {
            assert!(name_problem(good).is_none(), "{good}");
        }
        for bad in [
            "",
            ".",
            "..",
            "-a",
            ".hidden",
            "a/b",
            "a b",
            "é",
            &"x".repeat(65),
            "a\0",
        ] {
            assert!(name_problem(bad).is_some(), "{bad:?}");
        }
        let err = check_name("VM name", "../etc").unwrap_err();
        assert!(matches!(err, Error::InvalidName { what: "VM name", .. }));
        assert!(err.to_string().contains("../etc"), "{err}");
    }

    #[test]
    fn node_ids_from_sequence() {
        assert_eq!(NodeId::from_seq(3).as_str(), "0003");
        assert_eq!(NodeId::from_seq(12345).as_str(), "12345");
        assert_eq!(NodeId::from_seq(7).seq(), Some(7));
        assert_eq!(NodeId::new("tagged").unwrap().seq(), None);
        assert!("a/b".parse::<NodeId>().is_err());
    }

    #[test]
    fn relative_paths_stay_inside() {
        for good in ["0001/disk0.qcow2", "a", "a/b/c"] {
            assert!(RelPath::new(good).is_ok(), "{good}");
        }
        for (bad, why) in [
            ("", "empty"),
            ("/etc/passwd", "absolute"),
            ("a/../b", ".."),
            ("..", ".."),
            ("a//b", "empty component"),
            ("a/", "empty component"),
            ("./a", "`.`"),
            ("a/.hidden", "must start"),
            ("a/b c", "contains ' '"),
        ] {
            let err = RelPath::new(bad).unwrap_err();
            assert!(err.to_string().contains(why), "{bad:?}: {err}");
        }
        let node = NodeId::from_seq(2);
        assert_eq!(
            RelPath::disk_image(&node, "disk0").unwrap().as_str(),
            "0002/disk0.qcow2"
        );
        assert_eq!(
            RelPath::disk_table(&node, "disk0").unwrap().as_str(),
            "0002/disk0.table"
        );
        assert!(RelPath::disk_image(&node, "../x").is_err());
    }
}
