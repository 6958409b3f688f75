//! The QMP client against real QEMU: negotiation, concurrency, a block job with its events, typed errors, and a
//! QEMU that dies while a command waits.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::time::Instant;

use integration_tests::timeouts::{BLOCK_JOB_TIMEOUT, PROMPT_TIMEOUT, QMP_COMMAND_TIMEOUT};
use integration_tests::{MIB, TestVm, image};
use qmp::{ErrorClass, EventFilter, JobStatus};
use serde_json::json;

#[tokio::test]
async fn negotiates_and_reports_its_version() {
    let vm = TestVm::start(&[("disk0", 16 * MIB)]).await;
    let greeting = vm.qmp().greeting().clone();
    let version = vm.qmp().execute_raw("query-version", None).await.unwrap();
    assert_eq!(
        version["qemu"]["major"].as_u64(),
        Some(u64::from(greeting.version.qemu.major))
    );
    assert!(greeting.version.qemu.major >= 7, "QEMU {version}");
}

#[tokio::test]
async fn twenty_concurrent_commands_from_several_tasks() {
    let vm = TestVm::start(&[("disk0", 16 * MIB), ("disk1", 16 * MIB)]).await;
    let mut tasks = Vec::new();
    for i in 0..20 {
        let qmp = vm.qmp().clone();
        tasks.push(tokio::spawn(async move {
            match i % 4 {
                0 => qmp
                    .execute_raw("query-status", None)
                    .await
                    .map(|v| v["status"].clone()),
                1 => qmp
                    .execute_raw("query-block", None)
                    .await
                    .map(|v| json!(v.as_array().map(Vec::len))),
                2 => qmp
                    .execute_raw("query-version", None)
                    .await
                    .map(|v| v["qemu"]["major"].clone()),
                _ => qmp
                    .execute_raw("query-jobs", None)
                    .await
                    .map(|v| json!(v.as_array().map(Vec::len))),
            }
        }));
    }
    for (i, task) in tasks.into_iter().enumerate() {
        let value = task.await.unwrap().unwrap_or_else(|e| panic!("command {i}: {e}"));
        match i % 4 {
            0 => assert_eq!(value, json!("running")),
            1 => assert_eq!(value, json!(2)),
            2 => assert!(value.as_u64().unwrap() >= 7),
            _ => assert_eq!(value, json!(0)),
        }
    }
}

#[tokio::test]
async fn bad_commands_give_typed_errors() {
    let vm = TestVm::start(&[("disk0", 16 * MIB)]).await;
    let err = vm.qmp().execute_raw("no-such-command", None).await.unwrap_err();
    match err {
        qmp::Error::Qmp { class, desc, command } => {
            assert_eq!(class, ErrorClass::CommandNotFound);
            assert_eq!(command, "no-such-command");
            assert!(desc.contains("no-such-command"), "{desc}");
        }
        other => panic!("expected a QMP error, got {other:?}"),
    }
    let err = vm
        .qmp()
        .execute_raw(
            "block-dirty-bitmap-add",
            Some(json!({"node": "nonexistent", "name": "b"})),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            qmp::Error::Qmp {
                class: ErrorClass::GenericError,
                ..
            }
        ),
        "{err:?}"
    );
    // The connection survives errors.
    vm.qmp().execute_raw("query-status", None).await.unwrap();
}

