//! One QMP connection: a reader task that routes replies by id and events to subscribers, a writer task that
//! sends whole command lines, and the shared state between them and the callers.
//!
//! When the connection ends (EOF, I/O error, protocol violation, or the last handle dropped) every pending
//! command fails at once, every event stream ends after draining, and `closed()` resolves.
//!
//! Every command, reply and event is logged at the `debug` level through `tracing` (target `qmp_wire`), so a run
//! with `qmpbak -vv` shows the whole conversation; nothing is logged unless a subscriber asks for it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::error::Error;
use crate::events::{Event, EventFilter, EventStream, Subscribers};
use crate::framing::{Incoming, LineReader, ReadError, Reply, encode_command};

/// Why a connection ended.
#[derive(Debug, Clone)]
struct CloseReason {
    detail: String,
    /// The peer broke the protocol (pending commands fail with `Protocol` rather than `Closed`).
    protocol: bool,
}

impl CloseReason {
    fn closed(detail: impl Into<String>) -> CloseReason {
        CloseReason {
            detail: detail.into(),
            protocol: false,
        }
    }

    /// The error for a command that was waiting when the connection ended.
    fn pending_error(&self) -> Error {
        if self.protocol {
            Error::Protocol(self.detail.clone())
        } else {
            Error::Closed {
                detail: self.detail.clone(),
            }
        }
    }

    /// The error for anything attempted after the connection ended.
    fn later_error(&self) -> Error {
        Error::Closed {
            detail: self.detail.clone(),
        }
    }
}

type PendingReply = oneshot::Sender<Result<Reply, Error>>;

#[derive(Default)]
struct State {
    pending: HashMap<u64, PendingReply>,
    subscribers: Subscribers,
    closed: Option<CloseReason>,
}

/// State shared by the tasks and the callers. One lock guards pending replies, subscribers and the closed flag
/// together, so nothing can register after the connection has been torn down.
struct Shared {
    state: Mutex<State>,
    closed_tx: watch::Sender<bool>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn register(&self, id: u64) -> Result<oneshot::Receiver<Result<Reply, Error>>, Error> {
        let mut state = self.lock();
        if let Some(reason) = &state.closed {
            return Err(reason.later_error());
        }
        let (tx, rx) = oneshot::channel();
        state.pending.insert(id, tx);
        Ok(rx)
    }

    fn forget(&self, id: u64) {
        self.lock().pending.remove(&id);
    }

    fn deliver(&self, id: Option<&Value>, reply: Reply) {
        // Replies we cannot match (no id, or an id we did not send or gave up on) are dropped.
        let Some(id) = id.and_then(Value::as_u64) else {
            return;
        };
        let waiter = self.lock().pending.remove(&id);
        if let Some(waiter) = waiter {
            let _ = waiter.send(Ok(reply));
        }
    }

    fn publish(&self, event: &Event) {
        self.lock().subscribers.publish(event);
    }

    fn subscribe(&self, filter: EventFilter) -> EventStream {
        let mut state = self.lock();
        if state.closed.is_some() {
            return Subscribers::ended(filter);
        }
        state.subscribers.add(filter)
    }

    fn close(&self, reason: &CloseReason) {
        let pending = {
            let mut state = self.lock();
            if state.closed.is_some() {
                return;
            }
            state.subscribers.clear();
            state.closed = Some(reason.clone());
            std::mem::take(&mut state.pending)
        };
        for (_, waiter) in pending {
            let _ = waiter.send(Err(reason.pending_error()));
        }
        self.closed_tx.send_replace(true);
    }

    fn is_closed(&self) -> bool {
        self.lock().closed.is_some()
    }

    async fn closed(&self) {
        let mut rx = self.closed_tx.subscribe();
        // The sender lives as long as `self`, so `wait_for` only returns once the flag is set.
        let _ = rx.wait_for(|closed| *closed).await;
    }
}

