//! SIGINT, SIGTERM and SIGKILL while qmpbak's children run: offline restore (`qemu-img convert`), verify
//! (`qemu-storage-daemon`), prune (`qemu-img rebase`) and merge (a daemon and a copy job). A signal stops and
//! reaps the children, removes partial outputs, finishes the operation record and exits 130; after SIGKILL the
//! children die with qmpbak and the next run finishes what the record names. Each run is held at a named step
//! with `QMPBAK_PAUSE_AT`, so the signal lands while the child exists.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
use std::path::Path;

use nix::sys::signal::Signal;

use integration_tests::cli::{self, Output};
use integration_tests::repo::TestRepo;
use integration_tests::timeouts::PROCESS_EXIT_TIMEOUT;
use integration_tests::{MIB, TestVm, image};
use qmpbak_engine::restore::offline::RestoreReport;

/// A VM whose disk holds known data and a repository with a full and two incrementals of it; returns the
/// reference of the last node's disk and its id.
async fn three_backups(dir: &Path) -> (TestVm, TestRepo, Vec<String>, std::path::PathBuf) {
    let vm = TestVm::start(&[("disk0", 32 * MIB)]).await;
    let repo = TestRepo::init();
    let mut nodes = Vec::new();
    for (i, pattern) in [0x11u8, 0x22, 0x33].into_iter().enumerate() {
        vm.write_pattern("disk0", pattern, i as u64 * 4 * MIB, 6 * MIB)
            .await;
        nodes.push(repo.backup_node(&vm, "vm1", &[]));
    }
    let reference = dir.join("ref.qcow2");
    vm.capture_reference("disk0", &reference).await;
    (vm, repo, nodes, reference)
}

