//! The client against a tiny in-process NBD server over `tokio::io::duplex`: scripted replies for the
//! cases real QEMU will not produce on demand (out-of-order chunks, errors, protocol violations, silence),
//! and property tests that feed arbitrary bytes as handshake and replies.

use std::time::Duration;

use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

use crate::proto::{self, Command};
use crate::{Client, ConnectOptions, ContextExtent, Error, Extent};

const PEER_TIMEOUT: Duration = Duration::from_secs(5);
const CONTEXT_ID: u32 = 7;
/// The id the peer gives `qemu:dirty-bitmap:bm0` when asked for it.
const DIRTY_ID: u32 = 9;

struct Peer {
    size: u64,
    flags: u16,
    structured: bool,
    meta: bool,
    block_size: Option<(u32, u32, u32)>,
    exports: Vec<&'static str>,
}

impl Default for Peer {
    fn default() -> Self {
        Peer {
            size: 1 << 20,
            flags: 1
                | proto::TF_SEND_FLUSH
                | proto::TF_SEND_FUA
                | proto::TF_SEND_TRIM
                | proto::TF_SEND_WRITE_ZEROES,
            structured: true,
            meta: true,
            block_size: Some((1, 4096, 32 << 20)),
            exports: vec!["disk"],
        }
    }
}

#[derive(Debug)]
struct Req {
    flags: u16,
    command: u16,
    cookie: u64,
    offset: u64,
    len: u32,
}

fn option_reply(option: u32, kind: u32, data: &[u8]) -> Vec<u8> {
    let mut b = proto::OPTION_REPLY_MAGIC.to_be_bytes().to_vec();
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

fn greeting() -> Vec<u8> {
    let mut b = proto::NBDMAGIC.to_be_bytes().to_vec();
    b.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES).to_be_bytes());
    b
}

