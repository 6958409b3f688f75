//! How a block's digest is computed ([`Scheme`]), and the hasher a build feeds a block's bytes and its
//! never-read zero runs into ([`BlockHasher`]).
//!
//! - [`Scheme::Flat`]: the sha256 of the block's bytes. Every table written before the pieces scheme, and every
//!   table of a chain whose full has one (a chain keeps its full's scheme: an incremental's table takes the
//!   digests of its unchanged blocks from its parent's).
//! - [`Scheme::Pieces`]: the sha256 of the concatenated sha256s of the block's pieces of [`PIECE_SIZE`] bytes
//!   (of the whole block when it is smaller; the last piece of a short last block is short). A piece that
//!   reads as zeros has a known digest and is not hashed, so a build hashes a disk's data, not the zeros
//!   around it in the blocks it touches: the bench's 1.5 GiB of data lie in 2145 one-MiB blocks, whose flat
//!   digests cost 2145 MiB of SHA-256. Pieces are the qcow2 default cluster size, the granularity at which
//!   images allocate and zero, and add 32 bytes of hashing per 64 KiB (0.05 %).
//!
//! Both are sha256 throughout; a table file says which (flag bit 1 for pieces) and tables of different schemes
//! never compare equal ([`super::Table::same_shape`]).

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock, PoisonError};

use sha2::{Digest as _, Sha256};

use super::{Digest, MAX_BLOCK_SIZE};

/// Bytes per piece of [`Scheme::Pieces`].
pub const PIECE_SIZE: u64 = 64 << 10;

/// How a block's digest is computed. The default is what new chains use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Scheme {
    /// sha256 of the block's bytes.
    Flat,
    /// sha256 of the sha256s of the block's [`PIECE_SIZE`] pieces, in order.
    #[default]
    Pieces,
}

impl Scheme {
    /// The digest of a block holding `data`.
    pub fn digest_of(self, data: &[u8]) -> Digest {
        let mut hasher = BlockHasher::new(self, data.len() as u64);
        hasher.data(data);
        hasher.finish()
    }

    /// The digest of a block of `len` zero bytes; computed once per scheme and length and cached.
    pub fn zero_digest(self, len: u64) -> Digest {
        static CACHE: OnceLock<Mutex<HashMap<(Scheme, u64), Digest>>> = OnceLock::new();
        let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
        if let Some(d) = cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&(self, len))
        {
            return *d;
        }
        let digest = match self {
            Scheme::Flat => {
                let mut hasher = Sha256::new();
                hash_zeros(&mut hasher, len);
                hasher.finalize().into()
            }
            Scheme::Pieces => {
                let mut outer = Sha256::new();
                let mut left = len;
                while left > 0 {
                    let n = left.min(PIECE_SIZE);
                    outer.update(Scheme::Flat.zero_digest(n));
                    left -= n;
                }
                outer.finalize().into()
            }
        };
        cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert((self, len), digest);
        digest
    }

    /// Its bit in a table file's flags.
    pub(super) fn flag(self) -> u32 {
        match self {
            Scheme::Flat => 0,
            Scheme::Pieces => FLAG_PIECES,
        }
    }

    pub(super) fn from_flags(flags: u32) -> Scheme {
        if flags & FLAG_PIECES != 0 {
            Scheme::Pieces
        } else {
            Scheme::Flat
        }
    }
}

/// The digest of a whole piece of zeros, without the cache's lock.
fn zero_piece() -> Digest {
    static ZERO: OnceLock<Digest> = OnceLock::new();
    *ZERO.get_or_init(|| Scheme::Flat.zero_digest(PIECE_SIZE))
}

/// The table file flag of [`Scheme::Pieces`].
pub(super) const FLAG_PIECES: u32 = 2;

static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

/// Feeds `len` zero bytes to `hasher` without allocating them.
fn hash_zeros(hasher: &mut Sha256, mut len: u64) {
    while len > 0 {
        let n = len.min(ZEROS.len() as u64) as usize;
        hasher.update(&ZEROS[..n]);
        len -= n as u64;
    }
}

