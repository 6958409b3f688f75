//! Encryption at rest: an encrypted source disk is never copied decrypted into a repository that is not
//! encrypted unless the user says so; an encrypted repository holds nothing of the guest's data in plaintext,
//! restores every node exactly with its key, and refuses a wrong or missing key without changing anything.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::io::Read as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use integration_tests::cli::{self, Output};
use integration_tests::repo::TestRepo;
use integration_tests::{MIB, TestVm, image};
use qmpbak_engine::snapshot::SnapshotReport;

/// The passphrase of the test VM's encrypted disk.
const DISK_PASSPHRASE: &str = "disk passphrase of the test VM";

/// The byte the guest writes: 64 of them in a row never occur by chance in ciphertext.
const PATTERN: u8 = 0x11;

/// Every regular file below `dir`.
fn files_below(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files_below(&path));
        } else if path.is_file() {
            out.push(path);
        }
    }
    out
}

/// Whether the file holds 64 consecutive bytes of `pattern`.
fn holds_pattern(path: &Path, pattern: u8) -> bool {
    let bytes = std::fs::read(path).unwrap();
    let needle = [pattern; 64];
    bytes.windows(needle.len()).any(|w| w == needle)
}

async fn encrypted_vm() -> TestVm {
    TestVm::builder()
        .encrypted_disk("disk0", 16 * MIB, DISK_PASSPHRASE)
        .start()
        .await
}

#[tokio::test]
async fn an_encrypted_disk_is_refused_by_a_plain_repository_and_nothing_is_written() {
    let vm = encrypted_vm().await;
    vm.write_pattern("disk0", PATTERN, 0, 2 * MIB).await;
    assert!(
        !holds_pattern(&vm.disk_path("disk0"), PATTERN),
        "the source disk is not encrypted"
    );
    let repo = TestRepo::init();
    let out = repo.try_backup(&vm, "vm1", &[]);
    assert_eq!(out.code(), Some(2), "{out:?}");
    assert!(
        out.stderr.contains("disk0") && out.stderr.contains("--allow-plaintext"),
        "{out:?}"
    );
    assert!(
        !repo.vm_dir("vm1").exists(),
        "the refused backup created the VM's directory"
    );
}

#[tokio::test]
async fn an_encrypted_disk_added_to_a_backed_up_vm_is_refused_and_the_manifest_is_unchanged() {
    let vm = TestVm::builder()
        .disk("disk0", 16 * MIB)
        .encrypted_disk("disk1", 16 * MIB, DISK_PASSPHRASE)
        .start()
        .await;
    let repo = TestRepo::init();
    repo.backup_report(&vm, "vm1", &["--exclude", "disk1"]);
    let manifest = repo.vm_dir("vm1").join("manifest.json");
    let before = std::fs::read(&manifest).unwrap();
    let out = repo.try_backup(&vm, "vm1", &[]);
    assert_eq!(out.code(), Some(2), "{out:?}");
    assert!(
        out.stderr.contains("disk1") && !out.stderr.contains("disk0,"),
        "{out:?}"
    );
    assert_eq!(
        before,
        std::fs::read(&manifest).unwrap(),
        "the refused backup changed the manifest"
    );
    assert!(!repo.vm_dir("vm1").join("0002").exists());
}

#[tokio::test]
async fn allow_plaintext_backs_up_an_encrypted_disk_decrypted_and_says_so() {
    let vm = encrypted_vm().await;
    vm.write_pattern("disk0", PATTERN, 0, 2 * MIB).await;
    let dir = tempfile::tempdir().unwrap();
    let reference = dir.path().join("ref.qcow2");
    vm.capture_reference("disk0", &reference).await;
    let repo = TestRepo::init();
    let report = repo.backup_report(&vm, "vm1", &["--allow-plaintext"]);
    assert_eq!(report.plaintext_of_encrypted, ["disk0"]);
    let node = report.node.as_str();
    image::assert_same(&reference, &repo.node_file("vm1", node, "disk0"));
    assert!(holds_pattern(&repo.node_file("vm1", node, "disk0"), PATTERN));
    // The text report says so too.
    vm.write_pattern("disk0", 0x22, 0, MIB).await;
    let text = integration_tests::cli::run_owned(&repo.vm_args(
        "vm1",
        &[
            "backup",
            "--allow-plaintext",
            "--socket",
            vm.socket().to_str().unwrap(),
        ],
    ))
    .success();
    assert!(text.stdout.contains("DECRYPTED"), "{text:?}");
}

/// An encrypted repository made by `qmpbak init --encrypt`, with its key file and a wrong one.
struct EncryptedRepo {
    repo: TestRepo,
    key: PathBuf,
    wrong_key: PathBuf,
    _dir: tempfile::TempDir,
}

impl EncryptedRepo {
    fn init() -> EncryptedRepo {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("repo.key");
        std::fs::write(&key, b"0123456789abcdef0123456789abcdef\n").unwrap();
        let wrong_key = dir.path().join("wrong.key");
        std::fs::write(&wrong_key, b"0123456789abcdef0123456789abcdeX").unwrap();
        let path = dir.path().join("repo");
        let out = cli::run(&[
            "init",
            "--encrypt",
            "--key-file",
            key.to_str().unwrap(),
            path.to_str().unwrap(),
        ]);
        out.success();
        EncryptedRepo {
            repo: TestRepo::at(path),
            key,
            wrong_key,
            _dir: dir,
        }
    }

    fn key_args(&self) -> [&str; 2] {
        ["--key-file", self.key.to_str().unwrap()]
    }

    fn wrong_key_args(&self) -> [&str; 2] {
        ["--key-file", self.wrong_key.to_str().unwrap()]
    }

    /// The LUKS passphrase QEMU's programs get for this repository, derived from its settings and the key.
    fn passphrase(&self) -> Vec<u8> {
        let repo = chain::Repository::open(self.repo.path()).unwrap();
        let keys = repo
            .settings()
            .encryption
            .as_ref()
            .unwrap()
            .unlock(std::fs::read_to_string(&self.key).unwrap().trim_end().as_bytes())
            .unwrap();
        keys.luks_passphrase().as_bytes().to_vec()
    }

