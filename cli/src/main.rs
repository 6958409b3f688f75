//! The `qmpbak` binary: parses the command line, dispatches to one module per subcommand, and prints an error
//! once, with its whole cause chain, mapped to a documented exit code.

mod commands;

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
    let cli = commands::Cli::parse();
    qmpbak::logging::init(cli.verbose);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("qmpbak: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let summary = cli.command.summary_subject();
    match runtime.block_on(cli.command.run()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            let code = qmpbak::exit::classify(&err);
            eprintln!("qmpbak: {err:#}");
            if let Some(subject) = summary {
                println!("{}", commands::failure_summary(&subject, code.code(), &err));
            }
            ExitCode::from(code.code())
        }
    }
}
