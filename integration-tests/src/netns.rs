//! Two network namespaces joined by a veth pair, for tests of a backup host that reaches QEMU over the
//! network: QEMU runs in the "hypervisor" namespace (`TestVmBuilder::netns`), qmpbak in the "backup" one
//! ([`NetnsPair::command`]). Names and addresses are unique per pair (`10.77.N.1` for the hypervisor,
//! `10.77.N.2` for the backup host); every `ip` run is bounded by [`NETNS_TIMEOUT`], and both namespaces
//! (with the veth pair inside them) are deleted on drop, also when the test panics. Only namespaces and
//! addresses this pair created are ever touched.
//!
//! Needs root and `ip netns`; [`NetnsPair::create`] says why not otherwise, and the test skips with that
//! message.

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Instant;

use crate::timeouts::NETNS_TIMEOUT;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A "hypervisor" and a "backup" namespace, joined.
#[derive(Debug)]
pub struct NetnsPair {
    /// The hypervisor namespace's name (QEMU runs here).
    pub hv: String,
    /// The backup namespace's name (qmpbak runs here).
    pub backup: String,
    /// The hypervisor's address, reachable from the backup namespace.
    pub hv_addr: Ipv4Addr,
    /// The backup host's address.
    pub backup_addr: Ipv4Addr,
    created: Vec<String>,
}

impl NetnsPair {
    /// Makes the pair, or says why it cannot be made here (not root, no `ip netns`): the caller skips.
    pub fn create() -> Result<NetnsPair, String> {
        if !nix::unistd::geteuid().is_root() {
            return Err("not root: network namespaces need root (CI runs as root)".into());
        }
        if let Err(e) = ip(&["netns", "list"]) {
            return Err(format!("`ip netns` is not available: {e}"));
        }
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let octet = u8::try_from((pid.wrapping_mul(7).wrapping_add(n)) % 250 + 1).unwrap_or(1);
        let tag = format!("qbk{pid}x{n}");
        let mut pair = NetnsPair {
            hv: format!("{tag}-hv"),
            backup: format!("{tag}-bk"),
            hv_addr: Ipv4Addr::new(10, 77, octet, 1),
            backup_addr: Ipv4Addr::new(10, 77, octet, 2),
            created: Vec::new(),
        };
        for ns in [pair.hv.clone(), pair.backup.clone()] {
            ip(&["netns", "add", &ns])?;
            pair.created.push(ns.clone());
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        // Made inside the hypervisor namespace, its peer straight in the backup one: no name is ever in
        // the host's namespace.
        ip(&[
            "-n",
            &pair.hv,
            "link",
            "add",
            "veth0",
            "type",
            "veth",
            "peer",
            "name",
            "veth0",
            "netns",
            &pair.backup,
        ])?;
        for (ns, addr) in [(&pair.hv, pair.hv_addr), (&pair.backup, pair.backup_addr)] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", "veth0"])?;
            ip(&["-n", ns, "link", "set", "veth0", "up"])?;
        }
        Ok(pair)
    }

