//! Dirty bitmap commands (`block-dirty-bitmap-*`), usable alone or as transaction actions.

use serde::{Deserialize, Serialize};

use super::{Empty, command};

/// `block-dirty-bitmap-add`: creates a bitmap on a node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockDirtyBitmapAdd {
    pub node: String,
    pub name: String,
    /// Bytes per bit (a power of two); QEMU picks the cluster size when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub granularity: Option<u32>,
    /// Store the bitmap in the qcow2 image when QEMU closes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent: Option<bool>,
    /// Create it disabled (not recording writes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disabled: Option<bool>,
}
command!(BlockDirtyBitmapAdd, "block-dirty-bitmap-add", Empty);

impl BlockDirtyBitmapAdd {
    /// A recording, non-persistent bitmap with QEMU's default granularity.
    pub fn new(node: impl Into<String>, name: impl Into<String>) -> BlockDirtyBitmapAdd {
        BlockDirtyBitmapAdd {
            node: node.into(),
            name: name.into(),
            ..BlockDirtyBitmapAdd::default()
        }
    }
}

/// Declares a `{node, name}` bitmap command.
macro_rules! bitmap_command {
    ($(#[$meta:meta])* $ty:ident, $name:literal) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
        pub struct $ty {
            pub node: String,
            pub name: String,
        }
        command!($ty, $name, Empty);

        impl $ty {
            pub fn new(node: impl Into<String>, name: impl Into<String>) -> $ty {
                $ty { node: node.into(), name: name.into() }
            }
        }
    };
}

bitmap_command!(
    /// `block-dirty-bitmap-remove`: deletes a bitmap (also from the image, if persistent).
    BlockDirtyBitmapRemove,
    "block-dirty-bitmap-remove"
);
bitmap_command!(
    /// `block-dirty-bitmap-clear`: clears every bit.
    BlockDirtyBitmapClear,
    "block-dirty-bitmap-clear"
);
bitmap_command!(
    /// `block-dirty-bitmap-enable`: starts recording writes.
    BlockDirtyBitmapEnable,
    "block-dirty-bitmap-enable"
);
bitmap_command!(
    /// `block-dirty-bitmap-disable`: stops recording writes.
    BlockDirtyBitmapDisable,
    "block-dirty-bitmap-disable"
);

/// A bitmap to merge: by name on the target's node, or on any node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum BitmapRef {
    Name(String),
    Node { node: String, name: String },
}

impl From<&str> for BitmapRef {
    fn from(name: &str) -> BitmapRef {
        BitmapRef::Name(name.to_owned())
    }
}

impl From<String> for BitmapRef {
    fn from(name: String) -> BitmapRef {
        BitmapRef::Name(name)
    }
}

/// `block-dirty-bitmap-merge`: ORs `bitmaps` into `target` (on `node`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockDirtyBitmapMerge {
    pub node: String,
    pub target: String,
    pub bitmaps: Vec<BitmapRef>,
}
command!(BlockDirtyBitmapMerge, "block-dirty-bitmap-merge", Empty);
