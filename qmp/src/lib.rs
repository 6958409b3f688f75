//! An async client for QEMU's QMP monitor protocol, built to survive schema drift between QEMU versions.
//!
//! One `Qmp` handle carries many concurrent commands (matched to replies by id) and any number of event
//! subscriptions; unknown events and enum values are kept rather than rejected, every wait has a timeout, and
//! what QEMU can do is read from its schema (`Capabilities`). See ARCHITECTURE.md for how it fits in qmpbak.
//!
//! The monitor is a unix socket ([`Qmp::connect`]) or, through [`Qmp::connect_endpoint`], a TCP endpoint:
//! `tls://HOST:PORT` (QEMU's TLS chardev, x509 credentials from the `pki` crate, peer verified both ways)
//! or, only when explicitly allowed, plaintext `tcp://HOST:PORT`.
//!
//! ```no_run
//! # async fn demo() -> qmp::Result<()> {
//! use std::time::Duration;
//! use qmp::{EventFilter, Qmp, commands::QueryBlock};
//!
//! let qmp = Qmp::connect("/run/vm/qmp.sock", Duration::from_secs(5)).await?;
//! let mut stops = qmp.subscribe(EventFilter::names(&["STOP"]));
//! for block in qmp.execute(&QueryBlock).await? {
//!     println!("{} {:?}", block.device, block.qdev);
//! }
//! qmp.execute(&qmp::commands::Stop).await?;
//! let stop = stops.next_timeout(Duration::from_secs(5)).await?;
//! # let _ = stop;
//! # Ok(())
//! # }
//! ```

mod client;
pub mod commands;
mod endpoint;
mod error;
mod events;
mod framing;
mod jobs;
pub mod liveness;
mod open_enum;
pub mod qga;
mod schema;
mod tcp;
mod transport;
pub mod types;

pub use client::{DEFAULT_COMMAND_TIMEOUT, Qmp};
pub use commands::{Command, Empty};
pub use endpoint::{Endpoint, ParseEndpointError};
pub use error::{Error, ErrorClass, ErrorKind};
pub use events::{Event, EventFilter, EventKind, EventStream};
pub use jobs::JobOutcome;
pub use pki;
pub use schema::Capabilities;
pub use tcp::TcpOptions;
pub use types::*;

/// The result of every fallible operation in this crate.
pub type Result<T> = std::result::Result<T, Error>;
