//! A pull across two network namespaces (issue 19) whose network drops, or whose backup host dies, in the
//! middle of the copy. QEMU runs in the "hypervisor" namespace with a TLS monitor and NBD server, qmpbak in the
//! "backup" one; the link is slowed with `tc` so that the copy is still running when it is hit (after a named
//! number of bytes crossed it, never after a sleep). Each run that meets the fault must end within a bound with
//! a clear error, leave no half-written node, and after that `qmpbak cleanup --qmp tls://...` or the next
//! backup removes everything the run made on the hypervisor (exports, NBD server, fleece job and overlay, frozen
//! bitmaps; scratch emptied), and the next incremental is exact (node and restore against a reference).
//! Root and `ip netns` are needed; without them each test says why and skips.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::net::IpAddr;
use std::time::{Duration, Instant};

use integration_tests::cli::{self, Output};
use integration_tests::netns::NetnsPair;
use integration_tests::pki::TestPki;
use integration_tests::repo::{TestRepo, assert_no_leftovers, expected_bitmaps};
use integration_tests::timeouts::{BLOCK_JOB_TIMEOUT, CLI_TIMEOUT};
use integration_tests::{MIB, TestVm, image};

const VM: &str = "web1";
const DISK: &str = "disk0";
/// The hypervisor's sending rate while the copy is to be hit (about 1 MiB/s: a 48 MiB copy lasts ~45 s).
const SLOW_LINK: &str = "8mbit";
/// Bytes the hypervisor must have sent after the pull started before the fault is made: the copy is running.
const COPY_UNDER_WAY: u64 = 6 * MIB;
/// How long a pull may take to give up once the network dropped: qmpbak's TCP liveness bound (30 s, after
/// 10 s idle and keepalive probes every 5 s) for the NBD connection and for the monitor, plus the undo in
/// QEMU failing at once on the closed monitor. Without TCP keepalive and a user timeout, each NBD request
/// waited its 60 s and every QMP command of the undo its 30 s: minutes.
const DROP_FAIL_BOUND: Duration = Duration::from_secs(120);

/// A VM in the hypervisor namespace of a new pair, with a TLS monitor on port 4444; `None` (after saying why)
/// where network namespaces cannot be made.
async fn remote_vm(test: &str) -> Option<(NetnsPair, TestPki, TestVm)> {
    let pair = match NetnsPair::create() {
        Ok(pair) => pair,
        Err(why) => {
            eprintln!("SKIPPED {test}: {why}");
            return None;
        }
    };
    let pki = TestPki::new(&[IpAddr::V4(pair.hv_addr)]);
    let host = pair.hv_addr.to_string();
    let vm = TestVm::builder()
        .disk(DISK, 128 * MIB)
        .netns(&pair.hv)
        .tcp_qmp(&host, 4444, Some(&pki.path("server")))
        .start()
        .await;
    Some((pair, pki, vm))
}

/// `qmpbak COMMAND --qmp tls://HV:4444 --tls-dir CLIENT --repo REPO --vm VM`, plus `extra`.
fn remote_args(
    pair: &NetnsPair,
    pki: &TestPki,
    repo: &TestRepo,
    command: &str,
    extra: &[&str],
) -> Vec<String> {
    let mut args = vec![
        command.to_owned(),
        "--qmp".into(),
        format!("tls://{}:4444", pair.hv_addr),
        "--tls-dir".into(),
        pki.path("client").display().to_string(),
    ];
    args.extend(repo.vm_args(VM, extra));
    args
}

fn backup_args(pair: &NetnsPair, pki: &TestPki, repo: &TestRepo) -> Vec<String> {
    remote_args(pair, pki, repo, "backup", &["--json"])
}

/// Runs qmpbak in the backup namespace to its end.
fn run(pair: &NetnsPair, args: &[String]) -> Output {
    cli::wait(pair.qmpbak(args).spawn().expect("spawn qmpbak"), CLI_TIMEOUT)
}

