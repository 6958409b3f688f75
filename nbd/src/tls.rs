//! TLS for NBD (`NBD_OPT_STARTTLS`): [`TlsCredentials`], x509 credentials read by the `pki` crate from a
//! directory in the layout of QEMU's `tls-creds-x509` objects (the same reader the `qmp` crate uses), with
//! this crate's error type; and the mapping of a failed TLS handshake to an [`Error::Tls`] with a
//! [`TlsFailure`] a caller can act on.
//!
//! The server's certificate must chain to the given CA and name the host connected to; the client
//! certificate, if the directory has one, is presented (QEMU's `verify-peer=on` demands it). The crypto is
//! rustls with the `ring` provider, chosen in `pki` rather than through a process-wide default.

use std::fmt;
use std::io;
use std::path::Path;

pub use pki::{CA_CERT, CLIENT_CERT, CLIENT_KEY, TlsFailure};

use crate::error::{Error, Result};

/// x509 credentials for NBD over TLS (the `pki` crate's [`pki::ClientCredentials`], whose errors this
/// crate reports as [`Error::TlsCredentials`]). Cheap to clone; one value serves any number of connections.
#[derive(Clone)]
pub struct TlsCredentials {
    inner: pki::ClientCredentials,
}

impl fmt::Debug for TlsCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsCredentials")
            .field("dir", &self.inner.dir())
            .field("client_cert", &self.inner.has_client_certificate())
            .finish_non_exhaustive()
    }
}

impl TlsCredentials {
    /// Reads `dir` as QEMU's `tls-creds-x509,endpoint=client` would: `ca-cert.pem` (required), and
    /// `client-cert.pem` with `client-key.pem` (both or neither; without them no client certificate is
    /// presented, which a server with `verify-peer=on` refuses).
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<TlsCredentials> {
        match pki::ClientCredentials::from_dir(dir) {
            Ok(inner) => Ok(TlsCredentials { inner }),
            Err(e) => Err(Error::TlsCredentials {
                path: e.path().to_owned(),
                reason: e.reason().to_owned(),
            }),
        }
    }

    /// The directory the credentials were read from.
    pub fn dir(&self) -> &Path {
        self.inner.dir()
    }

    /// Whether a client certificate is presented.
    pub fn has_client_certificate(&self) -> bool {
        self.inner.has_client_certificate()
    }

    /// The credentials as the `pki` crate holds them (for another protocol, e.g. QMP over TLS).
    pub fn pki(&self) -> &pki::ClientCredentials {
        &self.inner
    }
}

impl From<pki::ClientCredentials> for TlsCredentials {
    fn from(inner: pki::ClientCredentials) -> TlsCredentials {
        TlsCredentials { inner }
    }
}

/// A failure during or right after the TLS handshake, as an [`Error::Tls`] for `target`.
pub(crate) fn tls_error(target: &str, e: &io::Error) -> Error {
    let (failure, detail) = pki::classify(e);
    Error::Tls {
        target: target.to_owned(),
        failure,
        detail,
    }
}

/// An error from the options that follow the TLS handshake: with TLS 1.3 the server judges our
/// certificate only after the client's side of the handshake is done, so its refusal arrives as the
/// answer to the first option (an alert, or QEMU simply hanging up).
pub(crate) fn after_handshake(target: &str, credentials: &TlsCredentials, e: Error) -> Error {
    let mut e = match e {
        Error::Io(io) => tls_error(target, &io),
        Error::Handshake(m) if m == crate::handshake::CLOSED_DURING_HANDSHAKE => Error::Tls {
            target: target.to_owned(),
            failure: TlsFailure::ClosedByServer,
            detail: m,
        },
        other => other,
    };
    if let Error::Tls {
        failure: TlsFailure::ClosedByServer | TlsFailure::RejectedByServer,
        detail,
        ..
    } = &mut e
    {
        *detail = format!("{detail}; {}", credentials.pki().refusal_hint());
    }
    e
}
