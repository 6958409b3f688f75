//! Wire framing: QMP is one JSON object per line (QEMU ends lines with `\r\n`).
//!
//! `LineReader` cuts the byte stream into lines with a hard cap, and `Incoming::parse` sorts a line into
//! reply, event, greeting or noise; anything that is not a JSON object is noise and is skipped.

use std::io;

use serde_json::{Map, Value};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};

use crate::error::ErrorClass;
use crate::events::Event;

/// The longest line accepted; a longer one means the peer is not speaking QMP (or is broken).
pub(crate) const MAX_LINE: usize = 64 << 20;

/// Why no line could be read.
#[derive(Debug)]
pub(crate) enum ReadError {
    Io(io::Error),
    /// A line grew past the cap without a newline.
    TooLong(usize),
}

/// Reads newline-terminated lines, at most `max` bytes each.
pub(crate) struct LineReader<R> {
    inner: BufReader<R>,
    line: Vec<u8>,
    max: usize,
}

impl<R: AsyncRead + Unpin> LineReader<R> {
    pub(crate) fn new(reader: R) -> Self {
        Self::with_max(reader, MAX_LINE)
    }

    pub(crate) fn with_max(reader: R, max: usize) -> Self {
        LineReader {
            inner: BufReader::with_capacity(64 * 1024, reader),
            line: Vec::new(),
            max,
        }
    }

    /// The next line without its `\n` or `\r\n`, or `None` at end of stream. A last line without a newline is
    /// returned as a line. Not cancel-safe: drop the reader after cancelling.
    pub(crate) async fn next_line(&mut self) -> Result<Option<&[u8]>, ReadError> {
        self.line.clear();
        loop {
            let available = self.inner.fill_buf().await.map_err(ReadError::Io)?;
            if available.is_empty() {
                if self.line.is_empty() {
                    return Ok(None);
                }
                break;
            }
            let (take, complete) = match available.iter().position(|&b| b == b'\n') {
                Some(end) => (end + 1, true),
                None => (available.len(), false),
            };
            if self.line.len() + take > self.max.saturating_add(2) {
                return Err(ReadError::TooLong(self.max));
            }
            self.line.extend_from_slice(&available[..take]);
            self.inner.consume(take);
            if complete {
                break;
            }
        }
        let mut end = self.line.len();
        while end > 0 && matches!(self.line[end - 1], b'\n' | b'\r') {
            end -= 1;
        }
        if end > self.max {
            return Err(ReadError::TooLong(self.max));
        }
        Ok(Some(&self.line[..end]))
    }
}

/// What QEMU said to a command.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Reply {
    Return(Value),
    Error { class: ErrorClass, desc: String },
}

/// One message from QEMU, sorted.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Incoming {
    /// `{"QMP": …}`: the contents of the greeting.
    Greeting(Value),
    /// A reply; `id` is whatever QEMU echoed (absent when QEMU could not parse our line).
    Reply {
        id: Option<Value>,
        reply: Reply,
    },
    Event(Event),
    /// Valid JSON that is none of the above; skipped.
    Other,
}

impl Incoming {
    /// Sorts one line; `None` if it is not a JSON object.
    pub(crate) fn parse(line: &[u8]) -> Option<Incoming> {
        let Ok(Value::Object(mut message)) = serde_json::from_slice::<Value>(line) else {
            return None;
        };
        if let Some(ret) = message.remove("return") {
            return Some(Incoming::Reply {
                id: message.remove("id"),
                reply: Reply::Return(ret),
            });
        }
        if let Some(error) = message.remove("error") {
            return Some(Incoming::Reply {
                id: message.remove("id"),
                reply: parse_error(&error),
            });
        }
        if message.get("event").is_some_and(Value::is_string) {
            return Event::from_message(message).map(Incoming::Event);
        }
        if let Some(greeting) = message.remove("QMP") {
            return Some(Incoming::Greeting(greeting));
        }
        Some(Incoming::Other)
    }
}

fn parse_error(error: &Value) -> Reply {
    let text = |key: &str| error.get(key).and_then(Value::as_str);
    let class = text("class").map_or(ErrorClass::GenericError, ErrorClass::from);
    let desc = text("desc").map_or_else(|| format!("malformed error reply: {error}"), str::to_owned);
    Reply::Error { class, desc }
}

