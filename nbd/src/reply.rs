//! Turning reply messages into results: what each request expects back, the reassembly of a read from
//! data and hole chunks, and the parsing of block status and error chunk payloads. No I/O here; the
//! reader task in `conn` feeds it.

use std::ops::Range;

use crate::error::Error;
use crate::proto::{self, Command, be_u16, be_u32};

/// What a request produces on success.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ReplyData {
    /// Write, flush, trim, write zeroes.
    Done,
    /// Read: exactly the requested bytes.
    Data(Vec<u8>),
    /// Block status: `(length, flags)` descriptors of our context, starting at the request offset.
    Extents(Vec<(u32, u32)>),
}

/// A request's reply in the making.
#[derive(Debug)]
pub(crate) enum Expect {
    Done,
    Read(ReadAssembly),
    BlockStatus {
        /// The context whose descriptors the request wants.
        context: u32,
        /// The other negotiated contexts: the server reports them too, and their chunks are skipped.
        others: Vec<u32>,
        descriptors: Option<Vec<(u32, u32)>>,
    },
}

/// A read's buffer and which parts of it the server has filled so far.
#[derive(Debug)]
pub(crate) struct ReadAssembly {
    offset: u64,
    pub(crate) buf: Vec<u8>,
    covered: Vec<Range<u64>>,
    /// Bytes the chunks so far delivered: never more than the request's length.
    filled: u64,
}

impl ReadAssembly {
    pub(crate) fn new(offset: u64, len: u32) -> Self {
        Self::with_buffer(offset, len, Vec::new())
    }

    /// A read into `buf`'s allocation (a caller's reused buffer), cut or grown to `len` bytes. Old contents
    /// are not cleared: [`ReadAssembly::finish`] only succeeds when data and hole chunks covered every byte.
    pub(crate) fn with_buffer(offset: u64, len: u32, mut buf: Vec<u8>) -> Self {
        buf.resize(len as usize, 0);
        ReadAssembly {
            offset,
            buf,
            covered: Vec::new(),
            filled: 0,
        }
    }

    /// Where a content chunk at absolute `offset` with `len` bytes lands in the buffer, if it lies inside
    /// the request; records it as covered.
    pub(crate) fn place(&mut self, offset: u64, len: u64) -> Result<Range<usize>, String> {
        let start = offset
            .checked_sub(self.offset)
            .filter(|s| s.checked_add(len).is_some_and(|end| end <= self.buf.len() as u64))
            .ok_or_else(|| {
                format!(
                    "content chunk at offset {offset} with length {len} lies outside the read of {} bytes at {}",
                    self.buf.len(),
                    self.offset
                )
            })?;
        if len == 0 {
            return Err(format!("empty content chunk at offset {offset}"));
        }
        // Inside the buffer, so no overflow; more than asked for means chunks overlap.
        self.filled += len;
        if self.filled > self.buf.len() as u64 {
            return Err(format!(
                "content chunks deliver more than the {} bytes read at {}",
                self.buf.len(),
                self.offset
            ));
        }
        self.covered.push(start..start + len);
        Ok(start as usize..(start + len) as usize)
    }

    /// A hole chunk: those bytes read as zeroes.
    pub(crate) fn hole(&mut self, offset: u64, len: u32) -> Result<(), String> {
        let range = self.place(offset, u64::from(len))?;
        self.buf[range].fill(0);
        Ok(())
    }

    /// The finished buffer, if the chunks covered every byte exactly once.
    pub(crate) fn finish(mut self) -> Result<Vec<u8>, String> {
        self.covered.sort_unstable_by_key(|r| r.start);
        let mut next = 0;
        for r in &self.covered {
            if r.start != next {
                return Err(if r.start < next {
                    format!("content chunks overlap at offset {}", self.offset + r.start)
                } else {
                    format!(
                        "no content for offset {} of a successful read",
                        self.offset + next
                    )
                });
            }
            next = r.end;
        }
        if next != self.buf.len() as u64 {
            return Err(format!(
                "no content for offset {} of a successful read",
                self.offset + next
            ));
        }
        Ok(self.buf)
    }
}

impl Expect {
    /// The result once the final chunk arrived and no error chunk came.
    pub(crate) fn finish(self) -> Result<ReplyData, Error> {
        match self {
            Expect::Done => Ok(ReplyData::Done),
            Expect::Read(read) => read.finish().map(ReplyData::Data).map_err(Error::Protocol),
            Expect::BlockStatus { descriptors, .. } => descriptors
                .map(ReplyData::Extents)
                .ok_or_else(|| Error::Protocol("block status reply without a block status chunk".into())),
        }
    }
}

