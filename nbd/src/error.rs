//! The crate's error type: one variant per failure a caller can act on, with the context needed to print
//! it once at the edge.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use crate::proto::{Command, errno};

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong talking to an NBD server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The socket could not be opened.
    #[error("cannot connect to the NBD server at {target}")]
    Connect {
        target: String,
        #[source]
        source: io::Error,
    },

    /// The server is not a fixed-newstyle NBD server, refused the negotiation, or broke the handshake rules.
    #[error("NBD handshake failed: {0}")]
    Handshake(String),

    /// The server has no export by that name; `available` is its export list if it would give one.
    #[error("the NBD server has no export {name:?}{}", available_suffix(available))]
    ExportNotFound { name: String, available: Vec<String> },

    /// The server answered a request with an error.
    #[error("{command} failed on the NBD server: {} ({errno}){}", errno::name(*errno), message_suffix(message))]
    Server {
        command: Command,
        errno: u32,
        message: String,
    },

    /// The connection is gone: the server closed it, it was disconnected, or it broke down earlier.
    #[error("the NBD connection is closed")]
    Closed,

    /// Reading from the connection failed: the network dropped or the server's host died (the kernel gave up
    /// within `pki::liveness::LIVENESS_BOUND`), or the connection was reset.
    #[error("the NBD connection broke: {detail}")]
    Broken { detail: String },

    /// Something did not happen in time.
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout { what: String, after: Duration },

    /// The server sent something the protocol does not allow.
    #[error("NBD protocol violation by the server: {0}")]
    Protocol(String),

    /// The request reaches beyond the end of the export; nothing was sent.
    #[error("range at offset {offset} with length {len} is outside the NBD export of {size} bytes")]
    OutOfRange { offset: u64, len: u64, size: u64 },

    /// The request is not aligned to the minimum block size the server requires; nothing was sent.
    #[error(
        "{command} at offset {offset} with length {len} is not aligned to the export's {align}-byte blocks"
    )]
    Misaligned {
        command: Command,
        offset: u64,
        len: u64,
        align: u32,
    },

    /// The export is read-only; nothing was sent.
    #[error("the NBD export is read-only, {command} refused")]
    ReadOnly { command: Command },

    /// The server did not advertise a feature the call needs; nothing was sent.
    #[error("the NBD server does not support {feature}")]
    Unsupported { feature: &'static str },

    /// No metadata context of that name was negotiated (not asked for at connect, or the server does not
    /// have it, e.g. a dirty bitmap the export does not carry); nothing was sent.
    #[error("the NBD connection has no metadata context {name:?}")]
    NoMetaContext { name: String },

    /// A plaintext TCP connection was asked for without `insecure_plaintext`; nothing was sent.
    #[error(
        "refusing plaintext NBD over TCP to {target}: give TLS credentials, or allow insecure plaintext explicitly"
    )]
    PlaintextRefused { target: String },

    /// The server does not do TLS (it refused `NBD_OPT_STARTTLS`); nothing else was sent.
    #[error("the NBD server at {target} does not offer TLS: it answered NBD_OPT_STARTTLS with {reply}")]
    TlsNotOffered { target: String, reply: String },

    /// The server demands TLS (`NBD_REP_ERR_TLS_REQD`) and the connection is plaintext.
    #[error("the NBD server requires TLS, and this connection is plaintext")]
    TlsRequired,

    /// The TLS handshake failed, or the server broke off TLS at the first option.
    #[error("TLS with the NBD server at {target} failed: {failure} ({detail})")]
    Tls {
        target: String,
        failure: TlsFailure,
        detail: String,
    },

    /// The TLS credentials could not be read or do not fit together.
    #[error("bad TLS credentials {}: {reason}", path.display())]
    TlsCredentials { path: PathBuf, reason: String },

    /// An I/O error during the handshake.
    #[error("NBD I/O error")]
    Io(#[from] io::Error),
}

