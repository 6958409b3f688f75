//! The process exit codes of `qmpbak`, in one place (the README's table is written from this), and the mapping
//! from an error chain to its code.

use std::fmt;

/// What a `qmpbak` run ended with. Scripts may rely on these numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitCode {
    /// The command did what was asked.
    Success = 0,
    /// A failure that fits none of the classes below.
    Failure = 1,
    /// Bad arguments, or a name (VM, node, disk, tag) that does not exist.
    Usage = 2,
    /// Not a repository, or its manifest or a checking table is invalid.
    Repository = 3,
    /// Another qmpbak holds the VM's lock.
    LockHeld = 4,
    /// QEMU could not be reached, is not speaking QMP, or refused or failed an operation.
    Qemu = 5,
    /// Verification found damaged backup data.
    Damaged = 6,
    /// Interrupted by SIGINT or SIGTERM after cleaning up.
    Interrupted = 130,
}

impl ExitCode {
    pub fn code(self) -> u8 {
        self as u8
    }

    /// A stable word for the class, for the `kind` of a `--json` error.
    pub fn kind(self) -> &'static str {
        match self {
            ExitCode::Success => "success",
            ExitCode::Failure => "failure",
            ExitCode::Usage => "usage",
            ExitCode::Repository => "repository",
            ExitCode::LockHeld => "lock-held",
            ExitCode::Qemu => "qemu",
            ExitCode::Damaged => "damaged",
            ExitCode::Interrupted => "interrupted",
        }
    }
}

/// The one JSON object a command run with `--json` prints on stdout when it fails:
/// `{"error": {"code", "kind", "message", "causes"}}`; `message` is the outermost context, `causes` the
/// errors below it, outermost first.
pub fn json_error(code: ExitCode, message: &str, causes: &[String]) -> serde_json::Value {
    serde_json::json!({ "error": {
        "code": code.code(),
        "kind": code.kind(),
        "message": message,
        "causes": causes,
    } })
}

/// [`json_error`] for an error chain.
pub fn json_error_of(err: &anyhow::Error) -> serde_json::Value {
    let causes: Vec<String> = err.chain().skip(1).map(ToString::to_string).collect();
    json_error(classify(err), &err.to_string(), &causes)
}

/// An error that carries its own exit code: for failures that are decided in the CLI layer (usage errors,
/// verification results, interruption) rather than in a library.
#[derive(Debug)]
pub struct Exit {
    pub code: ExitCode,
    pub message: String,
}

impl Exit {
    pub fn new(code: ExitCode, message: impl Into<String>) -> Exit {
        Exit {
            code,
            message: message.into(),
        }
    }

    pub fn usage(message: impl Into<String>) -> Exit {
        Exit::new(ExitCode::Usage, message)
    }
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Exit {}

/// Whether the error comes from a full filesystem (ENOSPC or EDQUOT, from qmpbak's own writes or as QEMU words
/// it in a failed job).
pub fn is_no_space(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::raw_os_error)
            .is_some_and(|e| e == nix::libc::ENOSPC || e == nix::libc::EDQUOT)
            || cause.to_string().contains("No space left on device")
            || cause.to_string().contains("Disk quota exceeded")
    })
}

/// The exit code for an error: the first cause in the chain that has a known class decides. A full
/// filesystem is no fault of QEMU's nor of the repository's contents: it is a plain failure (1), whoever met it.
pub fn classify(err: &anyhow::Error) -> ExitCode {
    if let Some(exit) = err.chain().find_map(|c| c.downcast_ref::<Exit>()) {
        if exit.code == ExitCode::Interrupted {
            return exit.code;
        }
    }
    if is_no_space(err) {
        return ExitCode::Failure;
    }
    for cause in err.chain() {
        if let Some(exit) = cause.downcast_ref::<Exit>() {
            return exit.code;
        }
        if let Some(e) = cause.downcast_ref::<chain::Error>() {
            return match e {
                chain::Error::LockHeld { .. } => ExitCode::LockHeld,
                chain::Error::VmNotFound { .. } | chain::Error::InvalidName { .. } => ExitCode::Usage,
                _ => ExitCode::Repository,
            };
        }
        if cause.downcast_ref::<qmp::Error>().is_some() || cause.downcast_ref::<nbd::Error>().is_some() {
            return ExitCode::Qemu;
        }
    }
    ExitCode::Failure
}
