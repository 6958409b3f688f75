//! Names that become file names: VM names, disk ids, node ids and tags (`[A-Za-z0-9][A-Za-z0-9._-]{0,63}`), and
//! [`RelPath`], a path inside a VM directory that cannot climb out of it. The types and their pure checks are in
//! [`crate::ids`] (re-exported here); this module adds the constructors and checks that return an [`Error`].

use std::str::FromStr;

pub use crate::ids::{MAX_COMPONENT_LEN, MAX_NAME_LEN, NodeId, RelPath, name_problem, rel_path_problem};

use crate::error::{Error, Result};

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

impl NodeId {
    /// A node id from a string, validated.
    pub fn new(id: impl Into<String>) -> Result<NodeId> {
        let id = NodeId(id.into());
        id.check()?;
        Ok(id)
    }

    /// Checks the id (needed only for one that was deserialised).
    pub fn check(&self) -> Result<()> {
        check_name("node id", &self.0)
    }
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
}

impl FromStr for NodeId {
    type Err = Error;
    fn from_str(s: &str) -> Result<NodeId> {
        NodeId::new(s)
    }
}

impl FromStr for RelPath {
    type Err = Error;
    fn from_str(s: &str) -> Result<RelPath> {
        RelPath::new(s)
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
