//! Building a backup node's recovery chain as a blockdev graph inside a QEMU (the VM or a
//! qemu-storage-daemon): one read-only qcow2 node per layer, full at the bottom, each with an explicit `backing`
//! reference to the layer below. The chain comes from the manifest (lid/tid), never from the backing-file names
//! in the qcow2 headers, so a moved or copied repository works the same.

use std::path::PathBuf;

use anyhow::{Context, Result, anyhow};
use serde_json::json;

use chain::{Manifest, NodeId, VmStore};

/// Block node names are limited to 31 characters by QEMU.
pub const MAX_NODE_NAME: usize = 31;

/// A short QEMU block node or job name (QEMU limits node names to 31 characters), unique per chain, purpose,
/// backup node and disk: `qb<4 chars of the chain id><what><node>-<disk index>`.
pub fn short_name(chain_id: &str, what: &str, node: &str, disk: usize) -> String {
    format!("{}{what}{node}-{disk}", chain_prefix(chain_id))
}

/// What every [`short_name`] of a chain begins with: `qb<4 chars of the chain id>`.
pub fn chain_prefix(chain_id: &str) -> String {
    let chain: String = chain_id.chars().take(4).collect();
    format!("qb{chain}")
}

/// A chain added to a QEMU: its block node names, bottom (the full) first.
#[derive(Debug, Clone, Default)]
pub struct ChainGraph {
    pub layers: Vec<String>,
}

impl ChainGraph {
    /// The node a reader or an overlay should use: the newest layer.
    pub fn top(&self) -> Option<&str> {
        self.layers.last().map(String::as_str)
    }
}

/// The qcow2 blockdev-add options for one backup file.
pub fn qcow2_options(
    node_name: &str,
    path: &std::path::Path,
    backing: Option<&str>,
    read_only: bool,
) -> serde_json::Value {
    json!({
        "driver": "qcow2",
        "node-name": node_name,
        "read-only": read_only,
        "file": { "driver": "file", "filename": path, "read-only": read_only },
        "backing": backing.map_or(serde_json::Value::Null, |b| json!(b)),
    })
}

/// The layers of `node`'s recovery chain for `disk`, bottom first: from the newest self-contained layer (a
/// full, or a flattened copy; nothing below it is read) up to `node`, each with its file. A file QEMU must not
/// open ([`crate::nodes::header_problem`]: one that names an external data file) makes the chain damaged
/// (exit 6) before any program opens it.
pub fn chain_layers(
    vm: &VmStore,
    manifest: &Manifest,
    node: &NodeId,
    disk: &str,
) -> Result<Vec<(NodeId, PathBuf)>> {
    let chain = manifest.recovery_chain(node)?;
    let start = chain
        .iter()
        .rposition(|n| n.disks.iter().any(|d| d.disk == disk && d.backing.is_none()))
        .unwrap_or(0);
    chain[start..]
        .iter()
        .map(|layer| {
            let file = layer.disks.iter().find(|d| d.disk == disk).ok_or_else(|| {
                anyhow!(
                    "node {} of the recovery chain of {node} has no disk {disk}",
                    layer.id
                )
            })?;
            let path = vm.resolve(&file.file)?;
            if let Some(why) = crate::nodes::header_problem(&path) {
                return Err(crate::restore::chain_damaged(layer, disk, &why));
            }
            Ok((layer.id.clone(), path))
        })
        .collect()
}

/// Adds the recovery chain of `node` for disk `disk` to the QEMU behind `qmp` ([`chain_layers`]), with names
/// `{prefix}{layer}`. On failure the layers added so far are removed again.
pub async fn add_chain(
    qmp: &qmp::Qmp,
    vm: &VmStore,
    manifest: &Manifest,
    node: &NodeId,
    disk: &str,
    prefix: &str,
) -> Result<ChainGraph> {
    let layers = chain_layers(vm, manifest, node, disk)?;
    let first = manifest.recovery_chain(node)?.len() - layers.len();
    let mut graph = ChainGraph::default();
    for (i, (id, path)) in layers.iter().enumerate() {
        let name = format!("{prefix}{}", first + i);
        debug_assert!(name.len() <= MAX_NODE_NAME, "block node name {name} too long");
        let mut options = qcow2_options(&name, path, graph.top(), true);
        crate::crypt::unlock::encrypt_node(&mut options);
        let added = qmp
            .execute(&qmp::commands::BlockdevAdd(options))
            .await
            .with_context(|| format!("opening {} (node {id}, disk {disk}) in QEMU", path.display()));
        if let Err(e) = added {
            remove_chain(qmp, &graph).await;
            return Err(e);
        }
        graph.layers.push(name);
    }
    Ok(graph)
}

/// Removes a chain added by [`add_chain`], newest layer first. Errors are ignored: this runs on cleanup paths
/// where a layer may already be gone.
pub async fn remove_chain(qmp: &qmp::Qmp, graph: &ChainGraph) {
    for name in graph.layers.iter().rev() {
        let _ = qmp.execute(&qmp::commands::BlockdevDel::new(name.as_str())).await;
    }
}

/// The node a qmpbak overlay's writes start from, read from its file name.
pub fn overlay_base(path: &std::path::Path, chain_id: &str) -> Option<String> {
    let name = path.file_name()?.to_str()?;
    let rest = &name[name.find(&format!(".qmpbak-{chain_id}-"))? + 9 + chain_id.len()..];
    let node = rest.split('.').next()?;
    (!node.is_empty()).then(|| node.to_owned())
}

/// Whether `name` is a block node name qmpbak gives an overlay of chain `chain_id` ([`short_name`]: a
/// snapshot's `o`, a revert's `a<n>`), so qmpbak added that node and may delete it.
pub fn names_overlay_node(chain_id: &str, name: &str) -> bool {
    let chain: String = chain_id.chars().take(4).collect();
    let Some(rest) = name.strip_prefix(&format!("qb{chain}")) else {
        return false;
    };
    let Some((head, disk)) = rest.rsplit_once('-') else {
        return false;
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    digits(disk)
        && ["o", "a"]
            .iter()
            .any(|w| head.strip_prefix(w).is_some_and(digits))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_node_names_are_recognised_by_chain_and_role() {
        assert!(names_overlay_node(
            "ab12cd34",
            &short_name("ab12cd34", "o", "0003", 1)
        ));
        assert!(names_overlay_node(
            "ab12cd34",
            &short_name("ab12cd34", "a12", "0003", 0)
        ));
        // Another chain's, another role's (a backup target, a fleecing overlay), or the user's.
        assert!(!names_overlay_node(
            "ffff0000",
            &short_name("ab12cd34", "o", "0003", 1)
        ));
        assert!(!names_overlay_node(
            "ab12cd34",
            &short_name("ab12cd34", "t", "0003", 1)
        ));
        assert!(!names_overlay_node(
            "ab12cd34",
            &short_name("ab12cd34", "f", "0003", 1)
        ));
        assert!(!names_overlay_node("ab12cd34", "qbab12-user-disk"));
        assert!(!names_overlay_node("ab12cd34", "node-disk0"));
    }
}
