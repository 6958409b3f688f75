//! Repositories and VM stores: init and open with their refusals, private modes, VM names, the lock a save
//! needs, and paths that try to leave the VM directory.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};

use chain::{Error, LockWait, RelPath, Repository, Settings};
use common::TestRepo;

fn mode(path: &std::path::Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn init_creates_a_private_repository() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a/b/repo");
    let repo = Repository::init(&path).unwrap();
    assert_eq!(repo.settings(), &Settings::default());
    assert_eq!(repo.settings().block_size, 1 << 20);
    assert_eq!(repo.settings().full_every, 7);
    assert_eq!(mode(&path), 0o700);
    assert_eq!(mode(&path.join("qmpbak-repo.json")), 0o600);
    let opened = Repository::open(&path).unwrap();
    assert_eq!(opened.settings(), repo.settings());
    assert!(opened.vms().unwrap().is_empty());

    // An empty existing directory is fine.
    let empty = dir.path().join("empty");
    fs::create_dir(&empty).unwrap();
    let custom = Settings {
        block_size: 64 << 10,
        full_every: 3,
        ..Settings::default()
    };
    let repo = Repository::init_with(&empty, custom.clone()).unwrap();
    assert_eq!(Repository::open(&empty).unwrap().settings(), &custom);
    assert_eq!(repo.path(), empty);
}

#[test]
fn init_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    Repository::init(&repo).unwrap();
    let err = Repository::init(&repo).unwrap_err();
    assert!(matches!(err, Error::AlreadyARepository { .. }), "{err:?}");
    assert!(err.to_string().contains(&repo.display().to_string()), "{err}");

    let full = dir.path().join("full");
    fs::create_dir(&full).unwrap();
    fs::write(full.join("something"), b"x").unwrap();
    let err = Repository::init(&full).unwrap_err();
    assert!(matches!(err, Error::DirectoryNotEmpty { .. }), "{err:?}");
    assert!(err.to_string().contains("not empty"), "{err}");

    let file = dir.path().join("file");
    fs::write(&file, b"x").unwrap();
    assert!(matches!(
        Repository::init(&file),
        Err(Error::NotADirectory { .. })
    ));

    for bad in [1000, 32 << 10, 32 << 20, (1 << 20) + 1] {
        let settings = Settings {
            block_size: bad,
            ..Settings::default()
        };
        let err = Repository::init_with(dir.path().join("x"), settings).unwrap_err();
        assert!(matches!(err, Error::InvalidBlockSize { .. }), "{bad}: {err:?}");
    }
}