#[track_caller]
fn assert_interrupted(out: &Output) {
    assert_eq!(out.code(), Some(130), "{out:?}");
    assert!(out.stderr.contains("interrupted"), "{out:?}");
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn a_stopped_restore_leaves_no_image_and_no_child() {
    let dir = tempfile::tempdir().unwrap();
    let (_vm, repo, nodes, reference) = three_backups(dir.path()).await;
    let last = nodes.last().unwrap();
    for signal in [Signal::SIGTERM, Signal::SIGINT] {
        let out_dir = dir.path().join(format!("out-{signal}"));
        std::fs::create_dir(&out_dir).unwrap();
        let target = format!("{}/", out_dir.display());
        let args = repo.vm_args("vm1", &["restore", last, "--to", &target]);
        let paused = cli::run_paused_at(&args, "restore-converting", &[], None);
        paused.signal(signal);
        assert_interrupted(&paused.finish());
        cli::assert_no_process_mentions(out_dir.to_str().unwrap(), PROCESS_EXIT_TIMEOUT);
        assert_eq!(
            entries(&out_dir),
            Vec::<String>::new(),
            "{signal}: partial output left"
        );
    }
    // SIGKILL: the child dies with qmpbak, and the final name never holds an unchecked image.
    let out_dir = dir.path().join("out-kill");
    std::fs::create_dir(&out_dir).unwrap();
    let target = format!("{}/", out_dir.display());
    let args = repo.vm_args("vm1", &["restore", last, "--to", &target]);
    let paused = cli::run_paused_at(&args, "restore-converting", &[], None);
    paused.signal(Signal::SIGKILL);
    paused.finish();
    cli::assert_no_process_mentions(out_dir.to_str().unwrap(), PROCESS_EXIT_TIMEOUT);
    assert!(!out_dir.join("disk0.qcow2").exists());
    let left = entries(&out_dir);
    assert!(
        left.len() == 1 && left[0].starts_with(".disk0.qcow2.qmpbak-partial-"),
        "a killed restore leaves its temporary image: {left:?}"
    );
    // The same restore, uninterrupted, is exact, and removes what the killed one left, saying so.
    let out = repo
        .run("vm1", &["restore", last, "--to", &target, "--json"])
        .success();
    image::assert_same(&reference, &out_dir.join("disk0.qcow2"));
    assert_eq!(entries(&out_dir), ["disk0.qcow2"]);
    let removed = out.report::<RestoreReport>().removed_partials;
    assert_eq!(removed, [out_dir.join(&left[0])], "{out:?}");
    assert!(
        out.stderr.contains("left by a restore that was killed"),
        "{out:?}"
    );
}

#[tokio::test]
async fn verify_under_umask_000_keeps_its_daemon_private_and_a_signal_stops_it() {
    let dir = tempfile::tempdir().unwrap();
    let (_vm, repo, _nodes, _reference) = three_backups(dir.path()).await;
    let tmp = dir.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o777)).unwrap();
    let args = repo.vm_args("vm1", &["verify"]);
    // The socket directories go under TMPDIR when no runtime directory is set.
    let env = [("TMPDIR", tmp.as_path()), ("XDG_RUNTIME_DIR", Path::new(""))];
    let paused = cli::run_paused_at(&args, "verify-reading", &env, Some(0o000));
    // The daemon runs and serves the repository: nobody but the owner may reach its sockets.
    let mut seen = 0;
    let mut stack = vec![tmp.clone()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let entry = entry.unwrap();
            let meta = std::fs::symlink_metadata(entry.path()).unwrap();
            let mode = meta.permissions().mode() & 0o777;
            if meta.is_dir() {
                assert_eq!(mode, 0o700, "{} has mode {mode:o}", entry.path().display());
                stack.push(entry.path());
            } else {
                assert_eq!(mode & 0o077, 0, "{} has mode {mode:o}", entry.path().display());
            }
            seen += usize::from(meta.file_type().is_socket());
        }
    }
    assert!(seen > 0, "the daemon's sockets were not under TMPDIR");
    assert!(!cli::processes_mentioning(tmp.to_str().unwrap()).is_empty());
    paused.signal(Signal::SIGTERM);
    assert_interrupted(&paused.finish());
    cli::assert_no_process_mentions(tmp.to_str().unwrap(), PROCESS_EXIT_TIMEOUT);
    assert_eq!(entries(&tmp), Vec::<String>::new());

    // SIGKILL: the daemon dies with qmpbak.
    let paused = cli::run_paused_at(&args, "verify-reading", &env, None);
    assert!(!cli::processes_mentioning(tmp.to_str().unwrap()).is_empty());
    paused.signal(Signal::SIGKILL);
    paused.finish();
    cli::assert_no_process_mentions(tmp.to_str().unwrap(), PROCESS_EXIT_TIMEOUT);
    repo.run("vm1", &["verify"]).success();
}

/// A qmpbak killed with SIGKILL cannot remove its socket directories; they are in a directory named after the
/// process (pid namespace, pid, start time), and the next qmpbak that makes one removes those of processes
/// that no longer run; one that ends normally leaves nothing. Before, every kill left a `qmpbak-qsd-*`
/// directory with dead sockets in the temporary directory for good (hundreds on a test machine).
#[tokio::test]
async fn a_killed_commands_socket_directories_are_removed_by_the_next_command() {
    let dir = tempfile::tempdir().unwrap();
    let (_vm, repo, _nodes, _reference) = three_backups(dir.path()).await;
    let run = dir.path().join("run");
    std::fs::create_dir(&run).unwrap();
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o700)).unwrap();
    let env = [("XDG_RUNTIME_DIR", run.as_path())];
    let base = run.join("qmpbak");
    let args = repo.vm_args("vm1", &["verify"]);

    let paused = cli::run_paused_at(&args, "verify-reading", &env, None);
    let dead = entries(&base);
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert!(
        entries(&base.join(&dead[0]))
            .iter()
            .any(|d| d.starts_with("qmpbak-qsd-")),
        "the daemon's sockets are not in {}",
        dead[0]
    );
    paused.signal(Signal::SIGKILL);
    paused.finish();
    cli::assert_no_process_mentions(base.to_str().unwrap(), PROCESS_EXIT_TIMEOUT);
    assert_eq!(entries(&base), dead, "a killed qmpbak removed its directories");

    let mut next = cli::command_owned(&args);
    next.env("XDG_RUNTIME_DIR", &run);
    cli::wait(next.spawn().unwrap(), integration_tests::timeouts::CLI_TIMEOUT).success();
    assert!(!base.exists(), "left: {:?}", entries(&base));
}

