//! The client against a scripted peer: negotiation, concurrent commands, errors, garbage, timeouts and closing.

mod support;

use std::io;
use std::time::{Duration, Instant};

use qmp::commands::{QueryStatus, QueryVersion, Stop};
use qmp::{Error, ErrorClass, EventFilter, Qmp, RunState};
use serde_json::{Value, json};
use support::{CONNECT, Peer, connected, greeting};
use tokio::net::{UnixListener, UnixStream};

/// Comfortably less than any timeout that would mean "it hung".
const PROMPT: Duration = Duration::from_secs(2);

#[tokio::test]
async fn negotiates_without_oob_when_not_offered() {
    let (client, server) = UnixStream::pair().unwrap();
    let mut peer = Peer::new(server);
    let connecting = tokio::spawn(Qmp::from_stream(client, CONNECT));
    let negotiation = peer.greet(&[]).await;
    let qmp = connecting.await.unwrap().unwrap();
    assert!(negotiation.get("arguments").is_none(), "{negotiation}");
    assert!(negotiation["id"].is_u64());
    assert_eq!(qmp.greeting().version.qemu.major, 10);
    assert_eq!(qmp.greeting().version.to_string(), "10.0.2 (test)");
    assert!(qmp.greeting().capabilities.is_empty());
}

#[tokio::test]
async fn enables_oob_when_offered() {
    let (client, server) = UnixStream::pair().unwrap();
    let mut peer = Peer::new(server);
    let connecting = tokio::spawn(Qmp::from_stream(client, CONNECT));
    let negotiation = peer.greet(&["oob"]).await;
    let qmp = connecting.await.unwrap().unwrap();
    assert_eq!(negotiation["arguments"], json!({"enable": ["oob"]}));
    assert_eq!(qmp.greeting().capabilities, ["oob"]);
}

#[tokio::test]
async fn connects_by_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qmp.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let server = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let mut peer = Peer::new(stream);
        peer.greet(&["oob"]).await;
        peer.answer(
            "query-version",
            json!({"qemu": {"major": 9, "minor": 2, "micro": 0}, "package": ""}),
        )
        .await;
        peer
    });
    let qmp = Qmp::connect(&path, CONNECT).await.unwrap();
    assert_eq!(qmp.path(), path);
    let version = qmp.execute(&QueryVersion).await.unwrap();
    assert_eq!((version.qemu.major, version.qemu.minor), (9, 2));
    server.await.unwrap();
}

#[tokio::test]
async fn connect_errors_keep_the_io_kind() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.sock");
    let err = Qmp::connect(&missing, CONNECT).await.unwrap_err();
    assert!(
        matches!(&err, Error::Connect { path, .. } if *path == missing),
        "{err:?}"
    );
    assert_eq!(err.io_kind(), Some(io::ErrorKind::NotFound));
    assert!(err.to_string().contains("missing.sock"));

    let stale = dir.path().join("stale.sock");
    drop(UnixListener::bind(&stale).unwrap());
    let err = Qmp::connect(&stale, CONNECT).await.unwrap_err();
    assert_eq!(err.io_kind(), Some(io::ErrorKind::ConnectionRefused), "{err:?}");
}

#[tokio::test]
async fn a_peer_that_is_not_qmp_is_reported() {
    let (client, server) = UnixStream::pair().unwrap();
    let mut peer = Peer::new(server);
    peer.send_raw(b"QEMU 10.0.2 monitor - type 'help' for more information\r\n(qemu) ")
        .await;
    let err = Qmp::from_stream(client, CONNECT).await.unwrap_err();
    let Error::NotQmp { detail, .. } = &err else {
        panic!("{err:?}")
    };
    assert!(detail.contains("monitor - type"), "{detail}");

    let (client, server) = UnixStream::pair().unwrap();
    drop(server);
    let err = Qmp::from_stream(client, CONNECT).await.unwrap_err();
    assert!(matches!(err, Error::NotQmp { .. }), "{err:?}");
}

#[tokio::test]
async fn a_silent_peer_times_out_the_connect() {
    let (client, _server) = UnixStream::pair().unwrap();
    let started = Instant::now();
    let err = Qmp::from_stream(client, Duration::from_millis(200))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Timeout { what, .. } if what.contains("greeting")),
        "{err:?}"
    );
    assert!(started.elapsed() < PROMPT);

    // Greeting, but no answer to qmp_capabilities.
    let (client, server) = UnixStream::pair().unwrap();
    let mut peer = Peer::new(server);
    peer.send(greeting(&[])).await;
    let err = Qmp::from_stream(client, Duration::from_millis(200))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Timeout { what, .. } if what.contains("qmp_capabilities")),
        "{err:?}"
    );
}

