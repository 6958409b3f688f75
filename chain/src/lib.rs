//! qmpbak's backup repository: everything about backups that lives on disk, and nothing about QEMU.
//!
//! # Layout
//!
//! ```text
//! REPO/
//!   qmpbak-repo.json            settings: format_version, block_size (checking-table block, default 1 MiB,
//!                               a power of two from 64 KiB to 16 MiB), full_every (default 7),
//!                               retention (optional: the default policy of a plain `qmpbak prune`)
//!   VM/                         one directory per VM (mode 0700), named by the VM's name
//!     manifest.json             the VM's backup tree (see `Manifest`)
//!     lock                      the VM's lock file (flock: exclusive to change, shared to read)
//!     lock.holder.json          who holds the exclusive lock: pid, command, host, since (may be stale)
//!     NODE/                     one directory per backup node, named by its id ("0001" …)
//!       DISK.qcow2              the node's data for disk DISK (its qdev id)
//!       DISK.table              the checking table of DISK at this node (whole, or a difference against
//!                               the parent node's; prune and merge may rewrite it as DISK.table-on-NODE
//!                               or DISK.table-whole: the manifest names the file)
//! ```
//!
//! Every path inside a manifest is relative to the VM directory ([`RelPath`]), so a repository can be moved
//! or copied whole. VM names, disk ids, node ids and tags are `[A-Za-z0-9][A-Za-z0-9._-]{0,63}`: they become
//! file names, so separators, `..` and empty names are refused. Files are created 0600 and directories 0700.
//!
//! # Pieces
//!
//! - [`repo`]: [`Repository`] (init/open, [`Settings`]) and [`VmStore`] (one VM's files, lock, load/save).
//! - [`model`]: the manifest's serde model ([`Manifest`], [`Node`] …); [`manifest`]: changes that keep the tree
//!   valid, validation.
//! - [`tree`]: `lid`/`tid` nested-set numbering and the queries built on it (recovery chain, subtree …).
//! - [`retention`]: which nodes a prune keeps ([`Policy`]), and the safe order to remove the others ([`Plan`]).
//! - [`store`]: loading a manifest with full checks, and the bytes it is saved as; [`v1`]: reading manifests of
//!   format 1 (operation records with free-text notes).
//! - [`fsio`]: generic file I/O: atomic writes (temp file, fsync, rename, fsync directory), fsyncs, private
//!   modes, allocated bytes.
//! - [`lock`]: the per-VM fs2 lock; [`holder`]: its holder record; [`host`]: this machine's host name.
//! - [`table`]: checking tables (a SHA-256 digest per block, by [`table::Scheme`]), built in parallel from a
//!   [`BlockSource`].
//! - [`crypt`]: an encrypted repository's keys, derived from the user's key ([`Encryption`] in the settings),
//!   and keyed checking tables ([`TableKey`]).
//! - [`error`]: [`Error`], one variant per failure a caller can act on, its stable [`ErrorKind`], and
//!   [`ManifestProblem`].
//!
//! Modules import each other without cycles (`scripts/check-cycles` checks it). From the bottom: [`host`] and
//! [`ids`] (the name types) depend on nothing; [`holder`] on `host`; [`error`] on `holder` and `ids`; [`names`]
//! (validating constructors), [`fsio`] and [`lock`] on `error`; [`model`] (the manifest's serde types), then
//! [`v1`], [`tree`], [`manifest`], [`store`], [`retention`], [`table`], [`crypt`], and [`repo`] on top.
//!
//! A manifest is only ever replaced whole and atomically, after validation; a manifest that fails to load is
//! reported (which file, what is wrong, where) and never rewritten.

pub mod crypt;
pub mod error;
pub mod fsio;
pub mod holder;
pub mod host;
pub mod ids;
pub mod lock;
pub mod manifest;
pub mod model;
pub mod names;
pub mod repo;
pub mod retention;
pub mod store;
pub mod table;
pub mod tree;
pub mod v1;

pub use crypt::{Encryption, RepoKeys, TableKey};
pub use error::{Error, ErrorKind, ManifestProblem, Result};
pub use lock::{LockGuard, LockHolder, LockMode, LockWait};
pub use manifest::{
    BitmapRecord, CommitDisk, CommitRecord, DiskIdentity, DriveSwitch, FORMAT_VERSION, Location, Manifest,
    Node, NodeDisk, NodeKind, NodeState, Operation, Payload, ServedChain, ViewRecord, new_disk_key,
};
pub use names::{NodeId, RelPath, check_name};
pub use repo::{Repository, Settings, VmStore};
pub use retention::{Action, Decision, Plan, Policy, Why};
pub use table::{
    BlockSource, BlockVisitor, Digest, Extent, ExtentKind, FileSource, MemSource, Piece, Scheme, Table,
    TableDiff, TableFile, VISIT_RUN_BYTES, Visited, is_difference_file,
};
pub use tree::Tree;