/// `(errno, message)` of an error chunk (any type with bit 15 set).
pub(crate) fn parse_error_chunk(kind: u16, payload: &[u8]) -> Result<(u32, String), String> {
    let (Some(errno), Some(msg_len)) = (be_u32(payload, 0), be_u16(payload, 4)) else {
        return Err(format!(
            "error chunk of {} bytes is shorter than 6",
            payload.len()
        ));
    };
    let msg_end = 6 + usize::from(msg_len);
    let trailer = if kind == proto::REPLY_TYPE_ERROR_OFFSET {
        8
    } else {
        0
    };
    if msg_end + trailer > payload.len() {
        return Err(format!(
            "error chunk message of {msg_len} bytes does not fit its {} bytes",
            payload.len()
        ));
    }
    Ok((errno, String::from_utf8_lossy(&payload[6..msg_end]).into_owned()))
}

/// Context id and `(length, flags)` descriptors of a block status chunk.
pub(crate) fn parse_block_status(payload: &[u8]) -> Result<(u32, Vec<(u32, u32)>), String> {
    let context = be_u32(payload, 0).unwrap_or_default();
    let body = payload.get(4..).unwrap_or_default();
    if body.is_empty() || body.len() % 8 != 0 {
        return Err(format!(
            "block status chunk of {} bytes is not 4 + a multiple of 8",
            payload.len()
        ));
    }
    let mut descriptors = Vec::with_capacity(body.len() / 8);
    for d in body.chunks_exact(8) {
        let len = be_u32(d, 0).unwrap_or_default();
        if len == 0 {
            return Err("block status descriptor of length 0".into());
        }
        descriptors.push((len, be_u32(d, 4).unwrap_or_default()));
    }
    Ok((context, descriptors))
}

