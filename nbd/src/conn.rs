//! The transmission-phase transport. A writer task owns the socket's write half and sends whole requests
//! from a queue, so a caller that gives up can never leave half a request on the wire. A reader task owns
//! the read half and routes every reply to its request by cookie, so many requests can be in flight from
//! many tasks. When the connection breaks, every pending request fails at once.
//!
//! The reader waits for the next reply without a deadline (an idle connection is fine); once a reply has
//! begun, the rest of it must arrive within the I/O timeout or the connection is dropped. Callers bound
//! their own wait with the per-request timeout; a caller that times out or goes away abandons its request,
//! whose entry drops its buffer at once and stays only as a note to skip the late reply by. A reply may not
//! deliver more than its request asked for, nor more than [`MAX_REPLY_CHUNKS`] chunks.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout, timeout_at};

use crate::error::{Error, Result};
use crate::proto::{self, Command};
use crate::reply::{self, Expect, ReplyData};

/// Requests queued for the writer; a full queue makes callers wait (within their timeout).
const QUEUE_DEPTH: usize = 64;
/// Largest payload of a chunk that is not read data (block status, errors). Servers send at most a few
/// hundred KiB of descriptors; this only stops a bogus length from allocating gigabytes.
const MAX_META_PAYLOAD: u32 = 16 << 20;
/// Most chunks one structured reply may have. A read gets one per data or hole extent (QEMU sends a few);
/// this stops a server from growing a reply's bookkeeping without end.
pub(crate) const MAX_REPLY_CHUNKS: u32 = 1 << 16;
/// Most requests whose callers gave up (timed out or dropped) while the server still owes their replies;
/// past it the server is not answering and the connection is ended.
pub(crate) const MAX_ABANDONED: usize = 1024;
/// How long the writer spends on a farewell `NBD_CMD_DISC` when the last handle is dropped.
const DROP_DISCONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the connection ended, for the requests that were pending at the time.
#[derive(Debug, Clone)]
enum CloseReason {
    Closed,
    /// Reading failed with this reason (e.g. the kernel gave up on a peer that vanished: `ETIMEDOUT`).
    Broken(String),
    Protocol(String),
    Stalled(Duration),
}

impl CloseReason {
    fn to_error(&self) -> Error {
        match self {
            CloseReason::Closed => Error::Closed,
            CloseReason::Broken(detail) => Error::Broken {
                detail: detail.clone(),
            },
            CloseReason::Protocol(m) => Error::Protocol(m.clone()),
            CloseReason::Stalled(after) => Error::Timeout {
                what: "the rest of a reply the server had begun".into(),
                after: *after,
            },
        }
    }
}

impl From<io::Error> for CloseReason {
    fn from(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            CloseReason::Closed
        } else {
            CloseReason::Broken(e.to_string())
        }
    }
}

struct Pending {
    command: Command,
    /// The request's length (a late reply to an abandoned read without structured replies is skipped by it).
    len: u32,
    expect: Expect,
    /// The first error chunk of a structured reply; later chunks still have to be consumed.
    error: Option<(u32, String)>,
    /// Chunks of a structured reply so far.
    chunks: u32,
    /// `None` once the caller gave up: the entry only remains so that the reply the server still owes
    /// is recognised and skipped; its buffer is gone.
    tx: Option<oneshot::Sender<Result<ReplyData>>>,
}

impl Pending {
    fn abandoned(&self) -> bool {
        self.tx.is_none()
    }

    fn complete(self, result: Result<ReplyData>) {
        // The caller may have timed out and gone; its reply is then simply dropped.
        if let Some(tx) = self.tx {
            let _ = tx.send(result);
        }
    }

    fn finish(self) {
        let Some(tx) = self.tx else {
            return;
        };
        let result = match self.error {
            Some((errno, message)) => Err(reply::server_error(self.command, errno, message)),
            None => self.expect.finish(),
        };
        let _ = tx.send(result);
    }
}

#[derive(Default)]
struct State {
    pending: HashMap<u64, Pending>,
    /// Set once no new request may start.
    shut: bool,
}

