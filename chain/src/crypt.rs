//! The keys of an encrypted repository, derived from the one key the user holds. The repository's settings
//! record how (`Encryption`: a random salt and a verifier), never the key: HKDF-SHA256 over the user's key and
//! the salt gives three independent keys, one for the LUKS passphrase of every node file, one for the keyed
//! checking tables (HMAC-SHA256), and the verifier that says whether a key is the right one.
//!
//! A checking table of an encrypted repository holds, per block, HMAC(table key, block index ‖ sha256 of the
//! block) instead of the sha256: without the key it says nothing about the content, not even which blocks are
//! zero or equal to one another.

use hkdf::Hkdf;
use hmac::{Hmac, Mac as _};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::error::{Error, Result};
use crate::table::{Digest, Table};

/// The node files' encryption format: a LUKS header inside each qcow2 (`encrypt.format=luks`).
pub const FORMAT_LUKS: &str = "luks";
/// How the keys are derived from the user's key.
pub const KDF_HKDF_SHA256: &str = "hkdf-sha256";

const INFO_VERIFIER: &[u8] = b"qmpbak v1 key verifier";
const INFO_LUKS: &[u8] = b"qmpbak v1 luks passphrase";
const INFO_TABLE: &[u8] = b"qmpbak v1 checking table key";

/// How an encrypted repository is encrypted and how a key is checked (in `qmpbak-repo.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Encryption {
    /// `luks`.
    pub format: String,
    /// `hkdf-sha256`.
    pub kdf: String,
    /// 32 random bytes, hex.
    pub salt: String,
    /// HKDF output under its own label, hex: equal only for the right key, and reveals nothing of it.
    pub verifier: String,
}

impl Encryption {
    /// A new encryption record for `key` with a fresh random salt.
    pub fn new(key: &[u8]) -> Result<Encryption> {
        let mut salt = [0u8; 32];
        getrandom(&mut salt)?;
        let verifier = derive(key, &salt, INFO_VERIFIER);
        Ok(Encryption {
            format: FORMAT_LUKS.to_owned(),
            kdf: KDF_HKDF_SHA256.to_owned(),
            salt: hex::encode(salt),
            verifier: hex::encode(verifier),
        })
    }

    /// Checks the record's own fields ([`Error::EncryptionUnsupported`]).
    pub fn check(&self) -> Result<()> {
        let salt_ok = hex::decode(&self.salt).is_ok_and(|s| s.len() == 32);
        let verifier_ok = hex::decode(&self.verifier).is_ok_and(|v| v.len() == 32);
        if self.format != FORMAT_LUKS || self.kdf != KDF_HKDF_SHA256 || !salt_ok || !verifier_ok {
            return Err(Error::EncryptionUnsupported {
                detail: format!(
                    "format {:?}, kdf {:?} (this qmpbak knows {FORMAT_LUKS:?} with {KDF_HKDF_SHA256:?} and a \
                     32-byte salt and verifier)",
                    self.format, self.kdf
                ),
            });
        }
        Ok(())
    }

    /// The repository's keys from the user's `key`, or [`Error::WrongKey`] when the verifier does not match.
    pub fn unlock(&self, key: &[u8]) -> Result<RepoKeys> {
        self.check()?;
        let salt = hex::decode(&self.salt).map_err(|e| Error::EncryptionUnsupported {
            detail: e.to_string(),
        })?;
        let expected = hex::decode(&self.verifier).map_err(|e| Error::EncryptionUnsupported {
            detail: e.to_string(),
        })?;
        // Not a secret comparison: the verifier is in the settings file for anyone who can read it.
        if derive(key, &salt, INFO_VERIFIER).as_slice() != expected.as_slice() {
            return Err(Error::WrongKey);
        }
        Ok(RepoKeys {
            luks: hex::encode(derive(key, &salt, INFO_LUKS)),
            table: TableKey(derive(key, &salt, INFO_TABLE)),
        })
    }
}

/// The keys of an unlocked repository.
#[derive(Clone)]
pub struct RepoKeys {
    luks: String,
    table: TableKey,
}

impl std::fmt::Debug for RepoKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RepoKeys(..)")
    }
}

impl RepoKeys {
    /// The LUKS passphrase of every node file (64 hex digits), for QEMU's `secret` object.
    pub fn luks_passphrase(&self) -> &str {
        &self.luks
    }

    pub fn table_key(&self) -> &TableKey {
        &self.table
    }
}

/// The key of keyed checking tables.
#[derive(Clone)]
pub struct TableKey([u8; 32]);

impl std::fmt::Debug for TableKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TableKey(..)")
    }
}

impl TableKey {
    /// The keyed check value of block `index` whose plain digest is `digest`.
    pub fn seal(&self, index: u64, digest: &Digest) -> Digest {
        // HMAC takes a key of any length: this cannot fail.
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(&self.0) else {
            unreachable!("HMAC accepts keys of any length")
        };
        mac.update(&index.to_le_bytes());
        mac.update(digest);
        mac.finalize().into_bytes().into()
    }

