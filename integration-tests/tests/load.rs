//! Load: several VMs backed up into one repository at once, and a long run of backups with pruning, with
//! nothing growing in QEMU that should not.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use integration_tests::repo::{BackupReport, TestRepo};
use integration_tests::timeouts::CLI_TIMEOUT;
use integration_tests::{MIB, TestVm, cli, image};
use qmpbak_engine::repo_reports::VmRow;

#[tokio::test]
async fn four_vms_backed_up_at_once_into_one_repository_are_each_exact() {
    let repo = TestRepo::init();
    let refs = tempfile::tempdir().unwrap();
    let mut vms = Vec::new();
    for i in 0..4u8 {
        let vm = TestVm::start(&[("disk0", 16 * MIB)]).await;
        vm.write_pattern("disk0", 0x10 + i, u64::from(i) * MIB, 4 * MIB)
            .await;
        vms.push(vm);
    }
    for round in 0..2u8 {
        let mut children = Vec::new();
        for (i, vm) in vms.iter().enumerate() {
            vm.write_pattern(
                "disk0",
                0x80 + round,
                8 * MIB + u64::from(round) * MIB,
                512 * 1024,
            )
            .await;
            let reference = refs.path().join(format!("vm{i}-{round}.qcow2"));
            vm.capture_reference("disk0", &reference).await;
            let args = repo.backup_args(vm, &format!("vm{i}"), &[]);
            let child = cli::command(&args.iter().map(String::as_str).collect::<Vec<_>>())
                .spawn()
                .unwrap();
            children.push((i, child, reference));
        }
        for (i, child, reference) in children {
            let out: BackupReport = cli::wait(child, CLI_TIMEOUT).success().report();
            let node = out.node.as_str();
            image::assert_same(&reference, &repo.node_file(&format!("vm{i}"), node, "disk0"));
        }
    }
    let listed: Vec<VmRow> = cli::run(&["list", repo.path().to_str().unwrap(), "--json"])
        .success()
        .report();
    assert_eq!(listed.len(), 4);
}

fn qemu_fds(vm: &TestVm) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", vm.pid().unwrap()))
        .unwrap()
        .count()
}

async fn block_nodes(vm: &TestVm) -> usize {
    let nodes = vm
        .qmp()
        .execute_raw("query-named-block-nodes", Some(serde_json::json!({"flat": true})))
        .await;
    nodes.unwrap().as_array().unwrap().len()
}

#[tokio::test]
async fn a_hundred_backups_with_a_prune_every_ten_keep_everything_flat_and_exact() {
    let vm = TestVm::start(&[("disk0", 16 * MIB)]).await;
    let repo = TestRepo::init();
    let refs = tempfile::tempdir().unwrap();
    let repo_arg = repo.path().display().to_string();
    let mut references = Vec::new();
    let mut baseline = None;
    for n in 0..100u64 {
        vm.write_pattern(
            "disk0",
            (n % 200) as u8 + 1,
            (n % 15) * MIB + (n % 7) * 65536,
            65536,
        )
        .await;
        let reference = refs.path().join(format!("ref-{n}.qcow2"));
        vm.capture_reference("disk0", &reference).await;
        let node = repo.backup_report(&vm, "vm1", &[]).node.as_str().to_owned();
        references.push((node, reference));
        if n % 10 == 9 {
            cli::run(&["prune", "--repo", &repo_arg, "--vm", "vm1", "--keep-last", "5"]).success();
            let kept = repo.manifest("vm1");
            references.retain(|(id, _)| kept.nodes.iter().any(|k| k.id.as_str() == id));
            let now = (qemu_fds(&vm), block_nodes(&vm).await);
            let base = *baseline.get_or_insert(now);
            assert_eq!(now.1, base.1, "QEMU block nodes grew after {} backups", n + 1);
            assert!(
                now.0 <= base.0 + 2,
                "QEMU open fds grew from {} to {} after {} backups",
                base.0,
                now.0,
                n + 1
            );
        }
    }
    // The manifest is valid and a sample of what is kept restores exactly.
    let manifest = repo.manifest("vm1");
    assert!(manifest.operations.is_empty());
    assert!(references.len() >= 5, "{references:?}");
    let out = refs.path().join("out");
    for (node, reference) in references.iter().rev().step_by(2) {
        let to = out.join(format!("{node}.qcow2"));
        cli::run(&[
            "restore",
            node,
            "--repo",
            &repo_arg,
            "--vm",
            "vm1",
            "--to",
            to.to_str().unwrap(),
        ])
        .success();
        image::assert_same(reference, &to);
    }
}
