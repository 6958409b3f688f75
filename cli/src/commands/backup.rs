//! `qmpbak backup`: back up a running VM into its chain in a repository.

use std::collections::HashMap;
use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::sync::Mutex;

use anyhow::Result;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

use super::args::LockArgs;
use qmpbak::backup::{self, BackupOptions, BackupReport};
use qmpbak::plan::Requested;
use qmpbak::progress::Progress;
use qmpbak::render::bytes;
use qmpbak::signals::Interrupt;

#[derive(Clone, Copy, clap::ValueEnum)]
enum LevelArg {
    Full,
    Inc,
    Diff,
    Auto,
}

#[derive(clap::Args)]
pub struct Args {
    /// QEMU's QMP socket.
    #[arg(long)]
    socket: PathBuf,
    /// The backup repository (made with `qmpbak init`).
    #[arg(long, env = "QMPBAK_REPO")]
    repo: PathBuf,
    /// The VM's name in the repository (created on its first backup).
    #[arg(long)]
    vm: String,
    /// full, inc (changes since the last backup), diff (changes since the last full), or auto: incremental
    /// when the bitmaps allow it, full when there is nothing to build on or the repository policy asks for one.
    #[arg(long, value_enum, default_value = "auto")]
    level: LevelArg,
    /// Back up only this disk (qdev id); repeat for more. Default: every disk.
    #[arg(long = "disk", value_name = "ID", conflicts_with = "exclude")]
    disks: Vec<String>,
    /// Leave this disk out; repeat for more.
    #[arg(long, value_name = "ID")]
    exclude: Vec<String>,
    /// Limit each disk's copy to BYTES per second.
    #[arg(long, value_name = "BYTES", default_value_t = 0)]
    speed_limit: u64,
    /// Compress the backup files (qcow2 compressed clusters).
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
    /// Print one JSON result.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    lock: LockArgs,
}

pub async fn run(args: Args) -> Result<()> {
    let opts = BackupOptions {
        socket: args.socket,
        repo: args.repo,
        vm: args.vm,
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
        lock_wait: args.lock.lock_wait(),
        job_timeout: backup::DEFAULT_JOB_TIMEOUT,
    };
    let interrupt = Interrupt::new()?;
    let progress = Bars::new(!args.json && std::io::stderr().is_terminal());
    let report = backup::backup(&opts, &progress, &interrupt).await;
    progress.clear();
    let report = report?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    Ok(())
}

fn print_report(r: &BackupReport) {
    if !r.cleaned.is_empty() {
        println!(
            "cleaned up after an interrupted run: {} (nodes marked failed: {})",
            r.cleaned.operations.join(", "),
            r.cleaned.failed_nodes.join(", ")
        );
    }
    println!(
        "{} backup {} of {} ({}) in {:.1} s{}",
        r.level,
        r.node,
        r.vm,
        r.reason,
        r.duration_secs,
        r.parent
            .as_ref()
            .map_or_else(String::new, |p| format!(", parent {p}"))
    );
    for d in &r.disks {
        println!(
            "  disk {}: {} copied, {} stored ({} virtual)",
            d.disk,
            bytes(d.copied_bytes),
            bytes(d.stored_bytes),
            bytes(d.virtual_size)
        );
    }
}

/// Progress bars on a terminal; phase lines only otherwise (nothing animated when not a TTY).
struct Bars {
    multi: Option<MultiProgress>,
    per_disk: Mutex<HashMap<String, ProgressBar>>,
    quiet: bool,
}

impl Bars {
    fn new(tty: bool) -> Bars {
        Bars {
            multi: tty.then(MultiProgress::new),
            per_disk: Mutex::new(HashMap::new()),
            quiet: !tty,
        }
    }

    fn clear(&self) {
        if let Ok(mut bars) = self.per_disk.lock() {
            for (_, bar) in bars.drain() {
                bar.finish_and_clear();
            }
        }
    }
}

impl Progress for Bars {
    fn phase(&self, message: &str) {
        match &self.multi {
            Some(multi) => {
                let _ = multi.println(message);
            }
            None if !self.quiet => eprintln!("{message}"),
            None => {}
        }
    }

    fn advance(&self, disk: &str, done: u64, total: u64) {
        let Some(multi) = &self.multi else { return };
        let Ok(mut bars) = self.per_disk.lock() else {
            return;
        };
        let bar = bars.entry(disk.to_owned()).or_insert_with(|| {
            let bar = multi.add(ProgressBar::new(total));
            let style = ProgressStyle::with_template(
                "{prefix:>10} [{bar:40}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
            )
            .map(|s| s.progress_chars("=> "));
            if let Ok(style) = style {
                bar.set_style(style);
            }
            bar.set_prefix(disk.to_owned());
            bar
        });
        bar.set_length(total);
        bar.set_position(done);
    }

    fn finish_disk(&self, disk: &str) {
        if let Ok(bars) = self.per_disk.lock() {
            if let Some(bar) = bars.get(disk) {
                bar.finish();
            }
        }
    }
}
