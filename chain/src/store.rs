//! Loading and saving a manifest: reading it with every check, reporting the first problem with the file it
//! is in, and the bytes it is written as. The generic file I/O it builds on is [`crate::fsio`], re-exported
//! here for callers that use the old paths.

use std::io;
use std::path::Path;

use serde::Deserialize;

pub use crate::fsio::{
    DIR_MODE, FILE_MODE, create_private_dir, read_optional, remove_stale_temps, sync_dir, sync_files,
    write_atomic, write_atomic_with,
};

use crate::error::{Error, Result};
use crate::manifest::{FORMAT_VERSION, Manifest};

/// serde_json's message without its " at line L column C" tail (we report those as fields).
pub fn serde_detail(err: &serde_json::Error) -> String {
    let text = err.to_string();
    match text.rsplit_once(" at line ") {
        Some((detail, _)) if err.line() > 0 => detail.to_owned(),
        _ => text,
    }
}

/// Just enough of a manifest to decide whether we can read the rest.
#[derive(Deserialize)]
struct VersionProbe {
    format_version: Option<u32>,
}

/// Loads and fully validates the manifest at `path`, which must belong to VM `vm`.
pub fn load_manifest(path: &Path, vm: &str) -> Result<Manifest> {
    let Some(bytes) = read_optional(path)? else {
        return Err(Error::ManifestMissing {
            path: path.to_owned(),
        });
    };
    let syntax = |e: &serde_json::Error| Error::ManifestSyntax {
        path: path.to_owned(),
        line: e.line(),
        column: e.column(),
        detail: serde_detail(e),
    };
    let too_new = |found| Error::ManifestTooNew {
        path: path.to_owned(),
        found,
        supported: FORMAT_VERSION,
    };
    // One pass for a manifest of this format (8 MiB for 10 000 nodes: a version probe first would read it all
    // twice). Anything else is read again, version first, for the error that says what is wrong.
    let manifest: Manifest = match serde_json::from_slice::<Manifest>(&bytes) {
        Ok(manifest) if manifest.format_version == FORMAT_VERSION => manifest,
        parsed => match serde_json::from_slice::<VersionProbe>(&bytes) {
            // Format 1: its operation records are converted ([`crate::v1`]); the rest reads as it is.
            Ok(VersionProbe {
                format_version: Some(1),
            }) => {
                let mut value: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| syntax(&e))?;
                crate::v1::upgrade(&mut value).map_err(|e| syntax(&e))?;
                serde_json::from_value(value).map_err(|e| syntax(&e))?
            }
            // A newer format may not parse as this one: say that rather than which field failed.
            Ok(VersionProbe {
                format_version: Some(found),
            }) if found > FORMAT_VERSION => return Err(too_new(found)),
            _ => parsed.map_err(|e| syntax(&e))?,
        },
    };
    match manifest.format_version {
        found if found > FORMAT_VERSION => return Err(too_new(found)),
        // 0 was never written; 1 was converted above, so a 1 here is a malformed file.
        found if found < FORMAT_VERSION => {
            return Err(Error::ManifestFormatUnknown {
                path: path.to_owned(),
                found,
                supported: FORMAT_VERSION,
            });
        }
        _ => {}
    }
    let invalid = |problem| Error::ManifestInvalid {
        path: path.to_owned(),
        problem,
    };
    if manifest.vm != vm {
        return Err(invalid(crate::ManifestProblem::WrongVm {
            expected: vm.to_owned(),
            found: manifest.vm,
        }));
    }
    manifest.validate().map_err(invalid)?;
    Ok(manifest)
}

/// The manifest as written: pretty JSON and a final newline.
pub fn manifest_bytes(manifest: &Manifest, path: &Path) -> Result<Vec<u8>> {
    let mut bytes = serde_json::to_vec_pretty(manifest).map_err(|e| Error::Io {
        action: "serialise",
        path: path.to_owned(),
        source: io::Error::other(e),
    })?;
    bytes.push(b'\n');
    Ok(bytes)
}