#[tokio::test]
async fn full_backup_job_to_a_blockdev_created_target_equals_the_source() {
    let vm = TestVm::start(&[("disk0", 32 * MIB)]).await;
    vm.write_pattern("disk0", 0x5a, 0, MIB).await;
    vm.write_pattern("disk0", 0xa5, 7 * MIB, 3 * MIB).await;
    let qmp = vm.qmp();
    let target = vm.dir().join("target.qcow2");

    // blockdev-create: the file, then the qcow2 format on it, each a job we wait for.
    let mut create_events = qmp.subscribe(EventFilter::names(&["JOB_STATUS_CHANGE"]));
    qmp.execute_raw(
        "blockdev-create",
        Some(json!({"job-id": "create-file", "options": {"driver": "file", "filename": target, "size": 0}})),
    )
    .await
    .unwrap();
    let outcome = qmp.wait_job("create-file", BLOCK_JOB_TIMEOUT).await.unwrap();
    assert_eq!(outcome.error, None);
    qmp.dismiss_job("create-file").await.unwrap();
    qmp.execute_raw(
        "blockdev-add",
        Some(json!({"driver": "file", "filename": target, "node-name": "tgt-file"})),
    )
    .await
    .unwrap();
    qmp.execute_raw(
        "blockdev-create",
        Some(json!({"job-id": "create-fmt", "options": {"driver": "qcow2", "file": "tgt-file", "size": 32 * MIB}})),
    )
    .await
    .unwrap();
    assert_eq!(
        qmp.wait_job("create-fmt", BLOCK_JOB_TIMEOUT).await.unwrap().error,
        None
    );
    qmp.dismiss_job("create-fmt").await.unwrap();
    // The create jobs' status changes were delivered to an earlier subscriber too.
    let first = create_events.next_timeout(QMP_COMMAND_TIMEOUT).await.unwrap();
    assert_eq!(first.job_id(), Some("create-file"));

    qmp.execute_raw(
        "blockdev-add",
        Some(json!({"driver": "qcow2", "file": "tgt-file", "node-name": "tgt"})),
    )
    .await
    .unwrap();

    let mut events = qmp.subscribe(EventFilter::all().job("backup0"));
    qmp.execute_raw(
        "blockdev-backup",
        Some(
            json!({"job-id": "backup0", "device": "node-disk0", "target": "tgt", "sync": "full",
                    "auto-dismiss": false}),
        ),
    )
    .await
    .unwrap();
    let outcome = qmp.wait_job("backup0", BLOCK_JOB_TIMEOUT).await.unwrap();
    assert_eq!(outcome.status, JobStatus::Concluded);
    assert_eq!(outcome.error, None, "backup failed");
    assert_eq!(outcome.total_progress, 32 * MIB);

    // The job's life as events: created … running … concluded, and BLOCK_JOB_COMPLETED.
    let mut statuses = Vec::new();
    let mut completed = false;
    let deadline = Instant::now() + QMP_COMMAND_TIMEOUT;
    while !(completed && statuses.last().map(String::as_str) == Some("concluded")) {
        let left = deadline.saturating_duration_since(Instant::now());
        let event = events.next_timeout(left).await.expect("backup job events");
        match event.name.as_str() {
            "JOB_STATUS_CHANGE" => statuses.push(event.data["status"].as_str().unwrap().to_owned()),
            "BLOCK_JOB_COMPLETED" => {
                assert!(event.data.get("error").is_none(), "{}", event.data);
                completed = true;
            }
            _ => {}
        }
    }
    assert_eq!(statuses.first().map(String::as_str), Some("created"));
    assert!(statuses.iter().any(|s| s == "running"), "{statuses:?}");
    qmp.dismiss_job("backup0").await.unwrap();
    qmp.execute_raw("blockdev-del", Some(json!({"node-name": "tgt"})))
        .await
        .unwrap();
    qmp.execute_raw("blockdev-del", Some(json!({"node-name": "tgt-file"})))
        .await
        .unwrap();

    vm.qmp().execute_raw("stop", None).await.unwrap();
    image::assert_same(&vm.disk_path("disk0"), &target);
}

#[tokio::test]
async fn a_command_waiting_on_a_killed_qemu_fails_promptly() {
    let mut vm = TestVm::start(&[("disk0", 16 * MIB)]).await;
    let qmp = vm.qmp().clone();
    // A job that never concludes by itself: a backup throttled to a crawl.
    qmp.execute_raw(
        "blockdev-add",
        Some(json!({"driver": "null-co", "node-name": "sink", "size": 16 * MIB})),
    )
    .await
    .unwrap();
    vm.write_pattern("disk0", 0x11, 0, 8 * MIB).await;
    qmp.execute_raw(
        "blockdev-backup",
        Some(
            json!({"job-id": "slow", "device": "node-disk0", "target": "sink", "sync": "full",
                    "speed": 1, "auto-dismiss": false}),
        ),
    )
    .await
    .unwrap();
    let waiter = tokio::spawn({
        let qmp = qmp.clone();
        async move { qmp.wait_job("slow", BLOCK_JOB_TIMEOUT).await }
    });
    let started = Instant::now();
    vm.kill();
    let result = tokio::time::timeout(PROMPT_TIMEOUT, waiter)
        .await
        .expect("wait_job must fail promptly when QEMU dies")
        .unwrap();
    assert!(matches!(result, Err(qmp::Error::Closed { .. })), "{result:?}");
    assert!(started.elapsed() < PROMPT_TIMEOUT);
    // Later commands fail at once too.
    let err = qmp.execute_raw("query-status", None).await.unwrap_err();
    assert!(matches!(err, qmp::Error::Closed { .. }), "{err:?}");
    tokio::time::timeout(PROMPT_TIMEOUT, qmp.closed())
        .await
        .expect("closed() resolves");
}

#[tokio::test]
async fn capabilities_come_from_the_schema() {
    let vm = TestVm::start(&[("disk0", 16 * MIB)]).await;
    let caps = vm.qmp().capabilities().await.unwrap();
    assert!(caps.has_command("blockdev-backup"));
    assert!(caps.has_command("transaction"));
    assert!(!caps.has_command("no-such-command"));
    assert!(caps.has_event("JOB_STATUS_CHANGE"));
    assert!(caps.command_has_arg("blockdev-backup", "bitmap-mode"));
    assert!(caps.blockdev_driver("qcow2"));
    assert!(!caps.blockdev_driver("no-such-driver"));
    // Present in every QEMU we support (7.2 and 10.0).
    assert!(caps.blockdev_reopen);
    assert!(caps.copy_before_write);
    assert!(caps.block_export_add);
    // What the copy-before-write view of a pull or checksum-diff needs (QEMU 7.1+).
    assert!(caps.snapshot_access && caps.cbw_on_error);
}