#[tokio::test]
async fn a_stopped_prune_reaps_its_rebase_and_leaves_a_tree_that_restores() {
    let dir = tempfile::tempdir().unwrap();
    let (_vm, repo, nodes, reference) = three_backups(dir.path()).await;
    let last = nodes.last().unwrap();
    let repo_marker = repo.path().display().to_string();
    for signal in [Signal::SIGTERM, Signal::SIGKILL] {
        let args = repo.vm_args("vm1", &["prune", "--keep-last", "1"]);
        let paused = cli::run_paused_at(&args, "prune-rebasing", &[], None);
        paused.signal(signal);
        let out = paused.finish();
        if signal == Signal::SIGTERM {
            assert_interrupted(&out);
            // The record was finished by the stopped run itself.
            assert!(repo.manifest("vm1").operations.is_empty());
        }
        cli::assert_no_process_mentions(&repo_marker, PROCESS_EXIT_TIMEOUT);
        let out_path = dir.path().join(format!("after-{signal}.qcow2"));
        repo.run("vm1", &["restore", last, "--to", out_path.to_str().unwrap()])
            .success();
        image::assert_same(&reference, &out_path);
    }
    repo.run("vm1", &["prune", "--keep-last", "1"]).success();
    assert!(repo.manifest("vm1").operations.is_empty());
    let out_path = dir.path().join("pruned.qcow2");
    repo.run("vm1", &["restore", last, "--to", out_path.to_str().unwrap()])
        .success();
    image::assert_same(&reference, &out_path);
    repo.run("vm1", &["verify"]).success();
}

#[tokio::test]
async fn a_stopped_merge_reaps_its_daemon_and_removes_its_temporary_files() {
    let dir = tempfile::tempdir().unwrap();
    let (_vm, repo, nodes, reference) = three_backups(dir.path()).await;
    let last = nodes.last().unwrap();
    let tmp = dir.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    for signal in [Signal::SIGINT, Signal::SIGKILL] {
        let args = repo.vm_args("vm1", &["merge", last]);
        let paused = cli::run_paused_at(&args, "merge-copying", &[("TMPDIR", &tmp)], None);
        assert!(!cli::processes_mentioning(tmp.to_str().unwrap()).is_empty());
        paused.signal(signal);
        let out = paused.finish();
        cli::assert_no_process_mentions(tmp.to_str().unwrap(), PROCESS_EXIT_TIMEOUT);
        if signal == Signal::SIGINT {
            assert_interrupted(&out);
            assert!(repo.manifest("vm1").operations.is_empty());
            let node_dir = repo.vm_dir("vm1").join(last);
            assert!(
                !entries(&node_dir).iter().any(|n| n.contains("merging")),
                "{:?}",
                entries(&node_dir)
            );
        }
    }
    // After SIGKILL the next merge finishes the record and does the work.
    repo.run("vm1", &["merge", last]).success();
    assert!(repo.manifest("vm1").operations.is_empty());
    let out_path = dir.path().join("merged.qcow2");
    repo.run("vm1", &["restore", last, "--to", out_path.to_str().unwrap()])
        .success();
    image::assert_same(&reference, &out_path);
}

/// Waits until process `pid` has `path` open (a qmpbak waiting for a VM's lock holds its lock file open).
fn wait_until_open(pid: u32, path: &Path) {
    let deadline = std::time::Instant::now() + integration_tests::timeouts::LOCK_WAIT_START_TIMEOUT;
    loop {
        let open = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|t| t == path));
        if open {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "process {pid} did not open {} in time",
            path.display()
        );
        std::thread::yield_now();
    }
}