#[tokio::test]
async fn many_commands_in_flight_get_their_own_replies() {
    let (qmp, mut peer) = connected(&[]).await;
    let mut tasks = Vec::new();
    for task in 0..4u64 {
        let qmp = qmp.clone();
        tasks.push(tokio::spawn(async move {
            let mut calls = Vec::new();
            for i in 0..5u64 {
                let n = task * 100 + i;
                let qmp = qmp.clone();
                calls.push(tokio::spawn(async move {
                    let reply = qmp.execute_raw("x-echo", Some(json!({ "n": n }))).await.unwrap();
                    assert_eq!(reply, json!({ "echo": n }));
                }));
            }
            for call in calls {
                call.await.unwrap();
            }
        }));
    }
    let mut received = Vec::new();
    for _ in 0..20 {
        received.push(peer.expect("x-echo").await);
    }
    let ids: std::collections::HashSet<_> = received.iter().map(|c| c["id"].clone()).collect();
    assert_eq!(ids.len(), 20, "ids are unique");
    // Reply in an order unrelated to the sending order.
    for k in 0..20 {
        let command = &received[(k * 7 + 3) % 20];
        peer.reply(command, json!({ "echo": command["arguments"]["n"] }))
            .await;
    }
    for task in tasks {
        tokio::time::timeout(PROMPT, task)
            .await
            .expect("all replies routed")
            .unwrap();
    }
}

#[tokio::test]
async fn qmp_errors_carry_class_and_description() {
    let (qmp, mut peer) = connected(&[]).await;
    let call = tokio::spawn({
        let qmp = qmp.clone();
        async move {
            qmp.execute_raw("blockdev-del", Some(json!({"node-name": "x"})))
                .await
        }
    });
    let command = peer.expect("blockdev-del").await;
    peer.send(
        json!({"id": command["id"], "error": {"class": "DeviceNotFound", "desc": "Node 'x' not found"}}),
    )
    .await;
    let err = call.await.unwrap().unwrap_err();
    let Error::Qmp { command, class, desc } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(
        (command.as_str(), class, desc.as_str()),
        ("blockdev-del", &ErrorClass::DeviceNotFound, "Node 'x' not found")
    );

    let call = tokio::spawn({
        let qmp = qmp.clone();
        async move { qmp.execute(&Stop).await }
    });
    let command = peer.expect("stop").await;
    peer.send(json!({"id": command["id"], "error": {"class": "FutureClass", "desc": "nope"}}))
        .await;
    let err = call.await.unwrap().unwrap_err();
    assert_eq!(err.class(), Some(&ErrorClass::Unknown("FutureClass".into())));
    assert!(!qmp.is_closed());
}

#[tokio::test]
async fn typed_replies_tolerate_unknown_values_and_report_bad_shapes() {
    let (qmp, mut peer) = connected(&[]).await;
    let call = tokio::spawn({
        let qmp = qmp.clone();
        async move { qmp.execute(&QueryStatus).await }
    });
    let command = peer.expect("query-status").await;
    assert!(
        command.get("arguments").is_none(),
        "unit commands send no arguments: {command}"
    );
    peer.reply(
        &command,
        json!({"running": false, "status": "hibernating", "singlestep": false}),
    )
    .await;
    let status = call.await.unwrap().unwrap();
    assert_eq!(status.status, RunState::Unknown("hibernating".into()));

    let call = tokio::spawn({
        let qmp = qmp.clone();
        async move { qmp.execute(&QueryStatus).await }
    });
    peer.answer("query-status", json!("running")).await;
    let err = call.await.unwrap().unwrap_err();
    assert!(
        matches!(&err, Error::Decode { command, .. } if command == "query-status"),
        "{err:?}"
    );
}

#[tokio::test]
async fn garbage_lines_are_skipped() {
    let (qmp, mut peer) = connected(&[]).await;
    let call = tokio::spawn({
        let qmp = qmp.clone();
        async move { qmp.execute_raw("query-status", None).await }
    });
    let command = peer.expect("query-status").await;
    peer.send_raw(b"this is not json\r\n\r\n\n   \r\n[1, 2, 3]\r\n42\r\n\"str\"\r\nnull\r\n")
        .await;
    peer.send_raw(b"\xff\xfe\x00\x01 binary\r\n{\"unterminated\": \r\n")
        .await;
    peer.send(json!({"return": "no id"})).await;
    peer.send(json!({"return": "unknown id", "id": 987_654})).await;
    peer.send(json!({"return": "string id", "id": "abc"})).await;
    peer.send(json!({"error": {"class": "GenericError", "desc": "JSON parse error"}}))
        .await;
    peer.send(json!({"event": 17, "data": {}})).await;
    peer.send(json!({"something": "else"})).await;
    peer.send(greeting(&["oob"])).await;
    peer.reply(&command, json!({"running": true, "status": "running"}))
        .await;
    let reply = tokio::time::timeout(PROMPT, call)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(reply["status"], "running");
    assert!(!qmp.is_closed());
}

