//! Where the QEMU binaries come from. By default from `PATH`; with `QMPBAK_QEMU_PREFIX=DIR` from an unpacked
//! QEMU tree (`DIR/usr/bin/...`, firmware under `DIR/usr/share/qemu`), so the suite can run against a second
//! QEMU version side by side.

use std::ffi::OsString;
use std::path::PathBuf;

/// The QEMU programs one test run uses, all from the same installation.
#[derive(Debug, Clone)]
pub struct QemuBinaries {
    pub system: PathBuf,
    pub img: PathBuf,
    pub storage_daemon: PathBuf,
    /// Firmware directory to pass with `-L`, when not the system default.
    pub data_dir: Option<PathBuf>,
}

impl QemuBinaries {
    /// Reads `QMPBAK_QEMU_PREFIX`; without it, the binaries on `PATH`.
    pub fn from_env() -> QemuBinaries {
        match std::env::var_os("QMPBAK_QEMU_PREFIX") {
            Some(prefix) if !prefix.is_empty() => {
                let prefix = PathBuf::from(prefix);
                let bin = prefix.join("usr/bin");
                QemuBinaries {
                    system: bin.join("qemu-system-x86_64"),
                    img: bin.join("qemu-img"),
                    storage_daemon: bin.join("qemu-storage-daemon"),
                    data_dir: Some(prefix.join("usr/share/qemu")),
                }
            }
            _ => QemuBinaries {
                system: "qemu-system-x86_64".into(),
                img: "qemu-img".into(),
                storage_daemon: "qemu-storage-daemon".into(),
                data_dir: None,
            },
        }
    }

    /// The firmware to boot with: qboot halts at once when there is nothing to boot, so an idle test VM costs
    /// almost no CPU under TCG, and it boots a `-kernel` quickly. Both QEMUs the suite runs against ship it
    /// (bookworm's 7.2 and backports' 10.0, in `qemu-system-data`).
    pub fn bios(&self) -> PathBuf {
        let dir = self
            .data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("/usr/share/qemu"));
        dir.join("qboot.rom")
    }

    /// `-bios <qboot>`, or nothing (QEMU's default SeaBIOS) for a QEMU tree without qboot.
    pub fn bios_args(&self) -> Vec<OsString> {
        let bios = self.bios();
        if bios.exists() {
            vec!["-bios".into(), bios.into_os_string()]
        } else {
            Vec::new()
        }
    }

    /// `-L <firmware dir>` for a QEMU tree under a prefix; nothing for the system's QEMU.
    pub fn data_dir_args(&self) -> Vec<OsString> {
        self.data_dir
            .iter()
            .flat_map(|d| ["-L".into(), d.clone().into_os_string()])
            .collect()
    }
}
