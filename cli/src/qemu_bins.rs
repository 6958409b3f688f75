//! Which QEMU programs qmpbak runs itself (`qemu-img`, `qemu-storage-daemon`): from `PATH`, or from an unpacked
//! QEMU tree named by `QMPBAK_QEMU_PREFIX` (`DIR/usr/bin/...`), the same setting the test suite uses.

use std::path::PathBuf;

/// Paths of the QEMU helper programs.
#[derive(Debug, Clone)]
pub struct QemuBins {
    pub img: PathBuf,
    pub storage_daemon: PathBuf,
}

impl QemuBins {
    pub fn from_env() -> QemuBins {
        match std::env::var_os("QMPBAK_QEMU_PREFIX") {
            Some(prefix) if !prefix.is_empty() => {
                let bin = PathBuf::from(prefix).join("usr/bin");
                QemuBins {
                    img: bin.join("qemu-img"),
                    storage_daemon: bin.join("qemu-storage-daemon"),
                }
            }
            _ => QemuBins {
                img: "qemu-img".into(),
                storage_daemon: "qemu-storage-daemon".into(),
            },
        }
    }
}
