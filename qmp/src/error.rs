//! The crate's error type: one variant per failure a caller can act on.
//!
//! Messages name the socket, command or job involved and say what to check; the underlying cause is kept as
//! `source()` rather than repeated in the message, so it is printed once at the edge.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use crate::open_enum::open_enum;

open_enum! {
    /// The `class` of a QMP error reply. Nearly everything is `GenericError`; match on it only when QEMU
    /// documents a specific class.
    pub enum ErrorClass {
        GenericError => "GenericError",
        CommandNotFound => "CommandNotFound",
        DeviceNotActive => "DeviceNotActive",
        DeviceNotFound => "DeviceNotFound",
        KvmMissingCap => "KVMMissingCap",
    }
}

/// What can go wrong talking to QEMU over QMP.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The socket could not be connected: missing, refused, permission denied (see `source`'s kind).
    #[error(
        "cannot connect to the QMP socket {}; check that the VM is running and that this is its -qmp socket",
        path.display()
    )]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// A TCP connection to a QMP endpoint could not be made (refused, unreachable, no such host).
    #[error(
        "cannot connect to QEMU's QMP endpoint {target}; check that the VM is running, that its -chardev \
         socket listens there, and that the network lets us through"
    )]
    ConnectTcp {
        target: String,
        #[source]
        source: io::Error,
    },

    /// Plaintext TCP was asked for without allowing it explicitly; nothing was sent.
    #[error(
        "refusing plaintext QMP over TCP to {target}: use tls:// with TLS credentials, or allow insecure \
         plaintext explicitly"
    )]
    PlaintextRefused { target: String },

    /// QMP over TLS was asked for without TLS credentials; nothing was sent.
    #[error(
        "QMP over TLS to {target} needs TLS credentials (a CA certificate, a client certificate and key)"
    )]
    NoCredentials { target: String },

    /// The TLS credentials could not be read or do not fit together.
    #[error(transparent)]
    Credentials(#[from] pki::Error),

    /// The TLS handshake failed, or the server broke off TLS before its greeting. Nothing was sent.
    #[error("TLS with QEMU's QMP endpoint {target} failed: {failure} ({detail})")]
    Tls {
        target: String,
        failure: pki::TlsFailure,
        detail: String,
    },

    /// The peer answered, but not with a QMP greeting.
    #[error(
        "{} did not greet like a QMP monitor ({detail}); is it a -qmp socket rather than HMP or a console?",
        path.display()
    )]
    NotQmp { path: PathBuf, detail: String },

    /// Nothing arrived in time.
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout { what: String, after: Duration },

    /// The connection ended (QEMU exited or closed the socket); no command can be sent on it any more.
    #[error("the QMP connection is closed ({detail}); QEMU may have exited, check its log")]
    Closed { detail: String },

    /// QEMU refused a command.
    #[error("QEMU refused {command}: {desc} ({class})")]
    Qmp {
        command: String,
        class: ErrorClass,
        desc: String,
    },

    /// QEMU's reply did not have the shape this crate expects for the command.
    #[error("cannot decode QEMU's reply to {command}; this QEMU's schema may differ from what qmpbak knows")]
    Decode {
        command: String,
        #[source]
        source: serde_json::Error,
    },

    /// The peer broke the protocol badly enough that the connection was given up.
    #[error("QMP protocol violation: {0}")]
    Protocol(String),

    /// An I/O error on an established connection.
    #[error("I/O error on the QMP connection")]
    Io(#[from] io::Error),

    /// QEMU has no job with this id.
    #[error("QEMU has no job {id}; it may never have started or may have been dismissed already")]
    JobNotFound { id: String },

    /// The guest agent's socket could not be connected.
    #[error(
        "cannot connect to the guest agent socket {}; check the -chardev socket of the VM's virtio-serial port",
        path.display()
    )]
    AgentConnect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// The guest agent refused a command.
    #[error("the guest agent refused {command}: {desc}")]
    AgentRefused { command: String, desc: String },

    /// An I/O error talking to the guest agent (it closed the connection: the agent stopped, or the guest).
    #[error("I/O error talking to the guest agent at {}", path.display())]
    AgentIo {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The stable class of an [`Error`], for callers that act on the class rather than the variant (the CLI maps
/// kinds to exit codes). A new variant gets one of these kinds; a new kind is a deliberate change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The socket could not be connected, or the peer is not a QMP monitor.
    Connect,
    /// Nothing arrived in time.
    Timeout,
    /// The connection is gone, or was given up because the peer broke the protocol.
    Closed,
    /// QEMU refused or failed a command, or has no such job.
    Refused,
    /// QEMU's reply did not have the expected shape.
    Decode,
    /// An I/O error on an established connection.
    Io,
    /// TLS: plaintext refused, no or unusable credentials, a server without TLS, a failed TLS handshake
    /// (untrusted, expired or misnamed server certificate, our certificate refused). Nothing was sent.
    Tls,
}

impl Error {
    /// The error's stable [`ErrorKind`].
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Connect { .. }
            | Error::ConnectTcp { .. }
            | Error::NotQmp { .. }
            | Error::AgentConnect { .. } => ErrorKind::Connect,
            Error::PlaintextRefused { .. }
            | Error::NoCredentials { .. }
            | Error::Credentials(_)
            | Error::Tls { .. } => ErrorKind::Tls,
            Error::Timeout { .. } => ErrorKind::Timeout,
            Error::Closed { .. } | Error::Protocol(_) => ErrorKind::Closed,
            Error::Qmp { .. } | Error::JobNotFound { .. } | Error::AgentRefused { .. } => ErrorKind::Refused,
            Error::Decode { .. } => ErrorKind::Decode,
            Error::Io(_) | Error::AgentIo { .. } => ErrorKind::Io,
        }
    }

    /// The I/O error kind behind a `Connect` or `Io` error.
    pub fn io_kind(&self) -> Option<io::ErrorKind> {
        match self {
            Error::Connect { source, .. }
            | Error::ConnectTcp { source, .. }
            | Error::Io(source)
            | Error::AgentConnect { source, .. }
            | Error::AgentIo { source, .. } => Some(source.kind()),
            _ => None,
        }
    }

    /// The QMP error class, for an error QEMU returned.
    pub fn class(&self) -> Option<&ErrorClass> {
        match self {
            Error::Qmp { class, .. } => Some(class),
            _ => None,
        }
    }

    /// Whether the connection is gone (as opposed to one command failing).
    pub fn is_closed(&self) -> bool {
        matches!(self, Error::Closed { .. } | Error::Protocol(_))
    }

    /// Whether this is a timeout.
    pub fn is_timeout(&self) -> bool {
        matches!(self, Error::Timeout { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_thing() {
        let e = Error::Connect {
            path: "/run/vm.sock".into(),
            source: io::Error::from(io::ErrorKind::NotFound),
        };
        assert!(e.to_string().contains("/run/vm.sock"));
        assert_eq!(e.io_kind(), Some(io::ErrorKind::NotFound));
        let e = Error::Qmp {
            command: "blockdev-del".into(),
            class: ErrorClass::GenericError,
            desc: "Node x is in use".into(),
        };
        assert_eq!(
            e.to_string(),
            "QEMU refused blockdev-del: Node x is in use (GenericError)"
        );
        assert_eq!(e.class(), Some(&ErrorClass::GenericError));
        let e = Error::Timeout {
            what: "the reply to query-block".into(),
            after: Duration::from_secs(3),
        };
        assert_eq!(
            e.to_string(),
            "timed out after 3s waiting for the reply to query-block"
        );
    }

    #[test]
    fn error_class_is_open() {
        let c: ErrorClass = serde_json::from_str("\"KVMMissingCap\"").unwrap();
        assert_eq!(c, ErrorClass::KvmMissingCap);
        let c: ErrorClass = serde_json::from_str("\"BrandNewClass\"").unwrap();
        assert_eq!(c.as_str(), "BrandNewClass");
    }
}
