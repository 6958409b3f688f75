//! The async client callers use: connecting, what the export is, and the commands, split and aligned to
//! what the server accepts. Checks that need no server (range, alignment, read-only, advertised features)
//! fail before anything is sent.

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, UnixStream, lookup_host};
use tokio::time::{Instant, timeout_at};
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::ServerName;

use crate::conn::{Conn, Request, Ticket};
use crate::error::{Error, Result};
use crate::extent::{ContextExtent, Extent, push_merged};
use crate::handshake::{self, ExportInfo};
use crate::proto::{self, Command, errno};
use crate::reply::{Expect, ReadAssembly, ReplyData};
use crate::tls::{self, TlsCredentials};

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

/// How to connect: TLS or (explicitly) plaintext for TCP, and the metadata contexts to negotiate besides
/// `base:allocation`. The default is plaintext over a Unix socket with `base:allocation` only; TCP then
/// needs [`ConnectOptions::tls`] or [`ConnectOptions::insecure_plaintext`].
#[derive(Debug, Clone, Default)]
pub struct ConnectOptions {
    tls: Option<TlsCredentials>,
    server_name: Option<String>,
    insecure_plaintext: bool,
    meta_contexts: Vec<String>,
}

impl ConnectOptions {
    /// Plaintext, `base:allocation` only.
    pub fn new() -> ConnectOptions {
        ConnectOptions::default()
    }

    /// TLS with these credentials: `NBD_OPT_STARTTLS` before any other option, the server's certificate
    /// checked against the CA and the host name, the client certificate presented.
    #[must_use]
    pub fn tls(mut self, credentials: TlsCredentials) -> ConnectOptions {
        self.tls = Some(credentials);
        self
    }

    /// The name the server's certificate must carry, if not the host connected to (needed for TLS over a
    /// Unix socket or a given stream, which have no host).
    #[must_use]
    pub fn server_name(mut self, name: impl Into<String>) -> ConnectOptions {
        self.server_name = Some(name.into());
        self
    }

    /// Allows plaintext NBD over TCP: anyone on the path can read and change the disk's data. For tests and
    /// trusted links only; ignored when TLS credentials are given.
    #[must_use]
    pub fn insecure_plaintext(mut self) -> ConnectOptions {
        self.insecure_plaintext = true;
        self
    }

    /// Also negotiates the metadata context `name` (e.g. `qemu:allocation-depth`); query it with
    /// [`Client::context_status`].
    #[must_use]
    pub fn meta_context(mut self, name: impl Into<String>) -> ConnectOptions {
        self.meta_contexts.push(name.into());
        self
    }

    /// Also negotiates QEMU's context for the dirty bitmap `bitmap` (`qemu:dirty-bitmap:BITMAP`, present
    /// when the export was made with that bitmap); query it with [`Client::dirty_extents`].
    #[must_use]
    pub fn dirty_bitmap(self, bitmap: &str) -> ConnectOptions {
        self.meta_context(dirty_bitmap_context(bitmap))
    }
}

/// The metadata context name QEMU exports a dirty bitmap under.
pub fn dirty_bitmap_context(bitmap: &str) -> String {
    format!("{}{bitmap}", proto::QEMU_DIRTY_BITMAP)
}

/// Splits `host:port` (`[v6]:port` for IPv6) into the host, without brackets, and the port.
fn split_host_port(addr: &str) -> Option<(&str, u16)> {
    let (host, port) = addr.rsplit_once(':')?;
    let host = match host.strip_prefix('[') {
        Some(inner) => inner.strip_suffix(']')?,
        None if host.contains(':') => return None,
        None => host,
    };
    let port = port.parse().ok()?;
    (!host.is_empty()).then_some((host, port))
}

impl Client {
    /// Connects to a Unix socket and opens `export`. `timeout` bounds connecting and the handshake together.
    pub async fn connect_unix(path: impl AsRef<Path>, export: &str, timeout: Duration) -> Result<Client> {
        Self::connect_unix_with(path, export, &ConnectOptions::new(), timeout).await
    }

    /// [`Client::connect_unix`] with options (metadata contexts; TLS needs [`ConnectOptions::server_name`]).
    pub async fn connect_unix_with(
        path: impl AsRef<Path>,
        export: &str,
        options: &ConnectOptions,
        timeout: Duration,
    ) -> Result<Client> {
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
        Self::handshake(stream, &target, None, export, options, deadline, timeout).await
    }

