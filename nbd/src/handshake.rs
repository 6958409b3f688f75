//! Fixed-newstyle negotiation: the greeting, `NBD_OPT_STARTTLS` when the connection is to be TLS (first,
//! before any other option; the caller then runs the TLS handshake and goes on over TLS), structured
//! replies, the metadata contexts (`base:allocation` and any the caller asked for), then transmission with
//! `NBD_OPT_GO` (falling back to `NBD_OPT_EXPORT_NAME` for old servers). The caller bounds the whole
//! exchange with one deadline.

use std::io;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::error::{Error, Result};
use crate::proto::{self, be_u16, be_u32, be_u64};

/// Largest option reply we accept; real ones are a few names of at most 4096 bytes.
const MAX_OPTION_REPLY: u32 = 1 << 20;
/// Most replies we read for one option (contexts, infos, export list entries).
const MAX_REPLIES_PER_OPTION: usize = 4096;
/// How long we wait for the export list that decorates an "export not found" error.
const LIST_TIMEOUT: Duration = Duration::from_secs(2);

/// Block size constraints from `NBD_INFO_BLOCK_SIZE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BlockSize {
    pub min: u32,
    pub preferred: u32,
    pub max: u32,
}

/// What the handshake settled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ExportInfo {
    pub size: u64,
    pub flags: u16,
    pub block_size: Option<BlockSize>,
    pub structured: bool,
    /// Context id of `base:allocation`, if the server selected it.
    pub allocation_context: Option<u32>,
    /// Every context the server selected, `base:allocation` included: (name, id).
    pub contexts: Vec<(String, u32)>,
}

/// What the greeting settled.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Greeting {
    no_zeroes: bool,
}

/// The handshake error for a server that hung up.
pub(crate) const CLOSED_DURING_HANDSHAKE: &str = "the server closed the connection during the handshake";

struct OptionReply {
    kind: u32,
    data: Vec<u8>,
}

impl OptionReply {
    /// The error message a server may attach to an error reply.
    fn message(&self) -> String {
        let text = String::from_utf8_lossy(&self.data);
        if text.is_empty() {
            String::new()
        } else {
            format!(": {text}")
        }
    }

    fn is_error(&self) -> bool {
        self.kind & proto::REP_ERR_BIT != 0
    }
}

fn handshake_io(e: io::Error) -> Error {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        Error::Handshake(CLOSED_DURING_HANDSHAKE.into())
    } else {
        Error::Io(e)
    }
}

fn unexpected(option: &str, reply: &OptionReply) -> Error {
    Error::Handshake(format!("unexpected reply type {:#x} to {option}", reply.kind))
}

async fn send_option<S: AsyncWrite + Unpin>(s: &mut S, option: u32, data: &[u8]) -> Result<()> {
    s.write_all(&proto::option_request(option, data))
        .await
        .map_err(handshake_io)?;
    s.flush().await.map_err(handshake_io)
}

async fn read_option_reply<S: AsyncRead + Unpin>(s: &mut S, option: u32) -> Result<OptionReply> {
    let mut head = [0u8; 20];
    s.read_exact(&mut head).await.map_err(handshake_io)?;
    let field = |at| be_u32(&head, at).unwrap_or_default();
    let magic = be_u64(&head, 0).unwrap_or_default();
    if magic != proto::OPTION_REPLY_MAGIC {
        return Err(Error::Handshake(format!("bad option reply magic {magic:#x}")));
    }
    let (replied_to, kind, len) = (field(8), field(12), field(16));
    if replied_to != option {
        return Err(Error::Handshake(format!(
            "reply to option {replied_to} while waiting for option {option}"
        )));
    }
    if kind == proto::REP_ERR_TLS_REQD {
        return Err(Error::TlsRequired);
    }
    if len > MAX_OPTION_REPLY {
        return Err(Error::Handshake(format!(
            "option reply of {len} bytes is implausibly large"
        )));
    }
    let mut data = vec![0u8; len as usize];
    s.read_exact(&mut data).await.map_err(handshake_io)?;
    Ok(OptionReply { kind, data })
}

