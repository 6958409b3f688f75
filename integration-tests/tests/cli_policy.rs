//! A repository's default retention (`init --keep-...`, `qmpbak policy`) is what a plain `qmpbak prune` applies,
//! and `--summary` gives one line for a mail or a monitoring check, on success and on failure.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use integration_tests::repo::TestRepo;
use integration_tests::{MIB, TestVm, cli};
use qmpbak_engine::repo_reports::{InitReport, PolicyReport};

const VM: &str = "vm1";

#[tokio::test]
async fn a_plain_prune_applies_the_repositorys_default_retention_and_refuses_without_one() {
    let vm = TestVm::start(&[("disk0", 16 * MIB)]).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("repo");
    let path_arg = path.to_str().unwrap();
    let init: InitReport = cli::run(&["init", path_arg, "--keep-last", "2", "--keep-tag", "--json"])
        .success()
        .report();
    assert_eq!(init.retention.map(|r| r.keep_last), Some(2), "{init:?}");
    let repo = TestRepo::at(path.clone());
    for i in 0..4u8 {
        vm.write_pattern("disk0", 0x20 + i, u64::from(i) * MIB, MIB).await;
        repo.backup_node(&vm, VM, &[]);
    }

    let shown = cli::run(&["policy", path_arg]).success().stdout;
    assert!(shown.contains("keep-last 2, keep-tag"), "{shown}");

    let line = repo.run(VM, &["prune", "--summary"]).success().stdout;
    assert_eq!(line.lines().count(), 1, "{line}");
    assert!(
        line.starts_with("qmpbak prune vm1: OK removed 2 node(s), freed ")
            && line.contains("(policy keep-last 2, keep-tag, the repository's default)"),
        "{line}"
    );
    assert_eq!(repo.manifest(VM).nodes.len(), 2);

    // Options given on the command line win over the default.
    let plan = repo
        .run(VM, &["prune", "--keep-last", "1", "--dry-run"])
        .success()
        .stdout;
    assert!(plan.starts_with("policy: keep-last 1 (given)"), "{plan}");

    // A policy that keeps nothing is refused as a default.
    let empty = cli::run(&["policy", path_arg, "--keep-last", "0"]);
    assert_eq!(empty.code(), Some(2), "{empty:?}");

    let printed = cli::run(&["policy", path_arg, "--clear", "--json"]).success();
    // The printed shape: the policy report's documented keys, so a renamed field is caught.
    cli::assert_keys(&printed.json(), &["repo", "retention"]);
    let cleared: PolicyReport = printed.report();
    assert!(cleared.retention.is_none(), "{cleared:?}");
    let refused = repo.run(VM, &["prune"]);
    assert_eq!(refused.code(), Some(2), "{refused:?}");
    assert!(refused.stderr.contains("qmpbak policy"), "{}", refused.stderr);
    assert_eq!(
        repo.manifest(VM).nodes.len(),
        2,
        "a refused prune changes nothing"
    );

    let set = cli::run(&["policy", path_arg, "--keep-daily", "7"])
        .success()
        .stdout;
    assert!(set.contains("keep-daily 7"), "{set}");
}

#[tokio::test]
async fn summary_is_one_line_on_success_and_on_failure() {
    let vm = TestVm::start(&[("disk0", 16 * MIB)]).await;
    let repo = TestRepo::init();
    let socket = vm.socket().display().to_string();
    let ok = repo
        .run(VM, &["backup", "--socket", &socket, "--summary"])
        .success()
        .stdout;
    assert_eq!(ok.lines().count(), 1, "{ok}");
    assert!(
        ok.starts_with("qmpbak backup vm1: OK full 0001, 1 disk(s), ") && ok.contains(" stored, "),
        "{ok}"
    );
    let verified = repo.run(VM, &["verify", "--summary"]).success().stdout;
    assert_eq!(verified.trim(), "qmpbak verify vm1: OK 1 node(s) verified");

    let missing = dir_socket(&vm);
    let failed = repo.run(VM, &["backup", "--socket", &missing, "--summary"]);
    assert_eq!(failed.code(), Some(5), "{failed:?}");
    assert_eq!(failed.stdout.lines().count(), 1, "{failed:?}");
    assert!(
        failed.stdout.starts_with("qmpbak backup vm1: FAILED (exit 5): "),
        "{failed:?}"
    );
    assert!(failed.stdout.contains(&missing), "{failed:?}");
}

/// A socket path in the VM's directory where nothing listens.
fn dir_socket(vm: &TestVm) -> String {
    vm.dir().join("nobody.sock").display().to_string()
}