    /// `qmpbak ARGS --repo … --vm VM` with the right key.
    fn run(&self, vm: &str, args: &[&str]) -> Output {
        self.repo.run(vm, &[args, &self.key_args()].concat())
    }
}

/// The repository's files and their bytes, to show that a refused command changed nothing.
fn snapshot_files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut files: Vec<_> = files_below(dir)
        .into_iter()
        .filter(|p| {
            p.file_name()
                .is_none_or(|n| !n.to_string_lossy().starts_with("lock"))
        })
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap();
            (p, bytes)
        })
        .collect();
    files.sort();
    files
}

#[tokio::test]
async fn an_encrypted_repository_holds_no_plaintext_and_restores_every_node_with_its_key() {
    // One plain disk and one encrypted one: both are welcome in an encrypted repository.
    let vm = TestVm::builder()
        .disk("disk0", 16 * MIB)
        .encrypted_disk("disk1", 16 * MIB, DISK_PASSPHRASE)
        .start()
        .await;
    let er = EncryptedRepo::init();
    let refs = tempfile::tempdir().unwrap();
    let settings = std::fs::read_to_string(er.repo.path().join("qmpbak-repo.json")).unwrap();
    assert!(
        settings.contains("\"luks\"") && settings.contains("verifier"),
        "{settings}"
    );
    assert!(
        !settings.contains("0123456789abcdef"),
        "the key is in the settings: {settings}"
    );

    vm.write_pattern("disk0", PATTERN, 0, 2 * MIB).await;
    vm.write_pattern("disk1", PATTERN, MIB, 2 * MIB).await;
    let full_refs = vm
        .capture_references(&["disk0", "disk1"], refs.path(), "full")
        .await;
    let full = er.repo.backup_report(&vm, "vm1", &er.key_args());
    assert_eq!(full.level, "full", "{full:?}");
    assert!(full.plaintext_of_encrypted.is_empty(), "{full:?}");

    vm.write_pattern("disk0", PATTERN, 8 * MIB, MIB).await;
    vm.write_pattern("disk1", 0x22, 0, MIB).await;
    let inc_refs = vm
        .capture_references(&["disk0", "disk1"], refs.path(), "inc")
        .await;
    // --compress works in an encrypted repository (QEMU encrypts compressed clusters as well).
    let inc = er
        .repo
        .backup_report(&vm, "vm1", &[&er.key_args()[..], &["--compress"]].concat());
    assert_eq!(inc.level, "incremental", "{inc:?}");

    assert_no_secret_left(&vm).await;
    // Every node file is a LUKS-encrypted qcow2; nothing the guest wrote is in any file of the repository.
    for node in [&full, &inc] {
        for disk in ["disk0", "disk1"] {
            let file = er.repo.node_file("vm1", node.node.as_str(), disk);
            assert_eq!(image::info(&file)["encrypted"], true, "{}", file.display());
        }
    }
    for file in files_below(&er.repo.path()) {
        assert!(
            !holds_pattern(&file, PATTERN),
            "{} holds the guest's data in plaintext",
            file.display()
        );
        assert!(
            !holds_pattern(&file, 0x22),
            "{} holds the guest's data in plaintext",
            file.display()
        );
    }

    let out = tempfile::tempdir().unwrap();
    for (node, refs) in [(&full, &full_refs), (&inc, &inc_refs)] {
        let node = node.node.as_str();
        let dir = out.path().join(node);
        er.run("vm1", &["restore", node, "--to", dir.to_str().unwrap()])
            .success();
        image::assert_same(&refs[0], &dir.join("disk0.qcow2"));
        image::assert_same(&refs[1], &dir.join("disk1.qcow2"));
    }
    er.run("vm1", &["verify"]).success();
}

#[tokio::test]
async fn a_wrong_or_missing_key_fails_with_exit_3_and_changes_nothing() {
    let vm = TestVm::start(&[("disk0", 16 * MIB)]).await;
    let er = EncryptedRepo::init();
    vm.write_pattern("disk0", PATTERN, 0, MIB).await;
    let node = er.repo.backup_node(&vm, "vm1", &er.key_args());
    vm.write_pattern("disk0", 0x22, 0, MIB).await;
    let before = snapshot_files(&er.repo.path());
    let out = tempfile::tempdir().unwrap();
    let to = out.path().join("restored.qcow2");
    let wrong = er.wrong_key_args();
    let attempts: Vec<(&str, Output)> = vec![
        ("backup, wrong key", er.repo.try_backup(&vm, "vm1", &wrong)),
        ("backup, no key", er.repo.try_backup(&vm, "vm1", &[])),
        (
            "restore, wrong key",
            er.repo.run(
                "vm1",
                &["restore", &node, "--to", to.to_str().unwrap(), wrong[0], wrong[1]],
            ),
        ),
        (
            "restore, no key",
            er.repo
                .run("vm1", &["restore", &node, "--to", to.to_str().unwrap()]),
        ),
        (
            "verify, wrong key",
            er.repo.run("vm1", &["verify", wrong[0], wrong[1]]),
        ),
        ("verify, no key", er.repo.run("vm1", &["verify"])),
    ];
    for (what, result) in &attempts {
        assert_eq!(result.code(), Some(3), "{what}: {result:?}");
        assert!(result.stderr.contains("key"), "{what}: {result:?}");
    }
    assert!(!to.exists());
    assert_eq!(
        before,
        snapshot_files(&er.repo.path()),
        "a refused command changed the repository"
    );
    // The right key still works afterwards, from an environment variable too, and from a file descriptor.
    let verified = cli::command_owned(&er.repo.vm_args("vm1", &["verify"]))
        .env("QMPBAK_KEY", "0123456789abcdef0123456789abcdef")
        .output()
        .unwrap();
    assert!(verified.status.success(), "{verified:?}");
    let mut child = cli::command_owned(&er.repo.vm_args("vm1", &["verify", "--key-fd", "0"]))
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"0123456789abcdef0123456789abcdef\n").unwrap();
    }
    cli::wait(child, integration_tests::timeouts::CLI_TIMEOUT).success();
}

