//! Hostile and awkward input from outside the repository: paths that a shell or QEMU's option parser would
//! misread, the modes of what qmpbak creates, and a QMP socket the user may not open.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

use integration_tests::repo::TestRepo;
use integration_tests::{MIB, TestVm, cli, image};

#[tokio::test]
async fn paths_with_shell_and_qemu_metacharacters_are_only_ever_data() {
    let vm = TestVm::start(&[("disk0", 16 * MIB)]).await;
    let dir = tempfile::tempdir().unwrap();
    // Commas split QEMU options, quotes and $ mean things to a shell, spaces split words.
    let repo = dir.path().join("a,b \"c\" $HOME; rm -rf x 'd'");
    cli::run(&["init", repo.to_str().unwrap()]).success();
    let repo = TestRepo::at(repo);
    vm.write_pattern("disk0", 0x5a, 0, 4 * MIB).await;
    repo.backup(&vm, "vm1", &[]);
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
    repo.backup(&vm, "vm1", &[]);
    vm.write_pattern("disk0", 0x22, 0, MIB).await;
    repo.backup(&vm, "vm1", &[]);
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
async fn a_lock_file_that_is_a_symlink_is_refused_and_nothing_is_created_outside() {
    let vm = TestVm::start(&[("disk0", 16 * MIB)]).await;
    let repo = TestRepo::init();
    vm.write_pattern("disk0", 0x33, 0, MIB).await;
    repo.backup(&vm, "vm1", &[]);
    let outside = tempfile::tempdir().unwrap();
    let target = outside.path().join("created-by-qmpbak");
    let lock = repo.vm_dir("vm1").join("lock");
    std::fs::remove_file(&lock).unwrap();
    std::os::unix::fs::symlink(&target, &lock).unwrap();

    let failures = [
        cli::run_owned(&repo.backup_args(&vm, "vm1", &[])),
        cli::run(&["list", repo.vm_dir("vm1").to_str().unwrap()]),
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
    let report = out.json();
    let error = report["nodes"][0]["disks"][0]["error"]
        .as_str()
        .unwrap_or_default();
    assert!(
        error.contains(&format!("disk of {} bytes", 1u64 << 50))
            && error.contains(&format!("covers {} bytes", 16 * MIB)),
        "{report}"
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
    repo.backup(&vm, "vm1", &[]);
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
