//! Fixtures for tests that boot real QEMU: [`TestVm`] owns a `qemu-system-x86_64` process with qcow2 disks in a
//! temporary directory and kills it on drop; [`image`] wraps `qemu-img`; [`cli`] runs the `qmpbak` binary.
//! Every wait is bounded by one of the named timeouts in [`timeouts`].

pub mod cli;
pub mod guest;
pub mod image;
pub mod mounts;
pub mod pki;
pub mod qemu;
pub mod repo;
pub mod timeouts;
pub mod vm;

pub use vm::{Device, DiskSpec, TestVm, TestVmBuilder};

/// One mebibyte, for readable disk sizes and offsets in tests.
pub const MIB: u64 = 1024 * 1024;
