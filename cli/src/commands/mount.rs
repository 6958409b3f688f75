//! `qmpbak mount NODE DIR` (a node's disk read-only: its file systems under DIR, `--list` of its partitions, or
//! `--image-only` as a raw image file) and `qmpbak umount DIR`.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::Result;

use super::args::RepoVm;
use super::bars::Bars;
use qmpbak_engine::mount::{self, MountMode, MountOptions, MountReport};
use qmpbak_engine::render::bytes;

#[derive(clap::Args)]
pub struct Args {
    /// Node id or tag.
    node: String,
    /// An existing, empty directory: a disk without partition table is mounted on it, partition N on DIR/pN.
    /// With --image-only the image is DIR/DISK.img; --list needs none.
    #[arg(required_unless_present = "list")]
    dir: Option<PathBuf>,
    #[command(flatten)]
    target: RepoVm,
    /// The disk (qdev id); needed when the node has several.
    #[arg(long, value_name = "ID")]
    disk: Option<String>,
    /// Only list the disk's partitions, file systems and sizes; mount nothing.
    #[arg(long, conflicts_with = "image_only")]
    list: bool,
    /// Only make the read-only disk image available as DIR/DISK.img (raw; for guestfish, qemu-img, 7z ...).
    /// Needs no root.
    #[arg(long)]
    image_only: bool,
    /// Mount a node whose data does not match its checking table (or that has none).
    #[arg(long)]
    force: bool,
    /// Print one JSON result.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
pub struct UmountArgs {
    /// The directory given to `qmpbak mount` (also after that qmpbak was killed).
    dir: PathBuf,
    /// Print one JSON result.
    #[arg(long)]
    json: bool,
}

pub async fn run(args: Args) -> Result<()> {
    let mode = if args.list {
        MountMode::List
    } else if args.image_only {
        MountMode::ImageOnly
    } else {
        MountMode::Mount
    };
    let opts = MountOptions {
        repo: args.target.repo.clone(),
        vm: args.target.vm.clone(),
        node: args.node,
        disk: args.disk,
        dir: if args.list { None } else { args.dir },
        mode,
        force: args.force,
        lock_wait: args.target.lock.lock_wait(),
        key: args.target.key.source(),
    };
    let report = mount::mount(&opts, &Bars::new(false)).await?;
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&report)?)?;
    } else {
        print_report(&report)?;
    }
    Ok(())
}

fn print_report(r: &MountReport) -> Result<(), super::out::StdoutError> {
    let check = if r.verified {
        "checked against its checking table"
    } else {
        "DAMAGED, mounted because of --force"
    };
    outln!(
        "node {} of {}, disk {} ({}, {check})",
        r.node,
        r.vm,
        r.disk,
        bytes(r.virtual_size)
    )?;
    if r.mode == MountMode::ImageOnly {
        if let Some(image) = &r.image {
            outln!("read-only raw image: {}", image.display())?;
        }
    } else {
        match &r.partition_table {
            Some(table) => outln!("partition table: {table}")?,
            None => outln!("no partition table")?,
        }
        for p in &r.partitions {
            let name = if p.number == 0 {
                "disk".to_owned()
            } else {
                format!("p{}", p.number)
            };
            let mut line = format!(
                "  {name:<5} {:>10}  {:<8}",
                bytes(p.size),
                p.fstype.as_deref().unwrap_or("-")
            );
            if let Some(label) = &p.label {
                let _ = write!(line, " label {label}");
            }
            if let Some(at) = &p.mounted_at {
                let _ = write!(line, "  mounted read-only on {}", at.display());
                if let Some(driver) = &p.fuse_driver {
                    let _ = write!(
                        line,
                        " (through {driver}: the kernel has no {})",
                        p.fstype.as_deref().unwrap_or("driver")
                    );
                }
            }
            if let Some(err) = &p.error {
                let _ = write!(line, "  not mounted: {err}");
            }
            outln!("{line}")?;
        }
    }
    if let Some(dir) = &r.dir {
        if r.mode != MountMode::List {
            outln!("`qmpbak umount {}` undoes it", dir.display())?;
        }
    }
    Ok(())
}

pub async fn umount(args: &UmountArgs) -> Result<()> {
    let report = mount::umount(&args.dir).await?;
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&report)?)?;
    } else {
        outln!(
            "unmounted node {} of {}, disk {}, from {}{}",
            report.node,
            report.vm,
            report.disk,
            report.dir.display(),
            if report.interrupted {
                " (its mount had been interrupted)"
            } else {
                ""
            }
        )?;
    }
    Ok(())
}
