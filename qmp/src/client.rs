//! `Qmp`: the handle callers hold. Connects, negotiates capabilities, and sends typed or raw commands over
//! one shared connection from any number of tasks.
//!
//! Every wait is bounded: connecting and negotiating by the `connect` timeout, each command by the command
//! timeout (30 s unless changed) or the one given.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::UnixStream;
use tokio::sync::OnceCell;
use tokio::time::Instant;

use crate::commands::{Command, QueryQmpSchema};
use crate::error::Error;
use crate::events::{EventFilter, EventStream};
use crate::framing::{Incoming, LineReader, ReadError};
use crate::schema::Capabilities;
use crate::types::Greeting;

/// The command timeout a new connection starts with.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// The `NotQmp` detail of a peer that hung up before greeting (over TLS: most often a refused certificate).
pub(crate) const CLOSED_WITHOUT_GREETING: &str = "it closed the connection without a greeting";

/// How much of an unexpected first line is quoted in a `NotQmp` error.
const QUOTE_LIMIT: usize = 120;

/// A QMP connection. Clones share it; it closes when the last clone is dropped or QEMU goes away.
#[derive(Clone)]
pub struct Qmp {
    inner: Arc<Inner>,
}

struct Inner {
    connection: crate::transport::Connection,
    greeting: Greeting,
    path: PathBuf,
    remote: bool,
    command_timeout_ns: AtomicU64,
    capabilities: OnceCell<Capabilities>,
}

impl std::fmt::Debug for Qmp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qmp")
            .field("path", &self.inner.path)
            .field("version", &self.inner.greeting.version)
            .field("closed", &self.is_closed())
            .finish_non_exhaustive()
    }
}

impl Qmp {
    /// Connects to QEMU's QMP socket at `path`, reads the greeting and leaves capabilities negotiation mode,
    /// all within `timeout`.
    pub async fn connect(path: impl AsRef<Path>, timeout: Duration) -> crate::Result<Qmp> {
        let path = path.as_ref();
        let deadline = Instant::now() + timeout;
        let stream = match tokio::time::timeout_at(deadline, UnixStream::connect(path)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(source)) => {
                return Err(Error::Connect {
                    path: path.to_owned(),
                    source,
                });
            }
            Err(_) => {
                return Err(Error::Timeout {
                    what: format!("a connection to {}", path.display()),
                    after: timeout,
                });
            }
        };
        let (read, write) = stream.into_split();
        Qmp::handshake(read, write, path.to_owned(), false, false, deadline, timeout).await
    }

    /// Speaks QMP on an already-connected stream (e.g. one QEMU connected to with a client-mode `-qmp`).
    pub async fn from_stream(stream: UnixStream, timeout: Duration) -> crate::Result<Qmp> {
        let path = stream_path(&stream);
        let (read, write) = stream.into_split();
        Qmp::handshake(read, write, path, false, false, Instant::now() + timeout, timeout).await
    }

    /// Reads the greeting on a connected stream's halves and leaves capabilities negotiation mode, by
    /// `deadline`. `path` names the peer in messages; `remote` says it is reached over the network, `tls`
    /// that the stream is TLS.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn handshake<R, W>(
        read: R,
        write: W,
        path: PathBuf,
        remote: bool,
        tls: bool,
        deadline: Instant,
        total: Duration,
    ) -> crate::Result<Qmp>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let mut reader = LineReader::new(read);
        let Ok(greeting) = tokio::time::timeout_at(deadline, read_greeting(&mut reader, &path)).await else {
            let what = if remote {
                format!(
                    "the QMP greeting on {} (is another client connected to it, or does it want TLS or \
                     plaintext where the other was used?)",
                    path.display()
                )
            } else {
                format!(
                    "the QMP greeting on {} (is another client connected to it?)",
                    path.display()
                )
            };
            return Err(Error::Timeout { what, after: total });
        };
        let greeting = greeting?;
        let mut connection = crate::transport::Connection::start(reader, write, tls);
        if remote {
            connection = connection.give_up_after(DEFAULT_COMMAND_TIMEOUT);
        }
        let arguments = greeting
            .capabilities
            .iter()
            .any(|c| c == "oob")
            .then(|| serde_json::json!({ "enable": ["oob"] }));
        let remaining = deadline.saturating_duration_since(Instant::now());
        match connection.request("qmp_capabilities", arguments, remaining).await {
            Ok(_) => {}
            Err(Error::Timeout { what, .. }) => return Err(Error::Timeout { what, after: total }),
            Err(e) => return Err(e),
        }
        let inner = Inner {
            connection,
            greeting,
            path,
            remote,
            command_timeout_ns: AtomicU64::new(nanos(DEFAULT_COMMAND_TIMEOUT)),
            capabilities: OnceCell::new(),
        };
        Ok(Qmp {
            inner: Arc::new(inner),
        })
    }

    /// What QEMU said when we connected: its version and the protocol capabilities it offered.
    pub fn greeting(&self) -> &Greeting {
        &self.inner.greeting
    }

    /// The socket path (or a description of the stream, or the `tls://` or `tcp://` endpoint) this
    /// connection talks to.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Whether QEMU is reached over the network, so it may run on another host: the paths it reports (its
    /// images, its sockets) are then not paths on this host.
    pub fn is_remote(&self) -> bool {
        self.inner.remote
    }

    /// Sets how long `execute` and `execute_raw` wait for a reply (for every clone of this handle).
    pub fn set_command_timeout(&self, timeout: Duration) {
        self.inner
            .command_timeout_ns
            .store(nanos(timeout), Ordering::Relaxed);
    }

    /// How long `execute` and `execute_raw` wait for a reply.
    pub fn command_timeout(&self) -> Duration {
        Duration::from_nanos(self.inner.command_timeout_ns.load(Ordering::Relaxed))
    }

    /// Runs a typed command with the command timeout.
    pub async fn execute<C: Command>(&self, cmd: &C) -> crate::Result<C::Response> {
        self.execute_timeout(cmd, self.command_timeout()).await
    }

    /// Runs a typed command, waiting at most `timeout` for the reply.
    pub async fn execute_timeout<C: Command>(
        &self,
        cmd: &C,
        timeout: Duration,
    ) -> crate::Result<C::Response> {
        let arguments = match serde_json::to_value(cmd) {
            Ok(Value::Null) => None,
            Ok(Value::Object(map)) if map.is_empty() => None,
            Ok(value @ Value::Object(_)) => Some(value),
            Ok(other) => {
                return Err(Error::Protocol(format!(
                    "the arguments of {} must be a JSON object, not {other}",
                    C::NAME
                )));
            }
            Err(e) => {
                return Err(Error::Protocol(format!(
                    "cannot encode the arguments of {}: {e}",
                    C::NAME
                )));
            }
        };
        let reply = self.execute_raw_timeout(C::NAME, arguments, timeout).await?;
        serde_json::from_value(reply).map_err(|source| Error::Decode {
            command: C::NAME.to_owned(),
            source,
        })
    }

    /// Runs a command by name with JSON arguments (an object, or `None`), with the command timeout.
    pub async fn execute_raw(&self, name: &str, args: Option<Value>) -> crate::Result<Value> {
        self.execute_raw_timeout(name, args, self.command_timeout()).await
    }

    /// Runs a command by name, waiting at most `timeout` for the reply.
    pub async fn execute_raw_timeout(
        &self,
        name: &str,
        args: Option<Value>,
        timeout: Duration,
    ) -> crate::Result<Value> {
        self.inner.connection.request(name, args, timeout).await
    }

    /// Subscribes to the events that pass `filter`. Registered before this returns, so an event caused by a
    /// command sent afterwards is never missed, even if QEMU sends it before the command's reply.
    pub fn subscribe(&self, filter: EventFilter) -> EventStream {
        self.inner.connection.subscribe(filter)
    }

    /// Whether the connection has ended.
    pub fn is_closed(&self) -> bool {
        self.inner.connection.is_closed()
    }

    /// Resolves once the connection has ended (QEMU exited or closed the socket).
    pub async fn closed(&self) {
        self.inner.connection.closed().await;
    }

    /// What this QEMU supports, from `query-qmp-schema`; asked once per connection, then cached.
    pub async fn capabilities(&self) -> crate::Result<Capabilities> {
        let caps = self
            .inner
            .capabilities
            .get_or_try_init(|| async {
                let schema = self.execute(&QueryQmpSchema).await?;
                Ok::<_, Error>(Capabilities::from_schema(&schema))
            })
            .await?;
        Ok(caps.clone())
    }
}