/// The stable class of an [`Error`], for callers that act on the class rather than the variant (the CLI maps
/// kinds to exit codes). A new variant gets one of these kinds; a new kind is a deliberate change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The socket could not be opened, or the handshake failed (including an export that is not there).
    Connect,
    /// The server answered a request with an error.
    Server,
    /// The connection is gone, or was given up because the server broke the protocol.
    Closed,
    /// Something did not happen in time.
    Timeout,
    /// The request cannot be sent as it is (out of range, misaligned, read-only export, missing feature);
    /// nothing was sent.
    Refused,
    /// TLS: plaintext refused, TLS not offered or required, a failed TLS handshake (untrusted, expired or
    /// misnamed server certificate, our certificate refused), unusable credentials. Nothing was read.
    Tls,
    /// An I/O error during the handshake.
    Io,
}

impl Error {
    /// The error's stable [`ErrorKind`].
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Connect { .. } | Error::Handshake(_) | Error::ExportNotFound { .. } => ErrorKind::Connect,
            Error::Server { .. } => ErrorKind::Server,
            Error::Closed | Error::Broken { .. } | Error::Protocol(_) => ErrorKind::Closed,
            Error::Timeout { .. } => ErrorKind::Timeout,
            Error::OutOfRange { .. }
            | Error::Misaligned { .. }
            | Error::ReadOnly { .. }
            | Error::Unsupported { .. }
            | Error::NoMetaContext { .. } => ErrorKind::Refused,
            Error::PlaintextRefused { .. }
            | Error::TlsNotOffered { .. }
            | Error::TlsRequired
            | Error::Tls { .. }
            | Error::TlsCredentials { .. } => ErrorKind::Tls,
            Error::Io(_) => ErrorKind::Io,
        }
    }
}

fn available_suffix(available: &[String]) -> String {
    if available.is_empty() {
        String::new()
    } else {
        format!(" (it has: {})", available.join(", "))
    }
}

fn message_suffix(message: &str) -> String {
    if message.is_empty() {
        String::new()
    } else {
        format!(": {message}")
    }
}

pub use pki::TlsFailure;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_details() {
        let e = Error::ExportNotFound {
            name: "disk9".into(),
            available: vec!["disk".into(), "other".into()],
        };
        assert_eq!(
            e.to_string(),
            r#"the NBD server has no export "disk9" (it has: disk, other)"#
        );
        let e = Error::Server {
            command: Command::Write,
            errno: 1,
            message: "read-only".into(),
        };
        assert_eq!(
            e.to_string(),
            "NBD_CMD_WRITE failed on the NBD server: EPERM (1): read-only"
        );
        let e = Error::Server {
            command: Command::Read,
            errno: 5,
            message: String::new(),
        };
        assert_eq!(e.to_string(), "NBD_CMD_READ failed on the NBD server: EIO (5)");
    }

    #[test]
    fn tls_errors_are_of_kind_tls_and_say_what_to_do() {
        let e = Error::PlaintextRefused {
            target: "hv1:10809".into(),
        };
        assert_eq!(e.kind(), ErrorKind::Tls);
        assert!(e.to_string().contains("allow insecure plaintext explicitly"));
        let e = Error::Tls {
            target: "hv1:10809".into(),
            failure: TlsFailure::Expired,
            detail: "certificate expired".into(),
        };
        assert_eq!(e.kind(), ErrorKind::Tls);
        assert_eq!(
            e.to_string(),
            "TLS with the NBD server at hv1:10809 failed: the server's certificate has expired \
             (certificate expired)"
        );
        for e in [
            Error::TlsRequired,
            Error::TlsNotOffered {
                target: "t".into(),
                reply: "NBD_REP_ERR_UNSUP".into(),
            },
            Error::TlsCredentials {
                path: "/p".into(),
                reason: "r".into(),
            },
        ] {
            assert_eq!(e.kind(), ErrorKind::Tls);
        }
        assert_eq!(
            Error::NoMetaContext { name: "x".into() }.kind(),
            ErrorKind::Refused
        );
    }
}
