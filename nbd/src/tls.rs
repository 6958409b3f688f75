//! TLS for NBD (`NBD_OPT_STARTTLS`): x509 credentials read from a directory in the layout of QEMU's
//! `tls-creds-x509` objects, the rustls client configuration made from them, and the sorting of a failed
//! TLS handshake into a [`TlsFailure`] a caller can act on.
//!
//! The server's certificate must chain to the given CA and name the host connected to; the client
//! certificate, if the directory has one, is presented (QEMU's `verify-peer=on` demands it). The crypto is
//! rustls with the `ring` provider, chosen here rather than through a process-wide default.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{CertificateError, ClientConfig, RootCertStore};

pub use crate::error::TlsFailure;
use crate::error::{Error, Result};

/// The CA certificates that sign the server's certificate (QEMU's name).
pub const CA_CERT: &str = "ca-cert.pem";
/// The client's certificate, presented to the server (QEMU's name).
pub const CLIENT_CERT: &str = "client-cert.pem";
/// The client certificate's private key (QEMU's name).
pub const CLIENT_KEY: &str = "client-key.pem";

/// x509 credentials for NBD over TLS. Cheap to clone; one value serves any number of connections.
#[derive(Clone)]
pub struct TlsCredentials {
    pub(crate) config: Arc<ClientConfig>,
    dir: PathBuf,
    client_cert: bool,
}

impl fmt::Debug for TlsCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsCredentials")
            .field("dir", &self.dir)
            .field("client_cert", &self.client_cert)
            .finish_non_exhaustive()
    }
}

impl TlsCredentials {
    /// Reads `dir` as QEMU's `tls-creds-x509,endpoint=client` would: `ca-cert.pem` (required), and
    /// `client-cert.pem` with `client-key.pem` (both or neither; without them no client certificate is
    /// presented, which a server with `verify-peer=on` refuses).
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<TlsCredentials> {
        let dir = dir.as_ref();
        let ca = dir.join(CA_CERT);
        let roots = load_roots(&ca)?;
        let (cert, key) = (dir.join(CLIENT_CERT), dir.join(CLIENT_KEY));
        let builder = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| creds_error(dir, e.to_string()))?
            .with_root_certificates(roots);
        let (config, client_cert) = match (cert.exists(), key.exists()) {
            (false, false) => (builder.with_no_client_auth(), false),
            (true, true) => {
                let chain = load_certs(&cert)?;
                let key = PrivateKeyDer::from_pem_file(&key)
                    .map_err(|e| creds_error(&key, format!("no usable private key: {e}")))?;
                let config = builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| creds_error(&cert, format!("does not go with {CLIENT_KEY}: {e}")))?;
                (config, true)
            }
            (true, false) => {
                return Err(creds_error(
                    &key,
                    "missing, but the client certificate is there".into(),
                ));
            }
            (false, true) => return Err(creds_error(&cert, "missing, but the client key is there".into())),
        };
        Ok(TlsCredentials {
            config: Arc::new(config),
            dir: dir.to_owned(),
            client_cert,
        })
    }

    /// The directory the credentials were read from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether a client certificate is presented.
    pub fn has_client_certificate(&self) -> bool {
        self.client_cert
    }
}

fn creds_error(path: &Path, reason: String) -> Error {
    Error::TlsCredentials {
        path: path.to_owned(),
        reason,
    }
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(|e| creds_error(path, format!("cannot read certificates: {e}")))?;
    if certs.is_empty() {
        return Err(creds_error(path, "holds no certificate".into()));
    }
    Ok(certs)
}

fn load_roots(path: &Path) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots
            .add(cert)
            .map_err(|e| creds_error(path, format!("not a usable CA certificate: {e}")))?;
    }
    Ok(roots)
}

/// What rustls reported inside an I/O error, sorted.
pub(crate) fn classify(e: &io::Error) -> (TlsFailure, String) {
    let inner = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>());
    let failure = match inner {
        Some(rustls::Error::InvalidCertificate(c)) => match c {
            CertificateError::UnknownIssuer | CertificateError::BadSignature => TlsFailure::UnknownIssuer,
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => TlsFailure::Expired,
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                TlsFailure::NotYetValid
            }
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                TlsFailure::WrongName
            }
            _ => TlsFailure::BadCertificate,
        },
        Some(rustls::Error::AlertReceived(_)) => TlsFailure::RejectedByServer,
        None if matches!(
            e.kind(),
            io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
        ) =>
        {
            TlsFailure::ClosedByServer
        }
        Some(_) | None => TlsFailure::Other,
    };
    let detail = inner.map_or_else(|| e.to_string(), ToString::to_string);
    (failure, detail)
}

/// A failure during or right after the TLS handshake, as an [`Error::Tls`] for `target`.
pub(crate) fn tls_error(target: &str, e: &io::Error) -> Error {
    let (failure, detail) = classify(e);
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
        if credentials.has_client_certificate() {
            detail.push_str("; the server may not trust our client certificate");
        } else {
            *detail = format!(
                "{detail}; no client certificate was presented ({} has no {CLIENT_CERT}), and a server \
                 with verify-peer=on requires one",
                credentials.dir().display()
            );
        }
    }
    e
}
