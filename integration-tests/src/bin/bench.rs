#![allow(clippy::unwrap_used)]
//! `bench`: qmpbak's performance benchmark (run it with `scripts/bench`, which builds it and `qmpbak` in release).
//!
//! It boots a tiny [`TestVm`] on a qcow2 disk filled before boot with `qemu-io` (many data extents, a region of
//! zero clusters and a hole), runs each measured operation `--runs` times (min and median), compares it with
//! references measured in the same run (QEMU's backup job alone, `qemu-img convert` with and without an fsync of
//! its output, `openssl speed` for SHA-256), and prints a table, a PASS/MISS line per target and, with
//! `--json FILE`, the same as JSON.
//!
//! Every measured program runs as a child process; its wall time is taken from spawn to reaping, and its peak
//! RSS (VmHWM) and that of its children (qemu-storage-daemon, qemu-img) are read from `/proc` every 5 ms while it
//! runs. The `tables_secs` of a backup's `--json` report splits it into its copy phase (the `blockdev-backup` job
//! in the VM's QEMU) and its checking-table phase. Before each measured program the
//! bench runs `sync`, so that no run pays for writing back what an earlier one left dirty in the page cache;
//! the data being read is in the page cache for every contender alike.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use integration_tests::TestVm;
use integration_tests::qemu::QemuBinaries;
use serde_json::{Value, json};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// The bench VM's disk (qdev id).
const DISK: &str = "disk0";
/// The VM's name in the repositories.
const VM: &str = "bench";
/// Size of one guest write when dirtying the disk.
const DIRTY_WRITE: u64 = 64 * KIB;
/// A measured program that runs longer than this has hung.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(3600);
/// How often a running program's memory is sampled.
const SAMPLE_INTERVAL: Duration = Duration::from_millis(5);
/// Nodes in the manifest `qmpbak list` reads.
const LIST_NODES: u64 = 10_000;
/// Incrementals on top of the full for the restore measurement.
const RESTORE_INCREMENTALS: usize = 10;

const USAGE: &str = "\
usage: bench [--size SIZE] [--data SIZE] [--runs N] [--quick] [--json FILE] [--only SECTIONS] [--keep]

  --size SIZE     virtual size of the VM's disk (default 4G; K, M, G, T suffixes, binary)
  --data SIZE     non-zero data written into it before boot, in many extents (default 1.5G)
  --runs N        runs per measurement; min and median are reported (default 3)
  --quick         a 256 MiB disk with 96 MiB of data, one run each: a smoke test of the bench itself
  --json FILE     also write the results as JSON
  --only LIST     comma-separated sections: full,crypt,inc,empty,cdiff,restore,live,verify,sparse,list,rss,pull
                  (default all; crypt, inc, empty, cdiff, restore, live and verify need full; sparse is its own
                  case: ten 64 MiB extents on a 1 TiB disk against the same on 4 GiB; pull boots its own VM
                  with TLS credentials and compares backup --pull with qemu-img convert over NBD)
  --keep          keep the work directory (repositories, images) and print its path
  --block-size S  checking-table block size of the repositories (default: the repository default, 1 MiB)
";

fn main() {
    let opts = match Options::parse(std::env::args().skip(1)) {
        Ok(opts) => opts,
        Err(msg) => {
            eprintln!("bench: {msg}\n\n{USAGE}");
            std::process::exit(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let report = runtime.block_on(run(&opts));
    print!("{}", report.render());
    if let Some(path) = &opts.json {
        let text = serde_json::to_string_pretty(&report.to_json()).expect("serialise report");
        fs::write(path, text + "\n").unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        println!("\nJSON written to {}", path.display());
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Options

#[derive(Debug, Clone)]
struct Options {
    size: u64,
    data: u64,
    runs: usize,
    quick: bool,
    json: Option<PathBuf>,
    only: Option<Vec<String>>,
    keep: bool,
    /// Checking-table block size for the repositories (None: qmpbak init's default).
    block_size: Option<u64>,
    /// (disk size, data) of the two configurations whose peak RSS is compared.
    rss_configs: [(u64, u64); 2],
}

const SECTIONS: [&str; 12] = [
    "full", "crypt", "inc", "empty", "cdiff", "restore", "live", "verify", "sparse", "list", "rss", "pull",
];

impl Options {
    fn parse(args: impl Iterator<Item = String>) -> Result<Options, String> {
        let mut size = None;
        let mut data = None;
        let mut runs = None;
        let mut quick = false;
        let mut json = None;
        let mut only = None;
        let mut keep = false;
        let mut block_size = None;
        let mut args = args.peekable();
        while let Some(arg) = args.next() {
            let (name, inline) = match arg.split_once('=') {
                Some((n, v)) if n.starts_with("--") => (n.to_owned(), Some(v.to_owned())),
                _ => (arg.clone(), None),
            };
            let mut value = || -> Result<String, String> {
                inline
                    .clone()
                    .or_else(|| args.next())
                    .ok_or_else(|| format!("{name} needs a value"))
            };
            match name.as_str() {
                "--size" => size = Some(parse_size(&value()?)?),
                "--data" => data = Some(parse_size(&value()?)?),
                "--runs" => {
                    let v = value()?;
                    let n: usize = v.parse().map_err(|_| format!("--runs {v}: not a number"))?;
                    if n == 0 {
                        return Err("--runs must be at least 1".into());
                    }
                    runs = Some(n);
                }
                "--quick" => quick = true,
                "--json" => json = Some(PathBuf::from(value()?)),
                "--only" => {
                    let list: Vec<String> = value()?.split(',').map(str::to_owned).collect();
                    if let Some(bad) = list.iter().find(|s| !SECTIONS.contains(&s.as_str())) {
                        return Err(format!("unknown section {bad:?}"));
                    }
                    only = Some(list);
                }
                "--keep" => keep = true,
                "--block-size" => block_size = Some(parse_size(&value()?)?),
                "-h" | "--help" => {
                    print!("{USAGE}");
                    std::process::exit(0);
                }
                other => return Err(format!("unknown argument {other:?}")),
            }
        }
        let (default_size, default_data, default_runs) = if quick {
            (256 * MIB, 96 * MIB, 1)
        } else {
            (4 * GIB, 3 * GIB / 2, 3)
        };
        let size = size.unwrap_or(default_size);
        let data = data.unwrap_or(default_data);
        if size < 64 * MIB || size % MIB != 0 {
            return Err("--size must be a multiple of 1 MiB and at least 64 MiB".into());
        }
        if data > size / 4 * 3 {
            return Err("--data must fit in the first three quarters of the disk".into());
        }
        let rss_configs = if quick {
            [(128 * MIB, 32 * MIB), (GIB, 32 * MIB)]
        } else {
            [(GIB, 384 * MIB), (8 * GIB, 3 * GIB / 2)]
        };
        Ok(Options {
            size,
            data,
            runs: runs.unwrap_or(default_runs),
            quick,
            json,
            only,
            keep,
            block_size,
            rss_configs,
        })
    }

    fn wants(&self, section: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|only| only.iter().any(|s| s == section))
    }
}

/// "4G", "1.5GiB", "256M", "65536" → bytes (binary units), rounded down to 64 KiB past 1 MiB.
fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let t = t.strip_suffix("iB").or_else(|| t.strip_suffix('B')).unwrap_or(t);
    let (num, unit) = match t.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => (&t[..i], &t[i..]),
        None => (t, ""),
    };
    let factor = match unit.to_ascii_uppercase().as_str() {
        "" => 1,
        "K" => KIB,
        "M" => MIB,
        "G" => GIB,
        "T" => GIB * 1024,
        _ => return Err(format!("{text:?}: unknown unit {unit:?}")),
    };
    let value: f64 = num.parse().map_err(|_| format!("{text:?} is not a size"))?;
    if !(value.is_finite() && value >= 0.0) {
        return Err(format!("{text:?} is not a size"));
    }
    let bytes = (value * factor as f64) as u64;
    Ok(if bytes >= MIB {
        bytes / (64 * KIB) * (64 * KIB)
    } else {
        bytes
    })
}

// ---------------------------------------------------------------------------------------------------------------
// Running and measuring programs

/// One finished program run.
#[derive(Debug)]
struct Measured {
    what: String,
    secs: f64,
    status: ExitStatus,
    stdout: String,
    stderr: String,
    /// Peak RSS (VmHWM) of the program itself, KiB.
    rss_kib: u64,
    /// Peak RSS of its descendants by command name, KiB.
    child_rss_kib: BTreeMap<String, u64>,
}

impl Measured {
    #[track_caller]
    fn ok(self) -> Measured {
        assert!(
            self.status.success(),
            "{} failed ({}):\n{}\n{}",
            self.what,
            self.status,
            self.stdout,
            self.stderr
        );
        self
    }

    #[track_caller]
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("{}: stdout is not JSON ({e}):\n{}", self.what, self.stdout))
    }

    fn storage_daemon_rss_kib(&self) -> u64 {
        self.child_rss_kib
            .iter()
            .filter(|(name, _)| name.starts_with("qemu-storage"))
            .map(|(_, kib)| *kib)
            .max()
            .unwrap_or(0)
    }
}

/// The seconds a backup spent building its checking tables after the copy, from its `--json` report.
#[track_caller]
fn tables_secs(m: &Measured) -> f64 {
    m.json()["tables_secs"]
        .as_f64()
        .unwrap_or_else(|| panic!("{}: no tables_secs in the report:\n{}", m.what, m.stdout))
}

