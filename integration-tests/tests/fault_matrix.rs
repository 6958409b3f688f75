//! The fault-injection matrix: each cell breaks one thing at one step of a backup, on purpose, with real QEMU,
//! and then checks what every cell must give: a clear error and exit code, a VM that still runs (unless it was
//! the one killed), a manifest that loads, nothing of qmpbak's left in QEMU or the repository after the next
//! run, a following backup that is exact, and earlier nodes that still verify. The matrix is data; one driver
//! walks it and prints a summary table.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use integration_tests::pki::{TestPki, free_port};
use integration_tests::repo::{TestRepo, assert_no_leftovers, expected_bitmaps};
use integration_tests::timeouts::{BLOCK_JOB_TIMEOUT, CLI_CRASH_TIMEOUT, CLI_TIMEOUT, PROCESS_EXIT_TIMEOUT};
use integration_tests::{MIB, TestVm, cli, image};
use nix::sys::signal::Signal;
use qmp::EventFilter;

const VM: &str = "vm1";

#[derive(Debug, Clone, Copy, PartialEq)]
enum Fault {
    SourceReadError,
    TargetNoSpace,
    TargetWriteError,
    ManifestNoSpace,
    KillQmpbak(&'static str),
    KillQemu,
    QemuQuits,
    Sigint,
    SecondQmpbak,
    StaleLock,
    BitmapDeleted,
    BitmapInconsistent,
    BitmapBusy,
    BitmapRenamed,
    /// A pull over loopback TLS (`--pull`, QEMU's NBD server) killed at a crash point of the pull path.
    PullKill(&'static str),
    /// A pull whose NBD server goes away (stopped in QEMU) before qmpbak reads: as a network gone between.
    PullNbdServerGone,
    /// A live restore into a paused VM on this host (`--socket`) killed at a crash point.
    LiveKill(&'static str),
    /// A live restore on this host signalled while streaming.
    LiveSignal(Signal),
    /// A live restore across hosts (`--qmp tls://`, the chain served over loopback TLS) killed at a crash point.
    LiveServedKill(&'static str),
    /// A live restore across hosts signalled while streaming.
    LiveServedSignal(Signal),
}

impl Fault {
    fn is_pull(self) -> bool {
        matches!(self, Fault::PullKill(_) | Fault::PullNbdServerGone)
    }

    fn is_live(self) -> bool {
        matches!(
            self,
            Fault::LiveKill(_) | Fault::LiveSignal(_) | Fault::LiveServedKill(_) | Fault::LiveServedSignal(_)
        )
    }
}

/// One cell: the fault, the step it hits, and what the faulty run must end with.
struct Cell {
    fault: Fault,
    step: &'static str,
    /// Exit code of the run that meets the fault (0: the run copes, e.g. with a checksum-diff).
    exit: i32,
    /// Words its error (or its reason, when it copes) must contain.
    says: &'static str,
    /// The method of the following backup.
    next_method: &'static str,
}

#[rustfmt::skip]
const MATRIX: &[Cell] = &[
    Cell { fault: Fault::SourceReadError,                     step: "during job",     exit: 5,   says: "disk0",                    next_method: "bitmap" },
    Cell { fault: Fault::TargetNoSpace,                       step: "during job",     exit: 1,   says: "No space left",            next_method: "bitmap" },
    Cell { fault: Fault::TargetWriteError,                    step: "during job",     exit: 5,   says: "Input/output error",       next_method: "bitmap" },
    Cell { fault: Fault::ManifestNoSpace,                     step: "manifest write", exit: 1,   says: "manifest",                 next_method: "bitmap" },
    Cell { fault: Fault::KillQmpbak("backup-begun"),          step: "before job",     exit: -1,  says: "backup-begun",             next_method: "bitmap" },
    Cell { fault: Fault::KillQmpbak("backup-jobs-started"),   step: "during job",     exit: -1,  says: "backup-jobs-started",      next_method: "bitmap" },
    Cell { fault: Fault::KillQmpbak("backup-copied"),         step: "after job",      exit: -1,  says: "backup-copied",            next_method: "bitmap" },
    Cell { fault: Fault::KillQmpbak("backup-tables-written"), step: "manifest write", exit: -1,  says: "backup-tables-written",    next_method: "bitmap" },
    Cell { fault: Fault::KillQemu,                            step: "during job",     exit: 5,   says: "QEMU",                     next_method: "checksum-diff" },
    Cell { fault: Fault::QemuQuits,                           step: "during job",     exit: 5,   says: "QEMU",                     next_method: "bitmap" },
    Cell { fault: Fault::Sigint,                              step: "during job",     exit: 130, says: "interrupted",              next_method: "bitmap" },
    Cell { fault: Fault::SecondQmpbak,                        step: "during job",     exit: 4,   says: "lock",                     next_method: "bitmap" },
    Cell { fault: Fault::StaleLock,                           step: "before job",     exit: 0,   says: "bitmaps relative",         next_method: "bitmap" },
    Cell { fault: Fault::BitmapDeleted,                       step: "before job",     exit: 0,   says: "is missing",               next_method: "bitmap" },
    Cell { fault: Fault::BitmapInconsistent,                  step: "before job",     exit: 0,   says: "inconsistent",             next_method: "bitmap" },
    Cell { fault: Fault::BitmapBusy,                          step: "before job",     exit: 0,   says: "busy",                     next_method: "bitmap" },
    Cell { fault: Fault::BitmapRenamed,                       step: "before job",     exit: 0,   says: "relative to another node", next_method: "bitmap" },
    Cell { fault: Fault::PullKill("pull-recorded"),           step: "before QEMU",    exit: -1,  says: "pull-recorded",            next_method: "bitmap" },
    Cell { fault: Fault::PullKill("pull-scratch-added"),      step: "scratch made",   exit: -1,  says: "pull-scratch-added",       next_method: "bitmap" },
    Cell { fault: Fault::PullKill("pull-view-started"),       step: "fleece running", exit: -1,  says: "pull-view-started",        next_method: "bitmap" },
    Cell { fault: Fault::PullKill("pull-server-started"),     step: "NBD server up",  exit: -1,  says: "pull-server-started",      next_method: "bitmap" },
    Cell { fault: Fault::PullKill("pull-exported"),           step: "views exported", exit: -1,  says: "pull-exported",            next_method: "bitmap" },
    Cell { fault: Fault::PullKill("pull-copied"),             step: "after copy",     exit: -1,  says: "pull-copied",              next_method: "bitmap" },
    Cell { fault: Fault::PullNbdServerGone,                   step: "before copy",    exit: 5,   says: "NBD export",               next_method: "bitmap" },
    // Live restore (`run_live_cell`): after the fault and `cleanup`, no record, export, NBD server, block node
    // or serving daemon is left, the VM runs on its own disks equal to the node (and the next backup is an
    // exact incremental); a kill before the VM took the chain leaves its disks empty, and the restore run
    // again is exact.
    Cell { fault: Fault::LiveKill("restore-checking-empty"),        step: "checking empty", exit: -1, says: "restore-checking-empty", next_method: "bitmap" },
    Cell { fault: Fault::LiveKill("restore-attached"),              step: "chain attached", exit: -1, says: "restore-attached",       next_method: "bitmap" },
    Cell { fault: Fault::LiveKill("restore-streaming"),             step: "streaming",      exit: -1, says: "restore-streaming",      next_method: "bitmap" },
    Cell { fault: Fault::LiveSignal(Signal::SIGINT),                step: "streaming",      exit: 130, says: "cleanup --socket",      next_method: "bitmap" },
    Cell { fault: Fault::LiveSignal(Signal::SIGTERM),               step: "streaming",      exit: 130, says: "cleanup --socket",      next_method: "bitmap" },
    Cell { fault: Fault::LiveServedKill("restore-checking-empty"),  step: "checking empty", exit: -1, says: "restore-checking-empty", next_method: "bitmap" },
    Cell { fault: Fault::LiveServedKill("restore-attached"),        step: "chain attached", exit: -1, says: "restore-attached",       next_method: "bitmap" },
    Cell { fault: Fault::LiveServedKill("restore-streaming"),       step: "streaming",      exit: -1, says: "restore-streaming",      next_method: "bitmap" },
    Cell { fault: Fault::LiveServedSignal(Signal::SIGINT),          step: "streaming",      exit: 130, says: "finished first",        next_method: "bitmap" },
    Cell { fault: Fault::LiveServedSignal(Signal::SIGTERM),         step: "streaming",      exit: 130, says: "finished first",        next_method: "bitmap" },
];
// The network dropping mid-pull needs two network namespaces: tests/pull_network.rs.

/// A small tmpfs for the repository, for the out-of-space cells (needs root).
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(dir).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "tmpfs"])
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Tmpfs { dir: dir.to_owned() })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.dir)
            .status();
    }
}