    /// `table` (plain digests) with every digest keyed; the scheme stays.
    pub fn seal_table(&self, table: &Table) -> Result<Table> {
        let digests = table
            .digests()
            .enumerate()
            .map(|(i, d)| self.seal(i as u64, d))
            .collect();
        Table::from_digests_keyed(table.scheme(), table.block_size(), table.virtual_size(), digests)
    }

    /// Keys `(index, digest)` pairs, as [`Table::build_blocks`] returns them.
    pub fn seal_blocks(&self, blocks: &[(u64, Digest)]) -> Vec<(u64, Digest)> {
        blocks.iter().map(|(i, d)| (*i, self.seal(*i, d))).collect()
    }
}

/// `table` (plain digests) as the repository stores it: keyed with `key` in an encrypted repository, as it is
/// otherwise.
pub fn sealed(key: Option<&TableKey>, table: Table) -> Result<Table> {
    match key {
        Some(key) => key.seal_table(&table),
        None => Ok(table),
    }
}

/// `(index, plain digest)` pairs, as [`Table::build_blocks`] returns them, as the repository stores them: keyed
/// with `key` in an encrypted repository, as they are otherwise.
pub fn sealed_blocks(key: Option<&TableKey>, blocks: Vec<(u64, Digest)>) -> Vec<(u64, Digest)> {
    match key {
        Some(key) => key.seal_blocks(&blocks),
        None => blocks,
    }
}

fn derive(key: &[u8], salt: &[u8], info: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    // 32 bytes is far below HKDF-SHA256's limit of 255 * 32: this cannot fail.
    let Ok(()) = Hkdf::<Sha256>::new(Some(salt), key).expand(info, &mut out) else {
        unreachable!("HKDF-SHA256 expands to 32 bytes")
    };
    out
}

fn getrandom(buf: &mut [u8]) -> Result<()> {
    use std::io::Read as _;
    let path = std::path::Path::new("/dev/urandom");
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(buf))
        .map_err(Error::io("read", path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_right_key_unlocks_and_a_wrong_one_does_not() {
        let enc = Encryption::new(b"the key").unwrap();
        let keys = enc.unlock(b"the key").unwrap();
        assert_eq!(keys.luks_passphrase().len(), 64);
        assert!(matches!(enc.unlock(b"the kex"), Err(Error::WrongKey)));
        // The record holds neither the key nor a key derived for use.
        let json = serde_json::to_string(&enc).unwrap();
        assert!(!json.contains(keys.luks_passphrase()));
        assert!(!json.contains(&hex::encode(b"the key")));
    }

    #[test]
    fn keyed_digests_depend_on_key_and_position() {
        let a = Encryption::new(b"k").unwrap().unlock(b"k").unwrap();
        let b = Encryption::new(b"k").unwrap().unlock(b"k").unwrap();
        let zero = crate::table::Scheme::default().zero_digest(4096);
        let ta = a.table_key();
        assert_ne!(ta.seal(0, &zero), zero);
        assert_ne!(ta.seal(0, &zero), ta.seal(1, &zero));
        // Another repository (another salt) keys the same block differently.
        assert_ne!(ta.seal(0, &zero), b.table_key().seal(0, &zero));
    }

    #[test]
    fn a_keyed_table_says_so_in_its_file_and_hides_its_zero_blocks() {
        let keys = Encryption::new(b"k").unwrap().unlock(b"k").unwrap();
        let plain = Table::zeroed(crate::table::Scheme::default(), 64 << 10, 3 * (64 << 10)).unwrap();
        assert!(plain.is_zero(0));
        let keyed = keys.table_key().seal_table(&plain).unwrap();
        assert!(keyed.is_keyed() && !keyed.is_zero(0));
        assert_ne!(keyed.digest(0), keyed.digest(1));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.table");
        keyed.save(&path).unwrap();
        let loaded = Table::load(&path).unwrap();
        assert_eq!(loaded, keyed);
        assert!(loaded.is_keyed());
    }

    #[test]
    fn sealed_keys_only_with_a_key() {
        let keys = Encryption::new(b"k").unwrap().unlock(b"k").unwrap();
        let key = keys.table_key();
        let plain = Table::zeroed(crate::table::Scheme::default(), 64 << 10, 3 * (64 << 10)).unwrap();
        assert_eq!(sealed(None, plain.clone()).unwrap(), plain);
        assert_eq!(
            sealed(Some(key), plain.clone()).unwrap(),
            key.seal_table(&plain).unwrap()
        );
        let blocks: Vec<(u64, Digest)> = (0..3).map(|i| (i, [i as u8; 32])).collect();
        assert_eq!(sealed_blocks(None, blocks.clone()), blocks);
        assert_eq!(sealed_blocks(Some(key), blocks.clone()), key.seal_blocks(&blocks));
        assert_ne!(sealed_blocks(Some(key), blocks.clone()), blocks);
    }
}