/// A hasher that has absorbed `len` zero bytes: where a block (or piece) that starts with a hole continues
/// from. Blocks often do (a data extent that starts inside a block), and their leading zeros then cost nothing
/// after the first time. Cached per length when `len` is a multiple of 4 KiB (which bounds the cache to block
/// size / 4 KiB entries); other lengths are hashed each time.
fn zero_prefix_hasher(len: u64) -> Sha256 {
    static CACHE: OnceLock<Mutex<HashMap<u64, Sha256>>> = OnceLock::new();
    if len == 0 {
        return Sha256::new();
    }
    if len % 4096 != 0 || len > MAX_BLOCK_SIZE {
        let mut hasher = Sha256::new();
        hash_zeros(&mut hasher, len);
        return hasher;
    }
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    if let Some(h) = cache.lock().unwrap_or_else(PoisonError::into_inner).get(&len) {
        return h.clone();
    }
    let mut hasher = Sha256::new();
    hash_zeros(&mut hasher, len);
    cache
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(len, hasher.clone());
    hasher
}

/// Whether `bytes` are all zeros (64 bytes at a time, which the compiler vectorizes; data that is not zeros
/// is told after its first non-zero 64 bytes).
pub fn all_zero(bytes: &[u8]) -> bool {
    let chunks = bytes.chunks_exact(64);
    let tail = chunks.remainder();
    tail.iter().all(|&b| b == 0) && { chunks }.all(|c| c.iter().fold(0, |acc, &b| acc | b) == 0)
}

/// The digest of one block of `len` bytes, fed its bytes in order: data, or runs of zeros that were never
/// read. Zeros are hashed only where they must be: after data in a flat block, or inside a piece that also
/// holds data.
pub(crate) struct BlockHasher {
    scheme: Scheme,
    len: u64,
    /// Bytes fed so far.
    fed: u64,
    /// The hash of the bytes fed since the last piece boundary (flat: since the block's start); `None` while
    /// they are all zeros, `pending` of them.
    inner: Option<Sha256>,
    pending: u64,
    /// Pieces: the hash of the finished pieces' digests.
    outer: Sha256,
    /// Nothing but zeros fed so far (`fed` of them, not yet split into pieces): a block that stays so has the
    /// cached zero digest, which costs a hole block of a 1 TiB disk nothing.
    only_zeros: bool,
}

impl BlockHasher {
    pub(crate) fn new(scheme: Scheme, len: u64) -> BlockHasher {
        BlockHasher {
            scheme,
            len,
            fed: 0,
            inner: None,
            pending: 0,
            outer: Sha256::new(),
            only_zeros: true,
        }
    }

    /// Bytes until the end of the current piece (flat: of the block).
    fn room(&self) -> u64 {
        let left = self.len - self.fed;
        match self.scheme {
            Scheme::Flat => left,
            Scheme::Pieces => (PIECE_SIZE - self.fed % PIECE_SIZE).min(left),
        }
    }

    /// Bytes of the block; more than its length is a caller's bug and is cut off.
    pub(crate) fn data(&mut self, mut data: &[u8]) {
        if self.only_zeros {
            if all_zero(data) {
                self.fed = (self.fed + data.len() as u64).min(self.len);
                return;
            }
            // The leading zeros, piece by piece.
            self.only_zeros = false;
            let zeros = std::mem::take(&mut self.fed);
            self.zeros(zeros);
        }
        while !data.is_empty() && self.fed < self.len {
            let take = usize::try_from(self.room()).unwrap_or(usize::MAX).min(data.len());
            let (now, rest) = data.split_at(take);
            match &mut self.inner {
                Some(h) => h.update(now),
                // Zeros read as data count as zeros of a piece; a flat block hashes them as they come.
                None if self.scheme == Scheme::Pieces && all_zero(now) => self.pending += now.len() as u64,
                None => {
                    let mut h = zero_prefix_hasher(self.pending);
                    h.update(now);
                    self.inner = Some(h);
                }
            }
            self.advance(take as u64);
            data = rest;
        }
    }

    /// `n` zero bytes of the block that were not read.
    pub(crate) fn zeros(&mut self, mut n: u64) {
        if self.only_zeros {
            self.fed = self.fed.saturating_add(n).min(self.len);
            return;
        }
        while n > 0 && self.fed < self.len {
            let take = self.room().min(n);
            match &mut self.inner {
                Some(h) => hash_zeros(h, take),
                None => self.pending += take,
            }
            self.advance(take);
            n -= take;
        }
    }