/// Runs `program args` to completion, timing it and sampling the memory of it and its children.
fn measure(program: &Path, args: &[&str]) -> Measured {
    settle();
    measure_now(program, args)
}

/// [`measure`] without the `sync` first.
fn measure_now(program: &Path, args: &[&str]) -> Measured {
    let what = format!(
        "{} {}",
        program
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
        args.join(" ")
    );
    let started = Instant::now();
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
    let pid = child.id();
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let (tx, rx) = mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let status = child.wait();
        let _ = tx.send(Instant::now());
        status
    });
    let mut rss_kib = 0;
    let mut child_rss_kib = BTreeMap::new();
    let ended = loop {
        if let Some(kib) = vm_hwm_kib(pid) {
            rss_kib = rss_kib.max(kib);
        }
        for kid in descendants(pid) {
            let name = comm(kid);
            if name.is_empty() {
                continue;
            }
            if let Some(kib) = vm_hwm_kib(kid) {
                let peak = child_rss_kib.entry(name).or_insert(0);
                *peak = kib.max(*peak);
            }
        }
        match rx.recv_timeout(SAMPLE_INTERVAL) {
            Ok(at) => break at,
            Err(mpsc::RecvTimeoutError::Timeout) if started.elapsed() > COMMAND_TIMEOUT => {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(i32::try_from(pid).expect("a pid fits i32")),
                    nix::sys::signal::Signal::SIGKILL,
                );
                panic!("{what} did not finish within {COMMAND_TIMEOUT:?}");
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => panic!("waiting for {what} failed"),
        }
    };
    let status = waiter
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("waiting for {what}: {e}"));
    Measured {
        what,
        secs: ended.duration_since(started).as_secs_f64(),
        status,
        stdout: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
        rss_kib,
        child_rss_kib,
    }
}

/// Writes back dirty pages (`sync`) so the next measurement starts from the same state.
fn settle() {
    let _ = Command::new("sync").status();
}

/// VmHWM of a process in KiB (None once it has exited).
fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// All descendants of a process (through `/proc/PID/task/TID/children`).
fn descendants(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        let Ok(tasks) = fs::read_dir(format!("/proc/{p}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let Ok(list) = fs::read_to_string(task.path().join("children")) else {
                continue;
            };
            for kid in list.split_whitespace().filter_map(|s| s.parse().ok()) {
                out.push(kid);
                todo.push(kid);
            }
        }
    }
    out
}

fn comm(pid: u32) -> String {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// Runs a helper program (not measured) and returns its stdout; panics on failure.
fn run_tool(program: &Path, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()));
    assert!(
        out.status.success(),
        "{} {args:?} failed: {}{}",
        program.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn s(path: &Path) -> &str {
    path.to_str().expect("UTF-8 path")
}

// ---------------------------------------------------------------------------------------------------------------
// Results

/// One measured quantity over several runs.
#[derive(Debug, Clone)]
struct Row {
    key: String,
    label: String,
    unit: &'static str,
    samples: Vec<f64>,
    note: String,
}

impl Row {
    fn min(&self) -> f64 {
        self.samples.iter().copied().fold(f64::INFINITY, f64::min)
    }

    fn max(&self) -> f64 {
        self.samples.iter().copied().fold(f64::NEG_INFINITY, f64::max)
    }

    fn median(&self) -> f64 {
        median(&self.samples)
    }

    /// The best run: the shortest time, or the highest rate. Targets are judged on it, for ours and for the
    /// reference alike: on a shared machine the other runs measure the neighbours as much as the program.
    fn best(&self) -> f64 {
        if self.unit.ends_with("/s") {
            self.max()
        } else {
            self.min()
        }
    }
}

fn median(samples: &[f64]) -> f64 {
    let mut v = samples.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => f64::midpoint(v[n / 2 - 1], v[n / 2]),
    }
}

/// A target and whether it was met.
#[derive(Debug, Clone)]
struct Check {
    name: String,
    /// What was measured, in words and numbers.
    measured: String,
    target: String,
    pass: bool,
}

#[derive(Default)]
struct Report {
    config: Value,
    rows: Vec<Row>,
    checks: Vec<Check>,
    notes: Vec<String>,
}

impl Report {
    fn add(&mut self, key: &str, label: &str, unit: &'static str, samples: Vec<f64>, note: &str) -> Row {
        let row = Row {
            key: key.to_owned(),
            label: label.to_owned(),
            unit,
            samples,
            note: note.to_owned(),
        };
        self.rows.push(row.clone());
        row
    }

    fn check(&mut self, name: &str, pass: bool, measured: String, target: &str) {
        self.checks.push(Check {
            name: name.to_owned(),
            measured,
            target: target.to_owned(),
            pass,
        });
    }

    fn row(&self, key: &str) -> Option<&Row> {
        self.rows.iter().find(|r| r.key == key)
    }

    fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "\nqmpbak bench: {}",
            self.config["summary"].as_str().unwrap_or("")
        );
        let lw = self
            .rows
            .iter()
            .map(|r| r.label.len())
            .max()
            .unwrap_or(10)
            .max(11);
        let _ = writeln!(
            out,
            "\n{:<lw$}  {:>10}  {:>10}  {:<5}  note",
            "measurement", "min", "median", "unit"
        );
        let _ = writeln!(out, "{}", "-".repeat(lw + 34 + 30));
        for r in &self.rows {
            let _ = writeln!(
                out,
                "{:<lw$}  {:>10}  {:>10}  {:<5}  {}",
                r.label,
                fmt_num(r.min()),
                fmt_num(r.median()),
                r.unit,
                r.note
            );
        }
        let _ = writeln!(out, "\ntargets (best run of each, ours and the reference's):");
        for c in &self.checks {
            let _ = writeln!(
                out,
                "  {:<4}  {}: {} (target {})",
                if c.pass { "PASS" } else { "MISS" },
                c.name,
                c.measured,
                c.target
            );
        }
        if !self.notes.is_empty() {
            let _ = writeln!(out, "\nnotes:");
            for n in &self.notes {
                let _ = writeln!(out, "  - {n}");
            }
        }
        out
    }

    fn to_json(&self) -> Value {
        json!({
            "config": self.config,
            "results": self.rows.iter().map(|r| json!({
                "key": r.key,
                "label": r.label,
                "unit": r.unit,
                "samples": r.samples,
                "min": r.min(),
                "median": r.median(),
                "max": r.max(),
                "note": r.note,
            })).collect::<Vec<_>>(),
            "targets": self.checks.iter().map(|c| json!({
                "name": c.name,
                "pass": c.pass,
                "measured": c.measured,
                "target": c.target,
            })).collect::<Vec<_>>(),
            "notes": self.notes,
        })
    }
}

fn fmt_num(v: f64) -> String {
    if !v.is_finite() {
        "-".to_owned()
    } else if v.abs() >= 1000.0 {
        format!("{v:.0}")
    } else if v.abs() >= 100.0 {
        format!("{v:.1}")
    } else if v.abs() >= 10.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// Drops the page cache of every file under `dir` (`posix_fadvise` DONTNEED; the files are synced first, so
/// every page is clean and goes): what a backup host whose repository is far larger than its memory reads from.
fn evict_cache(dir: &Path) {
    for entry in fs::read_dir(dir).expect("read the repository directory") {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            evict_cache(&path);
        } else if let Ok(file) = fs::File::open(&path) {
            file.sync_all().expect("sync a repository file");
            nix::fcntl::posix_fadvise(
                std::os::fd::AsRawFd::as_raw_fd(&file),
                0,
                0,
                nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
            )
            .expect("posix_fadvise");
        }
    }
}

fn fmt_bytes(b: u64) -> String {
    if b >= GIB {
        format!("{:.2} GiB", b as f64 / GIB as f64)
    } else if b >= MIB {
        format!("{:.1} MiB", b as f64 / MIB as f64)
    } else {
        format!("{:.0} KiB", b as f64 / KIB as f64)
    }
}

/// The ratio of the best runs of two timings, and a text with it and the ratio of their medians.
fn ratio(ours: &Row, reference: &Row) -> (f64, String) {
    let best = ours.best() / reference.best();
    let text = format!(
        "best {:.2} s vs {:.2} s = {best:.2} x (median {:.2} s vs {:.2} s = {:.2} x)",
        ours.best(),
        reference.best(),
        ours.median(),
        reference.median(),
        ours.median() / reference.median()
    );
    (best, text)
}

fn secs(samples: &[Measured]) -> Vec<f64> {
    samples.iter().map(|m| m.secs).collect()
}

// ---------------------------------------------------------------------------------------------------------------
// The disk

/// What is written into the disk before boot.
#[derive(Debug, Clone)]
struct Layout {
    /// (offset, length) of the non-zero extents.
    extents: Vec<(u64, u64)>,
    /// Written as zero clusters (`write -z`).
    zero: (u64, u64),
}

/// A small deterministic generator (xorshift64*), so every run writes the same layout.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (n > 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

