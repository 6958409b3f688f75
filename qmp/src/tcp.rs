//! Connecting to a QMP monitor over TCP: QEMU's `-chardev socket,host=..,port=..,server=on` with
//! `tls-creds` speaks TLS from the first byte (no STARTTLS), so the TLS handshake (rustls, `ring`, x509
//! credentials from the `pki` crate, the server's certificate checked against the host connected to and
//! ours presented) comes before the greeting. Plaintext TCP only when explicitly allowed
//! ([`TcpOptions::insecure_plaintext`]); otherwise [`Error::PlaintextRefused`] before anything is sent.
//! Resolving, connecting, TLS and the greeting are bounded together by the caller's timeout.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::{Instant, timeout_at};

use crate::client::{CLOSED_WITHOUT_GREETING, Qmp};
use crate::endpoint::Endpoint;
use crate::error::Error;

/// How to reach a QMP monitor over TCP: TLS credentials, or explicit leave to use plaintext.
#[derive(Debug, Clone, Default)]
pub struct TcpOptions {
    tls: Option<pki::ClientCredentials>,
    insecure_plaintext: bool,
    server_name: Option<String>,
}

impl TcpOptions {
    /// No credentials, plaintext not allowed: enough for a unix socket only.
    pub fn new() -> TcpOptions {
        TcpOptions::default()
    }

    /// TLS with these credentials (for `tls://`).
    #[must_use]
    pub fn tls(mut self, credentials: pki::ClientCredentials) -> TcpOptions {
        self.tls = Some(credentials);
        self
    }

    /// Allows plaintext TCP (for `tcp://`; tests and trusted networks only).
    #[must_use]
    pub fn insecure_plaintext(mut self, allow: bool) -> TcpOptions {
        self.insecure_plaintext = allow;
        self
    }

    /// The name the server's certificate must carry, when it is not the host connected to.
    #[must_use]
    pub fn server_name(mut self, name: impl Into<String>) -> TcpOptions {
        self.server_name = Some(name.into());
        self
    }
}

impl Qmp {
    /// Connects to `endpoint`: a unix socket as [`Qmp::connect`], `tls://` with the credentials in
    /// `options` (else [`Error::NoCredentials`]), `tcp://` only with
    /// [`TcpOptions::insecure_plaintext`] (else [`Error::PlaintextRefused`]); nothing is sent before these
    /// checks pass. `timeout` bounds everything up to the end of capabilities negotiation.
    pub async fn connect_endpoint(
        endpoint: &Endpoint,
        options: &TcpOptions,
        timeout: Duration,
    ) -> crate::Result<Qmp> {
        let target = endpoint.to_string();
        match endpoint {
            Endpoint::Unix(path) => Qmp::connect(path, timeout).await,
            Endpoint::Tls { host, port } => {
                let Some(credentials) = &options.tls else {
                    return Err(Error::NoCredentials { target });
                };
                let name = options.server_name.as_deref().unwrap_or(host);
                let server_name = pki::server_name(credentials, name).map_err(Error::Credentials)?;
                let deadline = Instant::now() + timeout;
                let stream = connect_tcp(host, *port, &target, deadline, timeout).await?;
                let tls = pki::tls_connect(credentials, server_name, stream);
                let stream = match timeout_at(deadline, tls).await {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(e)) => return Err(tls_error(&target, &e)),
                    Err(_) => {
                        return Err(Error::Timeout {
                            what: format!(
                                "the TLS handshake with {target} (QEMU serves one monitor client at a time and \
                                 does not read a new one's handshake meanwhile; a client whose network dropped \
                                 keeps the monitor until QEMU next writes to it, e.g. any QMP event)"
                            ),
                            after: timeout,
                        });
                    }
                };
                let (read, write) = tokio::io::split(stream);
                Qmp::handshake(read, write, PathBuf::from(&target), true, true, deadline, timeout)
                    .await
                    .map_err(|e| after_tls_handshake(&target, credentials, e))
            }
            Endpoint::Tcp { host, port } => {
                if !options.insecure_plaintext {
                    return Err(Error::PlaintextRefused { target });
                }
                let deadline = Instant::now() + timeout;
                let stream = connect_tcp(host, *port, &target, deadline, timeout).await?;
                let (read, write) = stream.into_split();
                Qmp::handshake(
                    read,
                    write,
                    PathBuf::from(&target),
                    true,
                    false,
                    deadline,
                    timeout,
                )
                .await
            }
        }
    }
}

async fn connect_tcp(
    host: &str,
    port: u16,
    target: &str,
    deadline: Instant,
    timeout: Duration,
) -> crate::Result<TcpStream> {
    pki::connect_tcp(host, port, deadline)
        .await
        .map_err(|failure| match failure {
            pki::ConnectFailure::Io(source) => Error::ConnectTcp {
                target: target.to_owned(),
                source,
            },
            pki::ConnectFailure::Timeout => Error::Timeout {
                what: format!("a connection to {target}"),
                after: timeout,
            },
        })
}

fn tls_error(target: &str, e: &io::Error) -> Error {
    let (failure, mut detail) = pki::classify(e);
    if failure == pki::TlsFailure::NotTls {
        detail.push_str("; a QMP chardev without tls-creds answers in plaintext");
    }
    Error::Tls {
        target: target.to_owned(),
        failure,
        detail,
    }
}

/// With TLS 1.3 the server judges our certificate after the client's side of the handshake is done, so its
/// refusal (an alert, or QEMU hanging up) is what reading the greeting meets.
fn after_tls_handshake(target: &str, credentials: &pki::ClientCredentials, e: Error) -> Error {
    let hint = credentials.refusal_hint();
    match e {
        Error::Io(io) => {
            let (failure, detail) = pki::classify(&io);
            Error::Tls {
                target: target.to_owned(),
                failure,
                detail: format!("{detail}; {hint}"),
            }
        }
        Error::NotQmp { detail, .. } if detail == CLOSED_WITHOUT_GREETING => Error::Tls {
            target: target.to_owned(),
            failure: pki::TlsFailure::ClosedByServer,
            detail: format!("{detail}; {hint}"),
        },
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn nothing_is_sent_without_tls_credentials_or_leave_for_plaintext() {
        // No listener at these ports: an attempt to connect would fail differently.
        let timeout = Duration::from_secs(5);
        let tcp: Endpoint = "tcp://127.0.0.1:9".parse().unwrap();
        let err = Qmp::connect_endpoint(&tcp, &TcpOptions::new(), timeout)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::PlaintextRefused { .. }), "{err}");
        assert_eq!(err.kind(), crate::ErrorKind::Tls);
        let tls: Endpoint = "tls://127.0.0.1:9".parse().unwrap();
        let err = Qmp::connect_endpoint(&tls, &TcpOptions::new().insecure_plaintext(true), timeout)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::NoCredentials { .. }), "{err}");
        assert_eq!(err.kind(), crate::ErrorKind::Tls);
    }
}
