//! Wire constants of the NBD protocol (NetworkBlockDevice/nbd `doc/proto.md`) and the encoding of the
//! fixed-size messages the client sends. Everything on the wire is big-endian.

use std::fmt;

// Handshake magics.
pub(crate) const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub(crate) const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub(crate) const CLISERV_MAGIC: u64 = 0x0000_4202_8186_1253;
pub(crate) const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

// Transmission magics.
pub(crate) const REQUEST_MAGIC: u32 = 0x2560_9513;
pub(crate) const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub(crate) const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// Handshake flags (server) and client flags.
pub(crate) const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub(crate) const FLAG_NO_ZEROES: u16 = 1 << 1;
pub(crate) const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub(crate) const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Options.
pub(crate) const OPT_EXPORT_NAME: u32 = 1;
pub(crate) const OPT_ABORT: u32 = 2;
pub(crate) const OPT_LIST: u32 = 3;
pub(crate) const OPT_STARTTLS: u32 = 5;
pub(crate) const OPT_GO: u32 = 7;
pub(crate) const OPT_STRUCTURED_REPLY: u32 = 8;
pub(crate) const OPT_SET_META_CONTEXT: u32 = 10;

// Option reply types.
pub(crate) const REP_ACK: u32 = 1;
pub(crate) const REP_SERVER: u32 = 2;
pub(crate) const REP_INFO: u32 = 3;
pub(crate) const REP_META_CONTEXT: u32 = 4;
pub(crate) const REP_ERR_BIT: u32 = 1 << 31;
pub(crate) const REP_ERR_UNSUP: u32 = REP_ERR_BIT + 1;
pub(crate) const REP_ERR_TLS_REQD: u32 = REP_ERR_BIT + 5;
pub(crate) const REP_ERR_UNKNOWN: u32 = REP_ERR_BIT + 6;

// NBD_REP_INFO types.
pub(crate) const INFO_EXPORT: u16 = 0;
pub(crate) const INFO_BLOCK_SIZE: u16 = 3;

// Transmission flags.
pub(crate) const TF_READ_ONLY: u16 = 1 << 1;
pub(crate) const TF_SEND_FLUSH: u16 = 1 << 2;
pub(crate) const TF_SEND_FUA: u16 = 1 << 3;
pub(crate) const TF_SEND_TRIM: u16 = 1 << 5;
pub(crate) const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;

// Command flags.
pub(crate) const CMD_FLAG_FUA: u16 = 1 << 0;
pub(crate) const CMD_FLAG_NO_HOLE: u16 = 1 << 1;

// Structured replies.
pub(crate) const REPLY_FLAG_DONE: u16 = 1 << 0;
pub(crate) const REPLY_TYPE_NONE: u16 = 0;
pub(crate) const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub(crate) const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub(crate) const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub(crate) const REPLY_TYPE_ERROR_BIT: u16 = 1 << 15;
pub(crate) const REPLY_TYPE_ERROR_OFFSET: u16 = REPLY_TYPE_ERROR_BIT + 2;

// base:allocation status flags.
pub(crate) const STATE_HOLE: u32 = 1 << 0;
pub(crate) const STATE_ZERO: u32 = 1 << 1;
/// `qemu:dirty-bitmap:NAME`: the block changed since the bitmap was started or last cleared.
pub const STATE_DIRTY: u32 = 1 << 0;

/// The metadata context that block status asks for.
pub(crate) const BASE_ALLOCATION: &str = "base:allocation";
/// Prefix of QEMU's metadata contexts that export a dirty bitmap.
pub(crate) const QEMU_DIRTY_BITMAP: &str = "qemu:dirty-bitmap:";

/// Longest string the protocol allows (export names, messages).
pub(crate) const MAX_STRING: usize = 4096;

/// Largest READ/WRITE payload when the server does not advertise a smaller maximum block size; also what
/// the spec promises every server accepts.
pub(crate) const DEFAULT_MAX_PAYLOAD: u32 = 32 << 20;

/// Error values of the transmission phase (`NBD_E*`), as found in [`crate::Error::Server`].
pub mod errno {
    /// Operation not permitted (e.g. a write to a read-only export).
    pub const EPERM: u32 = 1;
    /// Input/output error.
    pub const EIO: u32 = 5;
    /// Cannot allocate memory.
    pub const ENOMEM: u32 = 12;
    /// Invalid argument.
    pub const EINVAL: u32 = 22;
    /// No space left on device.
    pub const ENOSPC: u32 = 28;
    /// Value too large.
    pub const EOVERFLOW: u32 = 75;
    /// Operation not supported.
    pub const ENOTSUP: u32 = 95;
    /// Server is shutting down.
    pub const ESHUTDOWN: u32 = 108;

