//! Replies about QEMU itself: its version (also in the greeting) and the VM's run state.
//!
//! The greeting is the first line QEMU sends on a QMP socket; `Qmp::greeting` keeps it.

use serde::{Deserialize, Serialize};

use super::enums::RunState;

/// QEMU's version triple (`VersionTriple`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct VersionTriple {
    pub major: u32,
    pub minor: u32,
    pub micro: u32,
}

/// The reply to `query-version`, also in the greeting (`VersionInfo`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionInfo {
    pub qemu: VersionTriple,
    /// The distribution's package version, often empty.
    #[serde(default)]
    pub package: String,
}

impl std::fmt::Display for VersionInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let VersionTriple { major, minor, micro } = self.qemu;
        write!(f, "{major}.{minor}.{micro}")?;
        if !self.package.trim().is_empty() {
            write!(f, " ({})", self.package.trim())?;
        }
        Ok(())
    }
}

/// The greeting QEMU sends when a client connects: `{"QMP": {"version": …, "capabilities": […]}}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Greeting {
    #[serde(default)]
    pub version: VersionInfo,
    /// Optional protocol features offered, e.g. `"oob"`.
    #[serde(default)]
    pub capabilities: Vec<String>,
}

/// The reply to `query-status` (`StatusInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusInfo {
    /// Whether the vCPUs are running.
    pub running: bool,
    pub status: RunState,
}
