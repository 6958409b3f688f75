//! The crate's error type: one variant per failure a caller can act on, each naming the file, node or VM it is
//! about and, where there is one, what to do. Problems found inside a manifest are a second enum,
//! [`ManifestProblem`], carried by [`Error::ManifestInvalid`] (read from disk) and
//! [`Error::ManifestInconsistent`] (built in memory).

use std::fmt;
use std::io;
use std::path::PathBuf;

use crate::holder::{LockHolder, holder_path};
use crate::ids::NodeId;

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the repository.
///
/// Variants that wrap an OS error keep it as their `source()` and leave it out of their own message, so that
/// printing the error with its chain (as `anyhow`'s `{:#}` does) says it once.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file system call failed.
    #[error("cannot {action} {}", path.display())]
    Io {
        /// What we were doing ("read", "create directory", …).
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    // --- the repository ---
    #[error("{} is not a qmpbak repository (it has no qmpbak-repo.json); create one with `qmpbak init`", path.display())]
    NotARepository { path: PathBuf },
    #[error("{} is already a qmpbak repository; use it as it is, or choose another directory", path.display())]
    AlreadyARepository { path: PathBuf },
    #[error(
        "{} is not empty and not a qmpbak repository; choose a new or empty directory for the repository",
        path.display()
    )]
    DirectoryNotEmpty { path: PathBuf },
    #[error("{} is not a directory", path.display())]
    NotADirectory { path: PathBuf },
    #[error("repository settings {} are invalid: {detail}; fix the file by hand", path.display())]
    SettingsInvalid { path: PathBuf, detail: String },
    #[error(
        "repository settings {} have format version {found}, written by a newer qmpbak (this one reads up to \
         {supported}); use a newer qmpbak",
        path.display()
    )]
    RepositoryTooNew {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error(
        "the repository is encrypted and this key is not its key (the settings' verifier does not match); \
         nothing was changed"
    )]
    WrongKey,
    #[error(
        "the repository is encrypted: pass its key with --key-file FILE, --key-fd N, --key-env NAME or \
         QMPBAK_KEY; nothing was changed"
    )]
    KeyMissing,
    #[error("the repository's encryption record is not one this qmpbak understands: {detail}")]
    EncryptionUnsupported { detail: String },
    #[error("VM {vm:?} has no backups in repository {}; `qmpbak list {}` shows the VMs it has", repo.display(), repo.display())]
    VmNotFound { repo: PathBuf, vm: String },
    #[error("VM {vm:?} already has a manifest in {}", dir.display())]
    VmExists { vm: String, dir: PathBuf },
    #[error(
        "the directory {} of VM {vm:?} has no manifest.json but holds backup files; restore its manifest.json from \
         a copy, or move the directory away before backing up this VM again",
        dir.display()
    )]
    VmDirectoryNotEmpty { vm: String, dir: PathBuf },

    // --- names and paths given to us ---
    #[error("invalid {what} {name:?}: {reason}")]
    InvalidName {
        what: &'static str,
        name: String,
        reason: String,
    },
    #[error("invalid relative path {path:?}: {reason}")]
    InvalidPath { path: String, reason: String },
    #[error(
        "{rel} resolves to {}, outside the VM directory {}; refusing to follow it (a symlink points out of the \
         repository?)",
        target.display(),
        vm_dir.display()
    )]
    PathEscapes {
        vm_dir: PathBuf,
        rel: String,
        target: PathBuf,
    },

    // --- reading the manifest ---
    #[error(
        "manifest {} does not exist, but its directory holds backup files; restore manifest.json from a copy, or \
         move the directory away",
        path.display()
    )]
    ManifestMissing { path: PathBuf },
    #[error("manifest {} is not valid: {detail} at line {line} column {column}; it was left as it is, fix it by hand or restore a copy", path.display())]
    ManifestSyntax {
        path: PathBuf,
        line: usize,
        column: usize,
        detail: String,
    },
    #[error(
        "manifest {} has format version {found}, written by a newer qmpbak (this one reads up to {supported}); \
         use a newer qmpbak",
        path.display()
    )]
    ManifestTooNew {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error("manifest {} has unknown format version {found} (this qmpbak reads 1 to {supported})", path.display())]
    ManifestFormatUnknown {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    /// The manifest parsed, but what it says is not a valid backup tree.
    #[error("manifest {} is invalid: {problem}; it was left as it is, fix it by hand or restore a copy", path.display())]
    ManifestInvalid { path: PathBuf, problem: ManifestProblem },

    // --- changing a manifest in memory ---
    /// The in-memory manifest is not a valid tree (changed directly rather than through `Manifest`'s methods?).
    #[error("the manifest of VM {vm:?} is inconsistent: {problem}")]
    ManifestInconsistent { vm: String, problem: ManifestProblem },
    #[error("no node {node} in the manifest of VM {vm:?}")]
    NodeNotFound { vm: String, node: String },
    #[error("node {node} already exists in the manifest of VM {vm:?}")]
    NodeExists { vm: String, node: NodeId },
    #[error("node {node} names parent {parent}, which is not in the manifest of VM {vm:?}")]
    ParentNotFound {
        vm: String,
        node: NodeId,
        parent: NodeId,
    },
    #[error("tag {tag:?} is already used by node {other} of VM {vm:?}; tags must be unique")]
    TagInUse { vm: String, tag: String, other: NodeId },
    /// No node id is left: `next_seq` (or a node's number) is at the end of the 64-bit sequence.
    #[error(
        "VM {vm:?} has no node ids left: sequence number {seq} is the last one there is; start a new chain in \
         another VM directory"
    )]
    NodeIdsExhausted { vm: String, seq: u64 },
    #[error("node {node} of VM {vm:?} cannot move under {parent}, which is in its own subtree")]
    MoveIntoOwnSubtree {
        vm: String,
        node: NodeId,
        parent: NodeId,
    },
    #[error(
        "node {node} of VM {vm:?} has children ({}); remove them first, or merge it into them",
        list(children)
    )]
    NotALeaf {
        vm: String,
        node: NodeId,
        children: Vec<NodeId>,
    },

    // --- locks ---
    /// A signal (SIGINT, SIGTERM, SIGHUP) stopped the wait for the VM's lock ([`crate::lock::interrupt_waits`]).
    #[error("interrupted while waiting for the lock of VM {vm:?} ({}): nothing was changed", lock.display())]
    LockWaitInterrupted { vm: String, lock: PathBuf },
    /// Another process holds the VM's lock.
    #[error("{}", lock_held(vm, lock, holder.as_ref(), *stale))]
    LockHeld {
        vm: String,
        lock: PathBuf,
        holder: Option<LockHolder>,
        /// Whether `holder` was known to be gone (on this host, no such process) when the error was made.
        stale: bool,
    },
    /// The lock file is a symbolic link or not a regular file: qmpbak never follows it (it could point out of
    /// the repository).
    #[error(
        "lock file {} is {what}; qmpbak only uses a regular file there and never follows a link out of the \
         repository; remove it (qmpbak creates a new one)",
        path.display()
    )]
    LockFileNotRegular { path: PathBuf, what: &'static str },
    #[error("saving the manifest of VM {vm:?} needs its exclusive lock; this one is shared")]
    LockNotExclusive { vm: String },
    #[error("saving the manifest of VM {vm:?} needs its own lock; this guard locks {}", lock.display())]
    LockOfOtherVm { vm: String, lock: PathBuf },

    // --- checking tables ---
    #[error("checking table {} is corrupt: {detail}; it cannot be used, rebuild it from the node's backup file", path.display())]
    TableCorrupt { path: PathBuf, detail: String },
    #[error(
        "checking table {} has sha256 {actual}, but the manifest records {expected}; the file was changed or damaged",
        path.display()
    )]
    TableChecksumMismatch {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    /// A difference table applied to a table that is not the one it was written against (its recorded base
    /// content id differs), or whose result is not the table it records: never a silently wrong table.
    #[error(
        "checking table {} is a difference against a table with content id {expected}, but the table below it \
         in the node's recovery chain has {actual}; the repository's tables do not fit together (a table was \
         replaced or the tree was changed by hand)",
        path.display()
    )]
    TableBaseMismatch {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    /// A difference table with nothing below it to apply it to.
    #[error(
        "checking table {} is a difference against its parent node's table, but {why}; the node's full table \
         cannot be derived",
        path.display()
    )]
    TableBaseMissing { path: PathBuf, why: String },
    #[error(
        "checking tables do not cover the same disk: block size {} vs {}, virtual size {} vs {}; a resized disk \
         needs a new full backup",
        left.0, right.0, left.1, right.1
    )]
    TableShapeMismatch {
        /// (block size, virtual size) of the first table.
        left: (u64, u64),
        /// (block size, virtual size) of the second table.
        right: (u64, u64),
    },
    /// Two checking tables whose digests are computed differently were to be compared (a qmpbak bug: a table
    /// built to be compared with another takes that one's scheme).
    #[error("checking tables with {left:?} and {right:?} digests cannot be compared")]
    TableSchemeMismatch {
        left: crate::table::Scheme,
        right: crate::table::Scheme,
    },
    /// A disk size (from a qcow2 header, an NBD server or a table file) beyond what a checking table covers.
    #[error(
        "a disk of {virtual_size} bytes is beyond what a checking table covers (at most {max_blocks} blocks of \
         {block_size} bytes, and at most 2^63 - 1 bytes): if the disk really is that large, it needs a \
         repository with a larger block_size in qmpbak-repo.json; if not, an image header or a table was changed"
    )]
    DiskTooLarge {
        virtual_size: u64,
        block_size: u64,
        max_blocks: u64,
    },
    #[error("block {index} is past the end of the checking table ({count} blocks)")]
    BlockOutOfRange { index: u64, count: u64 },
    #[error("a checking table of {expected} blocks cannot be made from {given} digests")]
    DigestCount { given: u64, expected: u64 },
    #[error("invalid block size {block_size}: it must be a power of two from {min} to {max} bytes")]
    InvalidBlockSize { block_size: u64, min: u64, max: u64 },
    #[error("cannot read {len} bytes at offset {offset} of {source_name}")]
    SourceRead {
        source_name: String,
        offset: u64,
        len: u64,
        #[source]
        source: io::Error,
    },
    /// What a table build's [`crate::BlockVisitor`] did with a block failed (a copy's write, say).
    #[error("handling block {index} after hashing it")]
    BlockVisit {
        index: u64,
        #[source]
        source: io::Error,
    },
}

