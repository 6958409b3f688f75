//! `restore`: bring back any node of a VM's backup tree, offline into new image files ([`offline`]) or live
//! into a running QEMU ([`live`]). Either way the node's recovery chain is rebuilt as a blockdev graph from the
//! manifest (see [`crate::graph`]), and the result is checked against the node's checking tables.

pub mod backing;
mod empty;
pub mod live;
pub mod offline;

use anyhow::{Result, bail};

use chain::Node;

use crate::exit::{Exit, ExitCode};

/// The node's disks to restore: all, or the ones named (each must exist).
pub fn select_disks(node: &Node, only: &[String]) -> Result<Vec<String>> {
    let all: Vec<String> = node.disks.iter().map(|d| d.disk.clone()).collect();
    for id in only {
        if !all.contains(id) {
            bail!(Exit::usage(format!(
                "node {} has no disk {id:?}; its disks are: {}",
                node.id,
                all.join(", ")
            )));
        }
    }
    Ok(all
        .into_iter()
        .filter(|d| only.is_empty() || only.contains(d))
        .collect())
}

/// The blocks of a disk's chain that do not match the node's checking table, numbered in that table's blocks
/// (a chain keeps its full's block size, whatever the repository's settings say now).
#[derive(Debug, Clone, Default)]
pub struct Mismatched {
    pub blocks: Vec<u64>,
    pub block_size: u64,
}

impl Mismatched {
    /// The blocks of `actual` that differ from `expected`, in `expected`'s blocks.
    pub fn between(expected: &chain::Table, actual: &chain::Table) -> Result<Mismatched> {
        Ok(Mismatched {
            blocks: chain::Table::diff(expected, actual)?,
            block_size: expected.block_size(),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }
}

/// A restored image that does not match the node's checking table.
pub fn damaged(node: &Node, disk: &str, mismatched: &Mismatched) -> anyhow::Error {
    let Mismatched { blocks, block_size } = mismatched;
    let shown: Vec<String> = blocks
        .iter()
        .take(8)
        .map(|b| format!("{b} (offset {})", b * block_size))
        .collect();
    let more = if blocks.len() > 8 {
        format!(" and {} more", blocks.len() - 8)
    } else {
        String::new()
    };
    Exit::new(
        ExitCode::Damaged,
        format!(
            "the restored disk {disk} of node {} does not match its checking table in {} block(s): {}{more}; \
             the backup is damaged: run `qmpbak verify` to find the node at fault (--force keeps the result)",
            node.id,
            blocks.len(),
            shown.join(", ")
        ),
    )
    .into()
}

/// When reading a node's chain failed: whether one of its files is missing or is not a qcow2 image QEMU can
/// open, said for the user (`None`: the files look sound, so the failure lies elsewhere: QEMU, NBD, the host).
/// This decides between "the backup is damaged" (exit 6) and any other failure.
pub async fn chain_damage(bins: &crate::qemu_bins::QemuBins, files: &[std::path::PathBuf]) -> Option<String> {
    for file in files {
        match std::fs::symlink_metadata(file) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Some(format!("its file {} is missing", file.display()));
            }
            Ok(meta) if !meta.is_file() => {
                return Some(format!("{} is not a regular file", file.display()));
            }
            _ => {}
        }
        // Before `qemu-img info`, which would open the data file such a header names.
        if let Some(why) = crate::nodes::header_problem(file) {
            return Some(why);
        }
        if let Ok(Err(said)) = bins.qcow2_info(file).await {
            return Some(format!(
                "{} is not a readable qcow2 image ({said})",
                file.display()
            ));
        }
    }
    None
}

/// The "damaged" error (exit 6) for a node whose chain `chain_damage` found broken.
pub fn chain_damaged(node: &Node, disk: &str, why: &str) -> anyhow::Error {
    Exit::new(
        ExitCode::Damaged,
        format!(
            "disk {disk} of node {} cannot be read: {why}; the backup is damaged: run `qmpbak verify` to find \
             every node it breaks",
            node.id
        ),
    )
    .into()
}

/// The virtual size a qcow2 file's header claims (`qemu-img info`), `None` when it cannot be read without the
/// repository's key or at all (then reading the chain reports the trouble).
pub async fn image_virtual_size(
    bins: &crate::qemu_bins::QemuBins,
    file: &std::path::Path,
) -> anyhow::Result<Option<u64>> {
    Ok(bins
        .qcow2_info(file)
        .await?
        .ok()
        .and_then(|info| info["virtual-size"].as_u64()))
}
