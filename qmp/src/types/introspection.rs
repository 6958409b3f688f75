//! The reply to `query-qmp-schema`, kept close to the wire.
//!
//! `schema::Capabilities` indexes these entries; the shape of each meta-type is described in QEMU's
//! `qapi/introspect.json` (`SchemaInfo`).

use serde::{Deserialize, Serialize};

use super::enums::SchemaMetaType;

/// One entity of the introspected schema. QEMU hides most type names behind numbers, but command, event,
/// member and enum value names are real.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SchemaInfo {
    pub name: String,
    #[serde(rename = "meta-type")]
    pub meta_type: SchemaMetaType,
    /// Everything else: `arg-type`, `members`, `variants`, `values`, `element-type`, `features` …
    #[serde(flatten)]
    pub rest: serde_json::Map<String, serde_json::Value>,
}

impl SchemaInfo {
    /// A string field of the entry, e.g. `arg-type`.
    pub fn str_field(&self, key: &str) -> Option<&str> {
        self.rest.get(key).and_then(serde_json::Value::as_str)
    }
}