/// A running connection. Dropping it stops both tasks and closes the socket.
pub(crate) struct Connection {
    shared: Arc<Shared>,
    outgoing: mpsc::UnboundedSender<Vec<u8>>,
    next_id: AtomicU64,
    reader: JoinHandle<()>,
    /// A command left without a reply for at least this long ends the connection (a monitor over the
    /// network: the link or QEMU's host is gone, or QEMU no longer answers while its host still acknowledges
    /// the bytes, which TCP's own bounds cannot see; every later command would wait its full timeout too).
    /// `None`: never.
    give_up_after: Option<Duration>,
}

impl Connection {
    /// Starts the tasks on an already-greeted stream; `reader` may hold bytes read past the greeting. With
    /// `wake_record` (a TLS stream), each command is followed by a separate one-byte write, see
    /// [`WAKE_RECORD`].
    pub(crate) fn start<R, W>(reader: LineReader<R>, writer: W, wake_record: bool) -> Connection
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let (closed_tx, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            closed_tx,
        });
        let (outgoing, queue) = mpsc::unbounded_channel();
        let reader = tokio::spawn(read_loop(Arc::clone(&shared), reader));
        tokio::spawn(write_loop(Arc::clone(&shared), queue, writer, wake_record));
        Connection {
            shared,
            outgoing,
            next_id: AtomicU64::new(1),
            reader,
            give_up_after: None,
        }
    }

    /// Makes a command that gets no reply within `after` (or a longer timeout) end the connection.
    pub(crate) fn give_up_after(mut self, after: Duration) -> Connection {
        self.give_up_after = Some(after);
        self
    }

    /// Sends one command and waits at most `timeout` for its reply.
    pub(crate) async fn request(
        &self,
        name: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> crate::Result<Value> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let reply = self.shared.register(id)?;
        let _forget = ForgetOnDrop {
            shared: &self.shared,
            id,
        };
        let secret = name == "object-add"
            && arguments
                .as_ref()
                .is_some_and(|a| a.get("qom-type").and_then(Value::as_str) == Some("secret"));
        let line = encode_command(name, arguments, id);
        if secret {
            // A secret's data (a repository key) is never written to a log.
            tracing::debug!(target: "qmp_wire", id, command = "object-add of a secret (data withheld)", "QMP send");
        } else {
            tracing::debug!(target: "qmp_wire", id, command = %String::from_utf8_lossy(&line).trim_end(), "QMP send");
        }
        let started = std::time::Instant::now();
        if self.outgoing.send(line).is_err() {
            return Err(Error::Closed {
                detail: format!("the connection's writer has stopped; {name} not sent"),
            });
        }
        let outcome = tokio::time::timeout(timeout, reply).await;
        let elapsed_us = started.elapsed().as_micros() as u64;
        match &outcome {
            Ok(Ok(Ok(Reply::Return(value)))) => {
                tracing::debug!(target: "qmp_wire", id, name, elapsed_us, reply = %value, "QMP return");
            }
            Ok(Ok(Ok(Reply::Error { class, desc }))) => {
                tracing::debug!(target: "qmp_wire", id, name, elapsed_us, class = %class, desc, "QMP error");
            }
            _ => tracing::debug!(target: "qmp_wire", id, name, elapsed_us, "QMP no reply"),
        }
        match outcome {
            Ok(Ok(Ok(Reply::Return(value)))) => Ok(value),
            Ok(Ok(Ok(Reply::Error { class, desc }))) => Err(Error::Qmp {
                command: name.to_owned(),
                class,
                desc,
            }),
            Ok(Ok(Err(error))) => Err(error),
            Ok(Err(_)) => Err(Error::Closed {
                detail: format!("the connection ended while {name} was pending"),
            }),
            Err(_) => {
                if self.give_up_after.is_some_and(|after| timeout >= after) {
                    self.shared.close(&CloseReason::closed(format!(
                        "no reply to {name} within {timeout:?}: the connection was given up (the network or \
                         QEMU's host may be down)"
                    )));
                }
                Err(Error::Timeout {
                    what: format!("QEMU's reply to {name}"),
                    after: timeout,
                })
            }
        }
    }

    pub(crate) fn subscribe(&self, filter: EventFilter) -> EventStream {
        self.shared.subscribe(filter)
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.shared.is_closed()
    }

    pub(crate) async fn closed(&self) {
        self.shared.closed().await;
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.shared
            .close(&CloseReason::closed("the QMP client was dropped"));
        self.reader.abort();
    }
}