#[tokio::test]
async fn a_checksum_diff_backup_into_an_encrypted_repository_compares_keyed_tables() {
    let vm = TestVm::start(&[("disk0", 16 * MIB)]).await;
    let er = EncryptedRepo::init();
    let refs = tempfile::tempdir().unwrap();
    vm.write_pattern("disk0", PATTERN, 0, 4 * MIB).await;
    er.repo.backup_report(&vm, "vm1", &er.key_args());
    // QEMU dies: its persistent bitmaps come back inconsistent, so the next backup compares tables.
    vm.qmp().execute_raw("stop", None).await.unwrap();
    vm.qmp().execute_raw("cont", None).await.unwrap();
    let vm = vm.restart().await;
    vm.write_pattern("disk0", 0x22, 2 * MIB, MIB).await;
    let reference = refs.path().join("ref.qcow2");
    vm.capture_reference("disk0", &reference).await;
    let inc = er.repo.backup_report(&vm, "vm1", &er.key_args());
    assert_eq!(inc.method, "checksum-diff", "{inc:?}");
    // Only the block that changed was copied: the keyed tables matched everywhere else.
    assert_eq!(integration_tests::repo::copied_bytes(&inc), vec![MIB], "{inc:?}");
    for file in files_below(&er.repo.path()) {
        assert!(
            !holds_pattern(&file, PATTERN) && !holds_pattern(&file, 0x22),
            "{}",
            file.display()
        );
    }
    let to = refs.path().join("restored.qcow2");
    er.run(
        "vm1",
        &["restore", inc.node.as_str(), "--to", to.to_str().unwrap()],
    )
    .success();
    image::assert_same(&reference, &to);
    er.run("vm1", &["verify"]).success();
}

#[tokio::test]
async fn encrypt_output_restores_into_luks_images_that_open_with_the_given_key() {
    let vm = TestVm::start(&[("disk0", 16 * MIB)]).await;
    let er = EncryptedRepo::init();
    vm.write_pattern("disk0", PATTERN, 0, 2 * MIB).await;
    let dir = tempfile::tempdir().unwrap();
    let reference = dir.path().join("ref.qcow2");
    vm.capture_reference("disk0", &reference).await;
    let node = er.repo.backup_node(&vm, "vm1", &er.key_args());
    // A path QEMU's option parser would split, for the output and its key.
    let out_key = dir.path().join("out,key");
    std::fs::write(&out_key, b"passphrase of the restored image").unwrap();
    let to = dir.path().join("restored,1.qcow2");
    er.run(
        "vm1",
        &[
            "restore",
            &node,
            "--to",
            to.to_str().unwrap(),
            "--encrypt-output",
            out_key.to_str().unwrap(),
        ],
    )
    .success();
    assert_eq!(image::info(&to)["encrypted"], true);
    assert!(!holds_pattern(&to, PATTERN), "the restored image holds plaintext");
    let plain = dir.path().join("plain.qcow2");
    let key_copy = dir.path().join("out.key");
    std::fs::copy(&out_key, &key_copy).unwrap();
    image::convert_luks_to_qcow2(&to, &key_copy, &plain);
    image::assert_same(&reference, &plain);
    // Raw output cannot be encrypted.
    let raw = dir.path().join("r.raw");
    let refused = er.run(
        "vm1",
        &[
            "restore",
            &node,
            "--to",
            raw.to_str().unwrap(),
            "--format",
            "raw",
            "--encrypt-output",
            out_key.to_str().unwrap(),
        ],
    );
    assert_eq!(refused.code(), Some(2), "{refused:?}");
}

#[tokio::test]
async fn a_live_restore_from_an_encrypted_repository_streams_the_node_and_leaves_no_key_in_qemu() {
    let vm = TestVm::start(&[("disk0", 16 * MIB)]).await;
    let er = EncryptedRepo::init();
    vm.write_pattern("disk0", PATTERN, 0, 2 * MIB).await;
    let dir = tempfile::tempdir().unwrap();
    let reference = dir.path().join("ref.qcow2");
    vm.capture_reference("disk0", &reference).await;
    let node = er.repo.backup_node(&vm, "vm1", &er.key_args());
    let target = TestVm::start_paused(&[("disk0", 16 * MIB)]).await;
    let args = er.repo.live_restore_args(&target.socket(), "vm1", &node, &[]);
    let without_key = cli::run_owned(&args);
    assert_eq!(without_key.code(), Some(3), "{without_key:?}");
    assert!(!target.running().await, "a refused live restore started the VM");
    // At -vv qmpbak logs every QMP command: the secret it gives the VM's QEMU is logged without its data.
    let with_key = [
        args,
        er.key_args().map(str::to_owned).to_vec(),
        vec!["-vv".to_owned()],
    ]
    .concat();
    let out = cli::run_owned(&with_key).success();
    assert!(out.stderr.contains("QMP send"), "{}", out.stderr);
    assert!(
        out.stderr.contains("object-add of a secret (data withheld)"),
        "{}",
        out.stderr
    );
    assert!(
        !out.stderr.contains("\"qom-type\":\"secret\""),
        "a secret's data in the log: {}",
        out.stderr
    );
    let restored = dir.path().join("restored.qcow2");
    target.capture_reference("disk0", &restored).await;
    image::assert_same(&reference, &restored);
    assert_no_secret_left(&target).await;
}

/// Asserts that QEMU holds no secret object of qmpbak's (the repository key) any more.
async fn assert_no_secret_left(vm: &TestVm) {
    let objects = vm
        .qmp()
        .execute_raw("qom-list", Some(serde_json::json!({ "path": "/objects" })))
        .await
        .unwrap();
    assert!(
        !objects.to_string().contains("qmpbak"),
        "qmpbak left a secret in QEMU: {objects}"
    );
}

