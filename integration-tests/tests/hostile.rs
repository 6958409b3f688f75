//! Hostile and awkward input from outside the repository: paths that a shell or QEMU's option parser would
//! misread, the modes of what qmpbak creates, and a QMP socket the user may not open.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

use integration_tests::repo::{BackupReport, TestRepo};
use integration_tests::{MIB, TestVm, cli, image};
use qmpbak_engine::cleanup::CleanupReport;
use qmpbak_engine::snapshot::SnapshotReport;
use qmpbak_engine::verify::VerifyReport;

#[tokio::test]
async fn paths_with_shell_and_qemu_metacharacters_are_only_ever_data() {
    let vm = TestVm::start(&[("disk0", 16 * MIB)]).await;
    let dir = tempfile::tempdir().unwrap();
    // Commas split QEMU options, quotes and $ mean things to a shell, spaces split words.
    let repo = dir.path().join("a,b \"c\" $HOME; rm -rf x 'd'");
    cli::run(&["init", repo.to_str().unwrap()]).success();
    let repo = TestRepo::at(repo);
    vm.write_pattern("disk0", 0x5a, 0, 4 * MIB).await;
    repo.backup_report(&vm, "vm1", &[]);
    vm.write_pattern("disk0", 0xa5, MIB, MIB).await;
    let reference = dir.path().join("ref.qcow2");
    vm.capture_reference("disk0", &reference).await;
    let node = repo.backup_node(&vm, "vm1", &[]);
    image::assert_same(&reference, &repo.node_file("vm1", &node, "disk0"));
    let out = dir.path().join("out, \"restored\" $x");
    repo.run("vm1", &["restore", &node, "--to", out.to_str().unwrap()])
        .success();
    // One disk and a path that is not a directory: the path is the image itself.
    image::assert_same(&reference, &out);
    repo.run("vm1", &["verify"]).success();
}

fn walk(dir: &Path, out: &mut Vec<(std::path::PathBuf, u32, bool)>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        out.push((path.clone(), meta.permissions().mode() & 0o777, meta.is_dir()));
        if meta.is_dir() {
            walk(&path, out);
        }
    }
}

#[tokio::test]
async fn what_qmpbak_creates_is_private_to_its_owner() {
    let vm = TestVm::start(&[("disk0", 16 * MIB)]).await;
    let repo = TestRepo::init();
    vm.write_pattern("disk0", 0x11, 0, MIB).await;
    repo.backup_report(&vm, "vm1", &[]);
    vm.write_pattern("disk0", 0x22, 0, MIB).await;
    repo.backup_report(&vm, "vm1", &[]);
    let mut entries = vec![(
        repo.path(),
        std::fs::metadata(repo.path()).unwrap().permissions().mode() & 0o777,
        true,
    )];
    walk(&repo.path(), &mut entries);
    for (path, mode, is_dir) in entries {
        let want = if is_dir { 0o700 } else { 0o600 };
        assert_eq!(mode, want, "{} has mode {mode:o}", path.display());
    }
}

