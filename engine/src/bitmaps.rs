//! Names of qmpbak's dirty bitmaps, and what a bitmap's state means for the next backup. A bitmap's name says
//! which chain, which disk and which backup node it is relative to, so its meaning can be checked against the
//! manifest: `qmpbak-<chain id>-<disk key>-inc-<node>` records every write to the disk with that key
//! ([`chain::DiskIdentity::key`]) since backup `<node>`, `qmpbak-<chain id>-<disk key>-diff-<full>` every write
//! since the full backup `<full>`. A persistent bitmap is stored in the disk's image, so a bitmap that names
//! the disk's key proves the image is that disk. Names without a disk key (`qmpbak-<chain id>-inc-<node>`,
//! from older versions) are recognised as the chain's but prove nothing about the disk.

use std::fmt;

/// What a qmpbak bitmap is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Changes since one node: the base of the next incremental.
    Incremental,
    /// Changes since a full: the base of a differential; only a new full replaces it.
    Differential,
}

/// A parsed qmpbak bitmap name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapName {
    pub chain_id: String,
    /// The key of the disk the bitmap was made on; `None` in the names of older versions.
    pub disk_key: Option<String>,
    pub role: Role,
    pub node: String,
}

impl BitmapName {
    pub fn incremental(chain_id: &str, disk_key: &str, node: &str) -> BitmapName {
        BitmapName {
            chain_id: chain_id.to_owned(),
            disk_key: Some(disk_key.to_owned()),
            role: Role::Incremental,
            node: node.to_owned(),
        }
    }

    pub fn differential(chain_id: &str, disk_key: &str, full: &str) -> BitmapName {
        BitmapName {
            chain_id: chain_id.to_owned(),
            disk_key: Some(disk_key.to_owned()),
            role: Role::Differential,
            node: full.to_owned(),
        }
    }

    /// Parses a bitmap name; `None` for bitmaps that are not qmpbak's (they are never touched).
    pub fn parse(name: &str) -> Option<BitmapName> {
        let rest = name.strip_prefix("qmpbak-")?;
        let (chain_id, rest) = rest.split_once('-')?;
        let (disk_key, rest) = if rest.starts_with("inc-") || rest.starts_with("diff-") {
            (None, rest)
        } else {
            let (key, rest) = rest.split_once('-')?;
            if key.is_empty() {
                return None;
            }
            (Some(key.to_owned()), rest)
        };
        let (role, node) = if let Some(node) = rest.strip_prefix("inc-") {
            (Role::Incremental, node)
        } else if let Some(node) = rest.strip_prefix("diff-") {
            (Role::Differential, node)
        } else {
            return None;
        };
        if chain_id.is_empty() || node.is_empty() {
            return None;
        }
        Some(BitmapName {
            chain_id: chain_id.to_owned(),
            disk_key,
            role,
            node: node.to_owned(),
        })
    }
}

impl fmt::Display for BitmapName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let role = match self.role {
            Role::Incremental => "inc",
            Role::Differential => "diff",
        };
        match &self.disk_key {
            Some(key) => write!(f, "qmpbak-{}-{key}-{role}-{}", self.chain_id, self.node),
            None => write!(f, "qmpbak-{}-{role}-{}", self.chain_id, self.node),
        }
    }
}

/// The state of one expected bitmap on one disk, as QEMU reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BitmapState {
    /// Present, persistent, recording, not in use: usable for a backup.
    Usable,
    /// Not there (QEMU restarted without it, or it was deleted).
    Missing,
    /// Marked inconsistent: QEMU was not shut down cleanly while it was stored.
    Inconsistent,
    /// In use by another operation (a leftover job).
    Busy,
    /// Present but not recording writes.
    Disabled,
    /// Not there under this disk's key, but a bitmap relative to the same node is, named without a key (by an
    /// older qmpbak) or with another disk's: it cannot prove it belongs to this disk.
    Unproven,
}

impl BitmapState {
    /// Why this state keeps the bitmap from being used, for the user.
    pub fn problem(self) -> Option<&'static str> {
        match self {
            BitmapState::Usable => None,
            BitmapState::Missing => Some("is missing (QEMU restarted or the bitmap was removed)"),
            BitmapState::Inconsistent => Some("is inconsistent (QEMU stopped uncleanly)"),
            BitmapState::Busy => Some("is busy (in use by another job)"),
            BitmapState::Disabled => Some("is not recording"),
            BitmapState::Unproven => Some(
                "is missing under this disk's key; a bitmap relative to the same node is named for no disk or \
                 for another, so it cannot prove it belongs to this one",
            ),
        }
    }

    /// Classifies a bitmap from QEMU's report of it.
    pub fn from_report(recording: bool, busy: bool, inconsistent: bool) -> BitmapState {
        if inconsistent {
            BitmapState::Inconsistent
        } else if busy {
            BitmapState::Busy
        } else if !recording {
            BitmapState::Disabled
        } else {
            BitmapState::Usable
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for name in [
            BitmapName::incremental("a1b2c3d4", "0badf00d", "0007"),
            BitmapName::differential("a1b2c3d4", "0badf00d", "0001"),
        ] {
            assert_eq!(BitmapName::parse(&name.to_string()), Some(name));
        }
        assert_eq!(
            BitmapName::incremental("c", "k", "0002").to_string(),
            "qmpbak-c-k-inc-0002"
        );
    }

    #[test]
    fn names_of_older_versions_are_ours_without_a_disk_key() {
        assert_eq!(
            BitmapName::parse("qmpbak-a1b2c3d4-inc-0002"),
            Some(BitmapName {
                chain_id: "a1b2c3d4".into(),
                disk_key: None,
                role: Role::Incremental,
                node: "0002".into(),
            })
        );
        let diff = BitmapName::parse("qmpbak-a1b2c3d4-diff-0001").unwrap();
        assert_eq!((diff.disk_key, diff.role), (None, Role::Differential));
    }

    #[test]
    fn foreign_names_are_not_ours() {
        for name in [
            "bitmap0",
            "qmpbak-",
            "qmpbak-abc",
            "qmpbak-abc-full-1",
            "qmpbak-abc-inc-",
            "qmpbak--inc-1",
            "qmpbak-abc--inc-1",
            "qmpbak-abc-key-full-1",
        ] {
            assert_eq!(BitmapName::parse(name), None, "{name}");
        }
    }

    #[test]
    fn state_from_report() {
        assert_eq!(BitmapState::from_report(true, false, false), BitmapState::Usable);
        assert_eq!(
            BitmapState::from_report(true, true, true),
            BitmapState::Inconsistent
        );
        assert_eq!(BitmapState::from_report(true, true, false), BitmapState::Busy);
        assert_eq!(
            BitmapState::from_report(false, false, false),
            BitmapState::Disabled
        );
    }
}
