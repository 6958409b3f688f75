//! Throughput of checking-table builds and the cost of a large manifest, timed with `std::time` only.
//!
//! `cargo bench -p chain` prints MiB/s for a table built over memory and over a 512 MiB file, one thread and
//! all threads, beside `sha256sum` of the same file run from here; then the time to load and validate a
//! 10 000-node manifest and walk its whole tree (target: under 50 ms in release). Run without `--bench` (as
//! `cargo test --benches` does) it uses small sizes, as a smoke test.

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use chain::{
    FileSource, Location, LockWait, MemSource, Node, NodeDisk, NodeId, NodeKind, NodeState, RelPath,
    Repository, Scheme, Table,
};
use chrono::Utc;

const BLOCK_SIZE: u64 = 1 << 20;

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let (mem_mib, file_mib, nodes) = if full { (256, 512, 10_000) } else { (16, 16, 1_000) };
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    println!(
        "checking tables: block size {} KiB, {cores} cores",
        BLOCK_SIZE >> 10
    );

    let data = random_bytes(mem_mib << 20);
    let mem = MemSource::new(data);
    for (label, threads) in [("1 thread", 1), ("all threads", 0)] {
        let (rate, _) = time_build(|| Table::build(&mem, Scheme::default(), BLOCK_SIZE, threads));
        println!("  memory {mem_mib} MiB, {label:<11}: {rate:8.1} MiB/s");
    }
    // Dense random data has no zero pieces: what the pieces digests cost over flat ones where they save nothing.
    let (flat, _) = time_build(|| Table::build(&mem, Scheme::Flat, BLOCK_SIZE, 1));
    println!("  memory {mem_mib} MiB, 1 thread, flat digests: {flat:8.1} MiB/s");
    drop(mem);

    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("disk.raw");
    write_file(&path, file_mib);
    let src = FileSource::open(&path).expect("the benchmark file");
    for (label, threads) in [("1 thread", 1), ("all threads", 0)] {
        let (rate, _) = time_build(|| Table::build(&src, Scheme::default(), BLOCK_SIZE, threads));
        println!("  file {file_mib} MiB,   {label:<11}: {rate:8.1} MiB/s");
    }
    let started = Instant::now();
    match Command::new("sha256sum").arg(&path).output() {
        Ok(out) if out.status.success() => {
            println!(
                "  sha256sum of the same file:   {:8.1} MiB/s",
                file_mib as f64 / secs(started.elapsed())
            );
        }
        _ => println!("  sha256sum: not available"),
    }
    drop(src);
    drop(dir);

    manifest(nodes);
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64().max(1e-9)
}

/// MiB/s of the best of three builds.
fn time_build(build: impl Fn() -> chain::Result<Table>) -> (f64, Table) {
    let mut best = Duration::MAX;
    let mut table = None;
    for _ in 0..3 {
        let started = Instant::now();
        let t = build().expect("table build");
        best = best.min(started.elapsed());
        table = Some(t);
    }
    let table = table.expect("three builds");
    ((table.virtual_size() >> 20) as f64 / secs(best), table)
}

fn random_bytes(len: usize) -> Vec<u8> {
    let mut data = vec![0u8; len];
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    data
}

fn write_file(path: &Path, mib: usize) {
    let mut file = std::fs::File::create(path).expect("the benchmark file");
    let chunk = random_bytes(8 << 20);
    for _ in 0..mib.div_ceil(8) {
        file.write_all(&chunk[..(mib << 20).min(chunk.len())])
            .expect("writing the benchmark file");
    }
    file.sync_all().expect("fsync");
}

/// A repository whose VM has `count` nodes: a new full every 8 backups, each chain with a side branch.
fn manifest(count: usize) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let repo = Repository::init(dir.path().join("repo")).expect("init");
    let vm = repo.create_vm("vm").expect("create vm");
    let guard = vm.lock_exclusive(LockWait::NoWait, "bench").expect("lock");
    let mut m = vm.load().expect("load");
    let mut last_full: Option<NodeId> = None;
    let mut previous: Option<NodeId> = None;
    for i in 0..count {
        let id = m.next_node_id().expect("node id");
        let (kind, parent) = match i % 8 {
            0 => (NodeKind::Full, None),
            5 => (NodeKind::Differential, last_full.clone()),
            _ => (NodeKind::Incremental, previous.clone()),
        };
        m.nodes.push(node(&id, parent, kind));
        if kind == NodeKind::Full {
            last_full = Some(id.clone());
        }
        previous = Some(id);
    }
    m.recompute_numbering().expect("numbering");
    m.current = previous;
    vm.save(&m, &guard).expect("save");
    let size = std::fs::metadata(vm.manifest_path()).map_or(0, |md| md.len());

    let mut best = (Duration::MAX, Duration::MAX);
    let mut checksum = 0usize;
    for _ in 0..5 {
        let started = Instant::now();
        let loaded = vm.load().expect("load");
        let loaded_at = started.elapsed();
        let walk_started = Instant::now();
        let tree = loaded.tree().expect("tree");
        for n in tree.preorder() {
            checksum += tree.recovery_chain(n.id.as_str()).map_or(0, |c| c.len());
            checksum += tree.children(n.id.as_str()).map_or(0, |c| c.len());
        }
        checksum += tree.leaves().len();
        let walked = walk_started.elapsed();
        best = (best.0.min(loaded_at), best.1.min(walked));
    }
    println!(
        "manifest: {count} nodes, {:.1} MiB; load + validate {:.1} ms, full tree walk (recovery chain and children of \
         every node) {:.1} ms, total {:.1} ms (target < 50 ms) [{checksum}]",
        size as f64 / f64::from(1 << 20),
        best.0.as_secs_f64() * 1e3,
        best.1.as_secs_f64() * 1e3,
        (best.0 + best.1).as_secs_f64() * 1e3,
    );
}

fn node(id: &NodeId, parent: Option<NodeId>, kind: NodeKind) -> Node {
    let disk = |name: &str| NodeDisk {
        source_host: None,
        disk: name.to_owned(),
        file: RelPath::disk_image(id, name).expect("path"),
        backing: parent
            .as_ref()
            .map(|p| RelPath::disk_image(p, name).expect("path")),
        virtual_size: 20 << 30,
        allocated_bytes: 1 << 30,
        bitmap: Some(format!("qmpbak-0123abcd-inc-{id}")),
        table: Some(RelPath::disk_table(id, name).expect("path")),
        table_sha256: Some("ab".repeat(32)),
        location: Location {
            host: "host".into(),
            path: format!("/backup/repo/vm/{id}/{name}.qcow2"),
            predecessor: None,
        },
    };
    let disks = vec![disk("disk0"), disk("disk1")];
    Node {
        id: id.clone(),
        parent,
        kind,
        created: Utc::now(),
        state: NodeState::Complete,
        tag: None,
        reason: Some("scheduled".into()),
        lid: 0,
        tid: 0,
        disks,
    }
}
