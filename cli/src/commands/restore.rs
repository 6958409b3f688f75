//! `qmpbak restore NODE`: offline into new image files (`--to`), or live into a running VM (`--live`).

use std::io::IsTerminal as _;
use std::path::PathBuf;

use anyhow::{Result, bail};

use super::args::{Monitor, RepoVm, ServeArgs};
use super::bars::Bars;
use qmpbak_engine::exit::Exit;
use qmpbak_engine::qmp_target::Local;
use qmpbak_engine::restore::live::{self, LiveOptions, ServedOptions, Source};
use qmpbak_engine::restore::offline::{self, Format, RestoreOptions};
use qmpbak_engine::signals::Interrupt;

#[derive(Clone, Copy, clap::ValueEnum)]
enum FormatArg {
    Qcow2,
    Raw,
}

#[derive(clap::Args)]
pub struct Args {
    /// Node id or tag to restore.
    node: String,
    #[command(flatten)]
    target: RepoVm,
    /// Offline: a directory (one image per disk, `<disk>.<format>`) or, for one disk, the image file.
    #[arg(long, required_unless_present = "live", conflicts_with = "live")]
    to: Option<PathBuf>,
    /// Image format of an offline restore (raw output is sparse).
    #[arg(long, value_enum, default_value = "qcow2")]
    format: FormatArg,
    /// Live: restore into the running VM behind --socket (or --qmp), whose disks are empty images of the right
    /// size.
    #[arg(long)]
    live: bool,
    /// QEMU's QMP monitor (with --live).
    #[command(flatten)]
    monitor: Monitor,
    /// Only this disk; repeat for more. Default: every disk of the node.
    #[arg(long = "disk", value_name = "ID")]
    disks: Vec<String>,
    /// Overwrite existing output files, and keep a result that does not match its checking table.
    #[arg(long)]
    force: bool,
    /// After an offline restore, make the node the VM's current node, so the next backup branches from it.
    #[arg(long, conflicts_with = "live")]
    set_current: bool,
    /// Offline: encrypt the restored qcow2 images with LUKS, passphrase read from KEYFILE (exactly its bytes,
    /// as QEMU's `--object secret,file=KEYFILE` reads them to open the images later).
    #[arg(long, value_name = "KEYFILE", conflicts_with = "live")]
    encrypt_output: Option<PathBuf>,
    /// Limit live streaming to BYTES per second per disk.
    #[arg(long, value_name = "BYTES", default_value_t = 0)]
    speed_limit: u64,
    #[command(flatten)]
    serve: ServeArgs,
    /// Live across hosts: the VM's QEMU object to reach this host's NBD server with (a tls-creds-x509 with
    /// endpoint=client). Default: its only such object, unless --target-tls-dir.
    #[arg(long, value_name = "ID", conflicts_with = "target_tls_dir")]
    target_tls_creds: Option<String>,
    /// Live across hosts: a directory on the VM's host (absolute) with ca-cert.pem, client-cert.pem and
    /// client-key.pem; qmpbak adds a client tls-creds-x509 object reading it for the run.
    #[arg(long, value_name = "DIR")]
    target_tls_dir: Option<PathBuf>,
    /// Live across hosts: seconds the VM's NBD client keeps reconnecting to this host before a read of data not
    /// streamed yet fails (QEMU's reconnect-delay).
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    reconnect_delay: u32,
    /// Live across hosts: the address the VM's QEMU's NBD server listens on, and qmpbak connects to, while it
    /// proves the target disks empty (TLS from the VM's server tls-creds-x509 object and --tls-dir). Default:
    /// the --qmp host, port 10809.
    #[arg(long, value_name = "HOST:PORT")]
    nbd_listen: Option<String>,
    /// Live across hosts: the id of the VM's tls-creds-x509 object (endpoint=server) for that NBD server
    /// (default: its only one), as for a pull backup.
    #[arg(long, value_name = "ID")]
    tls_creds: Option<String>,
    /// Print one JSON result.
    #[arg(long)]
    json: bool,
}

