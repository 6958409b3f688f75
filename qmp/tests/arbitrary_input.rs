//! Property tests: whatever a peer sends after a valid greeting, the client does not panic, a pending command
//! returns within its timeout, and the connection either survives (and still works) or closes cleanly.

mod support;

use std::time::{Duration, Instant};

use proptest::collection::{btree_map, vec};
use proptest::prelude::*;
use qmp::EventFilter;
use serde_json::{Value, json};
use support::connected;

/// The timeout of the command in flight while the garbage arrives.
const COMMAND_TIMEOUT: Duration = Duration::from_millis(100);
/// Scheduling slack on top of it.
const SLACK: Duration = Duration::from_secs(2);
/// Stands for the id of the command in flight, so generated replies can hit it.
const INFLIGHT: &str = "$inflight";

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(vec![
            "event", "data", "return", "error", "id", "QMP", "class", "desc", "status", "timestamp", "seconds",
            "microseconds", "device", "version", "capabilities",
        ])
        .prop_map(str::to_owned),
        1 => "[a-z-]{0,8}",
    ]
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        (0u64..4).prop_map(Value::from),
        any::<f64>().prop_filter_map("finite", |f| serde_json::Number::from_f64(f).map(Value::Number)),
        "\\PC{0,12}".prop_map(Value::from),
        Just(Value::from(INFLIGHT)),
        prop::sample::select(vec![
            "JOB_STATUS_CHANGE",
            "STOP",
            "SHUTDOWN",
            "concluded",
            "null",
            "GenericError",
            "oob",
        ])
        .prop_map(Value::from),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(4, 64, 6, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..6).prop_map(Value::Array),
            btree_map(key(), inner, 0..6).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn message() -> impl Strategy<Value = Value> {
    prop_oneof![
        3 => btree_map(key(), json_value(), 0..5).prop_map(|m| Value::Object(m.into_iter().collect())),
        1 => json_value(),
    ]
}

/// Byte soup with QMP-ish fragments and line ends mixed in.
fn bytes() -> impl Strategy<Value = Vec<u8>> {
    let fragment = prop_oneof![
        4 => vec(any::<u8>(), 0..64),
        1 => Just(b"\r\n".to_vec()),
        1 => Just(b"\n".to_vec()),
        1 => Just(b"{\"event\": \"STOP\"".to_vec()),
        1 => Just(b"{\"return\": {}, \"id\": ".to_vec()),
        1 => Just(b"{\"error\": {\"class\": 7}, \"id\": 2}".to_vec()),
        1 => Just(b"}".to_vec()),
    ];
    vec(fragment, 0..48).prop_map(|parts| parts.concat())
}

fn with_inflight_id(value: Value, id: &Value) -> Value {
    match value {
        Value::String(s) if s == INFLIGHT => id.clone(),
        Value::Array(items) => Value::Array(items.into_iter().map(|v| with_inflight_id(v, id)).collect()),
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| (k, with_inflight_id(v, id)))
                .collect(),
        ),
        other => other,
    }
}

enum Garbage {
    Bytes(Vec<u8>),
    Json(Vec<Value>),
}

fn run(garbage: Garbage, close: bool) -> Result<(), TestCaseError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let (qmp, mut peer) = connected(&[]).await;
        let mut events = qmp.subscribe(EventFilter::all());
        let started = Instant::now();
        let call = tokio::spawn({
            let qmp = qmp.clone();
            async move {
                qmp.execute_raw_timeout("query-status", None, COMMAND_TIMEOUT)
                    .await
            }
        });
        let command = peer.expect("query-status").await;
        let bytes = match garbage {
            Garbage::Bytes(bytes) => bytes,
            Garbage::Json(values) => values
                .into_iter()
                .flat_map(|v| format!("{}\r\n", with_inflight_id(v, &command["id"])).into_bytes())
                .collect(),
        };
        peer.send_raw(&bytes).await;

        if close {
            peer.close();
            let _any_result = call.await.expect("command task");
            prop_assert!(started.elapsed() < COMMAND_TIMEOUT + SLACK);
            prop_assert!(
                tokio::time::timeout(SLACK, qmp.closed()).await.is_ok(),
                "closed() resolves"
            );
            let drained = tokio::time::timeout(SLACK, async { while events.next().await.is_some() {} }).await;
            prop_assert!(drained.is_ok(), "the event stream ends");
            let after = qmp.execute_raw("query-status", None).await;
            prop_assert!(
                after.is_err_and(|e| e.is_closed()),
                "later commands fail with Closed"
            );
        } else {
            // End a partial line; the sentinel event marks the end of the garbage.
            peer.send_raw(b"\r\n{\"event\": \"X_SENTINEL\"}\r\n").await;
            let _any_result = call.await.expect("command task");
            prop_assert!(started.elapsed() < COMMAND_TIMEOUT + SLACK);
            let sentinel = tokio::time::timeout(SLACK, async {
                while let Some(event) = events.next().await {
                    if event.name == "X_SENTINEL" {
                        return true;
                    }
                }
                false
            });
            prop_assert_eq!(sentinel.await, Ok(true), "the garbage was read through");
            prop_assert!(!qmp.is_closed());
            // The connection still works.
            let follow_up = tokio::spawn({
                let qmp = qmp.clone();
                async move { qmp.execute_raw_timeout("query-version", None, SLACK).await }
            });
            peer.answer("query-version", json!({"follow": "up"})).await;
            let reply = follow_up.await.expect("follow-up task");
            prop_assert_eq!(reply.ok(), Some(json!({"follow": "up"})));
        }
        Ok(())
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_are_survived(bytes in bytes(), close in any::<bool>()) {
        run(Garbage::Bytes(bytes), close)?;
    }

    #[test]
    fn arbitrary_json_is_survived(values in vec(message(), 0..12), close in any::<bool>()) {
        run(Garbage::Json(values), close)?;
    }
}