async fn read_greeting<R: AsyncRead + Unpin>(
    reader: &mut LineReader<R>,
    path: &Path,
) -> crate::Result<Greeting> {
    let not_qmp = |detail: String| Error::NotQmp {
        path: path.to_owned(),
        detail,
    };
    let line = loop {
        match reader.next_line().await {
            Ok(Some(line)) if line.iter().all(u8::is_ascii_whitespace) => {}
            Ok(Some(line)) => break line,
            Ok(None) => return Err(not_qmp(CLOSED_WITHOUT_GREETING.into())),
            Err(ReadError::Io(e)) => return Err(Error::Io(e)),
            Err(ReadError::TooLong(max)) => {
                return Err(not_qmp(format!("its first line is over {max} bytes")));
            }
        }
    };
    let Some(Incoming::Greeting(greeting)) = Incoming::parse(line) else {
        return Err(not_qmp(format!("its first line was {:?}", quote(line))));
    };
    serde_json::from_value(greeting).map_err(|e| not_qmp(format!("its greeting is malformed: {e}")))
}

fn quote(line: &[u8]) -> String {
    let text = String::from_utf8_lossy(line);
    match text.char_indices().nth(QUOTE_LIMIT) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.into_owned(),
    }
}

/// A path naming the stream for messages: the peer's socket path, else ours, else a placeholder.
fn stream_path(stream: &UnixStream) -> PathBuf {
    let named = |addr: std::io::Result<tokio::net::unix::SocketAddr>| {
        addr.ok().and_then(|a| a.as_pathname().map(Path::to_path_buf))
    };
    named(stream.peer_addr())
        .or_else(|| named(stream.local_addr()))
        .unwrap_or_else(|| PathBuf::from("<QMP stream>"))
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_can_be_shared_across_tasks() {
        fn send_sync<T: Send + Sync + Clone>() {}
        fn send<T: Send>() {}
        send_sync::<Qmp>();
        send::<EventStream>();
        send::<Error>();
    }

    #[test]
    fn quotes_are_cut() {
        assert_eq!(quote(b"short"), "short");
        assert_eq!(quote("é".repeat(200).as_bytes()).chars().count(), QUOTE_LIMIT + 1);
    }
}