#[tokio::test]
async fn a_socket_the_user_may_not_open_is_a_clear_error() {
    let vm = TestVm::start(&[("disk0", 16 * MIB)]).await;
    // The binary must be reachable for the unprivileged user.
    let bin = cli::qmpbak_bin();
    let copy = tempfile::Builder::new().prefix("qmpbak-bin-").tempdir().unwrap();
    std::fs::set_permissions(copy.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let exe = copy.path().join("qmpbak");
    std::fs::copy(&bin, &exe).unwrap();
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    let dir = vm.dir();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(vm.socket(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
        .arg(&exe)
        .args(["info", "--socket"])
        .arg(vm.socket())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(5), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("qmp.sock") && stderr.contains("ermission denied"),
        "{stderr}"
    );
}

#[tokio::test]
async fn a_relative_repository_path_never_reaches_another_repository_through_qemu() {
    let vm = TestVm::start(&[("disk0", 16 * MIB)]).await;
    // QEMU works in the VM's directory; a repository of the same relative name lives there too.
    let victim = TestRepo::at(vm.dir().join("relrepo"));
    cli::run(&["init", victim.path().to_str().unwrap()]).success();
    vm.write_pattern("disk0", 0x11, 0, 4 * MIB).await;
    let victim_node = victim.backup_node(&vm, "vm1", &[]);
    let victim_file = victim.node_file("vm1", &victim_node, "disk0");
    let victim_copy = vm.dir().join("victim-copy.qcow2");
    std::fs::copy(&victim_file, &victim_copy).unwrap();

    // Our repository: `relrepo` again, relative to qmpbak's own working directory.
    let work = tempfile::tempdir().unwrap();
    vm.write_pattern("disk0", 0x22, 0, 4 * MIB).await;
    let reference = work.path().join("ref.qcow2");
    vm.capture_reference("disk0", &reference).await;
    let socket = vm.socket();
    let run = |args: &[&str]| {
        let mut cmd = cli::command(args);
        cmd.current_dir(work.path());
        cli::wait(cmd.spawn().unwrap(), integration_tests::timeouts::CLI_TIMEOUT)
    };
    run(&["init", "relrepo"]).success();
    let out = run(&[
        "backup",
        "--socket",
        socket.to_str().unwrap(),
        "--repo",
        "relrepo",
        "--vm",
        "vm1",
        "--level",
        "full",
        "--json",
    ])
    .success();
    let node = out.report::<BackupReport>().node;
    assert_eq!(
        node, victim_node,
        "the same node id in both repositories makes the test meaningful"
    );

    // The other repository's file is untouched; ours holds the disk as it was.
    image::assert_same(&victim_copy, &victim_file);
    let ours = TestRepo::at(work.path().join("relrepo"));
    image::assert_same(&reference, &ours.node_file("vm1", &node, "disk0"));
    run(&[
        "restore",
        &node,
        "--repo",
        "relrepo",
        "--vm",
        "vm1",
        "--to",
        "out.qcow2",
    ])
    .success();
    image::assert_same(&reference, &work.path().join("out.qcow2"));
}

/// Takes time points `a` and `b` of the VM behind `socket`; returns their node ids.
fn two_time_points(repo: &TestRepo, socket: &str) -> Vec<String> {
    ["a", "b"]
        .iter()
        .map(|tag| {
            let out = repo.run("vm1", &["snapshot", "--socket", socket, "--tag", tag, "--json"]);
            out.success().report::<SnapshotReport>().node
        })
        .collect()
}

/// Adds `op`, a record of manifest format 1 (a `kind` and a free-text `note`), to the operation records of VM
/// `vm`'s manifest, as a tampered repository of that format would hold it: the manifest is made format 1, which
/// differs from format 2 in its records alone.
fn forge_operation(repo: &TestRepo, vm: &str, op: serde_json::Value) {
    let path = repo.vm_dir(vm).join("manifest.json");
    let mut manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    if manifest["format_version"] != 1 {
        assert_eq!(
            manifest["operations"],
            serde_json::json!([]),
            "records of format 2 would stay"
        );
        manifest["format_version"] = serde_json::json!(1);
    }
    manifest["operations"].as_array_mut().unwrap().push(op);
    std::fs::write(&path, serde_json::to_vec_pretty(&manifest).unwrap()).unwrap();
}

/// Adds `op`, a record of the current manifest format, to VM `vm`'s manifest, as a tampered repository would
/// hold it.
fn forge_typed_operation(repo: &TestRepo, vm: &str, op: serde_json::Value) {
    let path = repo.vm_dir(vm).join("manifest.json");
    let mut manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(manifest["format_version"], chain::FORMAT_VERSION);
    manifest["operations"].as_array_mut().unwrap().push(op);
    std::fs::write(&path, serde_json::to_vec_pretty(&manifest).unwrap()).unwrap();
}

fn forged(
    id: &str,
    kind: &str,
    for_node: Option<&str>,
    files: &[&str],
    text: Option<&str>,
) -> serde_json::Value {
    serde_json::json!({
        "id": id, "kind": kind, "node": for_node, "started": "2026-01-01T00:00:00Z", "pid": 1, "host": "elsewhere",
        "jobs": [], "block_nodes": [], "bitmaps": [], "files": files, "note": text,
    })
}

#[tokio::test]
async fn a_tampered_operation_record_deletes_nothing_it_may_not() {
    let vm = TestVm::start(&[("disk0", 16 * MIB)]).await;
    let repo = TestRepo::init();
    vm.write_pattern("disk0", 0x5a, 0, 4 * MIB).await;
    let node = repo.backup_node(&vm, "vm1", &[]);
    let chain_id = repo.manifest("vm1").chain_id;
    let outside = tempfile::tempdir().unwrap();
    // A file anywhere, one named like qmpbak's overlays but beside no image of the VM, and one that is.
    let victims = [
        outside.path().join("important.qcow2"),
        outside.path().join(format!("disk0.qmpbak-{chain_id}-0009.qcow2")),
        vm.dir().join(format!("unrelated.qmpbak-{chain_id}-0008.qcow2")),
    ];
    for v in &victims {
        std::fs::write(v, b"not qmpbak's to delete").unwrap();
    }
    let listed = format!(
        "files outside the repository:\n{}",
        victims
            .iter()
            .map(|v| v.display().to_string())
            .collect::<Vec<_>>()
            .join("\n")
    );
    let table = format!("{node}/disk0.table");
    let file = format!("{node}/disk0.qcow2");
    forge_operation(
        &repo,
        "vm1",
        forged(
            "snapshot-0009",
            "snapshot",
            Some("0009"),
            &[&file, &table],
            Some(&listed),
        ),
    );
    forge_operation(
        &repo,
        "vm1",
        forged(
            "backup-0007",
            "backup",
            Some("0007"),
            &["manifest.json", &file],
            None,
        ),
    );

    let socket = vm.socket();
    let out = repo
        .run(
            "vm1",
            &["cleanup", "--socket", socket.to_str().unwrap(), "--json"],
        )
        .success();
    let cleaned: CleanupReport = out.report();
    assert!(cleaned.cleaned.files.is_empty(), "{cleaned:?}");
    assert_eq!(cleaned.cleaned.kept_outside.len(), 3, "{cleaned:?}");
    for v in &victims {
        assert!(v.exists(), "{} was deleted", v.display());
    }
    assert!(repo.vm_dir("vm1").join("manifest.json").exists());
    // A prune record is not trusted either.
    forge_operation(
        &repo,
        "vm1",
        forged("prune-x", "prune", None, &["manifest.json", &file, &table], None),
    );
    repo.run("vm1", &["prune", "--keep-last", "5"]).success();
    assert!(repo.manifest("vm1").operations.is_empty());
    // Nor is a record of the current format: its typed lists get the same checks.
    forge_typed_operation(
        &repo,
        "vm1",
        serde_json::json!({
            "id": "snapshot-0009", "node": "0009", "started": "2026-01-01T00:00:00Z", "pid": 1,
            "host": "elsewhere", "jobs": [], "block_nodes": [], "bitmaps": [], "files": [&file, &table],
            "payload": { "kind": "snapshot", "outside_files": victims },
        }),
    );
    forge_typed_operation(
        &repo,
        "vm1",
        serde_json::json!({
            "id": "backup-0007", "node": "0007", "started": "2026-01-01T00:00:00Z", "pid": 1,
            "host": "elsewhere", "files": ["manifest.json", &file],
            "payload": { "kind": "backup", "nbd_server_started": true },
        }),
    );
    let cleaned = repo
        .run(
            "vm1",
            &["cleanup", "--socket", socket.to_str().unwrap(), "--json"],
        )
        .success()
        .report::<CleanupReport>();
    assert!(cleaned.cleaned.files.is_empty(), "{cleaned:?}");
    assert_eq!(cleaned.cleaned.kept_outside.len(), 3, "{cleaned:?}");
    for v in &victims {
        assert!(v.exists(), "{} was deleted", v.display());
    }
    repo.run("vm1", &["verify"]).success();
    let restored = outside.path().join("restored.qcow2");
    repo.run("vm1", &["restore", &node, "--to", restored.to_str().unwrap()])
        .success();
}

#[tokio::test]
async fn a_tampered_commit_record_is_refused_and_deletes_nothing() {
    let vm = TestVm::start(&[("disk0", 16 * MIB)]).await;
    let repo = TestRepo::init();
    let socket = vm.socket();
    let socket = socket.to_str().unwrap();
    let points = two_time_points(&repo, socket);
    let outside = tempfile::tempdir().unwrap();
    let victim = outside.path().join("important.qcow2");
    std::fs::write(&victim, b"not qmpbak's to delete").unwrap();
    let record = serde_json::json!({
        "node": points[1], "parent": points[0],
        "files": [["disk0", victim.display().to_string(), vm.disk_path("disk0").display().to_string()]],
    });
    forge_operation(
        &repo,
        "vm1",
        forged(
            &format!("commit-{}", points[1]),
            "commit",
            None,
            &[],
            Some(&format!("commit:{record}")),
        ),
    );
    let before = repo.manifest("vm1");
    let out = repo.run("vm1", &["cleanup", "--socket", socket]);
    assert_ne!(out.code(), Some(0), "{out:?}");
    assert!(out.stderr.contains("does not match the manifest"), "{out:?}");
    assert!(victim.exists());
    let after = repo.manifest("vm1");
    assert_eq!(before.nodes, after.nodes, "the tree must not change");
}

#[tokio::test]
async fn cleanup_without_a_socket_says_what_it_could_not_finish() {
    let vm = TestVm::start(&[("disk0", 16 * MIB)]).await;
    let repo = TestRepo::init();
    let socket = vm.socket();
    let socket = socket.to_str().unwrap();
    let points = two_time_points(&repo, socket);
    // A commit killed before it touched QEMU leaves its record; only the running VM can tell what it did.
    let args = repo.socket_args(&vm.socket(), "vm1", &["commit", &points[1]]);
    cli::run_crashing_at(
        &args,
        "commit-disk-done",
        integration_tests::timeouts::CLI_CRASH_TIMEOUT,
    )
    .assert_crashed_at("commit-disk-done");
    assert_eq!(repo.manifest("vm1").operations.len(), 1);
    let out = repo.run("vm1", &["cleanup"]);
    assert_eq!(out.code(), Some(2), "{out:?}");
    assert!(out.stderr.contains("give --socket"), "{out:?}");
    assert!(!out.stdout.contains("nothing to clean up"), "{out:?}");
    // The same with --json: one report on stdout that names what is pending, and still exit 2 (it was 0).
    let out = repo.run("vm1", &["cleanup", "--json"]);
    assert_eq!(out.code(), Some(2), "{out:?}");
    let report: CleanupReport = serde_json::from_str(&out.stdout).expect("one JSON report on stdout");
    assert_eq!(report.cleaned.pending.len(), 1, "{report:?}");
    repo.run("vm1", &["cleanup", "--socket", socket]).success();
    assert!(repo.manifest("vm1").operations.is_empty());
}

#[tokio::test]
async fn prune_refuses_a_node_directory_that_is_a_symlink() {
    let vm = TestVm::start(&[("disk0", 16 * MIB)]).await;
    let repo = TestRepo::init();
    let mut nodes = Vec::new();
    for pattern in [0x11u8, 0x22, 0x33] {
        vm.write_pattern("disk0", pattern, u64::from(pattern) * 32 * 1024, MIB)
            .await;
        nodes.push(repo.backup_node(&vm, "vm1", &[]));
    }
    // Node 0002's directory moved out of the repository, a symlink left in its place.
    let outside = tempfile::tempdir().unwrap();
    let moved = outside.path().join("moved");
    let dir = repo.vm_dir("vm1").join(&nodes[1]);
    std::fs::rename(&dir, &moved).unwrap();
    std::os::unix::fs::symlink(&moved, &dir).unwrap();
    let listing = |p: &Path| {
        let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(p)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.file_name().to_string_lossy().into_owned(),
                    std::fs::read(e.path()).unwrap(),
                )
            })
            .collect();
        v.sort();
        v
    };
    let before = listing(&moved);
    let manifest_before = repo.manifest("vm1");
    let out = repo.run("vm1", &["prune", "--keep-last", "1"]);
    assert_eq!(out.code(), Some(3), "{out:?}");
    assert!(out.stderr.contains("symlink"), "{out:?}");
    assert_eq!(listing(&moved), before, "files outside the repository changed");
    assert_eq!(repo.manifest("vm1").nodes, manifest_before.nodes);
    assert!(repo.manifest("vm1").operations.is_empty());
}