fn spawn_backup(
    repo: &TestRepo,
    vm: &TestVm,
    extra: &[&str],
    env: Option<(&str, &str)>,
) -> std::process::Child {
    let args = repo.backup_args(vm, VM, extra);
    let mut cmd = cli::command(&args.iter().map(String::as_str).collect::<Vec<_>>());
    if let Some((k, v)) = env {
        cmd.env(k, v);
    }
    cmd.spawn().unwrap()
}

async fn wait_running(events: &mut qmp::EventStream) {
    let deadline = tokio::time::Instant::now() + BLOCK_JOB_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if events.next_timeout(left).await.expect("a backup job starts").data["status"] == "running" {
            return;
        }
    }
}

/// The host offset of guest offset `guest` in a qcow2 image (the VM paused or stopped).
fn host_offset(image_path: &Path, guest: u64) -> u64 {
    let out = image::qemu_img(&["map", "-U", "--output=json", image_path.to_str().unwrap()]);
    let map: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    let e = map
        .iter()
        .find(|e| {
            let start = e["start"].as_u64().unwrap();
            start <= guest && guest < start + e["length"].as_u64().unwrap() && e["data"] == true
        })
        .expect("guest offset is allocated");
    e["offset"].as_u64().unwrap() + (guest - e["start"].as_u64().unwrap())
}

