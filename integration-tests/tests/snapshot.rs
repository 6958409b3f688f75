//! `qmpbak snapshot` and `qmpbak revert` as a CI pipeline uses them: a `clean` time point, a test that trashes
//! the disks, revert, again and again without restarting QEMU.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use integration_tests::repo::TestRepo;
use integration_tests::timeouts::CLI_CRASH_TIMEOUT;
use integration_tests::{MIB, TestVm, cli, image};
use qmpbak_engine::cleanup::CleanupReport;
use qmpbak_engine::commit::CommitReport;
use qmpbak_engine::snapshot::{RevertReport, SnapshotReport};

const VM: &str = "ci";

fn args(repo: &TestRepo, vm: &TestVm, cmd: &[&str]) -> Vec<String> {
    repo.socket_args(&vm.socket(), VM, cmd)
}

/// Runs a successful `qmpbak ... --json` whose report the caller does not read (it is JSON all the same).
fn run(a: &[String]) {
    cli::run_owned(a).success().json();
}

fn snapshot(a: &[String]) -> SnapshotReport {
    cli::run_owned(a).success().report()
}

/// Runs `qmpbak commit NODE` killed right after its first disk's commit; its record is left behind.
fn commit_killed_after_one_disk(repo: &TestRepo, vm: &TestVm, node: &str) {
    cli::run_crashing_at(
        &args(repo, vm, &["commit", node]),
        "commit-disk-done",
        CLI_CRASH_TIMEOUT,
    )
    .assert_crashed_at("commit-disk-done");
    assert_eq!(repo.manifest(VM).operations.len(), 1);
}

async fn depth(vm: &TestVm, id: &str) -> u64 {
    let blocks = vm.qmp().execute_raw("query-block", None).await.unwrap();
    let qdev = format!("/machine/peripheral/{id}/");
    let b = blocks
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["qdev"].as_str().unwrap_or("").starts_with(&qdev))
        .unwrap();
    b["inserted"]["backing_file_depth"].as_u64().unwrap()
}

#[tokio::test]
async fn snapshot_trash_revert_ten_times_without_restarting_qemu() {
    let vm = TestVm::start(&[("disk0", 32 * MIB), ("disk1", 16 * MIB)]).await;
    let repo = TestRepo::init();
    let refs = tempfile::tempdir().unwrap();
    vm.write_pattern("disk0", 0x11, 0, 4 * MIB).await;
    vm.write_pattern("disk1", 0x22, MIB, MIB).await;
    let clean = vm
        .capture_references(&["disk0", "disk1"], refs.path(), "clean")
        .await;
    let printed = cli::run_owned(&args(&repo, &vm, &["snapshot", "--tag", "clean"])).success();
    // The printed shape: the snapshot report's documented keys (and a disk's), so a renamed field is caught.
    let raw = printed.json();
    cli::assert_keys(
        &raw,
        &[
            "vm",
            "node",
            "parent",
            "disks",
            "transaction_ms",
            "copied",
            "duration_secs",
        ],
    );
    cli::assert_keys(&raw["disks"][0], &["disk", "frozen", "overlay"]);
    let taken: SnapshotReport = printed.report();
    let clean_id = taken.node.clone();
    assert_eq!(taken.parent, None);

    for round in 0..10u8 {
        // The test run trashes the disks, and its end state is kept as a time point of its own.
        vm.write_pattern("disk0", 0xe0 + round, 0, 8 * MIB).await;
        vm.write_zeroes("disk1", 0, 4 * MIB).await;
        if round == 3 {
            vm.capture_reference("disk0", &refs.path().join("run3-ref.qcow2"))
                .await;
        }
        let after = snapshot(&args(&repo, &vm, &["snapshot", "--tag", &format!("run{round}")]));
        assert_eq!(after.parent.as_ref(), Some(&clean_id), "round {round}: {after:?}");
        vm.write_pattern("disk1", 0xf0, 0, MIB).await;

        let printed = cli::run_owned(&args(&repo, &vm, &["revert", "clean"])).success();
        if round == 0 {
            // The printed shape: the revert report's documented keys (and a disk's), so a renamed field is
            // caught.
            let raw = printed.json();
            cli::assert_keys(&raw, &["vm", "node", "disks", "duration_secs"]);
            cli::assert_keys(&raw["disks"][0], &["disk", "frozen", "overlay"]);
        }
        let reverted: RevertReport = printed.report();
        assert_eq!(reverted.node, clean_id);
        assert!(vm.running().await, "round {round}: the VM runs on");
        for (d, reference) in ["disk0", "disk1"].iter().zip(&clean) {
            let now = refs.path().join(format!("now-{round}-{d}.qcow2"));
            vm.capture_reference(d, &now).await;
            image::assert_same(reference, &now);
            assert_eq!(
                depth(&vm, d).await,
                1,
                "round {round}: the live chain does not grow"
            );
        }
    }
    // The tree: `clean` with ten branches, one per test run; `clean` is current.
    let manifest = repo.manifest(VM);
    let clean_node: chain::NodeId = clean_id.parse().unwrap();
    assert_eq!(manifest.children(&clean_node).unwrap().len(), 10);
    assert_eq!(manifest.current.as_ref(), Some(&clean_node));
    assert!(manifest.operations.is_empty());
    // Each run's end state is still there, as frozen files, and revert goes there too.
    run(&args(&repo, &vm, &["revert", "run3"]));
    let now = refs.path().join("run3.qcow2");
    vm.capture_reference("disk0", &now).await;
    image::assert_same(&refs.path().join("run3-ref.qcow2"), &now);
}

