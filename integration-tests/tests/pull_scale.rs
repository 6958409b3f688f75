//! One backup host for several hypervisors (issue 19, "Scale"): four VMs on two "hypervisor" network namespaces,
//! each joined to one "backup" namespace by its own veth pair, pulled at once into one repository by four
//! concurrent `qmpbak backup --qmp tls://...` (the locks are per VM), twice (a full, then an incremental). Every
//! node equals the reference captured at its instant, the last ones restore exact, and every VM verifies. The
//! throughput is measured by `scripts/scale`, not here. Root and `ip netns` are needed; otherwise the test says
//! why and skips.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::net::IpAddr;

use integration_tests::cli;
use integration_tests::netns::NetnsPair;
use integration_tests::pki::TestPki;
use integration_tests::repo::TestRepo;
use integration_tests::timeouts::CLI_TIMEOUT;
use integration_tests::{MIB, TestVm, image};

const VMS: usize = 4;
const DISK: &str = "disk0";

#[tokio::test(flavor = "multi_thread")]
async fn four_vms_on_two_hypervisors_pulled_at_once_into_one_repository_each_restore_exact() {
    let mut pair = match NetnsPair::create() {
        Ok(pair) => pair,
        Err(why) => {
            eprintln!(
                "SKIPPED four_vms_on_two_hypervisors_pulled_at_once_into_one_repository_each_restore_exact: {why}"
            );
            return;
        }
    };
    let (hv2, hv2_addr) = pair.add_hypervisor().unwrap();
    let hosts = [(pair.hv.clone(), pair.hv_addr), (hv2, hv2_addr)];
    let pki = TestPki::new(&[IpAddr::V4(pair.hv_addr), IpAddr::V4(hv2_addr)]);
    let client = pki.path("client").display().to_string();
    let mut vms = Vec::new();
    // VM i on hypervisor i % 2, its monitor on port 4444 + i and its NBD server on 10809 + i.
    let mut targets = Vec::new();
    for i in 0..VMS {
        let (ns, addr) = &hosts[i % 2];
        let port = 4444 + u16::try_from(i).unwrap();
        let vm = TestVm::builder()
            .disk(DISK, 32 * MIB)
            .netns(ns)
            .tcp_qmp(&addr.to_string(), port, Some(&pki.path("server")))
            .start()
            .await;
        vms.push(vm);
        targets.push((format!("tls://{addr}:{port}"), format!("{addr}:{}", 10809 + i)));
    }
    let repo = TestRepo::init();
    let refs_dir = tempfile::tempdir().unwrap();
    let names: Vec<String> = (0..VMS).map(|i| format!("vm{i}")).collect();
    // Per round, per VM: (node, reference).
    let mut made: Vec<Vec<(String, std::path::PathBuf)>> = vec![Vec::new(); VMS];
    for round in 0..2u8 {
        let mut refs = Vec::new();
        for (i, vm) in vms.iter().enumerate() {
            let pattern = 0x20 * (round + 1) + u8::try_from(i).unwrap();
            vm.write_pattern(DISK, pattern, u64::from(round) * 8 * MIB, 6 * MIB)
                .await;
            let reference = refs_dir.path().join(format!("{}-{round}.qcow2", names[i]));
            vm.capture_reference(DISK, &reference).await;
            refs.push(reference);
        }
        // All four started before any is waited for.
        let children: Vec<_> = (0..VMS)
            .map(|i| {
                let (qmp, nbd) = &targets[i];
                let args: Vec<String> = [
                    "backup",
                    "--qmp",
                    qmp,
                    "--tls-dir",
                    &client,
                    "--nbd-listen",
                    nbd,
                    "--json",
                ]
                .iter()
                .map(|s| (*s).to_owned())
                .chain(repo.vm_args(&names[i], &[]))
                .collect();
                pair.qmpbak(&args).spawn().expect("spawn qmpbak")
            })
            .collect();
        let reports: Vec<serde_json::Value> = tokio::task::block_in_place(|| {
            children
                .into_iter()
                .map(|c| cli::wait(c, CLI_TIMEOUT).success().json())
                .collect()
        });
        for (i, report) in reports.iter().enumerate() {
            let level = if round == 0 { "full" } else { "incremental" };
            assert_eq!(report["level"], level, "{}: {report}", names[i]);
            made[i].push((report["node"].as_str().unwrap().to_owned(), refs[i].clone()));
        }
    }
    let out = tempfile::tempdir().unwrap();
    for (i, nodes) in made.iter().enumerate() {
        for (node, reference) in nodes {
            image::assert_same(reference, &repo.node_file(&names[i], node, DISK));
        }
        let (last, reference) = nodes.last().unwrap();
        let restored = out.path().join(format!("{}.qcow2", names[i]));
        repo.run(&names[i], &["restore", last, "--to", restored.to_str().unwrap()])
            .success();
        image::assert_same(reference, &restored);
        repo.run(&names[i], &["verify"]).success();
        let manifest = repo.manifest(&names[i]);
        assert!(manifest.operations.is_empty(), "{}", names[i]);
        // Each node names the hypervisor that served it.
        let host = hosts[i % 2].1.to_string();
        for n in &manifest.nodes {
            assert_eq!(n.disks[0].source_host.as_deref(), Some(host.as_str()), "{}", n.id);
        }
    }
}