    fn advance(&mut self, n: u64) {
        self.fed += n;
        if self.scheme == Scheme::Pieces && (self.fed % PIECE_SIZE == 0 || self.fed == self.len) {
            let piece: Digest = match self.inner.take() {
                Some(h) => h.finalize().into(),
                None if self.pending == PIECE_SIZE => zero_piece(),
                None => Scheme::Flat.zero_digest(self.pending),
            };
            self.outer.update(piece);
            self.pending = 0;
        }
    }

    /// The block's digest. Bytes not fed read as zeros.
    pub(crate) fn finish(mut self) -> Digest {
        if self.only_zeros {
            return self.scheme.zero_digest(self.len);
        }
        let left = self.len - self.fed;
        self.zeros(left);
        match self.scheme {
            Scheme::Flat => match self.inner {
                Some(h) => h.finalize().into(),
                None => Scheme::Flat.zero_digest(self.len),
            },
            Scheme::Pieces => self.outer.finalize().into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pieces digest by its definition.
    fn pieces_model(data: &[u8]) -> Digest {
        let mut outer = Sha256::new();
        for piece in data.chunks(PIECE_SIZE as usize) {
            outer.update(Sha256::digest(piece));
        }
        outer.finalize().into()
    }

    #[test]
    fn digests_follow_their_definitions_however_the_bytes_are_fed() {
        let len = 3 * PIECE_SIZE as usize + 5000;
        let mut data = vec![0u8; len];
        // data in piece 0 from 100, piece 1 all zeros, piece 2 data then zeros read as data, the short last
        // piece data at its end
        for (i, b) in data[100..PIECE_SIZE as usize].iter_mut().enumerate() {
            *b = (i % 251) as u8 + 1;
        }
        data[2 * PIECE_SIZE as usize + 7] = 9;
        data[len - 1] = 3;
        let flat: Digest = Sha256::digest(&data).into();
        let pieces = pieces_model(&data);
        assert_eq!(Scheme::Flat.digest_of(&data), flat);
        assert_eq!(Scheme::Pieces.digest_of(&data), pieces);
        // the same bytes with every zero run of at least 64 bytes fed as unread zeros, cut at odd places
        for scheme in [Scheme::Flat, Scheme::Pieces] {
            for cut in [1usize, 63, 4096, 65536, 70000] {
                let mut h = BlockHasher::new(scheme, len as u64);
                for chunk in data.chunks(cut) {
                    if chunk.len() >= 64 && all_zero(chunk) {
                        h.zeros(chunk.len() as u64);
                    } else {
                        h.data(chunk);
                    }
                }
                let want = if scheme == Scheme::Flat { flat } else { pieces };
                assert_eq!(h.finish(), want, "{scheme:?} cut {cut}");
            }
        }
    }

    #[test]
    fn zero_blocks_have_the_digest_of_their_zeros() {
        for len in [
            0u64,
            1,
            4096,
            PIECE_SIZE,
            PIECE_SIZE + 1,
            1 << 20,
            (1 << 20) + 4096,
        ] {
            let zeros = vec![0u8; len as usize];
            assert_eq!(
                Scheme::Flat.zero_digest(len),
                <[u8; 32]>::from(Sha256::digest(&zeros))
            );
            assert_eq!(
                Scheme::Pieces.zero_digest(len),
                Scheme::Pieces.digest_of(&zeros),
                "{len}"
            );
            let mut h = BlockHasher::new(Scheme::Pieces, len);
            h.zeros(len);
            assert_eq!(h.finish(), pieces_model(&zeros), "{len}");
        }
    }

    #[test]
    fn the_schemes_differ_and_a_flag_names_each() {
        assert_ne!(Scheme::Flat.digest_of(b"x"), Scheme::Pieces.digest_of(b"x"));
        for scheme in [Scheme::Flat, Scheme::Pieces] {
            assert_eq!(Scheme::from_flags(scheme.flag() | 1), scheme);
        }
    }

    #[test]
    fn all_zero_looks_at_every_byte() {
        for len in [0, 1, 63, 64, 65, 4096 + 3] {
            let mut bytes = vec![0u8; len];
            assert!(all_zero(&bytes));
            for at in 0..len {
                bytes[at] = 1;
                assert!(!all_zero(&bytes), "{len} {at}");
                bytes[at] = 0;
            }
        }
    }
}