/// Waits (within [`BLOCK_JOB_TIMEOUT`]) until the hypervisor has sent `bytes` since it had sent `from`.
fn wait_sent(pair: &NetnsPair, from: u64, bytes: u64) {
    let deadline = Instant::now() + BLOCK_JOB_TIMEOUT;
    loop {
        let sent = pair.hv_tx_bytes().unwrap().saturating_sub(from);
        if sent >= bytes {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "only {sent} bytes crossed the link within {BLOCK_JOB_TIMEOUT:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts a pull with the link slowed and returns it once its copy is under way.
fn pull_under_way(pair: &NetnsPair, pki: &TestPki, repo: &TestRepo) -> std::process::Child {
    pair.throttle(Some(SLOW_LINK)).unwrap();
    let from = pair.hv_tx_bytes().unwrap();
    let child = pair
        .qmpbak(&backup_args(pair, pki, repo))
        .spawn()
        .expect("spawn qmpbak");
    wait_sent(pair, from, COPY_UNDER_WAY);
    child
}

/// Nothing of the failed run is left in QEMU: no export, no NBD server, no job, no qmpbak node, only the
/// bitmaps of the current node (the level's bitmap intact), scratch emptied.
async fn assert_hypervisor_clean(vm: &TestVm, repo: &TestRepo, current: &str, full: &str) {
    let exports = vm.qmp().execute_raw("query-block-exports", None).await.unwrap();
    assert_eq!(
        exports.as_array().map(Vec::len),
        Some(0),
        "leftover exports: {exports}"
    );
    // Stopping a server that does not run is refused.
    assert!(
        vm.qmp().execute_raw("nbd-server-stop", None).await.is_err(),
        "an NBD server was left running"
    );
    assert_no_leftovers(vm, &expected_bitmaps(&repo.manifest(VM), current, full)).await;
    vm.assert_scratch_empty(DISK);
}

/// The failed run's node: failed, its partial files gone from the repository.
fn assert_node_failed_and_removed(repo: &TestRepo, full: &str) -> String {
    let manifest = repo.manifest(VM);
    let node = manifest.nodes.last().unwrap();
    assert_ne!(node.id.as_str(), full, "no node was begun");
    assert_eq!(node.state, chain::NodeState::Failed, "{node:?}");
    assert_eq!(manifest.current.as_ref().map(chain::NodeId::as_str), Some(full));
    assert!(
        !repo.node_file(VM, node.id.as_str(), DISK).exists(),
        "the failed node's partial file is left"
    );
    node.id.to_string()
}

/// The next incremental over the network reads every change since the full, and it and its restore equal the
/// reference.
async fn assert_next_incremental_exact(
    pair: &NetnsPair,
    pki: &TestPki,
    repo: &TestRepo,
    vm: &TestVm,
    full: &str,
) {
    vm.write_pattern(DISK, 0x77, 100 * MIB, MIB).await;
    let refs_dir = tempfile::tempdir().unwrap();
    let reference = refs_dir.path().join("ref.qcow2");
    vm.capture_reference(DISK, &reference).await;
    let inc = tokio::task::block_in_place(|| run(pair, &backup_args(pair, pki, repo)))
        .success()
        .json();
    assert_eq!(
        (inc["level"].as_str(), inc["method"].as_str()),
        (Some("incremental"), Some("bitmap")),
        "{inc}"
    );
    assert_eq!(inc["parent"], serde_json::json!(full), "{inc}");
    let id = inc["node"].as_str().unwrap().to_owned();
    image::assert_same(&reference, &repo.node_file(VM, &id, DISK));
    let restored = refs_dir.path().join("restored.qcow2");
    repo.run(VM, &["restore", &id, "--to", restored.to_str().unwrap()])
        .success();
    image::assert_same(&reference, &restored);
    assert!(repo.manifest(VM).operations.is_empty());
    assert_hypervisor_clean(vm, repo, &id, full).await;
}

/// A full, then 48 MiB of changes for the pull that will be hit.
async fn full_then_changes(pair: &NetnsPair, pki: &TestPki, repo: &TestRepo, vm: &TestVm) -> String {
    vm.write_pattern(DISK, 0x11, 0, 8 * MIB).await;
    let full = tokio::task::block_in_place(|| run(pair, &backup_args(pair, pki, repo)))
        .success()
        .json();
    assert_eq!(full["level"], "full", "{full}");
    vm.write_pattern(DISK, 0x22, 16 * MIB, 48 * MIB).await;
    full["node"].as_str().unwrap().to_owned()
}

/// How the network drops.
#[derive(Clone, Copy, PartialEq)]
enum Outage {
    /// Every packet lost between the hosts, both links up (a switch dies).
    Blackhole,
    /// The backup host's link loses its carrier (the hypervisor's end goes down).
    Carrier,
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pull_whose_network_drops_mid_copy_fails_in_bounded_time_and_cleanup_then_finishes_the_undo() {
    network_drop_mid_copy(
        "a_pull_whose_network_drops_mid_copy_fails_in_bounded_time_and_cleanup_then_finishes_the_undo",
        Outage::Blackhole,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pull_whose_link_loses_its_carrier_mid_copy_fails_in_bounded_time_and_cleanup_then_finishes_the_undo()
 {
    network_drop_mid_copy(
        "a_pull_whose_link_loses_its_carrier_mid_copy_fails_in_bounded_time_and_cleanup_then_finishes_the_undo",
        Outage::Carrier,
    )
    .await;
}

async fn network_drop_mid_copy(test: &str, how: Outage) {
    let Some((pair, pki, vm)) = remote_vm(test).await else {
        return;
    };
    let repo = TestRepo::init();
    let full = full_then_changes(&pair, &pki, &repo, &vm).await;

    let child = tokio::task::block_in_place(|| pull_under_way(&pair, &pki, &repo));
    match how {
        Outage::Blackhole => pair.cut(true).unwrap(),
        Outage::Carrier => pair.set_link(false).unwrap(),
    }
    let dropped = Instant::now();
    let out = tokio::task::block_in_place(|| cli::wait(child, CLI_TIMEOUT));
    let took = dropped.elapsed();
    eprintln!(
        "exit {:?} {took:?} after the drop: {}",
        out.code(),
        out.stderr.trim_end()
    );
    assert!(
        took < DROP_FAIL_BOUND,
        "took {took:?} to give up (bound {DROP_FAIL_BOUND:?})"
    );
    assert_eq!(out.code(), Some(5), "{out:?}");
    assert!(out.stderr.contains("connection"), "{}", out.stderr);
    assert!(out.stderr.contains("qmpbak cleanup --qmp"), "{}", out.stderr);
    // Nothing half-written: the node failed, its file removed; the record stays for what is on the hypervisor.
    let failed = assert_node_failed_and_removed(&repo, &full);
    assert_eq!(
        repo.manifest(VM).operations.len(),
        1,
        "the record of the undo in QEMU is gone"
    );

    match how {
        Outage::Blackhole => pair.cut(false).unwrap(),
        Outage::Carrier => {
            pair.set_link(true).unwrap();
            pair.throttle(None).unwrap();
        }
    }
    // QEMU keeps its end of the lost monitor connection until it next writes to it (a listening chardev has
    // no keepalive, and it reads no new client meanwhile): a cleanup now meets a TLS handshake that times out.
    let held = tokio::task::block_in_place(|| run(&pair, &remote_args(&pair, &pki, &repo, "cleanup", &[])));
    assert_eq!(held.code(), Some(5), "{held:?}");
    assert!(
        held.stderr.contains("one monitor client at a time"),
        "{}",
        held.stderr
    );
    // Any event releases it: here a stop and cont through the fixture's own monitor.
    vm.qmp().execute_raw("stop", None).await.unwrap();
    vm.qmp().execute_raw("cont", None).await.unwrap();
    let cleanup =
        tokio::task::block_in_place(|| run(&pair, &remote_args(&pair, &pki, &repo, "cleanup", &[])));
    let cleanup = cleanup.success();
    eprintln!("{}", cleanup.stdout);
    assert!(repo.manifest(VM).operations.is_empty());
    assert_eq!(
        repo.manifest(VM)
            .node(&chain::NodeId::new(&failed).unwrap())
            .map(|n| n.state),
        Some(chain::NodeState::Failed)
    );
    assert_hypervisor_clean(&vm, &repo, &full, &full).await;
    assert_next_incremental_exact(&pair, &pki, &repo, &vm, &full).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backup_host_killed_mid_copy_is_undone_by_the_next_run_which_is_exact() {
    let test = "a_backup_host_killed_mid_copy_is_undone_by_the_next_run_which_is_exact";
    let Some((pair, pki, vm)) = remote_vm(test).await else {
        return;
    };
    let repo = TestRepo::init();
    let full = full_then_changes(&pair, &pki, &repo, &vm).await;

    let mut child = tokio::task::block_in_place(|| pull_under_way(&pair, &pki, &repo));
    // SIGKILL: the backup host's qmpbak dies without a word; QEMU keeps its exports, server, job and bitmaps.
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(9));
    pair.throttle(None).unwrap();
    let exports = vm.qmp().execute_raw("query-block-exports", None).await.unwrap();
    assert_eq!(
        exports.as_array().map(Vec::len),
        Some(1),
        "the export went away: {exports}"
    );
    let manifest = repo.manifest(VM);
    assert_eq!(manifest.operations.len(), 1);
    assert_eq!(manifest.nodes.last().unwrap().state, chain::NodeState::Pending);

    // A fresh run finds all of it by the record, undoes it and makes an exact incremental.
    assert_next_incremental_exact(&pair, &pki, &repo, &vm, &full).await;
    let manifest = repo.manifest(VM);
    let killed = &manifest.nodes[manifest.nodes.len() - 2];
    assert_eq!(killed.state, chain::NodeState::Failed, "{killed:?}");
    assert!(!repo.node_file(VM, killed.id.as_str(), DISK).exists());
}
