//! qmpbak on a backup host talking to QEMU over the network (issue 19): `--qmp tls://HOST:PORT` with
//! `--tls-dir`, plaintext `tcp://` only with `--insecure-plaintext`. Against real QEMU with a TLS QMP
//! chardev (`tls-creds-x509,endpoint=server,verify-peer=on`) and a plaintext one, certificates made in the
//! test (`integration_tests::pki`). The first test puts QEMU and qmpbak in two network namespaces joined by
//! a veth pair (root; skipped with a message otherwise), the loopback ones run anywhere. Each failure is a
//! clear error with its exit code (5: QEMU's class, as NBD's TLS errors), and a backup over a remote QMP is
//! refused (exit 2) before anything is written.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::sync::Arc;

use integration_tests::cli::{self, Output};
use integration_tests::netns::NetnsPair;
use integration_tests::pki::{TestPki, free_port};
use integration_tests::repo::{BackupReport, TestRepo};
use integration_tests::timeouts::{CLI_TIMEOUT, PROMPT_TIMEOUT};
use integration_tests::{MIB, TestVm, image};
use qmpbak_engine::cleanup::CleanupReport;
use qmpbak_engine::inspect::VmInfo;

/// Where qmpbak runs: on this host, or in the backup namespace of a pair.
enum Host<'a> {
    Here,
    Backup(&'a NetnsPair),
}

impl Host<'_> {
    fn qmpbak(&self, args: &[String]) -> Output {
        let cmd = match self {
            Host::Here => cli::command_owned(args),
            Host::Backup(pair) => pair.qmpbak(args),
        };
        let mut cmd = cmd;
        cli::wait(cmd.spawn().expect("spawn qmpbak"), CLI_TIMEOUT)
    }
}

fn args(words: &[&str]) -> Vec<String> {
    words.iter().map(|w| (*w).to_owned()).collect()
}

