//! `qmpbak show NODE`: one backup node, its files, and its recovery chain (found by lid/tid).

use anyhow::{Result, bail};

use super::args::RepoVm;
use qmpbak_engine::exit::Exit;
use qmpbak_engine::render;
use qmpbak_engine::repo_reports::ShowReport;

#[derive(clap::Args)]
pub struct Args {
    /// Node id or tag.
    node: String,
    #[command(flatten)]
    target: RepoVm,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(args: &Args) -> Result<()> {
    let (_repo, vm) = args.target.open()?;
    // Read without the lock, as `list` does: the manifest is replaced whole.
    let manifest = vm.load()?;
    let Some(node) = manifest.find(&args.node) else {
        bail!(Exit::usage(render::not_found(&manifest, &args.node)));
    };
    let chain = manifest.recovery_chain(&node.id)?;
    let current = manifest.current.as_ref() == Some(&node.id);
    if args.json {
        outln!(
            "{}",
            serde_json::to_string_pretty(&serde_json::to_value(ShowReport {
                node: node.clone(),
                current,
                recovery_chain: chain.iter().map(|n| n.id.to_string()).collect(),
            })?)?
        )?;
        return Ok(());
    }
    outln!("{}", render::node_line(node, current))?;
    if let Some(reason) = &node.reason {
        outln!("  why:   {reason}")?;
    }
    for disk in &node.disks {
        outln!(
            "  disk {}: {} ({} virtual, {} stored){}",
            disk.disk,
            disk.file,
            render::bytes(disk.virtual_size),
            render::bytes(disk.allocated_bytes),
            disk.backing
                .as_ref()
                .map_or_else(String::new, |b| format!(", backing {b}"))
        )?;
    }
    outln!(
        "  recovery chain: {}",
        chain
            .iter()
            .map(|n| n.id.to_string())
            .collect::<Vec<_>>()
            .join(" <- ")
    )?;
    Ok(())
}