/// Disk `disk`'s incremental bitmap relative to `node`.
fn bitmap(repo: &TestRepo, disk: &str, node: &str) -> String {
    integration_tests::repo::bitmap_name(&repo.manifest(VM), disk, "inc", node)
}

/// Runs one cell; `Err` describes what went wrong.
async fn run_cell(cell: &Cell, work: &Path) -> Result<(), String> {
    if cell.fault.is_live() {
        return run_live_cell(cell, work).await;
    }
    let mut tmpfs = None;
    let repo = if matches!(cell.fault, Fault::TargetNoSpace | Fault::ManifestNoSpace) {
        let mount = Tmpfs::mount(&work.join("small"), "64M").ok_or("mounting a tmpfs needs root")?;
        let repo_dir = mount.dir.join("repo");
        cli::run(&["init", repo_dir.to_str().unwrap()]).success();
        tmpfs = Some(mount);
        TestRepo::at(repo_dir)
    } else {
        TestRepo::init()
    };
    let pki = TestPki::loopback();
    let pull: Vec<String> = if cell.fault.is_pull() {
        vec![
            "--pull".into(),
            "--nbd-listen".into(),
            format!("127.0.0.1:{}", free_port()),
            "--tls-dir".into(),
            pki.path("client").display().to_string(),
        ]
    } else {
        Vec::new()
    };
    let pull_args: Vec<&str> = pull.iter().map(String::as_str).collect();
    let mut vm = TestVm::builder()
        .disk("disk0", 16 * MIB)
        .disk("disk1", 8 * MIB)
        .arg("-object")
        .arg(&pki.server_object("tls0"))
        .start()
        .await;
    vm.write_pattern("disk0", 0x11, 0, 8 * MIB).await;
    vm.write_pattern("disk1", 0x22, 0, 2 * MIB).await;
    let full = repo.backup(&vm, VM, &pull_args);
    let full_id = full["node"].as_str().unwrap().to_owned();
    vm.write_pattern("disk0", 0x33, 4 * MIB, 4 * MIB).await;
    vm.write_pattern("disk1", 0x44, MIB, MIB).await;

    // Meet the fault.
    let slow = (MIB / 2).to_string();
    let outcome = match cell.fault {
        Fault::SourceReadError => {
            vm.qmp().execute_raw("stop", None).await.unwrap();
            let host = host_offset(&vm.disk_path("disk0"), 5 * MIB);
            vm.quit().await;
            let rules =
                serde_json::json!([{ "event": "read_aio", "errno": 5, "sector": host / 512, "once": false }]);
            vm = vm.restart_with(|b| b.inject_errors("disk0", rules)).await;
            repo.try_backup(&vm, VM, &[])
        }
        Fault::TargetNoSpace | Fault::ManifestNoSpace => {
            // Fill the small filesystem: 1 MiB left lets the manifest be written but not the copied data.
            let dir = tmpfs.as_ref().unwrap().dir.clone();
            let free = nix::sys::statvfs::statvfs(dir.as_path()).unwrap();
            let headroom = if cell.fault == Fault::TargetNoSpace {
                MIB
            } else {
                0
            };
            let bytes = (free.blocks_available() * free.fragment_size()).saturating_sub(headroom);
            let _ = std::fs::write(dir.join("filler"), vec![0u8; bytes as usize]);
            let out = repo.try_backup(&vm, VM, &[]);
            std::fs::remove_file(dir.join("filler")).unwrap();
            out
        }
        Fault::TargetWriteError => {
            let child = spawn_backup(&repo, &vm, &[], Some(("QMPBAK_INJECT_TARGET_EIO", "1")));
            cli::wait(child, CLI_TIMEOUT)
        }
        Fault::KillQmpbak(point) | Fault::PullKill(point) => {
            let child = spawn_backup(&repo, &vm, &pull_args, Some(("QMPBAK_CRASH_AT", point)));
            cli::wait(child, CLI_TIMEOUT)
        }
        Fault::PullNbdServerGone => {
            let paused =
                cli::run_paused_at(&repo.backup_args(&vm, VM, &pull_args), "pull-exported", &[], None);
            vm.qmp().execute_raw("nbd-server-stop", None).await.unwrap();
            paused.signal(nix::sys::signal::Signal::SIGUSR1);
            paused.finish()
        }
        Fault::KillQemu | Fault::QemuQuits | Fault::Sigint | Fault::SecondQmpbak => {
            let mut events = vm.qmp().subscribe(EventFilter::names(&["JOB_STATUS_CHANGE"]));
            let child = spawn_backup(&repo, &vm, &["--speed-limit", &slow], None);
            wait_running(&mut events).await;
            match cell.fault {
                Fault::KillQemu => {
                    vm.qmp().execute_raw("stop", None).await.unwrap(); // flush the guest's data first
                    vm.kill();
                }
                Fault::QemuQuits => vm.quit().await,
                Fault::Sigint => {
                    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
                    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
                }
                _ => {
                    let second = repo.try_backup(&vm, VM, &[]);
                    cli::wait(child, CLI_TIMEOUT).success();
                    return check(cell, &second, vm, &repo, work, &full_id, &pull_args).await;
                }
            }
            cli::wait(child, CLI_TIMEOUT)
        }
        Fault::StaleLock => {
            let holder = serde_json::json!({"pid": 999_999, "command": "backup", "host": "elsewhere",
                                            "since": "2026-01-01T00:00:00Z"});
            std::fs::write(repo.vm_dir(VM).join("lock.holder.json"), holder.to_string()).unwrap();
            repo.try_backup(&vm, VM, &[])
        }
        Fault::BitmapDeleted | Fault::BitmapRenamed | Fault::BitmapBusy | Fault::BitmapInconsistent => {
            let name = bitmap(&repo, "disk0", &full_id);
            match cell.fault {
                Fault::BitmapDeleted | Fault::BitmapRenamed => {
                    for disk in ["disk0", "disk1"] {
                        let node = format!("node-{disk}");
                        let args = serde_json::json!({"node": node, "name": bitmap(&repo, disk, &full_id)});
                        vm.qmp()
                            .execute_raw("block-dirty-bitmap-remove", Some(args))
                            .await
                            .unwrap();
                        if cell.fault == Fault::BitmapRenamed {
                            let args = serde_json::json!({"node": node, "name": bitmap(&repo, disk, "0999"),
                                                          "persistent": true});
                            vm.qmp()
                                .execute_raw("block-dirty-bitmap-add", Some(args))
                                .await
                                .unwrap();
                        }
                    }
                }
                Fault::BitmapBusy => {
                    // A leftover job holds the bitmap.
                    vm.qmp()
                        .execute_raw(
                            "blockdev-add",
                            Some(serde_json::json!({"driver": "null-co", "node-name": "sink",
                                                                             "size": 16 * MIB})),
                        )
                        .await
                        .unwrap();
                    vm.qmp()
                        .execute_raw(
                            "blockdev-backup",
                            Some(serde_json::json!({"job-id": "leftover",
                            "device": "node-disk0", "target": "sink", "sync": "bitmap", "bitmap": name,
                            "bitmap-mode": "never", "speed": 1, "auto-dismiss": false})),
                        )
                        .await
                        .unwrap();
                }
                _ => {
                    // Stored once (a clean quit), loaded again (marked in use in the image), then QEMU dies.
                    vm.quit().await;
                    vm = vm.restart().await;
                    vm.qmp().execute_raw("stop", None).await.unwrap();
                    vm.qmp().execute_raw("cont", None).await.unwrap();
                    vm = vm.restart().await;
                }
            }
            repo.try_backup(&vm, VM, &[])
        }
        Fault::LiveKill(_) | Fault::LiveSignal(_) | Fault::LiveServedKill(_) | Fault::LiveServedSignal(_) => {
            unreachable!("live restore cells run in run_live_cell")
        }
    };
    check(cell, &outcome, vm, &repo, work, &full_id, &pull_args).await
}

