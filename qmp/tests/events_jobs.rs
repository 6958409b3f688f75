//! Events and job waiting against a scripted peer.

mod support;

use std::time::{Duration, Instant};

use qmp::commands::Stop;
use qmp::{Error, EventFilter, EventKind, JobStatus, JobType};
use serde_json::json;
use support::connected;

const PROMPT: Duration = Duration::from_secs(2);
const JOB_WAIT: Duration = Duration::from_secs(10);

fn status_change(id: &str, status: &str) -> serde_json::Value {
    json!({"event": "JOB_STATUS_CHANGE", "data": {"id": id, "status": status},
           "timestamp": {"seconds": 1_700_000_000, "microseconds": 42}})
}

fn job(id: &str, status: &str, error: Option<&str>) -> serde_json::Value {
    let mut job = json!({"id": id, "type": "backup", "status": status, "current-progress": 65536,
                         "total-progress": 65536});
    if let Some(error) = error {
        job["error"] = json!(error);
    }
    job
}

#[tokio::test]
async fn an_event_sent_before_the_reply_is_not_lost() {
    let (qmp, mut peer) = connected(&[]).await;
    let mut stops = qmp.subscribe(EventFilter::names(&["STOP"]));
    let call = tokio::spawn({
        let qmp = qmp.clone();
        async move { qmp.execute(&Stop).await }
    });
    let command = peer.expect("stop").await;
    peer.send(json!({"timestamp": {"seconds": 5, "microseconds": 6}, "event": "STOP"}))
        .await;
    peer.reply(&command, json!({})).await;
    call.await.unwrap().unwrap();
    let stop = stops.try_next().expect("queued before the reply was delivered");
    assert_eq!(stop.kind, EventKind::Stop);
    assert_eq!(stop.timestamp, Some((5, 6)));
}

#[tokio::test]
async fn unknown_events_and_values_are_delivered_raw() {
    let (qmp, mut peer) = connected(&[]).await;
    let mut everything = qmp.subscribe(EventFilter::all());
    let mut jobs = qmp.subscribe(EventFilter::names(&["JOB_STATUS_CHANGE"]));
    peer.send(json!({"event": "X_QUANTUM_FLUX", "data": [1, "two"], "timestamp": "garbled"}))
        .await;
    peer.send(json!({"event": "RESUME"})).await;
    peer.send(status_change("j1", "hyperdrive")).await;

    let flux = everything.next_timeout(PROMPT).await.unwrap();
    assert_eq!(flux.kind, EventKind::Unknown("X_QUANTUM_FLUX".into()));
    assert_eq!(flux.data, json!([1, "two"]));
    assert_eq!(flux.timestamp, None);
    let resume = everything.next_timeout(PROMPT).await.unwrap();
    assert_eq!(
        (resume.kind, resume.data),
        (EventKind::Resume, serde_json::Value::Null)
    );
    let change = jobs.next_timeout(PROMPT).await.unwrap();
    assert_eq!(change.job_status(), Some(JobStatus::Unknown("hyperdrive".into())));
    assert_eq!(change.job_id(), Some("j1"));
    assert!(jobs.try_next().is_none(), "the filter kept the others out");

    let err = jobs.next_timeout(Duration::from_millis(50)).await.unwrap_err();
    assert!(err.is_timeout(), "{err:?}");
    assert!(!qmp.is_closed());
}