#[tokio::test]
async fn merge_in_an_encrypted_repository_writes_an_encrypted_synthetic_full_that_restores_exactly() {
    let vm = TestVm::start(&[("disk0", 16 * MIB)]).await;
    let er = EncryptedRepo::init();
    let dir = tempfile::tempdir().unwrap();
    vm.write_pattern("disk0", PATTERN, 0, 2 * MIB).await;
    er.repo.backup_report(&vm, "vm1", &er.key_args());
    vm.write_pattern("disk0", 0x22, MIB, 2 * MIB).await;
    vm.write_zeroes("disk0", 0, 512 << 10).await;
    let reference = dir.path().join("ref.qcow2");
    vm.capture_reference("disk0", &reference).await;
    let inc = er.repo.backup_node(&vm, "vm1", &er.key_args());
    let refused = er.repo.run("vm1", &["merge", &inc]);
    assert_eq!(refused.code(), Some(3), "{refused:?}");
    er.run("vm1", &["merge", &inc]).success();
    let file = er.repo.node_file("vm1", &inc, "disk0");
    assert_eq!(image::info(&file)["encrypted"], true);
    for file in files_below(&er.repo.path()) {
        assert!(
            !holds_pattern(&file, PATTERN) && !holds_pattern(&file, 0x22),
            "{}",
            file.display()
        );
    }
    let to = dir.path().join("restored.qcow2");
    er.run("vm1", &["restore", &inc, "--to", to.to_str().unwrap()])
        .success();
    image::assert_same(&reference, &to);
    er.run("vm1", &["verify"]).success();
}

#[tokio::test]
async fn prune_in_an_encrypted_repository_merges_layers_and_the_kept_node_restores_exactly() {
    let vm = TestVm::start(&[("disk0", 16 * MIB)]).await;
    let er = EncryptedRepo::init();
    let dir = tempfile::tempdir().unwrap();
    vm.write_pattern("disk0", PATTERN, 0, 4 * MIB).await;
    let full = er
        .repo
        .backup_node(&vm, "vm1", &[&er.key_args()[..], &["--tag", "base"]].concat());
    vm.write_pattern("disk0", 0x22, MIB, MIB).await;
    er.repo.backup_report(&vm, "vm1", &er.key_args());
    vm.write_pattern("disk0", 0x33, 3 * MIB, MIB).await;
    let reference = dir.path().join("ref.qcow2");
    vm.capture_reference("disk0", &reference).await;
    let last = er.repo.backup_node(&vm, "vm1", &er.key_args());
    let refused = er.repo.run("vm1", &["prune", "--keep-last", "1"]);
    assert_eq!(refused.code(), Some(3), "{refused:?}");
    let file = er.repo.node_file("vm1", &last, "disk0");
    let restored = |label: &str| {
        let to = dir.path().join(format!("restored-{label}.qcow2"));
        er.run("vm1", &["restore", &last, "--to", to.to_str().unwrap()])
            .success();
        image::assert_same(&reference, &to);
        er.run("vm1", &["verify"]).success();
    };

    // The middle node goes: the last one absorbs it and is based on the full, by a relative path.
    er.run("vm1", &["prune", "--keep-last", "1", "--keep-tag"])
        .success();
    assert_eq!(er.repo.manifest("vm1").nodes.len(), 2);
    assert_eq!(
        image::info(&file)["backing-filename"],
        format!("../{full}/disk0.qcow2")
    );
    restored("middle-gone");
    // Then the full: the last node becomes one.
    er.run("vm1", &["prune", "--keep-last", "1"]).success();
    assert_eq!(er.repo.manifest("vm1").nodes.len(), 1);
    assert_eq!(image::info(&file)["encrypted"], true);
    assert!(image::info(&file)["backing-filename"].is_null());
    for file in files_below(&er.repo.path()) {
        for pattern in [PATTERN, 0x22, 0x33] {
            assert!(!holds_pattern(&file, pattern), "{}", file.display());
        }
    }
    restored("full-gone");
}

#[test]
fn init_wants_a_key_with_encrypt_and_encrypt_with_a_key() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    let key = dir.path().join("key");
    std::fs::write(&key, b"k").unwrap();
    let no_key = cli::command(&["init", "--encrypt", repo.to_str().unwrap()])
        .env_remove("QMPBAK_KEY")
        .output()
        .unwrap();
    assert_eq!(no_key.status.code(), Some(2), "{no_key:?}");
    let no_encrypt = cli::run(&[
        "init",
        "--key-file",
        key.to_str().unwrap(),
        repo.to_str().unwrap(),
    ]);
    assert_eq!(no_encrypt.code(), Some(2), "{no_encrypt:?}");
    assert!(!repo.join("qmpbak-repo.json").exists());
}

/// `qmpbak snapshot ARGS` of `vm` into the encrypted repository, with `key` (nothing, the right or a wrong key).
fn snapshot(er: &EncryptedRepo, vm: &TestVm, args: &[&str], key: &[&str]) -> Output {
    cli::run_owned(
        &er.repo
            .socket_args(&vm.socket(), "vm1", &[&["snapshot"], args, key].concat()),
    )
}

/// Asserts that no file below `dir` holds any of `patterns` in plaintext.
fn assert_no_plaintext(dir: &Path, patterns: &[u8]) {
    for file in files_below(dir) {
        for &pattern in patterns {
            assert!(
                !holds_pattern(&file, pattern),
                "{} holds the guest's 0x{pattern:02x} in plaintext",
                file.display()
            );
        }
    }
}