/// The expectations every cell shares.
async fn check(
    cell: &Cell,
    outcome: &cli::Output,
    mut vm: TestVm,
    repo: &TestRepo,
    work: &Path,
    full_id: &str,
    pull: &[&str],
) -> Result<(), String> {
    let code = outcome.code().unwrap_or(-1);
    if code != cell.exit {
        return Err(format!(
            "exit {code}, expected {}: {}",
            cell.exit,
            outcome.stderr.trim()
        ));
    }
    let said = if code == 0 {
        outcome.json()["reason"].as_str().unwrap_or_default().to_owned()
    } else {
        outcome.stderr.clone()
    };
    if !said.contains(cell.says) {
        return Err(format!("does not say {:?}: {}", cell.says, said.trim()));
    }
    // The manifest loads, whatever happened.
    let _ = repo.manifest(VM);
    match cell.fault {
        Fault::KillQemu | Fault::QemuQuits => vm = vm.restart().await,
        Fault::SourceReadError => {
            // Heal: a clean restart without the fault; the bitmap the failed backup read is still intact.
            vm.quit().await;
            vm = vm.restart_without_faults().await;
        }
        _ => {
            if !vm.running().await {
                return Err("the VM stopped running".into());
            }
        }
    }
    if cell.fault == Fault::BitmapBusy {
        let _ = vm
            .qmp()
            .execute_raw("job-cancel", Some(serde_json::json!({"id": "leftover"})))
            .await;
        let _ = vm.qmp().wait_job("leftover", BLOCK_JOB_TIMEOUT).await;
        let _ = vm.qmp().dismiss_job("leftover").await;
        let _ = vm
            .qmp()
            .execute_raw("blockdev-del", Some(serde_json::json!({"node-name": "sink"})))
            .await;
    }
    // The following backup is exact.
    vm.write_pattern("disk1", 0x55, 5 * MIB, MIB).await;
    let refs = vm.capture_references(&["disk0", "disk1"], work, "next").await;
    let next = repo.try_backup(&vm, VM, pull);
    if !next.status.success() {
        return Err(format!("the following backup failed: {}", next.stderr.trim()));
    }
    let next = next.json();
    let method = next["method"].as_str().unwrap_or_default();
    let expected_method = if cell.exit == 0 {
        "bitmap"
    } else {
        cell.next_method
    };
    if method != expected_method {
        return Err(format!(
            "the following backup was {method}, expected {expected_method}: {next}"
        ));
    }
    let id = next["node"].as_str().unwrap().to_owned();
    for (d, r) in ["disk0", "disk1"].iter().zip(&refs) {
        image::compare(r, &repo.node_file(VM, &id, d))
            .map_err(|e| format!("following backup not exact: {e}"))?;
    }
    let manifest = repo.manifest(VM);
    if !manifest.operations.is_empty() {
        return Err("operation records left".into());
    }
    assert_no_leftovers(&vm, &expected_bitmaps(&manifest, &id, full_id)).await;
    if cell.fault.is_pull() {
        check_pull_cleaned(&vm, repo, &id, &refs).await?;
    }
    // No earlier node changed.
    let verify = cli::run(&[
        "verify",
        "--repo",
        repo.path().to_str().unwrap(),
        "--vm",
        VM,
        "--json",
    ]);
    if !verify.status.success() {
        return Err(format!("verify after the cell: {}", verify.stdout));
    }
    Ok(())
}