impl Layout {
    /// `data` bytes in extents of 64 KiB to 4 MiB (64 KiB aligned) with gaps between them in the first three
    /// quarters of the disk, then a zero region (1/16 of the disk, at most 256 MiB), then a hole to the end.
    fn new(size: u64, data: u64) -> Layout {
        let unit = 64 * KIB;
        let region = size / 4 * 3 / unit * unit;
        let data = data / unit * unit;
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut lens = Vec::new();
        let mut left = data;
        while left > 0 {
            let len = ((1 + rng.below(64)) * unit).min(left);
            lens.push(len);
            left -= len;
        }
        let free = (region - data) / unit;
        let weights: Vec<u64> = lens.iter().map(|_| 1 + rng.below(1000)).collect();
        let total: u64 = weights.iter().sum::<u64>().max(1);
        let mut extents = Vec::with_capacity(lens.len());
        let mut at = 0;
        for (len, w) in lens.into_iter().zip(weights) {
            at += free * w / total * unit;
            extents.push((at, len));
            at += len;
        }
        let zero_len = (size / 16).min(256 * MIB) / unit * unit;
        Layout {
            extents,
            zero: (region, zero_len),
        }
    }

    fn data_bytes(&self) -> u64 {
        self.extents.iter().map(|e| e.1).sum()
    }

    /// Writes the layout into a qcow2 image with one `qemu-io` run.
    fn write(&self, qemu_io: &Path, image: &Path) {
        let mut args: Vec<String> = vec!["-f".into(), "qcow2".into(), s(image).into()];
        for (i, (offset, len)) in self.extents.iter().enumerate() {
            let pattern = 0x10 + (i % 0xe0);
            args.push("-c".into());
            args.push(format!("write -q -P 0x{pattern:02x} {offset} {len}"));
        }
        args.push("-c".into());
        args.push(format!("write -q -z {} {}", self.zero.0, self.zero.1));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        run_tool(qemu_io, &refs);
    }
}

/// Starts a VM with one disk of `size` holding `layout`: boots it once to create the image, kills it, fills the
/// image with qemu-io (much faster than guest writes) and boots it again on the filled image.
async fn start_filled_vm(bins: &Tools, size: u64, layout: &Layout) -> TestVm {
    let mut vm = TestVm::builder().disk(DISK, size).start().await;
    vm.kill();
    layout.write(&bins.qemu_io, &vm.disk_path(DISK));
    vm.restart().await
}

/// The offsets of the 64 KiB writes that dirty 1 % of a disk, spread evenly with some jitter.
fn dirty_offsets(size: u64, round: u64) -> Vec<u64> {
    let count = (size / 100 / DIRTY_WRITE).max(1);
    let stride = size / count / DIRTY_WRITE;
    let mut rng = Rng(0x1234_5678_9abc_def1 ^ (round + 1).wrapping_mul(0x9e37_79b9));
    (0..count)
        .map(|i| (i * stride + rng.below(stride.max(1))) * DIRTY_WRITE)
        .filter(|&o| o + DIRTY_WRITE <= size)
        .collect()
}

/// Dirties 1 % of the disk with guest writes (HMP qemu-io on the device's backend).
async fn dirty_one_percent(vm: &TestVm, size: u64, round: u64) -> u64 {
    let offsets = dirty_offsets(size, round);
    let pattern = 0xa0 + (round % 0x50) as u8;
    for &offset in &offsets {
        vm.write_pattern(DISK, pattern, offset, DIRTY_WRITE).await;
    }
    offsets.len() as u64 * DIRTY_WRITE
}

// ---------------------------------------------------------------------------------------------------------------
// The bench

struct Tools {
    qmpbak: PathBuf,
    qemu_img: PathBuf,
    qemu_io: PathBuf,
}

impl Tools {
    fn find() -> Tools {
        let qmpbak = std::env::var_os("QMPBAK_BIN").map_or_else(
            || {
                std::env::current_exe()
                    .expect("current executable")
                    .with_file_name("qmpbak")
            },
            PathBuf::from,
        );
        assert!(
            qmpbak.exists(),
            "{} not found: build it (scripts/bench does) or set QMPBAK_BIN",
            qmpbak.display()
        );
        let bins = QemuBinaries::from_env();
        let qemu_io = bins.img.with_file_name("qemu-io");
        Tools {
            qmpbak,
            qemu_img: bins.img,
            qemu_io,
        }
    }

    fn qmpbak(&self, args: &[&str]) -> Measured {
        measure(&self.qmpbak, args)
    }

    /// A new repository: `qmpbak init`, or the chain crate's with another table block size.
    fn init_repo(&self, path: &Path, block_size: Option<u64>) {
        match block_size {
            None => {
                self.qmpbak(&["init", s(path)]).ok();
            }
            Some(block_size) => {
                let settings = chain::Settings {
                    block_size,
                    ..chain::Settings::default()
                };
                chain::Repository::init_with(path, settings).expect("init repository");
            }
        }
    }

    fn backup(&self, vm: &TestVm, repo: &Path, level: &str) -> Measured {
        self.backup_with(vm, repo, level, &[])
    }

    /// [`Tools::backup`] with `extra` arguments.
    fn backup_with(&self, vm: &TestVm, repo: &Path, level: &str, extra: &[&str]) -> Measured {
        let socket = vm.socket();
        let args = [
            "backup",
            "--socket",
            s(&socket),
            "--repo",
            s(repo),
            "--vm",
            VM,
            "--level",
            level,
            "--json",
        ];
        self.qmpbak(&[&args[..], extra].concat()).ok()
    }

    /// An offline restore of `node` into the new directory `to`.
    /// Times `qemu-img convert -O qcow2` of `src` into the new file `out`, then an fsync of `out`; returns the
    /// seconds of the convert alone and of both (a copy that survives a crash).
    fn convert_then_sync(&self, src: &Path, out: &Path) -> (f64, f64) {
        let convert = measure(&self.qemu_img, &["convert", "-U", "-O", "qcow2", s(src), s(out)]).ok();
        let sync = measure_now(Path::new("sync"), &[s(out)]).ok();
        (convert.secs, convert.secs + sync.secs)
    }

    fn restore(&self, repo: &Path, node: &str, to: &Path) -> Measured {
        self.restore_with(repo, node, to, &[])
    }

    /// [`Tools::restore`] with `extra` arguments.
    fn restore_with(&self, repo: &Path, node: &str, to: &Path, extra: &[&str]) -> Measured {
        fs::create_dir_all(to).expect("create restore directory");
        let args = [
            "restore",
            node,
            "--repo",
            s(repo),
            "--vm",
            VM,
            "--to",
            s(to),
            "--json",
        ];
        self.qmpbak(&[&args[..], extra].concat()).ok()
    }
}

/// The bench's state: the VM under test and its main repository.
struct Bench<'o> {
    opts: &'o Options,
    tools: Tools,
    work: PathBuf,
    layout: Layout,
    report: Report,
    /// The repository of the last full backup, with everything after it.
    repo: PathBuf,
    full_node: Option<String>,
    full_secs: Option<f64>,
    backup_rss: Vec<u64>,
    restore_rss: Vec<u64>,
}

async fn run(opts: &Options) -> Report {
    let tools = Tools::find();
    let workdir = tempfile::Builder::new()
        .prefix("qmpbak-bench-")
        .tempdir()
        .expect("create work dir");
    let work = workdir.path().to_owned();
    let layout = Layout::new(opts.size, opts.data);
    let mut bench = Bench {
        opts,
        work: work.clone(),
        repo: work.join("repo"),
        report: Report::default(),
        layout,
        tools,
        full_node: None,
        full_secs: None,
        backup_rss: Vec::new(),
        restore_rss: Vec::new(),
    };
    let load_before = loadavg();
    let reported_before = page_reporting_kib();
    let started = Instant::now();
    bench.report.config = json!({
        "summary": format!(
            "disk {} qcow2, {} data in {} extents + {} zero clusters + hole; table blocks {}; {} run(s) each; \
             {} cores; load {}",
            fmt_bytes(opts.size), fmt_bytes(bench.layout.data_bytes()), bench.layout.extents.len(),
            fmt_bytes(bench.layout.zero.1), fmt_bytes(opts.block_size.unwrap_or(MIB)), opts.runs, cores(),
            load_before),
        "block_size": opts.block_size.unwrap_or(MIB),
        "size": opts.size,
        "data": bench.layout.data_bytes(),
        "extents": bench.layout.extents.len(),
        "zero_region": bench.layout.zero.1,
        "runs": opts.runs,
        "quick": opts.quick,
        "cores": cores(),
        "cpu": cpu_model(),
        "qemu": run_tool(&bench.tools.qemu_img, &["--version"]).lines().next().unwrap_or("").to_owned(),
        "loadavg_before": load_before,
    });

    let needs_vm = [
        "full", "crypt", "inc", "empty", "cdiff", "restore", "live", "verify",
    ]
    .iter()
    .any(|s| opts.wants(s));
    if !needs_vm && opts.wants("sparse") {
        bench.report.config["summary"] = json!(format!(
            "the sparse case only (ten extents on a 4 GiB and on a 1 TiB qcow2 disk); {} run(s) each; {} cores; \
             load {load_before}",
            opts.runs,
            cores()
        ));
    }
    if needs_vm {
        eprintln!(
            "bench: filling a {} disk with {} of data ({} extents)",
            fmt_bytes(opts.size),
            fmt_bytes(bench.layout.data_bytes()),
            bench.layout.extents.len()
        );
        let mut vm = start_filled_vm(&bench.tools, opts.size, &bench.layout).await;
        bench.full(&vm).await;
        if bench.full_node.is_some() {
            if opts.wants("crypt") {
                bench.encrypted(&vm);
            }
            if opts.wants("inc") {
                bench.incremental(&vm).await;
            }
            if opts.wants("empty") {
                bench.empty_incremental(&vm);
            }
            if opts.wants("cdiff") {
                vm = bench.checksum_diff(vm).await;
            }
            if opts.wants("restore") {
                bench.restore(&vm).await;
            }
            if opts.wants("verify") {
                bench.verify();
            }
            if opts.wants("live") {
                bench.live().await;
            }
        }
        drop(vm);
    }
    if opts.wants("sparse") {
        bench.sparse().await;
    }
    if opts.wants("pull") {
        bench.pull().await;
    }
    if opts.wants("list") {
        bench.list();
    }
    if opts.wants("rss") {
        bench.rss().await;
    }
    bench.rss_checks();
    let load_after = loadavg();
    bench.report.config["loadavg_after"] = json!(load_after);
    bench.report.config["bench_secs"] = json!(started.elapsed().as_secs_f64());
    bench.report.notes.push(format!(
        "load average before {load_before}, after {load_after}; bench took {:.0} s",
        started.elapsed().as_secs_f64()
    ));
    let reported = page_reporting_kib()
        .zip(reported_before)
        .map(|(after, before)| after.saturating_sub(before));
    bench.report.config["page_reporting_kib"] = json!(reported);
    bench.report.notes.push(match reported {
        Some(kib) => format!(
            "free page reporting is on: the kernel gave {} of freed memory back to its host during the bench; a \
             buffered write into pages given back pays for fresh ones (README, Performance)",
            fmt_bytes(kib.saturating_mul(1024))
        ),
        None => "this kernel does not say whether it gives freed memory back to its host (no page_reporting reported_kib)".to_owned(),
    });
    if opts.keep {
        let kept = workdir.keep();
        eprintln!("bench: keeping {}", kept.display());
    }
    bench.report
}