#[tokio::test]
async fn unread_subscriptions_do_not_delay_replies() {
    let (qmp, mut peer) = connected(&[]).await;
    let _never_read = qmp.subscribe(EventFilter::all());
    let call = tokio::spawn({
        let qmp = qmp.clone();
        async move { qmp.execute_raw("query-status", None).await }
    });
    let command = peer.expect("query-status").await;
    let burst: Vec<u8> = (0..5000)
        .flat_map(|i| format!("{}\r\n", json!({"event": "BLOCK_IO_ERROR", "data": {"n": i}})).into_bytes())
        .collect();
    peer.send_raw(&burst).await;
    peer.reply(&command, json!({"running": true, "status": "running"}))
        .await;
    tokio::time::timeout(PROMPT, call)
        .await
        .expect("reply not held up")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn wait_job_reports_a_job_that_already_concluded() {
    let (qmp, mut peer) = connected(&[]).await;
    let wait = tokio::spawn({
        let qmp = qmp.clone();
        async move { qmp.wait_job("b1", JOB_WAIT).await }
    });
    peer.answer(
        "query-jobs",
        json!([
            job("other", "running", None),
            job("b1", "concluded", Some("ENOSPC"))
        ]),
    )
    .await;
    let outcome = tokio::time::timeout(PROMPT, wait)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(outcome.id, "b1");
    assert_eq!(outcome.job_type, JobType::Backup);
    assert_eq!(outcome.status, JobStatus::Concluded);
    assert_eq!(outcome.error.as_deref(), Some("ENOSPC"));
    assert!(!outcome.succeeded());
}

#[tokio::test]
async fn wait_job_follows_events_until_concluded() {
    let (qmp, mut peer) = connected(&[]).await;
    let wait = tokio::spawn({
        let qmp = qmp.clone();
        async move { qmp.wait_job("b1", JOB_WAIT).await }
    });
    peer.answer("query-jobs", json!([job("b1", "running", None)]))
        .await;
    peer.send(status_change("b2", "concluded")).await;
    peer.send(status_change("b1", "waiting")).await;
    peer.send(status_change("b1", "pending")).await;
    peer.send(status_change("b1", "concluded")).await;
    peer.answer("query-jobs", json!([job("b1", "concluded", None)]))
        .await;
    let outcome = tokio::time::timeout(PROMPT, wait)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(outcome.succeeded(), "{outcome:?}");
    assert_eq!(outcome.total_progress, 65536);
}

#[tokio::test]
async fn wait_job_sees_a_change_that_raced_its_query() {
    // The job concluded and was dismissed between the subscription and query-jobs.
    let (qmp, mut peer) = connected(&[]).await;
    let wait = tokio::spawn({
        let qmp = qmp.clone();
        async move { qmp.wait_job("b1", JOB_WAIT).await }
    });
    let query = peer.expect("query-jobs").await;
    peer.send(status_change("b1", "concluded")).await;
    peer.send(status_change("b1", "null")).await;
    peer.reply(&query, json!([])).await;
    let outcome = tokio::time::timeout(PROMPT, wait)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(outcome.status, JobStatus::Null);
    assert!(!outcome.succeeded());
}

#[tokio::test]
async fn wait_job_for_a_job_qemu_does_not_have() {
    let (qmp, mut peer) = connected(&[]).await;
    let wait = tokio::spawn({
        let qmp = qmp.clone();
        async move { qmp.wait_job("ghost", JOB_WAIT).await }
    });
    peer.answer("query-jobs", json!([job("b1", "running", None)]))
        .await;
    let err = tokio::time::timeout(PROMPT, wait)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert!(
        matches!(&err, Error::JobNotFound { id } if id == "ghost"),
        "{err:?}"
    );
}

#[tokio::test]
async fn wait_job_times_out_naming_the_job() {
    let (qmp, mut peer) = connected(&[]).await;
    let started = Instant::now();
    let wait = tokio::spawn({
        let qmp = qmp.clone();
        async move { qmp.wait_job("slow", Duration::from_millis(300)).await }
    });
    peer.answer("query-jobs", json!([job("slow", "running", None)]))
        .await;
    let err = wait.await.unwrap().unwrap_err();
    assert!(
        matches!(&err, Error::Timeout { what, .. } if what.contains("slow") && what.contains("running")),
        "{err:?}"
    );
    assert!(started.elapsed() < PROMPT);
}

#[tokio::test]
async fn wait_job_fails_when_the_connection_closes() {
    let (qmp, mut peer) = connected(&[]).await;
    let wait = tokio::spawn({
        let qmp = qmp.clone();
        async move { qmp.wait_job("b1", JOB_WAIT).await }
    });
    peer.answer("query-jobs", json!([job("b1", "running", None)]))
        .await;
    peer.close();
    let err = tokio::time::timeout(PROMPT, wait)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert!(err.is_closed(), "{err:?}");
}

#[tokio::test]
async fn wait_job_status_stops_at_the_wanted_state_or_at_the_end() {
    let (qmp, mut peer) = connected(&[]).await;
    let wait = tokio::spawn({
        let qmp = qmp.clone();
        async move { qmp.wait_job_status("b1", &[JobStatus::Pending], JOB_WAIT).await }
    });
    peer.answer("query-jobs", json!([job("b1", "running", None)]))
        .await;
    peer.send(status_change("b1", "waiting")).await;
    peer.send(status_change("b1", "pending")).await;
    let status = tokio::time::timeout(PROMPT, wait)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(status, JobStatus::Pending);

    let wait = tokio::spawn({
        let qmp = qmp.clone();
        async move { qmp.wait_job_status("m1", &[JobStatus::Ready], JOB_WAIT).await }
    });
    peer.answer("query-jobs", json!([job("m1", "running", None)]))
        .await;
    peer.send(status_change("m1", "aborting")).await;
    peer.send(status_change("m1", "concluded")).await;
    let status = tokio::time::timeout(PROMPT, wait)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(status, JobStatus::Concluded, "a failed job ends the wait");
}

#[tokio::test]
async fn dismiss_job_maps_a_missing_job() {
    let (qmp, mut peer) = connected(&[]).await;
    let dismiss = tokio::spawn({
        let qmp = qmp.clone();
        async move { qmp.dismiss_job("b1").await }
    });
    let command = peer.answer("job-dismiss", json!({})).await;
    assert_eq!(command["arguments"], json!({"id": "b1"}));
    dismiss.await.unwrap().unwrap();

    let dismiss = tokio::spawn({
        let qmp = qmp.clone();
        async move { qmp.dismiss_job("ghost").await }
    });
    let command = peer.expect("job-dismiss").await;
    peer.send(json!({"id": command["id"], "error": {"class": "GenericError", "desc": "Job not found"}}))
        .await;
    peer.answer("query-jobs", json!([])).await;
    let err = dismiss.await.unwrap().unwrap_err();
    assert!(
        matches!(&err, Error::JobNotFound { id } if id == "ghost"),
        "{err:?}"
    );
}