    /// The symbolic name of an NBD error value.
    pub fn name(errno: u32) -> &'static str {
        match errno {
            EPERM => "EPERM",
            EIO => "EIO",
            ENOMEM => "ENOMEM",
            EINVAL => "EINVAL",
            ENOSPC => "ENOSPC",
            EOVERFLOW => "EOVERFLOW",
            ENOTSUP => "ENOTSUP",
            ESHUTDOWN => "ESHUTDOWN",
            _ => "unknown error",
        }
    }
}

/// Name of an option reply error type, for messages.
pub(crate) fn rep_err_name(rep: u32) -> String {
    match rep.wrapping_sub(REP_ERR_BIT) {
        1 => "NBD_REP_ERR_UNSUP".into(),
        2 => "NBD_REP_ERR_POLICY".into(),
        3 => "NBD_REP_ERR_INVALID".into(),
        4 => "NBD_REP_ERR_PLATFORM".into(),
        5 => "NBD_REP_ERR_TLS_REQD".into(),
        6 => "NBD_REP_ERR_UNKNOWN".into(),
        7 => "NBD_REP_ERR_SHUTDOWN".into(),
        8 => "NBD_REP_ERR_BLOCK_SIZE_REQD".into(),
        9 => "NBD_REP_ERR_TOO_BIG".into(),
        _ => format!("option reply type {rep:#x}"),
    }
}

/// A transmission-phase command, named in errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    Read,
    Write,
    Disconnect,
    Flush,
    Trim,
    WriteZeroes,
    BlockStatus,
}

impl Command {
    pub(crate) fn code(self) -> u16 {
        match self {
            Command::Read => 0,
            Command::Write => 1,
            Command::Disconnect => 2,
            Command::Flush => 3,
            Command::Trim => 4,
            Command::WriteZeroes => 6,
            Command::BlockStatus => 7,
        }
    }

    /// The protocol's name for the command, e.g. `NBD_CMD_READ`.
    pub fn name(self) -> &'static str {
        match self {
            Command::Read => "NBD_CMD_READ",
            Command::Write => "NBD_CMD_WRITE",
            Command::Disconnect => "NBD_CMD_DISC",
            Command::Flush => "NBD_CMD_FLUSH",
            Command::Trim => "NBD_CMD_TRIM",
            Command::WriteZeroes => "NBD_CMD_WRITE_ZEROES",
            Command::BlockStatus => "NBD_CMD_BLOCK_STATUS",
        }
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Size of a request header on the wire.
pub(crate) const REQUEST_HEADER_LEN: usize = 28;

/// Encodes a request header; a WRITE's payload follows it.
pub(crate) fn request_header(
    flags: u16,
    command: Command,
    cookie: u64,
    offset: u64,
    len: u32,
) -> [u8; REQUEST_HEADER_LEN] {
    let mut h = [0u8; REQUEST_HEADER_LEN];
    h[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    h[4..6].copy_from_slice(&flags.to_be_bytes());
    h[6..8].copy_from_slice(&command.code().to_be_bytes());
    h[8..16].copy_from_slice(&cookie.to_be_bytes());
    h[16..24].copy_from_slice(&offset.to_be_bytes());
    h[24..28].copy_from_slice(&len.to_be_bytes());
    h
}

/// Encodes an option request (`IHAVEOPT`, option, length, data).
pub(crate) fn option_request(option: u32, data: &[u8]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(16 + data.len());
    buf.extend_from_slice(&IHAVEOPT.to_be_bytes());
    buf.extend_from_slice(&option.to_be_bytes());
    // Option data is at most a few names of <= 4096 bytes, checked by the caller.
    buf.extend_from_slice(&(data.len() as u32).to_be_bytes());
    buf.extend_from_slice(data);
    buf
}

/// Appends a string prefixed with its 32-bit length.
pub(crate) fn put_string32(buf: &mut Vec<u8>, s: &str) {
    buf.extend_from_slice(&(s.len() as u32).to_be_bytes());
    buf.extend_from_slice(s.as_bytes());
}

/// Big-endian field reads from a byte slice that the caller has length-checked; `None` if it is too short.
pub(crate) fn be_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

pub(crate) fn be_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

pub(crate) fn be_u64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_header_layout() {
        let h = request_header(CMD_FLAG_FUA, Command::Write, 0x0102_0304_0506_0708, 4096, 512);
        assert_eq!(&h[0..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(&h[4..6], &[0, 1]);
        assert_eq!(&h[6..8], &[0, 1]);
        assert_eq!(&h[8..16], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(be_u64(&h, 16), Some(4096));
        assert_eq!(be_u32(&h, 24), Some(512));
    }

    #[test]
    fn field_reads_reject_short_input() {
        assert_eq!(be_u32(&[1, 2, 3], 0), None);
        assert_eq!(be_u16(&[1, 2, 3], 2), None);
        assert_eq!(be_u64(&[0; 8], 1), None);
    }
}