fn dir(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// The run failed with `code`, and its message says `needle`.
#[track_caller]
fn expect_failure(out: &Output, code: i32, needle: &str) {
    eprintln!("exit {:?}: {}", out.code(), out.stderr.trim_end());
    assert_eq!(out.code(), Some(code), "{out:?}");
    assert!(out.stderr.contains(needle), "no {needle:?} in:\n{}", out.stderr);
}

/// Everything a backup host does with a remote QMP, against QEMU with a TLS monitor on `host:tls_port`
/// and a plaintext one on `host:plain_port`.
fn check_remote_qmp(on: &Host<'_>, host: &str, tls_port: u16, plain_port: u16, pki: &TestPki) {
    let tls = format!("tls://{host}:{tls_port}");
    let client = pki.path("client");

    // info lists the disks.
    let out = on
        .qmpbak(&args(&[
            "info",
            "--qmp",
            &tls,
            "--tls-dir",
            dir(&client),
            "--json",
        ]))
        .success();
    let info: VmInfo = out.report();
    let disks = &info.disks;
    assert_eq!(disks.len(), 1, "{info:#?}");
    assert_eq!(disks[0].id, "disk0");
    assert_eq!(disks[0].virtual_size, 16 * MIB);

    // The passthrough works.
    let out = on
        .qmpbak(&args(&[
            "qmp",
            "--qmp",
            &tls,
            "--tls-dir",
            dir(&client),
            "query-status",
        ]))
        .success();
    assert!(out.stdout.contains("\"running\""), "{}", out.stdout);

    // A CA that did not sign the server's certificate.
    let out = on.qmpbak(&args(&[
        "info",
        "--qmp",
        &tls,
        "--tls-dir",
        dir(&pki.path("client-wrong-ca")),
    ]));
    expect_failure(&out, 5, "not signed by the trusted CA");

    // Our certificate from another CA: QEMU (verify-peer=on) refuses it.
    let out = on.qmpbak(&args(&[
        "info",
        "--qmp",
        &tls,
        "--tls-dir",
        dir(&pki.path("client-foreign-cert")),
    ]));
    expect_failure(&out, 5, "the server may not trust our client certificate");

    // No client certificate at all.
    let out = on.qmpbak(&args(&[
        "info",
        "--qmp",
        &tls,
        "--tls-dir",
        dir(&pki.path("client-without-cert")),
    ]));
    expect_failure(&out, 5, "no client certificate was presented");

    // A plaintext server met with TLS.
    let plain_as_tls = format!("tls://{host}:{plain_port}");
    let out = on.qmpbak(&args(&[
        "info",
        "--qmp",
        &plain_as_tls,
        "--tls-dir",
        dir(&client),
    ]));
    expect_failure(&out, 5, "does not speak TLS");

    // Plaintext without leave: refused before anything is sent.
    let plain = format!("tcp://{host}:{plain_port}");
    let out = on.qmpbak(&args(&["info", "--qmp", &plain]));
    expect_failure(&out, 5, "refusing plaintext QMP");
    // With leave it works.
    let out = on
        .qmpbak(&args(&[
            "info",
            "--qmp",
            &plain,
            "--insecure-plaintext",
            "--json",
        ]))
        .success();
    assert_eq!(out.report::<VmInfo>().disks[0].id, "disk0");

    // tls:// without credentials is a usage error.
    let out = on.qmpbak(&args(&["info", "--qmp", &tls]));
    expect_failure(&out, 2, "--tls-dir");

    // A backup over a remote QMP is a pull (remote_pull_* below); a pull-only option needs one.
    let repo = TestRepo::init();
    let out = on.qmpbak(&args(&[
        "backup",
        "--socket",
        "/nonexistent/qmp.sock",
        "--scratch-dir",
        "/tmp",
        "--repo",
        dir(&repo.path()),
        "--vm",
        "web1",
    ]));
    expect_failure(&out, 2, "--scratch-dir is for a pull backup");
    assert!(!repo.vm_dir("web1").exists());
    // A live restore into a remote QEMU is served from this host over NBD: without the server's credentials
    // (or --insecure-plaintext) it is refused before anything is written.
    let out = on.qmpbak(&args(&[
        "restore",
        "0001",
        "--live",
        "--qmp",
        &tls,
        "--tls-dir",
        dir(&client),
        "--repo",
        dir(&repo.path()),
        "--vm",
        "web1",
    ]));
    expect_failure(&out, 2, "--serve-tls-dir");
    assert!(!repo.vm_dir("web1").exists());
    // Time points make and check files beside the VM's disks, on its host.
    repo.synthetic_vm("db1", 1, |_| None);
    let remote_vm = |command: &str| {
        args(&[
            command,
            "--qmp",
            &tls,
            "--tls-dir",
            dir(&client),
            "--repo",
            dir(&repo.path()),
            "--vm",
            "db1",
        ])
    };
    let before = std::fs::read(repo.vm_dir("db1").join("manifest.json")).unwrap();
    let out = on.qmpbak(&remote_vm("snapshot"));
    expect_failure(&out, 2, "beside the VM's disks");
    assert_eq!(
        std::fs::read(repo.vm_dir("db1").join("manifest.json")).unwrap(),
        before
    );
    // cleanup works remotely.
    let out = on.qmpbak(&remote_vm("cleanup")).success();
    assert!(out.stdout.contains("nothing to clean up"), "{}", out.stdout);
}

#[tokio::test(flavor = "multi_thread")]
async fn remote_qmp_across_network_namespaces() {
    let pair = match NetnsPair::create() {
        Ok(pair) => pair,
        Err(why) => {
            eprintln!("SKIPPED remote_qmp_across_network_namespaces: {why}");
            return;
        }
    };
    let pki = TestPki::new(&[IpAddr::V4(pair.hv_addr)]);
    let host = pair.hv_addr.to_string();
    let _vm = TestVm::builder()
        .disk("disk0", 16 * MIB)
        .netns(&pair.hv)
        .tcp_qmp(&host, 4444, Some(&pki.path("server")))
        .tcp_qmp(&host, 4445, None)
        .start()
        .await;
    let on = Host::Backup(&pair);
    tokio::task::block_in_place(|| check_remote_qmp(&on, &host, 4444, 4445, &pki));
}

#[tokio::test(flavor = "multi_thread")]
async fn remote_qmp_over_loopback() {
    let pki = TestPki::new(&[IpAddr::V4(Ipv4Addr::LOCALHOST)]);
    let (tls_port, plain_port) = (free_port(), free_port());
    let _vm = TestVm::builder()
        .disk("disk0", 16 * MIB)
        .tcp_qmp("127.0.0.1", tls_port, Some(&pki.path("server")))
        .tcp_qmp("127.0.0.1", plain_port, None)
        .start()
        .await;
    tokio::task::block_in_place(|| check_remote_qmp(&Host::Here, "127.0.0.1", tls_port, plain_port, &pki));
}

/// A server certificate that names neither the address connected to (it names 192.0.2.1 and localhost).
#[tokio::test(flavor = "multi_thread")]
async fn remote_qmp_refuses_a_certificate_for_another_name() {
    let pki = TestPki::new(&[IpAddr::V4(Ipv4Addr::LOCALHOST)]);
    let port = free_port();
    let _vm = TestVm::builder()
        .disk("disk0", 16 * MIB)
        .tcp_qmp("127.0.0.1", port, Some(&pki.path("misnamed-server")))
        .start()
        .await;
    let out = tokio::task::block_in_place(|| {
        cli::run_owned(&args(&[
            "info",
            "--qmp",
            &format!("tls://127.0.0.1:{port}"),
            "--tls-dir",
            dir(&pki.path("client")),
        ]))
    });
    expect_failure(&out, 5, "does not name the host connected to");
}

/// QEMU refuses to load an expired certificate, so a stand-in TLS server (rustls) presents one, as a QEMU
/// whose certificate expired while it ran would: the client's own check refuses it.
#[tokio::test(flavor = "multi_thread")]
async fn remote_qmp_refuses_an_expired_server_certificate() {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use tokio_rustls::rustls;

    let pki = TestPki::new(&[IpAddr::V4(Ipv4Addr::LOCALHOST)]);
    let expired = pki.path("expired-server");
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(expired.join("server-cert.pem"))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(expired.join("server-key.pem")).unwrap();
    let config =
        rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let serve = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        // The client gives up during the handshake.
        acceptor.accept(stream).await.is_err()
    });
    let out = tokio::task::block_in_place(|| {
        cli::run_owned(&args(&[
            "info",
            "--qmp",
            &format!("tls://127.0.0.1:{port}"),
            "--tls-dir",
            dir(&pki.path("client")),
        ]))
    });
    expect_failure(&out, 5, "the server's certificate has expired");
    let refused = tokio::time::timeout(PROMPT_TIMEOUT, serve)
        .await
        .unwrap()
        .unwrap();
    assert!(refused, "the stand-in saw a finished handshake");
}