/// Median of three snapshot transaction times on a VM whose one disk has `size` bytes with `data` written.
async fn snapshot_ms(size: u64, data: u64) -> f64 {
    let vm = TestVm::start(&[("disk0", size)]).await;
    let repo = TestRepo::init();
    let mut off = 0;
    while off < data {
        vm.write_pattern("disk0", 0x5a, off, 8 * MIB).await;
        off += size / (data / (8 * MIB));
    }
    let mut times = Vec::new();
    for i in 0..3 {
        let r = snapshot(&args(&repo, &vm, &["snapshot", "--tag", &format!("p{i}")]));
        times.push(r.transaction_ms);
    }
    times.sort_by(f64::total_cmp);
    times[1]
}

#[tokio::test]
async fn taking_a_time_point_does_not_grow_with_the_disk() {
    let small = snapshot_ms(1 << 30, 64 * MIB).await;
    let large = snapshot_ms(8 << 30, 512 * MIB).await;
    // Loose: an 8x larger disk with 8x the data must not take anywhere near 8x as long.
    assert!(
        large < small * 3.0 + 20.0,
        "1 GiB: {small:.1} ms, 8 GiB: {large:.1} ms"
    );
}

#[tokio::test]
async fn commit_of_the_middle_of_a_chain_keeps_every_remaining_point_exact() {
    let vm = TestVm::start(&[("disk0", 32 * MIB)]).await;
    let repo = TestRepo::init();
    let refs = tempfile::tempdir().unwrap();
    let mut points = Vec::new();
    for (i, tag) in ["a", "b", "c", "d"].iter().enumerate() {
        vm.write_pattern("disk0", 0x10 * (i as u8 + 1), i as u64 * 2 * MIB, 3 * MIB)
            .await;
        let reference = refs.path().join(format!("{tag}.qcow2"));
        vm.capture_reference("disk0", &reference).await;
        let r = snapshot(&args(&repo, &vm, &["snapshot", "--tag", tag]));
        points.push((tag.to_string(), r.node.clone(), reference));
    }
    vm.write_pattern("disk0", 0x99, MIB, MIB).await;
    let live = refs.path().join("live.qcow2");
    vm.capture_reference("disk0", &live).await;
    assert_eq!(depth(&vm, "disk0").await, 4);

    // Commit `c` into `b`: `b` leaves the tree, `c` lives on in b's file, the live chain is one shorter.
    let printed = cli::run_owned(&args(&repo, &vm, &["commit", "c"])).success();
    // The printed shape: the commit report's documented keys, so a renamed field is caught.
    cli::assert_keys(
        &printed.json(),
        &["vm", "node", "removed", "removed_tag", "duration_secs"],
    );
    let report: CommitReport = printed.report();
    assert_eq!(report.removed, points[1].1, "{report:?}");
    assert_eq!(report.removed_tag.as_deref(), Some("b"));
    assert_eq!(depth(&vm, "disk0").await, 3);
    let now = refs.path().join("after-commit.qcow2");
    vm.capture_reference("disk0", &now).await;
    image::assert_same(&live, &now);
    let manifest = repo.manifest(VM);
    assert!(manifest.find("b").is_none());
    let c = manifest.find("c").unwrap();
    assert_eq!(
        c.parent.as_ref().map(ToString::to_string),
        Some(points[0].1.clone())
    );
    assert!(manifest.operations.is_empty());

    // Every remaining time point is exact.
    for (tag, _, reference) in [&points[3], &points[0], &points[2]] {
        run(&args(&repo, &vm, &["revert", tag]));
        let now = refs.path().join(format!("now-{tag}.qcow2"));
        vm.capture_reference("disk0", &now).await;
        image::assert_same(reference, &now);
    }
    let gone = cli::run_owned(&args(&repo, &vm, &["revert", "b"]));
    assert_eq!(gone.code(), Some(2), "{gone:?}");
}