impl Bench<'_> {
    fn runs(&self) -> usize {
        self.opts.runs
    }

    /// Full backups (each into a new repository) against `qemu-img convert` and `cp --sparse=always` of the
    /// VM's image while the VM is paused.
    async fn full(&mut self, vm: &TestVm) {
        let runs = self.runs();
        eprintln!("bench: full backup x{runs}");
        let mut backups = Vec::new();
        for r in 0..runs {
            let repo = self.work.join(format!("repo-full-{r}"));
            self.tools.init_repo(&repo, self.opts.block_size);
            let m = self.tools.backup(vm, &repo, "full");
            let j = m.json();
            assert_eq!(j["level"], "full", "{}", m.stdout);
            // Keep the last one as the main repository; the others only cost disk space.
            if r + 1 == runs {
                fs::rename(&repo, &self.repo).expect("keep the last full's repository");
                self.full_node = Some(j["node"].as_str().unwrap().to_owned());
            } else {
                fs::remove_dir_all(&repo).expect("remove repository");
            }
            self.backup_rss.push(m.rss_kib);
            backups.push(m);
        }
        let stored = self.stored_bytes(self.full_node.as_deref().unwrap());
        let full = self.report.add(
            "full_backup",
            "full backup (with checking tables)",
            "s",
            secs(&backups),
            &format!("stores {}", fmt_bytes(stored)),
        );
        self.full_secs = Some(full.best());
        let copy: Vec<f64> = backups.iter().map(|m| m.secs - tables_secs(m)).collect();
        let copy = self.report.add(
            "full_backup_copy_phase",
            "  of which copy phase (= without tables)",
            "s",
            copy,
            "the whole command less its table phase (tables_secs in --json)",
        );
        let tables: Vec<f64> = backups.iter().map(tables_secs).collect();
        self.report.add(
            "full_backup_tables_phase",
            "  of which checking tables",
            "s",
            tables,
            "",
        );

        // The references, on the same image with the VM paused.
        eprintln!("bench: qemu-img convert and cp x{runs}");
        vm.qmp().execute_raw("stop", None).await.expect("stop");
        let image = vm.disk_path(DISK);
        let out = self.work.join("convert.qcow2");
        let mut convert = Vec::new();
        let mut fsync = Vec::new();
        let mut cp = Vec::new();
        for _ in 0..runs {
            let _ = fs::remove_file(&out);
            let (plain, synced) = self.tools.convert_then_sync(&image, &out);
            convert.push(plain);
            fsync.push(synced);
            let _ = fs::remove_file(&out);
            cp.push(
                measure(Path::new("cp"), &["--sparse=always", s(&image), s(&out)])
                    .ok()
                    .secs,
            );
        }
        let _ = fs::remove_file(&out);
        vm.qmp().execute_raw("cont", None).await.expect("cont");
        let convert = self.report.add(
            "qemu_img_convert",
            "qemu-img convert -O qcow2 (VM paused)",
            "s",
            convert,
            "reference for the full backup",
        );
        let convert_fsync = self.report.add(
            "qemu_img_convert_fsync",
            "  the same + fsync of the output",
            "s",
            fsync,
            "qmpbak fsyncs each node file before recording it",
        );
        self.report
            .add("cp_sparse", "cp --sparse=always of the image", "s", cp, "");

        // QEMU's backup job by itself (what qmpbak's copy phase waits for): with the target opened as qmpbak
        // opens it (no flushes), and the way qmpbackup (the closest Python peer) runs it: a plain
        // blockdev-backup into a new qcow2 with QEMU's default target cache, no checking tables.
        let no_flush = json!({ "no-flush": true });
        let mut jobs = Vec::new();
        for (key, label, cache) in [
            (
                "backup_job_no_flush",
                "QEMU blockdev-backup job alone, target cache.no-flush (as qmpbak)",
                Some(no_flush),
            ),
            (
                "backup_job_qmpbackup",
                "  the same, default target cache (qmpbackup's way, no tables)",
                None,
            ),
        ] {
            let mut times = Vec::new();
            for r in 0..runs {
                let target = self.work.join(format!("job-{r}.qcow2"));
                times.push(backup_job(vm, &target, cache.clone()).await);
            }
            jobs.push(self.report.add(
                key,
                label,
                "s",
                times,
                "sync=full into a new qcow2, start to concluded",
            ));
        }
        let job_no_flush = &jobs[0];
        self.report.notes.push(format!(
            "full backup against plain qemu-img convert (information): {}",
            ratio(&full, &convert).1
        ));
        self.report.notes.push(format!(
            "full backup's copy phase against QEMU's job alone (no-flush): {}",
            ratio(&copy, job_no_flush).1
        ));
        let (durable, text) = ratio(&full, &convert_fsync);
        self.report.check(
            "full backup with tables <= 1.1 x a durable copy (qemu-img convert + fsync)",
            durable <= 1.1,
            text,
            "<= 1.1 x",
        );
        let (job_ratio, text) = ratio(&full, job_no_flush);
        self.report.check(
            "full backup with tables <= 1.4 x QEMU's backup job alone (target no-flush)",
            job_ratio <= 1.4,
            text,
            "<= 1.4 x",
        );
    }

    /// `backup --pull` over loopback TCP, with TLS and in plaintext, against `qemu-img convert` reading the same
    /// kind of export (QEMU's NBD server on the same port, the disk exported read-only with the VM paused) into
    /// a local qcow2, then a pull incremental of 1 % dirty against a local one in the same chain.
    async fn pull(&mut self) {
        use integration_tests::pki::{TestPki, free_port};
        let runs = self.runs();
        let pki = TestPki::loopback();
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let client = pki.path("client");
        eprintln!("bench: a VM with TLS credentials for the pull");
        let mut vm = TestVm::builder()
            .disk(DISK, self.opts.size)
            .arg("-object")
            .arg(&pki.server_object("tls0"))
            .start()
            .await;
        vm.kill();
        self.layout.write(&self.tools.qemu_io, &vm.disk_path(DISK));
        let vm = vm.restart().await;
        let tls: Vec<&str> = vec!["--pull", "--nbd-listen", &listen, "--tls-dir", s(&client)];
        let plain: Vec<&str> = vec!["--pull", "--nbd-listen", &listen, "--insecure-plaintext"];
        let repo = self.work.join("repo-pull");
        let mut rows = Vec::new();
        for (key, label, extra) in [
            (
                "pull_full_tls",
                "pull full backup over NBD+TLS (with tables)",
                &tls,
            ),
            ("pull_full_plain", "  the same in plaintext", &plain),
        ] {
            eprintln!("bench: {key} x{runs}");
            let mut times = Vec::new();
            let mut pulled = 0;
            for r in 0..runs {
                let dir = self.work.join(format!("repo-{key}-{r}"));
                self.tools.init_repo(&dir, self.opts.block_size);
                let m = self.tools.backup_with(&vm, &dir, "full", extra);
                let j = m.json();
                assert_eq!(j["level"], "full", "{}", m.stdout);
                pulled = j["disks"][0]["pulled_bytes"].as_u64().unwrap_or(0);
                times.push(m.secs);
                if key == "pull_full_tls" && r + 1 == runs {
                    fs::rename(&dir, &repo).expect("keep the pull repository");
                } else {
                    fs::remove_dir_all(&dir).expect("remove repository");
                }
            }
            rows.push(self.report.add(
                key,
                label,
                "s",
                times,
                &format!("{} read over NBD", fmt_bytes(pulled)),
            ));
        }

        // The references: qemu-img convert from QEMU's own NBD export of the paused disk.
        eprintln!("bench: qemu-img convert over NBD x{runs}");
        let node = vm.disks()[0].node_name();
        vm.qmp().execute_raw("stop", None).await.expect("stop");
        let out = self.work.join("nbd-convert.qcow2");
        let mut refs = Vec::new();
        for (key, label, creds) in [
            (
                "pull_convert_tls",
                "qemu-img convert from the NBD export, TLS (VM paused)",
                true,
            ),
            ("pull_convert_plain", "  the same in plaintext", false),
        ] {
            let mut start =
                json!({"addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": port.to_string()}}});
            if creds {
                start["tls-creds"] = json!("tls0");
            }
            vm.qmp()
                .execute_raw("nbd-server-start", Some(start))
                .await
                .expect("nbd-server-start");
            vm.qmp()
                .execute_raw(
                    "block-export-add",
                    Some(json!({"type": "nbd", "id": "ref", "name": "ref", "node-name": node, "writable": false})),
                )
                .await
                .expect("block-export-add");
            let object = format!("tls-creds-x509,id=tls0,dir={},endpoint=client", client.display());
            let mut source =
                format!("driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},export=ref");
            if creds {
                source.push_str(",tls-creds=tls0");
            }
            let mut times = Vec::new();
            for _ in 0..runs {
                let _ = fs::remove_file(&out);
                let mut args = vec!["convert", "-O", "qcow2"];
                if creds {
                    args.extend(["--object", &object]);
                }
                args.extend(["--image-opts", &source, s(&out)]);
                let convert = measure(&self.tools.qemu_img, &args).ok();
                let sync = measure_now(Path::new("sync"), &[s(&out)]).ok();
                times.push(convert.secs + sync.secs);
            }
            vm.qmp()
                .execute_raw("nbd-server-stop", None)
                .await
                .expect("nbd-server-stop");
            refs.push(self.report.add(key, label, "s", times, "+ fsync of the output"));
        }
        let _ = fs::remove_file(&out);
        vm.qmp().execute_raw("cont", None).await.expect("cont");
        let (r, text) = ratio(&rows[0], &refs[0]);
        self.report.check(
            "pull full (TLS, with tables) <= 1.1 x qemu-img convert over NBD+TLS + fsync",
            r <= 1.1,
            text,
            "<= 1.1 x",
        );
        self.report.notes.push(format!(
            "pull full in plaintext against qemu-img convert in plaintext: {}",
            ratio(&rows[1], &refs[1]).1
        ));
        self.report.notes.push(format!(
            "TLS cost of the pull full: {} (TLS against plaintext)",
            ratio(&rows[0], &rows[1]).1
        ));

        // Incrementals of 1 % dirty: pulled, and local, alternating in the same chain. Both read the touched
        // blocks' clean rest from the parent's chain: cold, as on a backup host (the pull writes its files past
        // the page cache, and only one of two alternating runs would find them there otherwise).
        // At least 5 of each when the bench repeats at all: both are bound by the disk's cold reads, whose
        // speed varies from run to run by more than the 0.1 s the target allows.
        let pairs = if runs > 1 { runs.max(5) } else { runs };
        eprintln!("bench: pull and local 1 %-dirty incrementals x{pairs}");
        let (mut pulls, mut locals) = (Vec::new(), Vec::new());
        let mut pulled = 0;
        for r in 0..pairs {
            dirty_one_percent(&vm, self.opts.size, 100 + 2 * r as u64).await;
            evict_cache(&repo);
            let m = self.tools.backup_with(&vm, &repo, "inc", &tls);
            let j = m.json();
            assert_eq!(j["method"], "bitmap", "{}", m.stdout);
            pulled = j["disks"][0]["pulled_bytes"].as_u64().unwrap_or(0);
            pulls.push(m.secs);
            dirty_one_percent(&vm, self.opts.size, 101 + 2 * r as u64).await;
            evict_cache(&repo);
            let m = self.tools.backup_with(&vm, &repo, "inc", &[]);
            assert_eq!(m.json()["method"], "bitmap", "{}", m.stdout);
            locals.push(m.secs);
        }
        let pull_inc = self.report.add(
            "pull_incremental_1pct",
            "pull incremental, 1 % dirty, TLS",
            "s",
            pulls,
            &format!("{} read over NBD", fmt_bytes(pulled)),
        );
        let local_inc = self.report.add(
            "pull_local_incremental_1pct",
            "  a local incremental of the same chain, 1 % dirty",
            "s",
            locals,
            "both with the chain's files out of the page cache",
        );
        self.report.check(
            "pull incremental of 1 % dirty <= the local incremental + 0.1 s",
            pull_inc.best() <= local_inc.best() + 0.1,
            format!("{:.3} s against {:.3} s", pull_inc.best(), local_inc.best()),
            "<= local + 0.1 s",
        );
    }

    /// Host bytes of `node`'s disk file, from the manifest.
    fn stored_bytes(&self, node: &str) -> u64 {
        let manifest = self.manifest();
        manifest
            .find(node)
            .and_then(|n| n.disks.first())
            .map_or(0, |d| d.allocated_bytes)
    }

    fn manifest(&self) -> chain::Manifest {
        chain::Repository::open(&self.repo)
            .and_then(|r| r.vm(VM))
            .and_then(|v| v.load())
            .expect("load the bench manifest")
    }

    /// Incrementals after 1 % of the disk was dirtied in 64 KiB writes spread over it.
    async fn incremental(&mut self, vm: &TestVm) {
        let runs = self.runs();
        eprintln!("bench: 1 %-dirty incremental x{runs}");
        let mut times = Vec::new();
        let mut tables = Vec::new();
        let mut stored = Vec::new();
        let mut dirtied = 0;
        for r in 0..runs {
            dirtied = dirty_one_percent(vm, self.opts.size, r as u64).await;
            let m = self.tools.backup(vm, &self.repo, "inc");
            let j = m.json();
            assert_eq!(j["method"], "bitmap", "{}", m.stdout);
            stored.push(j["disks"][0]["stored_bytes"].as_u64().unwrap_or(0) as f64 / MIB as f64);
            self.backup_rss.push(m.rss_kib);
            tables.push(tables_secs(&m));
            times.push(m.secs);
        }
        let full = self.full_secs.unwrap();
        let ratios: Vec<f64> = times.iter().map(|t| t / full).collect();
        let inc = self.report.add(
            "incremental_1pct",
            "incremental, 1 % dirty (64 KiB writes)",
            "s",
            times,
            &format!("{} dirtied", fmt_bytes(dirtied)),
        );
        self.report.add(
            "incremental_1pct_tables_phase",
            "  of which checking tables",
            "s",
            tables,
            &format!(
                "rehashes every {} block a write touched",
                fmt_bytes(self.opts.block_size.unwrap_or(MIB))
            ),
        );
        self.report.add(
            "incremental_1pct_stored",
            "  stored",
            "MiB",
            stored,
            "host bytes of the node file",
        );
        self.report.add(
            "incremental_1pct_ratio",
            "  ratio to the full backup's best",
            "x",
            ratios,
            "",
        );
        let limit = 0.03 * full + 0.3;
        self.report.check(
            "1 %-dirty incremental <= 3 % of the full + 0.3 s",
            inc.best() <= limit,
            format!("{:.3} s (full {full:.2} s)", inc.best()),
            &format!("<= {limit:.3} s"),
        );
    }

    /// The fixed cost: an incremental with nothing dirty.
    fn empty_incremental(&mut self, vm: &TestVm) {
        let runs = self.runs();
        eprintln!("bench: empty incremental x{runs}");
        let mut times = Vec::new();
        for _ in 0..runs {
            let m = self.tools.backup(vm, &self.repo, "inc");
            self.backup_rss.push(m.rss_kib);
            times.push(m.secs);
        }
        let row = self.report.add(
            "incremental_empty",
            "incremental, nothing dirty (fixed cost)",
            "s",
            times,
            "",
        );
        self.report.check(
            "empty incremental <= 0.3 s",
            row.best() <= 0.3,
            format!("{:.3} s", row.best()),
            "<= 0.3 s",
        );
    }

    /// Checksum-diff incrementals: QEMU is killed and restarted, so its persistent bitmaps come back
    /// inconsistent, then 1 % is dirtied and backed up.
    async fn checksum_diff(&mut self, mut vm: TestVm) -> TestVm {
        let runs = self.runs();
        eprintln!("bench: checksum-diff incremental x{runs}");
        let mut times = Vec::new();
        let mut methods = Vec::new();
        let mut stored = Vec::new();
        for r in 0..runs {
            vm = vm.restart().await;
            dirty_one_percent(&vm, self.opts.size, 100 + r as u64).await;
            let m = self.tools.backup(&vm, &self.repo, "inc");
            let j = m.json();
            methods.push(j["method"].as_str().unwrap_or("?").to_owned());
            stored.push(j["disks"][0]["stored_bytes"].as_u64().unwrap_or(0) as f64 / MIB as f64);
            self.backup_rss.push(m.rss_kib);
            times.push(m.secs);
        }
        let full = self.full_secs.unwrap();
        let ratios: Vec<f64> = times.iter().map(|t| t / full).collect();
        methods.dedup();
        let cdiff = self.report.add(
            "incremental_checksum_diff",
            "checksum-diff incremental (bitmaps lost)",
            "s",
            times,
            &format!("1 % dirty; method {}", methods.join(",")),
        );
        self.report.add(
            "incremental_checksum_diff_stored",
            "  stored",
            "MiB",
            stored,
            "host bytes of the node file: the 64 KiB clusters that differ from the parent",
        );
        self.report.add(
            "incremental_checksum_diff_ratio",
            "  ratio to the full backup's best",
            "x",
            ratios,
            "",
        );
        if let Some(full) = self.report.row("full_backup").cloned() {
            let (r, text) = ratio(&cdiff, &full);
            self.report.check(
                "checksum-diff incremental <= 1.0 x a full backup of the same disk",
                r <= 1.0,
                text,
                "<= 1.0 x",
            );
        }
        vm
    }

    /// A full backup into an encrypted repository and its offline restore, beside a plain restore of the plain
    /// full (the plain full backup is the `full` section's).
    fn encrypted(&mut self, vm: &TestVm) {
        let runs = self.runs();
        eprintln!("bench: encrypted full backup and restore x{runs}");
        let key = self.work.join("repo.key");
        fs::write(&key, [0x5au8; 32]).expect("write the key file");
        let key_args = ["--key-file", s(&key)];
        let full_node = self.full_node.clone().expect("a full node");
        let (mut backups, mut restores, mut plain_restores) = (Vec::new(), Vec::new(), Vec::new());
        for r in 0..runs {
            let repo = self.work.join(format!("repo-crypt-{r}"));
            self.tools
                .qmpbak(&["init", "--encrypt", key_args[0], key_args[1], s(&repo)])
                .ok();
            let m = self.tools.backup_with(vm, &repo, "full", &key_args);
            let node = m.json()["node"].as_str().expect("node").to_owned();
            backups.push(m.secs);
            let dir = self.work.join(format!("restore-crypt-{r}"));
            restores.push(self.tools.restore_with(&repo, &node, &dir, &key_args).secs);
            fs::remove_dir_all(&dir).expect("remove restore output");
            fs::remove_dir_all(&repo).expect("remove repository");
            let dir = self.work.join(format!("restore-plain-full-{r}"));
            plain_restores.push(self.tools.restore(&self.repo, &full_node, &dir).secs);
            fs::remove_dir_all(&dir).expect("remove restore output");
        }
        let plain_full = self.report.row("full_backup").cloned();
        let crypt = self.report.add(
            "full_backup_encrypted",
            "full backup, encrypted repository",
            "s",
            backups,
            "LUKS node file, keyed table",
        );
        let plain_restore = self.report.add(
            "restore_full_plain",
            "offline restore of the full",
            "s",
            plain_restores,
            "",
        );
        let crypt_restore = self.report.add(
            "restore_full_encrypted",
            "offline restore of the full, encrypted repository",
            "s",
            restores,
            "decrypted by QEMU, read over NBD (no direct reads)",
        );
        if let Some(plain_full) = plain_full {
            self.report.notes.push(format!(
                "encrypted against plain: full backup {}, restore of the full {}",
                ratio(&crypt, &plain_full).1,
                ratio(&crypt_restore, &plain_restore).1
            ));
        }
    }

    /// Offline restore of the top of a full + 10 incrementals against `qemu-img convert` of the top node's
    /// file (which flattens the backing chain).
    async fn restore(&mut self, vm: &TestVm) {
        // Build the chain up to full + 10 incrementals (earlier sections left some).
        let mut round = 200;
        loop {
            let manifest = self.manifest();
            let current = manifest.current.clone().expect("a current node");
            let depth = manifest.recovery_chain(&current).expect("recovery chain").len();
            if depth > RESTORE_INCREMENTALS {
                break;
            }
            eprintln!("bench: incremental {depth} of {RESTORE_INCREMENTALS} for the restore chain");
            dirty_one_percent(vm, self.opts.size, round).await;
            round += 1;
            let m = self.tools.backup(vm, &self.repo, "inc");
            assert_ne!(m.json()["level"], "full", "{}", m.stdout);
        }
        let manifest = self.manifest();
        let top = manifest.current.clone().expect("a current node");
        let chain: Vec<String> = manifest
            .recovery_chain(&top)
            .unwrap()
            .iter()
            .map(|n| n.id.to_string())
            .collect();
        let top_file = self
            .repo
            .join(VM)
            .join(top.as_str())
            .join(format!("{DISK}.qcow2"));
        let runs = self.runs();
        eprintln!("bench: offline restore and qemu-img convert x{runs}");
        let mut restore = Vec::new();
        let mut convert = Vec::new();
        let mut convert_fsync = Vec::new();
        for r in 0..runs {
            let dir = self.work.join(format!("restore-{r}"));
            let m = self.tools.restore(&self.repo, top.as_str(), &dir);
            self.restore_rss.push(m.rss_kib);
            restore.push(m.secs);
            fs::remove_dir_all(&dir).expect("remove restore output");
            let out = self.work.join("restore-convert.qcow2");
            let (plain, synced) = self.tools.convert_then_sync(&top_file, &out);
            convert.push(plain);
            convert_fsync.push(synced);
            fs::remove_file(&out).expect("remove convert output");
        }
        let restore = self.report.add(
            "restore_offline",
            &format!("offline restore, full + {} incrementals", chain.len() - 1),
            "s",
            restore,
            "hashes the chain it copies against the tables; fsyncs the image",
        );
        let convert = self.report.add(
            "restore_qemu_img_convert",
            "qemu-img convert -O qcow2 of the top node",
            "s",
            convert,
            "flattens the same backing chain",
        );
        let convert_fsync = self.report.add(
            "restore_qemu_img_convert_fsync",
            "  the same + fsync of the output",
            "s",
            convert_fsync,
            "",
        );
        self.report.notes.push(format!(
            "offline restore against plain qemu-img convert (information): {}",
            ratio(&restore, &convert).1
        ));
        let (restore_ratio, text) = ratio(&restore, &convert_fsync);
        self.report.check(
            "offline restore of full + 10 incrementals <= 1.2 x convert + fsync of the flattened chain",
            restore_ratio <= 1.2,
            text,
            "<= 1.2 x",
        );
    }

    /// Live restore of the chain's top into a paused VM with an empty disk of the same size.
    async fn live(&mut self) {
        let top = self.manifest().current.expect("a current node").to_string();
        let runs = self.runs();
        eprintln!("bench: live restore x{runs}");
        let mut running = Vec::new();
        let mut done = Vec::new();
        let mut wall = Vec::new();
        for _ in 0..runs {
            let target = TestVm::builder()
                .disk(DISK, self.opts.size)
                .paused()
                .start()
                .await;
            let socket = target.socket();
            let m = self
                .tools
                .qmpbak(&[
                    "restore",
                    &top,
                    "--live",
                    "--socket",
                    s(&socket),
                    "--repo",
                    s(&self.repo),
                    "--vm",
                    VM,
                    "--json",
                ])
                .ok();
            let j = m.json();
            running.push(j["running_after_secs"].as_f64().unwrap_or(f64::NAN));
            done.push(j["duration_secs"].as_f64().unwrap_or(f64::NAN));
            wall.push(m.secs);
            assert!(target.running().await, "the live-restored VM is not running");
        }
        self.report.add(
            "live_restore_running",
            "live restore: guest running after",
            "s",
            running,
            "from the command's start (its --json)",
        );
        self.report.add(
            "live_restore_streamed",
            "live restore: stream complete after",
            "s",
            done,
            "",
        );
        self.report
            .add("live_restore_wall", "  whole command", "s", wall, "");
    }

    /// `qmpbak verify` of the full against the machine's SHA-256 limit: `openssl speed -evp sha256` (which uses
    /// the CPU's SHA extensions, as qmpbak's hashing does) on one core, times the cores.
    fn verify(&mut self) {
        let node = self.full_node.clone().unwrap();
        let file = self.repo.join(VM).join(&node).join(format!("{DISK}.qcow2"));
        let data = data_bytes_of(&self.tools.qemu_img, &file);
        let runs = self.runs();
        eprintln!("bench: verify and openssl speed x{runs}");
        let mut verify = Vec::new();
        let mut openssl = Vec::new();
        for _ in 0..runs {
            let m = self
                .tools
                .qmpbak(&["verify", "--repo", s(&self.repo), "--vm", VM, &node, "--json"])
                .ok();
            assert_eq!(m.json()["ok"], true, "{}", m.stdout);
            verify.push(data as f64 / MIB as f64 / m.secs);
            openssl.push(openssl_sha256_rate() / MIB as f64);
        }
        let n = cores();
        let verify = self.report.add(
            "verify_rate",
            "verify of the full (MiB of data per s)",
            "MiB/s",
            verify,
            &format!("{} of data, whole command", fmt_bytes(data)),
        );
        let one = self.report.add(
            "openssl_sha256_rate_1",
            "openssl speed -evp sha256, one core",
            "MiB/s",
            openssl,
            "16 KiB buffers, 1 s",
        );
        let limit = one.best() * n as f64;
        let share = verify.best() / limit;
        self.report.check(
            "verify >= 50 % of (openssl single-core SHA-256 rate x cores)",
            share >= 0.5,
            format!(
                "{:.0} vs {:.0} x {n} = {limit:.0} MiB/s = {:.0} %",
                verify.best(),
                one.best(),
                share * 100.0
            ),
            ">= 50 %",
        );
    }

    /// `qmpbak list` of a VM with a 10 000-node manifest made with the chain crate.
    fn list(&mut self) {
        let repo = self.work.join("repo-list");
        write_big_manifest(&repo, LIST_NODES);
        let vm_dir = repo.join("big");
        let runs = self.runs().max(3);
        eprintln!("bench: list of {LIST_NODES} nodes x{runs}");
        let mut times = Vec::new();
        let mut lines = 0;
        for _ in 0..runs {
            let m = self.tools.qmpbak(&["list", s(&vm_dir)]).ok();
            lines = m.stdout.lines().count();
            times.push(m.secs * 1000.0);
        }
        let size = fs::metadata(vm_dir.join("manifest.json")).map_or(0, |m| m.len());
        let row = self.report.add(
            "list_10000",
            &format!("qmpbak list, {LIST_NODES}-node manifest"),
            "ms",
            times,
            &format!("manifest {}, {lines} lines out", fmt_bytes(size)),
        );
        self.report.check(
            "list of 10 000 nodes <= 50 ms",
            row.best() <= 50.0,
            format!("{:.1} ms", row.best()),
            "<= 50 ms",
        );
    }

    /// Peak RSS of a full backup and an offline restore for a small and a large disk.
    async fn rss(&mut self) {
        for (size, data) in self.opts.rss_configs {
            eprintln!(
                "bench: peak RSS, {} disk with {} of data",
                fmt_bytes(size),
                fmt_bytes(data)
            );
            let layout = Layout::new(size, data);
            let vm = start_filled_vm(&self.tools, size, &layout).await;
            let repo = self.work.join(format!("repo-rss-{size}"));
            self.tools.init_repo(&repo, self.opts.block_size);
            let backup = self.tools.backup(&vm, &repo, "full");
            drop(vm);
            let node = backup.json()["node"].as_str().unwrap().to_owned();
            let out = self.work.join(format!("rss-restore-{size}"));
            let restore = self.tools.restore(&repo, &node, &out);
            let gib = size / GIB;
            let tag = if gib > 0 {
                format!("{gib}g")
            } else {
                format!("{}m", size / MIB)
            };
            let label = fmt_bytes(size);
            self.report.add(
                &format!("rss_backup_{tag}"),
                &format!("peak RSS, full backup of {label}"),
                "MiB",
                vec![backup.rss_kib as f64 / 1024.0],
                &format!(
                    "qemu-storage-daemon {:.0} MiB",
                    backup.storage_daemon_rss_kib() as f64 / 1024.0
                ),
            );
            self.report.add(
                &format!("rss_restore_{tag}"),
                &format!("peak RSS, offline restore of {label}"),
                "MiB",
                vec![restore.rss_kib as f64 / 1024.0],
                &format!(
                    "qemu-storage-daemon {:.0} MiB",
                    restore.storage_daemon_rss_kib() as f64 / 1024.0
                ),
            );
            let _ = fs::remove_dir_all(&out);
            let _ = fs::remove_dir_all(&repo);
        }
    }

    /// Issue 22's case: the same ten extents (64 MiB each, 4 MiB with --quick) on a 1 TiB disk and on a 4 GiB
    /// one. What a backup costs must follow the data, not the virtual size.
    async fn sparse(&mut self) {
        let extent = if self.opts.quick { 4 * MIB } else { 64 * MIB };
        let runs = self.runs();
        let mut per_size = Vec::new();
        for (label, size) in [("4 GiB", 4 * GIB), ("1 TiB", 1024 * GIB)] {
            eprintln!(
                "bench: sparse case, ten {} extents on a {label} disk",
                fmt_bytes(extent)
            );
            let layout = Layout {
                extents: (0..10).map(|i| (i * (size / 10) / MIB * MIB, extent)).collect(),
                zero: (size - MIB, MIB),
            };
            let vm = start_filled_vm(&self.tools, size, &layout).await;
            let repo = self.work.join(format!("repo-sparse-{}", size / GIB));
            let vm_dir = repo.join(VM);
            let mut full = Vec::new();
            let mut rss = Vec::new();
            let mut full_stored = 0;
            for r in 0..runs {
                if r > 0 {
                    fs::remove_dir_all(&repo).expect("remove the sparse repository");
                }
                self.tools.init_repo(&repo, self.opts.block_size);
                let m = self.tools.backup(&vm, &repo, "full");
                full_stored = dir_bytes(&vm_dir.join(m.json()["node"].as_str().unwrap_or("")));
                rss.push(m.rss_kib);
                full.push(m.secs);
            }
            let mut empty = Vec::new();
            for _ in 0..runs {
                let m = self.tools.backup(&vm, &repo, "inc");
                rss.push(m.rss_kib);
                empty.push(m.secs);
            }
            vm.write_pattern(DISK, 0x5a, size / 2 + 3 * MIB, MIB).await;
            let before = dir_bytes(&vm_dir);
            let inc = self.tools.backup(&vm, &repo, "inc");
            rss.push(inc.rss_kib);
            let inc_stored = dir_bytes(&vm_dir).saturating_sub(before);
            let top = inc.json()["node"].as_str().unwrap_or("").to_owned();
            // Its checking table: a difference holding the one changed block (a whole table of the 1 TiB disk
            // would be a 128 KiB presence bitmap).
            let inc_table =
                fs::metadata(vm_dir.join(&top).join(format!("{DISK}.table"))).map_or(0, |m| m.len());
            let verify = self
                .tools
                .qmpbak(&["verify", "--repo", s(&repo), "--vm", VM, "--json"])
                .ok();
            rss.push(verify.rss_kib);
            let top_file = vm_dir.join(&top).join(format!("{DISK}.qcow2"));
            let (mut restore, mut convert_fsync) = (Vec::new(), Vec::new());
            for r in 0..runs {
                let dir = self.work.join(format!("restore-sparse-{r}"));
                let m = self.tools.restore(&repo, &top, &dir);
                rss.push(m.rss_kib);
                restore.push(m.secs);
                fs::remove_dir_all(&dir).expect("remove restore output");
                let out = self.work.join("restore-sparse-convert.qcow2");
                convert_fsync.push(self.tools.convert_then_sync(&top_file, &out).1);
                fs::remove_file(&out).expect("remove convert output");
            }
            drop(vm);
            let key = size / GIB;
            let data = layout.data_bytes();
            let full = self.report.add(
                &format!("sparse_full_{key}g"),
                &format!("sparse: full backup, {label} disk"),
                "s",
                full,
                &format!("{} of data; stores {}", fmt_bytes(data), fmt_bytes(full_stored)),
            );
            let empty = self.report.add(
                &format!("sparse_empty_{key}g"),
                &format!("sparse: empty incremental, {label} disk"),
                "s",
                empty,
                "",
            );
            let restore = self.report.add(
                &format!("sparse_restore_{key}g"),
                &format!(
                    "sparse: restore of full + {} incrementals, {label} disk",
                    runs + 1
                ),
                "s",
                restore,
                "",
            );
            let convert = self.report.add(
                &format!("sparse_convert_fsync_{key}g"),
                &format!("  qemu-img convert + fsync of the same chain, {label}"),
                "s",
                convert_fsync,
                "",
            );
            let peak = rss.iter().copied().max().unwrap_or(0) as f64 / 1024.0;
            self.report.notes.push(format!(
                "sparse, {label} disk: a 1 MiB incremental stores {} (file + table + manifest), its table \
                 {inc_table} bytes; peak RSS of its commands {peak:.1} MiB",
                fmt_bytes(inc_stored)
            ));
            per_size.push((full, empty, restore, convert, full_stored, data, inc_stored, peak));
        }
        let [small, large] = &per_size[..] else { return };
        let (ratio_empty, text) = ratio(&large.1, &small.1);
        self.report.check(
            "empty incremental of a mostly empty 1 TiB disk <= 2 x the same on 4 GiB",
            ratio_empty <= 2.0,
            text,
            "<= 2.0x",
        );
        self.report.check(
            "1 MiB incremental of the 1 TiB disk stores <= 2 MiB in all",
            large.6 <= 2 * MIB,
            fmt_bytes(large.6),
            "<= 2 MiB",
        );
        let (ratio_full, text) = ratio(&large.0, &small.0);
        self.report.check(
            "full backup of the 1 TiB disk <= 1.3 x the full of the same data on 4 GiB",
            ratio_full <= 1.3,
            text,
            "<= 1.3x",
        );
        let stored = large.4 as f64 / large.5 as f64;
        self.report.check(
            "full backup of the 1 TiB disk stores <= 1.05 x its data",
            stored <= 1.05,
            format!("{stored:.3}x ({} for {})", fmt_bytes(large.4), fmt_bytes(large.5)),
            "<= 1.05x",
        );
        self.report.check(
            "peak RSS of every command on the 1 TiB disk <= 64 MiB",
            large.7 <= 64.0,
            format!("{:.1} MiB", large.7),
            "<= 64 MiB",
        );
        let (ratio_restore, text) = ratio(&large.2, &large.3);
        self.report.check(
            "restore of the 1 TiB chain <= 1.2 x qemu-img convert + fsync of the same chain",
            ratio_restore <= 1.2,
            text,
            "<= 1.2x",
        );
    }

    fn rss_checks(&mut self) {
        let mut peaks: Vec<(String, f64)> = Vec::new();
        if !self.backup_rss.is_empty() {
            let kib = self.backup_rss.iter().copied().max().unwrap_or(0);
            peaks.push(("backups of the main disk".into(), kib as f64 / 1024.0));
        }
        if !self.restore_rss.is_empty() {
            let kib = self.restore_rss.iter().copied().max().unwrap_or(0);
            peaks.push(("restores of the main disk".into(), kib as f64 / 1024.0));
        }
        let rss_rows: Vec<Row> = self
            .report
            .rows
            .iter()
            .filter(|r| r.key.starts_with("rss_"))
            .cloned()
            .collect();
        for r in &rss_rows {
            peaks.push((r.label.trim_start_matches("peak RSS, ").to_owned(), r.max()));
        }
        if peaks.is_empty() {
            return;
        }
        let (worst_what, worst) = peaks.iter().max_by(|a, b| a.1.total_cmp(&b.1)).cloned().unwrap();
        self.report.check(
            "peak RSS of qmpbak < 100 MiB",
            worst < 100.0,
            format!("largest {worst:.1} MiB ({worst_what})"),
            "< 100 MiB",
        );
        let [(small, _), (large, _)] = self.opts.rss_configs;
        for what in ["backup", "restore"] {
            let key = |size: u64| {
                let gib = size / GIB;
                if gib > 0 {
                    format!("rss_{what}_{gib}g")
                } else {
                    format!("rss_{what}_{}m", size / MIB)
                }
            };
            let (Some(a), Some(b)) = (self.report.row(&key(small)), self.report.row(&key(large))) else {
                continue;
            };
            let (a, b) = (a.max(), b.max());
            self.report.check(
                &format!(
                    "{what} RSS flat in disk size ({} vs {})",
                    fmt_bytes(small),
                    fmt_bytes(large)
                ),
                b <= a + 8.0,
                format!("{a:.1} MiB vs {b:.1} MiB"),
                "grows < 8 MiB",
            );
        }
    }
}

