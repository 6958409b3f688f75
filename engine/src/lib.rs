//! qmpbak as a library: the orchestration that the `qmpbak` binary's subcommands are thin wrappers over.
//! A program can call these modules directly, without the CLI: [`inspect`] reads a running VM's disks and dirty
//! bitmaps over QMP.

pub mod backup;
pub mod bitmaps;
pub mod children;
pub mod cleanup;
pub mod commit;
pub mod crashpoint;
pub mod crypt;
pub mod daemon;
pub mod direct;
pub mod exit;
pub mod graph;
pub mod identity;
pub mod inspect;
pub mod merge;
pub mod mount;
pub mod nodes;
pub mod plan;
pub mod progress;
pub mod prune;
pub mod qemu_bins;
pub mod qmp_target;
pub mod recovery;
pub mod render;
pub mod repo_reports;
pub mod restore;
pub mod rundir;
pub mod serve;
pub mod session;
pub mod signals;
pub mod snapshot;
pub mod tables;
pub mod tls_creds;
pub mod verify;
pub mod writeback;