    /// Connects over TCP to `addr` (`host:port`, `[v6]:port`) and opens `export`: with TLS if `options`
    /// has credentials (the certificate must name `host`, or [`ConnectOptions::server_name`]), in
    /// plaintext only with [`ConnectOptions::insecure_plaintext`], else [`Error::PlaintextRefused`] before
    /// anything is sent. `timeout` bounds resolving, connecting and the handshake together.
    pub async fn connect_tcp(
        addr: &str,
        export: &str,
        options: &ConnectOptions,
        timeout: Duration,
    ) -> Result<Client> {
        let target = addr.to_owned();
        let Some((host, port)) = split_host_port(addr) else {
            return Err(Error::Connect {
                target,
                source: io::Error::new(io::ErrorKind::InvalidInput, "not HOST:PORT"),
            });
        };
        if options.tls.is_none() && !options.insecure_plaintext {
            return Err(Error::PlaintextRefused { target });
        }
        let deadline = Instant::now() + timeout;
        let connect = async {
            let mut last = None;
            for sa in lookup_host((host, port)).await? {
                match TcpStream::connect(sa).await {
                    Ok(stream) => return Ok(stream),
                    Err(e) => last = Some(e),
                }
            }
            Err(last.unwrap_or_else(|| io::Error::new(io::ErrorKind::NotFound, "the host has no address")))
        };
        let stream = match timeout_at(deadline, connect).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(source)) => return Err(Error::Connect { target, source }),
            Err(_) => {
                return Err(Error::Timeout {
                    what: format!("connecting to {target}"),
                    after: timeout,
                });
            }
        };
        crate::liveness::bound(&stream).map_err(|source| Error::Connect {
            target: target.clone(),
            source,
        })?;
        Self::handshake(stream, &target, Some(host), export, options, deadline, timeout).await
    }

    /// Opens `export` over an already connected stream (a socket pair, a vsock, a test peer).
    pub async fn connect_stream<S>(stream: S, export: &str, timeout: Duration) -> Result<Client>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        Self::connect_stream_with(stream, export, &ConnectOptions::new(), timeout).await
    }

    /// [`Client::connect_stream`] with options (TLS needs [`ConnectOptions::server_name`]).
    pub async fn connect_stream_with<S>(
        stream: S,
        export: &str,
        options: &ConnectOptions,
        timeout: Duration,
    ) -> Result<Client>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let deadline = Instant::now() + timeout;
        Self::handshake(
            stream,
            "the given stream",
            None,
            export,
            options,
            deadline,
            timeout,
        )
        .await
    }

    async fn handshake<S>(
        stream: S,
        target: &str,
        host: Option<&str>,
        export: &str,
        options: &ConnectOptions,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<Client>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        match timeout_at(deadline, Self::negotiate(stream, target, host, export, options)).await {
            Ok(client) => client,
            Err(_) => Err(Error::Timeout {
                what: format!("the NBD handshake for export {export:?}"),
                after: timeout,
            }),
        }
    }

    async fn negotiate<S>(
        mut stream: S,
        target: &str,
        host: Option<&str>,
        export: &str,
        options: &ConnectOptions,
    ) -> Result<Client>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let greeting = handshake::greet(&mut stream, export).await?;
        let contexts = &options.meta_contexts;
        let Some(credentials) = &options.tls else {
            let info = handshake::negotiate_options(&mut stream, export, greeting, contexts).await?;
            return Ok(Self::start(stream, info, export));
        };
        // Boxed: a TLS session is large, and futures that connect should stay small for their callers.
        Box::pin(Self::negotiate_tls(
            stream,
            greeting,
            credentials,
            target,
            host,
            export,
            options,
        ))
        .await
    }

    /// `NBD_OPT_STARTTLS`, the TLS handshake, and the rest of the options over TLS.
    async fn negotiate_tls<S>(
        mut stream: S,
        greeting: handshake::Greeting,
        credentials: &TlsCredentials,
        target: &str,
        host: Option<&str>,
        export: &str,
        options: &ConnectOptions,
    ) -> Result<Client>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let name = options
            .server_name
            .as_deref()
            .or(host)
            .ok_or_else(|| Error::TlsCredentials {
                path: credentials.dir().to_owned(),
                reason: format!("no server name to check the certificate of {target} against"),
            })?;
        let server_name = ServerName::try_from(name.to_owned()).map_err(|e| Error::TlsCredentials {
            path: credentials.dir().to_owned(),
            reason: format!("{name:?} is not a usable server name: {e}"),
        })?;
        handshake::starttls(&mut stream, target).await?;
        let mut stream = TlsConnector::from(Arc::clone(credentials.config()))
            .connect(server_name, stream)
            .await
            .map_err(|e| tls::tls_error(target, &e))?;
        let info = handshake::negotiate_options(&mut stream, export, greeting, &options.meta_contexts)
            .await
            .map_err(|e| tls::after_handshake(target, credentials, e))?;
        Ok(Self::start(stream, info, export))
    }

    fn start<S>(stream: S, info: ExportInfo, export: &str) -> Client
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let conn = Conn::start(stream, info.structured, DEFAULT_TIMEOUT);
        Client {
            inner: Arc::new(Inner {
                conn,
                info,
                export: export.to_owned(),
            }),
            timeout: DEFAULT_TIMEOUT,
        }
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

    /// The metadata contexts the server selected, `base:allocation` included.
    pub fn meta_contexts(&self) -> impl Iterator<Item = &str> {
        self.inner.info.contexts.iter().map(|(name, _)| name.as_str())
    }

    /// Whether the server selected the metadata context `name`.
    pub fn has_meta_context(&self, name: &str) -> bool {
        self.context_id(name).is_some()
    }

    fn context_id(&self, name: &str) -> Option<u32> {
        self.inner
            .info
            .contexts
            .iter()
            .find(|(n, _)| n == name)
            .map(|&(_, id)| id)
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
        let Some(context) = self.inner.info.allocation_context else {
            return Ok(vec![Extent {
                offset,
                len,
                hole: false,
                zero: false,
            }]);
        };
        let mut extents = Vec::new();
        self.status_of(context, offset, len, |lo, hi, flags| {
            push_merged(
                &mut extents,
                Extent {
                    offset: lo,
                    len: hi - lo,
                    hole: flags & proto::STATE_HOLE != 0,
                    zero: flags & proto::STATE_ZERO != 0,
                },
            );
        })
        .await?;
        Ok(extents)
    }

    /// The status of `[offset, offset + len)` in the negotiated metadata context `name`, as sorted,
    /// touching extents with the context's raw flags that cover exactly that range (neighbours with equal
    /// flags merged). [`Error::NoMetaContext`] if the server did not select `name`; nothing is sent then.
    pub async fn context_status(&self, name: &str, offset: u64, len: u64) -> Result<Vec<ContextExtent>> {
        self.check_range(offset, len)?;
        let context = self.context_id(name).ok_or_else(|| Error::NoMetaContext {
            name: name.to_owned(),
        })?;
        let mut extents: Vec<ContextExtent> = Vec::new();
        if len == 0 {
            return Ok(extents);
        }
        self.status_of(context, offset, len, |lo, hi, flags| match extents.last_mut() {
            Some(last) if last.end() == lo && last.flags == flags => last.len += hi - lo,
            _ => extents.push(ContextExtent {
                offset: lo,
                len: hi - lo,
                flags,
            }),
        })
        .await?;
        Ok(extents)
    }

    /// The dirty bitmap `bitmap` over `[offset, offset + len)` (QEMU's `qemu:dirty-bitmap:BITMAP`, asked
    /// for with [`ConnectOptions::dirty_bitmap`]): extents as [`Client::context_status`] gives them, with
    /// [`ContextExtent::dirty`] telling which changed.
    pub async fn dirty_extents(&self, bitmap: &str, offset: u64, len: u64) -> Result<Vec<ContextExtent>> {
        self.context_status(&dirty_bitmap_context(bitmap), offset, len)
            .await
    }

    /// Block status requests for `context` over `[offset, offset + len)` (widened to whole blocks), as many
    /// as the server needs to cover it; `each(lo, hi, flags)` gets the descriptors cut to the range, in order.
    async fn status_of(
        &self,
        context: u32,
        offset: u64,
        len: u64,
        mut each: impl FnMut(u64, u64, u32),
    ) -> Result<()> {
        let end = offset + len;
        let others: Vec<u32> = self
            .inner
            .info
            .contexts
            .iter()
            .map(|&(_, id)| id)
            .filter(|&id| id != context)
            .collect();
        let align = self.align();
        let mut at = offset - offset % align;
        let stop = end
            .checked_next_multiple_of(align)
            .map_or(self.size(), |e| e.min(self.size()));
        let max_len = u64::from(u32::MAX) / align * align;
        while at < stop {
            let request = Request {
                command: Command::BlockStatus,
                flags: 0,
                offset: at,
                len: (stop - at).min(max_len) as u32,
                payload: Vec::new(),
                expect: Expect::BlockStatus {
                    context,
                    others: others.clone(),
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
                    each(lo, hi, flags);
                }
                at = next;
                if at == stop {
                    break;
                }
            }
        }
        Ok(())
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