/// Runs one `blockdev-backup sync=full` of the VM's disk into a new qcow2 at `target` through the fixture's QMP
/// connection, with the target's `cache` options if given; returns the seconds from starting the job until it
/// concluded.
async fn backup_job(vm: &TestVm, target: &Path, cache: Option<Value>) -> f64 {
    let qmp = vm.qmp();
    let size = vm.disks()[0].size;
    integration_tests::image::create_qcow2(target, size);
    settle();
    let mut options = json!({
        "driver": "qcow2", "node-name": "bench-target",
        "file": { "driver": "file", "filename": target },
    });
    if let Some(cache) = cache {
        options["cache"] = cache;
    }
    qmp.execute_raw("blockdev-add", Some(options))
        .await
        .expect("blockdev-add the job target");
    let args = json!({
        "job-id": "bench-job", "device": vm.disks()[0].node_name(), "target": "bench-target",
        "sync": "full", "auto-dismiss": false,
    });
    let started = Instant::now();
    qmp.execute_raw("blockdev-backup", Some(args))
        .await
        .expect("blockdev-backup");
    let outcome = qmp
        .wait_job("bench-job", COMMAND_TIMEOUT)
        .await
        .expect("wait for the backup job");
    assert!(outcome.error.is_none(), "the backup job failed: {outcome:?}");
    let secs = started.elapsed().as_secs_f64();
    let _ = qmp
        .execute_raw("job-dismiss", Some(json!({ "id": "bench-job" })))
        .await;
    qmp.execute_raw("blockdev-del", Some(json!({ "node-name": "bench-target" })))
        .await
        .expect("blockdev-del the job target");
    fs::remove_file(target).expect("remove the job target");
    secs
}

