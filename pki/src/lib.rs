//! x509 credentials for TLS clients of QEMU, read from a directory in the layout of QEMU's
//! `tls-creds-x509,endpoint=client` objects (`ca-cert.pem`, `client-cert.pem`, `client-key.pem`), made into
//! a rustls [`ClientConfig`](rustls::ClientConfig) with the `ring` provider; reaching a server over TCP, with
//! the liveness bounds of [`liveness`], and the TLS handshake with them ([`connect_tcp`], [`server_name`],
//! [`tls_connect`]); and the sorting of a failed
//! TLS handshake into a [`TlsFailure`] a caller can act on.
//!
//! The `nbd` crate (NBD with `NBD_OPT_STARTTLS`) and the `qmp` crate (QMP over a TLS chardev) both use it, so
//! one directory of credentials serves both, and a failure reads the same whichever protocol met it.
//!
//! ```no_run
//! # fn demo() -> pki::Result<()> {
//! let creds = pki::ClientCredentials::from_dir("/etc/qmpbak/pki")?;
//! assert!(creds.has_client_certificate());
//! # Ok(())
//! # }
//! ```

mod connect;
mod credentials;
mod error;
mod failure;
pub mod liveness;

pub use connect::{ConnectFailure, connect_tcp, server_name, tls_connect};
pub use credentials::{CA_CERT, CLIENT_CERT, CLIENT_KEY, ClientCredentials};
pub use error::{Error, Result};
pub use failure::{TlsFailure, classify};