/// Encodes one command line (with the trailing newline).
pub(crate) fn encode_command(name: &str, arguments: Option<Value>, id: u64) -> Vec<u8> {
    let mut message = Map::new();
    message.insert("execute".into(), Value::String(name.to_owned()));
    if let Some(arguments) = arguments {
        message.insert("arguments".into(), arguments);
    }
    message.insert("id".into(), Value::from(id));
    let mut line = Value::Object(message).to_string().into_bytes();
    line.push(b'\n');
    line
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    async fn lines(input: &[u8], max: usize) -> (Vec<String>, Option<String>) {
        let mut reader = LineReader::with_max(input, max);
        let mut out = Vec::new();
        loop {
            match reader.next_line().await {
                Ok(Some(line)) => out.push(String::from_utf8_lossy(line).into_owned()),
                Ok(None) => return (out, None),
                Err(e) => return (out, Some(format!("{e:?}"))),
            }
        }
    }

    #[tokio::test]
    async fn splits_crlf_and_lf_lines() {
        let (got, err) = lines(b"{\"a\":1}\r\n{\"b\":2}\n\r\n{\"c\":3}", 100).await;
        assert_eq!(got, ["{\"a\":1}", "{\"b\":2}", "", "{\"c\":3}"]);
        assert!(err.is_none());
    }

    #[tokio::test]
    async fn caps_line_length() {
        let (got, err) = lines(b"0123456789\r\nabcdefghijkl\n", 10).await;
        assert_eq!(got, ["0123456789"]);
        assert!(err.unwrap().contains("TooLong"));
        let (got, err) = lines(&vec![b'x'; 300_000], 100_000).await;
        assert!(got.is_empty());
        assert!(err.unwrap().contains("TooLong"));
    }

    #[test]
    fn sorts_messages() {
        let parse = |v: Value| Incoming::parse(v.to_string().as_bytes());
        assert_eq!(
            parse(json!({"return": {}, "id": 4})),
            Some(Incoming::Reply {
                id: Some(json!(4)),
                reply: Reply::Return(json!({}))
            })
        );
        assert_eq!(
            parse(json!({"id": 5, "error": {"class": "DeviceNotFound", "desc": "no such device"}})),
            Some(Incoming::Reply {
                id: Some(json!(5)),
                reply: Reply::Error {
                    class: ErrorClass::DeviceNotFound,
                    desc: "no such device".into()
                }
            })
        );
        let Some(Incoming::Reply {
            reply: Reply::Error { class, desc },
            id: None,
        }) = parse(json!({"error": 3}))
        else {
            panic!("error reply without id")
        };
        assert_eq!(class, ErrorClass::GenericError);
        assert!(desc.contains("malformed"));
        assert!(matches!(
            parse(json!({"event": "STOP"})),
            Some(Incoming::Event(_))
        ));
        assert_eq!(parse(json!({"event": 3})), Some(Incoming::Other));
        assert_eq!(
            parse(json!({"QMP": {"x": 1}})),
            Some(Incoming::Greeting(json!({"x": 1})))
        );
        assert_eq!(parse(json!([1, 2])), None);
        assert_eq!(Incoming::parse(b"not json"), None);
        assert_eq!(Incoming::parse(b"\xff\xfe"), None);
    }

    #[test]
    fn encodes_commands() {
        let line = encode_command("query-status", None, 7);
        assert_eq!(line.last(), Some(&b'\n'));
        let v: Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(v, json!({"execute": "query-status", "id": 7}));
        let v: Value = serde_json::from_slice(&encode_command("stop", Some(json!({"a": 1})), 8)).unwrap();
        assert_eq!(v, json!({"execute": "stop", "arguments": {"a": 1}, "id": 8}));
    }

    /// A reader that hands out its bytes in the given piece sizes, as a socket would.
    struct Pieces {
        data: Vec<u8>,
        sizes: Vec<usize>,
        at: usize,
        next: usize,
    }

    impl tokio::io::AsyncRead for Pieces {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _cx: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            let want = self.sizes.get(self.next).copied().unwrap_or(usize::MAX).max(1);
            self.next += 1;
            let n = want.min(buf.remaining()).min(self.data.len() - self.at);
            let at = self.at;
            buf.put_slice(&self.data[at..at + n]);
            self.at += n;
            std::task::Poll::Ready(Ok(()))
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 256, ..Default::default() })]

        /// Any byte stream, cut anywhere: lines come out as the stream says, none longer than the cap, and
        /// parsing any of them never panics.
        #[test]
        fn arbitrary_streams_frame_and_parse_without_panicking(
            data in proptest::collection::vec(
                proptest::prop_oneof![
                    proptest::prelude::any::<u8>(),
                    proptest::prelude::Just(b'\n'),
                    proptest::prelude::Just(b'\r'),
                    proptest::prelude::Just(b'{'),
                    proptest::prelude::Just(b'"'),
                ],
                0..400,
            ),
            sizes in proptest::collection::vec(1usize..50, 0..40),
            max in 1usize..64,
        ) {
            let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
            runtime.block_on(async {
                let mut reader = LineReader::with_max(Pieces { data: data.clone(), sizes, at: 0, next: 0 }, max);
                let mut got: Vec<Vec<u8>> = Vec::new();
                let mut failed = false;
                loop {
                    match reader.next_line().await {
                        Ok(Some(line)) => {
                            assert!(line.len() <= max);
                            let _ = Incoming::parse(line);
                            got.push(line.to_vec());
                        }
                        Ok(None) => break,
                        Err(ReadError::TooLong(_)) => {
                            failed = true;
                            break;
                        }
                        Err(ReadError::Io(e)) => panic!("{e}"),
                    }
                }
                // The lines are the stream's, in order, without their line ends.
                let expected: Vec<Vec<u8>> = data
                    .split_inclusive(|&b| b == b'\n')
                    .map(|l| {
                        let mut end = l.len();
                        while end > 0 && matches!(l[end - 1], b'\n' | b'\r') {
                            end -= 1;
                        }
                        l[..end].to_vec()
                    })
                    .collect();
                if failed {
                    // Only a line longer than the cap (with its line end) fails the stream.
                    assert!(data.split_inclusive(|&b| b == b'\n').any(|l| l.len() > max));
                    assert_eq!(&got[..], &expected[..got.len()]);
                } else {
                    assert_eq!(got, expected);
                }
            });
        }

        /// Any JSON value as a line is sorted without panicking.
        #[test]
        fn arbitrary_json_lines_parse_without_panicking(text in "\\PC{0,200}") {
            let _ = Incoming::parse(text.as_bytes());
            if let Ok(value) = serde_json::from_str::<Value>(&text) {
                let _ = Incoming::parse(value.to_string().as_bytes());
            }
        }
    }
}