/// What the caller side, the reader and the writer share.
#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    /// Tells the reader to stop.
    kill: Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn register(&self, cookie: u64, pending: Pending) -> Result<()> {
        let mut state = self.lock();
        if state.shut {
            return Err(Error::Closed);
        }
        state.pending.insert(cookie, pending);
        Ok(())
    }

    fn take(&self, cookie: u64) -> Option<Pending> {
        self.lock().pending.remove(&cookie)
    }

    fn put_back(&self, cookie: u64, pending: Pending) {
        self.lock().pending.insert(cookie, pending);
    }

    /// The caller of request `cookie` gave up: drop what it waited with (its read buffer), keep a note so
    /// that the reply the server still owes is skipped. Too many such notes end the connection.
    fn abandon(&self, cookie: u64) {
        let mut state = self.lock();
        let Some(pending) = state.pending.get_mut(&cookie) else {
            return;
        };
        pending.tx = None;
        pending.expect = Expect::Done;
        pending.error = None;
        if state.pending.values().filter(|p| p.abandoned()).count() > MAX_ABANDONED {
            state.shut = true;
            drop(state);
            self.kill.notify_one();
        }
    }

    fn shut(&self) {
        self.lock().shut = true;
    }

    /// Ends the connection for everyone: no new requests, every pending one fails with `reason`.
    fn fail_all(&self, reason: &CloseReason) {
        let drained: Vec<Pending> = {
            let mut state = self.lock();
            state.shut = true;
            state.pending.drain().map(|(_, p)| p).collect()
        };
        for p in drained {
            p.complete(Err(reason.to_error()));
        }
    }
}

/// A request as the client layer builds it.
pub(crate) struct Request {
    pub command: Command,
    pub flags: u16,
    pub offset: u64,
    pub len: u32,
    /// A WRITE's data; empty otherwise.
    pub payload: Vec<u8>,
    pub expect: Expect,
}

enum Outgoing {
    Request {
        cookie: u64,
        header: [u8; proto::REQUEST_HEADER_LEN],
        payload: Vec<u8>,
        deadline: Instant,
    },
    Disconnect {
        deadline: Instant,
    },
}

/// A request on its way; wait for its reply with [`Ticket::wait`]. Dropping it unanswered (a timeout, a
/// caller that gave up) abandons the request: its entry drops its buffer at once.
pub(crate) struct Ticket {
    rx: oneshot::Receiver<Result<ReplyData>>,
    command: Command,
    deadline: Instant,
    after: Duration,
    shared: Arc<Shared>,
    cookie: u64,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.shared.abandon(self.cookie);
    }
}

impl Ticket {
    pub(crate) async fn wait(mut self) -> Result<ReplyData> {
        match timeout_at(self.deadline, &mut self.rx).await {
            Ok(Ok(result)) => result,
            // The entry was dropped: the connection ended, or the writer discarded a request whose
            // deadline had passed just before ours fired.
            Ok(Err(_)) if Instant::now() < self.deadline => Err(Error::Closed),
            Ok(Err(_)) | Err(_) => Err(Error::Timeout {
                what: format!("the reply to {}", self.command),
                after: self.after,
            }),
        }
    }
}

/// Removes a registered request that never made it into the send queue.
struct Unsent<'a> {
    shared: &'a Shared,
    cookie: u64,
}

impl Drop for Unsent<'_> {
    fn drop(&mut self) {
        self.shared.take(self.cookie);
    }
}

/// One connection in the transmission phase.
pub(crate) struct Conn {
    shared: Arc<Shared>,
    out: mpsc::Sender<Outgoing>,
    cookies: AtomicU64,
    reader: Mutex<Option<JoinHandle<()>>>,
}

