//! Encryption at rest: finding the VM's encrypted disks, so that their plaintext never lands in a repository
//! that is not encrypted without the user saying so (`--allow-plaintext`); reading the repository key
//! ([`key`]) and handing it to QEMU ([`unlock`]) for encrypted repositories.

pub mod key;
pub mod output;
pub mod unlock;

pub use key::KeySource;
pub use unlock::{KeyGuard, require, unlock};

use crate::exit::Exit;
use crate::inspect::DiskInfo;

/// The ids of the selected disks that QEMU decrypts. Backing them up into a repository that is not encrypted
/// would store in plaintext what the user encrypted: refused (exit 2) unless `allow_plaintext`.
pub fn check_sources(
    disks: &[DiskInfo],
    repo_encrypted: bool,
    allow_plaintext: bool,
) -> Result<Vec<String>, Exit> {
    let encrypted: Vec<String> = disks
        .iter()
        .filter(|d| d.encrypted)
        .map(|d| d.id.clone())
        .collect();
    if encrypted.is_empty() || repo_encrypted {
        return Ok(Vec::new());
    }
    if allow_plaintext {
        return Ok(encrypted);
    }
    Err(Exit::usage(format!(
        "disk {} is encrypted, and this repository is not: the backup would hold its contents in plaintext. \
         Back it up into an encrypted repository (qmpbak init --encrypt --key-file FILE), leave it out with \
         --exclude, or pass --allow-plaintext to store it decrypted anyway",
        encrypted.join(", ")
    )))
}