#[tokio::test]
async fn a_lock_file_that_is_a_symlink_is_refused_and_nothing_is_created_outside() {
    let vm = TestVm::start(&[("disk0", 16 * MIB)]).await;
    let repo = TestRepo::init();
    vm.write_pattern("disk0", 0x33, 0, MIB).await;
    repo.backup_report(&vm, "vm1", &[]);
    let outside = tempfile::tempdir().unwrap();
    let target = outside.path().join("created-by-qmpbak");
    let lock = repo.vm_dir("vm1").join("lock");
    std::fs::remove_file(&lock).unwrap();
    std::os::unix::fs::symlink(&target, &lock).unwrap();

    let failures = [
        cli::run_owned(&repo.backup_args(&vm, "vm1", &[])),
        repo.run("vm1", &["prune", "--keep-last", "5"]),
        repo.run("vm1", &["verify"]),
    ];
    for out in failures {
        assert_eq!(out.code(), Some(3), "{out:?}");
        assert!(
            out.stderr.contains("symbolic link") && out.stderr.contains("lock"),
            "{}",
            out.stderr
        );
    }
    // `list` reads the manifest alone and takes no lock.
    cli::run(&["list", repo.vm_dir("vm1").to_str().unwrap()]).success();
    assert!(!target.exists(), "nothing is created where the link points");
    assert_eq!(repo.manifest("vm1").nodes.len(), 1);
}