impl Conn {
    /// Starts the reader and writer tasks on a stream that has finished the handshake.
    pub(crate) fn start<S>(stream: S, structured: bool, io_timeout: Duration) -> Conn
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (rd, wr) = tokio::io::split(stream);
        let shared = Arc::new(Shared::default());
        let (out, rx) = mpsc::channel(QUEUE_DEPTH);
        let reader = tokio::spawn(reader_task(
            BufReader::new(rd),
            Arc::clone(&shared),
            structured,
            io_timeout,
        ));
        tokio::spawn(writer_task(BufWriter::new(wr), rx, Arc::clone(&shared)));
        Conn {
            shared,
            out,
            cookies: AtomicU64::new(1),
            reader: Mutex::new(Some(reader)),
        }
    }

    /// Queues a request and returns the ticket for its reply; the whole exchange must finish in `limit`.
    pub(crate) async fn submit(&self, request: Request, limit: Duration) -> Result<Ticket> {
        let Request {
            command,
            flags,
            offset,
            len,
            payload,
            expect,
        } = request;
        let deadline = Instant::now() + limit;
        let cookie = self.cookies.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.shared.register(
            cookie,
            Pending {
                command,
                len,
                expect,
                error: None,
                chunks: 0,
                tx: Some(tx),
            },
        )?;
        let unsent = Unsent {
            shared: &self.shared,
            cookie,
        };
        let header = proto::request_header(flags, command, cookie, offset, len);
        match timeout_at(
            deadline,
            self.out.send(Outgoing::Request {
                cookie,
                header,
                payload,
                deadline,
            }),
        )
        .await
        {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err(Error::Closed),
            Err(_) => {
                return Err(Error::Timeout {
                    what: format!("room in the send queue for {command}"),
                    after: limit,
                });
            }
        }
        // Queued: from now on the reader owns the entry, since a reply may come.
        std::mem::forget(unsent);
        Ok(Ticket {
            rx,
            command,
            deadline,
            after: limit,
            shared: Arc::clone(&self.shared),
            cookie,
        })
    }

    /// Requests waiting for a reply: (callers still waiting, abandoned by their callers).
    #[cfg(test)]
    pub(crate) fn pending_counts(&self) -> (usize, usize) {
        let state = self.shared.lock();
        let abandoned = state.pending.values().filter(|p| p.abandoned()).count();
        (state.pending.len() - abandoned, abandoned)
    }

    /// Soft disconnect: refuse new requests, send `NBD_CMD_DISC` after what is queued, and wait until the
    /// server has answered what was in flight and closed the connection.
    pub(crate) async fn disconnect(&self, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        self.shared.shut();
        // A writer that is gone means the connection already ended, which is what we want.
        let _ = timeout_at(deadline, self.out.send(Outgoing::Disconnect { deadline })).await;
        let reader = self.reader.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(mut reader) = reader {
            if timeout_at(deadline, &mut reader).await.is_err() {
                self.shared.kill.notify_one();
                return Err(Error::Timeout {
                    what: "the NBD server to close the connection after NBD_CMD_DISC".into(),
                    after: limit,
                });
            }
        }
        Ok(())
    }

    /// Starts a soft disconnect without waiting for it (the server said it is shutting down).
    pub(crate) fn begin_disconnect(&self, limit: Duration) {
        self.shared.shut();
        let _ = self.out.try_send(Outgoing::Disconnect {
            deadline: Instant::now() + limit,
        });
    }
}

async fn writer_task<W: AsyncWrite + Unpin>(
    mut wr: BufWriter<W>,
    mut rx: mpsc::Receiver<Outgoing>,
    shared: Arc<Shared>,
) {
    let disc = proto::request_header(0, Command::Disconnect, 0, 0, 0);
    // Requests written but still in the buffer, and by when they must be out.
    let mut unflushed: Option<Instant> = None;
    loop {
        let next = match rx.try_recv() {
            Ok(msg) => Some(msg),
            Err(TryRecvError::Disconnected) => None,
            Err(TryRecvError::Empty) => {
                // Nothing more to batch: push out what is buffered before waiting.
                if let Some(deadline) = unflushed.take() {
                    if !matches!(timeout_at(deadline, wr.flush()).await, Ok(Ok(()))) {
                        break;
                    }
                }
                rx.recv().await
            }
        };
        let Some(msg) = next else {
            // Every handle is gone and nobody waits for a reply: say goodbye and stop the reader.
            let _ = timeout(DROP_DISCONNECT_TIMEOUT, send_disconnect(&mut wr, &disc)).await;
            shared.kill.notify_one();
            return;
        };
        match msg {
            Outgoing::Request {
                cookie,
                header,
                payload,
                deadline,
            } => {
                if Instant::now() >= deadline {
                    // The caller has given up already; do not start what it no longer waits for.
                    shared.take(cookie);
                    continue;
                }
                let written = timeout_at(deadline, async {
                    wr.write_all(&header).await?;
                    wr.write_all(&payload).await
                })
                .await;
                if !matches!(written, Ok(Ok(()))) {
                    break;
                }
                unflushed = Some(unflushed.map_or(deadline, |d| d.max(deadline)));
            }
            Outgoing::Disconnect { deadline } => {
                // Nothing may follow NBD_CMD_DISC; requests still queued fail when the reader sees EOF.
                shared.shut();
                if timeout_at(deadline, send_disconnect(&mut wr, &disc))
                    .await
                    .is_err()
                {
                    shared.kill.notify_one();
                }
                return;
            }
        }
    }
    // A write failed or stalled, and half a request may be on the wire: the stream is unusable.
    shared.shut();
    shared.kill.notify_one();
}

