//! Behaviour across processes, with children that are this test binary re-run to execute one helper test
//! (`child_*`, which do nothing unless `CHAIN_TEST_CHILD_DIR` is set): a writer SIGKILLed at random moments
//! never leaves a manifest that fails to load; a held lock refuses a second process at once, naming the
//! holder, or lets it wait; and the lock of a killed holder is free again.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use chain::{Error, LockWait, Repository};
use common::{CHILD_DIR, Rng, TestRepo, add, spawn_child};

/// The child's working directory (the repository), when this process is a child.
fn child_dir() -> Option<PathBuf> {
    std::env::var_os(CHILD_DIR).map(PathBuf::from)
}

/// Child: adds nodes to vm1's manifest and saves it, in a loop until killed (or a minute has passed),
/// printing "ready" after the first save.
#[test]
fn child_manifest_writer() {
    let Some(repo) = child_dir() else { return };
    let vm = Repository::open(repo).unwrap().vm("vm1").unwrap();
    let guard = vm
        .lock_exclusive(LockWait::Wait(Duration::from_secs(10)), "manifest writer")
        .unwrap();
    let mut m = vm.load().unwrap();
    let mut first = true;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(60) {
        let parent = m.nodes.last().map(|n| n.id.clone());
        // A long chain with some branches, so that every save rewrites a sizeable file.
        let parent = if m.nodes.len() % 7 == 3 {
            m.nodes.first().map(|n| n.id.clone())
        } else {
            parent
        };
        add(&mut m, parent.as_ref());
        vm.save(&m, &guard).unwrap();
        if first {
            println!("ready");
            std::io::stdout().flush().unwrap();
            first = false;
        }
    }
}

#[test]
fn a_writer_killed_at_any_moment_leaves_a_loadable_manifest() {
    let t = TestRepo::new();
    let mut rng = Rng::seeded();
    let mut last_count = 0;
    let mut interrupted = 0;
    for round in 0..20 {
        let mut child = spawn_child("child_manifest_writer", t.repo.path());
        child.wait_for_line("ready");
        std::thread::sleep(Duration::from_micros(rng.below(40_000)));
        child.kill(); // SIGKILL
        let m = t.vm.load().unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert!(m.nodes.len() > last_count, "round {round}: saves are durable");
        last_count = m.nodes.len();
        let temp = std::fs::read_dir(t.vm.dir())
            .unwrap()
            .any(|e| e.unwrap().file_name().to_string_lossy().ends_with(".tmp"));
        interrupted += usize::from(temp);
    }
    assert!(last_count >= 20);
    // For the record: how often the kill landed while a temporary file existed (mid-write).
    println!("{interrupted} of 20 kills interrupted a write; the manifest has {last_count} nodes");
}

/// Child: takes vm1's exclusive lock, prints "locked", and holds it until its stdin closes.
#[test]
fn child_lock_holder() {
    let Some(repo) = child_dir() else { return };
    let vm = Repository::open(repo).unwrap().vm("vm1").unwrap();
    let _guard = vm
        .lock_exclusive(LockWait::NoWait, "qmpbak backup (test)")
        .unwrap();
    println!("locked");
    std::io::stdout().flush().unwrap();
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
}

#[test]
fn a_second_process_is_refused_at_once_or_waits() {
    let t = TestRepo::new();
    let mut child = spawn_child("child_lock_holder", t.repo.path());
    child.wait_for_line("locked");

    let started = Instant::now();
    let err = t.vm.lock_exclusive(LockWait::NoWait, "second").unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(1), "NoWait does not wait");
    let Error::LockHeld {
        vm,
        holder: Some(holder),
        ..
    } = &err
    else {
        panic!("{err:?}")
    };
    assert_eq!(vm, "vm1");
    assert_eq!(holder.pid, child.pid());
    assert_eq!(holder.command, "qmpbak backup (test)");
    let text = err.to_string();
    assert!(
        text.contains(&format!("pid {}", child.pid())) && text.contains("qmpbak backup (test)"),
        "{text}"
    );
    assert!(!text.contains("stale"), "{text}");
    // Readers are refused too.
    assert!(matches!(
        t.vm.lock_shared(LockWait::NoWait),
        Err(Error::LockHeld { .. })
    ));
    // A short wait runs out.
    let short = t.vm.lock_shared(LockWait::Wait(Duration::from_millis(150)));
    assert!(matches!(short, Err(Error::LockHeld { .. })));

    // Release in 300 ms (closing the child's stdin); a waiting taker gets the lock then.
    let mut stdin = child.child.stdin.take().unwrap();
    let releaser = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        stdin.write_all(b"release\n").unwrap();
    });
    let started = Instant::now();
    let guard =
        t.vm.lock_exclusive(LockWait::Wait(Duration::from_secs(20)), "second")
            .unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(t.vm.lock_holder().unwrap().pid, std::process::id());
    releaser.join().unwrap();
    assert!(child.child.wait().unwrap().success());
    drop(guard);
}

#[test]
fn the_os_releases_a_killed_holders_lock() {
    let t = TestRepo::new();
    let mut child = spawn_child("child_lock_holder", t.repo.path());
    child.wait_for_line("locked");
    assert!(matches!(
        t.vm.lock_exclusive(LockWait::NoWait, "x"),
        Err(Error::LockHeld { .. })
    ));
    let pid = child.pid();
    child.kill(); // SIGKILL: no destructor runs

    // Its holder record is left behind and recognisably stale.
    let stale = t.vm.lock_holder().unwrap();
    assert_eq!(stale.pid, pid);
    assert!(stale.is_dead());
    // The lock itself is free.
    let _guard = t.vm.lock_exclusive(LockWait::NoWait, "after the kill").unwrap();
    assert_eq!(t.vm.lock_holder().unwrap().command, "after the kill");
}