/// The error a request gets from an error reply.
pub(crate) fn server_error(command: Command, errno: u32, message: String) -> Error {
    Error::Server {
        command,
        errno,
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_reassembles_out_of_order_data_and_holes() {
        let mut r = ReadAssembly::new(1000, 30);
        let range = r.place(1010, 20).unwrap();
        r.buf[range].fill(7);
        r.hole(1000, 10).unwrap();
        let buf = r.finish().unwrap();
        assert_eq!(&buf[..10], &[0; 10]);
        assert_eq!(&buf[10..], &[7; 20]);
    }

    #[test]
    fn a_reused_buffer_is_resized_and_must_be_covered_again() {
        let mut r = ReadAssembly::with_buffer(0, 4, vec![9; 10]);
        let range = r.place(0, 2).unwrap();
        r.buf[range].fill(1);
        r.hole(2, 2).unwrap();
        assert_eq!(r.finish().unwrap(), vec![1, 1, 0, 0]);

        let mut r = ReadAssembly::with_buffer(0, 4, vec![9; 2]);
        r.place(0, 2).unwrap();
        assert!(r.finish().unwrap_err().contains("offset 2"));
    }

    #[test]
    fn read_rejects_chunks_outside_overlapping_or_missing() {
        let mut r = ReadAssembly::new(1000, 30);
        assert!(r.place(999, 2).is_err());
        assert!(r.place(1020, 11).is_err());
        assert!(r.place(u64::MAX, 2).is_err());
        assert!(r.place(1000, u64::MAX).is_err());
        assert!(r.hole(1000, 0).is_err());

        let mut r = ReadAssembly::new(0, 30);
        r.place(0, 20).unwrap();
        r.place(10, 10).unwrap();
        assert!(r.finish().unwrap_err().contains("overlap"));

        // Overlapping chunks that add up to more than asked for are refused at once.
        let mut r = ReadAssembly::new(0, 30);
        r.place(0, 20).unwrap();
        assert!(r.place(10, 20).unwrap_err().contains("more than the 30 bytes"));

        let mut r = ReadAssembly::new(0, 30);
        r.place(0, 10).unwrap();
        r.place(20, 10).unwrap();
        assert!(r.finish().unwrap_err().contains("offset 10"));

        let mut r = ReadAssembly::new(0, 30);
        r.place(0, 10).unwrap();
        assert!(r.finish().unwrap_err().contains("offset 10"));
    }

    #[test]
    fn error_chunks_parse_with_and_without_offset() {
        let mut p = 5u32.to_be_bytes().to_vec();
        p.extend_from_slice(&3u16.to_be_bytes());
        p.extend_from_slice(b"bad");
        assert_eq!(
            parse_error_chunk(proto::REPLY_TYPE_ERROR_BIT + 1, &p).unwrap(),
            (5, "bad".into())
        );
        assert!(parse_error_chunk(proto::REPLY_TYPE_ERROR_OFFSET, &p).is_err());
        p.extend_from_slice(&42u64.to_be_bytes());
        assert_eq!(
            parse_error_chunk(proto::REPLY_TYPE_ERROR_OFFSET, &p).unwrap(),
            (5, "bad".into())
        );
        assert!(parse_error_chunk(proto::REPLY_TYPE_ERROR_BIT + 1, &p[..7]).is_err());
        assert!(parse_error_chunk(proto::REPLY_TYPE_ERROR_BIT + 1, &p[..3]).is_err());
    }

    #[test]
    fn block_status_payloads_are_checked() {
        let mut p = 9u32.to_be_bytes().to_vec();
        assert!(parse_block_status(&p).is_err());
        p.extend_from_slice(&4096u32.to_be_bytes());
        p.extend_from_slice(&3u32.to_be_bytes());
        assert_eq!(parse_block_status(&p).unwrap(), (9, vec![(4096, 3)]));
        assert!(parse_block_status(&p[..11]).is_err());
        p.extend_from_slice(&[0; 8]);
        assert!(parse_block_status(&p).is_err());
        assert!(parse_block_status(&[]).is_err());
    }

    /// A read's chunks as a server might send them: a random tiling of the request, shuffled, sometimes with
    /// a chunk dropped, doubled, moved or cut.
    fn chunks() -> impl proptest::strategy::Strategy<Value = (u64, u32, Vec<(u64, u64, bool)>)> {
        use proptest::prelude::*;
        (
            0u64..1 << 40,
            prop::collection::vec((1u64..300, any::<bool>()), 1..12),
            any::<u64>(),
            0u8..6,
        )
            .prop_map(|(start, pieces, seed, damage)| {
                let mut chunks = Vec::new();
                let mut at = start;
                for (len, hole) in pieces {
                    chunks.push((at, len, hole));
                    at += len;
                }
                let len = (at - start) as u32;
                let i = (seed % chunks.len() as u64) as usize;
                match damage {
                    0 => {
                        chunks.remove(i);
                    }
                    1 => chunks.push(chunks[i]),
                    2 => chunks[i].0 += seed % 7 + 1,
                    3 => chunks[i].1 -= chunks[i].1.min(seed % 3),
                    _ => {}
                }
                // Shuffle by a seeded rotation and swap: order must not matter.
                let n = chunks.len();
                chunks.rotate_left((seed as usize / 7) % n.max(1));
                if n > 1 {
                    chunks.swap(0, (seed as usize / 11) % n);
                }
                (start, len, chunks)
            })
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 512, ..Default::default() })]

        /// Whatever chunks arrive, reassembly never panics, never takes more than the request's bytes, and
        /// succeeds exactly when the chunks cover every byte once, with the bytes they carried.
        #[test]
        fn read_reassembly_accepts_exactly_the_tilings((start, len, chunks) in chunks()) {
            let mut r = ReadAssembly::new(start, len);
            let mut model = vec![0u8; len as usize];
            let mut counts = vec![0u32; len as usize];
            let mut placed_all = true;
            for (k, &(offset, n, hole)) in chunks.iter().enumerate() {
                let fill = k as u8 + 1;
                let placed = if hole {
                    u32::try_from(n).map_err(|e| e.to_string()).and_then(|n| r.hole(offset, n))
                } else {
                    r.place(offset, n).map(|range| r.buf[range].fill(fill))
                };
                let inside = n > 0 && offset >= start && offset + n <= start + u64::from(len);
                if placed.is_err() {
                    placed_all = false;
                    break;
                }
                proptest::prop_assert!(inside, "chunk {offset}+{n} outside {start}+{len} accepted");
                for b in (offset - start)..(offset - start + n) {
                    counts[b as usize] += 1;
                    model[b as usize] = if hole { 0 } else { fill };
                }
                proptest::prop_assert!(counts.iter().map(|&c| u64::from(c)).sum::<u64>() <= u64::from(len));
            }
            if !placed_all {
                return Ok(());
            }
            let exact = counts.iter().all(|&c| c == 1);
            match r.finish() {
                Ok(buf) => {
                    proptest::prop_assert!(exact, "an inexact tiling was accepted");
                    proptest::prop_assert_eq!(buf, model);
                }
                Err(_) => proptest::prop_assert!(!exact, "an exact tiling was refused"),
            }
        }

        /// Block status and error chunk payloads of any bytes parse or fail, never panic.
        #[test]
        fn chunk_payloads_never_panic(kind in proptest::prelude::any::<u16>(), payload in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..80)) {
            if let Ok((_, descriptors)) = parse_block_status(&payload) {
                proptest::prop_assert_eq!(descriptors.len(), (payload.len() - 4) / 8);
            }
            if let Ok((_, message)) = parse_error_chunk(kind, &payload) {
                proptest::prop_assert!(message.len() <= payload.len() * 3);
            }
        }
    }
}
