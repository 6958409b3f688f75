//! Commands about the VM as a whole: pause, resume, quit, power button, and the HMP escape hatch.

use serde::{Deserialize, Serialize};

use super::{Empty, command};

/// `stop`: pauses the vCPUs (and flushes pending guest I/O).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stop;
command!(Stop, "stop", Empty);

/// `cont`: resumes the vCPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cont;
command!(Cont, "cont", Empty);

/// `quit`: makes QEMU exit at once. It may close the socket before the reply arrives, so `Closed` is as good
/// as `Ok` here.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quit;
command!(Quit, "quit", Empty);

/// `system_powerdown`: presses the ACPI power button.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SystemPowerdown;
command!(SystemPowerdown, "system_powerdown", Empty);

/// `human-monitor-command`: runs an HMP command line and returns its output.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct HumanMonitorCommand {
    pub command_line: String,
}
command!(HumanMonitorCommand, "human-monitor-command", String);

impl HumanMonitorCommand {
    pub fn new(command_line: impl Into<String>) -> HumanMonitorCommand {
        HumanMonitorCommand {
            command_line: command_line.into(),
        }
    }
}
