//! `qmpbak qmp --socket PATH COMMAND [ARGS-JSON]`: send one raw QMP command and print its reply, for scripts
//! and for looking at what qmpbak sees (for example `human-monitor-command` or `query-jobs`).

use std::path::PathBuf;

use anyhow::{Context, Result};

use qmpbak::exit::Exit;
use qmpbak::inspect;

#[derive(clap::Args)]
pub struct Args {
    /// QEMU's QMP socket.
    #[arg(long)]
    socket: PathBuf,
    /// The QMP command, e.g. query-block.
    command: String,
    /// Its arguments as a JSON object.
    arguments: Option<String>,
}

pub async fn run(args: Args) -> Result<()> {
    let arguments = match &args.arguments {
        Some(text) => Some(
            serde_json::from_str::<serde_json::Value>(text)
                .map_err(|e| Exit::usage(format!("arguments are not JSON ({e}): {text}")))?,
        ),
        None => None,
    };
    let qmp = inspect::connect(&args.socket).await?;
    let reply = qmp
        .execute_raw(&args.command, arguments)
        .await
        .with_context(|| format!("QMP {}", args.command))?;
    match reply {
        serde_json::Value::String(text) => out!("{text}")?,
        other => outln!("{}", serde_json::to_string_pretty(&other)?)?,
    }
    Ok(())
}