fn simple(cookie: u64, errno: u32, data: &[u8]) -> Vec<u8> {
    let mut b = proto::SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
    b.extend_from_slice(&errno.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b.extend_from_slice(data);
    b
}

fn chunk(cookie: u64, flags: u16, kind: u16, payload: &[u8]) -> Vec<u8> {
    let mut b = proto::STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
    b.extend_from_slice(&flags.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    b.extend_from_slice(payload);
    b
}

fn data_chunk(cookie: u64, done: bool, offset: u64, data: &[u8]) -> Vec<u8> {
    let mut p = offset.to_be_bytes().to_vec();
    p.extend_from_slice(data);
    chunk(cookie, u16::from(done), proto::REPLY_TYPE_OFFSET_DATA, &p)
}

fn hole_chunk(cookie: u64, done: bool, offset: u64, len: u32) -> Vec<u8> {
    let mut p = offset.to_be_bytes().to_vec();
    p.extend_from_slice(&len.to_be_bytes());
    chunk(cookie, u16::from(done), proto::REPLY_TYPE_OFFSET_HOLE, &p)
}

fn none_chunk(cookie: u64) -> Vec<u8> {
    chunk(cookie, proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_NONE, &[])
}

fn error_chunk(cookie: u64, errno: u32, message: &str) -> Vec<u8> {
    let mut p = errno.to_be_bytes().to_vec();
    p.extend_from_slice(&(message.len() as u16).to_be_bytes());
    p.extend_from_slice(message.as_bytes());
    chunk(
        cookie,
        proto::REPLY_FLAG_DONE,
        proto::REPLY_TYPE_ERROR_BIT + 1,
        &p,
    )
}

fn status_chunk(cookie: u64, descriptors: &[(u32, u32)]) -> Vec<u8> {
    context_chunk(cookie, true, CONTEXT_ID, descriptors)
}

fn context_chunk(cookie: u64, done: bool, context: u32, descriptors: &[(u32, u32)]) -> Vec<u8> {
    let mut p = context.to_be_bytes().to_vec();
    for (len, flags) in descriptors {
        p.extend_from_slice(&len.to_be_bytes());
        p.extend_from_slice(&flags.to_be_bytes());
    }
    chunk(cookie, u16::from(done), proto::REPLY_TYPE_BLOCK_STATUS, &p)
}

impl Peer {
    /// Serves the handshake; true once in transmission, false if the client aborted.
    async fn handshake(&self, s: &mut DuplexStream) -> bool {
        s.write_all(&greeting()).await.unwrap();
        let client_flags = s.read_u32().await.unwrap();
        assert_eq!(
            client_flags,
            proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES
        );
        loop {
            assert_eq!(s.read_u64().await.unwrap(), proto::IHAVEOPT);
            let option = s.read_u32().await.unwrap();
            let mut data = vec![0; s.read_u32().await.unwrap() as usize];
            s.read_exact(&mut data).await.unwrap();
            let reply = |kind, data: &[u8]| option_reply(option, kind, data);
            match option {
                proto::OPT_STRUCTURED_REPLY if self.structured => {
                    s.write_all(&reply(proto::REP_ACK, &[])).await.unwrap();
                }
                proto::OPT_SET_META_CONTEXT if self.meta => {
                    // Export name, count, names: select the ones this peer has.
                    let skip = 4 + proto::be_u32(&data, 0).unwrap() as usize;
                    let count = proto::be_u32(&data, skip).unwrap();
                    let mut at = skip + 4;
                    for _ in 0..count {
                        let len = proto::be_u32(&data, at).unwrap() as usize;
                        let name = &data[at + 4..at + 4 + len];
                        at += 4 + len;
                        let id = match name {
                            b"base:allocation" => CONTEXT_ID,
                            b"qemu:dirty-bitmap:bm0" => DIRTY_ID,
                            _ => continue,
                        };
                        let mut ctx = id.to_be_bytes().to_vec();
                        ctx.extend_from_slice(name);
                        s.write_all(&reply(proto::REP_META_CONTEXT, &ctx)).await.unwrap();
                    }
                    s.write_all(&reply(proto::REP_ACK, &[])).await.unwrap();
                }
                proto::OPT_GO => {
                    let len = proto::be_u32(&data, 0).unwrap() as usize;
                    let name = std::str::from_utf8(&data[4..4 + len]).unwrap();
                    if !self.exports.contains(&name) {
                        s.write_all(&reply(proto::REP_ERR_UNKNOWN, b"no such export"))
                            .await
                            .unwrap();
                        continue;
                    }
                    let mut info = proto::INFO_EXPORT.to_be_bytes().to_vec();
                    info.extend_from_slice(&self.size.to_be_bytes());
                    info.extend_from_slice(&self.flags.to_be_bytes());
                    s.write_all(&reply(proto::REP_INFO, &info)).await.unwrap();
                    if let Some((min, pref, max)) = self.block_size {
                        let mut info = proto::INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                        for v in [min, pref, max] {
                            info.extend_from_slice(&v.to_be_bytes());
                        }
                        s.write_all(&reply(proto::REP_INFO, &info)).await.unwrap();
                    }
                    s.write_all(&reply(proto::REP_ACK, &[])).await.unwrap();
                    return true;
                }
                proto::OPT_LIST => {
                    for name in &self.exports {
                        let mut entry = Vec::new();
                        proto::put_string32(&mut entry, name);
                        s.write_all(&reply(proto::REP_SERVER, &entry)).await.unwrap();
                    }
                    s.write_all(&reply(proto::REP_ACK, &[])).await.unwrap();
                }
                proto::OPT_ABORT => return false,
                _ => s.write_all(&reply(proto::REP_ERR_UNSUP, &[])).await.unwrap(),
            }
        }
    }
}

async fn read_request(s: &mut DuplexStream) -> Option<Req> {
    let mut h = [0u8; proto::REQUEST_HEADER_LEN];
    s.read_exact(&mut h).await.ok()?;
    assert_eq!(proto::be_u32(&h, 0), Some(proto::REQUEST_MAGIC));
    let req = Req {
        flags: proto::be_u16(&h, 4)?,
        command: proto::be_u16(&h, 6)?,
        cookie: proto::be_u64(&h, 8)?,
        offset: proto::be_u64(&h, 16)?,
        len: proto::be_u32(&h, 24)?,
    };
    if req.command == Command::Write.code() {
        let mut payload = vec![0; req.len as usize];
        s.read_exact(&mut payload).await.ok()?;
    }
    Some(req)
}

/// A client connected to `peer`, and the server's end of the stream, in transmission.
async fn connected(peer: Peer) -> (Client, DuplexStream) {
    let (client_end, mut server_end) = tokio::io::duplex(1 << 20);
    let server = tokio::spawn(async move {
        assert!(peer.handshake(&mut server_end).await);
        server_end
    });
    let client = Client::connect_stream(client_end, "disk", PEER_TIMEOUT)
        .await
        .unwrap();
    (client, server.await.unwrap())
}

#[tokio::test]
async fn handshake_reports_the_export() {
    let (client, _server) = connected(Peer {
        flags: 1 | proto::TF_READ_ONLY,
        ..Peer::default()
    })
    .await;
    assert_eq!(client.size(), 1 << 20);
    assert!(client.read_only());
    assert!(client.block_status_supported());
    assert_eq!(client.preferred_block_size(), Some(4096));
    assert_eq!(client.export_name(), "disk");
}

#[tokio::test]
async fn unknown_export_is_named_with_the_available_ones() {
    let (client_end, mut server_end) = tokio::io::duplex(1 << 16);
    let server = tokio::spawn(async move {
        let peer = Peer {
            exports: vec!["disk", "other"],
            ..Peer::default()
        };
        assert!(!peer.handshake(&mut server_end).await);
    });
    let err = Client::connect_stream(client_end, "nope", PEER_TIMEOUT)
        .await
        .unwrap_err();
    match &err {
        Error::ExportNotFound { name, available } => {
            assert_eq!(name, "nope");
            assert_eq!(available, &["disk", "other"]);
        }
        other => panic!("unexpected {other:?}"),
    }
    server.await.unwrap();
}

#[tokio::test]
async fn reads_reassemble_out_of_order_data_and_hole_chunks() {
    let (client, mut server) = connected(Peer::default()).await;
    let serve = tokio::spawn(async move {
        let req = read_request(&mut server).await.unwrap();
        assert_eq!((req.command, req.offset, req.len), (0, 4096, 8192));
        server
            .write_all(&hole_chunk(req.cookie, false, 8192, 4096))
            .await
            .unwrap();
        server
            .write_all(&data_chunk(req.cookie, false, 4096, &[0x5a; 4096]))
            .await
            .unwrap();
        server.write_all(&none_chunk(req.cookie)).await.unwrap();
        server
    });
    let mut buf = vec![0xff; 8192];
    client.read(4096, &mut buf).await.unwrap();
    assert!(buf[..4096].iter().all(|&b| b == 0x5a));
    assert!(buf[4096..].iter().all(|&b| b == 0));
    serve.await.unwrap();
}

#[tokio::test]
async fn read_owned_fills_a_reused_buffer_with_one_request() {
    let (client, mut server) = connected(Peer::default()).await;
    let serve = tokio::spawn(async move {
        for _ in 0..2 {
            let req = read_request(&mut server).await.unwrap();
            assert_eq!((req.command, req.offset, req.len), (0, 4096, 8192));
            server
                .write_all(&hole_chunk(req.cookie, false, 8192, 4096))
                .await
                .unwrap();
            server
                .write_all(&data_chunk(req.cookie, false, 4096, &[0x5a; 4096]))
                .await
                .unwrap();
            server.write_all(&none_chunk(req.cookie)).await.unwrap();
        }
        server
    });
    // A stale buffer, longer than the read: cut to size, and the hole is zeroed, not left stale.
    let buf = client.read_owned(4096, 8192, vec![0xff; 10_000]).await.unwrap();
    assert_eq!(buf.len(), 8192);
    assert!(buf[..4096].iter().all(|&b| b == 0x5a));
    assert!(buf[4096..].iter().all(|&b| b == 0));
    let again = client.read_owned(4096, 8192, buf).await.unwrap();
    assert!(again[..4096].iter().all(|&b| b == 0x5a) && again[4096..].iter().all(|&b| b == 0));
    serve.await.unwrap();
}

#[tokio::test]
async fn an_error_chunk_fails_only_its_request() {
    let (client, mut server) = connected(Peer::default()).await;
    let serve = tokio::spawn(async move {
        let req = read_request(&mut server).await.unwrap();
        server
            .write_all(&error_chunk(req.cookie, 5, "disk on fire"))
            .await
            .unwrap();
        let req = read_request(&mut server).await.unwrap();
        server
            .write_all(&data_chunk(req.cookie, true, 0, &[1; 512]))
            .await
            .unwrap();
        server
    });
    let mut buf = vec![0; 512];
    let err = client.read(0, &mut buf).await.unwrap_err();
    assert!(
        matches!(&err, Error::Server { command: Command::Read, errno: 5, message } if message == "disk on fire"),
        "{err:?}"
    );
    client.read(0, &mut buf).await.unwrap();
    assert_eq!(buf, vec![1; 512]);
    serve.await.unwrap();
}

#[tokio::test]
async fn simple_replies_work_without_structured_replies() {
    let (client, mut server) = connected(Peer {
        structured: false,
        ..Peer::default()
    })
    .await;
    assert!(!client.block_status_supported());
    let serve = tokio::spawn(async move {
        let req = read_request(&mut server).await.unwrap();
        server.write_all(&simple(req.cookie, 0, &[9; 100])).await.unwrap();
        let req = read_request(&mut server).await.unwrap();
        assert_eq!(req.command, Command::Write.code());
        assert_eq!(req.flags, proto::CMD_FLAG_FUA);
        server
            .write_all(&simple(req.cookie, proto::errno::ENOSPC, &[]))
            .await
            .unwrap();
        server
    });
    let mut buf = vec![0; 100];
    client.read(10, &mut buf).await.unwrap();
    assert_eq!(buf, vec![9; 100]);
    let err = client.write(0, &[1; 10], true).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::Server {
                errno: proto::errno::ENOSPC,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(
        client.block_status(100, 50).await.unwrap(),
        vec![Extent {
            offset: 100,
            len: 50,
            hole: false,
            zero: false
        }]
    );
    serve.await.unwrap();
}

#[tokio::test]
async fn block_status_loops_clips_and_merges() {
    let (client, mut server) = connected(Peer::default()).await;
    let serve = tokio::spawn(async move {
        let req = read_request(&mut server).await.unwrap();
        assert_eq!((req.command, req.offset, req.len), (7, 1000, 9000));
        // Only part of the range, in two descriptors.
        server
            .write_all(&status_chunk(req.cookie, &[(3000, 0), (1000, 3)]))
            .await
            .unwrap();
        let req = read_request(&mut server).await.unwrap();
        assert_eq!((req.offset, req.len), (5000, 5000));
        // Same status as the last one, then one reaching past the request.
        server
            .write_all(&status_chunk(req.cookie, &[(2000, 3), (100_000, 0)]))
            .await
            .unwrap();
        server
    });
    let extents = client.block_status(1000, 9000).await.unwrap();
    assert_eq!(
        extents,
        vec![
            Extent {
                offset: 1000,
                len: 3000,
                hole: false,
                zero: false
            },
            Extent {
                offset: 4000,
                len: 3000,
                hole: true,
                zero: true
            },
            Extent {
                offset: 7000,
                len: 3000,
                hole: false,
                zero: false
            },
        ]
    );
    serve.await.unwrap();
}

/// A client that asked for `qemu:dirty-bitmap:bm0` besides `base:allocation`.
async fn connected_with_bitmap() -> (Client, DuplexStream) {
    let (client_end, mut server_end) = tokio::io::duplex(1 << 20);
    let server = tokio::spawn(async move {
        assert!(Peer::default().handshake(&mut server_end).await);
        server_end
    });
    let options = ConnectOptions::new().dirty_bitmap("bm0").dirty_bitmap("absent");
    let client = Client::connect_stream_with(client_end, "disk", &options, PEER_TIMEOUT)
        .await
        .unwrap();
    (client, server.await.unwrap())
}

#[tokio::test]
async fn each_context_gets_its_own_chunk_of_a_reply_for_all() {
    let (client, mut server) = connected_with_bitmap().await;
    assert_eq!(
        client.meta_contexts().collect::<Vec<_>>(),
        ["base:allocation", "qemu:dirty-bitmap:bm0"]
    );
    let serve = tokio::spawn(async move {
        // The server reports every negotiated context, in any order.
        let req = read_request(&mut server).await.unwrap();
        assert_eq!((req.command, req.offset, req.len), (7, 0, 8192));
        server
            .write_all(&context_chunk(req.cookie, false, CONTEXT_ID, &[(8192, 0)]))
            .await
            .unwrap();
        server
            .write_all(&context_chunk(
                req.cookie,
                true,
                DIRTY_ID,
                &[(4096, 0), (2048, 1), (2048, 1)],
            ))
            .await
            .unwrap();
        let req = read_request(&mut server).await.unwrap();
        server
            .write_all(&context_chunk(req.cookie, false, DIRTY_ID, &[(8192, 1)]))
            .await
            .unwrap();
        server
            .write_all(&context_chunk(req.cookie, true, CONTEXT_ID, &[(8192, 3)]))
            .await
            .unwrap();
        server
    });
    let dirty = client.dirty_extents("bm0", 0, 8192).await.unwrap();
    assert_eq!(
        dirty,
        vec![
            ContextExtent {
                offset: 0,
                len: 4096,
                flags: 0
            },
            ContextExtent {
                offset: 4096,
                len: 4096,
                flags: proto::STATE_DIRTY
            },
        ]
    );
    assert!(dirty[1].dirty() && !dirty[0].dirty());
    let extents = client.block_status(0, 8192).await.unwrap();
    assert_eq!(
        extents,
        vec![Extent {
            offset: 0,
            len: 8192,
            hole: true,
            zero: true
        }]
    );
    // Asked for, not selected: refused before anything is sent.
    let err = client.dirty_extents("absent", 0, 8192).await.unwrap_err();
    assert!(matches!(err, Error::NoMetaContext { .. }), "{err:?}");
    serve.await.unwrap();
}

#[tokio::test]
async fn a_chunk_for_an_unnegotiated_context_or_twice_for_one_ends_the_connection() {
    for (first, second) in [(DIRTY_ID, 77), (DIRTY_ID, DIRTY_ID)] {
        let (client, mut server) = connected_with_bitmap().await;
        let serve = tokio::spawn(async move {
            let req = read_request(&mut server).await.unwrap();
            server
                .write_all(&context_chunk(req.cookie, false, first, &[(8192, 1)]))
                .await
                .unwrap();
            server
                .write_all(&context_chunk(req.cookie, true, second, &[(8192, 1)]))
                .await
                .unwrap();
            server
        });
        let err = client.dirty_extents("bm0", 0, 8192).await.unwrap_err();
        assert!(matches!(err, Error::Protocol(_)), "{err:?}");
        let err = client.block_status(0, 8192).await.unwrap_err();
        assert!(matches!(err, Error::Closed), "{err:?}");
        drop(serve.await.unwrap());
    }
}

#[tokio::test]
async fn a_server_that_refuses_starttls_is_told_goodbye() {
    let (client_end, mut server_end) = tokio::io::duplex(1 << 16);
    let server = tokio::spawn(async move {
        // Refuses STARTTLS as a server without TLS does; the client must send nothing but ABORT after.
        assert!(!Peer::default().handshake(&mut server_end).await);
    });
    let dir = tempfile::tempdir().unwrap();
    let ca = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    std::fs::write(dir.path().join(crate::CA_CERT), ca.cert.pem()).unwrap();
    let options = ConnectOptions::new()
        .tls(crate::TlsCredentials::from_dir(dir.path()).unwrap())
        .server_name("localhost");
    let err = Client::connect_stream_with(client_end, "disk", &options, PEER_TIMEOUT)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::TlsNotOffered { reply, .. } if reply.starts_with("NBD_REP_ERR_UNSUP")),
        "{err:?}"
    );
    assert_eq!(err.kind(), crate::ErrorKind::Tls);
    server.await.unwrap();
}

#[tokio::test]
async fn unaligned_calls_are_widened_or_refused_before_sending() {
    let peer = Peer {
        block_size: Some((512, 4096, 65536)),
        ..Peer::default()
    };
    let (client, mut server) = connected(peer).await;
    let err = client.write(100, &[0; 512], false).await.unwrap_err();
    assert!(matches!(err, Error::Misaligned { align: 512, .. }), "{err:?}");
    let err = client.read(client.size() - 10, &mut [0; 11]).await.unwrap_err();
    assert!(matches!(err, Error::OutOfRange { .. }), "{err:?}");
    let serve = tokio::spawn(async move {
        // The unaligned read arrives as whole blocks; a 200 KiB read in pieces of at most 64 KiB.
        let req = read_request(&mut server).await.unwrap();
        assert_eq!((req.offset, req.len), (0, 1024));
        let mut block = vec![0u8; 1024];
        block[..]
            .iter_mut()
            .enumerate()
            .for_each(|(i, b)| *b = (i % 251) as u8);
        server
            .write_all(&data_chunk(req.cookie, true, 0, &block))
            .await
            .unwrap();
        let mut sizes = Vec::new();
        for _ in 0..4 {
            let req = read_request(&mut server).await.unwrap();
            sizes.push(req.len);
            server
                .write_all(&hole_chunk(req.cookie, true, req.offset, req.len))
                .await
                .unwrap();
        }
        assert_eq!(sizes, vec![65536, 65536, 65536, 8192]);
        server
    });
    let mut buf = [0u8; 600];
    client.read(100, &mut buf).await.unwrap();
    assert!(buf.iter().enumerate().all(|(i, &b)| b == ((i + 100) % 251) as u8));
    let mut big = vec![1u8; 200 << 10];
    client.read(4096, &mut big).await.unwrap();
    assert!(big.iter().all(|&b| b == 0));
    serve.await.unwrap();
}

#[tokio::test]
async fn a_reply_for_an_unknown_cookie_ends_the_connection() {
    let (client, mut server) = connected(Peer::default()).await;
    let serve = tokio::spawn(async move {
        let req = read_request(&mut server).await.unwrap();
        server.write_all(&none_chunk(req.cookie + 1000)).await.unwrap();
        server
    });
    let err = client.flush().await.unwrap_err();
    assert!(
        matches!(err, Error::Protocol(ref m) if m.contains("unknown cookie")),
        "{err:?}"
    );
    assert!(matches!(client.flush().await.unwrap_err(), Error::Closed));
    let _server = serve.await.unwrap();
}

#[tokio::test]
async fn a_silent_server_times_out_and_a_late_reply_is_discarded() {
    let (client, mut server) = connected(Peer::default()).await;
    let client = client.with_timeout(Duration::from_millis(200));
    let err = client.flush().await.unwrap_err();
    assert!(
        matches!(err, Error::Timeout { ref what, .. } if what.contains("NBD_CMD_FLUSH")),
        "{err:?}"
    );
    let req = read_request(&mut server).await.unwrap();
    // The late reply goes nowhere; the next request still works.
    server.write_all(&none_chunk(req.cookie)).await.unwrap();
    let serve = tokio::spawn(async move {
        let req = read_request(&mut server).await.unwrap();
        server.write_all(&simple(req.cookie, 0, &[])).await.unwrap();
        server
    });
    client.flush().await.unwrap();
    serve.await.unwrap();
}

#[tokio::test]
async fn a_timed_out_read_gives_back_its_entry_and_its_late_reply_is_skipped() {
    let (client, mut server) = connected(Peer::default()).await;
    let client = client.with_timeout(Duration::from_millis(200));
    let err = client.read(0, &mut [0; 4096]).await.unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
    assert_eq!(
        client.pending_counts(),
        (0, 1),
        "only a note for the late reply stays"
    );
    let req = read_request(&mut server).await.unwrap();
    // The late reply comes in two chunks; both are skipped, then the note goes.
    server
        .write_all(&data_chunk(req.cookie, false, 0, &[1; 2048]))
        .await
        .unwrap();
    server
        .write_all(&data_chunk(req.cookie, true, 2048, &[1; 2048]))
        .await
        .unwrap();
    let serve = tokio::spawn(async move {
        let req = read_request(&mut server).await.unwrap();
        server
            .write_all(&hole_chunk(req.cookie, true, 0, 10))
            .await
            .unwrap();
        server
    });
    let mut buf = [9; 10];
    client.read(0, &mut buf).await.unwrap();
    assert_eq!(buf, [0; 10]);
    assert_eq!(client.pending_counts(), (0, 0));
    serve.await.unwrap();
}

#[tokio::test]
async fn a_dropped_read_gives_back_its_entry_and_a_late_simple_reply_is_skipped() {
    let (client, mut server) = connected(Peer {
        structured: false,
        ..Peer::default()
    })
    .await;
    let mut buf = vec![0; 100];
    // The caller stops waiting long before the client's own timeout.
    let gave_up = tokio::time::timeout(Duration::from_millis(100), client.read(0, &mut buf)).await;
    assert!(gave_up.is_err());
    assert_eq!(client.pending_counts(), (0, 1));
    let req = read_request(&mut server).await.unwrap();
    // Its data follows the header and must be skipped by the request's length.
    server.write_all(&simple(req.cookie, 0, &[5; 100])).await.unwrap();
    let serve = tokio::spawn(async move {
        let req = read_request(&mut server).await.unwrap();
        server.write_all(&simple(req.cookie, 0, &[7; 10])).await.unwrap();
        server
    });
    let mut buf = [0; 10];
    client.read(0, &mut buf).await.unwrap();
    assert_eq!(buf, [7; 10]);
    assert_eq!(client.pending_counts(), (0, 0));
    serve.await.unwrap();
}

#[tokio::test]
async fn a_reply_may_not_deliver_more_data_than_was_asked_for() {
    let (client, mut server) = connected(Peer::default()).await;
    let client = client.with_timeout(PEER_TIMEOUT);
    let serve = tokio::spawn(async move {
        let req = read_request(&mut server).await.unwrap();
        // The same bytes twice, without ever saying it is done.
        for _ in 0..2 {
            server
                .write_all(&data_chunk(req.cookie, false, 0, &[1; 4096]))
                .await
                .unwrap();
        }
        server
    });
    let err = client.read(0, &mut [0; 4096]).await.unwrap_err();
    assert!(
        matches!(err, Error::Protocol(ref m) if m.contains("more than the 4096 bytes")),
        "{err:?}"
    );
    let _server = serve.await.unwrap();
}

#[tokio::test]
async fn a_reply_may_not_have_chunks_without_end() {
    let (client, mut server) = connected(Peer::default()).await;
    let client = client.with_timeout(PEER_TIMEOUT);
    let serve = tokio::spawn(async move {
        let req = read_request(&mut server).await.unwrap();
        let mut p = 5u32.to_be_bytes().to_vec();
        p.extend_from_slice(&0u16.to_be_bytes());
        let one = chunk(req.cookie, 0, proto::REPLY_TYPE_ERROR_BIT + 1, &p);
        let many = one.repeat(crate::conn::MAX_REPLY_CHUNKS as usize + 1);
        // The client stops reading once it has seen enough.
        let _ = server.write_all(&many).await;
        server
    });
    let err = client.flush().await.unwrap_err();
    assert!(
        matches!(err, Error::Protocol(ref m) if m.contains("chunks")),
        "{err:?}"
    );
    let _server = serve.await.unwrap();
}

#[tokio::test]
async fn the_server_going_away_fails_pending_requests_with_closed() {
    let (client, mut server) = connected(Peer::default()).await;
    let pending = tokio::spawn({
        let client = client.clone();
        async move { client.flush().await }
    });
    read_request(&mut server).await.unwrap();
    drop(server);
    let err = tokio::time::timeout(PEER_TIMEOUT, pending)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, Error::Closed), "{err:?}");
    assert!(matches!(
        client.read(0, &mut [0; 10]).await.unwrap_err(),
        Error::Closed
    ));
}

