//! `qmpbak backup`: back up a running VM into its chain in a repository.

use std::io::IsTerminal as _;
use std::path::PathBuf;

use anyhow::{Result, bail};

use super::args::LiveVm;
use super::bars::Bars;
use qmpbak_engine::backup::{self, BackupOptions, BackupReport};
use qmpbak_engine::exit::Exit;
use qmpbak_engine::plan::Requested;
use qmpbak_engine::qmp_target::Local;
use qmpbak_engine::render::bytes;
use qmpbak_engine::signals::Interrupt;

#[derive(Clone, Copy, clap::ValueEnum)]
enum LevelArg {
    Full,
    Inc,
    Diff,
    Auto,
}

#[derive(clap::Args)]
pub struct Args {
    /// The VM (created in the repository on its first backup).
    #[command(flatten)]
    vm: LiveVm,
    /// full, inc (changes since the last backup), diff (changes since the last full), or auto: incremental
    /// when the bitmaps allow it, full when there is nothing to build on or the repository policy asks for one.
    #[arg(long, value_enum, default_value = "auto")]
    level: LevelArg,
    /// Back up only this disk (its id as `qmpbak info` shows it); repeat for more. Default: every disk. The new node holds only these
    /// disks, so a later backup that includes another disk cannot build on it: auto then takes a full of every
    /// disk, and inc or diff refuse.
    #[arg(long = "disk", value_name = "ID", conflicts_with = "exclude")]
    disks: Vec<String>,
    /// Leave this disk out; repeat for more (the same applies as for --disk).
    #[arg(long, value_name = "ID")]
    exclude: Vec<String>,
    /// Limit each disk's copy to BYTES per second (a plain number). It sets QEMU's backup job: not with
    /// --pull, and a checksum-diff incremental runs without it (and says so).
    #[arg(long, value_name = "BYTES", default_value_t = 0)]
    speed_limit: u64,
    /// Compress the backup files (qcow2 compressed clusters). It sets QEMU's backup job: not with --pull, and
    /// a checksum-diff incremental runs without it (and says so).
    #[arg(long)]
    compress: bool,
    /// Freeze the guest's filesystems (guest agent fsfreeze) around the backup instant; needs --qga.
    #[arg(long, requires = "qga")]
    quiesce: bool,
    /// The guest agent's socket (`-chardev socket,path=SOCK,server=on,wait=off` on a virtio-serial port).
    #[arg(long, value_name = "SOCK", requires = "quiesce")]
    qga: Option<PathBuf>,
    /// A name for this backup, usable wherever a node id is.
    #[arg(long)]
    tag: Option<String>,
    /// Back up encrypted disks (LUKS, qcow2 encryption) even into a repository that is not encrypted, where
    /// their contents are stored decrypted. Without it such a backup is refused.
    #[arg(long)]
    allow_plaintext: bool,
    /// Pull: the VM's QEMU exports a point-in-time view of each disk over NBD on TCP (TLS with --tls-dir,
    /// plaintext only with --insecure-plaintext), and qmpbak reads it and writes the backup files here. The
    /// repository then need not be reachable from the VM's host. A QEMU reached with `--qmp tls://` or
    /// `tcp://` is always backed up this way.
    #[arg(long)]
    pull: bool,
    /// For a pull: the address QEMU's NBD server listens on and qmpbak connects to (default: the `--qmp`
    /// host, port 10809, or the next free one up to 10824; 127.0.0.1 with a unix socket).
    #[arg(long, value_name = "HOST:PORT")]
    nbd_listen: Option<String>,
    /// For a pull: the id of the tls-creds-x509 object (endpoint=server) in the VM's QEMU for its NBD server
    /// (default: its only one).
    #[arg(long, value_name = "ID")]
    tls_creds: Option<String>,
    /// For a pull: a directory on the VM's host for the scratch images that keep old data while the disks are
    /// read (default: beside each disk's image). QEMU creates them and empties them afterwards; an empty file
    /// stays.
    #[arg(long, value_name = "DIR")]
    scratch_dir: Option<PathBuf>,
    /// Print one JSON result.
    #[arg(long, conflicts_with = "summary")]
    json: bool,
    /// Print one line, `qmpbak backup VM: OK ...` or `... FAILED (exit N): ...`, for a mail or a monitoring
    /// check.
    #[arg(long)]
    summary: bool,
}

impl Args {
    /// `qmpbak backup VM`, when a one-line summary was asked for.
    pub fn summary_subject(&self) -> Option<String> {
        self.summary
            .then(|| format!("qmpbak backup {}", self.vm.target.vm))
    }
}