#[tokio::test]
async fn copied_time_points_survive_in_the_repository_and_restore_exactly() {
    let vm = TestVm::start(&[("disk0", 32 * MIB), ("disk1", 16 * MIB)]).await;
    let repo = TestRepo::init();
    let refs = tempfile::tempdir().unwrap();
    let mut points = Vec::new();
    for i in 0..3u8 {
        vm.write_pattern("disk0", 0x40 + i, u64::from(i) * 4 * MIB, 2 * MIB)
            .await;
        vm.write_pattern("disk1", 0x50 + i, u64::from(i) * MIB, 512 * 1024)
            .await;
        let r = vm
            .capture_references(&["disk0", "disk1"], refs.path(), &format!("p{i}"))
            .await;
        let taken = snapshot(&args(&repo, &vm, &["snapshot", "--copy"]));
        assert!(taken.copied, "{taken:?}");
        points.push((taken.node.clone(), r));
    }
    // Later copies hold only their increment.
    let stored = integration_tests::image::allocated_data_bytes(&repo.node_file(VM, &points[2].0, "disk0"));
    assert!(stored <= 2 * MIB, "{stored}");
    let out = refs.path().join("out");
    for (node, r) in &points {
        let dir = out.join(node);
        repo.run(VM, &["restore", node, "--to", dir.to_str().unwrap()])
            .success();
        for (d, reference) in ["disk0", "disk1"].iter().zip(r) {
            image::assert_same(reference, &dir.join(format!("{d}.qcow2")));
        }
    }
    repo.run(VM, &["verify"]).success();
}

#[tokio::test]
async fn a_commit_killed_midway_is_finished_from_its_record() {
    let vm = TestVm::start(&[("disk0", 16 * MIB)]).await;
    let repo = TestRepo::init();
    let refs = tempfile::tempdir().unwrap();
    for (i, tag) in ["a", "b", "c"].iter().enumerate() {
        vm.write_pattern("disk0", 0x21 + i as u8, i as u64 * MIB, 2 * MIB)
            .await;
        run(&args(&repo, &vm, &["snapshot", "--tag", tag]));
    }
    let c_ref = refs.path().join("c.qcow2");
    commit_killed_after_one_disk(&repo, &vm, "c");
    assert!(vm.running().await);

    // The next command finds the record, sees the commit happened in QEMU, and brings the manifest up to date.
    let cleaned: CleanupReport = cli::run_owned(&args(&repo, &vm, &["cleanup"])).success().report();
    assert_eq!(cleaned.cleaned.operations.len(), 1, "{cleaned:?}");
    let manifest = repo.manifest(VM);
    assert!(manifest.operations.is_empty());
    assert!(manifest.find("b").is_none(), "b was absorbed");
    run(&args(&repo, &vm, &["revert", "c"]));
    vm.capture_reference("disk0", &c_ref).await;
    // a: 0x21 at 0..2M, b: 0x22 at 1..3M, c: 0x23 at 2..4M: the last writer wins.
    let view = c_ref.to_str().unwrap();
    for (pattern, off) in [(0x21u8, 0), (0x22, MIB), (0x23, 2 * MIB), (0x23, 3 * MIB)] {
        let st = std::process::Command::new("qemu-io")
            .args([
                "-f",
                "qcow2",
                "-r",
                "-c",
                &format!("read -P 0x{pattern:02x} {off} {MIB}"),
                view,
            ])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&st.stdout);
        assert!(
            !text.contains("verification failed"),
            "pattern 0x{pattern:02x} at {off}: {text}"
        );
    }
}