/// What is wrong with a manifest's contents.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ManifestProblem {
    /// Two nodes have the same id.
    DuplicateNode { node: String },
    /// A node names a parent that is not in the manifest.
    MissingParent { node: String, parent: String },
    /// Following parents from these nodes never reaches a root.
    Cycle { nodes: Vec<String> },
    /// The stored `lid`/`tid` are not what the tree says.
    Numbering {
        node: String,
        stored: (u64, u64),
        expected: (u64, u64),
    },
    /// `current` names a node that is not in the manifest.
    CurrentMissing { current: String },
    /// The manifest is for another VM than the directory it is in.
    WrongVm { expected: String, found: String },
    /// Two nodes share a tag, or a tag equals another node's id.
    DuplicateTag { tag: String, nodes: (String, String) },
    /// `next_seq` would hand out an id that is already taken.
    NextSeqTooLow { next_seq: u64, node: String },
    /// A field holds a value that is not allowed (an id, a name, a path).
    InvalidValue {
        field: String,
        value: String,
        reason: String,
    },
}

impl fmt::Display for ManifestProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::DuplicateNode { node } => write!(f, "node id {node} appears more than once"),
            Self::MissingParent { node, parent } => {
                write!(
                    f,
                    "node {node} names parent {parent}, which is not in the manifest"
                )
            }
            Self::Cycle { nodes } => {
                write!(
                    f,
                    "nodes {} are their own ancestors (a cycle of parent links)",
                    nodes.join(" -> ")
                )
            }
            Self::Numbering {
                node,
                stored,
                expected,
            } => write!(
                f,
                "node {node} has lid/tid {}/{}, but the tree gives {}/{}",
                stored.0, stored.1, expected.0, expected.1
            ),
            Self::CurrentMissing { current } => {
                write!(f, "`current` names node {current}, which is not in the manifest")
            }
            Self::WrongVm { expected, found } => {
                write!(
                    f,
                    "it is the manifest of VM {found:?}, but it is in the directory of VM {expected:?}"
                )
            }
            Self::DuplicateTag { tag, nodes } => {
                write!(
                    f,
                    "tag {tag:?} is used by both node {} and node {}",
                    nodes.0, nodes.1
                )
            }
            Self::NextSeqTooLow { next_seq, node } => {
                write!(f, "next_seq {next_seq} is not above existing node id {node}")
            }
            Self::InvalidValue { field, value, reason } => {
                write!(f, "{field} {value:?} is invalid: {reason}")
            }
        }
    }
}