pub async fn run(args: Args) -> Result<()> {
    let live_qmp = match (args.live, args.monitor.target()?) {
        (true, None) => bail!(Exit::usage("--live needs --socket or --qmp")),
        (true, Some(qmp)) if qmp.is_remote() => {
            // Across hosts: this host serves the node's chain over NBD.
            let creds = args.serve.credentials(args.monitor.insecure_plaintext)?;
            if creds.tls_dir.is_none() && !creds.insecure_plaintext {
                bail!(Exit::usage(
                    "restore --live over --qmp tls:// or tcp:// serves the backup from this host over NBD: give \
                     --serve-tls-dir DIR (ca-cert.pem, server-cert.pem, server-key.pem), or --insecure-plaintext \
                     (nothing was done)"
                ));
            }
            qmpbak_engine::serve::set_credentials(creds.clone());
            let source = Source::Served(ServedOptions {
                listen: args.serve.serve_listen,
                creds,
                target_tls_creds: args.target_tls_creds.clone(),
                target_tls_dir: args.target_tls_dir.clone(),
                reconnect_delay: args.reconnect_delay,
                nbd_listen: args.nbd_listen.clone(),
                tls_creds: args.tls_creds.clone(),
            });
            Some((qmp, source))
        }
        (true, Some(_)) if args.tls_creds.is_some() => bail!(Exit::usage(
            "--tls-creds is for a live restore across hosts (--qmp tls://); on this host the VM's QEMU serves \
             the emptiness check on a private Unix socket, without TLS"
        )),
        (true, Some(_)) if args.nbd_listen.is_some() => bail!(Exit::usage(
            "--nbd-listen is for a live restore across hosts (--qmp tls:// or tcp://); on this host the VM's \
             QEMU serves the emptiness check on a private Unix socket"
        )),
        (true, Some(qmp)) => {
            // QEMU opens the node's files in the repository: it must reach them.
            qmp.require_local("restore --live", Local::QemuReadsRepository, &args.target.repo)?;
            Some((qmp, Source::Local))
        }
        (false, _) => None,
    };
    let _key = args.target.unlock()?;
    if let Some((qmp, source)) = live_qmp {
        let opts = LiveOptions {
            repo: args.target.repo.clone(),
            vm: args.target.vm.clone(),
            node: args.node,
            qmp,
            disks: args.disks,
            speed_limit: args.speed_limit,
            lock_wait: args.target.lock.lock_wait(),
            source,
        };
        let interrupt = Interrupt::new()?;
        let progress = Bars::new(!args.json && std::io::stderr().is_terminal());
        let report = live::restore_live(&opts, &progress, &interrupt).await;
        progress.clear();
        let report = report?;
        if args.json {
            outln!("{}", serde_json::to_string_pretty(&report)?)?;
        } else {
            outln!(
                "node {} of {} restored live into {}: VM running after {:.2} s, streaming done after {:.1} s",
                report.node,
                report.vm,
                report.disks.join(", "),
                report.running_after_secs,
                report.duration_secs
            )?;
        }
        return Ok(());
    }
    let Some(to) = args.to else {
        bail!(Exit::usage(
            "give --to DIR|FILE (offline) or --live --socket SOCK"
        ))
    };
    let opts = RestoreOptions {
        repo: args.target.repo.clone(),
        vm: args.target.vm.clone(),
        node: args.node,
        to,
        format: match args.format {
            FormatArg::Qcow2 => Format::Qcow2,
            FormatArg::Raw => Format::Raw,
        },
        disks: args.disks,
        force: args.force,
        set_current: args.set_current,
        lock_wait: args.target.lock.lock_wait(),
        encrypt_output: args.encrypt_output,
    };
    let interrupt = Interrupt::new()?;
    let report = interrupt
        .run(
            offline::restore(&opts, &Bars::new(false)),
            "the restore was stopped and its partial images removed; nothing is left under the --to names",
        )
        .await?;
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&report)?)?;
    } else {
        for d in &report.disks {
            let check = if d.verified {
                "matches its checking table"
            } else {
                "DOES NOT match its checking table"
            };
            outln!(
                "node {} disk {} -> {} ({check})",
                report.node,
                d.disk,
                d.path.display()
            )?;
        }
    }
    Ok(())
}
