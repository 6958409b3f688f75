//! `qmpbak snapshot` and `qmpbak revert` as a CI pipeline uses them: a `clean` time point, a test that trashes
//! the disks, revert, again and again without restarting QEMU.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use integration_tests::repo::TestRepo;
use integration_tests::{MIB, TestVm, cli, image};

const VM: &str = "ci";

fn args(repo: &TestRepo, vm: &TestVm, cmd: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = cmd.iter().map(|s| (*s).to_owned()).collect();
    a.extend([
        "--socket".into(),
        vm.socket().display().to_string(),
        "--repo".into(),
    ]);
    a.extend([
        repo.path().display().to_string(),
        "--vm".into(),
        VM.into(),
        "--json".into(),
    ]);
    a
}

fn run(a: &[String]) -> serde_json::Value {
    cli::run(&a.iter().map(String::as_str).collect::<Vec<_>>())
        .success()
        .json()
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
    let clean: Vec<_> = ["disk0", "disk1"]
        .iter()
        .map(|d| refs.path().join(format!("clean-{d}.qcow2")))
        .collect();
    for (d, p) in ["disk0", "disk1"].iter().zip(&clean) {
        vm.capture_reference(d, p).await;
    }
    let taken = run(&args(&repo, &vm, &["snapshot", "--tag", "clean"]));
    let clean_id = taken["node"].as_str().unwrap().to_owned();
    assert_eq!(taken["parent"], serde_json::Value::Null);

    for round in 0..10u8 {
        // The test run trashes the disks, and its end state is kept as a time point of its own.
        vm.write_pattern("disk0", 0xe0 + round, 0, 8 * MIB).await;
        vm.write_zeroes("disk1", 0, 4 * MIB).await;
        if round == 3 {
            vm.capture_reference("disk0", &refs.path().join("run3-ref.qcow2"))
                .await;
        }
        let after = run(&args(&repo, &vm, &["snapshot", "--tag", &format!("run{round}")]));
        assert_eq!(
            after["parent"],
            serde_json::json!(clean_id),
            "round {round}: {after}"
        );
        vm.write_pattern("disk1", 0xf0, 0, MIB).await;

        let reverted = run(&args(&repo, &vm, &["revert", "clean"]));
        assert_eq!(reverted["node"], serde_json::json!(clean_id));
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
        let r = run(&args(&repo, &vm, &["snapshot", "--tag", &format!("p{i}")]));
        times.push(r["transaction_ms"].as_f64().unwrap());
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
