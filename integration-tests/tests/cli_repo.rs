//! `qmpbak init`, `list` and `show`: the read-only view of a repository, for people and for scripts.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use integration_tests::repo::TestRepo;
use integration_tests::{MIB, TestVm, cli};
use qmpbak_engine::repo_reports::{InitReport, ShowReport, TreeReport, VmRow};
use qmpbak_engine::verify::VerifyReport;

#[test]
fn init_refuses_an_existing_repository_and_a_non_empty_directory() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("r");
    let out = cli::run(&["init", repo.to_str().unwrap(), "--json"]).success();
    // The printed shape: the init report's documented keys, so a renamed field is caught.
    cli::assert_keys(
        &out.json(),
        &["repo", "block_size", "full_every", "retention", "encrypted"],
    );
    let out: InitReport = out.report();
    assert_eq!(out.block_size, 1 << 20);
    let again = cli::run(&["init", repo.to_str().unwrap()]);
    assert_eq!(again.code(), Some(3), "{again:?}");
    assert!(again.stderr.contains(repo.to_str().unwrap()), "{}", again.stderr);
    let busy = dir.path().join("busy");
    std::fs::create_dir(&busy).unwrap();
    std::fs::write(busy.join("file"), b"x").unwrap();
    let out = cli::run(&["init", busy.to_str().unwrap()]);
    assert_eq!(out.code(), Some(3), "{out:?}");
    assert!(out.stderr.contains("not empty"), "{}", out.stderr);

    let listed = cli::run(&["list", repo.to_str().unwrap()]).success().stdout;
    assert!(listed.contains("no VMs"), "{listed}");
    let missing = cli::run(&["list", repo.join("nope").to_str().unwrap()]);
    assert_eq!(missing.code(), Some(2), "{missing:?}");
}

#[tokio::test]
async fn list_draws_the_tree_and_show_gives_the_recovery_chain() {
    let vm = TestVm::start(&[("disk0", 16 * MIB)]).await;
    let repo = TestRepo::init();
    let mut ids = Vec::new();
    for (i, tag) in ["base", "", ""].iter().enumerate() {
        vm.write_pattern("disk0", 0x10 + i as u8, i as u64 * MIB, MIB)
            .await;
        let extra: Vec<&str> = if tag.is_empty() {
            vec![]
        } else {
            vec!["--tag", tag]
        };
        ids.push(repo.backup_node(&vm, "vm1", &extra));
    }
    let vm_dir = repo.vm_dir("vm1");

    let text = cli::run(&["list", vm_dir.to_str().unwrap()]).success().stdout;
    assert!(text.starts_with("vm1: 3 nodes, current 0003"), "{text}");
    assert!(text.contains("0001  full") && text.contains("tag base"), "{text}");
    // A straight chain is drawn straight: only branches indent.
    assert!(
        text.contains("\n0002  incremental") && text.contains("\n0003  incremental"),
        "{text}"
    );
    assert!(text.contains("<- current"), "{text}");

    let printed = cli::run(&["list", vm_dir.to_str().unwrap(), "--json"]).success();
    // The printed shapes of list (of a VM, of a repository) and show: their documented keys, so a renamed
    // field is caught.
    cli::assert_keys(&printed.json(), &["vm", "chain_id", "current", "nodes"]);
    let json: TreeReport = printed.report();
    assert_eq!(json.current.map(|c| c.to_string()).as_deref(), Some("0003"));
    let nodes = &json.nodes;
    assert_eq!(nodes.len(), 3);
    assert_eq!((nodes[0].lid, nodes[0].tid), (1, 3));
    assert_eq!(
        nodes[2].parent.as_ref().map(ToString::to_string).as_deref(),
        Some("0002")
    );

    let printed = cli::run(&["list", repo.path().to_str().unwrap(), "--json"]).success();
    cli::assert_keys(&printed.json()[0], &["vm", "nodes", "current", "last_backup"]);
    let vms: Vec<VmRow> = printed.report();
    assert_eq!(vms[0].vm, "vm1");
    assert_eq!(vms[0].nodes, 3);

    let printed = repo.run("vm1", &["show", "0003", "--json"]).success();
    cli::assert_keys(&printed.json(), &["node", "current", "recovery_chain"]);
    let show: ShowReport = printed.report();
    assert_eq!(show.recovery_chain, ["0001", "0002", "0003"]);
    assert!(show.current);
    let by_tag = repo.run("vm1", &["show", "base"]).success().stdout;
    assert!(
        by_tag.contains("0001") && by_tag.contains("recovery chain: 0001"),
        "{by_tag}"
    );
    let miss = repo.run("vm1", &["show", "bsae"]);
    assert_eq!(miss.code(), Some(2), "{miss:?}");
    assert!(
        miss.stderr.contains("did you mean") && miss.stderr.contains("base"),
        "{}",
        miss.stderr
    );
}