pub async fn run(args: Args) -> Result<()> {
    let qmp = args.vm.qmp_target()?;
    // A QEMU on another host cannot reach the repository: its disks are pulled over NBD. Otherwise QEMU writes
    // the node's files itself, unless --pull asks for the pull all the same.
    let pull = args.pull || qmp.is_remote();
    if !pull {
        let pull_only = [
            ("--nbd-listen", args.nbd_listen.is_some()),
            ("--tls-creds", args.tls_creds.is_some()),
            ("--scratch-dir", args.scratch_dir.is_some()),
        ];
        if let Some((flag, _)) = pull_only.iter().find(|(_, given)| *given) {
            bail!(Exit::usage(format!(
                "{flag} is for a pull backup: add --pull, or reach QEMU with --qmp tls://HOST:PORT"
            )));
        }
        qmp.require_local("backup", Local::QemuWritesRepository, &args.vm.target.repo)?;
    } else if let Some(flag) = [
        ("--speed-limit", args.speed_limit > 0),
        ("--compress", args.compress),
    ]
    .iter()
    .find_map(|(flag, given)| given.then_some(flag))
    {
        // They set QEMU's own backup job, which a pull does not run; ignoring them would be a surprise.
        bail!(Exit::usage(format!(
            "{flag} sets QEMU's backup job, which a pull backup does not run: leave it out for --pull (or a QEMU \
             reached over the network)"
        )));
    }
    let hypervisor = qmp.host().map_or_else(chain::host::hostname, str::to_owned);
    let nbd_listen = match (&args.nbd_listen, qmp.host()) {
        (Some(listen), _) => listen.clone(),
        (None, Some(host)) if host.contains(':') => format!("[{host}]:{}", backup::DEFAULT_NBD_PORT),
        (None, Some(host)) => format!("{host}:{}", backup::DEFAULT_NBD_PORT),
        (None, None) => backup::DEFAULT_NBD_LISTEN.to_owned(),
    };
    let _key = args.vm.target.unlock()?;
    let opts = BackupOptions {
        qmp,
        repo: args.vm.target.repo,
        vm: args.vm.target.vm,
        level: match args.level {
            LevelArg::Full => Requested::Full,
            LevelArg::Inc => Requested::Incremental,
            LevelArg::Diff => Requested::Differential,
            LevelArg::Auto => Requested::Auto,
        },
        disks: args.disks,
        exclude: args.exclude,
        speed_limit: args.speed_limit,
        compress: args.compress,
        tag: args.tag,
        qga: if args.quiesce { args.qga } else { None },
        lock_wait: args.vm.target.lock.lock_wait(),
        job_timeout: backup::DEFAULT_JOB_TIMEOUT,
        allow_plaintext: args.allow_plaintext,
        pull: pull.then_some(backup::PullOptions {
            nbd_listen,
            nbd_ports: if args.nbd_listen.is_some() {
                1
            } else {
                backup::DEFAULT_NBD_PORTS
            },
            tls_dir: args.vm.tls_dir,
            insecure_plaintext: args.vm.insecure_plaintext,
            tls_creds: args.tls_creds,
            scratch_dir: args.scratch_dir,
            hypervisor,
        }),
    };
    let interrupt = Interrupt::new()?;
    let progress = Bars::new(!args.json && !args.summary && std::io::stderr().is_terminal());
    let report = backup::backup(&opts, &progress, &interrupt).await;
    progress.clear();
    let report = report?;
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&report)?)?;
    } else if args.summary {
        outln!("{}", summary(&report))?;
    } else {
        print_report(&report)?;
    }
    Ok(())
}

/// `qmpbak backup VM: OK incremental 0005 (parent 0004), 2 disk(s), 12.0 MiB copied, 8.1 MiB stored, 1.2 s`.
fn summary(r: &BackupReport) -> String {
    let copied: u64 = r.disks.iter().map(|d| d.copied_bytes).sum();
    let stored: u64 = r.disks.iter().map(|d| d.stored_bytes).sum();
    format!(
        "qmpbak backup {}: OK {} {}{}, {} disk(s), {} copied, {} stored, {:.1} s",
        r.vm,
        r.level,
        r.node,
        r.parent
            .as_ref()
            .map_or_else(String::new, |p| format!(" (parent {p})")),
        r.disks.len(),
        bytes(copied),
        bytes(stored),
        r.duration_secs
    )
}

fn print_report(r: &BackupReport) -> Result<(), super::out::StdoutError> {
    if !r.plaintext_of_encrypted.is_empty() {
        outln!(
            "warning: encrypted disk(s) {} stored DECRYPTED in this repository (--allow-plaintext)",
            r.plaintext_of_encrypted.join(", ")
        )?;
    }
    if !r.cleaned.is_empty() {
        outln!(
            "cleaned up after an interrupted run: {} (nodes marked failed: {})",
            r.cleaned.operations.join(", "),
            r.cleaned.failed_nodes.join(", ")
        )?;
    }
    outln!(
        "{} backup {} of {} ({}) in {:.1} s{}",
        r.level,
        r.node,
        r.vm,
        r.reason,
        r.duration_secs,
        r.parent
            .as_ref()
            .map_or_else(String::new, |p| format!(", parent {p}"))
    )?;
    for d in &r.disks {
        outln!(
            "  disk {}: {} copied, {} stored ({} virtual){}{}",
            d.disk,
            bytes(d.copied_bytes),
            bytes(d.stored_bytes),
            bytes(d.virtual_size),
            d.pulled_bytes
                .map_or_else(String::new, |p| format!(", {} read over NBD", bytes(p))),
            d.bitmaps_volatile_why
                .as_ref()
                .map_or_else(String::new, |why| format!("; the disk {why}"))
        )?;
    }
    for s in &r.skipped {
        outln!("  skipped {}: {}", s.disk, s.reason)?;
    }
    Ok(())
}