/// Removes a pending entry when its caller stops waiting (timeout or cancellation).
struct ForgetOnDrop<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for ForgetOnDrop<'_> {
    fn drop(&mut self) {
        self.shared.forget(self.id);
    }
}

async fn read_loop<R: AsyncRead + Unpin>(shared: Arc<Shared>, mut reader: LineReader<R>) {
    let reason = tokio::select! {
        reason = route_incoming(&shared, &mut reader) => reason,
        () = shared.closed() => return,
    };
    shared.close(&reason);
}

async fn route_incoming<R: AsyncRead + Unpin>(shared: &Shared, reader: &mut LineReader<R>) -> CloseReason {
    loop {
        match reader.next_line().await {
            Ok(Some(line)) => match Incoming::parse(line) {
                Some(Incoming::Reply { id, reply }) => shared.deliver(id.as_ref(), reply),
                Some(Incoming::Event(event)) => {
                    tracing::debug!(target: "qmp_wire", event = event.name, data = %event.data, "QMP event");
                    shared.publish(&event);
                }
                // Greetings after the first, unknown messages and non-JSON lines are noise.
                Some(Incoming::Greeting(_) | Incoming::Other) | None => {}
            },
            Ok(None) => return CloseReason::closed("QEMU closed the QMP socket"),
            Err(ReadError::Io(e)) => {
                return CloseReason::closed(format!("reading from the QMP socket failed: {e}"));
            }
            Err(ReadError::TooLong(max)) => {
                return CloseReason {
                    detail: format!("QEMU sent a line longer than {max} bytes; the connection was dropped"),
                    protocol: true,
                };
            }
        }
    }
}

async fn write_loop<W: AsyncWrite + Unpin>(
    shared: Arc<Shared>,
    mut queue: mpsc::UnboundedReceiver<Vec<u8>>,
    mut writer: W,
    wake_record: bool,
) {
    loop {
        let line = tokio::select! {
            line = queue.recv() => line,
            () = shared.closed() => None,
        };
        let Some(line) = line else { break };
        // A line is written whole or the connection is given up: a half-written command would corrupt the
        // stream for every command after it.
        let written = tokio::select! {
            written = write_line(&mut writer, &line, wake_record) => written,
            () = shared.closed() => break,
        };
        if let Err(e) = written {
            shared.close(&CloseReason::closed(format!(
                "writing to the QMP socket failed: {e}"
            )));
            break;
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), writer.shutdown()).await;
}

/// What follows each command on a TLS connection, written and flushed on its own so that it is a TLS record
/// of its own. QEMU 7.2 reads a monitor's chardev one byte per wakeup and, over TLS, waits for the socket to
/// become readable again while gnutls holds the rest of the record it decrypted: the last record sent stays
/// unread until another arrives, so a lone command is never answered. After this one-byte record (JSON
/// whitespace, which QMP ignores), the command's record is read whole and nothing is left over. QEMU 10.0
/// does not need it and is not harmed.
const WAKE_RECORD: &[u8] = b"\n";

async fn write_line<W: AsyncWrite + Unpin>(
    writer: &mut W,
    line: &[u8],
    wake_record: bool,
) -> std::io::Result<()> {
    writer.write_all(line).await?;
    writer.flush().await?;
    if wake_record {
        writer.write_all(WAKE_RECORD).await?;
        writer.flush().await?;
    }
    Ok(())
}
