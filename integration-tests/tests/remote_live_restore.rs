//! Live restore across hosts (issue 19): `qmpbak restore NODE --live --qmp tls://HOST:PORT --serve-tls-dir DIR`
//! serves the node's chain from a qemu-storage-daemon on the backup host over NBD with TLS, and the target
//! VM's QEMU (a second VM, empty disks, a TLS QMP monitor and a client `tls-creds-x509` object) takes it as
//! backing and streams. Against real QEMU, every result compared with `qemu-img compare` against an offline
//! restore of the node plus the guest's writes made while streaming. One test puts the target VM in the
//! "hypervisor" network namespace and qmpbak in the "backup" one (root; skipped with a message otherwise);
//! the loopback ones run anywhere: a kill mid-stream finished by `cleanup` serving the chain again, and the
//! refusals (a VM trusting another CA: exit 5; no server credentials: exit 2), each with the VM's disks
//! untouched.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::Child;

use integration_tests::cli::{self, Output};
use integration_tests::netns::NetnsPair;
use integration_tests::pki::{TestPki, free_port};
use integration_tests::repo::TestRepo;
use integration_tests::timeouts::{BLOCK_JOB_TIMEOUT, CLI_CRASH_TIMEOUT, CLI_TIMEOUT};
use integration_tests::{MIB, TestVm, image};
use qmp::EventFilter;
use qmpbak_engine::cleanup::CleanupReport;
use qmpbak_engine::restore::live::LiveReport;

const VM: &str = "vm1";
const SIZE: u64 = 32 * MIB;

/// Where qmpbak runs: on this host, or in the backup namespace of a pair.
enum Host<'a> {
    Here,
    Backup(&'a NetnsPair),
}

impl Host<'_> {
    fn spawn(&self, args: &[String], env: &[(&str, &str)]) -> Child {
        let mut cmd = match self {
            Host::Here => cli::command_owned(args),
            Host::Backup(pair) => pair.qmpbak(args),
        };
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.spawn().expect("spawn qmpbak")
    }

    fn run(&self, args: &[String]) -> Output {
        cli::wait(self.spawn(args, &[]), CLI_TIMEOUT)
    }
}

fn s(path: &Path) -> String {
    path.to_str().unwrap().to_owned()
}

/// A repository with VM `vm1`'s full (0x5a over 16 MiB) and incremental (0x6b at 4 MiB); returns the nodes.
async fn backed_up() -> (TestRepo, String, String) {
    let repo = TestRepo::init();
    let vm = TestVm::start(&[("disk0", SIZE)]).await;
    vm.write_pattern("disk0", 0x5a, 0, 16 * MIB).await;
    let full = repo.backup_node(&vm, VM, &[]);
    vm.write_pattern("disk0", 0x6b, 4 * MIB, MIB).await;
    let inc = repo.backup_node(&vm, VM, &[]);
    (repo, full, inc)
}

/// The node's disk restored offline into `dir`, plus the qemu-io `writes`: what the live restore must give.
fn expected(repo: &TestRepo, node: &str, dir: &Path, writes: &[&str]) -> PathBuf {
    let to = dir.join(format!("expected-{node}.qcow2"));
    repo.run(VM, &["restore", node, "--to", &s(&to)]).success();
    for w in writes {
        let st = std::process::Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", w])
            .arg(&to)
            .output()
            .unwrap();
        assert!(st.status.success(), "{st:?}");
    }
    to
}

/// A paused target VM with an empty disk, a TLS QMP monitor on `host:port` and a client credentials object
/// `nbdc` reading `client` (its view of the backup host's CA).
async fn target_vm(host: &str, port: u16, pki: &TestPki, client: &str, netns: Option<&str>) -> TestVm {
    let mut b = TestVm::builder()
        .disk("disk0", SIZE)
        .paused()
        .tcp_qmp(host, port, Some(&pki.path("server")))
        .arg("-object")
        .arg(&pki.client_object("nbdc", client));
    if let Some(ns) = netns {
        b = b.netns(ns);
    }
    b.start().await
}

