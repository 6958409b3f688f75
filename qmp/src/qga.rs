//! A minimal client for the QEMU guest agent (QGA), for quiescing backups: `guest-fsfreeze-freeze` just before
//! the backup transaction and `guest-fsfreeze-thaw` right after it. QGA speaks QMP-like JSON lines on a
//! virtio-serial port but has no greeting, and a new connection may see stale replies: every session starts
//! with `guest-sync-delimited`, whose reply follows a 0xFF byte, and everything before it is dropped.

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::UnixStream;

use crate::error::Error;

/// Bound on connecting and on each agent command. Freezing waits for the guest to flush its filesystems.
pub const QGA_TIMEOUT: Duration = Duration::from_secs(30);

/// The longest reply line accepted from the agent; a longer one ends the session (the agent is inside the
/// guest, which is not trusted to bound what it sends).
const MAX_LINE: u64 = 1 << 20;

/// A connection to a guest agent.
pub struct GuestAgent {
    path: PathBuf,
    stream: BufReader<UnixStream>,
}

impl GuestAgent {
    /// Connects and synchronises with the agent.
    pub async fn connect(path: &Path) -> crate::Result<GuestAgent> {
        let stream = tokio::time::timeout(QGA_TIMEOUT, UnixStream::connect(path))
            .await
            .map_err(|_| Error::Timeout {
                what: format!("connecting to the guest agent socket {}", path.display()),
                after: QGA_TIMEOUT,
            })?
            .map_err(|source| Error::AgentConnect {
                path: path.to_owned(),
                source,
            })?;
        let mut agent = GuestAgent {
            path: path.to_owned(),
            stream: BufReader::new(stream),
        };
        tokio::time::timeout(QGA_TIMEOUT, agent.sync())
            .await
            .map_err(|_| Error::Timeout {
                what: format!(
                    "the guest agent at {} to answer guest-sync-delimited",
                    path.display()
                ),
                after: QGA_TIMEOUT,
            })??;
        Ok(agent)
    }

    fn io(&self, source: io::Error) -> Error {
        Error::AgentIo {
            path: self.path.clone(),
            source,
        }
    }

    async fn sync(&mut self) -> crate::Result<()> {
        let micros = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::from(d.subsec_micros()));
        let id = u64::from(std::process::id()) << 20 | micros;
        self.send(&json!({ "execute": "guest-sync-delimited", "arguments": { "id": id } }))
            .await?;
        loop {
            // Skip to the delimiter, then read the reply line.
            let mut byte = [0u8; 1];
            loop {
                if let Err(e) = self.stream.read_exact(&mut byte).await {
                    return Err(self.io(e));
                }
                if byte[0] == 0xff {
                    break;
                }
            }
            let reply = self.read_line().await?;
            if reply["return"] == id {
                return Ok(());
            }
        }
    }

    async fn send(&mut self, msg: &Value) -> crate::Result<()> {
        let mut line = msg.to_string();
        line.push('\n');
        let written = self.stream.get_mut().write_all(line.as_bytes()).await;
        written.map_err(|e| self.io(e))
    }

    async fn read_line(&mut self) -> crate::Result<Value> {
        let mut line = Vec::new();
        loop {
            line.clear();
            let read = (&mut self.stream)
                .take(MAX_LINE)
                .read_until(b'\n', &mut line)
                .await;
            match read {
                Err(e) => return Err(self.io(e)),
                Ok(0) => return Err(self.io(io::ErrorKind::UnexpectedEof.into())),
                Ok(n) if n as u64 >= MAX_LINE && line.last() != Some(&b'\n') => {
                    return Err(Error::Protocol(format!(
                        "the guest agent at {} sent a line longer than {MAX_LINE} bytes",
                        self.path.display()
                    )));
                }
                Ok(_) => {}
            }
            let text = String::from_utf8_lossy(&line);
            let text = text.trim_matches(|c: char| c.is_whitespace() || c == '\u{ff}' || c == '\u{fffd}');
            if let Ok(value) = serde_json::from_str::<Value>(text) {
                return Ok(value);
            }
        }
    }

    /// Runs one agent command and returns its `return` value.
    pub async fn execute(&mut self, command: &str) -> crate::Result<Value> {
        let reply = tokio::time::timeout(QGA_TIMEOUT, async {
            self.send(&json!({ "execute": command })).await?;
            self.read_line().await
        })
        .await
        .map_err(|_| Error::Timeout {
            what: format!("the guest agent to answer {command}"),
            after: QGA_TIMEOUT,
        })??;
        if let Some(error) = reply.get("error") {
            return Err(Error::AgentRefused {
                command: command.to_owned(),
                desc: error["desc"].as_str().unwrap_or("unknown error").to_owned(),
            });
        }
        Ok(reply.get("return").cloned().unwrap_or(Value::Null))
    }

    /// Freezes the guest's filesystems; returns how many were frozen.
    pub async fn freeze(&mut self) -> crate::Result<u64> {
        Ok(self.execute("guest-fsfreeze-freeze").await?.as_u64().unwrap_or(0))
    }

    /// Thaws the guest's filesystems.
    pub async fn thaw(&mut self) -> crate::Result<u64> {
        Ok(self.execute("guest-fsfreeze-thaw").await?.as_u64().unwrap_or(0))
    }

    /// [`GuestAgent::thaw`], tried up to three times: a guest left frozen is worse than a slow thaw.
    pub async fn thaw_retrying(&mut self) -> crate::Result<u64> {
        let mut thawed = self.thaw().await;
        for _ in 0..2 {
            if thawed.is_ok() {
                break;
            }
            thawed = self.thaw().await;
        }
        thawed
    }

    /// `thawed` or `frozen`.
    pub async fn status(&mut self) -> crate::Result<String> {
        Ok(self
            .execute("guest-fsfreeze-status")
            .await?
            .as_str()
            .unwrap_or_default()
            .to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    /// A stand-in agent: answers the sync after stale bytes and a delimiter, then `answer` to the next command.
    fn agent_with(answer: Vec<u8>) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qga.sock");
        let listener = UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let mut stream = BufReader::new(stream);
            let mut line = String::new();
            stream.read_line(&mut line).await.unwrap();
            let sync: Value = serde_json::from_str(&line).unwrap();
            let id = sync["arguments"]["id"].clone();
            let mut out = b"{\"return\": \"stale\"}\n".to_vec();
            out.push(0xff);
            out.extend_from_slice(format!("{}\n", json!({ "return": id })).as_bytes());
            stream.get_mut().write_all(&out).await.unwrap();
            line.clear();
            stream.read_line(&mut line).await.unwrap();
            stream.get_mut().write_all(&answer).await.unwrap();
            // Keep the connection open until the client is done.
            let _ = stream.read_line(&mut line).await;
        });
        (dir, path)
    }

    #[tokio::test]
    async fn stale_replies_before_the_delimiter_are_dropped_and_refusals_are_typed() {
        let (_dir, path) =
            agent_with(b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"no fs\"}}\n".to_vec());
        let mut agent = GuestAgent::connect(&path).await.unwrap();
        let err = agent.freeze().await.unwrap_err();
        assert!(
            matches!(&err, Error::AgentRefused { desc, .. } if desc == "no fs"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn an_endless_line_from_the_guest_ends_the_session_instead_of_filling_memory() {
        let (_dir, path) = agent_with(vec![b'x'; 3 << 20]);
        let mut agent = GuestAgent::connect(&path).await.unwrap();
        let err = agent.status().await.unwrap_err();
        assert!(matches!(err, Error::Protocol(_)), "{err}");
    }
}
