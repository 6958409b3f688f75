//! `qmpbak qmp --socket PATH | --qmp URL COMMAND [ARGS-JSON]`: send one raw QMP command and print its reply, for scripts
//! and for looking at what qmpbak sees (for example `human-monitor-command` or `query-jobs`).

use anyhow::{Context, Result};

use super::args::Monitor;
use qmpbak_engine::exit::Exit;
use qmpbak_engine::inspect;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    monitor: Monitor,
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
    let target = args.monitor.required()?;
    let qmp = inspect::connect(&target).await?;
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