/// Reads the server's greeting and answers with our flags; options come next.
pub(crate) async fn greet<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, export: &str) -> Result<Greeting> {
    if export.len() > proto::MAX_STRING {
        return Err(Error::Handshake(format!(
            "export name is longer than {} bytes",
            proto::MAX_STRING
        )));
    }
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).await.map_err(handshake_io)?;
    if be_u64(&greeting, 0) != Some(proto::NBDMAGIC) {
        return Err(Error::Handshake(
            "the server did not greet with NBDMAGIC; is it an NBD server?".into(),
        ));
    }
    match be_u64(&greeting, 8) {
        Some(proto::IHAVEOPT) => {}
        Some(proto::CLISERV_MAGIC) => {
            return Err(Error::Handshake(
                "the server uses oldstyle negotiation, which is not supported".into(),
            ));
        }
        _ => {
            return Err(Error::Handshake(
                "unknown negotiation style after NBDMAGIC".into(),
            ));
        }
    }
    let server_flags = be_u16(&greeting, 16).unwrap_or_default();
    if server_flags & proto::FLAG_FIXED_NEWSTYLE == 0 {
        return Err(Error::Handshake(
            "the server does not support fixed newstyle negotiation".into(),
        ));
    }
    let no_zeroes = server_flags & proto::FLAG_NO_ZEROES != 0;
    let mut client_flags = proto::FLAG_C_FIXED_NEWSTYLE;
    if no_zeroes {
        client_flags |= proto::FLAG_C_NO_ZEROES;
    }
    s.write_all(&client_flags.to_be_bytes())
        .await
        .map_err(handshake_io)?;
    Ok(Greeting { no_zeroes })
}

/// `NBD_OPT_STARTTLS`, right after the greeting. On success the caller must run the TLS handshake on the
/// stream at once; a server that refuses is told goodbye and the connection is not used further.
pub(crate) async fn starttls<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, target: &str) -> Result<()> {
    send_option(s, proto::OPT_STARTTLS, &[]).await?;
    let reply = read_option_reply(s, proto::OPT_STARTTLS).await?;
    match reply.kind {
        proto::REP_ACK if reply.data.is_empty() => Ok(()),
        proto::REP_ACK => Err(Error::Handshake(
            "NBD_REP_ACK to NBD_OPT_STARTTLS with a payload".into(),
        )),
        _ if reply.is_error() => {
            abort(s).await;
            Err(Error::TlsNotOffered {
                target: target.to_owned(),
                reply: format!("{}{}", proto::rep_err_name(reply.kind), reply.message()),
            })
        }
        _ => Err(unexpected("NBD_OPT_STARTTLS", &reply)),
    }
}

/// The options after the greeting (and after TLS, if any): structured replies, metadata contexts
/// (`base:allocation` and `contexts`), `NBD_OPT_GO`. Leaves the stream in the transmission phase.
pub(crate) async fn negotiate_options<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    export: &str,
    greeting: Greeting,
    contexts: &[String],
) -> Result<ExportInfo> {
    let structured = negotiate_structured_replies(s).await?;
    let selected = if structured {
        negotiate_meta_contexts(s, export, contexts).await?
    } else {
        Vec::new()
    };
    let allocation_context = selected
        .iter()
        .find(|(name, _)| name == proto::BASE_ALLOCATION)
        .map(|&(_, id)| id);
    let (size, flags, block_size) = go(s, export, greeting.no_zeroes).await?;
    Ok(ExportInfo {
        size,
        flags,
        block_size,
        structured,
        allocation_context,
        contexts: selected,
    })
}

async fn negotiate_structured_replies<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> Result<bool> {
    send_option(s, proto::OPT_STRUCTURED_REPLY, &[]).await?;
    let reply = read_option_reply(s, proto::OPT_STRUCTURED_REPLY).await?;
    match reply.kind {
        proto::REP_ACK => Ok(true),
        _ if reply.is_error() => Ok(false),
        _ => Err(unexpected("NBD_OPT_STRUCTURED_REPLY", &reply)),
    }
}