/// SHA-256 bytes per second of one core, from `openssl speed -mr -evp sha256` on 16 KiB buffers (its
/// machine-readable line `+F:<n>:sha256:<bytes per second>`).
fn openssl_sha256_rate() -> f64 {
    let out = run_tool(
        Path::new("openssl"),
        &[
            "speed", "-mr", "-seconds", "1", "-bytes", "16384", "-evp", "sha256",
        ],
    );
    parse_openssl_speed(&out).unwrap_or_else(|| panic!("no sha256 rate in openssl speed's output:\n{out}"))
}

fn parse_openssl_speed(out: &str) -> Option<f64> {
    out.lines()
        .filter_map(|l| l.strip_prefix("+F:"))
        .filter_map(|l| {
            let fields: Vec<&str> = l.split(':').collect();
            (fields.len() >= 3 && fields[1].eq_ignore_ascii_case("sha256")).then(|| fields[2].parse().ok())?
        })
        .next_back()
}

/// Guest data bytes in an image file (data extents that are not zero), from `qemu-img map`.
fn data_bytes_of(qemu_img: &Path, file: &Path) -> u64 {
    data_extents(qemu_img, file).iter().map(|e| e.1).sum()
}

fn data_extents(qemu_img: &Path, file: &Path) -> Vec<(u64, u64)> {
    let out = run_tool(qemu_img, &["map", "-U", "--output=json", s(file)]);
    let extents: Vec<Value> = serde_json::from_str(&out).expect("qemu-img map JSON");
    extents
        .iter()
        .filter(|e| e["data"] == true && e["zero"] == false)
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect()
}