#[tokio::test]
async fn time_points_copied_into_an_encrypted_repository_are_encrypted_and_restore_exactly_with_the_key() {
    let vm = TestVm::start(&[("disk0", 16 * MIB), ("disk1", 8 * MIB)]).await;
    let er = EncryptedRepo::init();
    let refs = tempfile::tempdir().unwrap();
    let patterns = [PATTERN, 0x22, 0x33];
    // A backup first: time points then stack on nothing of the repository (the first copy is flattened), the
    // later copies on their parent's copy.
    vm.write_pattern("disk0", PATTERN, 0, 2 * MIB).await;
    er.repo.backup_report(&vm, "vm1", &er.key_args());
    let mut points = Vec::new();
    for (i, pattern) in patterns.iter().enumerate() {
        let i = i as u64;
        vm.write_pattern("disk0", *pattern, (i + 1) * 2 * MIB, 2 * MIB)
            .await;
        vm.write_pattern("disk1", *pattern, i * MIB, MIB).await;
        let r = vm
            .capture_references(&["disk0", "disk1"], refs.path(), &format!("p{i}"))
            .await;
        let taken: SnapshotReport = snapshot(&er, &vm, &["--copy"], &er.key_args()).success().report();
        assert!(taken.copied, "{taken:?}");
        points.push((taken.node.clone(), r));
    }
    let manifest = er.repo.manifest("vm1");
    for (i, (node, _)) in points.iter().enumerate() {
        let n = manifest.node(&node.parse().unwrap()).unwrap();
        for d in &n.disks {
            assert!(d.table.is_some(), "{node} {}: no table", d.disk);
            // The first copy is self-contained, the later ones hold their increment over their parent's copy.
            assert_eq!(d.backing.is_some(), i > 0, "{node} {}", d.disk);
            let file = er.repo.node_file("vm1", node, &d.disk);
            assert_eq!(image::info(&file)["encrypted"], true, "{}", file.display());
        }
    }
    // (Encrypted files cannot be mapped without the key: their sizes on disk tell it.)
    let on_disk = |node: &str| {
        use std::os::unix::fs::MetadataExt as _;
        std::fs::metadata(er.repo.node_file("vm1", node, "disk0"))
            .unwrap()
            .blocks()
            * 512
    };
    let (first, last) = (on_disk(&points[0].0), on_disk(&points[2].0));
    assert!(
        last + MIB < first,
        "the last copy ({last} bytes) holds more than its increment (the first, flattened: {first})"
    );
    // The guest's data is nowhere in the repository in plaintext.
    assert_no_plaintext(&er.repo.path(), &patterns);

    // A wrong or missing key: exit 3, nothing changed (in the repository or in the VM).
    let before = snapshot_files(&er.repo.path());
    let out = refs.path().join("out");
    let (node, _) = &points[1];
    let to = out.join("refused.qcow2");
    let to_arg = to.to_str().unwrap();
    let wrong = er.wrong_key_args();
    let attempts = [
        ("snapshot --copy, no key", snapshot(&er, &vm, &["--copy"], &[])),
        (
            "snapshot --copy, wrong key",
            snapshot(&er, &vm, &["--copy"], &wrong),
        ),
        ("snapshot, wrong key", snapshot(&er, &vm, &[], &wrong)),
        (
            "restore, no key",
            er.repo.run("vm1", &["restore", node, "--to", to_arg]),
        ),
        (
            "restore, wrong key",
            er.repo
                .run("vm1", &["restore", node, "--to", to_arg, wrong[0], wrong[1]]),
        ),
    ];
    for (what, result) in &attempts {
        assert_eq!(result.code(), Some(3), "{what}: {result:?}");
    }
    assert!(!to.exists());
    assert_eq!(
        before,
        snapshot_files(&er.repo.path()),
        "a refused command changed the repository"
    );

    // Every time point restores exactly with the key, and verifies.
    for (node, r) in &points {
        let dir = out.join(node);
        er.run("vm1", &["restore", node, "--to", dir.to_str().unwrap()])
            .success();
        for (d, reference) in ["disk0", "disk1"].iter().zip(r) {
            image::assert_same(reference, &dir.join(format!("{d}.qcow2")));
        }
    }
    er.run("vm1", &["verify"]).success();

    // A time point without a copy writes nothing of the guest's into the repository and needs no key.
    vm.write_pattern("disk0", 0x44, 0, MIB).await;
    let plain: SnapshotReport = snapshot(&er, &vm, &[], &[]).success().report();
    assert!(!plain.copied, "{plain:?}");
    let plain_node = plain.node.as_str();
    assert!(!er.repo.vm_dir("vm1").join(plain_node).exists());
    // Prune leaves time points alone; merge refuses them (their chains live partly in the VM's storage).
    er.run("vm1", &["prune", "--keep-last", "1"]).success();
    assert_eq!(er.repo.manifest("vm1").nodes.len(), 1 + points.len() + 1);
    let merged = er.run("vm1", &["merge", &points[2].0]);
    assert_eq!(merged.code(), Some(2), "{merged:?}");
    assert_no_plaintext(&er.repo.path(), &[PATTERN, 0x22, 0x33, 0x44]);
    for (node, r) in &points {
        let dir = out.join(format!("again-{node}"));
        er.run("vm1", &["restore", node, "--to", dir.to_str().unwrap()])
            .success();
        image::assert_same(&r[0], &dir.join("disk0.qcow2"));
    }

    // Back to a copied time point, then a backup (a full: no backup is below a time point's chain): encrypted,
    // and it restores exactly.
    cli::run_owned(
        &er.repo
            .socket_args(&vm.socket(), "vm1", &["revert", &points[1].0]),
    )
    .success();
    vm.write_pattern("disk0", 0x55, 12 * MIB, MIB).await;
    let r = vm
        .capture_references(&["disk0", "disk1"], refs.path(), "after-revert")
        .await;
    let after = er.repo.backup_report(&vm, "vm1", &er.key_args());
    let node = after.node.as_str();
    let dir = out.join(node);
    er.run("vm1", &["restore", node, "--to", dir.to_str().unwrap()])
        .success();
    for (d, reference) in ["disk0", "disk1"].iter().zip(&r) {
        image::assert_same(reference, &dir.join(format!("{d}.qcow2")));
    }
    assert_no_plaintext(&er.repo.path(), &[PATTERN, 0x22, 0x33, 0x44, 0x55]);
    er.run("vm1", &["verify"]).success();
}

