//! Typed QMP commands: one struct per command, serialized with QAPI's member names, each naming its reply type.
//!
//! Optional members are `Option` and left out when `None`; unions too large to model (`blockdev-add`'s options,
//! `block-export-add`) take a `serde_json::Value`. `Qmp::execute` sends any `Command`.

mod bitmap;
mod export;
mod job;
mod machine;
mod node;
mod object;
mod query;
mod transaction;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub use bitmap::{
    BitmapRef, BlockDirtyBitmapAdd, BlockDirtyBitmapClear, BlockDirtyBitmapDisable, BlockDirtyBitmapEnable,
    BlockDirtyBitmapMerge, BlockDirtyBitmapRemove,
};
pub use export::{BlockExportAdd, BlockExportDel, NbdServerStart, NbdServerStop, QueryBlockExports};
pub use job::{
    BlockCommit, BlockJobSetSpeed, BlockStream, BlockdevBackup, BlockdevMirror, JobCancel, JobComplete,
    JobDismiss, JobFinalize, JobResume,
};
pub use machine::{Cont, HumanMonitorCommand, Quit, Stop, SystemPowerdown};
pub use node::{BlockdevAdd, BlockdevCreate, BlockdevDel, BlockdevReopen, BlockdevSnapshot};
pub use object::{
    ObjectAddSecret, ObjectAddTlsCredsX509, ObjectDel, ObjectPropertyInfo, QomGet, QomList, QomSet,
};
pub use query::{
    QueryBlock, QueryBlockJobs, QueryJobs, QueryNamedBlockNodes, QueryQmpSchema, QueryStatus, QueryVersion,
    XDebugQueryBlockGraph,
};
pub use transaction::{Transaction, TransactionAction, TransactionProperties};

/// A QMP command: its wire name, its arguments (the serialized value, an object or unit) and its reply.
pub trait Command: Serialize {
    /// The command name, e.g. `"query-block"`.
    const NAME: &'static str;
    /// What `return` holds.
    type Response: DeserializeOwned;
}

/// The reply of commands that return `{}`, and the data of a transaction's `abort` action. Accepts any reply,
/// so a QEMU that starts returning something more does not break the command; serializes as `{}`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Empty;

impl Serialize for Empty {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        serializer.serialize_map(Some(0))?.end()
    }
}

impl<'de> Deserialize<'de> for Empty {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        serde::de::IgnoredAny::deserialize(deserializer)?;
        Ok(Empty)
    }
}

/// Implements `Command` for a struct.
macro_rules! command {
    ($ty:ty, $name:literal, $response:ty) => {
        impl $crate::commands::Command for $ty {
            const NAME: &'static str = $name;
            type Response = $response;
        }
    };
}

use command;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_is_an_empty_object_and_accepts_anything() {
        assert_eq!(serde_json::to_string(&Empty).unwrap(), "{}");
        for reply in ["{}", "{\"new\": 1}", "null", "[]"] {
            assert_eq!(serde_json::from_str::<Empty>(reply).unwrap(), Empty);
        }
    }
}
