//! The names that become file names, as plain types with no error type of their own: VM names, disk ids,
//! node ids and tags (`[A-Za-z0-9][A-Za-z0-9._-]{0,63}`), [`NodeId`] and [`RelPath`], and the pure checks that
//! say why a string is not one. Constructors that validate are in [`crate::names`].

use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

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

/// The id of a backup node: a valid name (see [`check_name`](crate::names::check_name)), normally a zero-padded sequence number such as
/// `0003`.
///
/// Constructors validate. Deserialising does *not* (so that a bad id in a manifest is reported by
/// [`Manifest::validate`](crate::Manifest::validate) with the field it is in, rather than as a parse error):
/// validate what you deserialise yourself with [`NodeId::check`].
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct NodeId(pub(crate) String);

impl NodeId {
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

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
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
pub struct RelPath(pub(crate) String);

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

impl AsRef<Path> for RelPath {
    fn as_ref(&self) -> &Path {
        self.as_path()
    }
}