#[tokio::test]
async fn a_time_point_of_an_encrypted_disk_is_refused_and_no_new_write_lands_in_plaintext() {
    let vm = encrypted_vm().await;
    vm.write_pattern("disk0", PATTERN, 0, MIB).await;
    // Into a plain repository and into an encrypted one alike: the overlay would be the VM's, not the
    // repository's, and would hold the guest's later writes unencrypted.
    let plain = TestRepo::init();
    let er = EncryptedRepo::init();
    let disk_dir = vm.disk_path("disk0").parent().unwrap().to_owned();
    let files_before: Vec<PathBuf> = files_below(&disk_dir);
    for (what, repo, key) in [
        ("plain repository", &plain, &[][..]),
        ("encrypted repository", &er.repo, &er.key_args()[..]),
    ] {
        for copy in [&[][..], &["--copy"][..]] {
            let out =
                cli::run_owned(&repo.socket_args(&vm.socket(), "vm1", &[&["snapshot"], copy, key].concat()));
            assert_eq!(out.code(), Some(2), "{what} {copy:?}: {out:?}");
            assert!(
                out.stderr.contains("disk0") && out.stderr.contains("encrypted"),
                "{what}: {out:?}"
            );
        }
    }
    assert!(!plain.vm_dir("vm1").join("0001").exists());
    assert!(!er.repo.vm_dir("vm1").join("0001").exists());
    // The guest writes on; its new data is still only in the encrypted image, no overlay appeared.
    vm.write_pattern("disk0", 0x22, 2 * MIB, MIB).await;
    assert_eq!(
        files_before,
        files_below(&disk_dir),
        "a refused snapshot left files beside the disk"
    );
    assert_no_plaintext(&disk_dir, &[PATTERN, 0x22]);
    assert!(vm.running().await);
}

#[tokio::test]
async fn the_key_from_the_environment_is_not_inherited_by_qemu_children() {
    let vm = TestVm::start(&[("disk0", 16 * MIB)]).await;
    let er = EncryptedRepo::init();
    vm.write_pattern("disk0", PATTERN, 0, MIB).await;
    er.repo.backup_report(&vm, "vm1", &er.key_args());
    let key = "0123456789abcdef0123456789abcdef";
    for (var, extra) in [
        ("QMPBAK_KEY", &[][..]),
        ("QB_TEST_KEY", &["--key-env", "QB_TEST_KEY"][..]),
    ] {
        let args = er.repo.vm_args("vm1", &[&["verify"], extra].concat());
        let paused = cli::run_paused_at(&args, "verify-reading", &[(var, Path::new(key))], None);
        // The qemu-storage-daemon serving the verify runs now.
        let children = cli::children_of(paused.pid());
        let mut seen = 0;
        for child in &children {
            let Ok(environ) = std::fs::read(format!("/proc/{child}/environ")) else {
                continue;
            };
            let text = String::from_utf8_lossy(&environ);
            let cmdline = std::fs::read_to_string(format!("/proc/{child}/cmdline")).unwrap_or_default();
            if !cmdline.contains("qemu-storage-daemon") {
                continue;
            }
            assert!(text.contains("PATH="), "{child}: environ unreadable: {text:?}");
            assert!(!text.contains(key), "{var}: child {child} inherited the key");
            assert!(
                !text.contains(&format!("{var}=")),
                "{var}: child {child} inherited {var}"
            );
            seen += 1;
        }
        assert_eq!(seen, 1, "{var}: no qemu-storage-daemon among {children:?}");
        paused.signal(nix::sys::signal::Signal::SIGUSR1);
        paused.finish().success();
    }
}