#[tokio::test]
async fn a_closing_peer_fails_pending_commands_at_once_and_ends_streams() {
    let (qmp, mut peer) = connected(&[]).await;
    let mut events = qmp.subscribe(EventFilter::all());
    let call = tokio::spawn({
        let qmp = qmp.clone();
        async move {
            qmp.execute_raw_timeout("query-block", None, Duration::from_secs(60))
                .await
        }
    });
    peer.expect("query-block").await;
    peer.send(json!({"event": "SHUTDOWN", "data": {"guest": false, "reason": "host-qmp-quit"}}))
        .await;
    peer.close();

    let started = Instant::now();
    let err = tokio::time::timeout(PROMPT, call)
        .await
        .expect("failed promptly")
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, Error::Closed { .. }), "{err:?}");
    assert!(err.is_closed());
    assert!(started.elapsed() < PROMPT);

    tokio::time::timeout(PROMPT, qmp.closed())
        .await
        .expect("closed() resolves");
    assert!(qmp.is_closed());
    // Events queued before the close are still delivered, then the stream ends.
    assert_eq!(events.next().await.unwrap().name, "SHUTDOWN");
    assert!(events.next().await.is_none());

    let err = qmp.execute_raw("query-block", None).await.unwrap_err();
    assert!(matches!(err, Error::Closed { .. }), "{err:?}");
    let mut late = qmp.subscribe(EventFilter::all());
    assert!(late.next().await.is_none());
}

#[tokio::test]
async fn a_missing_reply_times_out_and_a_late_one_is_ignored() {
    let (qmp, mut peer) = connected(&[]).await;
    let started = Instant::now();
    let call = tokio::spawn({
        let qmp = qmp.clone();
        async move {
            qmp.execute_raw_timeout("query-jobs", None, Duration::from_millis(300))
                .await
        }
    });
    let command = peer.expect("query-jobs").await;
    let err = call.await.unwrap().unwrap_err();
    assert!(
        matches!(&err, Error::Timeout { what, .. } if what.contains("query-jobs")),
        "{err:?}"
    );
    assert!(started.elapsed() >= Duration::from_millis(300) && started.elapsed() < PROMPT);

    peer.reply(&command, json!([])).await;
    qmp.set_command_timeout(Duration::from_millis(200));
    assert_eq!(qmp.command_timeout(), Duration::from_millis(200));
    let call = tokio::spawn({
        let qmp = qmp.clone();
        async move { qmp.execute_raw("query-jobs", None).await }
    });
    peer.answer("query-jobs", json!([{"late": false}])).await;
    assert_eq!(call.await.unwrap().unwrap(), json!([{"late": false}]));

    let err = qmp.execute_raw("query-jobs", None).await.unwrap_err();
    assert!(err.is_timeout(), "the default timeout applies: {err:?}");
}

#[tokio::test]
async fn an_endless_line_fails_the_connection() {
    let (qmp, mut peer) = connected(&[]).await;
    let call = tokio::spawn({
        let qmp = qmp.clone();
        async move {
            qmp.execute_raw_timeout("query-block", None, Duration::from_secs(60))
                .await
        }
    });
    peer.expect("query-block").await;
    let flood = tokio::spawn(async move {
        let chunk = vec![b'x'; 1 << 20];
        for _ in 0..80 {
            if tokio::time::timeout(PROMPT, peer.write_all_ok(&chunk))
                .await
                .map_or(true, |ok| !ok)
            {
                break;
            }
        }
    });
    let err = tokio::time::timeout(Duration::from_secs(20), call)
        .await
        .expect("fails, not hangs")
        .unwrap()
        .unwrap_err();
    assert!(
        matches!(&err, Error::Protocol(detail) if detail.contains("longer than")),
        "{err:?}"
    );
    assert!(qmp.is_closed());
    flood.abort();
}

#[tokio::test]
async fn dropping_the_last_handle_closes_the_socket() {
    let (qmp, mut peer) = connected(&[]).await;
    let clone = qmp.clone();
    drop(qmp);
    assert!(
        !peer.sees_eof(Duration::from_millis(100)).await,
        "a clone keeps it open"
    );
    drop(clone);
    assert!(peer.sees_eof(PROMPT).await);
}

#[tokio::test]
async fn arguments_that_are_not_objects_are_refused_before_sending() {
    #[derive(serde::Serialize)]
    struct Bad(u32);
    impl qmp::Command for Bad {
        const NAME: &'static str = "x-bad";
        type Response = Value;
    }
    let (qmp, _peer) = connected(&[]).await;
    let err = qmp.execute(&Bad(3)).await.unwrap_err();
    assert!(
        matches!(&err, Error::Protocol(detail) if detail.contains("x-bad")),
        "{err:?}"
    );
}
