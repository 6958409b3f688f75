//! `qmpbak list REPO[/VM]`: the VMs of a repository, or one VM's backup tree.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

use super::args::LockArgs;
use qmpbak_engine::render;
use qmpbak_engine::repo_reports::{TreeReport, VmRow};

#[derive(clap::Args)]
pub struct Args {
    /// A repository (lists its VMs) or a VM directory inside one (draws its tree).
    path: PathBuf,
    /// Print JSON instead of a drawing.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    lock: LockArgs,
}

pub fn run(args: &Args) -> Result<()> {
    if chain::Repository::open(&args.path).is_ok() {
        return list_vms(&args.path, args.json);
    }
    let (Some(parent), Some(name)) = (args.path.parent(), args.path.file_name()) else {
        bail!(qmpbak_engine::exit::Exit::usage(format!(
            "{} is not a repository",
            args.path.display()
        )));
    };
    let parent = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    let repo = chain::Repository::open(parent)?;
    let vm = repo.vm(&name.to_string_lossy())?;
    // The manifest is replaced whole (written aside, renamed): read without the lock, it is the one last saved,
    // also while a backup holds the lock for a long time.
    let manifest = vm.load()?;
    if args.json {
        outln!(
            "{}",
            serde_json::to_string_pretty(&serde_json::to_value(TreeReport {
                vm: manifest.vm.clone(),
                chain_id: manifest.chain_id.clone(),
                current: manifest.current.clone(),
                nodes: manifest.nodes.clone(),
            })?)?
        )?;
    } else {
        let current = manifest
            .current
            .as_ref()
            .map_or_else(|| "none".to_owned(), ToString::to_string);
        outln!(
            "{}: {} nodes, current {current}",
            manifest.vm,
            manifest.nodes.len()
        )?;
        out!("{}", render::tree(&manifest))?;
    }
    Ok(())
}

fn list_vms(path: &Path, json: bool) -> Result<()> {
    let repo = chain::Repository::open(path)?;
    let mut rows = Vec::new();
    for name in repo.vms()? {
        let vm = repo.vm(&name)?;
        let manifest = vm.load()?;
        let last = manifest.nodes.iter().map(|n| n.created).max();
        rows.push(VmRow {
            vm: name,
            nodes: manifest.nodes.len(),
            current: manifest.current,
            last_backup: last,
        });
    }
    // Through a `Value`, as before the type: printed with its keys sorted, and read for the text.
    let rows = serde_json::to_value(rows)?;
    let rows = rows.as_array().map(Vec::as_slice).unwrap_or_default();
    if json {
        outln!("{}", serde_json::to_string_pretty(rows)?)?;
    } else if rows.is_empty() {
        outln!("{}: no VMs backed up yet", repo.path().display())?;
    } else {
        for row in rows {
            outln!(
                "{:<24} {:>5} nodes  current {}  last backup {}",
                row["vm"].as_str().unwrap_or_default(),
                row["nodes"],
                row["current"].as_str().unwrap_or("none"),
                row["last_backup"].as_str().unwrap_or("never")
            )?;
        }
    }
    Ok(())
}
