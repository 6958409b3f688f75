//! A minimal client for the QEMU guest agent (QGA), for quiescing backups: `guest-fsfreeze-freeze` just before
//! the backup transaction and `guest-fsfreeze-thaw` right after it. QGA speaks QMP-like JSON lines on a
//! virtio-serial port but has no greeting, and a new connection may see stale replies: every session starts
//! with `guest-sync-delimited`, whose reply follows a 0xFF byte, and everything before it is dropped.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::UnixStream;

/// Bound on connecting and on each agent command. Freezing waits for the guest to flush its filesystems.
pub const QGA_TIMEOUT: Duration = Duration::from_secs(30);

/// A connection to a guest agent.
pub struct GuestAgent {
    stream: BufReader<UnixStream>,
}

impl GuestAgent {
    /// Connects and synchronises with the agent.
    pub async fn connect(path: &Path) -> Result<GuestAgent> {
        let stream = tokio::time::timeout(QGA_TIMEOUT, UnixStream::connect(path))
            .await
            .map_err(|_| {
                anyhow!(
                    "connecting to the guest agent socket {} timed out",
                    path.display()
                )
            })?
            .with_context(|| format!("connecting to the guest agent socket {}", path.display()))?;
        let mut agent = GuestAgent {
            stream: BufReader::new(stream),
        };
        tokio::time::timeout(QGA_TIMEOUT, agent.sync())
            .await
            .map_err(|_| {
                anyhow!(
                    "the guest agent at {} did not answer within {QGA_TIMEOUT:?}",
                    path.display()
                )
            })?
            .with_context(|| format!("synchronising with the guest agent at {}", path.display()))?;
        Ok(agent)
    }

    async fn sync(&mut self) -> Result<()> {
        let id =
            u64::from(std::process::id()) << 20 | u64::from(chrono::Utc::now().timestamp_subsec_micros());
        self.send(&json!({ "execute": "guest-sync-delimited", "arguments": { "id": id } }))
            .await?;
        loop {
            // Skip to the delimiter, then read the reply line.
            let mut byte = [0u8; 1];
            loop {
                self.stream
                    .read_exact(&mut byte)
                    .await
                    .context("the guest agent closed the connection")?;
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

    async fn send(&mut self, msg: &Value) -> Result<()> {
        let mut line = msg.to_string();
        line.push('\n');
        self.stream
            .get_mut()
            .write_all(line.as_bytes())
            .await
            .context("writing to the guest agent")?;
        Ok(())
    }

    async fn read_line(&mut self) -> Result<Value> {
        let mut line = String::new();
        loop {
            line.clear();
            if self
                .stream
                .read_line(&mut line)
                .await
                .context("reading from the guest agent")?
                == 0
            {
                bail!("the guest agent closed the connection");
            }
            let text = line.trim_matches(|c: char| c.is_whitespace() || c == '\u{ff}');
            if let Ok(value) = serde_json::from_str::<Value>(text) {
                return Ok(value);
            }
        }
    }

    /// Runs one agent command and returns its `return` value.
    pub async fn execute(&mut self, command: &str) -> Result<Value> {
        let reply = tokio::time::timeout(QGA_TIMEOUT, async {
            self.send(&json!({ "execute": command })).await?;
            self.read_line().await
        })
        .await
        .map_err(|_| anyhow!("the guest agent did not answer {command} within {QGA_TIMEOUT:?}"))??;
        if let Some(error) = reply.get("error") {
            bail!(
                "the guest agent refused {command}: {}",
                error["desc"].as_str().unwrap_or("unknown error")
            );
        }
        Ok(reply.get("return").cloned().unwrap_or(Value::Null))
    }

    /// Freezes the guest's filesystems; returns how many were frozen.
    pub async fn freeze(&mut self) -> Result<u64> {
        Ok(self.execute("guest-fsfreeze-freeze").await?.as_u64().unwrap_or(0))
    }

    /// Thaws the guest's filesystems.
    pub async fn thaw(&mut self) -> Result<u64> {
        Ok(self.execute("guest-fsfreeze-thaw").await?.as_u64().unwrap_or(0))
    }

    /// `thawed` or `frozen`.
    pub async fn status(&mut self) -> Result<String> {
        Ok(self
            .execute("guest-fsfreeze-status")
            .await?
            .as_str()
            .unwrap_or_default()
            .to_owned())
    }
}