#[tokio::test]
async fn an_encrypted_prune_killed_between_its_two_rebases_is_finished_by_the_next_one() {
    let vm = TestVm::start(&[("disk0", 16 * MIB)]).await;
    let er = EncryptedRepo::init();
    let dir = tempfile::tempdir().unwrap();
    let patterns = [PATTERN, 0x22, 0x33];
    let mut points = Vec::new();
    for (i, pattern) in patterns.iter().enumerate() {
        vm.write_pattern("disk0", *pattern, i as u64 * MIB, 2 * MIB).await;
        let reference = dir.path().join(format!("ref{i}.qcow2"));
        vm.capture_reference("disk0", &reference).await;
        // The full is tagged and kept: the last node absorbs the middle one over it (two rebases).
        let tag: &[&str] = if i == 0 { &["--tag", "base"] } else { &[] };
        let node = er
            .repo
            .backup_node(&vm, "vm1", &[&er.key_args()[..], tag].concat());
        points.push((node, reference));
    }
    let restores_exactly = |label: &str, kept: &[&(String, PathBuf)]| {
        for (node, reference) in kept {
            let to = dir.path().join(format!("{label}-{node}.qcow2"));
            er.run("vm1", &["restore", node, "--to", to.to_str().unwrap()])
                .success();
            image::assert_same(reference, &to);
        }
        er.run("vm1", &["verify"]).success();
    };
    // The middle node goes: the last one absorbs its layer (the data rebase), and the run dies before the
    // header-only rebase writes the relative backing path.
    let args = er.repo.vm_args(
        "vm1",
        &[&["prune", "--keep-last", "1", "--keep-tag"][..], &er.key_args()].concat(),
    );
    cli::run_crashing_at(
        &args,
        "prune-explicit-rebased",
        integration_tests::timeouts::CLI_TIMEOUT,
    )
    .assert_crashed_at("prune-explicit-rebased");
    let manifest = er.repo.manifest("vm1");
    assert_eq!(manifest.nodes.len(), 3, "no node left the manifest yet");
    assert_eq!(manifest.operations.len(), 1);
    let last = er.repo.node_file("vm1", &points[2].0, "disk0");
    let header = image::info(&last)["backing-filename"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    assert!(
        header.starts_with("json:"),
        "the header was already rewritten: {header}"
    );
    assert_no_plaintext(&er.repo.path(), &patterns);
    restores_exactly("killed", &points.iter().collect::<Vec<_>>());

    // The next prune finishes: the middle node is gone, the header names the full by a relative path again,
    // and both kept nodes restore exactly.
    er.run("vm1", &["prune", "--keep-last", "1", "--keep-tag"])
        .success();
    let manifest = er.repo.manifest("vm1");
    assert!(manifest.operations.is_empty());
    assert_eq!(manifest.nodes.len(), 2, "{manifest:?}");
    assert!(!er.repo.vm_dir("vm1").join(&points[1].0).exists());
    assert_eq!(image::info(&last)["encrypted"], true);
    assert_eq!(
        image::info(&last)["backing-filename"],
        format!("../{}/disk0.qcow2", points[0].0)
    );
    assert_no_plaintext(&er.repo.path(), &patterns);
    // The last node's table was a keyed difference against the middle node's: it was written anew as a keyed
    // difference against the full's (format 3, flags keyed and pieces digests), which the restores and verify
    // above derived.
    let disk = &manifest.node(&points[2].0.parse().unwrap()).unwrap().disks[0];
    let table = disk.table.as_ref().unwrap().to_string();
    assert_eq!(table, format!("{}/disk0.table-on-{}", points[2].0, points[0].0));
    let bytes = std::fs::read(er.repo.vm_dir("vm1").join(&table)).unwrap();
    assert_eq!((bytes[8], bytes[12]), (3, 1 | 2), "a keyed difference table");
    restores_exactly("finished", &[&points[0], &points[2]]);
}

#[tokio::test]
async fn a_commit_of_copied_time_points_in_an_encrypted_repository_needs_the_key_and_keeps_them_exact() {
    let vm = TestVm::start(&[("disk0", 16 * MIB)]).await;
    let er = EncryptedRepo::init();
    let refs = tempfile::tempdir().unwrap();
    let patterns = [PATTERN, 0x22, 0x33];
    let mut points = Vec::new();
    for (i, (pattern, tag)) in patterns.iter().zip(["a", "b", "c"]).enumerate() {
        vm.write_pattern("disk0", *pattern, i as u64 * 2 * MIB, 3 * MIB)
            .await;
        let reference = refs.path().join(format!("{tag}.qcow2"));
        vm.capture_reference("disk0", &reference).await;
        let taken: SnapshotReport = snapshot(&er, &vm, &["--copy", "--tag", tag], &er.key_args())
            .success()
            .report();
        points.push((taken.node.clone(), reference));
    }
    // c's copy must absorb b's copy before b leaves the tree: that needs the key.
    let commit = |key: &[&str]| {
        cli::run_owned(
            &er.repo
                .socket_args(&vm.socket(), "vm1", &[&["commit", "c"], key].concat()),
        )
    };
    let before = snapshot_files(&er.repo.path());
    let refused = commit(&[]);
    assert_eq!(refused.code(), Some(3), "{refused:?}");
    assert_eq!(
        before,
        snapshot_files(&er.repo.path()),
        "a refused commit changed the repository"
    );
    let refused = commit(&er.wrong_key_args());
    assert_eq!(refused.code(), Some(3), "{refused:?}");
    assert_eq!(
        before,
        snapshot_files(&er.repo.path()),
        "a refused commit changed the repository"
    );

    commit(&er.key_args()).success();
    let manifest = er.repo.manifest("vm1");
    assert!(manifest.find("b").is_none());
    assert!(
        !er.repo.vm_dir("vm1").join(&points[1].0).exists(),
        "b's copies stayed"
    );
    let c_file = er.repo.node_file("vm1", &points[2].0, "disk0");
    assert_eq!(image::info(&c_file)["encrypted"], true);
    assert_eq!(
        image::info(&c_file)["backing-filename"],
        format!("../{}/disk0.qcow2", points[0].0)
    );
    assert_no_plaintext(&er.repo.path(), &patterns);
    for (node, reference) in [&points[0], &points[2]] {
        let to = refs.path().join(format!("restored-{node}.qcow2"));
        er.run("vm1", &["restore", node, "--to", to.to_str().unwrap()])
            .success();
        image::assert_same(reference, &to);
    }
    er.run("vm1", &["verify"]).success();
}

#[tokio::test]
async fn an_encrypted_node_mounts_as_an_image_with_the_key_and_not_without() {
    if !Path::new("/dev/fuse").exists() {
        eprintln!("skipped: /dev/fuse is absent, so no FUSE export can be made");
        return;
    }
    let vm = TestVm::start(&[("disk0", 16 * MIB)]).await;
    vm.write_pattern("disk0", PATTERN, MIB, 2 * MIB).await;
    let er = EncryptedRepo::init();
    let refs = tempfile::tempdir().unwrap();
    let reference = refs.path().join("ref.qcow2");
    vm.capture_reference("disk0", &reference).await;
    let node = er.repo.backup_node(&vm, "vm1", &er.key_args());
    let before = snapshot_files(&er.repo.path());
    let dir = tempfile::tempdir().unwrap();
    let dir_arg = dir.path().to_str().unwrap();

    for refused in [
        er.repo.run("vm1", &["mount", &node, dir_arg, "--image-only"]),
        er.repo.run(
            "vm1",
            &[
                &["mount", &node, dir_arg, "--image-only"][..],
                &er.wrong_key_args(),
            ]
            .concat(),
        ),
    ] {
        assert_eq!(refused.code(), Some(3), "{refused:?}");
        assert!(!dir.path().join("disk0.img").exists());
    }
    er.run("vm1", &["mount", &node, dir_arg, "--image-only"])
        .success();
    let img = dir.path().join("disk0.img");
    image::compare(&reference, &img).unwrap();
    // The daemon that serves the mount after qmpbak is gone keeps no descriptor that reads as the key: it read
    // the key once from a pipe (it kept the key's memory file open, which other processes of the user could
    // open through /proc/PID/fd).
    let daemons = cli::processes_mentioning(img.to_str().unwrap());
    assert_eq!(daemons.len(), 1, "the export's daemon: {daemons:?}");
    let secret = er.passphrase();
    for fd in std::fs::read_dir(format!("/proc/{}/fd", daemons[0])).unwrap() {
        let fd = fd.unwrap().path();
        let target = std::fs::read_link(&fd).unwrap_or_default();
        let target = target.to_string_lossy();
        assert!(!target.contains("qmpbak-key"), "{} is {target}", fd.display());
        if target.starts_with("pipe:") || target.starts_with("/memfd:") {
            let mut bytes = Vec::new();
            if let Ok(mut f) = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
                .open(&fd)
            {
                let _ = f.read_to_end(&mut bytes);
            }
            assert_ne!(bytes, secret, "{} ({target}) reads as the key", fd.display());
        }
    }
    cli::run(&["umount", dir_arg]).success();
    assert!(!img.exists());
    assert_eq!(
        snapshot_files(&er.repo.path()),
        before,
        "mount changed the repository"
    );
}

/// The files below `dir` (not following links) whose bytes are exactly `secret`.
fn files_holding(dir: &Path, secret: &[u8]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(kind) = entry.file_type() else { continue };
            if kind.is_dir() {
                dirs.push(entry.path());
            } else if kind.is_file()
                && entry.metadata().is_ok_and(|m| m.len() == secret.len() as u64)
                && std::fs::read(entry.path()).is_ok_and(|bytes| bytes == secret)
            {
                found.push(entry.path());
            }
        }
    }
    found
}