/// Adds `op`, a record of the current manifest format, to VM `vm`'s manifest (as an interrupted run leaves it).
fn add_operation(repo: &TestRepo, vm: &str, op: serde_json::Value) {
    let path = repo.vm_dir(vm).join("manifest.json");
    let mut manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    manifest["operations"].as_array_mut().unwrap().push(op);
    std::fs::write(&path, serde_json::to_vec_pretty(&manifest).unwrap()).unwrap();
}

/// `cleanup` over a remote QMP cannot tell what the paths QEMU reports are on this host: an interrupted
/// snapshot's overlay beside the VM's disks is listed, not deleted (over the unix socket, the same record
/// deletes it), and an interrupted live restore stays pending for a run on the VM's host.
#[tokio::test(flavor = "multi_thread")]
async fn remote_cleanup_deletes_nothing_beside_the_disks() {
    let pki = TestPki::new(&[IpAddr::V4(Ipv4Addr::LOCALHOST)]);
    let port = free_port();
    let vm = TestVm::builder()
        .disk("disk0", 16 * MIB)
        .tcp_qmp("127.0.0.1", port, Some(&pki.path("server")))
        .start()
        .await;
    let repo = TestRepo::init();
    tokio::task::block_in_place(|| {
        repo.backup_node(&vm, "vm1", &[]);
    });
    let chain_id = repo.manifest("vm1").chain_id;
    let overlay = vm.dir().join(format!("disk0.qmpbak-{chain_id}-0009.qcow2"));
    let snapshot_record = serde_json::json!({
        "id": "snapshot-0009", "node": "0009", "started": "2026-01-01T00:00:00Z", "pid": 1,
        "host": "elsewhere", "jobs": [], "block_nodes": [], "bitmaps": [], "files": [],
        "payload": { "kind": "snapshot", "outside_files": [&overlay] },
    });
    std::fs::write(&overlay, b"an interrupted snapshot's overlay").unwrap();
    add_operation(&repo, "vm1", snapshot_record.clone());
    let tls = format!("tls://127.0.0.1:{port}");
    let client = pki.path("client");
    let remote = |extra: &[&str]| {
        let mut a = args(&["cleanup", "--qmp", &tls, "--tls-dir", dir(&client), "--repo"]);
        a.extend(args(&[dir(&repo.path()), "--vm", "vm1"]));
        a.extend(args(extra));
        tokio::task::block_in_place(|| cli::run_owned(&a))
    };
    let cleaned: CleanupReport = remote(&["--json"]).success().report();
    assert!(overlay.exists(), "deleted over a remote QMP: {cleaned:?}");
    let kept = &cleaned.cleaned.kept_outside;
    assert!(kept.iter().any(|k| k.contains("on the VM's host")), "{cleaned:?}");

    // The control: over the unix socket the same record deletes it.
    add_operation(&repo, "vm1", snapshot_record);
    let socket = vm.socket();
    let cleaned =
        tokio::task::block_in_place(|| repo.run("vm1", &["cleanup", "--socket", dir(&socket), "--json"]))
            .success()
            .report::<CleanupReport>();
    assert!(!overlay.exists(), "not deleted over the unix socket: {cleaned:?}");

    // An interrupted live restore is finished only from the VM's host.
    add_operation(
        &repo,
        "vm1",
        serde_json::json!({
            "id": "restore-0001", "node": "0001", "started": "2026-01-01T00:00:00Z", "pid": 1,
            "host": "elsewhere", "jobs": [], "block_nodes": [], "bitmaps": [], "files": [],
            "payload": { "kind": "live_restore" },
        }),
    );
    let out = remote(&[]);
    expect_failure(&out, 2, "finished only from the VM's host");
    assert_eq!(repo.manifest("vm1").operations.len(), 1);
}