/// What a pull cell leaves besides the shared checks: no export (nor NBD server) in QEMU, every scratch image
/// emptied, and the following node restores to its references.
async fn check_pull_cleaned(
    vm: &TestVm,
    repo: &TestRepo,
    node: &str,
    refs: &[PathBuf],
) -> Result<(), String> {
    let exports = vm.qmp().execute_raw("query-block-exports", None).await.unwrap();
    if exports.as_array().map(Vec::len) != Some(0) {
        return Err(format!("leftover exports: {exports}"));
    }
    if vm.qmp().execute_raw("nbd-server-stop", None).await.is_ok() {
        return Err("an NBD server was left running".into());
    }
    let dir = vm.disk_path("disk0").parent().unwrap().to_owned();
    for entry in std::fs::read_dir(&dir).unwrap().flatten() {
        let path = entry.path();
        if path.to_string_lossy().contains("-scratch") && std::fs::metadata(&path).unwrap().len() != 0 {
            return Err(format!("scratch image {} not emptied", path.display()));
        }
    }
    let out = tempfile::tempdir().unwrap();
    let restored = out.path().join("r");
    let restore = repo.run(VM, &["restore", node, "--to", restored.to_str().unwrap()]);
    if !restore.status.success() {
        return Err(format!("restore of {node}: {}", restore.stderr.trim()));
    }
    for (d, r) in ["disk0", "disk1"].iter().zip(refs) {
        image::compare(r, &restored.join(format!("{d}.qcow2")))
            .map_err(|e| format!("restore not exact: {e}"))?;
    }
    Ok(())
}