#[tokio::test]
async fn disconnect_and_drop_send_nbd_cmd_disc() {
    let (client, mut server) = connected(Peer::default()).await;
    let serve = tokio::spawn(async move {
        let req = read_request(&mut server).await.unwrap();
        assert_eq!(req.command, Command::Disconnect.code());
        // EOF after DISC: the client shut its side down.
        assert!(read_request(&mut server).await.is_none());
    });
    client.clone().disconnect().await.unwrap();
    assert!(matches!(client.flush().await.unwrap_err(), Error::Closed));
    serve.await.unwrap();

    let (client, mut server) = connected(Peer::default()).await;
    drop(client);
    let req = tokio::time::timeout(PEER_TIMEOUT, read_request(&mut server))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(req.command, Command::Disconnect.code());
}

#[tokio::test]
async fn read_only_and_unadvertised_commands_are_refused_locally() {
    let (client, _server) = connected(Peer {
        flags: 1 | proto::TF_READ_ONLY,
        ..Peer::default()
    })
    .await;
    let err = client.write(0, &[0; 512], false).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::ReadOnly {
                command: Command::Write
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("read-only"));
    let (client, _server) = connected(Peer {
        flags: 1,
        ..Peer::default()
    })
    .await;
    assert!(matches!(
        client.trim(0, 512).await.unwrap_err(),
        Error::Unsupported { .. }
    ));
    assert!(matches!(
        client.flush().await.unwrap_err(),
        Error::Unsupported { .. }
    ));
    assert!(matches!(
        client.write_zeroes(0, 512, true).await.unwrap_err(),
        Error::Unsupported { .. }
    ));
}

