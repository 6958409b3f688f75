//! The `qmpbak` binary: parses the command line, dispatches to one module per subcommand, and prints an error
//! once, with its whole cause chain, mapped to a documented exit code.

// `println!` and `eprintln!` panic when their stream cannot be written (a closed pipe, a full disk): every
// message goes through `commands::out` instead, so that a failure keeps its documented exit code.
#![deny(clippy::print_stdout, clippy::print_stderr)]

mod commands;
mod logging;

use std::process::ExitCode;

use clap::Parser;

/// mimalloc: loading a large manifest is allocation-bound (many small strings), and the system allocator
/// costs `qmpbak list` of a 10 000-node chain about a fifth of its time. It is built with `no_thp`: with
/// transparent huge pages its arenas are touched 2 MiB at a time, so a backup's or restore's resident size
/// followed how many huge pages its reused buffers had happened to land on (26 vs 33 MiB for a 1 vs 8 GiB
/// restore) rather than what it holds (12 vs 13 MiB without). `list` loses about 12 ms of 43 to that.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // Everything qmpbak and its children create holds or serves guest data: private to the owner whatever
    // umask the caller has (a umask of 000 would make sockets and images world-accessible).
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let json = wants_json(std::env::args_os().skip(1));
    let cli = match commands::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // Usage errors are exit 2 (clap's, and ours); `--help` and `--version` are not errors.
            if json && e.use_stderr() {
                // clap's text: "error: WHAT" (maybe over several lines), then the usage.
                let text = e.render().to_string();
                let what = text.split("\n\nUsage:").next().unwrap_or_default();
                let what = what.trim().strip_prefix("error: ").unwrap_or(what);
                let message = what.split_whitespace().collect::<Vec<_>>().join(" ");
                let err =
                    qmpbak_engine::exit::json_error(qmpbak_engine::exit::ExitCode::Usage, &message, &[]);
                let _ = commands::out::write(format_args!("{err}\n"));
            }
            e.exit()
        }
    };
    logging::init(cli.verbose);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            commands::out::write_err(format_args!("qmpbak: cannot start the async runtime: {e}"));
            return ExitCode::FAILURE;
        }
    };
    let summary = cli.command.summary_subject();
    let result = runtime.block_on(cli.command.run());
    // Hashing threads of an interrupted or failed run may still be reading: they are not waited for.
    runtime.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            let code = qmpbak_engine::exit::classify(&err);
            commands::out::write_err(format_args!("qmpbak: {err:#}"));
            if qmpbak_engine::exit::is_no_space(&err) {
                commands::out::write_err(format_args!(
                    "qmpbak: a filesystem is full (the repository's, or the restore's target): free space or \
                     `qmpbak prune`, then run again; nothing half-written was kept"
                ));
            }
            if json && !commands::report_printed() {
                let _ = commands::out::write(format_args!("{}\n", qmpbak_engine::exit::json_error_of(&err)));
            }
            if let Some(subject) = summary {
                let summary = commands::failure_summary(&subject, code.code(), &err);
                let _ = commands::out::write(format_args!("{summary}\n"));
            }
            ExitCode::from(code.code())
        }
    }
}

/// Whether the command line asks for `--json` (before any `--`): then a failure is also printed on stdout as
/// one JSON object, so a script reading stdout always gets JSON.
fn wants_json(args: impl Iterator<Item = std::ffi::OsString>) -> bool {
    args.take_while(|a| a != "--").any(|a| a == "--json")
}
