//! A VM's nodes as the commands use them: finding the node a user names, and the bytes a node's file takes.

use anyhow::{Context, Result, bail};

use chain::{Manifest, Node, NodeState};

use crate::exit::Exit;

/// Finds a node by id or tag; a miss is a usage error listing near matches.
pub fn find_node<'m>(manifest: &'m Manifest, wanted: &str) -> Result<&'m Node> {
    let Some(node) = manifest.find(wanted) else {
        bail!(Exit::usage(crate::render::not_found(manifest, wanted)));
    };
    if node.state != NodeState::Complete {
        bail!(Exit::usage(format!(
            "node {} of VM {} is {:?}, not complete: it cannot be restored",
            node.id, manifest.vm, node.state
        )));
    }
    Ok(node)
}

/// Bytes a file occupies on the host (allocated blocks, not its apparent size): the one helper for it in the
/// CLI, over [`chain::fsio::allocated_bytes`].
pub fn allocated_bytes(path: &std::path::Path) -> Result<u64> {
    chain::fsio::allocated_bytes(path).with_context(|| format!("reading {}", path.display()))
}

/// Why the node file at `path` must not be handed to QEMU, if it must not: it is not a regular file (a FIFO or
/// a device would stall or feed the reader), or its qcow2 header names an external data file (incompatible
/// feature bit 2). QEMU opens such a file's data where the header points, outside the repository, for reading
/// and, in a rebase, for writing, and no option of a `json:` description or of `blockdev-add` stops it; qmpbak
/// never writes one. `None` also when the file is missing or too short to tell: opening it reports that.
pub fn header_problem(path: &std::path::Path) -> Option<String> {
    use std::io::Read as _;
    /// qcow2's magic, `QFI\xfb`.
    const MAGIC: [u8; 4] = *b"QFI\xfb";
    /// The version 3 header's `incompatible_features` field: 8 bytes, big-endian, at this offset.
    const INCOMPATIBLE_AT: usize = 72;
    /// The incompatible feature bit of an external data file.
    const EXTERNAL_DATA_FILE: u64 = 1 << 2;
    let mut file = match chain::fsio::open_regular(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => {
            return Some(format!("{} is not a regular file", path.display()));
        }
        Err(_) => return None,
    };
    let mut header = [0u8; INCOMPATIBLE_AT + 8];
    if file.read_exact(&mut header).is_err() || header[..4] != MAGIC {
        return None;
    }
    let version = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
    let mut field = [0u8; 8];
    field.copy_from_slice(&header[INCOMPATIBLE_AT..]);
    (version >= 3 && u64::from_be_bytes(field) & EXTERNAL_DATA_FILE != 0).then(|| {
        format!(
            "{} names an external data file in its qcow2 header, which qmpbak never writes: it was changed \
             outside qmpbak, and is not opened",
            path.display()
        )
    })
}