/// The live restore of one cell: where qmpbak reaches the target VM, and the arguments that go with it.
struct LiveTarget {
    vm: TestVm,
    /// `--socket` (on this host) or `--qmp tls://… --tls-dir …` (across hosts, served over loopback TLS).
    reach: Vec<String>,
    /// The serving arguments across hosts (none on this host).
    serve: Vec<String>,
}

impl LiveTarget {
    async fn start(served: bool, pki: &TestPki) -> LiveTarget {
        let b = TestVm::builder()
            .disk("disk0", 16 * MIB)
            .disk("disk1", 8 * MIB)
            .paused();
        if !served {
            let vm = b.start().await;
            let reach = vec!["--socket".into(), vm.socket().display().to_string()];
            return LiveTarget {
                vm,
                reach,
                serve: Vec::new(),
            };
        }
        let port = free_port();
        let vm = b
            .tcp_qmp("127.0.0.1", port, Some(&pki.path("server")))
            .arg("-object")
            .arg(&pki.client_object("nbdc", "client"))
            .start()
            .await;
        LiveTarget {
            vm,
            reach: vec![
                "--qmp".into(),
                format!("tls://127.0.0.1:{port}"),
                "--tls-dir".into(),
                pki.path("client").display().to_string(),
            ],
            serve: vec!["--serve-tls-dir".into(), pki.path("server").display().to_string()],
        }
    }

    fn restore_args(&self, repo: &TestRepo, node: &str) -> Vec<String> {
        let mut args = repo.vm_args(VM, &["restore", node, "--live", "--json"]);
        args.extend(self.reach.iter().cloned());
        args.extend(self.serve.iter().cloned());
        if !self.serve.is_empty() {
            // The emptiness check's NBD server: a free port (10809 is shared by tests running at once).
            args.extend([
                "--nbd-listen".to_owned(),
                format!("127.0.0.1:{}", free_port()),
                "--reconnect-delay".to_owned(),
                "2".to_owned(),
            ]);
        }
        args.extend(["--speed-limit".to_owned(), (2 * MIB).to_string()]);
        args
    }

    fn cleanup(&self, repo: &TestRepo) -> cli::Output {
        let mut args = repo.vm_args(VM, &["cleanup", "--json"]);
        args.extend(self.reach.iter().cloned());
        args.extend(self.serve.iter().cloned());
        cli::run_owned(&args)
    }
}

/// The port of the chain server that the manifest's live restore record names, if any.
fn served_port(repo: &TestRepo) -> Option<u16> {
    repo.manifest(VM)
        .operations
        .iter()
        .find_map(|op| match &op.payload {
            chain::Payload::LiveRestore { served: Some(s) } => Some(s.port),
            _ => None,
        })
}

