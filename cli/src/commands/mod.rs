//! One module per subcommand, each owning its clap arguments and its `run`.

#[macro_use]
pub mod out;

mod args;
mod backup;
mod bars;
mod cleanup;
mod completions;
mod info;
mod init;
mod list;
mod mount;
mod policy;
mod prune;
mod qmp;
mod restore;
mod show;
mod snapshot;
mod verify;

use std::sync::atomic::{AtomicBool, Ordering};

use clap::{CommandFactory as _, Parser, Subcommand};

/// The whole command line: global options and one subcommand.
#[derive(Parser)]
#[command(
    name = "qmpbak",
    version,
    about = "Backups of QEMU virtual machines over QMP, without libvirt"
)]
pub struct Cli {
    /// Log what qmpbak does to stderr: -v steps, -vv also every QMP command, reply and event, -vvv everything.
    /// QMPBAK_LOG (a tracing filter such as `qmp_wire=debug`) overrides it.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

/// Set by a command that printed its `--json` report and then fails (verify finding damage): stdout already
/// holds the one JSON object, so no error object follows it.
static REPORT_PRINTED: AtomicBool = AtomicBool::new(false);

/// Whether a `--json` report was already printed (see [`REPORT_PRINTED`]).
pub fn report_printed() -> bool {
    REPORT_PRINTED.load(Ordering::Relaxed)
}

fn mark_report_printed() {
    REPORT_PRINTED.store(true, Ordering::Relaxed);
}

#[derive(Subcommand)]
pub enum Command {
    /// Back up a running VM: full, incremental or differential.
    Backup(backup::Args),
    /// Remove what an interrupted qmpbak left behind for a VM.
    Cleanup(cleanup::Args),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) to stdout.
    Completions(completions::Args),
    /// Show a running VM's QEMU version, disks and dirty bitmaps.
    Info(info::Args),
    /// Create a new, empty backup repository.
    Init(init::Args),
    /// Draw the backup tree of a VM (or list the VMs of a repository).
    List(list::Args),
    /// Merge a time point's increment into its parent inside the running VM (keeps the chain short).
    Commit(snapshot::CommitArgs),
    /// Mount a node's disk read-only (file systems under DIR), list its partitions, or export it as an image file.
    Mount(mount::Args),
    /// Fold a node's recovery chain into a synthetic full (its descendants are unaffected).
    Merge(prune::MergeArgs),
    /// Show or set the repository's default retention (what `qmpbak prune` applies without --keep options).
    Policy(policy::Args),
    /// Thin a VM's backup tree out by a retention policy; removed interior nodes merge into their children.
    Prune(prune::Args),
    /// Send one raw QMP command and print the reply.
    Qmp(qmp::Args),
    /// Restore a node: offline into image files, or live into a running VM.
    Restore(restore::Args),
    /// Write the man pages into a directory (used by scripts/man).
    #[command(hide = true)]
    Man(completions::ManArgs),
    /// Continue the running VM from a time point (the later points stay as a branch).
    Revert(snapshot::RevertArgs),
    /// Show one backup node and its recovery chain.
    Show(show::Args),
    /// Take a time point of a running VM by external snapshot (milliseconds, no copy).
    Snapshot(snapshot::Args),
    /// Undo `qmpbak mount DIR` (also after that qmpbak was killed).
    Umount(mount::UmountArgs),
    /// Re-read backups and compare them with their checking tables.
    Verify(verify::Args),
}

impl Command {
    /// `qmpbak COMMAND VM` when the command was asked for a one-line `--summary`: on failure the binary then
    /// prints `SUBJECT: FAILED (exit N): ...` on stdout, so a mail or a monitoring check always gets its line.
    pub fn summary_subject(&self) -> Option<String> {
        match self {
            Command::Backup(args) => args.summary_subject(),
            Command::Prune(args) => args.summary_subject(),
            Command::Verify(args) => args.summary_subject(),
            _ => None,
        }
    }

    /// Runs the command. Output into a pipe whose reader has gone ends the process here, quietly, with
    /// [`out::BROKEN_PIPE_EXIT`], once the command has let go of everything it held.
    pub async fn run(self) -> anyhow::Result<()> {
        let result = Box::pin(self.dispatch()).await;
        match result {
            Err(err) if out::is_broken_pipe(&err) => std::process::exit(out::BROKEN_PIPE_EXIT),
            other => other,
        }
    }

    async fn dispatch(self) -> anyhow::Result<()> {
        match self {
            Command::Backup(args) => backup::run(args).await,
            Command::Cleanup(args) => finished_first("cleanup", Box::pin(cleanup::run(args))).await,
            Command::Commit(args) => finished_first("commit", Box::pin(snapshot::commit(args))).await,
            Command::Completions(args) => completions::run(&args, Cli::command()),
            Command::Info(args) => info::run(args).await,
            Command::Init(args) => init::run(&args).await,
            Command::List(args) => list::run(&args),
            Command::Man(args) => completions::man(&args, Cli::command()),
            Command::Merge(args) => prune::merge(args).await,
            Command::Mount(args) => finished_first("mount", Box::pin(mount::run(args))).await,
            Command::Policy(args) => policy::run(&args),
            Command::Prune(args) => prune::run(&args).await,
            Command::Qmp(args) => qmp::run(args).await,
            Command::Restore(args) => restore::run(args).await,
            Command::Revert(args) => finished_first("revert", Box::pin(snapshot::revert(args))).await,
            Command::Show(args) => show::run(&args),
            Command::Snapshot(args) => finished_first("snapshot", Box::pin(snapshot::run(args))).await,
            Command::Umount(args) => finished_first("umount", Box::pin(mount::umount(&args))).await,
            Command::Verify(args) => verify::run(args).await,
        }
    }
}

/// Runs a command that finishes what it started before it reacts to SIGINT, SIGTERM or SIGHUP: the short
/// ones (a snapshot, a revert, a mount, a cleanup), and a commit, whose block jobs cannot be undone halfway.
/// Killed outright by the signal, as they were, they left a record for the next command to finish, and exited
/// as killed. Now a signal is noted at once, the work is finished, and the command exits 130 (saying that it
/// finished), unless it failed on its own. A `snapshot --copy` stops its copy at once (the time point is taken
/// by then). SIGKILL still stops any of them at once; the next command finishes what its record names.
async fn finished_first(
    what: &str,
    work: impl std::future::Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<()> {
    let interrupt = qmpbak_engine::signals::Interrupt::new()?;
    tokio::pin!(work);
    let result = tokio::select! {
        result = &mut work => result,
        () = interrupt.wait() => {
            out::write_err(format_args!(
                "qmpbak: {what}: interrupted; finishing what it started first (SIGKILL stops it at once)"
            ));
            work.await
        }
    };
    match result {
        Ok(()) if interrupt.arrived().await => Err(qmpbak_engine::exit::Exit::new(
            qmpbak_engine::exit::ExitCode::Interrupted,
            format!("interrupted: the {what} was finished first, and is complete"),
        )
        .into()),
        other => other,
    }
}

/// The one-line summary of a failed run: the error's whole cause chain on one line.
pub fn failure_summary(subject: &str, code: u8, err: &anyhow::Error) -> String {
    let message = format!("{err:#}").replace('\n', " ");
    format!("{subject}: FAILED (exit {code}): {message}")
}