#[tokio::test]
async fn a_node_file_grown_to_a_petabyte_is_a_clear_verify_error() {
    let vm = TestVm::start(&[("disk0", 16 * MIB)]).await;
    let repo = TestRepo::init();
    vm.write_pattern("disk0", 0x44, 0, MIB).await;
    let node = repo.backup_node(&vm, "vm1", &[]);
    let file = repo.node_file("vm1", &node, "disk0");
    image::qemu_img(&["resize", "-f", "qcow2", file.to_str().unwrap(), "1P"]);
    let out = repo.run("vm1", &["verify", "--json"]);
    assert_eq!(out.code(), Some(6), "{out:?}");
    let report: VerifyReport = out.report();
    let error = report.nodes[0].disks[0].error.as_deref().unwrap_or_default();
    assert!(
        error.contains(&format!("disk of {} bytes", 1u64 << 50))
            && error.contains(&format!("covers {} bytes", 16 * MIB)),
        "{report:?}"
    );
    // Restore refuses it before copying or hashing anything.
    let out_dir = tempfile::tempdir().unwrap();
    let target = out_dir.path().join("out.qcow2");
    let started = std::time::Instant::now();
    let out = repo.run("vm1", &["restore", &node, "--to", target.to_str().unwrap()]);
    assert_eq!(out.code(), Some(6), "{out:?}");
    assert!(
        out.stderr
            .contains(&format!("claims a disk of {} bytes", 1u64 << 50)),
        "{out:?}"
    );
    assert!(!target.exists());
    assert!(
        started.elapsed() < integration_tests::timeouts::PROMPT_TIMEOUT,
        "{:?}",
        started.elapsed()
    );
}

