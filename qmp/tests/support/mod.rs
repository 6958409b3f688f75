//! A scripted QMP peer for the tests: plays QEMU's side of a socket pair, one line at a time.
#![allow(dead_code)]

use std::time::Duration;

use qmp::Qmp;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

/// How long the peer waits for the client to send something before failing the test.
pub const PEER_WAIT: Duration = Duration::from_secs(10);
/// The connect timeout the tests use.
pub const CONNECT: Duration = Duration::from_secs(5);

pub struct Peer {
    lines: Lines<BufReader<OwnedReadHalf>>,
    write: OwnedWriteHalf,
}

impl Peer {
    pub fn new(stream: UnixStream) -> Peer {
        let (read, write) = stream.into_split();
        Peer {
            lines: BufReader::new(read).lines(),
            write,
        }
    }

    /// Sends one message the way QEMU does (`\r\n` line end).
    pub async fn send(&mut self, message: Value) {
        self.send_raw(format!("{message}\r\n").as_bytes()).await;
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.write.write_all(bytes).await.expect("peer write");
    }

    /// Writes bytes, reporting instead of panicking when the client has gone.
    pub async fn write_all_ok(&mut self, bytes: &[u8]) -> bool {
        self.write.write_all(bytes).await.is_ok()
    }

    /// The next command the client sent.
    pub async fn recv(&mut self) -> Value {
        let line = tokio::time::timeout(PEER_WAIT, self.lines.next_line())
            .await
            .expect("the client sent nothing")
            .expect("peer read")
            .expect("the client closed the connection");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("client sent non-JSON {line:?}: {e}"))
    }

    /// The next command, which must be `name`.
    pub async fn expect(&mut self, name: &str) -> Value {
        let command = self.recv().await;
        assert_eq!(command["execute"], name, "unexpected command {command}");
        command
    }

    /// Replies `value` to `command`.
    pub async fn reply(&mut self, command: &Value, value: Value) {
        self.send(json!({"return": value, "id": command["id"]})).await;
    }

    /// Expects `name` and replies `value`; returns the command.
    pub async fn answer(&mut self, name: &str, value: Value) -> Value {
        let command = self.expect(name).await;
        self.reply(&command, value).await;
        command
    }

    /// Whether the client closed its side (EOF) within `wait`.
    pub async fn sees_eof(&mut self, wait: Duration) -> bool {
        matches!(
            tokio::time::timeout(wait, self.lines.next_line()).await,
            Ok(Ok(None) | Err(_))
        )
    }

    /// Sends a QEMU 10 greeting offering `caps` and answers `qmp_capabilities`; returns that command.
    pub async fn greet(&mut self, caps: &[&str]) -> Value {
        self.send(greeting(caps)).await;
        self.answer("qmp_capabilities", json!({})).await
    }

    /// Closes the peer's side, like QEMU exiting.
    pub fn close(self) {
        let Peer { lines, write } = self;
        drop(write);
        drop(lines);
    }
}

pub fn greeting(caps: &[&str]) -> Value {
    json!({"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "test"},
                   "capabilities": caps}})
}

/// A negotiated client and its peer over a socket pair.
pub async fn connected(caps: &[&str]) -> (Qmp, Peer) {
    let (client, server) = UnixStream::pair().expect("socket pair");
    let mut peer = Peer::new(server);
    let connecting = tokio::spawn(Qmp::from_stream(client, CONNECT));
    peer.greet(caps).await;
    let qmp = connecting.await.expect("connect task").expect("negotiation");
    (qmp, peer)
}
