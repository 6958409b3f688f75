//! Logs to stderr through `tracing`, off unless asked: `-v` shows qmpbak's steps (info), `-vv` adds every QMP
//! command, reply and event (debug, target `qmp_wire`), `-vvv` everything (trace). `QMPBAK_LOG`, a tracing filter
//! (`qmp_wire=debug`), overrides the flags. Results still go to stdout; logs never mix with them.

use tracing_subscriber::EnvFilter;

/// The environment variable that overrides `-v`.
pub const LOG_ENV: &str = "QMPBAK_LOG";

/// Installs the stderr logger for a verbosity (the count of `-v`). Without `-v` and without `QMPBAK_LOG`
/// nothing is installed, and logging costs next to nothing.
pub fn init(verbosity: u8) {
    let filter = match std::env::var(LOG_ENV) {
        Ok(spec) if !spec.trim().is_empty() => EnvFilter::new(spec),
        _ => match verbosity {
            0 => return,
            1 => EnvFilter::new("info"),
            2 => EnvFilter::new("debug"),
            _ => EnvFilter::new("trace"),
        },
    };
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    // Another subscriber already installed (a test harness) wins; that is no error.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .with_target(true)
        .try_init();
    let args: Vec<String> = std::env::args().collect();
    tracing::info!(version = env!("CARGO_PKG_VERSION"), command = %args.join(" "), "qmpbak starts");
}