/// A read-only bind mount of a directory, unmounted when dropped.
struct ReadOnlyView {
    path: std::path::PathBuf,
}

impl ReadOnlyView {
    fn of(source: &Path, at: &Path) -> ReadOnlyView {
        std::fs::create_dir(at).unwrap();
        let mount = |args: &[&std::ffi::OsStr]| {
            let out = std::process::Command::new("mount").args(args).output().unwrap();
            assert!(out.status.success(), "mount {args:?}: {out:?}");
        };
        mount(&[OsStr::new("--bind"), source.as_os_str(), at.as_os_str()]);
        let view = ReadOnlyView { path: at.to_owned() };
        mount(&[OsStr::new("-o"), OsStr::new("remount,ro,bind"), at.as_os_str()]);
        view
    }
}

impl Drop for ReadOnlyView {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.path).status();
    }
}

#[tokio::test]
async fn a_read_only_repository_can_be_listed_shown_verified_and_restored() {
    let vm = TestVm::start(&[("disk0", 16 * MIB)]).await;
    let repo = TestRepo::init();
    vm.write_pattern("disk0", 0x61, 0, 2 * MIB).await;
    repo.backup_report(&vm, "vm1", &[]);
    vm.write_pattern("disk0", 0x62, MIB, MIB).await;
    let reference = repo.temp_dir().unwrap().join("ref.qcow2");
    vm.capture_reference("disk0", &reference).await;
    let node = repo.backup_node(&vm, "vm1", &[]);
    // vm1 has no lock file (none can be created on the read-only view); vm2 has one (opened read-only).
    std::fs::remove_file(repo.vm_dir("vm1").join("lock")).unwrap();
    repo.synthetic_vm("vm2", 3, |i| i.checked_sub(1));
    assert!(repo.vm_dir("vm2").join("lock").exists());

    let view = ReadOnlyView::of(&repo.path(), &repo.temp_dir().unwrap().join("ro"));
    let ro = TestRepo::at(view.path.clone());
    cli::run(&["list", ro.path().to_str().unwrap()]).success();
    for vm_name in ["vm1", "vm2"] {
        cli::run(&["list", ro.vm_dir(vm_name).to_str().unwrap()]).success();
        ro.run(vm_name, &["show", "0002"]).success();
    }
    ro.run("vm1", &["verify"]).success();
    let out = repo.temp_dir().unwrap().join("restored.qcow2");
    ro.run("vm1", &["restore", &node, "--to", out.to_str().unwrap()])
        .success();
    image::assert_same(&reference, &out);
    assert!(!repo.vm_dir("vm1").join("lock").exists());
    drop(view);
}