/// A qmpbak killed with SIGKILL while it works on an encrypted repository leaves the repository's LUKS
/// passphrase in no file: QEMU's programs read it from an anonymous memory file that is gone with the last
/// process holding it. Before, it was a file under /dev/shm, removed only when qmpbak ended normally, so every
/// kill (the OOM killer, a service manager's stop timeout) left the key to every node file behind.
#[tokio::test]
async fn a_killed_command_leaves_the_key_in_no_file() {
    let vm = TestVm::start(&[("disk0", 16 * MIB)]).await;
    let er = EncryptedRepo::init();
    vm.write_pattern("disk0", PATTERN, 0, MIB).await;
    er.repo.backup_report(&vm, "vm1", &er.key_args());
    let secret = er.passphrase();
    let places = [PathBuf::from("/dev/shm"), std::env::temp_dir()];
    let holding = || -> Vec<PathBuf> { places.iter().flat_map(|p| files_holding(p, &secret)).collect() };

    let args = er
        .repo
        .vm_args("vm1", &[&["verify"][..], &er.key_args()].concat());
    let paused = cli::run_paused_at(&args, "verify-reading", &[], None);
    // Its qemu-storage-daemon has the key now, and no file holds it.
    assert_eq!(
        holding(),
        Vec::<PathBuf>::new(),
        "the key is in a file while qmpbak runs"
    );
    paused.signal(nix::sys::signal::Signal::SIGKILL);
    let out = paused.finish();
    assert_ne!(out.code(), Some(0), "{out:?}");
    assert_eq!(
        holding(),
        Vec::<PathBuf>::new(),
        "the key is in a file after qmpbak was killed"
    );
    er.run("vm1", &["verify"]).success();
}

/// A backup into an encrypted repository gives the VM's QEMU the repository key for its run (a `secret`
/// object, readable by anyone with the VM's QMP socket). Killed while its jobs copy, the run leaves it there;
/// the next command that finishes the run's record takes it out, with or without the key (`cleanup` needs
/// none), and a backup after that leaves none either.
#[tokio::test]
async fn a_killed_encrypted_backup_leaves_no_key_in_qemu_after_cleanup() {
    let vm = TestVm::start(&[("disk0", 16 * MIB)]).await;
    let er = EncryptedRepo::init();
    vm.write_pattern("disk0", PATTERN, 0, MIB).await;
    er.repo.backup_report(&vm, "vm1", &er.key_args());
    vm.write_pattern("disk0", 0x22, MIB, MIB).await;
    let args = er.repo.backup_args(&vm, "vm1", &er.key_args());
    cli::run_crashing_at(
        &args,
        "backup-jobs-started",
        integration_tests::timeouts::CLI_TIMEOUT,
    )
    .assert_crashed_at("backup-jobs-started");
    let left = vm
        .qmp()
        .execute_raw("qom-list", Some(serde_json::json!({ "path": "/objects" })))
        .await
        .unwrap();
    assert!(left.to_string().contains("qmpbak-repo-key"), "{left}");
    let socket = vm.socket().display().to_string();
    er.repo.run("vm1", &["cleanup", "--socket", &socket]).success();
    assert_no_secret_left(&vm).await;
    er.repo.backup_report(&vm, "vm1", &er.key_args());
    assert_no_secret_left(&vm).await;
}

/// Whoever can write an encrypted repository can rewrite its settings to say it is plain. A user who still gives
/// the key is refused then (exit 3, nothing written): the key used to be ignored for a plain repository, and
/// the next full backup (the manifest told to start over) was stored in plaintext with unkeyed tables.
#[tokio::test]
async fn a_key_given_for_a_repository_whose_settings_say_plain_is_refused() {
    let vm = TestVm::start(&[("disk0", 16 * MIB)]).await;
    let er = EncryptedRepo::init();
    vm.write_pattern("disk0", PATTERN, 0, MIB).await;
    er.repo.backup_report(&vm, "vm1", &er.key_args());
    let settings = er.repo.path().join(chain::repo::SETTINGS_FILE);
    let mut plain: serde_json::Value = serde_json::from_slice(&std::fs::read(&settings).unwrap()).unwrap();
    plain.as_object_mut().unwrap().remove("encryption");
    plain["format_version"] = serde_json::json!(1);
    std::fs::write(&settings, serde_json::to_vec(&plain).unwrap()).unwrap();
    let manifest = er.repo.vm_dir("vm1").join("manifest.json");
    let mut restart: serde_json::Value = serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
    restart["current"] = serde_json::Value::Null;
    std::fs::write(&manifest, serde_json::to_vec(&restart).unwrap()).unwrap();
    let before = snapshot_files(&er.repo.path());

    let with_file = er.repo.try_backup(&vm, "vm1", &er.key_args());
    with_file.assert_failed_saying("is not encrypted");
    assert_eq!(with_file.code(), Some(3), "{with_file:?}");
    let from_env = cli::command_owned(&er.repo.backup_args(&vm, "vm1", &[]))
        .env("QMPBAK_KEY", "0123456789abcdef0123456789abcdef")
        .output()
        .unwrap();
    assert_eq!(from_env.status.code(), Some(3), "{from_env:?}");
    assert!(
        String::from_utf8_lossy(&from_env.stderr).contains("unset QMPBAK_KEY"),
        "{from_env:?}"
    );
    assert_eq!(
        before,
        snapshot_files(&er.repo.path()),
        "a refused backup changed the repository"
    );
}
