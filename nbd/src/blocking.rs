//! A blocking face of [`Client`] for code on plain threads, such as the checksum builder's workers. Each
//! call runs the async request on the given runtime with `Handle::block_on`.

use tokio::runtime::Handle;

use crate::client::Client;
use crate::error::Result;
use crate::extent::Extent;

/// A [`Client`] plus the runtime to drive it from threads outside that runtime.
///
/// Call its methods only from threads that are not running async code: `std::thread::scope` workers,
/// `std::thread::spawn`, or inside `tokio::task::spawn_blocking`. From inside an async task `block_on`
/// panics (that is tokio's rule, not ours), and it would stall the runtime anyway. Cloning is cheap and
/// clones share the connection, so each worker can own one.
///
/// Give it the handle of a multi-thread runtime: on a current-thread runtime the connection's tasks only
/// run while some thread is inside that runtime's own `Runtime::block_on`.
#[derive(Clone, Debug)]
pub struct BlockingClient {
    client: Client,
    handle: Handle,
}

impl BlockingClient {
    /// Wraps `client`, driving it on the runtime behind `handle` (e.g. `Handle::current()` taken in async
    /// code before the threads start).
    pub fn new(client: Client, handle: Handle) -> Self {
        BlockingClient { client, handle }
    }

    /// The async client inside.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Size of the export in bytes.
    pub fn size(&self) -> u64 {
        self.client.size()
    }

    /// [`Client::read`], blocking.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.handle.block_on(self.client.read(offset, buf))
    }

    /// [`Client::read_owned`], blocking: reads `len` bytes at `offset` into `buf`'s allocation and returns it.
    pub fn read_owned(&self, offset: u64, len: usize, buf: Vec<u8>) -> Result<Vec<u8>> {
        self.handle.block_on(self.client.read_owned(offset, len, buf))
    }

    /// [`Client::write`], blocking.
    pub fn write_at(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        self.handle.block_on(self.client.write(offset, data, fua))
    }

    /// [`Client::write_zeroes`], blocking.
    pub fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> Result<()> {
        self.handle
            .block_on(self.client.write_zeroes(offset, len, may_trim))
    }

    /// [`Client::block_status`], blocking.
    pub fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.handle.block_on(self.client.block_status(offset, len))
    }
}