async fn send_disconnect<W: AsyncWrite + Unpin>(wr: &mut BufWriter<W>, disc: &[u8]) -> io::Result<()> {
    wr.write_all(disc).await?;
    wr.flush().await?;
    wr.shutdown().await
}

async fn reader_task<R: AsyncRead + Unpin>(
    mut rd: BufReader<R>,
    shared: Arc<Shared>,
    structured: bool,
    io_timeout: Duration,
) {
    let reason = loop {
        let magic = tokio::select! {
            biased;
            () = shared.kill.notified() => break CloseReason::Closed,
            magic = rd.read_u32() => magic,
        };
        let magic = match magic {
            Ok(magic) => magic,
            Err(e) => break CloseReason::from(e),
        };
        let message = timeout(io_timeout, read_message(&mut rd, &shared, structured, magic));
        let outcome = tokio::select! {
            biased;
            () = shared.kill.notified() => break CloseReason::Closed,
            outcome = message => outcome,
        };
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(reason)) => break reason,
            Err(_) => break CloseReason::Stalled(io_timeout),
        }
    };
    shared.fail_all(&reason);
}

/// Reads one reply message whose magic has been read and hands it to its request.
async fn read_message<R: AsyncRead + Unpin>(
    rd: &mut R,
    shared: &Shared,
    structured: bool,
    magic: u32,
) -> Result<(), CloseReason> {
    match magic {
        proto::SIMPLE_REPLY_MAGIC => {
            let errno = rd.read_u32().await?;
            let cookie = rd.read_u64().await?;
            let pending = shared.take(cookie).ok_or_else(|| {
                CloseReason::Protocol(format!("simple reply for unknown cookie {cookie:#x}"))
            })?;
            read_simple_reply(rd, pending, structured, errno).await
        }
        proto::STRUCTURED_REPLY_MAGIC => {
            let flags = rd.read_u16().await?;
            let kind = rd.read_u16().await?;
            let cookie = rd.read_u64().await?;
            let len = rd.read_u32().await?;
            if !structured {
                return Err(CloseReason::Protocol(
                    "structured reply although none were negotiated".into(),
                ));
            }
            let mut pending = shared.take(cookie).ok_or_else(|| {
                CloseReason::Protocol(format!("structured reply chunk for unknown cookie {cookie:#x}"))
            })?;
            pending.chunks += 1;
            let chunk = if pending.chunks > MAX_REPLY_CHUNKS {
                Err(CloseReason::Protocol(format!(
                    "reply to {} has more than {MAX_REPLY_CHUNKS} chunks",
                    pending.command
                )))
            } else if pending.abandoned() {
                skip_chunk(rd, &pending, len).await
            } else {
                read_chunk(rd, &mut pending, flags, kind, len).await
            };
            if let Err(reason) = chunk {
                pending.complete(Err(reason.to_error()));
                return Err(reason);
            }
            if flags & proto::REPLY_FLAG_DONE != 0 {
                pending.finish();
            } else {
                shared.put_back(cookie, pending);
            }
            Ok(())
        }
        other => Err(CloseReason::Protocol(format!(
            "unknown reply magic {other:#010x}"
        ))),
    }
}

async fn read_simple_reply<R: AsyncRead + Unpin>(
    rd: &mut R,
    mut pending: Pending,
    structured: bool,
    errno: u32,
) -> Result<(), CloseReason> {
    if pending.abandoned() && errno == 0 && pending.command == Command::Read && !structured {
        // Nobody waits for this read any more, but its data follows the header.
        skip(rd, pending.len).await?;
        return Ok(());
    }
    if errno != 0 {
        let command = pending.command;
        pending.complete(Err(reply::server_error(command, errno, String::new())));
        return Ok(());
    }
    let violation = match &mut pending.expect {
        Expect::Done => None,
        // Without structured replies the data follows the header.
        Expect::Read(read) if !structured => {
            if let Err(e) = rd.read_exact(&mut read.buf).await {
                pending.complete(Err(Error::Closed));
                return Err(e.into());
            }
            None
        }
        Expect::Read(_) => Some("simple reply with data to NBD_CMD_READ although structured replies are on"),
        Expect::BlockStatus { .. } => Some("simple reply without error to NBD_CMD_BLOCK_STATUS"),
    };
    if let Some(violation) = violation {
        let reason = CloseReason::Protocol(violation.into());
        pending.complete(Err(reason.to_error()));
        return Err(reason);
    }
    let result = match pending.expect {
        Expect::Read(ref mut read) => Ok(ReplyData::Data(std::mem::take(&mut read.buf))),
        _ => Ok(ReplyData::Done),
    };
    pending.complete(result);
    Ok(())
}