/// A live restore cell: a full and an incremental backup of a source VM, the incremental restored live into
/// a paused target VM with empty disks, the fault met, `cleanup` run; then what every live cell must give
/// ([`check_live`]).
async fn run_live_cell(cell: &Cell, work: &Path) -> Result<(), String> {
    let repo = TestRepo::init();
    let pki = TestPki::loopback();
    let node = {
        let vm = TestVm::builder()
            .disk("disk0", 16 * MIB)
            .disk("disk1", 8 * MIB)
            .start()
            .await;
        vm.write_pattern("disk0", 0x11, 0, 6 * MIB).await;
        vm.write_pattern("disk1", 0x22, 0, 2 * MIB).await;
        repo.backup(&vm, VM, &[]);
        vm.write_pattern("disk0", 0x33, 4 * MIB, 4 * MIB).await;
        vm.write_pattern("disk1", 0x44, MIB, MIB).await;
        repo.backup(&vm, VM, &[])["node"].as_str().unwrap().to_owned()
    };
    let expected = work.join("expected");
    let out = repo.run(VM, &["restore", &node, "--to", expected.to_str().unwrap()]);
    if !out.status.success() {
        return Err(format!("offline restore of {node}: {}", out.stderr.trim()));
    }
    let served = matches!(cell.fault, Fault::LiveServedKill(_) | Fault::LiveServedSignal(_));
    let target = LiveTarget::start(served, &pki).await;
    let args = target.restore_args(&repo, &node);
    let port;
    let outcome = match cell.fault {
        Fault::LiveKill(point) | Fault::LiveServedKill(point) => {
            let out = cli::run_crashing_at(&args, point, CLI_CRASH_TIMEOUT);
            port = served_port(&repo);
            out
        }
        Fault::LiveSignal(signal) | Fault::LiveServedSignal(signal) => {
            let mut events = target
                .vm
                .qmp()
                .subscribe(EventFilter::names(&["JOB_STATUS_CHANGE"]));
            let child = cli::command_owned(&args).spawn().unwrap();
            wait_running(&mut events).await;
            port = served_port(&repo);
            let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
            nix::sys::signal::kill(pid, signal).unwrap();
            cli::wait(child, CLI_TIMEOUT)
        }
        _ => return Err("not a live restore cell".into()),
    };
    let code = outcome.code().unwrap_or(-1);
    if code != cell.exit || !outcome.stderr.contains(cell.says) {
        return Err(format!(
            "exit {code}, expected {} saying {:?}: {}",
            cell.exit,
            cell.says,
            outcome.stderr.trim()
        ));
    }
    let checking = matches!(
        cell.fault,
        Fault::LiveKill("restore-checking-empty") | Fault::LiveServedKill("restore-checking-empty")
    );
    // Across hosts the live restore's record names the server's port; a run killed in the emptiness check
    // had no record of its own yet (nor a server).
    if (served && !checking) != port.is_some() {
        return Err(format!("served port recorded: {port:?}"));
    }
    // The serving qemu-storage-daemon is this run's child: gone with it, killed or not.
    if let Some(port) = port {
        let marker = format!("addr.port={port}");
        let left = cli::processes_mentioning(&marker);
        if !left.is_empty() {
            // Give it the bound the harness gives any process to exit.
            cli::assert_no_process_mentions(&marker, PROCESS_EXIT_TIMEOUT);
        }
    }
    let cleaned = target.cleanup(&repo);
    if !cleaned.status.success() {
        return Err(format!("cleanup after the fault: {}", cleaned.stderr.trim()));
    }
    let manifest = repo.manifest(VM);
    if !manifest.operations.is_empty() {
        return Err(format!("records left after cleanup: {:?}", manifest.operations));
    }
    if matches!(
        cell.fault,
        Fault::LiveKill("restore-attached") | Fault::LiveServedKill("restore-attached")
    ) {
        // Killed before it resumed the VM: recovery streams and detaches with the VM paused, and leaves it so
        // (a record does not resume a VM); the user resumes it.
        if target.vm.running().await {
            return Err("cleanup resumed a VM the killed run had not resumed".into());
        }
        target.vm.qmp().execute_raw("cont", None).await.unwrap();
    }
    if checking {
        // Nothing changed in the VM: still paused, disks empty; the restore run again is whole.
        if target.vm.running().await {
            return Err("the VM was resumed by a run killed before it took the chain".into());
        }
        if manifest.nodes.len() != 2 {
            return Err(format!("the manifest has {} nodes, not 2", manifest.nodes.len()));
        }
        check_no_nbd(&target.vm).await?;
        let again = cli::run_owned(&args);
        if !again.status.success() {
            return Err(format!("the live restore run again: {}", again.stderr.trim()));
        }
    }
    check_live(&target, &repo, &node, &expected, work, port).await
}

/// No export and no NBD server in the VM's QEMU (a server left running would refuse a second one).
async fn check_no_nbd(vm: &TestVm) -> Result<(), String> {
    let exports = vm.qmp().execute_raw("query-block-exports", None).await.unwrap();
    if exports.as_array().map(Vec::len) != Some(0) {
        return Err(format!("leftover exports: {exports}"));
    }
    if vm.qmp().execute_raw("nbd-server-stop", None).await.is_ok() {
        return Err("an NBD server was left running".into());
    }
    Ok(())
}