/// The stable class of an [`Error`], for callers that act on the class rather than the variant (the CLI maps
/// kinds to exit codes). New variants get one of these kinds; a new kind is a deliberate change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// A file system call failed (see the error's `source()`), or reading a block source did.
    Io,
    /// The directory is not a usable repository (no settings file, not a directory).
    NotARepository,
    /// Something on disk is already there: a repository, a VM, files where a new directory was expected.
    Exists,
    /// Settings, a manifest or a checking table on disk is invalid, damaged or in a format this qmpbak does
    /// not read.
    Invalid,
    /// The repository's encryption: a wrong or missing key, or an unknown encryption record.
    Key,
    /// A name the caller gave is invalid, or names a VM the repository does not have.
    Usage,
    /// Another process holds the VM's lock.
    LockHeld,
    /// A signal stopped the command before it changed anything.
    Interrupted,
    /// A change or query that the repository's current state does not allow (a node that is not there, a tag
    /// in use, a lock of the wrong kind, a table of another shape …).
    Refused,
}

impl Error {
    /// The error's stable [`ErrorKind`].
    pub fn kind(&self) -> ErrorKind {
        use ErrorKind as K;
        match self {
            Error::Io { .. } | Error::SourceRead { .. } | Error::BlockVisit { .. } => K::Io,
            Error::NotARepository { .. } | Error::NotADirectory { .. } => K::NotARepository,
            Error::AlreadyARepository { .. }
            | Error::DirectoryNotEmpty { .. }
            | Error::VmExists { .. }
            | Error::VmDirectoryNotEmpty { .. } => K::Exists,
            Error::SettingsInvalid { .. }
            | Error::RepositoryTooNew { .. }
            | Error::InvalidPath { .. }
            | Error::PathEscapes { .. }
            | Error::ManifestMissing { .. }
            | Error::ManifestSyntax { .. }
            | Error::ManifestTooNew { .. }
            | Error::ManifestFormatUnknown { .. }
            | Error::ManifestInvalid { .. }
            | Error::ManifestInconsistent { .. }
            | Error::LockFileNotRegular { .. }
            | Error::TableCorrupt { .. }
            | Error::TableChecksumMismatch { .. }
            | Error::TableBaseMismatch { .. }
            | Error::TableBaseMissing { .. }
            | Error::DiskTooLarge { .. } => K::Invalid,
            Error::WrongKey | Error::KeyMissing | Error::EncryptionUnsupported { .. } => K::Key,
            Error::VmNotFound { .. } | Error::InvalidName { .. } => K::Usage,
            Error::LockHeld { .. } => K::LockHeld,
            Error::LockWaitInterrupted { .. } => K::Interrupted,
            Error::NodeNotFound { .. }
            | Error::NodeExists { .. }
            | Error::ParentNotFound { .. }
            | Error::TagInUse { .. }
            | Error::NodeIdsExhausted { .. }
            | Error::MoveIntoOwnSubtree { .. }
            | Error::NotALeaf { .. }
            | Error::LockNotExclusive { .. }
            | Error::LockOfOtherVm { .. }
            | Error::TableShapeMismatch { .. }
            | Error::TableSchemeMismatch { .. }
            | Error::BlockOutOfRange { .. }
            | Error::DigestCount { .. }
            | Error::InvalidBlockSize { .. } => K::Refused,
        }
    }

    /// An [`Error::Io`] for `action` on `path`.
    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { action, path, source }
    }
}

fn list(ids: &[NodeId]) -> String {
    ids.iter().map(NodeId::as_str).collect::<Vec<_>>().join(", ")
}

fn lock_held(vm: &str, lock: &std::path::Path, holder: Option<&LockHolder>, stale: bool) -> String {
    let who = match holder {
        Some(h) => {
            let stale = if stale {
                "; that process no longer exists, so the record is stale"
            } else {
                ""
            };
            format!(
                ": pid {} on host {}, running {:?} since {} (from {}{stale})",
                h.pid,
                h.host,
                h.command,
                h.since.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                holder_path(lock).display()
            )
        }
        None => {
            " (it did not record who: a reader holds a shared lock, or a writer is just starting)".to_owned()
        }
    };
    format!(
        "VM {vm:?} is locked by another qmpbak{who}; wait for it to finish, or use --wait (lock file {})",
        lock.display()
    )
}
