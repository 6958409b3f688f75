//! `-v`/`-vv` log to stderr; without them qmpbak is as quiet as before. At `-vv` every QMP command and its reply
//! is in the log, so a failure can be understood from it.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use integration_tests::repo::TestRepo;
use integration_tests::{MIB, TestVm, cli};

#[tokio::test]
async fn verbose_runs_log_each_qmp_command_and_reply_to_stderr_and_quiet_runs_log_nothing() {
    let vm = TestVm::start(&[("disk0", 16 * MIB)]).await;
    let repo = TestRepo::init();
    let socket = vm.socket();
    let socket = socket.to_str().unwrap();

    let quiet = cli::run(&["info", "--socket", socket]).success();
    assert!(quiet.stderr.is_empty(), "{}", quiet.stderr);

    let steps = cli::run(&["-v", "info", "--socket", socket]).success();
    assert!(steps.stderr.contains("qmpbak starts"), "{}", steps.stderr);
    assert!(!steps.stderr.contains("QMP send"), "{}", steps.stderr);
    assert_eq!(steps.stdout, quiet.stdout, "logs never go to stdout");

    let backup = repo
        .run("vm1", &["backup", "--socket", socket, "-vv", "--json"])
        .success();
    let log = &backup.stderr;
    assert!(log.contains("locked the VM"), "{log}");
    for needle in [
        "QMP send",
        "\"execute\":\"transaction\"",
        "QMP return",
        "QMP event",
        "JOB_STATUS_CHANGE",
    ] {
        assert!(log.contains(needle), "no {needle} in the log:\n{log}");
    }
    backup.json();

    // A QMP error is in the log with its class and description.
    let failed = cli::run(&["-vv", "qmp", "--socket", socket, "no-such-command"]);
    assert_eq!(failed.code(), Some(5), "{failed:?}");
    assert!(
        failed.stderr.contains("QMP error") && failed.stderr.contains("CommandNotFound"),
        "{}",
        failed.stderr
    );

    // QMPBAK_LOG overrides -v.
    let filtered = cli::command(&["info", "--socket", socket])
        .env("QMPBAK_LOG", "qmp_wire=debug")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&filtered.stderr);
    assert!(
        stderr.contains("QMP send") && !stderr.contains("qmpbak starts"),
        "{stderr}"
    );
}