/// What every live restore cell ends with: the VM runs on its own disks, equal to the node and with no backing
/// file; nothing of qmpbak's is left in QEMU (export, NBD server, block node, secret, client credentials) nor a
/// serving daemon; and the next backup of the VM is an exact incremental.
async fn check_live(
    target: &LiveTarget,
    repo: &TestRepo,
    node: &str,
    expected: &Path,
    work: &Path,
    port: Option<u16>,
) -> Result<(), String> {
    let vm = &target.vm;
    if !vm.running().await {
        return Err("the VM does not run".into());
    }
    let manifest = repo.manifest(VM);
    if !manifest.operations.is_empty() {
        return Err(format!("records left: {:?}", manifest.operations));
    }
    if manifest.current.as_ref().map(ToString::to_string).as_deref() != Some(node) {
        return Err(format!("current is {:?}, not {node}", manifest.current));
    }
    check_no_nbd(vm).await?;
    if let Some(name) = vm.foreign_block_nodes().await.first() {
        return Err(format!("leftover block node {name}"));
    }
    let objects = vm.objects().await;
    if objects.to_string().contains("qmpbak") {
        return Err(format!("leftover objects: {objects}"));
    }
    if let Some(port) = port {
        if !cli::processes_mentioning(&format!("addr.port={port}")).is_empty() {
            return Err("a serving qemu-storage-daemon is left".into());
        }
    }
    vm.qmp().execute_raw("stop", None).await.unwrap();
    for d in ["disk0", "disk1"] {
        let path = vm.disk_path(d);
        image::compare(&expected.join(format!("{d}.qcow2")), &path)
            .map_err(|e| format!("disk {d} not restored exactly: {e}"))?;
        if image::info(&path).get("backing-filename").is_some() {
            return Err(format!("disk {d} still has a backing file"));
        }
    }
    vm.qmp().execute_raw("cont", None).await.unwrap();
    // The next backup: an incremental on the live restore's bitmap, exact.
    vm.write_pattern("disk1", 0x55, 5 * MIB, MIB).await;
    let refs = vm.capture_references(&["disk0", "disk1"], work, "next").await;
    let mut args = repo.vm_args(VM, &["backup", "--json"]);
    args.extend(target.reach.iter().cloned());
    if !target.serve.is_empty() {
        args.extend([
            "--pull".to_owned(),
            "--nbd-listen".to_owned(),
            format!("127.0.0.1:{}", free_port()),
        ]);
    }
    let next = cli::run_owned(&args);
    if !next.status.success() {
        return Err(format!("the following backup failed: {}", next.stderr.trim()));
    }
    let next = next.json();
    if next["method"] != "bitmap" {
        return Err(format!("the following backup was not an incremental: {next}"));
    }
    let id = next["node"].as_str().unwrap().to_owned();
    let restored = work.join("next");
    let out = repo.run(VM, &["restore", &id, "--to", restored.to_str().unwrap()]);
    if !out.status.success() {
        return Err(format!("restore of {id}: {}", out.stderr.trim()));
    }
    for (d, r) in ["disk0", "disk1"].iter().zip(&refs) {
        image::compare(r, &restored.join(format!("{d}.qcow2")))
            .map_err(|e| format!("the following backup not exact: {e}"))?;
    }
    Ok(())
}

#[tokio::test]
async fn fault_matrix() {
    let mut rows = Vec::new();
    // FAULT_MATRIX_ONLY=WORD runs only the cells whose fault's name contains WORD (e.g. `Pull`).
    let only = std::env::var("FAULT_MATRIX_ONLY").unwrap_or_default();
    for cell in MATRIX.iter().filter(|c| format!("{:?}", c.fault).contains(&only)) {
        // Each cell in its own task: a panic fails the cell, not the table.
        let result = tokio::spawn(async move {
            let work = tempfile::tempdir().unwrap();
            run_cell(cell, work.path()).await
        })
        .await
        .unwrap_or_else(|e| Err(format!("panicked: {e}")));
        rows.push((format!("{:?}", cell.fault), cell.step, cell.exit, result));
    }
    println!("\n{:<44} {:<15} {:>4}  result", "fault", "step", "exit");
    for (fault, step, exit, result) in &rows {
        let verdict = match result {
            Ok(()) => "pass".to_owned(),
            Err(e) => format!("FAIL: {e}"),
        };
        println!("{fault:<44} {step:<15} {exit:>4}  {verdict}");
    }
    let passed = rows.iter().filter(|r| r.3.is_ok()).count();
    println!("{passed} of {} cells passed", rows.len());
    assert!(!rows.is_empty(), "no cell matches FAULT_MATRIX_ONLY={only}");
    assert_eq!(passed, rows.len(), "failing cells above");
}