/// Asks for `base:allocation` and `extra`; returns what the server selected (name, id). Names the server
/// selected but we did not ask for are ignored.
async fn negotiate_meta_contexts<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    export: &str,
    extra: &[String],
) -> Result<Vec<(String, u32)>> {
    let mut wanted: Vec<&str> = vec![proto::BASE_ALLOCATION];
    for name in extra {
        if name.len() > proto::MAX_STRING {
            return Err(Error::Handshake(format!(
                "metadata context name is longer than {} bytes",
                proto::MAX_STRING
            )));
        }
        if !wanted.contains(&name.as_str()) {
            wanted.push(name);
        }
    }
    let mut data = Vec::new();
    proto::put_string32(&mut data, export);
    data.extend_from_slice(&(wanted.len() as u32).to_be_bytes());
    for name in &wanted {
        proto::put_string32(&mut data, name);
    }
    send_option(s, proto::OPT_SET_META_CONTEXT, &data).await?;
    let mut selected: Vec<(String, u32)> = Vec::new();
    for _ in 0..MAX_REPLIES_PER_OPTION {
        let reply = read_option_reply(s, proto::OPT_SET_META_CONTEXT).await?;
        match reply.kind {
            proto::REP_META_CONTEXT => {
                let id = be_u32(&reply.data, 0)
                    .ok_or_else(|| Error::Handshake("NBD_REP_META_CONTEXT shorter than 4 bytes".into()))?;
                let name = &reply.data[4..];
                let Some(name) = wanted.iter().find(|w| w.as_bytes() == name) else {
                    continue;
                };
                if selected.iter().any(|(n, i)| n == name || *i == id) {
                    return Err(Error::Handshake(format!(
                        "metadata context {name:?} or id {id} selected twice"
                    )));
                }
                selected.push(((*name).to_owned(), id));
            }
            proto::REP_ACK => return Ok(selected),
            // The server cannot select contexts; block status is then reported as all data.
            _ if reply.is_error() => return Ok(Vec::new()),
            _ => return Err(unexpected("NBD_OPT_SET_META_CONTEXT", &reply)),
        }
    }
    Err(Error::Handshake(
        "too many replies to NBD_OPT_SET_META_CONTEXT".into(),
    ))
}

/// `NBD_OPT_GO`, asking for block size constraints (which we then honour).
async fn go<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    export: &str,
    no_zeroes: bool,
) -> Result<(u64, u16, Option<BlockSize>)> {
    let mut data = Vec::new();
    proto::put_string32(&mut data, export);
    data.extend_from_slice(&1u16.to_be_bytes());
    data.extend_from_slice(&proto::INFO_BLOCK_SIZE.to_be_bytes());
    send_option(s, proto::OPT_GO, &data).await?;

    let mut export_info = None;
    let mut block_size = None;
    for _ in 0..MAX_REPLIES_PER_OPTION {
        let reply = read_option_reply(s, proto::OPT_GO).await?;
        match reply.kind {
            proto::REP_INFO => match be_u16(&reply.data, 0) {
                Some(proto::INFO_EXPORT) => {
                    if reply.data.len() != 12 {
                        return Err(Error::Handshake("NBD_INFO_EXPORT is not 12 bytes long".into()));
                    }
                    let size = be_u64(&reply.data, 2).unwrap_or_default();
                    let flags = be_u16(&reply.data, 10).unwrap_or_default();
                    export_info = Some((size, flags));
                }
                Some(proto::INFO_BLOCK_SIZE) => block_size = Some(parse_block_size(&reply.data)?),
                Some(_) => {} // information we did not ask for and do not need
                None => return Err(Error::Handshake("NBD_REP_INFO shorter than 2 bytes".into())),
            },
            proto::REP_ACK => {
                let (size, flags) = export_info.ok_or_else(|| {
                    Error::Handshake("the server accepted NBD_OPT_GO without sending NBD_INFO_EXPORT".into())
                })?;
                return Ok((size, flags, block_size));
            }
            proto::REP_ERR_UNKNOWN => {
                // The list only decorates the error: a server that does not answer must not hide it.
                let available = tokio::time::timeout(LIST_TIMEOUT, list_exports(s))
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .unwrap_or_default();
                abort(s).await;
                return Err(Error::ExportNotFound {
                    name: export.to_owned(),
                    available,
                });
            }
            proto::REP_ERR_UNSUP => return export_name(s, export, no_zeroes).await,
            _ if reply.is_error() => {
                let message = reply.message();
                abort(s).await;
                return Err(Error::Handshake(format!(
                    "the server refused export {export:?}: {}{message}",
                    proto::rep_err_name(reply.kind)
                )));
            }
            _ => return Err(unexpected("NBD_OPT_GO", &reply)),
        }
    }
    Err(Error::Handshake("too many replies to NBD_OPT_GO".into()))
}