/// A repository with VM "big" whose manifest has `count` nodes: a full every 7 nodes, incrementals between,
/// and a branch off every 50th node, with one disk each (the files need not exist for `list`).
fn write_big_manifest(repo: &Path, count: u64) {
    let repository = chain::Repository::init(repo).expect("init list repository");
    let store = repository.create_vm("big").expect("create VM");
    // Timestamps through serde: chrono is the chain crate's dependency, not this crate's.
    let mut manifest = chain::Manifest::new(
        "big",
        serde_json::from_value(json!("2025-01-01T00:00:00Z")).unwrap(),
    );
    manifest.disks.push(chain::DiskIdentity {
        id: DISK.into(),
        node_name: Some("node-disk0".into()),
        virtual_size: 4 * GIB,
        serial: None,
        filename: Some("/var/lib/vms/big/disk0.qcow2".into()),
        key: None,
    });
    let mut last_full = None;
    let mut prev: Option<chain::NodeId> = None;
    for i in 0..count {
        let id = manifest.next_node_id().expect("node ids left");
        let (kind, parent) = if i % 7 == 0 {
            (chain::NodeKind::Full, None)
        } else if i % 50 == 25 {
            // A branch: from the chain's full instead of the previous node.
            (chain::NodeKind::Differential, last_full.clone())
        } else {
            (chain::NodeKind::Incremental, prev.clone())
        };
        let file = chain::RelPath::disk_image(&id, DISK).unwrap();
        let backing = parent
            .as_ref()
            .map(|p: &chain::NodeId| chain::RelPath::disk_image(p, DISK).unwrap());
        let created = json!(format!(
            "2025-01-{:02}T{:02}:{:02}:00Z",
            1 + i / 1440,
            (i / 60) % 24,
            i % 60
        ));
        let node = chain::Node {
            id: id.clone(),
            parent: parent.clone(),
            kind,
            created: serde_json::from_value(created).unwrap(),
            state: chain::NodeState::Complete,
            tag: (i % 100 == 0).then(|| format!("weekly-{i}")),
            reason: Some(if parent.is_none() {
                "full_every reached".to_owned()
            } else {
                "bitmap consistent".to_owned()
            }),
            lid: 0,
            tid: 0,
            disks: vec![chain::NodeDisk {
                source_host: None,
                disk: DISK.into(),
                file: file.clone(),
                backing,
                virtual_size: 4 * GIB,
                allocated_bytes: if parent.is_none() { 3 * GIB / 2 } else { 40 * MIB },
                bitmap: Some(format!("qmpbak-{}-inc-{id}", manifest.chain_id)),
                table: Some(chain::RelPath::disk_table(&id, DISK).unwrap()),
                table_sha256: Some(format!("{:064x}", i * 0x9e37_79b9)),
                location: chain::Location {
                    host: "bench-host".into(),
                    path: format!("{}/big/{file}", repo.display()),
                    predecessor: None,
                },
            }],
        };
        manifest.add_node(node).expect("add node");
        if parent.is_none() {
            last_full = Some(id.clone());
        }
        prev = Some(id);
    }
    manifest.current = prev;
    let guard = store
        .lock_exclusive(chain::LockWait::NoWait, "bench")
        .expect("lock");
    store.save(&manifest, &guard).expect("save manifest");
}

/// Bytes the files below `path` take on disk (allocated blocks).
fn dir_bytes(path: &Path) -> u64 {
    let Ok(entries) = fs::read_dir(path) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => std::os::unix::fs::MetadataExt::blocks(&m) * 512,
            Err(_) => 0,
        })
        .sum()
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
}

fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// KiB of freed memory the kernel has handed back to its hypervisor since boot (virtio-balloon free page
/// reporting), or `None` without it. A buffered write into memory handed back pays for the host to fault in
/// and zero a fresh page: on this machine class a GiB written into the page cache costs about 1.3 s of system
/// time more than one written into pages freed a moment before, so the bench reports how much went back.
fn page_reporting_kib() -> Option<u64> {
    fs::read_to_string("/sys/module/page_reporting/parameters/reported_kib")
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn cpu_model() -> String {
    fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::parse_openssl_speed;

    #[test]
    fn reads_the_sha256_rate_from_openssl_speed() {
        let out = "+H:16384\n+F:25:sha256:1781302524.68\n";
        assert_eq!(parse_openssl_speed(out), Some(1_781_302_524.68));
        assert_eq!(parse_openssl_speed("+F:3:md5:100\n"), None);
        assert_eq!(parse_openssl_speed(""), None);
    }
}