#[tokio::test]
async fn a_commit_killed_between_two_disks_is_finished_not_abandoned() {
    let vm = TestVm::start(&[("disk0", 16 * MIB), ("disk1", 8 * MIB)]).await;
    let repo = TestRepo::init();
    let refs = tempfile::tempdir().unwrap();
    for (i, tag) in ["a", "b", "c"].iter().enumerate() {
        let i = i as u8;
        vm.write_pattern("disk0", 0x21 + i, u64::from(i) * MIB, 2 * MIB)
            .await;
        vm.write_pattern("disk1", 0x41 + i, u64::from(i) * MIB, MIB).await;
        run(&args(&repo, &vm, &["snapshot", "--tag", tag]));
    }
    let at_c = vm.capture_references(&["disk0", "disk1"], refs.path(), "c").await;
    // disk0's increment is in b's file now, disk1's is not.
    commit_killed_after_one_disk(&repo, &vm, "c");

    // A commit cannot be undone: cleanup commits disk1 too and brings the manifest up to date.
    let cleaned: CleanupReport = cli::run_owned(&args(&repo, &vm, &["cleanup"])).success().report();
    assert_eq!(cleaned.cleaned.operations.len(), 1, "{cleaned:?}");
    let manifest = repo.manifest(VM);
    assert!(manifest.operations.is_empty());
    assert!(manifest.find("b").is_none(), "b was absorbed");
    assert_eq!(depth(&vm, "disk0").await, depth(&vm, "disk1").await);
    vm.write_pattern("disk0", 0x99, 0, 4 * MIB).await;
    vm.write_pattern("disk1", 0x99, 0, 4 * MIB).await;
    run(&args(&repo, &vm, &["revert", "c"]));
    let now = vm
        .capture_references(&["disk0", "disk1"], refs.path(), "reverted")
        .await;
    for (expected, got) in at_c.iter().zip(&now) {
        image::assert_same(expected, got);
    }
}

#[tokio::test]
async fn a_copied_time_point_still_restores_exactly_after_its_parent_was_committed_away() {
    let vm = TestVm::start(&[("disk0", 16 * MIB)]).await;
    let repo = TestRepo::init();
    let refs = tempfile::tempdir().unwrap();
    let mut points = Vec::new();
    for (i, tag) in ["a", "b", "c"].iter().enumerate() {
        vm.write_pattern("disk0", 0x31 + i as u8, i as u64 * 2 * MIB, 3 * MIB)
            .await;
        let reference = refs.path().join(format!("{tag}.qcow2"));
        vm.capture_reference("disk0", &reference).await;
        let r = snapshot(&args(&repo, &vm, &["snapshot", "--copy", "--tag", tag]));
        points.push((r.node.clone(), reference));
    }
    // c's copy holds its increment over b's copy; b leaves the tree.
    run(&args(&repo, &vm, &["commit", "c"]));
    assert!(!repo.vm_dir(VM).join(&points[1].0).exists(), "b's copies stayed");
    let out = refs.path().join("out");
    std::fs::create_dir(&out).unwrap();
    for (node, reference) in [&points[0], &points[2]] {
        let to = out.join(format!("{node}.qcow2"));
        repo.run(VM, &["restore", node, "--to", to.to_str().unwrap()])
            .success();
        image::assert_same(reference, &to);
    }
    repo.run(VM, &["verify"]).success();
}

