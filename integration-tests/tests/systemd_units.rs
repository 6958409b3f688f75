//! contrib/systemd: the ExecStart lines of `qmpbak-backup@.service` run as systemd would run them (instance
//! name, the variables of an /etc/qmpbak/VM.conf made from contrib's example), against a real VM: a backup then
//! a prune by the repository's default retention, one summary line each; a failure exits non-zero, which is
//! what starts the OnFailure= unit. systemd itself does not run; `systemd-analyze verify` checks the units'
//! syntax where it is installed.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use integration_tests::cli::{self, Output};
use integration_tests::repo::TestRepo;
use integration_tests::timeouts::CLI_TIMEOUT;
use integration_tests::{MIB, TestVm};

const VM: &str = "vm1";
const INSTALLED_BIN: &str = "/usr/local/bin/qmpbak";

fn contrib(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../contrib/systemd")
        .join(name)
}

fn read(name: &str) -> String {
    std::fs::read_to_string(contrib(name)).unwrap()
}

/// The values of `KEY=VALUE` lines (as systemd's EnvironmentFile= reads them: comments and blank lines skipped).
fn environment(text: &str) -> HashMap<String, String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l.split_once('=').unwrap();
            (k.trim().to_owned(), v.trim().to_owned())
        })
        .collect()
}

/// A unit's `KEY=` values, in order.
fn values<'a>(unit: &'a str, key: &str) -> Vec<&'a str> {
    unit.lines()
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .collect()
}

/// An ExecStart line split into words as systemd does for these lines: `%i` is the instance, `${NAME}` one
/// word, `$NAME` alone as a word splits at whitespace (and vanishes when empty). qmpbak is the binary under test.
fn command_line(line: &str, instance: &str, env: &HashMap<String, String>) -> Vec<String> {
    assert!(
        !line.contains(['"', '\'', '\\']),
        "quoting is not expected here: {line}"
    );
    let mut words = Vec::new();
    for word in line.split_whitespace() {
        let word = word.replace("%i", instance);
        if let Some(name) = word.strip_prefix('$').filter(|n| !n.starts_with('{')) {
            let value = env.get(name).map_or("", String::as_str);
            words.extend(value.split_whitespace().map(str::to_owned));
            continue;
        }
        let mut expanded = word.clone();
        while let Some(start) = expanded.find("${") {
            let end = start + expanded[start..].find('}').unwrap();
            let name = &expanded[start + 2..end];
            let value = env
                .get(name)
                .unwrap_or_else(|| panic!("{name} is not set"))
                .clone();
            expanded.replace_range(start..=end, &value);
        }
        words.push(expanded);
    }
    assert_eq!(words[0], INSTALLED_BIN, "{line}");
    words[0] = cli::qmpbak_bin().display().to_string();
    words
}

/// Runs the service's ExecStart lines in order, stopping at the first that fails, as systemd does for a oneshot.
fn run_service(env: &HashMap<String, String>) -> Vec<Output> {
    let unit = read("qmpbak-backup@.service");
    let mut outputs = Vec::new();
    for line in values(&unit, "ExecStart") {
        let words = command_line(line, VM, env);
        let child = Command::new(&words[0])
            .args(&words[1..])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let out = cli::wait(child, CLI_TIMEOUT);
        let failed = !out.status.success();
        outputs.push(out);
        if failed {
            break;
        }
    }
    outputs
}

/// contrib's example.conf with the socket and repository of this test.
fn conf(socket: &Path, repo: &Path) -> HashMap<String, String> {
    let mut env = environment(&read("example.conf"));
    for key in [
        "QMPBAK_SOCKET",
        "QMPBAK_REPO",
        "QMPBAK_BACKUP_ARGS",
        "QMPBAK_PRUNE_ARGS",
    ] {
        assert!(env.contains_key(key), "example.conf lacks {key}");
    }
    env.insert("QMPBAK_SOCKET".into(), socket.display().to_string());
    env.insert("QMPBAK_REPO".into(), repo.display().to_string());
    env
}