/// A backup over `--qmp tls://` pulls: a full, an incremental, a differential and, after QEMU was killed and
/// started again, a checksum-diff; every node equals its reference, restores and verifies on the backup host,
/// and the incremental reads only what the guest wrote.
async fn check_remote_pull(vm: TestVm, on: &Host<'_>, tls: &str, pki: &TestPki, nbd: Option<&str>) {
    let repo = TestRepo::init();
    let refs_dir = tempfile::tempdir().unwrap();
    let client = pki.path("client");
    let mut backup = args(&[
        "backup",
        "--qmp",
        tls,
        "--tls-dir",
        dir(&client),
        "--repo",
        dir(&repo.path()),
        "--vm",
        "web1",
        "--json",
    ]);
    if let Some(listen) = nbd {
        backup.extend(args(&["--nbd-listen", listen]));
    }
    vm.write_pattern("disk0", 0x5a, MIB, 3 * MIB).await;
    let full_refs = vm.capture_references(&["disk0"], refs_dir.path(), "full").await;
    let full: BackupReport = tokio::task::block_in_place(|| on.qmpbak(&backup).success().report());
    assert_eq!(full.level, "full", "{full:?}");
    assert_eq!(full.disks[0].pulled_bytes, Some(3 * MIB), "{full:?}");
    vm.write_pattern("disk0", 0x6b, 9 * MIB, 256 * 1024).await;
    let inc_refs = vm.capture_references(&["disk0"], refs_dir.path(), "inc").await;
    let inc: BackupReport = tokio::task::block_in_place(|| on.qmpbak(&backup).success().report());
    assert_eq!(
        (inc.level.as_ref(), inc.method.as_ref()),
        ("incremental", "bitmap"),
        "{inc:?}"
    );
    assert_eq!(inc.disks[0].pulled_bytes, Some(256 * 1024), "{inc:?}");
    // A differential: against the full, so both writes so far.
    vm.write_pattern("disk0", 0x7c, 12 * MIB, 128 * 1024).await;
    let diff_refs = vm.capture_references(&["disk0"], refs_dir.path(), "diff").await;
    let diff_args = [backup.clone(), args(&["--level", "diff"])].concat();
    let diff: BackupReport = tokio::task::block_in_place(|| on.qmpbak(&diff_args).success().report());
    assert_eq!(diff.level, "differential", "{diff:?}");
    assert_eq!(diff.parent.as_deref(), Some(full.node.as_str()), "{diff:?}");
    // QEMU killed after a stop and started again: its bitmaps come back inconsistent, and the next pull compares
    // checking tables over the network.
    vm.qmp().execute_raw("stop", None).await.unwrap();
    vm.qmp().execute_raw("cont", None).await.unwrap();
    let vm = vm.restart().await;
    vm.write_pattern("disk0", 0x8d, 2 * MIB, MIB).await;
    let cd_refs = vm.capture_references(&["disk0"], refs_dir.path(), "cd").await;
    let cd: BackupReport = tokio::task::block_in_place(|| on.qmpbak(&backup).success().report());
    assert_eq!(cd.method, "checksum-diff", "{cd:?}");
    assert_eq!(cd.disks[0].copied_bytes, MIB, "{cd:?}");
    let restored = tempfile::tempdir().unwrap();
    for (report, refs) in [
        (&full, &full_refs),
        (&inc, &inc_refs),
        (&diff, &diff_refs),
        (&cd, &cd_refs),
    ] {
        let node = report.node.as_str();
        image::assert_same(&refs[0], &repo.node_file("web1", node, "disk0"));
        // One disk: --to names the image file itself.
        let to = restored.path().join(format!("{node}.qcow2"));
        let restore = args(&[
            "restore",
            node,
            "--to",
            dir(&to),
            "--repo",
            dir(&repo.path()),
            "--vm",
            "web1",
        ]);
        tokio::task::block_in_place(|| on.qmpbak(&restore).success());
        image::assert_same(&refs[0], &to);
    }
    let verify = args(&["verify", "--repo", dir(&repo.path()), "--vm", "web1"]);
    tokio::task::block_in_place(|| on.qmpbak(&verify).success());
    // The node's disks name the host that served them: the VM's host as the backup host reached it.
    let host = tls.trim_start_matches("tls://").rsplit_once(':').unwrap().0;
    for n in &repo.manifest("web1").nodes {
        assert_eq!(n.disks[0].source_host.as_deref(), Some(host), "{}", n.id);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn remote_pull_across_network_namespaces() {
    let pair = match NetnsPair::create() {
        Ok(pair) => pair,
        Err(why) => {
            eprintln!("SKIPPED remote_pull_across_network_namespaces: {why}");
            return;
        }
    };
    let pki = TestPki::new(&[IpAddr::V4(pair.hv_addr)]);
    let host = pair.hv_addr.to_string();
    let vm = TestVm::builder()
        .disk("disk0", 16 * MIB)
        .netns(&pair.hv)
        .tcp_qmp(&host, 4444, Some(&pki.path("server")))
        .start()
        .await;
    // QEMU's NBD server listens on the address the backup host reached its monitor at, port 10809.
    check_remote_pull(
        vm,
        &Host::Backup(&pair),
        &format!("tls://{host}:4444"),
        &pki,
        None,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn remote_pull_over_loopback() {
    let pki = TestPki::new(&[IpAddr::V4(Ipv4Addr::LOCALHOST)]);
    let (port, nbd) = (free_port(), free_port());
    let vm = TestVm::builder()
        .disk("disk0", 16 * MIB)
        .tcp_qmp("127.0.0.1", port, Some(&pki.path("server")))
        .start()
        .await;
    let listen = format!("127.0.0.1:{nbd}");
    check_remote_pull(
        vm,
        &Host::Here,
        &format!("tls://127.0.0.1:{port}"),
        &pki,
        Some(&listen),
    )
    .await;
}