fn live_args(repo: &TestRepo, node: &str, qmp: &str, pki: &TestPki, extra: &[&str]) -> Vec<String> {
    let mut args = repo.vm_args(
        VM,
        &[
            "restore",
            node,
            "--live",
            "--qmp",
            qmp,
            "--tls-dir",
            &s(&pki.path("client")),
            "--json",
        ],
    );
    if qmp.starts_with("tls://127.0.0.1:") {
        // The emptiness check's NBD server in the VM's QEMU: on loopback, a free port (not 10809, which
        // tests running at once would share).
        args.extend(["--nbd-listen".to_owned(), format!("127.0.0.1:{}", free_port())]);
    }
    args.extend(extra.iter().map(|a| (*a).to_owned()));
    args
}

/// Waits until the VM's stream job runs.
async fn stream_started(events: &mut qmp::EventStream) {
    loop {
        let e = events
            .next_timeout(BLOCK_JOB_TIMEOUT)
            .await
            .expect("stream job starts");
        if e.data["status"] == "running" {
            break;
        }
    }
}

/// The VM's disk equals `expected`, has no backing file, and only the VM's own block nodes remain.
async fn assert_restored(vm: &TestVm, expected: &Path) {
    vm.qmp().execute_raw("stop", None).await.unwrap();
    image::assert_same(expected, &vm.disk_path("disk0"));
    assert!(
        image::info(&vm.disk_path("disk0"))
            .get("backing-filename")
            .is_none()
    );
    assert_only_own_nodes(vm).await;
}

async fn assert_only_own_nodes(vm: &TestVm) {
    let left = vm.foreign_block_nodes().await;
    assert!(left.is_empty(), "leftover {left:?}");
}