/// A VM with three backups of one disk (a full and two incrementals), each writing its own pattern: the
/// repository, the node ids and the reference of the last one's instant.
async fn three_backups(dir: &Path) -> (TestVm, TestRepo, Vec<String>, std::path::PathBuf) {
    let vm = TestVm::start(&[("disk0", 16 * MIB)]).await;
    let repo = TestRepo::init();
    let mut nodes = Vec::new();
    for (i, pattern) in [0x11u8, 0x22, 0x33].into_iter().enumerate() {
        vm.write_pattern("disk0", pattern, i as u64 * MIB, MIB).await;
        nodes.push(repo.backup_node(&vm, "vm1", &[]));
    }
    let reference = dir.join("ref.qcow2");
    vm.capture_reference("disk0", &reference).await;
    (vm, repo, nodes, reference)
}

/// A node file whose qcow2 header names an external data file outside the repository (a tampered
/// repository's) is never opened: QEMU would read the guest's data from that file and, in `prune`'s rebase,
/// write the absorbed layers' data into it. `prune`, `verify` and `restore` call the node damaged (exit 6) and
/// the outside file is untouched.
#[tokio::test]
async fn a_node_file_naming_a_data_file_outside_is_never_opened() {
    let dir = tempfile::tempdir().unwrap();
    let (_vm, repo, nodes, _reference) = three_backups(dir.path()).await;
    let victim = dir.path().join("victim.txt");
    let precious = b"a file outside the repository\n".repeat(10);
    std::fs::write(&victim, &precious).unwrap();
    // The last node's file becomes one with a data file, still based on its parent.
    let top = repo.node_file("vm1", &nodes[2], "disk0");
    let dummy = dir.path().join("dummy.raw");
    std::fs::remove_file(&top).unwrap();
    image::qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &format!("data_file={}", dummy.display()),
        "-F",
        "qcow2",
        "-b",
        &format!("../{}/disk0.qcow2", nodes[1]),
        top.to_str().unwrap(),
        "16M",
    ]);
    image::qemu_img(&[
        "amend",
        "-f",
        "qcow2",
        "-o",
        &format!("data_file={}", victim.display()),
        top.to_str().unwrap(),
    ]);

    let out = repo.run("vm1", &["prune", "--keep-last", "1"]);
    out.assert_failed_saying("names an external data file");
    assert_eq!(out.code(), Some(6), "{out:?}");
    let verify = repo.run("vm1", &["verify"]);
    assert_eq!(verify.code(), Some(6), "{verify:?}");
    let restored = dir.path().join("restored.qcow2");
    let restore = repo.run("vm1", &["restore", &nodes[2], "--to", restored.to_str().unwrap()]);
    restore.assert_failed_saying("names an external data file");
    assert_eq!(restore.code(), Some(6), "{restore:?}");
    assert!(!restored.exists());
    assert_eq!(
        std::fs::read(&victim).unwrap(),
        precious,
        "the outside file changed"
    );
}