#[test]
fn open_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let err = Repository::open(dir.path()).unwrap_err();
    assert!(matches!(err, Error::NotARepository { .. }), "{err:?}");
    assert!(err.to_string().contains("qmpbak init"), "{err}");
    assert!(matches!(
        Repository::open(dir.path().join("missing")),
        Err(Error::NotARepository { .. })
    ));
    let file = dir.path().join("file");
    fs::write(&file, b"x").unwrap();
    assert!(matches!(
        Repository::open(&file),
        Err(Error::NotARepository { .. })
    ));

    let settings = dir.path().join("qmpbak-repo.json");
    fs::write(
        &settings,
        b"{\n \"format_version\": 1,\n \"block_size\": \"big\"\n}",
    )
    .unwrap();
    let err = Repository::open(dir.path()).unwrap_err();
    assert!(matches!(err, Error::SettingsInvalid { .. }), "{err:?}");
    assert!(err.to_string().contains("line 3"), "{err}");

    fs::write(&settings, br#"{"format_version": 1, "block_size": 1000}"#).unwrap();
    let err = Repository::open(dir.path()).unwrap_err();
    assert!(matches!(err, Error::SettingsInvalid { .. }), "{err:?}");
    assert!(err.to_string().contains("1000"), "{err}");

    fs::write(&settings, br#"{"format_version": 3}"#).unwrap();
    let err = Repository::open(dir.path()).unwrap_err();
    assert!(matches!(err, Error::RepositoryTooNew { found: 3, .. }), "{err:?}");
    assert!(err.to_string().contains("newer qmpbak"), "{err}");

    // Defaults fill in what an older file leaves out; unknown fields are ignored.
    fs::write(&settings, br#"{"format_version": 1, "comment": "hi"}"#).unwrap();
    assert_eq!(
        Repository::open(dir.path()).unwrap().settings(),
        &Settings::default()
    );
}

#[test]
fn vms_are_created_listed_and_named_safely() {
    let t = TestRepo::new();
    assert_eq!(mode(t.vm.dir()), 0o700);
    assert_eq!(mode(&t.vm.manifest_path()), 0o600);
    let m = t.vm.load().unwrap();
    assert_eq!(m.vm, "vm1");
    assert!(m.nodes.is_empty() && m.current.is_none());

    let err = t.repo.create_vm("vm1").unwrap_err();
    assert!(matches!(err, Error::VmExists { .. }), "{err:?}");
    assert_eq!(t.vm.load().unwrap(), m, "the existing manifest is untouched");

    t.repo.create_vm("a-vm").unwrap();
    fs::create_dir(t.repo.path().join("not-a-vm")).unwrap();
    fs::write(t.repo.path().join("stray-file"), b"").unwrap();
    assert_eq!(t.repo.vms().unwrap(), ["a-vm", "vm1"]);

    for bad in ["", "..", ".", "a/b", "/abs", ".hidden", "with space"] {
        let err = t.repo.vm(bad).unwrap_err();
        assert!(
            matches!(err, Error::InvalidName { what: "VM name", .. }),
            "{bad:?}: {err:?}"
        );
        assert!(
            matches!(t.repo.create_vm(bad), Err(Error::InvalidName { .. })),
            "{bad:?}"
        );
    }
    let err = t.repo.vm("ghost").unwrap_err();
    assert!(matches!(err, Error::VmNotFound { .. }), "{err:?}");
    assert!(err.to_string().contains("ghost"), "{err}");

    // A directory left without a manifest by a crash is no VM yet, and is taken over.
    let half = t.repo.path().join("half");
    fs::create_dir(&half).unwrap();
    fs::write(half.join("lock"), b"").unwrap();
    fs::write(half.join(".manifest.json.aB3xYz.tmp"), b"{").unwrap();
    assert!(matches!(t.repo.vm("half"), Err(Error::VmNotFound { .. })));
    t.repo.create_vm("half").unwrap().load().unwrap();
    // One that lost its manifest but still has backups is reported, not started afresh.
    let vm1 = t.repo.vm("vm1").unwrap();
    fs::create_dir(vm1.dir().join("0001")).unwrap();
    fs::remove_file(vm1.manifest_path()).unwrap();
    let err = t.repo.vm("vm1").unwrap().load().unwrap_err();
    assert!(matches!(err, Error::ManifestMissing { .. }), "{err:?}");
    let err = t.repo.create_vm("vm1").unwrap_err();
    assert!(matches!(err, Error::VmDirectoryNotEmpty { .. }), "{err:?}");
    assert!(err.to_string().contains("restore its manifest.json"), "{err}");
}

#[test]
fn saving_needs_this_vms_exclusive_lock() {
    let t = TestRepo::new();
    let other = t.repo.create_vm("vm2").unwrap();
    let m = t.vm.load().unwrap();
    let shared = t.vm.lock_shared(LockWait::NoWait).unwrap();
    let err = t.vm.save(&m, &shared).unwrap_err();
    assert!(matches!(err, Error::LockNotExclusive { .. }), "{err:?}");
    drop(shared);
    let foreign = other.lock_exclusive(LockWait::NoWait, "test").unwrap();
    assert!(matches!(
        t.vm.save(&m, &foreign),
        Err(Error::LockOfOtherVm { .. })
    ));
    let guard = t.vm.lock_exclusive(LockWait::NoWait, "test").unwrap();
    assert_eq!(t.vm.lock_holder().unwrap().command, "test");
    // Stale temporary files of a writer that died are cleaned up by the next save.
    let stale = t.vm.dir().join(".manifest.json.XyZ123.tmp");
    fs::write(&stale, b"half a manif").unwrap();
    t.vm.save(&m, &guard).unwrap();
    assert!(!stale.exists());
    assert_eq!(t.vm.load().unwrap(), m);
}

#[test]
fn node_dirs() {
    let t = TestRepo::new();
    let id = chain::NodeId::new("0001").unwrap();
    assert_eq!(t.vm.node_dir(&id), t.vm.dir().join("0001"));
    let dir = t.vm.create_node_dir(&id).unwrap();
    assert_eq!(mode(&dir), 0o700);
    t.vm.create_node_dir(&id).unwrap();
}

#[test]
fn resolve_stays_inside_the_vm_directory() {
    let t = TestRepo::new();
    let outside = t.dir.path().join("outside");
    fs::create_dir(&outside).unwrap();
    let rel = |s: &str| RelPath::new(s).unwrap();

    // Plain paths, existing or not.
    assert_eq!(
        t.vm.resolve(&rel("0001/disk0.qcow2")).unwrap(),
        t.vm.dir().join("0001/disk0.qcow2")
    );
    fs::create_dir(t.vm.dir().join("0001")).unwrap();
    fs::write(t.vm.dir().join("0001/disk0.qcow2"), b"").unwrap();
    t.vm.resolve(&rel("0001/disk0.qcow2")).unwrap();

    // A symlink that stays inside is fine.
    symlink(t.vm.dir().join("0001"), t.vm.dir().join("0002")).unwrap();
    t.vm.resolve(&rel("0002/disk0.qcow2")).unwrap();

    // Out through a directory symlink, a file symlink, or a dangling one: refused.
    symlink(&outside, t.vm.dir().join("0003")).unwrap();
    let err = t.vm.resolve(&rel("0003/disk0.qcow2")).unwrap_err();
    assert!(matches!(err, Error::PathEscapes { .. }), "{err:?}");
    assert!(err.to_string().contains("outside the VM directory"), "{err}");
    symlink("/etc/passwd", t.vm.dir().join("0001/disk1.qcow2")).unwrap();
    assert!(matches!(
        t.vm.resolve(&rel("0001/disk1.qcow2")),
        Err(Error::PathEscapes { .. })
    ));
    symlink(outside.join("nothing-yet"), t.vm.dir().join("0001/disk2.qcow2")).unwrap();
    assert!(matches!(
        t.vm.resolve(&rel("0001/disk2.qcow2")),
        Err(Error::PathEscapes { .. })
    ));
    // Up and out through the repository: a symlink to the parent of the VM directory.
    symlink("..", t.vm.dir().join("up")).unwrap();
    assert!(matches!(
        t.vm.resolve(&rel("up/vm1/manifest.json")),
        Err(Error::PathEscapes { .. })
    ));
}

#[test]
fn a_default_retention_is_saved_in_the_settings_and_absent_when_unset() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r");
    let mut repo = Repository::init(&path).unwrap();
    let file = path.join(chain::repo::SETTINGS_FILE);
    assert!(!fs::read_to_string(&file).unwrap().contains("retention"));
    assert_eq!(repo.settings().retention, None);

    let policy = chain::Policy {
        keep_daily: 7,
        keep_tagged: true,
        ..chain::Policy::default()
    };
    let mut settings = repo.settings().clone();
    settings.retention = Some(policy);
    repo.save_settings(settings.clone()).unwrap();
    assert_eq!(Repository::open(&path).unwrap().settings(), &settings);

    // A partial policy (as a person might write it by hand) reads with the other rules off.
    let text = fs::read_to_string(&file)
        .unwrap()
        .replace("\"keep_last\": 0,", "");
    fs::write(&file, text).unwrap();
    assert_eq!(
        Repository::open(&path).unwrap().settings().retention,
        Some(policy)
    );

    let mut other_block = settings;
    other_block.block_size = 64 << 10;
    let err = repo.save_settings(other_block).unwrap_err();
    assert!(matches!(err, Error::SettingsInvalid { .. }), "{err:?}");
}