/// A `snapshot --copy` stopped (SIGINT) or killed (SIGKILL) while it copies: the time point is taken and stays
/// usable (revert works), and no partial copy stays in the repository. Before, one record covered both: the
/// time point was marked failed (revert and commit refused it) and the partial copy stayed for good.
#[tokio::test]
async fn a_stopped_or_killed_copy_costs_the_copy_only() {
    let vm = TestVm::start(&[("disk0", 32 * MIB)]).await;
    let repo = TestRepo::init();
    let refs = tempfile::tempdir().unwrap();
    for (i, signal) in [
        nix::sys::signal::Signal::SIGINT,
        nix::sys::signal::Signal::SIGKILL,
    ]
    .into_iter()
    .enumerate()
    {
        vm.write_pattern("disk0", 0x60 + i as u8, 0, 2 * MIB).await;
        let reference = refs.path().join(format!("at-{signal}.qcow2"));
        vm.capture_reference("disk0", &reference).await;
        let paused = cli::run_paused_at(
            &args(&repo, &vm, &["snapshot", "--copy"]),
            "snapshot-copying",
            &[],
            None,
        );
        paused.signal(signal);
        let out = paused.finish();
        if signal == nix::sys::signal::Signal::SIGINT {
            assert_eq!(out.code(), Some(130), "{out:?}");
            assert!(out.stderr.contains("only its copy"), "{out:?}");
        } else {
            run(&args(&repo, &vm, &["cleanup"]));
        }
        let manifest = repo.manifest(VM);
        assert!(manifest.operations.is_empty(), "{:?}", manifest.operations);
        let node = manifest.nodes.last().unwrap().clone();
        assert_eq!(node.state, chain::NodeState::Complete, "{signal}: {node:?}");
        assert!(node.disks.iter().all(|d| d.table.is_none()), "{node:?}");
        assert!(
            !repo.vm_dir(VM).join(node.id.as_str()).exists(),
            "{signal}: a partial copy stays"
        );
        vm.write_pattern("disk0", 0x7f, 0, 4 * MIB).await;
        let reverted: RevertReport = cli::run_owned(&args(&repo, &vm, &["revert", node.id.as_str()]))
            .success()
            .report();
        assert_eq!(reverted.node, node.id.as_str(), "{reverted:?}");
        let now = refs.path().join(format!("reverted-{signal}.qcow2"));
        vm.capture_reference("disk0", &now).await;
        image::assert_same(&reference, &now);
    }
}

/// SIGTERM (or SIGINT, SIGHUP) to a `commit`: its block jobs cannot be undone halfway, so it finishes first and
/// then exits 130, saying so; nothing is left for the next command. It used to die of the signal (exit 143)
/// with its record left behind.
#[tokio::test]
async fn a_commit_given_a_signal_finishes_first_and_exits_130() {
    let vm = TestVm::start(&[("disk0", 32 * MIB)]).await;
    let repo = TestRepo::init();
    let refs = tempfile::tempdir().unwrap();
    for (i, tag) in ["a", "b"].iter().enumerate() {
        vm.write_pattern("disk0", 0x21 + i as u8, i as u64 * MIB, 2 * MIB)
            .await;
        snapshot(&args(&repo, &vm, &["snapshot", "--tag", tag]));
    }
    let live = refs.path().join("live.qcow2");
    vm.capture_reference("disk0", &live).await;
    let paused = cli::run_paused_at(&args(&repo, &vm, &["commit", "b"]), "commit-disk", &[], None);
    paused.signal(nix::sys::signal::Signal::SIGTERM);
    paused.signal(nix::sys::signal::Signal::SIGUSR1);
    let out = paused.finish();
    assert_eq!(out.code(), Some(130), "{out:?}");
    assert!(out.stderr.contains("was finished first"), "{out:?}");
    let manifest = repo.manifest(VM);
    assert!(manifest.operations.is_empty(), "{:?}", manifest.operations);
    assert!(manifest.find("a").is_none(), "a was not committed away");
    let now = refs.path().join("now.qcow2");
    vm.capture_reference("disk0", &now).await;
    image::assert_same(&live, &now);
}