fn parse_block_size(data: &[u8]) -> Result<BlockSize> {
    let bad = |why: &str| Error::Handshake(format!("bad NBD_INFO_BLOCK_SIZE: {why}"));
    if data.len() != 14 {
        return Err(bad("not 14 bytes long"));
    }
    let field = |at| be_u32(data, at).unwrap_or_default();
    let b = BlockSize {
        min: field(2),
        preferred: field(6),
        max: field(10),
    };
    if !b.min.is_power_of_two() || b.min > 1 << 16 {
        return Err(bad(&format!(
            "minimum block size {} is not a power of two up to 64 KiB",
            b.min
        )));
    }
    if b.max < b.min {
        return Err(bad(&format!(
            "maximum block size {} is below the minimum {}",
            b.max, b.min
        )));
    }
    Ok(b)
}

/// The old way in, for servers without `NBD_OPT_GO`; an unknown export makes the server hang up.
async fn export_name<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    export: &str,
    no_zeroes: bool,
) -> Result<(u64, u16, Option<BlockSize>)> {
    send_option(s, proto::OPT_EXPORT_NAME, export.as_bytes()).await?;
    let mut reply = [0u8; 10 + 124];
    let len = if no_zeroes { 10 } else { reply.len() };
    s.read_exact(&mut reply[..len]).await.map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            Error::ExportNotFound {
                name: export.to_owned(),
                available: Vec::new(),
            }
        } else {
            Error::Io(e)
        }
    })?;
    Ok((
        be_u64(&reply, 0).unwrap_or_default(),
        be_u16(&reply, 8).unwrap_or_default(),
        None,
    ))
}

/// `NBD_OPT_LIST`, for the error message when an export is not found.
async fn list_exports<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> Result<Vec<String>> {
    send_option(s, proto::OPT_LIST, &[]).await?;
    let mut names = Vec::new();
    for _ in 0..MAX_REPLIES_PER_OPTION {
        let reply = read_option_reply(s, proto::OPT_LIST).await?;
        match reply.kind {
            proto::REP_SERVER => {
                let len = be_u32(&reply.data, 0).unwrap_or(u32::MAX) as usize;
                let name = reply
                    .data
                    .get(4..4usize.saturating_add(len))
                    .ok_or_else(|| Error::Handshake("malformed NBD_REP_SERVER".into()))?;
                names.push(String::from_utf8_lossy(name).into_owned());
            }
            proto::REP_ACK => return Ok(names),
            _ => return Err(unexpected("NBD_OPT_LIST", &reply)),
        }
    }
    Err(Error::Handshake("too many replies to NBD_OPT_LIST".into()))
}

/// Soft disconnect during negotiation. The spec lets us hang up without waiting for the server's ACK, so
/// we do not wait: a server that never answers cannot turn the real error into a timeout.
async fn abort<S: AsyncWrite + Unpin>(s: &mut S) {
    let _ = send_option(s, proto::OPT_ABORT, &[]).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_size_must_be_sane() {
        let encode = |min: u32, pref: u32, max: u32| {
            let mut d = proto::INFO_BLOCK_SIZE.to_be_bytes().to_vec();
            for v in [min, pref, max] {
                d.extend_from_slice(&v.to_be_bytes());
            }
            d
        };
        assert_eq!(
            parse_block_size(&encode(512, 4096, 32 << 20)).unwrap(),
            BlockSize {
                min: 512,
                preferred: 4096,
                max: 32 << 20
            }
        );
        assert!(parse_block_size(&encode(0, 4096, 1)).is_err());
        assert!(parse_block_size(&encode(3, 4096, 1024)).is_err());
        assert!(parse_block_size(&encode(1 << 17, 1 << 17, 1 << 20)).is_err());
        assert!(parse_block_size(&encode(4096, 4096, 512)).is_err());
        assert!(parse_block_size(&encode(1, 1, 1)[..13]).is_err());
    }
}
