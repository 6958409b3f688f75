//! Reaching a TLS server of QEMU over TCP, the part the `qmp` crate (a TLS chardev: TLS from the first byte)
//! and the `nbd` crate (TLS after `NBD_OPT_STARTTLS`) share: resolving and connecting within the caller's
//! deadline ([`connect_tcp`]), the server name the certificate must carry ([`server_name`]), and the TLS
//! handshake with these credentials ([`tls_connect`]). Each crate keeps its own error type and wording; what
//! fails here is handed back for it to name.

use std::io;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, lookup_host};
use tokio::time::{Instant, timeout_at};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::pki_types::ServerName;

use crate::{ClientCredentials, Error};

/// Why [`connect_tcp`] has no stream.
#[derive(Debug)]
pub enum ConnectFailure {
    /// Resolving or connecting failed (the last address's error), or the host has no address.
    Io(io::Error),
    /// The deadline passed first.
    Timeout,
}

/// Resolves `host` and connects to the first of its addresses that accepts on `port`, all before `deadline`.
/// The stream has `TCP_NODELAY` set: both protocols send small requests and wait for their answers.
pub async fn connect_tcp(host: &str, port: u16, deadline: Instant) -> Result<TcpStream, ConnectFailure> {
    let connect = async {
        let mut last = None;
        for sa in lookup_host((host, port)).await? {
            match TcpStream::connect(sa).await {
                Ok(stream) => return Ok(stream),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("{host} has no address"))))
    };
    let stream = match timeout_at(deadline, connect).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => return Err(ConnectFailure::Io(e)),
        Err(_) => return Err(ConnectFailure::Timeout),
    };
    crate::liveness::bound(&stream).map_err(ConnectFailure::Io)?;
    Ok(stream)
}

/// `name` as the server name the certificate must carry; a name that cannot be one is an error of the
/// credentials in use (their directory).
pub fn server_name(credentials: &ClientCredentials, name: &str) -> Result<ServerName<'static>, Error> {
    ServerName::try_from(name.to_owned()).map_err(|e| Error::Credentials {
        path: credentials.dir().to_owned(),
        reason: format!("{name:?} is not a usable server name: {e}"),
    })
}

/// The TLS handshake over `stream` with `credentials`: the server's certificate must chain to their CA and
/// name `server_name`, and ours is presented. A failure is for [`crate::classify`] to sort. Unbounded: the
/// caller bounds it with its deadline.
pub async fn tls_connect<S>(
    credentials: &ClientCredentials,
    server_name: ServerName<'static>,
    stream: S,
) -> io::Result<TlsStream<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    TlsConnector::from(Arc::clone(credentials.config()))
        .connect(server_name, stream)
        .await
}