/// A command waiting for the VM's lock (`--wait`) stops at once on SIGINT, SIGTERM or SIGHUP (a closed
/// terminal), exits 130 and changes nothing, even when the lock frees afterwards. The wait used to block the
/// signal: a stopped prune went on to prune once the lock freed, and exited 0. The signals go to the whole
/// process group, as a terminal or `timeout` sends them. `list` and `show` need no lock at all.
#[tokio::test]
async fn a_command_waiting_for_the_lock_stops_on_a_signal_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (vm, repo, _nodes, _reference) = three_backups(dir.path()).await;
    let holder = cli::run_paused_at(&repo.backup_args(&vm, "vm1", &[]), "backup-copying", &[], None);
    let before = repo.manifest("vm1");
    let lock = repo.vm_dir("vm1").join("lock");
    // What only reads the manifest needs no lock: `list` and `show` work while the backup holds it.
    cli::run(&["list", repo.vm_dir("vm1").to_str().unwrap()]).success();
    repo.run("vm1", &["show", before.nodes[0].id.as_str()]).success();
    for (signal, command) in [
        (Signal::SIGINT, &["prune", "--keep-last", "1", "--wait"][..]),
        (
            Signal::SIGTERM,
            &["merge", before.nodes[1].id.as_ref(), "--wait"][..],
        ),
        (Signal::SIGHUP, &["verify", "--wait"][..]),
    ] {
        let child = {
            use std::os::unix::process::CommandExt as _;
            cli::command_owned(&repo.vm_args("vm1", command))
                .process_group(0)
                .spawn()
                .unwrap()
        };
        wait_until_open(child.id(), &lock);
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
        nix::sys::signal::killpg(pid, signal).unwrap();
        let out = cli::wait(child, PROCESS_EXIT_TIMEOUT);
        assert_interrupted(&out);
        assert!(out.stderr.contains("waiting for the lock"), "{signal}: {out:?}");
    }
    holder.signal(Signal::SIGUSR1);
    holder.finish().success();
    // The tree holds what it held, the holder's backup (already in it, pending, while it held the lock) now
    // complete.
    let after = repo.manifest("vm1");
    assert_eq!(
        before.nodes.iter().map(|n| &n.id).collect::<Vec<_>>(),
        after.nodes.iter().map(|n| &n.id).collect::<Vec<_>>(),
        "a stopped command changed the tree"
    );
}

/// SIGINT while a backup builds its checking tables (after QEMU's job, before the manifest says complete)
/// stops it: exit 130, the node failed and its files gone, the VM's bitmaps as before, so the next backup is
/// an incremental that holds the write. The signal used to be seen by nothing in that phase: the backup went
/// on and exited 0.
#[tokio::test]
async fn a_backup_stopped_while_it_builds_its_tables_is_undone() {
    let dir = tempfile::tempdir().unwrap();
    let (vm, repo, nodes, _reference) = three_backups(dir.path()).await;
    vm.write_pattern("disk0", 0x44, 20 * MIB, MIB).await;
    let paused = cli::run_paused_at(&repo.backup_args(&vm, "vm1", &[]), "backup-tables", &[], None);
    paused.signal(Signal::SIGINT);
    let out = paused.finish();
    assert_interrupted(&out);
    let manifest = repo.manifest("vm1");
    assert!(manifest.operations.is_empty(), "{:?}", manifest.operations);
    assert_eq!(
        manifest.current.as_ref().map(ToString::to_string).as_ref(),
        nodes.last()
    );
    let stopped = manifest.nodes.last().unwrap();
    assert_eq!(stopped.state, chain::NodeState::Failed, "{stopped:?}");
    assert!(
        !repo
            .vm_dir("vm1")
            .join(stopped.id.as_str())
            .join("disk0.qcow2")
            .exists()
    );
    let reference = dir.path().join("after.qcow2");
    vm.capture_reference("disk0", &reference).await;
    let next = repo.backup_report(&vm, "vm1", &[]);
    assert_eq!(next.method, "bitmap", "{next:?}");
    image::assert_same(&reference, &repo.node_file("vm1", next.node.as_str(), "disk0"));
}