/// Reads one structured reply chunk's payload into its request.
async fn read_chunk<R: AsyncRead + Unpin>(
    rd: &mut R,
    pending: &mut Pending,
    flags: u16,
    kind: u16,
    len: u32,
) -> Result<(), CloseReason> {
    let command = pending.command;
    let unexpected = || CloseReason::Protocol(format!("unexpected reply chunk type {kind} to {command}"));
    match kind {
        proto::REPLY_TYPE_NONE => {
            if len != 0 || flags & proto::REPLY_FLAG_DONE == 0 {
                return Err(CloseReason::Protocol(
                    "NBD_REPLY_TYPE_NONE with payload or without DONE".into(),
                ));
            }
        }
        proto::REPLY_TYPE_OFFSET_DATA => {
            let Expect::Read(read) = &mut pending.expect else {
                return Err(unexpected());
            };
            if len < 9 {
                return Err(CloseReason::Protocol(format!(
                    "NBD_REPLY_TYPE_OFFSET_DATA of {len} bytes"
                )));
            }
            let offset = rd.read_u64().await?;
            let range = read
                .place(offset, u64::from(len - 8))
                .map_err(CloseReason::Protocol)?;
            rd.read_exact(&mut read.buf[range]).await?;
        }
        proto::REPLY_TYPE_OFFSET_HOLE => {
            let Expect::Read(read) = &mut pending.expect else {
                return Err(unexpected());
            };
            if len != 12 {
                return Err(CloseReason::Protocol(format!(
                    "NBD_REPLY_TYPE_OFFSET_HOLE of {len} bytes"
                )));
            }
            let offset = rd.read_u64().await?;
            let size = rd.read_u32().await?;
            read.hole(offset, size).map_err(CloseReason::Protocol)?;
        }
        proto::REPLY_TYPE_BLOCK_STATUS => {
            let Expect::BlockStatus {
                context,
                others,
                descriptors,
            } = &mut pending.expect
            else {
                return Err(unexpected());
            };
            let payload = read_payload(rd, len).await?;
            let (got, list) = reply::parse_block_status(&payload).map_err(CloseReason::Protocol)?;
            if got != *context && others.contains(&got) {
                // The server reports every negotiated context; this request wants another one.
                return Ok(());
            }
            if got != *context {
                return Err(CloseReason::Protocol(format!(
                    "block status for unknown context id {got}"
                )));
            }
            if descriptors.is_some() {
                return Err(CloseReason::Protocol(
                    "two block status chunks for one context".into(),
                ));
            }
            *descriptors = Some(list);
        }
        _ if kind & proto::REPLY_TYPE_ERROR_BIT != 0 => {
            let payload = read_payload(rd, len).await?;
            let (errno, message) = reply::parse_error_chunk(kind, &payload).map_err(CloseReason::Protocol)?;
            pending.error.get_or_insert((errno, message));
        }
        _ => return Err(unexpected()),
    }
    Ok(())
}

/// Skips the payload of a chunk of an abandoned request's reply: at most what the request could bring.
async fn skip_chunk<R: AsyncRead + Unpin>(
    rd: &mut R,
    pending: &Pending,
    len: u32,
) -> Result<(), CloseReason> {
    let most = MAX_META_PAYLOAD.max(pending.len.saturating_add(8));
    if len > most {
        return Err(CloseReason::Protocol(format!(
            "reply chunk of {len} bytes to {} is larger than the request allows",
            pending.command
        )));
    }
    skip(rd, len).await
}

async fn skip<R: AsyncRead + Unpin>(rd: &mut R, len: u32) -> Result<(), CloseReason> {
    let skipped = tokio::io::copy(&mut rd.take(u64::from(len)), &mut tokio::io::sink()).await?;
    if skipped == u64::from(len) {
        Ok(())
    } else {
        Err(CloseReason::Closed)
    }
}

async fn read_payload<R: AsyncRead + Unpin>(rd: &mut R, len: u32) -> Result<Vec<u8>, CloseReason> {
    if len > MAX_META_PAYLOAD {
        return Err(CloseReason::Protocol(format!(
            "reply chunk of {len} bytes is implausibly large"
        )));
    }
    let mut payload = vec![0; len as usize];
    rd.read_exact(&mut payload).await?;
    Ok(payload)
}
