//! A small async NBD client for reading (and writing) disks through QEMU's own NBD server
//! (qemu-storage-daemon, qemu-nbd, QEMU's built-in server) instead of parsing image formats.
//!
//! It speaks the fixed-newstyle handshake with `NBD_OPT_GO`, structured replies, and metadata contexts for
//! block status: `base:allocation` always, and any the caller names in [`ConnectOptions`] (QEMU's
//! `qemu:dirty-bitmap:NAME`, see [`Client::dirty_extents`]). Requests from many tasks are multiplexed on one
//! connection by cookie. Every network wait is bounded by a timeout, and malformed server data turns into an
//! error, never a panic. [`BlockingClient`] serves worker threads that are not async.
//!
//! Over TCP the connection is TLS (`NBD_OPT_STARTTLS` before any other option, as QEMU's client does) with
//! x509 [`TlsCredentials`] read from a directory laid out like QEMU's `tls-creds-x509` one; plaintext TCP
//! must be allowed explicitly with [`ConnectOptions::insecure_plaintext`]. A server without TLS, an
//! untrusted, expired or misnamed server certificate, and a server that refuses our certificate are each a
//! typed [`Error`] of [`ErrorKind::Tls`], before any data is read.
//!
//! ```no_run
//! # async fn demo() -> nbd::Result<()> {
//! use std::time::Duration;
//! let client = nbd::Client::connect_unix("/run/qsd/nbd.sock", "disk0", Duration::from_secs(10)).await?;
//! for extent in client.block_status(0, client.size()).await? {
//!     if !extent.zero {
//!         let mut buf = vec![0; extent.len.min(1 << 20) as usize];
//!         client.read(extent.offset, &mut buf).await?;
//!     }
//! }
//! client.disconnect().await
//! # }
//! ```
//!
//! Over TCP with TLS, reading only what a dirty bitmap marks:
//!
//! ```no_run
//! # async fn demo() -> nbd::Result<()> {
//! use std::time::Duration;
//! let tls = nbd::TlsCredentials::from_dir("/etc/qmpbak/pki")?;
//! let options = nbd::ConnectOptions::new().tls(tls).dirty_bitmap("bm0");
//! let client = nbd::Client::connect_tcp("hv1:10809", "disk0", &options, Duration::from_secs(10)).await?;
//! for extent in client.dirty_extents("bm0", 0, client.size()).await? {
//!     if extent.dirty() {
//!         let mut buf = vec![0; extent.len.min(1 << 20) as usize];
//!         client.read(extent.offset, &mut buf).await?;
//!     }
//! }
//! client.disconnect().await
//! # }
//! ```

mod blocking;
mod client;
mod conn;
mod error;
mod extent;
mod handshake;
pub mod liveness;
#[cfg(test)]
mod peer_tests;
mod proto;
mod reply;
mod tls;

pub use blocking::BlockingClient;
pub use client::{Client, ConnectOptions, DEFAULT_TIMEOUT, dirty_bitmap_context};
pub use error::{Error, ErrorKind, Result};
pub use extent::{ContextExtent, Extent};
pub use proto::{Command, STATE_DIRTY, errno};
pub use tls::{CA_CERT, CLIENT_CERT, CLIENT_KEY, TlsCredentials, TlsFailure};
