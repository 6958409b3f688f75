//! [`TlsFailure`]: why a TLS handshake with a server failed, sorted from what rustls reported inside an I/O
//! error, so both protocols (NBD, QMP) name the same cause in the same words.

use std::io;

use rustls::CertificateError;

/// Why a TLS handshake with a server failed, as far as the client can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TlsFailure {
    /// The server's certificate is not signed by the CA we trust.
    UnknownIssuer,
    /// The server's certificate has expired.
    Expired,
    /// The server's certificate is not valid yet.
    NotYetValid,
    /// The server's certificate does not name the host we connected to.
    WrongName,
    /// The server's certificate is unusable for another reason.
    BadCertificate,
    /// The server ended the handshake with an alert: most often it did not accept our client certificate
    /// (none presented, or not signed by the CA it trusts).
    RejectedByServer,
    /// The server closed the connection in the middle of TLS.
    ClosedByServer,
    /// The server answered the TLS hello with something that is not TLS (a plaintext server).
    NotTls,
    /// Anything else TLS reported.
    Other,
}

impl std::fmt::Display for TlsFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TlsFailure::UnknownIssuer => "the server's certificate is not signed by the trusted CA",
            TlsFailure::Expired => "the server's certificate has expired",
            TlsFailure::NotYetValid => "the server's certificate is not valid yet",
            TlsFailure::WrongName => "the server's certificate does not name the host connected to",
            TlsFailure::BadCertificate => "the server's certificate is unusable",
            TlsFailure::RejectedByServer => {
                "the server rejected the TLS session (is our client certificate missing or not trusted?)"
            }
            TlsFailure::ClosedByServer => "the server closed the connection during TLS",
            TlsFailure::NotTls => "the server does not speak TLS (plaintext, or another protocol)",
            TlsFailure::Other => "TLS failed",
        })
    }
}

/// What rustls reported inside an I/O error, sorted, with its own words as the detail.
pub fn classify(e: &io::Error) -> (TlsFailure, String) {
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
        Some(rustls::Error::InvalidMessage(_)) => TlsFailure::NotTls,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rustls_errors_are_sorted() {
        let wrap = |e: rustls::Error| io::Error::new(io::ErrorKind::InvalidData, e);
        let cases = [
            (
                rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer),
                TlsFailure::UnknownIssuer,
            ),
            (
                rustls::Error::InvalidCertificate(CertificateError::Expired),
                TlsFailure::Expired,
            ),
            (
                rustls::Error::InvalidCertificate(CertificateError::NotValidForName),
                TlsFailure::WrongName,
            ),
            (
                rustls::Error::AlertReceived(rustls::AlertDescription::BadCertificate),
                TlsFailure::RejectedByServer,
            ),
            (
                rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType),
                TlsFailure::NotTls,
            ),
        ];
        for (error, want) in cases {
            assert_eq!(classify(&wrap(error)).0, want);
        }
        let eof = io::Error::from(io::ErrorKind::UnexpectedEof);
        assert_eq!(classify(&eof).0, TlsFailure::ClosedByServer);
        assert_eq!(classify(&io::Error::other("x")).0, TlsFailure::Other);
    }
}
