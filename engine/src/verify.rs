//! `verify`: re-read backup files and compare them with the manifest's checking tables. Each node is checked
//! where its own layer holds data (a full everywhere), through its recovery chain: an uncompressed, unencrypted
//! chain is read straight from its files at the offsets `qemu-img map` gives ([`DirectSource`], QEMU's own
//! reading of the qcow2 metadata, without a socket copy of every byte); any other is opened in a
//! qemu-storage-daemon and read over NBD. A bad block is reported with its node, disk and offset, together
//! with the nodes whose restore it breaks: the damaged node's subtree, found by lid/tid.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use chain::{BlockSource as _, LockWait, NodeId, NodeKind, NodeState, Repository, Table};

use crate::daemon::StorageDaemon;
use crate::direct::DirectSource;
use crate::graph;
use crate::qemu_bins::QemuBins;
use crate::tables::DiskAt;
use crate::tables::{NbdSource, layer_extents, threads, touched_blocks};

#[derive(Debug, Clone)]
pub struct VerifyOptions {
    pub repo: PathBuf,
    pub vm: String,
    /// Node ids or tags; empty means every complete node.
    pub nodes: Vec<String>,
    pub lock_wait: LockWait,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VerifyReport {
    pub vm: String,
    pub ok: bool,
    pub nodes: Vec<NodeVerdict>,
    /// Nodes whose own files are damaged.
    pub damaged_nodes: Vec<String>,
    /// Nodes whose restore would read damaged data: the subtrees of the damaged nodes.
    pub broken_restores: Vec<String>,
    /// Nodes with a disk that could not be checked for a reason that is not damage (QEMU or NBD failed):
    /// neither known good nor known bad.
    pub unchecked_nodes: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeVerdict {
    pub node: String,
    pub disks: Vec<DiskVerdict>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiskVerdict {
    pub disk: String,
    pub ok: bool,
    /// Whether the disk was checked; `false` when QEMU or NBD failed while its files look sound (not damage).
    pub checked: bool,
    pub blocks_checked: u64,
    pub bad_blocks: Vec<BadBlock>,
    /// A failure that kept the disk from being checked: damage (a missing or unreadable file, a damaged table)
    /// when `checked`, anything else otherwise.
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BadBlock {
    pub index: u64,
    pub offset: u64,
}

pub async fn verify(opts: &VerifyOptions) -> Result<VerifyReport> {
    let repo = Repository::open(&opts.repo)?;
    crate::crypt::require(&repo)?;
    let vm = repo.vm(&opts.vm)?;
    let _guard = vm.lock_shared(opts.lock_wait)?;
    let manifest = vm.load()?;
    // Indexed once: per-node lookups in the node list would make a long chain quadratic.
    let tree = manifest.tree()?;
    let mut ids: Vec<NodeId> = Vec::new();
    if opts.nodes.is_empty() {
        ids.extend(
            manifest
                .nodes
                .iter()
                .filter(|n| n.state == NodeState::Complete)
                // A time point that was not copied in (`snapshot` without `--copy`, or a copy that failed) has
                // nothing in the repository to check: its files are in the VM's storage.
                .filter(|n| !(n.kind == NodeKind::Snapshot && n.disks.iter().all(|d| d.table.is_none())))
                .map(|n| n.id.clone()),
        );
    } else {
        for wanted in &opts.nodes {
            ids.push(crate::nodes::find_node(&manifest, wanted)?.id.clone());
        }
    }
    let bins = QemuBins::from_env();
    let daemon = StorageDaemon::start(&bins).await?;
    crate::crashpoint::pause_point("verify-reading").await;
    let mut verdicts = Vec::new();
    let mut file_damage = FileDamage::default();
    let mut last = LastTables::default();
    for (n, id) in ids.iter().enumerate() {
        let node = tree.get(id.as_str()).context("node vanished")?;
        let mut disks = Vec::new();
        for (i, disk) in node.disks.iter().enumerate() {
            let verdict = match check_disk(
                &daemon,
                DiskAt {
                    bins: &bins,
                    vm: &vm,
                    manifest: &manifest,
                    node: &node.id,
                    disk: &disk.disk,
                },
                node,
                (n, i),
                &mut last,
            )
            .await
            {
                Ok((checked, bad, block_size)) => DiskVerdict {
                    disk: disk.disk.clone(),
                    ok: bad.is_empty(),
                    checked: true,
                    blocks_checked: checked,
                    bad_blocks: bad
                        .into_iter()
                        .map(|index| BadBlock {
                            index,
                            offset: index * block_size,
                        })
                        .collect(),
                    error: None,
                },
                Err(e) => {
                    // Damage (a damaged table or a chain of the wrong size say so themselves), or a failure of
                    // the reading machinery (the daemon, NBD): then the files decide.
                    let known = e.chain().any(|c| c.downcast_ref::<chain::Error>().is_some())
                        || matches!(
                            crate::exit::classify(&e),
                            crate::exit::ExitCode::Damaged | crate::exit::ExitCode::Repository
                        );
                    let damage = if known {
                        None
                    } else {
                        file_damage.of_chain(&bins, &vm, &manifest, id, &disk.disk).await
                    };
                    let checked = known || damage.is_some();
                    DiskVerdict {
                        disk: disk.disk.clone(),
                        ok: false,
                        checked,
                        blocks_checked: 0,
                        bad_blocks: Vec::new(),
                        error: Some(match damage {
                            Some(why) => format!("{why} ({e:#})"),
                            None => format!("{e:#}"),
                        }),
                    }
                }
            };
            disks.push(verdict);
        }
        verdicts.push(NodeVerdict {
            node: id.to_string(),
            disks,
        });
    }
    daemon.stop().await?;

    let damaged: Vec<String> = verdicts
        .iter()
        .filter(|v| v.disks.iter().any(|d| d.checked && !d.ok))
        .map(|v| v.node.clone())
        .collect();
    let unchecked: Vec<String> = verdicts
        .iter()
        .filter(|v| v.disks.iter().any(|d| !d.checked))
        .map(|v| v.node.clone())
        .collect();
    let mut broken: Vec<String> = tree
        .subtrees(damaged.iter().map(String::as_str))
        .context("a damaged node vanished")?
        .into_iter()
        .map(|n| n.id.to_string())
        .collect();
    broken.sort_unstable();
    Ok(VerifyReport {
        vm: opts.vm.clone(),
        ok: damaged.is_empty() && unchecked.is_empty(),
        nodes: verdicts,
        damaged_nodes: damaged,
        broken_restores: broken,
        unchecked_nodes: unchecked,
    })
}

/// The table derived last for each disk: nodes are checked in creation order, so a node's parent has usually
/// just been derived, and its table is one difference away ([`crate::tables::load_table_above`]) instead of a
/// walk down to the full (which would make verifying a long chain quadratic).
#[derive(Default)]
struct LastTables(HashMap<String, (NodeId, chain::Table, chain::Digest)>);

impl LastTables {
    fn derive(
        &mut self,
        vm: &chain::VmStore,
        manifest: &chain::Manifest,
        node: &chain::Node,
        disk: &str,
    ) -> Result<(chain::Table, chain::Digest)> {
        let known = self.0.get(disk).map(|(id, table, digest)| crate::tables::Known {
            node: id,
            table,
            id: digest,
        });
        let derived = crate::tables::load_table_above(vm, manifest, node, disk, known);
        match derived {
            Ok((table, id)) => {
                self.0
                    .insert(disk.to_owned(), (node.id.clone(), table.clone(), id));
                Ok((table, id))
            }
            Err(e) => {
                self.0.remove(disk);
                Err(e)
            }
        }
    }
}

/// Checks one disk of one node: returns (blocks checked, bad block indices, block size).
async fn check_disk(
    daemon: &StorageDaemon,
    at: DiskAt<'_>,
    node: &chain::Node,
    (n, i): (usize, usize),
    last: &mut LastTables,
) -> Result<(u64, Vec<u64>, u64)> {
    let DiskAt {
        bins,
        vm,
        manifest,
        disk,
        ..
    } = at;
    let id = &node.id;
    let (expected, _) = last.derive(vm, manifest, node, disk)?;
    let block_size = expected.block_size();
    let file = node
        .disks
        .iter()
        .find(|d| d.disk == disk)
        .context("disk vanished")?;
    // An uncompressed, unencrypted chain is read straight from its files, at the offsets QEMU's own map gives
    // (`qemu-img map`): QEMU's reading of the qcow2 metadata, without a daemon copying every byte through a
    // socket. Anything else is read through the daemon.
    let files = crate::direct::chain_files(vm, manifest, id, disk)?;
    if let Some(source) = DirectSource::open(bins, &files).await? {
        if source.len() != expected.virtual_size() {
            bail!(wrong_size(source.len(), expected.virtual_size()));
        }
        // A full is checked everywhere; a later node where its own layer holds data.
        let blocks = match node.parent {
            None => None,
            Some(_) => Some(touched_blocks(
                source.top_layer_ranges(),
                block_size,
                expected.len(),
            )?),
        };
        // Two workers per core, as over NBD: on a busy machine one per core gets half the CPU share.
        let (checked, bad) = compare(source, expected, blocks, threads()).await?;
        return Ok((checked, bad, block_size));
    }
    // A full is checked everywhere; a later node where its own layer holds data.
    let blocks: Option<Vec<u64>> = match node.parent {
        None => None,
        Some(_) => Some(touched_blocks(
            &layer_extents(bins, &vm.resolve(&file.file)?).await?,
            block_size,
            expected.len(),
        )?),
    };
    let prefix = format!("v{n}-{i}-");
    let chain = graph::add_chain(daemon.qmp(), vm, manifest, id, disk, &prefix).await?;
    let export = format!("{prefix}x");
    let result = async {
        daemon
            .export(chain.top().context("empty chain")?, &export, false)
            .await?;
        let client = daemon.connect(&export).await?;
        let size = client.size();
        if size != expected.virtual_size() {
            bail!(wrong_size(size, expected.virtual_size()));
        }
        let source = NbdSource::new(
            nbd::BlockingClient::new(client, tokio::runtime::Handle::current()),
            size,
        );
        let (checked, bad) = compare(source, expected, blocks, threads()).await?;
        Ok::<_, anyhow::Error>((checked, bad, block_size))
    }
    .await;
    let _ = daemon
        .qmp()
        .execute(&qmp::commands::BlockExportDel::hard(export.as_str()))
        .await;
    graph::remove_chain(daemon.qmp(), &chain).await;
    result
}

/// The error of a chain that reads as a disk of another size than its table's.
fn wrong_size(size: u64, table: u64) -> crate::exit::Exit {
    crate::exit::Exit::new(
        crate::exit::ExitCode::Damaged,
        format!(
            "its recovery chain reads as a disk of {size} bytes, but its checking table covers {table} bytes: \
             the node's files were changed or damaged"
        ),
    )
}

/// Hashes `source` on `threads` workers, whole or only `blocks`, and compares with
/// `expected`: (blocks checked, bad blocks).
async fn compare<S: chain::BlockSource + Send + 'static>(
    source: S,
    expected: Table,
    blocks: Option<Vec<u64>>,
    threads: usize,
) -> Result<(u64, Vec<u64>)> {
    let block_size = expected.block_size();
    let key = crate::crypt::unlock::table_key();
    tokio::task::spawn_blocking(move || -> Result<(u64, Vec<u64>)> {
        match blocks {
            None => {
                let actual = chain::crypt::sealed(
                    key.as_ref(),
                    Table::build(&source, expected.scheme(), block_size, threads)?,
                )?;
                Ok((actual.len(), Table::diff(&expected, &actual)?))
            }
            Some(blocks) => {
                let hashes = chain::crypt::sealed_blocks(
                    key.as_ref(),
                    Table::build_blocks(&source, &expected, &blocks, threads)?,
                );
                let bad = hashes
                    .iter()
                    .filter(|(b, h)| expected.digest(*b) != Some(h))
                    .map(|(b, _)| *b)
                    .collect();
                Ok((blocks.len() as u64, bad))
            }
        }
    })
    .await
    .context("table builder panicked")?
}

/// Whether a node's recovery chain for a disk has a missing or unreadable file
/// ([`crate::restore::chain_damage`]), remembered per node and disk: a node's answer is its own file's and its
/// parent's, so a run asks about each file once and walks each chain once, however long.
#[derive(Default)]
struct FileDamage(std::collections::HashMap<(NodeId, String), Option<String>>);

impl FileDamage {
    async fn of_chain(
        &mut self,
        bins: &QemuBins,
        vm: &chain::VmStore,
        manifest: &chain::Manifest,
        node: &NodeId,
        disk: &str,
    ) -> Option<String> {
        // The nodes up to the first one already known, then their answers from the top down.
        let mut pending = Vec::new();
        let mut at = Some(node.clone());
        while let Some(id) = at {
            if self.0.contains_key(&(id.clone(), disk.to_owned())) {
                break;
            }
            at = manifest.node(&id).and_then(|n| n.parent.clone());
            pending.push(id);
        }
        for id in pending.into_iter().rev() {
            let parent = manifest.node(&id).and_then(|n| n.parent.clone());
            let inherited = parent.and_then(|p| self.0.get(&(p, disk.to_owned())).cloned().flatten());
            let file = manifest
                .node(&id)
                .and_then(|n| n.disks.iter().find(|d| d.disk == disk))
                .map(|d| d.file.clone());
            let verdict = match (inherited, file) {
                (Some(inherited), _) => Some(inherited),
                (None, None) => None,
                (None, Some(file)) => match vm.resolve(&file) {
                    Ok(path) => crate::restore::chain_damage(bins, &[path]).await,
                    Err(e) => Some(e.to_string()),
                },
            };
            self.0.insert((id, disk.to_owned()), verdict);
        }
        self.0.get(&(node.clone(), disk.to_owned())).cloned().flatten()
    }
}
