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