    /// `program ARGS` to be run in namespace `ns` (one of this pair's).
    pub fn command_in(&self, ns: &str, program: &Path) -> Command {
        assert!(self.created.iter().any(|c| c == ns), "{ns} is not this pair's");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns]).arg(program);
        cmd
    }

    /// Adds another "hypervisor" namespace joined to this pair's backup namespace by its own veth pair
    /// (`veth0` there, `veth<k>` in the backup namespace; `10.(77+k).N.1` and `.2`), deleted with the pair.
    /// Returns its name and address.
    pub fn add_hypervisor(&mut self) -> Result<(String, Ipv4Addr), String> {
        let k = u8::try_from(self.created.len() - 1).map_err(|_| "too many hypervisors".to_owned())?;
        let tag = self.hv.trim_end_matches("-hv").to_owned();
        let ns = format!("{tag}-hv{}", k + 1);
        let octet = self.hv_addr.octets()[2];
        let (hv_addr, backup_addr) = (
            Ipv4Addr::new(10, 77 + k, octet, 1),
            Ipv4Addr::new(10, 77 + k, octet, 2),
        );
        let peer = format!("veth{k}");
        ip(&["netns", "add", &ns])?;
        self.created.push(ns.clone());
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            &ns,
            "link",
            "add",
            "veth0",
            "type",
            "veth",
            "peer",
            "name",
            &peer,
            "netns",
            &self.backup,
        ])?;
        ip(&["-n", &ns, "addr", "add", &format!("{hv_addr}/24"), "dev", "veth0"])?;
        ip(&[
            "-n",
            &self.backup,
            "addr",
            "add",
            &format!("{backup_addr}/24"),
            "dev",
            &peer,
        ])?;
        ip(&["-n", &ns, "link", "set", "veth0", "up"])?;
        ip(&["-n", &self.backup, "link", "set", &peer, "up"])?;
        Ok((ns, hv_addr))
    }

    /// Cuts the network between the two (`true`: every packet either way is lost, as when a switch between
    /// two hosts dies; both ends keep their carrier and TCP sees its packets sent: tc's `blackhole` qdisc) or mends it (`false`, which also lifts [`Self::throttle`]).
    pub fn cut(&self, cut: bool) -> Result<(), String> {
        for ns in [&self.hv, &self.backup] {
            if cut {
                run_bounded(
                    "tc",
                    &["-n", ns, "qdisc", "replace", "dev", "veth0", "root", "blackhole"],
                )?;
            } else {
                run_bounded("tc", &["-n", ns, "qdisc", "del", "dev", "veth0", "root"])?;
            }
        }
        Ok(())
    }

    /// Takes the hypervisor's end of the link down (`up: false`: the backup host's end loses its carrier) or
    /// brings it back up.
    pub fn set_link(&self, up: bool) -> Result<(), String> {
        ip(&[
            "-n",
            &self.hv,
            "link",
            "set",
            "veth0",
            if up { "up" } else { "down" },
        ])
    }

    /// Limits what the hypervisor sends to the backup host to `rate` (tc's notation, e.g. `8mbit`), so a
    /// copy lasts long enough to be hit mid-way; `None` lifts the limit.
    pub fn throttle(&self, rate: Option<&str>) -> Result<(), String> {
        match rate {
            Some(rate) => run_bounded(
                "tc",
                &[
                    "-n", &self.hv, "qdisc", "replace", "dev", "veth0", "root", "tbf", "rate", rate, "burst",
                    "64kb", "latency", "200ms",
                ],
            ),
            None => run_bounded("tc", &["-n", &self.hv, "qdisc", "del", "dev", "veth0", "root"]),
        }
    }

    /// The bytes the hypervisor's end of the link has sent so far.
    pub fn hv_tx_bytes(&self) -> Result<u64, String> {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.hv,
                "cat",
                "/sys/class/net/veth0/statistics/tx_bytes",
            ])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run ip: {e}"))?;
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .map_err(|e| format!("tx_bytes of {}: {e}", self.hv))
    }

    /// The `qmpbak` binary under test, in the backup namespace, with piped output (for `cli::wait`).
    pub fn qmpbak(&self, args: &[String]) -> Command {
        let mut cmd = self.command_in(&self.backup, &crate::cli::qmpbak_bin());
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }
}

impl Drop for NetnsPair {
    fn drop(&mut self) {
        // Deleting a namespace takes its end of the veth pair with it, and so the pair.
        for ns in self.created.drain(..).rev() {
            if let Err(e) = ip(&["netns", "del", &ns]) {
                eprintln!("cannot delete network namespace {ns}: {e}");
            }
        }
    }
}

/// Runs `ip ARGS` within [`NETNS_TIMEOUT`].
fn ip(args: &[&str]) -> Result<(), String> {
    run_bounded("ip", args)
}

/// Runs `program ARGS` (`ip` or `tc`) within [`NETNS_TIMEOUT`].
fn run_bounded(program: &str, args: &[&str]) -> Result<(), String> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    let deadline = Instant::now() + NETNS_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "{program} {} took over {NETNS_TIMEOUT:?}",
                    args.join(" ")
                ));
            }
            Ok(None) => std::thread::sleep(std::time::Duration::from_millis(10)),
            Err(e) => return Err(format!("waiting for {program}: {e}")),
        }
    };
    if status.success() {
        return Ok(());
    }
    let mut err = String::new();
    if let Some(mut s) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut s, &mut err);
    }
    Err(format!(
        "{program} {} failed ({status}): {}",
        args.join(" "),
        err.trim()
    ))
}
