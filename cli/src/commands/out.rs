//! Standard output for the commands: writes that return their error instead of panicking as `println!` does,
//! so that output into a pipe whose reader has gone (`qmpbak list | head -1`) ends the command quietly with
//! exit status 141, as a process killed by SIGPIPE would (see [`Command::run`](super::Command::run)). Standard
//! error: messages whose write failure is ignored ([`errln!`]), so that a full or closed standard error never
//! turns a failure's documented exit code into a panic's 101.

use std::fmt;
use std::io::{self, Write};

/// What a command exits with when its standard output is a pipe nobody reads any more: 128 + SIGPIPE.
pub const BROKEN_PIPE_EXIT: i32 = 141;

/// Writing to standard output failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot write to standard output")]
pub struct StdoutError(#[source] pub io::Error);

/// Whether `err` is a write to standard output whose reader has gone.
pub fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause
            .downcast_ref::<StdoutError>()
            .is_some_and(|e| e.0.kind() == io::ErrorKind::BrokenPipe)
    })
}

/// Writes `args` to standard output and flushes it.
pub fn write(args: fmt::Arguments<'_>) -> Result<(), StdoutError> {
    let mut out = io::stdout().lock();
    out.write_fmt(args)
        .and_then(|()| out.flush())
        .map_err(StdoutError)
}

/// `print!` that returns a [`StdoutError`] instead of panicking.
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::commands::out::write(format_args!($($arg)*))
    };
}

/// `println!` that returns a [`StdoutError`] instead of panicking.
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::commands::out::write(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// Writes `args` and a newline to standard error; a failure to write is ignored (nobody can be told of it).
pub fn write_err(args: fmt::Arguments<'_>) {
    let mut err = io::stderr().lock();
    let _ = err.write_fmt(args).and_then(|()| err.write_all(b"\n"));
}

/// `eprintln!` that never panics ([`write_err`]).
macro_rules! errln {
    ($($arg:tt)*) => {
        $crate::commands::out::write_err(format_args!($($arg)*))
    };
}