/// `prune` finds no layer through a qcow2 header: a full whose header was given a backing file outside the
/// repository (a file only the user running qmpbak may read) does not bring that file's bytes into the node
/// that absorbs it. The kept node restores exactly as its instant and verifies.
#[tokio::test]
async fn prune_copies_nothing_a_tampered_backing_header_names() {
    let dir = tempfile::tempdir().unwrap();
    let (_vm, repo, nodes, reference) = three_backups(dir.path()).await;
    let secret = dir.path().join("secret.raw");
    let mut bytes = vec![0u8; 16 * MIB as usize];
    bytes[8 * MIB as usize..9 * MIB as usize].fill(0x5e);
    std::fs::write(&secret, bytes).unwrap();
    let full = repo.node_file("vm1", &nodes[0], "disk0");
    image::qemu_img(&[
        "rebase",
        "-u",
        "-f",
        "qcow2",
        "-F",
        "raw",
        "-b",
        secret.to_str().unwrap(),
        full.to_str().unwrap(),
    ]);

    repo.run("vm1", &["prune", "--keep-last", "1"]).success();
    image::assert_same(&reference, &repo.node_file("vm1", &nodes[2], "disk0"));
    repo.run("vm1", &["verify"]).success();
}

/// A tampered backup record makes qmpbak empty no file that is not a scratch image of its own (QEMU follows a
/// symlink named like one, inside the repository or out of it, and truncated its target) and remove no bitmap
/// that is not qmpbak's of this chain (another tool's, another repository's).
#[tokio::test]
async fn a_tampered_record_empties_no_file_and_removes_no_bitmap_that_is_not_its_own() {
    let vm = TestVm::start(&[("disk0", 16 * MIB)]).await;
    let repo = TestRepo::init();
    vm.write_pattern("disk0", 0x5a, 0, MIB).await;
    repo.backup_node(&vm, "vm1", &[]);
    let chain_id = repo.manifest("vm1").chain_id;
    let outside = tempfile::tempdir().unwrap();
    let precious = b"another VM's data".repeat(100);
    let scratch_name = format!("x.qmpbak-{chain_id}-0004-scratch0.qcow2");
    let links = [
        repo.vm_dir("vm1").join(&scratch_name),
        outside.path().join(&scratch_name),
    ];
    let victims = [outside.path().join("victim0"), outside.path().join("victim1")];
    for (link, victim) in links.iter().zip(&victims) {
        std::fs::write(victim, &precious).unwrap();
        std::os::unix::fs::symlink(victim, link).unwrap();
    }
    let foreign = ["other-tool", "qmpbak-0ther0chain-inc-0001"];
    for name in foreign {
        vm.qmp()
            .execute_raw(
                "block-dirty-bitmap-add",
                Some(serde_json::json!({ "node": "node-disk0", "name": name, "persistent": false })),
            )
            .await
            .unwrap();
    }
    forge_typed_operation(
        &repo,
        "vm1",
        serde_json::json!({
            "id": "backup-0004", "node": "0004", "started": "2026-01-01T00:00:00Z", "pid": 1,
            "host": "elsewhere", "files": [],
            "bitmaps": foreign.iter().map(|n| serde_json::json!({ "node": "node-disk0", "name": n })).collect::<Vec<_>>(),
            "payload": { "kind": "backup", "nbd_server_started": false, "scratch": links },
        }),
    );

    let socket = vm.socket();
    repo.run("vm1", &["cleanup", "--socket", socket.to_str().unwrap()])
        .success();
    for victim in &victims {
        assert_eq!(
            std::fs::read(victim).unwrap(),
            precious,
            "{} was emptied",
            victim.display()
        );
    }
    let left: Vec<String> = vm.bitmaps().await.into_iter().map(|(_, name)| name).collect();
    for name in foreign {
        assert!(left.iter().any(|n| n == name), "{name} was removed: {left:?}");
    }
    assert!(repo.manifest("vm1").operations.is_empty());
    vm.write_pattern("disk0", 0x6b, MIB, MIB).await;
    assert_eq!(repo.backup_report(&vm, "vm1", &[]).method, "bitmap");
}