/// Live restore of the incremental into a VM at `hv`, qmpbak running `on`; the guest writes while streaming.
async fn check_live_restore_across(on: &Host<'_>, hv: &str, port: u16, pki: &TestPki, netns: Option<&str>) {
    let (repo, _full, inc) = backed_up().await;
    let work = tempfile::tempdir().unwrap();
    let exp = expected(&repo, &inc, work.path(), &["write -P 0xee 12M 1M"]);
    let vm = target_vm(hv, port, pki, "client", netns).await;
    let mut events = vm.qmp().subscribe(EventFilter::names(&["JOB_STATUS_CHANGE"]));
    let args = live_args(
        &repo,
        &inc,
        &format!("tls://{hv}:{port}"),
        pki,
        &[
            "--serve-tls-dir",
            &s(&pki.path("server")),
            "--speed-limit",
            &(4 * MIB).to_string(),
        ],
    );
    let child = on.spawn(&args, &[]);
    stream_started(&mut events).await;
    assert!(vm.running().await, "the VM runs while the data streams in");
    vm.write_pattern("disk0", 0xee, 12 * MIB, MIB).await;
    let out = tokio::task::block_in_place(|| cli::wait(child, CLI_TIMEOUT))
        .success()
        .report::<LiveReport>();
    assert_eq!(out.node, inc, "{out:?}");
    assert_restored(&vm, &exp).await;
    let manifest = repo.manifest(VM);
    assert_eq!(manifest.current.as_ref().unwrap().to_string(), inc);
    assert!(manifest.operations.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn remote_live_restore_over_loopback() {
    let pki = TestPki::loopback();
    check_live_restore_across(&Host::Here, "127.0.0.1", free_port(), &pki, None).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn remote_live_restore_across_network_namespaces() {
    let pair = match NetnsPair::create() {
        Ok(pair) => pair,
        Err(why) => {
            eprintln!("SKIPPED remote_live_restore_across_network_namespaces: {why}");
            return;
        }
    };
    // One server certificate for both: the hypervisor's QMP and the backup host's NBD server.
    let pki = TestPki::new(&[IpAddr::V4(pair.hv_addr), IpAddr::V4(pair.backup_addr)]);
    let hv = pair.hv_addr.to_string();
    check_live_restore_across(&Host::Backup(&pair), &hv, 4444, &pki, Some(&pair.hv)).await;
}

/// qmpbak killed while streaming: its server dies with it, the stream pauses on the read errors, and `cleanup`
/// on the backup host serves the chain again on the recorded address and finishes the restore.
#[tokio::test(flavor = "multi_thread")]
async fn remote_live_restore_killed_mid_stream_is_finished_by_cleanup() {
    check_killed_at("restore-streaming", true).await;
}

/// qmpbak killed after the disk took the served chain as backing, before its stream started (the VM still
/// paused): `cleanup` serves the chain again and starts the stream itself, so the VM never keeps a backing that
/// is gone.
#[tokio::test(flavor = "multi_thread")]
async fn remote_live_restore_killed_before_streaming_is_finished_by_cleanup() {
    check_killed_at("restore-attached", false).await;
}

/// The arguments of a live restore of `node` into the VM at `qmp_url`, served with the server credentials,
/// streaming at `speed` bytes per second, the VM reconnecting 2 s after a lost server.
fn slow_served_args(repo: &TestRepo, node: &str, qmp_url: &str, pki: &TestPki, speed: u64) -> Vec<String> {
    live_args(
        repo,
        node,
        qmp_url,
        pki,
        &[
            "--serve-tls-dir",
            &s(&pki.path("server")),
            "--speed-limit",
            &speed.to_string(),
            "--reconnect-delay",
            "2",
        ],
    )
}

/// `qmpbak cleanup --qmp URL --tls-dir CLIENT --json EXTRA…` of the VM at `qmp_url`.
fn cleanup_at(repo: &TestRepo, qmp_url: &str, pki: &TestPki, extra: &[&str]) -> Output {
    let mut a = repo.vm_args(
        VM,
        &[
            "cleanup",
            "--qmp",
            qmp_url,
            "--tls-dir",
            &s(&pki.path("client")),
            "--json",
        ],
    );
    a.extend(extra.iter().map(|e| (*e).to_owned()));
    tokio::task::block_in_place(|| Host::Here.run(&a))
}

async fn check_killed_at(point: &str, running: bool) {
    let pki = TestPki::new(&[IpAddr::V4(Ipv4Addr::LOCALHOST)]);
    let (repo, _full, inc) = backed_up().await;
    let work = tempfile::tempdir().unwrap();
    let exp = expected(&repo, &inc, work.path(), &[]);
    let port = free_port();
    let qmp_url = format!("tls://127.0.0.1:{port}");
    let vm = target_vm("127.0.0.1", port, &pki, "client", None).await;
    let args = slow_served_args(&repo, &inc, &qmp_url, &pki, 2 * MIB);
    let out = tokio::task::block_in_place(|| cli::run_crashing_at(&args, point, CLI_CRASH_TIMEOUT));
    out.assert_crashed_at(point);
    assert_eq!(
        vm.running().await,
        running,
        "the VM runs on the chain once resumed"
    );
    let record = repo.manifest(VM).operations;
    assert_eq!(record.len(), 1, "{record:?}");
    match &record[0].payload {
        chain::Payload::LiveRestore { served: Some(served) } => {
            assert_eq!(served.host, "127.0.0.1");
            assert!(served.tls);
        }
        other => panic!("not a served live restore: {other:?}"),
    }
    let cleanup = |extra: &[&str]| cleanup_at(&repo, &qmp_url, &pki, extra);
    // Without the server's credentials the record stays, and says how to finish it.
    let pending = cleanup(&[]);
    assert_eq!(pending.code(), Some(2), "{pending:?}");
    assert!(pending.stdout.contains("--serve-tls-dir"), "{pending:?}");
    assert_eq!(repo.manifest(VM).operations.len(), 1);
    let done = cleanup(&["--serve-tls-dir", &s(&pki.path("server"))])
        .success()
        .report::<CleanupReport>();
    assert_eq!(done.cleaned.operations.len(), 1, "{done:?}");
    assert!(repo.manifest(VM).operations.is_empty());
    assert_restored(&vm, &exp).await;
}

/// A VM whose client credentials trust another CA (exit 5), and serving without credentials (exit 2): each a
/// clear error, and the VM's disk, its block graph and the manifest as they were.
#[tokio::test(flavor = "multi_thread")]
async fn remote_live_restore_refusals_leave_the_vm_untouched() {
    let pki = TestPki::loopback();
    let (repo, full, inc) = backed_up().await;
    let port = free_port();
    let qmp_url = format!("tls://127.0.0.1:{port}");
    let vm = target_vm("127.0.0.1", port, &pki, "client-other-ca", None).await;
    let untouched = |out: &Output| {
        let manifest = repo.manifest(VM);
        assert!(manifest.operations.is_empty(), "{out:?}");
        assert_eq!(manifest.current.as_ref().unwrap().to_string(), inc);
        let disk = vm.disk_path("disk0");
        assert_eq!(image::allocated_data_bytes(&disk), 0);
        assert!(image::info(&disk).get("backing-filename").is_none());
    };
    let wrong_ca = live_args(
        &repo,
        &full,
        &qmp_url,
        &pki,
        &["--serve-tls-dir", &s(&pki.path("server"))],
    );
    let out = tokio::task::block_in_place(|| Host::Here.run(&wrong_ca));
    eprintln!("{}", out.stderr);
    assert_eq!(out.code(), Some(5), "{out:?}");
    assert!(out.stderr.contains("NBD server"), "{out:?}");
    untouched(&out);
    assert_only_own_nodes(&vm).await;
    assert!(!vm.running().await, "the VM was not resumed");
    let plaintext = live_args(&repo, &full, &qmp_url, &pki, &[]);
    let out = tokio::task::block_in_place(|| Host::Here.run(&plaintext));
    assert_eq!(out.code(), Some(2), "{out:?}");
    assert!(out.stderr.contains("--serve-tls-dir"), "{out:?}");
    untouched(&out);
    assert_only_own_nodes(&vm).await;
}

/// SIGINT while streaming across hosts: the VM reads unstreamed data from qmpbak's server, so qmpbak finishes
/// the streams at full speed first, detaches, removes the client credentials it added (`--target-tls-dir`) and
/// stops its server, then exits 130. The signal goes to qmpbak's whole process group, as a terminal's Ctrl-C
/// sends it: its server, in the same group, died of it, and the stream stalled on read errors.
#[tokio::test(flavor = "multi_thread")]
async fn remote_live_restore_interrupted_finishes_first_and_exits_130() {
    let pki = TestPki::loopback();
    let (repo, _full, inc) = backed_up().await;
    let work = tempfile::tempdir().unwrap();
    let exp = expected(&repo, &inc, work.path(), &[]);
    let port = free_port();
    let vm = target_vm("127.0.0.1", port, &pki, "client", None).await;
    let mut events = vm.qmp().subscribe(EventFilter::names(&["JOB_STATUS_CHANGE"]));
    let args = live_args(
        &repo,
        &inc,
        &format!("tls://127.0.0.1:{port}"),
        &pki,
        &[
            "--serve-tls-dir",
            &s(&pki.path("server")),
            "--target-tls-dir",
            &s(&pki.path("client")),
            "--speed-limit",
            &MIB.to_string(),
        ],
    );
    let child = {
        use std::os::unix::process::CommandExt as _;
        cli::command_owned(&args)
            .process_group(0)
            .spawn()
            .expect("spawn qmpbak")
    };
    stream_started(&mut events).await;
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
    nix::sys::signal::killpg(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let out = tokio::task::block_in_place(|| cli::wait(child, CLI_TIMEOUT));
    assert_eq!(out.code(), Some(130), "{out:?}");
    assert!(out.stderr.contains("finished first"), "{out:?}");
    assert!(repo.manifest(VM).operations.is_empty());
    let objects = vm.objects().await;
    assert!(
        !objects.to_string().contains("qmpbak-nbd-client"),
        "the client credentials qmpbak added are left: {objects}"
    );
    assert_restored(&vm, &exp).await;
}

/// A failure after the disk took the served chain (here: the next backup's bitmap cannot be added): the chain would leave with qmpbak, so the disk is streamed all the same before the error is
/// reported, and the VM depends on nothing.
#[tokio::test(flavor = "multi_thread")]
async fn remote_live_restore_failing_after_the_reopen_streams_before_it_reports() {
    let pki = TestPki::loopback();
    let (repo, _full, inc) = backed_up().await;
    let work = tempfile::tempdir().unwrap();
    let exp = expected(&repo, &inc, work.path(), &[]);
    let port = free_port();
    let vm = target_vm("127.0.0.1", port, &pki, "client", None).await;
    let args = live_args(
        &repo,
        &inc,
        &format!("tls://127.0.0.1:{port}"),
        &pki,
        &["--serve-tls-dir", &s(&pki.path("server"))],
    );
    // Adding the bitmap fails (as a full disk would make it: a qmpbak bitmap already there no longer does, the
    // restore removes those first).
    let child = Host::Here.spawn(&args, &[("QMPBAK_INJECT_ENOSPC_AT", "restore-bitmap-add")]);
    let out = tokio::task::block_in_place(|| cli::wait(child, CLI_TIMEOUT));
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(out.stderr.contains("streamed all the same"), "{out:?}");
    assert!(repo.manifest(VM).operations.is_empty());
    assert_restored(&vm, &exp).await;
}

/// A target disk holding data used to be kept under the backup's (wrong data, silently): refused with exit 2
/// before anything changes, its allocation read over NBD+TLS from the VM's own QEMU.
#[tokio::test(flavor = "multi_thread")]
async fn remote_live_restore_into_a_disk_that_holds_data_is_refused() {
    let pki = TestPki::loopback();
    let (repo, _full, inc) = backed_up().await;
    let work = tempfile::tempdir().unwrap();
    let port = free_port();
    let vm = target_vm("127.0.0.1", port, &pki, "client", None).await;
    vm.write_pattern("disk0", 0x77, 20 * MIB, 64 * 1024).await;
    vm.qemu_io("disk0", "flush").await;
    let before = vm.capture_references(&["disk0"], work.path(), "before").await;
    let args = live_args(
        &repo,
        &inc,
        &format!("tls://127.0.0.1:{port}"),
        &pki,
        &["--serve-tls-dir", &s(&pki.path("server"))],
    );
    let out = tokio::task::block_in_place(|| Host::Here.run(&args));
    assert_eq!(out.code(), Some(2), "{out:?}");
    assert!(
        out.stderr.contains("disk disk0 has 65536 bytes allocated"),
        "{out:?}"
    );
    assert!(!vm.running().await, "the VM was not resumed");
    let after = vm.capture_references(&["disk0"], work.path(), "after").await;
    image::assert_same(&before[0], &after[0]);
    assert_only_own_nodes(&vm).await;
    let exports = vm.qmp().execute_raw("query-block-exports", None).await.unwrap();
    assert_eq!(exports, serde_json::json!([]), "leftover exports");
    let manifest = repo.manifest(VM);
    assert_eq!(manifest.current.as_ref().unwrap().to_string(), inc);
    assert!(manifest.operations.is_empty());
}

/// Several server `tls-creds-x509` objects in the VM's QEMU (its TLS monitor's and another): which one the
/// emptiness check's NBD server uses is the user's choice, as for a pull. Without `--tls-creds` the restore is
/// refused (exit 2, naming the objects and the flag) with the VM untouched; with it, the restore is exact.
#[tokio::test(flavor = "multi_thread")]
async fn remote_live_restore_with_several_server_credentials_needs_tls_creds() {
    let pki = TestPki::loopback();
    let (repo, _full, inc) = backed_up().await;
    let work = tempfile::tempdir().unwrap();
    let exp = expected(&repo, &inc, work.path(), &[]);
    let port = free_port();
    let qmp_url = format!("tls://127.0.0.1:{port}");
    let vm = TestVm::builder()
        .disk("disk0", SIZE)
        .paused()
        .tcp_qmp("127.0.0.1", port, Some(&pki.path("server")))
        .arg("-object")
        .arg(&pki.server_object("other"))
        .arg("-object")
        .arg(&pki.client_object("nbdc", "client"))
        .start()
        .await;
    let serve = ["--serve-tls-dir", &s(&pki.path("server"))];
    let out = tokio::task::block_in_place(|| Host::Here.run(&live_args(&repo, &inc, &qmp_url, &pki, &serve)));
    assert_eq!(out.code(), Some(2), "{out:?}");
    assert!(
        out.stderr.contains("several") && out.stderr.contains("other") && out.stderr.contains("--tls-creds"),
        "{out:?}"
    );
    assert!(!vm.running().await, "the VM was not resumed");
    assert_eq!(image::allocated_data_bytes(&vm.disk_path("disk0")), 0);
    assert!(repo.manifest(VM).operations.is_empty());
    // A client object is refused for the server.
    let client = [&serve[..], &["--tls-creds", "nbdc"]].concat();
    let out =
        tokio::task::block_in_place(|| Host::Here.run(&live_args(&repo, &inc, &qmp_url, &pki, &client)));
    assert_eq!(out.code(), Some(2), "{out:?}");
    assert!(out.stderr.contains("endpoint=server"), "{out:?}");
    let chosen = [&serve[..], &["--tls-creds", "other"]].concat();
    let out =
        tokio::task::block_in_place(|| Host::Here.run(&live_args(&repo, &inc, &qmp_url, &pki, &chosen)));
    out.success();
    assert_restored(&vm, &exp).await;
    assert!(repo.manifest(VM).operations.is_empty());
}

/// An encrypted repository served to a VM on another host: the serving qemu-storage-daemon opens the chain
/// with the key (a secret object reading a private file), the VM's QEMU reads it decrypted over NBD+TLS and
/// never gets the key, and the key is on no command line and in no QMP log (qmpbak at `-vv`, which logs every
/// QMP command). The result is exact.
#[tokio::test(flavor = "multi_thread")]
async fn remote_live_restore_of_an_encrypted_repository() {
    let keys = tempfile::tempdir().unwrap();
    let key = keys.path().join("repo.key");
    let key_text = "remote live restore key 0123456789";
    std::fs::write(&key, key_text).unwrap();
    let repo_dir = keys.path().join("repo");
    cli::run(&[
        "init",
        "--encrypt",
        "--key-file",
        key.to_str().unwrap(),
        repo_dir.to_str().unwrap(),
    ])
    .success();
    let repo = TestRepo::at(repo_dir);
    let key_args = ["--key-file", key.to_str().unwrap()];
    let inc = {
        let vm = TestVm::start(&[("disk0", SIZE)]).await;
        vm.write_pattern("disk0", 0x5a, 0, 16 * MIB).await;
        repo.backup_node(&vm, VM, &key_args);
        vm.write_pattern("disk0", 0x6b, 4 * MIB, MIB).await;
        repo.backup_node(&vm, VM, &key_args)
    };
    let work = tempfile::tempdir().unwrap();
    let exp = work.path().join("expected.qcow2");
    repo.run(
        VM,
        &[
            "restore",
            &inc,
            "--to",
            &s(&exp),
            "--key-file",
            key.to_str().unwrap(),
        ],
    )
    .success();
    let port = free_port();
    let pki = TestPki::loopback();
    let vm = target_vm("127.0.0.1", port, &pki, "client", None).await;
    let mut events = vm.qmp().subscribe(EventFilter::names(&["JOB_STATUS_CHANGE"]));
    let mut args = live_args(
        &repo,
        &inc,
        &format!("tls://127.0.0.1:{port}"),
        &pki,
        &[
            "--serve-tls-dir",
            &s(&pki.path("server")),
            "--speed-limit",
            &(4 * MIB).to_string(),
            "-vv",
        ],
    );
    args.extend(key_args.iter().map(|a| (*a).to_owned()));
    let child = Host::Here.spawn(&args, &[]);
    stream_started(&mut events).await;
    // While the chain is served: the key is on no command line, and the VM's QEMU holds no secret.
    assert!(
        cli::processes_mentioning(key_text).is_empty(),
        "the key is on a command line"
    );
    let objects = vm.objects().await;
    assert!(
        !objects.to_string().contains("\"secret\""),
        "the VM's QEMU got a secret: {objects}"
    );
    let out = tokio::task::block_in_place(|| cli::wait(child, CLI_TIMEOUT));
    let out = out.success();
    let report = out.report::<LiveReport>();
    assert_eq!(report.node, inc);
    assert!(
        out.stderr.contains("QMP send"),
        "-vv logs QMP commands: {}",
        out.stderr
    );
    assert!(!out.stderr.contains(key_text), "the key is in the log");
    assert!(
        !out.stderr.contains("\"qom-type\":\"secret\""),
        "a secret's data is in the QMP log"
    );
    assert_restored(&vm, &exp).await;
    assert!(repo.manifest(VM).operations.is_empty());
}

/// The server of a live restore across hosts dies while streaming (killed, crashed): the restore fails at once
/// and says how to finish (it waited 300 s for a stream that could make no progress), its record stays, and
/// `cleanup` with the server credentials serves the chain again and finishes exactly.
#[tokio::test(flavor = "multi_thread")]
async fn remote_live_restore_whose_server_dies_fails_at_once_and_cleanup_finishes() {
    let pki = TestPki::loopback();
    let (repo, _full, inc) = backed_up().await;
    let work = tempfile::tempdir().unwrap();
    let exp = expected(&repo, &inc, work.path(), &[]);
    let port = free_port();
    let qmp_url = format!("tls://127.0.0.1:{port}");
    let vm = target_vm("127.0.0.1", port, &pki, "client", None).await;
    let mut events = vm.qmp().subscribe(EventFilter::names(&["JOB_STATUS_CHANGE"]));
    let args = slow_served_args(&repo, &inc, &qmp_url, &pki, 4 * MIB);
    let child = Host::Here.spawn(&args, &[]);
    stream_started(&mut events).await;
    let daemons = cli::processes_mentioning("qemu-storage-daemon");
    let servers: Vec<i32> = cli::children_of(i32::try_from(child.id()).unwrap())
        .into_iter()
        .filter(|pid| daemons.contains(pid))
        .collect();
    assert_eq!(servers.len(), 1, "the chain's server: {servers:?}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(servers[0]),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let out = tokio::task::block_in_place(|| cli::wait(child, CLI_CRASH_TIMEOUT));
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(out.stderr.contains("server of the chain exited"), "{out:?}");
    assert_eq!(repo.manifest(VM).operations.len(), 1);
    let done = cleanup_at(
        &repo,
        &qmp_url,
        &pki,
        &["--serve-tls-dir", &s(&pki.path("server"))],
    )
    .success()
    .report::<CleanupReport>();
    assert_eq!(done.cleaned.operations.len(), 1, "{done:?}");
    assert!(repo.manifest(VM).operations.is_empty());
    assert_restored(&vm, &exp).await;
}
