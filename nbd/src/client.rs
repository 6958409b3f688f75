//! The async client callers use: connecting, what the export is, and the commands, split and aligned to
//! what the server accepts. Checks that need no server (range, alignment, read-only, advertised features)
//! fail before anything is sent.

use std::collections::VecDeque;
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, UnixStream};
use tokio::time::{Instant, timeout_at};

use crate::conn::{Conn, Request, Ticket};
use crate::error::{Error, Result};
use crate::extent::{Extent, push_merged};
use crate::handshake::{self, ExportInfo};
use crate::proto::{self, Command, errno};
use crate::reply::{Expect, ReadAssembly, ReplyData};

/// Per-request timeout unless changed with [`Client::set_timeout`] or [`Client::with_timeout`]. It also
/// bounds how long the server may take to finish a reply it has begun.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// Requests of one large call in flight at once.
const PIPELINE_DEPTH: usize = 4;

/// A connection to one NBD export. Cheap to clone; clones share the connection, and requests from any
/// number of tasks are multiplexed on it. Dropping the last clone disconnects.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
    timeout: Duration,
}

struct Inner {
    conn: Conn,
    info: ExportInfo,
    export: String,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("export", &self.inner.export)
            .field("size", &self.inner.info.size)
            .field("flags", &format_args!("{:#x}", self.inner.info.flags))
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Connects to a Unix socket and opens `export`. `timeout` bounds connecting and the handshake together.
    pub async fn connect_unix(path: impl AsRef<Path>, export: &str, timeout: Duration) -> Result<Client> {
        let path = path.as_ref();
        let deadline = Instant::now() + timeout;
        let target = path.display().to_string();
        let stream = match timeout_at(deadline, UnixStream::connect(path)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(source)) => return Err(Error::Connect { target, source }),
            Err(_) => {
                return Err(Error::Timeout {
                    what: format!("connecting to {target}"),
                    after: timeout,
                });
            }
        };
        Self::handshake(stream, export, deadline, timeout).await
    }

    /// Connects over TCP and opens `export`. `timeout` bounds connecting and the handshake together.
    pub async fn connect_tcp(addr: SocketAddr, export: &str, timeout: Duration) -> Result<Client> {
        let deadline = Instant::now() + timeout;
        let target = addr.to_string();
        let stream = match timeout_at(deadline, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(source)) => return Err(Error::Connect { target, source }),
            Err(_) => {
                return Err(Error::Timeout {
                    what: format!("connecting to {target}"),
                    after: timeout,
                });
            }
        };
        stream
            .set_nodelay(true)
            .map_err(|source| Error::Connect { target, source })?;
        Self::handshake(stream, export, deadline, timeout).await
    }

    /// Opens `export` over an already connected stream (a socket pair, a vsock, a test peer).
    pub async fn connect_stream<S>(stream: S, export: &str, timeout: Duration) -> Result<Client>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        Self::handshake(stream, export, Instant::now() + timeout, timeout).await
    }

    async fn handshake<S>(mut stream: S, export: &str, deadline: Instant, timeout: Duration) -> Result<Client>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let info = match timeout_at(deadline, handshake::negotiate(&mut stream, export)).await {
            Ok(info) => info?,
            Err(_) => {
                return Err(Error::Timeout {
                    what: format!("the NBD handshake for export {export:?}"),
                    after: timeout,
                });
            }
        };
        let conn = Conn::start(stream, info.structured, DEFAULT_TIMEOUT);
        Ok(Client {
            inner: Arc::new(Inner {
                conn,
                info,
                export: export.to_owned(),
            }),
            timeout: DEFAULT_TIMEOUT,
        })
    }

    /// The export's name as given to `connect_*`.
    pub fn export_name(&self) -> &str {
        &self.inner.export
    }

    /// Size of the export in bytes.
    pub fn size(&self) -> u64 {
        self.inner.info.size
    }

    /// Whether the server exports it read-only.
    pub fn read_only(&self) -> bool {
        self.has(proto::TF_READ_ONLY)
    }

    /// Whether the server selected `base:allocation`, so [`Client::block_status`] reports real extents.
    pub fn block_status_supported(&self) -> bool {
        self.inner.info.allocation_context.is_some()
    }

    /// The preferred block size from `NBD_INFO_BLOCK_SIZE`, if the server sent one.
    pub fn preferred_block_size(&self) -> Option<u32> {
        self.inner.info.block_size.map(|b| b.preferred)
    }

    /// The minimum block size: offsets and lengths of writes, trims and zeroing must be multiples of it
    /// (reads are widened for you). 1 unless the server said otherwise.
    pub fn min_block_size(&self) -> u32 {
        self.inner.info.block_size.map_or(1, |b| b.min)
    }

    /// The per-request timeout of this handle.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Sets the per-request timeout of this handle (clones made later inherit it).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// This handle with another per-request timeout.
    #[must_use]
    pub fn with_timeout(mut self, timeout: Duration) -> Client {
        self.timeout = timeout;
        self
    }

    /// Reads `buf.len()` bytes at `offset`. Large reads are split into requests the server accepts and
    /// pipelined; holes arrive as zeroes.
    pub async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let len = buf.len() as u64;
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        // Reads are widened to the minimum block size; only the asked-for bytes are copied out.
        let align = self.align();
        let start = offset - offset % align;
        let end = (offset + len)
            .checked_next_multiple_of(align)
            .map_or(self.size(), |e| e.min(self.size()));
        let mut window = VecDeque::new();
        for (at, n) in chunks(start, end, self.max_payload()) {
            if window.len() == PIPELINE_DEPTH {
                if let Some((first, ticket)) = window.pop_front() {
                    self.collect_read(first, ticket, offset, buf).await?;
                }
            }
            let request = Request {
                command: Command::Read,
                flags: 0,
                offset: at,
                len: n as u32,
                payload: Vec::new(),
                expect: Expect::Read(ReadAssembly::new(at, n as u32)),
            };
            window.push_back((at, self.submit(request).await?));
        }
        for (first, ticket) in window {
            self.collect_read(first, ticket, offset, buf).await?;
        }
        Ok(())
    }

    /// Reads `len` bytes at `offset` into `buf`'s allocation and returns it holding exactly those bytes. A
    /// read that fits one request (aligned, at most the server's maximum payload) is received straight into
    /// `buf`, without clearing or copying it: pass the returned buffer to the next call to read block after
    /// block without allocating. Longer reads are split and pipelined as [`Client::read`] does.
    pub async fn read_owned(&self, offset: u64, len: usize, mut buf: Vec<u8>) -> Result<Vec<u8>> {
        let n = len as u64;
        self.check_range(offset, n)?;
        let align = self.align();
        let aligned = offset % align == 0 && (n % align == 0 || offset + n == self.size());
        if n == 0 || !aligned || n > self.max_payload() {
            buf.resize(len, 0);
            self.read(offset, &mut buf).await?;
            return Ok(buf);
        }
        let request = Request {
            command: Command::Read,
            flags: 0,
            offset,
            len: n as u32,
            payload: Vec::new(),
            expect: Expect::Read(ReadAssembly::with_buffer(offset, n as u32, buf)),
        };
        let ticket = self.submit(request).await?;
        match self.wait(ticket).await? {
            ReplyData::Data(data) if data.len() == len => Ok(data),
            _ => Err(Error::Protocol("read reply without the data asked for".into())),
        }
    }

    async fn collect_read(&self, at: u64, ticket: Ticket, offset: u64, buf: &mut [u8]) -> Result<()> {
        let ReplyData::Data(data) = self.wait(ticket).await? else {
            return Err(Error::Protocol("read reply without data".into()));
        };
        let lo = at.max(offset);
        let hi = (at + data.len() as u64).min(offset + buf.len() as u64);
        if lo < hi {
            buf[(lo - offset) as usize..(hi - offset) as usize]
                .copy_from_slice(&data[(lo - at) as usize..(hi - at) as usize]);
        }
        Ok(())
    }

    /// Writes `data` at `offset`; with `fua` it is on stable storage when this returns (by a flush if the
    /// server has no FUA).
    pub async fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        let len = data.len() as u64;
        self.check_range(offset, len)?;
        self.check_writable(Command::Write)?;
        if len == 0 {
            return Ok(());
        }
        self.check_aligned(Command::Write, offset, len)?;
        let native_fua = fua && self.has(proto::TF_SEND_FUA);
        if fua && !native_fua && !self.has(proto::TF_SEND_FLUSH) {
            return Err(Error::Unsupported {
                feature: "FUA or NBD_CMD_FLUSH",
            });
        }
        let flags = if native_fua { proto::CMD_FLAG_FUA } else { 0 };
        let requests = chunks(offset, offset + len, self.max_payload()).map(|(at, n)| {
            let from = (at - offset) as usize;
            Request {
                command: Command::Write,
                flags,
                offset: at,
                len: n as u32,
                payload: data[from..from + n as usize].to_vec(),
                expect: Expect::Done,
            }
        });
        self.run_all(requests).await?;
        if fua && !native_fua {
            self.flush().await?;
        }
        Ok(())
    }

    /// [`Client::write`] of a buffer the caller gives up: a write that fits one request is sent from `data`
    /// itself, without copying it (a task that writes in the background can own its bytes).
    pub async fn write_owned(&self, offset: u64, data: Vec<u8>, fua: bool) -> Result<()> {
        let len = data.len() as u64;
        if fua || len == 0 || len > self.max_payload() {
            return self.write(offset, &data, fua).await;
        }
        self.check_range(offset, len)?;
        self.check_writable(Command::Write)?;
        self.check_aligned(Command::Write, offset, len)?;
        let request = Request {
            command: Command::Write,
            flags: 0,
            offset,
            len: len as u32,
            payload: data,
            expect: Expect::Done,
        };
        let ticket = self.submit(request).await?;
        self.wait(ticket).await.map(drop)
    }

    /// Makes `len` bytes at `offset` read as zeroes without sending them; `may_trim` lets the server
    /// deallocate the range instead of writing zeroes.
    pub async fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> Result<()> {
        self.check_range(offset, len)?;
        self.check_writable(Command::WriteZeroes)?;
        if len == 0 {
            return Ok(());
        }
        if !self.has(proto::TF_SEND_WRITE_ZEROES) {
            return Err(Error::Unsupported {
                feature: "NBD_CMD_WRITE_ZEROES",
            });
        }
        self.check_aligned(Command::WriteZeroes, offset, len)?;
        let flags = if may_trim { 0 } else { proto::CMD_FLAG_NO_HOLE };
        self.run_all(self.effect_requests(Command::WriteZeroes, flags, offset, len))
            .await
    }

    /// Tells the server `len` bytes at `offset` are no longer needed; their content is undefined after.
    pub async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.check_range(offset, len)?;
        self.check_writable(Command::Trim)?;
        if len == 0 {
            return Ok(());
        }
        if !self.has(proto::TF_SEND_TRIM) {
            return Err(Error::Unsupported {
                feature: "NBD_CMD_TRIM",
            });
        }
        self.check_aligned(Command::Trim, offset, len)?;
        self.run_all(self.effect_requests(Command::Trim, 0, offset, len))
            .await
    }

    /// Waits until every write the server has answered is on stable storage.
    pub async fn flush(&self) -> Result<()> {
        if !self.has(proto::TF_SEND_FLUSH) {
            return Err(Error::Unsupported {
                feature: "NBD_CMD_FLUSH",
            });
        }
        let request = Request {
            command: Command::Flush,
            flags: 0,
            offset: 0,
            len: 0,
            payload: Vec::new(),
            expect: Expect::Done,
        };
        let ticket = self.submit(request).await?;
        self.wait(ticket).await.map(drop)
    }

    /// The allocation status of `[offset, offset + len)` from `base:allocation`, as sorted, touching extents
    /// that cover exactly that range (neighbours with the same status merged). Without `base:allocation`
    /// it is one data extent.
    pub async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let end = offset + len;
        let Some(context) = self.inner.info.allocation_context else {
            return Ok(vec![Extent {
                offset,
                len,
                hole: false,
                zero: false,
            }]);
        };
        let align = self.align();
        let mut at = offset - offset % align;
        let stop = end
            .checked_next_multiple_of(align)
            .map_or(self.size(), |e| e.min(self.size()));
        let max_len = u64::from(u32::MAX) / align * align;
        let mut extents = Vec::new();
        while at < stop {
            let request = Request {
                command: Command::BlockStatus,
                flags: 0,
                offset: at,
                len: (stop - at).min(max_len) as u32,
                payload: Vec::new(),
                expect: Expect::BlockStatus {
                    context,
                    descriptors: None,
                },
            };
            let ticket = self.submit(request).await?;
            let ReplyData::Extents(descriptors) = self.wait(ticket).await? else {
                return Err(Error::Protocol("block status reply without extents".into()));
            };
            // Every descriptor is at least one byte long, so each round makes progress.
            for (n, flags) in descriptors {
                let next = at.saturating_add(u64::from(n)).min(stop);
                let (lo, hi) = (at.max(offset), next.min(end));
                if lo < hi {
                    let hole = flags & proto::STATE_HOLE != 0;
                    let zero = flags & proto::STATE_ZERO != 0;
                    push_merged(
                        &mut extents,
                        Extent {
                            offset: lo,
                            len: hi - lo,
                            hole,
                            zero,
                        },
                    );
                }
                at = next;
                if at == stop {
                    break;
                }
            }
        }
        Ok(extents)
    }

    /// Soft disconnect: no new requests from any clone, `NBD_CMD_DISC`, then waits (within the timeout)
    /// for the server to answer what was in flight and close the connection.
    pub async fn disconnect(self) -> Result<()> {
        self.inner.conn.disconnect(self.timeout).await
    }

    fn has(&self, flag: u16) -> bool {
        self.inner.info.flags & flag != 0
    }

    fn align(&self) -> u64 {
        u64::from(self.min_block_size())
    }

    /// Largest READ/WRITE length: the advertised maximum, at most 32 MiB, in whole minimum blocks.
    fn max_payload(&self) -> u64 {
        let max = self
            .inner
            .info
            .block_size
            .map_or(proto::DEFAULT_MAX_PAYLOAD, |b| {
                b.max.min(proto::DEFAULT_MAX_PAYLOAD)
            });
        let align = self.align();
        (u64::from(max) / align * align).max(align)
    }

    /// Largest TRIM/WRITE_ZEROES length: the advertised maximum if any, else what the length field holds.
    fn max_effect_len(&self) -> u64 {
        let max = self.inner.info.block_size.map_or(u32::MAX, |b| b.max);
        let align = self.align();
        (u64::from(max) / align * align).max(align)
    }

    fn effect_requests(
        &self,
        command: Command,
        flags: u16,
        offset: u64,
        len: u64,
    ) -> impl Iterator<Item = Request> + use<> {
        chunks(offset, offset + len, self.max_effect_len()).map(move |(at, n)| Request {
            command,
            flags,
            offset: at,
            len: n as u32,
            payload: Vec::new(),
            expect: Expect::Done,
        })
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size() => Ok(()),
            _ => Err(Error::OutOfRange {
                offset,
                len,
                size: self.size(),
            }),
        }
    }

    fn check_aligned(&self, command: Command, offset: u64, len: u64) -> Result<()> {
        let align = self.align();
        // A tail that ends at the end of the export may be short.
        let tail_ok = len % align == 0 || offset + len == self.size();
        if offset % align == 0 && tail_ok {
            Ok(())
        } else {
            Err(Error::Misaligned {
                command,
                offset,
                len,
                align: self.min_block_size(),
            })
        }
    }

    fn check_writable(&self, command: Command) -> Result<()> {
        if self.read_only() {
            Err(Error::ReadOnly { command })
        } else {
            Ok(())
        }
    }

    /// Requests waiting for a reply: (callers still waiting, abandoned by their callers).
    #[cfg(test)]
    pub(crate) fn pending_counts(&self) -> (usize, usize) {
        self.inner.conn.pending_counts()
    }

    async fn submit(&self, request: Request) -> Result<Ticket> {
        self.inner.conn.submit(request, self.timeout).await
    }

    async fn wait(&self, ticket: Ticket) -> Result<ReplyData> {
        let result = ticket.wait().await;
        if let Err(Error::Server {
            errno: errno::ESHUTDOWN,
            ..
        }) = &result
        {
            // The spec wants a soft disconnect from a client that hears the server is going away.
            self.inner.conn.begin_disconnect(self.timeout);
        }
        result
    }

    /// Submits requests that answer with no data, a few in flight at a time, and waits for all.
    async fn run_all(&self, requests: impl Iterator<Item = Request>) -> Result<()> {
        let mut window = VecDeque::new();
        for request in requests {
            if window.len() == PIPELINE_DEPTH {
                if let Some(ticket) = window.pop_front() {
                    self.wait(ticket).await?;
                }
            }
            window.push_back(self.submit(request).await?);
        }
        for ticket in window {
            self.wait(ticket).await?;
        }
        Ok(())
    }
}

/// `[start, end)` cut into pieces of at most `max` bytes.
fn chunks(start: u64, end: u64, max: u64) -> impl Iterator<Item = (u64, u64)> {
    let mut at = start;
    std::iter::from_fn(move || {
        (at < end).then(|| {
            let n = (end - at).min(max);
            let piece = (at, n);
            at += n;
            piece
        })
    })
}

#[cfg(test)]
mod tests {
    use super::chunks;

    #[test]
    fn chunks_cover_the_range() {
        assert_eq!(chunks(0, 10, 4).collect::<Vec<_>>(), vec![(0, 4), (4, 4), (8, 2)]);
        assert_eq!(chunks(5, 5, 4).count(), 0);
        assert_eq!(
            chunks(0, u64::MAX, u64::MAX).collect::<Vec<_>>(),
            vec![(0, u64::MAX)]
        );
    }
}