// ---- arbitrary server data ----

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A reply message built from arbitrary parts: mostly well-framed chunks with odd contents, sometimes raw
/// bytes.
fn arb_message() -> impl Strategy<Value = Vec<u8>> {
    let kinds = prop_oneof![
        Just(proto::REPLY_TYPE_NONE),
        Just(proto::REPLY_TYPE_OFFSET_DATA),
        Just(proto::REPLY_TYPE_OFFSET_HOLE),
        Just(proto::REPLY_TYPE_BLOCK_STATUS),
        Just(proto::REPLY_TYPE_ERROR_BIT + 1),
        Just(proto::REPLY_TYPE_ERROR_OFFSET),
        any::<u16>(),
    ];
    let framed = (
        0u64..6,
        any::<u16>(),
        kinds,
        proptest::collection::vec(any::<u8>(), 0..64),
    )
        .prop_map(|(cookie, flags, kind, payload)| chunk(cookie, flags, kind, &payload));
    let chunk_fields = (0u64..6, any::<bool>(), any::<u64>(), any::<u32>(), 0u64..6000).prop_map(
        |(cookie, done, offset, len, at)| {
            if len % 2 == 0 {
                hole_chunk(cookie, done, offset % 16384, len % 8192)
            } else {
                data_chunk(cookie, done, at, &vec![0xaa; (len % 600) as usize])
            }
        },
    );
    let status = (
        0u64..6,
        proptest::collection::vec((any::<u32>(), any::<u32>()), 0..4),
    )
        .prop_map(|(cookie, d)| status_chunk(cookie, &d));
    let simple_reply = (0u64..6, any::<u32>()).prop_map(|(cookie, errno)| simple(cookie, errno % 3, &[]));
    let raw = proptest::collection::vec(any::<u8>(), 0..40);
    prop_oneof![framed, chunk_fields, status, simple_reply, raw]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_handshake_bytes_never_panic(prefix in 0usize..4, tail in proptest::collection::vec(any::<u8>(), 0..300)) {
        runtime().block_on(async {
            let (client_end, mut server_end) = tokio::io::duplex(1 << 16);
            // Start from a valid greeting part of the time, to get past the magic.
            let mut bytes = match prefix {
                0 => Vec::new(),
                1 => greeting(),
                2 => {
                    let mut b = greeting();
                    b.extend_from_slice(&option_reply(proto::OPT_STRUCTURED_REPLY, proto::REP_ACK, &[]));
                    b
                }
                _ => {
                    let mut b = greeting();
                    b.extend_from_slice(&option_reply(proto::OPT_STRUCTURED_REPLY, proto::REP_ACK, &[]));
                    b.extend_from_slice(&option_reply(proto::OPT_SET_META_CONTEXT, proto::REP_ACK, &[]));
                    b
                }
            };
            bytes.extend_from_slice(&tail);
            server_end.write_all(&bytes).await.unwrap();
            drop(server_end);
            let result = tokio::time::timeout(PEER_TIMEOUT, Client::connect_stream(client_end, "disk", Duration::from_secs(2))).await;
            prop_assert!(result.is_ok(), "connect did not finish in time");
            Ok(())
        })?;
    }

    #[test]
    fn arbitrary_replies_never_panic_or_hang(messages in proptest::collection::vec(arb_message(), 0..8)) {
        runtime().block_on(async {
            let (client, mut server) = connected(Peer::default()).await;
            let client = client.with_timeout(Duration::from_secs(2));
            let feed = tokio::spawn(async move {
                // Let requests arrive, answer with the arbitrary messages, then hang up.
                for _ in 0..3 {
                    if tokio::time::timeout(Duration::from_millis(50), read_request(&mut server)).await.is_err() {
                        break;
                    }
                }
                for m in messages {
                    if server.write_all(&m).await.is_err() {
                        break;
                    }
                }
            });
            let (a, b, c) = tokio::join!(
                async { client.read(0, &mut [0; 6000]).await },
                client.block_status(0, 16384),
                client.write(0, &[1; 100], false),
            );
            feed.await.unwrap();
            let after = tokio::time::timeout(PEER_TIMEOUT, client.flush()).await;
            prop_assert!(after.is_ok(), "request after the peer hung up did not finish");
            // Whatever happened, results are well-formed.
            if let Ok(extents) = b {
                prop_assert!(extents.first().is_some_and(|e| e.offset == 0));
                prop_assert_eq!(extents.last().map(Extent::end), Some(16384));
            }
            let _ = (a, c);
            Ok(())
        })?;
    }

    #[test]
    fn parsers_never_panic(kind in any::<u16>(), payload in proptest::collection::vec(any::<u8>(), 0..64),
                           offset in any::<u64>(), len in any::<u64>(), base in any::<u64>()) {
        let _ = crate::reply::parse_error_chunk(kind, &payload);
        let _ = crate::reply::parse_block_status(&payload);
        let mut read = crate::reply::ReadAssembly::new(base, 4096);
        let _ = read.place(offset, len);
        let _ = read.hole(offset, len as u32);
        let _ = read.finish();
    }
}