#[tokio::test]
async fn the_backup_service_backs_up_then_prunes_by_the_repository_retention() {
    let vm = TestVm::start(&[("disk0", 16 * MIB), ("disk1", 8 * MIB)]).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("repo");
    cli::run(&["init", path.to_str().unwrap(), "--keep-last", "2"]).success();
    let repo = TestRepo::at(path.clone());
    let mut env = conf(&vm.socket(), &path);

    for round in 0..3u8 {
        vm.write_pattern("disk0", 0x30 + round, u64::from(round) * MIB, MIB)
            .await;
        let outs = run_service(&env);
        assert_eq!(outs.len(), 2);
        for out in &outs {
            assert!(out.status.success(), "{out:?}");
            assert_eq!(out.stdout.lines().count(), 1, "{out:?}");
        }
        assert!(
            outs[0].stdout.starts_with("qmpbak backup vm1: OK "),
            "{:?}",
            outs[0]
        );
        assert!(
            outs[1].stdout.starts_with("qmpbak prune vm1: OK "),
            "{:?}",
            outs[1]
        );
        assert!(
            outs[1].stdout.contains("the repository's default"),
            "{:?}",
            outs[1]
        );
    }
    let manifest = repo.manifest(VM);
    assert_eq!(manifest.nodes.len(), 2, "keep-last 2 after three runs");
    let verified = repo.run(VM, &["verify", "--summary"]).success().stdout;
    assert_eq!(verified.trim(), "qmpbak verify vm1: OK 2 node(s) verified");

    // Extra arguments from the file reach the commands: a full of disk1 only, pruned by a policy of its own.
    env.insert("QMPBAK_BACKUP_ARGS".into(), "--level full --disk disk1".into());
    env.insert("QMPBAK_PRUNE_ARGS".into(), "--keep-last 1".into());
    let outs = run_service(&env);
    assert!(outs.iter().all(|o| o.status.success()), "{outs:?}");
    assert!(
        outs[0].stdout.contains("OK full") && outs[0].stdout.contains("1 disk(s)"),
        "{outs:?}"
    );
    assert!(outs[1].stdout.contains("(policy keep-last 1, given)"), "{outs:?}");

    // A VM that is not running: the backup fails with its line, the prune does not run, and the non-zero exit
    // is what starts OnFailure=.
    env.insert(
        "QMPBAK_SOCKET".into(),
        vm.dir().join("gone.sock").display().to_string(),
    );
    let outs = run_service(&env);
    assert_eq!(outs.len(), 1, "{outs:?}");
    assert_eq!(outs[0].code(), Some(5), "{outs:?}");
    assert!(
        outs[0].stdout.starts_with("qmpbak backup vm1: FAILED (exit 5): "),
        "{outs:?}"
    );
}

#[test]
fn the_units_name_each_other_and_pass_systemd_analyze() {
    let service = read("qmpbak-backup@.service");
    assert_eq!(values(&service, "OnFailure"), ["qmpbak-failure@%N.service"]);
    assert_eq!(values(&service, "EnvironmentFile"), ["/etc/qmpbak/%i.conf"]);
    assert_eq!(
        values(&service, "Type"),
        ["oneshot"],
        "several ExecStart= lines need a oneshot"
    );
    assert!(contrib("qmpbak-failure@.service").exists());
    assert!(!values(&read("qmpbak-backup@.timer"), "OnCalendar").is_empty());

    if Command::new("systemd-analyze").arg("--version").output().is_err() {
        eprintln!("systemd-analyze is not installed: the units' syntax is not checked");
        return;
    }
    // Verified as installed: under their instance names, with the binary under test in place of the installed one.
    let dir = tempfile::tempdir().unwrap();
    let bin = cli::qmpbak_bin().display().to_string();
    let mut files = Vec::new();
    for (name, installed) in [
        ("qmpbak-backup@.service", "qmpbak-backup@vm1.service"),
        ("qmpbak-backup@.timer", "qmpbak-backup@vm1.timer"),
        (
            "qmpbak-failure@.service",
            "qmpbak-failure@qmpbak-backup@vm1.service",
        ),
    ] {
        let path = dir.path().join(installed);
        std::fs::write(&path, read(name).replace(INSTALLED_BIN, &bin)).unwrap();
        files.push(path);
    }
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(&files)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {stderr}"
    );
}
