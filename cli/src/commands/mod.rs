//! One module per subcommand, each owning its clap arguments and its `run`.

#[macro_use]
mod out;

mod args;
mod backup;
mod bars;
mod cleanup;
mod info;
mod init;
mod list;
mod prune;
mod qmp;
mod restore;
mod show;
mod snapshot;
mod verify;

use clap::Subcommand;

#[derive(Subcommand)]
pub enum Command {
    /// Back up a running VM: full, incremental or differential.
    Backup(backup::Args),
    /// Remove what an interrupted qmpbak left behind for a VM.
    Cleanup(cleanup::Args),
    /// Show a running VM's QEMU version, disks and dirty bitmaps.
    Info(info::Args),
    /// Create a new, empty backup repository.
    Init(init::Args),
    /// Draw the backup tree of a VM (or list the VMs of a repository).
    List(list::Args),
    /// Merge a time point's increment into its parent inside the running VM (keeps the chain short).
    Commit(snapshot::CommitArgs),
    /// Fold a node's recovery chain into a synthetic full (its descendants are unaffected).
    Merge(prune::MergeArgs),
    /// Thin a VM's backup tree out by a retention policy; removed interior nodes merge into their children.
    Prune(prune::Args),
    /// Send one raw QMP command and print the reply.
    Qmp(qmp::Args),
    /// Restore a node: offline into image files, or live into a running VM.
    Restore(restore::Args),
    /// Continue the running VM from a time point (the later points stay as a branch).
    Revert(snapshot::RevertArgs),
    /// Show one backup node and its recovery chain.
    Show(show::Args),
    /// Take a time point of a running VM by external snapshot (milliseconds, no copy).
    Snapshot(snapshot::Args),
    /// Re-read backups and compare them with their checking tables.
    Verify(verify::Args),
}

impl Command {
    /// Runs the command. Output into a pipe whose reader has gone ends the process here, quietly, with
    /// [`out::BROKEN_PIPE_EXIT`], once the command has let go of everything it held.
    pub async fn run(self) -> anyhow::Result<()> {
        let result = self.dispatch().await;
        match result {
            Err(err) if out::is_broken_pipe(&err) => std::process::exit(out::BROKEN_PIPE_EXIT),
            other => other,
        }
    }

    async fn dispatch(self) -> anyhow::Result<()> {
        match self {
            Command::Backup(args) => backup::run(args).await,
            Command::Cleanup(args) => cleanup::run(args).await,
            Command::Commit(args) => snapshot::commit(args).await,
            Command::Info(args) => info::run(args).await,
            Command::Init(args) => init::run(&args),
            Command::List(args) => list::run(&args),
            Command::Merge(args) => prune::merge(args).await,
            Command::Prune(args) => prune::run(&args),
            Command::Qmp(args) => qmp::run(args).await,
            Command::Restore(args) => restore::run(args).await,
            Command::Revert(args) => snapshot::revert(args).await,
            Command::Show(args) => show::run(&args),
            Command::Snapshot(args) => snapshot::run(args).await,
            Command::Verify(args) => verify::run(args).await,
        }
    }
}