#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    let repo = TestRepo::init();
    // A chain with a branch off the full every 10 nodes.
    repo.synthetic_vm("vm1", 50, |i| match i {
        0 => None,
        i if i % 10 == 0 => Some(0),
        i => Some(i - 1),
    });
    let vm_dir = repo.vm_dir("vm1");
    let vm_dir = vm_dir.to_str().unwrap();
    let repo_path = repo.path();
    let runs: [&[&str]; 4] = [
        &["list", vm_dir],
        &["list", vm_dir, "--json"],
        &["list", repo_path.to_str().unwrap()],
        &[
            "show",
            "0003",
            "--repo",
            repo_path.to_str().unwrap(),
            "--vm",
            "vm1",
        ],
    ];
    for args in runs {
        let out = cli::run_with_stdout_closed(args);
        // 141 = 128 + SIGPIPE, what a shell reports for a pipeline stage whose reader went away.
        assert_eq!(out.code(), Some(141), "{args:?}: {out:?}");
        assert!(out.stderr.is_empty(), "{args:?}: {}", out.stderr);
    }
}

/// A straight chain: every node the child of the one before.
fn straight(i: usize) -> Option<usize> {
    i.checked_sub(1)
}

/// A comb: a spine of nodes each with a leaf beside the next spine node, so that every level branches.
fn comb(i: usize) -> Option<usize> {
    match i {
        0 => None,
        i if i % 2 == 0 => Some(i - 2),
        i => Some(i - 1),
    }
}

#[test]
fn list_of_a_deep_chain_stays_small() {
    const NODES: usize = 10_000;
    let repo = TestRepo::init();
    repo.synthetic_vm("straight", NODES, straight);
    repo.synthetic_vm("comb", NODES, comb);
    for vm in ["straight", "comb"] {
        let dir = repo.vm_dir(vm);
        let out = cli::run(&["list", dir.to_str().unwrap()]).success().stdout;
        assert_eq!(out.lines().count(), NODES + 1, "{vm}");
        // About 100 bytes a node line; the drawing in front of it must not grow with the depth.
        assert!(out.len() < NODES * 250, "{vm}: {} bytes", out.len());
        let widest = out.lines().map(|l| l.chars().count()).max().unwrap();
        assert!(widest < 250, "{vm}: a line of {widest} characters");
    }
    let text = cli::run(&["list", repo.vm_dir("comb").to_str().unwrap()])
        .success()
        .stdout;
    // The last spine node is 4999 branches deep.
    assert!(
        text.contains("(depth 4999) ") && !text.contains("(depth 5000)"),
        "the deepest branch says how deep it is"
    );
}

/// How long `qmpbak verify --json` takes on a repository whose VM has a synthetic chain of `nodes` nodes
/// (none has files, so every node is reported damaged and every restore broken: the report's bookkeeping
/// is all there is to time).
fn verify_time(nodes: usize) -> std::time::Duration {
    let repo = TestRepo::init();
    repo.synthetic_vm("vm1", nodes, straight);
    let started = std::time::Instant::now();
    let out = repo.run("vm1", &["verify", "--json"]);
    let took = started.elapsed();
    assert_eq!(out.code(), Some(6), "{}", out.stderr);
    let report: VerifyReport = out.report();
    assert_eq!(report.damaged_nodes.len(), nodes);
    assert_eq!(report.broken_restores.len(), nodes);
    took
}

#[test]
fn verify_time_grows_linearly_with_the_nodes() {
    let small = (0..2).map(|_| verify_time(1_000)).min().unwrap();
    let large = (0..2).map(|_| verify_time(10_000)).min().unwrap();
    // Linear: about 10 times as long (less, with the fixed start-up); quadratic was 100 times.
    assert!(
        large < small * 40,
        "verify: 1000 nodes {small:?}, 10 000 nodes {large:?}"
    );
}
