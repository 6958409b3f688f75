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
            // A table build whose source failed: the source's class when it is QEMU's (a view read over
            // NBD whose connection broke is QEMU's or the network's fault, not the repository's).
            if e.kind() == chain::ErrorKind::Io {
                if let Some(code) = peer_code_in_io(err) {
                    return code;
                }
            }
            return chain_code(e.kind());
        }
        if let Some(e) = cause.downcast_ref::<qmp::Error>() {
            return qmp_code(e.kind());
        }
        if let Some(e) = cause.downcast_ref::<nbd::Error>() {
            return nbd_code(e.kind());
        }
        // Unusable TLS credentials, read before a connection: the class of the TLS errors above.
        if cause.downcast_ref::<qmp::pki::Error>().is_some() {
            return nbd_code(nbd::ErrorKind::Tls);
        }
    }
    ExitCode::Failure
}

/// The class of an NBD or QMP error carried inside an `io::Error` of `err`'s chain (`io::Error::other`, as the
/// NBD block sources wrap theirs; the inner error is not itself in the chain, only reachable by `get_ref`).
fn peer_code_in_io(err: &anyhow::Error) -> Option<ExitCode> {
    err.chain().find_map(|cause| {
        let inner = cause.downcast_ref::<std::io::Error>()?.get_ref()?;
        if let Some(e) = inner.downcast_ref::<nbd::Error>() {
            return Some(nbd_code(e.kind()));
        }
        inner.downcast_ref::<qmp::Error>().map(|e| qmp_code(e.kind()))
    })
}

/// The exit code of a repository error's kind. Exhaustive, so a new kind must be given a code here.
fn chain_code(kind: chain::ErrorKind) -> ExitCode {
    use chain::ErrorKind as K;
    match kind {
        K::LockHeld => ExitCode::LockHeld,
        K::Interrupted => ExitCode::Interrupted,
        K::Usage => ExitCode::Usage,
        K::Io | K::NotARepository | K::Exists | K::Invalid | K::Key | K::Refused => ExitCode::Repository,
    }
}

/// The exit code of a QMP error's kind: whatever went wrong talking to QEMU is QEMU's class, TLS included
/// (as for NBD).
fn qmp_code(kind: qmp::ErrorKind) -> ExitCode {
    use qmp::ErrorKind as K;
    match kind {
        K::Connect | K::Timeout | K::Closed | K::Refused | K::Decode | K::Io | K::Tls => ExitCode::Qemu,
    }
}

/// The exit code of an NBD error's kind: the NBD server is QEMU's, so its failures are QEMU's class.
fn nbd_code(kind: nbd::ErrorKind) -> ExitCode {
    use nbd::ErrorKind as K;
    match kind {
        K::Connect | K::Server | K::Closed | K::Timeout | K::Refused | K::Tls | K::Io => ExitCode::Qemu,
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::path::PathBuf;

    use anyhow::Context as _;

    use super::*;

    fn code(err: impl std::error::Error + Send + Sync + 'static) -> ExitCode {
        classify(&anyhow::Error::new(err).context("doing something"))
    }

    #[test]
    fn repository_errors_map_by_kind() {
        let lock = chain::Error::LockHeld {
            vm: "vm".into(),
            lock: PathBuf::from("/r/vm/lock"),
            holder: None,
            stale: false,
        };
        assert_eq!(code(lock), ExitCode::LockHeld);
        let missing = chain::Error::VmNotFound {
            repo: PathBuf::from("/r"),
            vm: "vm".into(),
        };
        assert_eq!(code(missing), ExitCode::Usage);
        let name = chain::check_name("VM name", "../x").unwrap_err();
        assert_eq!(code(name), ExitCode::Usage);
        let not_repo = chain::Error::NotARepository {
            path: PathBuf::from("/r"),
        };
        assert_eq!(code(not_repo), ExitCode::Repository);
        let io = chain::Error::Io {
            action: "read",
            path: PathBuf::from("/r/x"),
            source: io::Error::from(io::ErrorKind::PermissionDenied),
        };
        assert_eq!(code(io), ExitCode::Repository);
        assert_eq!(code(chain::Error::WrongKey), ExitCode::Repository);
    }

    #[test]
    fn qemu_errors_are_qemu_and_a_full_disk_is_a_plain_failure() {
        assert_eq!(code(qmp::Error::Closed { detail: "eof".into() }), ExitCode::Qemu);
        assert_eq!(code(nbd::Error::Closed), ExitCode::Qemu);
        // A view read over NBD failing inside a table build is the NBD server's (or the network's) class.
        let read = chain::Error::SourceRead {
            source_name: "the disk's view".into(),
            offset: 0,
            len: 4096,
            source: io::Error::other(nbd::Error::Broken {
                detail: "Connection timed out (os error 110)".into(),
            }),
        };
        assert_eq!(code(read), ExitCode::Qemu);
        let local = chain::Error::SourceRead {
            source_name: "/r/vm/0001/disk0.qcow2".into(),
            offset: 0,
            len: 4096,
            source: io::Error::from(io::ErrorKind::UnexpectedEof),
        };
        assert_eq!(code(local), ExitCode::Repository);
        // TLS failures of QMP and NBD, and unusable credentials, are one class.
        let plaintext = qmp::Error::PlaintextRefused {
            target: "tcp://hv1:4444".into(),
        };
        assert_eq!(code(plaintext), ExitCode::Qemu);
        assert_eq!(code(nbd::Error::TlsRequired), ExitCode::Qemu);
        let creds = qmp::pki::Error::Credentials {
            path: PathBuf::from("/etc/qmpbak/pki/ca-cert.pem"),
            reason: "missing".into(),
        };
        assert_eq!(code(creds), ExitCode::Qemu);
        let full = chain::Error::Io {
            action: "write",
            path: PathBuf::from("/r/x"),
            source: io::Error::from_raw_os_error(nix::libc::ENOSPC),
        };
        assert_eq!(code(full), ExitCode::Failure);
        assert_eq!(code(io::Error::other("plain")), ExitCode::Failure);
    }

    #[test]
    fn an_exit_decides_and_interrupted_wins_over_everything() {
        let usage: anyhow::Error = Exit::usage("bad").into();
        assert_eq!(classify(&usage), ExitCode::Usage);
        let interrupted = Err::<(), _>(Exit::new(ExitCode::Interrupted, "stopped"))
            .context(io::Error::from_raw_os_error(nix::libc::ENOSPC).to_string())
            .unwrap_err();
        assert_eq!(classify(&interrupted), ExitCode::Interrupted);
        // An Exit below a context still decides.
        let wrapped = anyhow::Error::new(Exit::usage("bad")).context("while doing something");
        assert_eq!(classify(&wrapped), ExitCode::Usage);
    }
}
