//! Named bounds for every wait in the integration tests. Generous because QEMU runs under TCG on two cores and
//! tests run side by side; a test that hits one of these has hung, not merely been slow.

use std::time::Duration;

/// From spawning QEMU until its QMP socket accepts a connection and negotiation is done.
pub const QMP_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// One QMP command and its reply.
pub const QMP_COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// A block job (backup, create, stream, commit) on the small test disks, from start to `concluded`.
pub const BLOCK_JOB_TIMEOUT: Duration = Duration::from_secs(120);
/// A QEMU process to exit after SIGKILL or `quit`.
pub const PROCESS_EXIT_TIMEOUT: Duration = Duration::from_secs(15);
/// One run of the `qmpbak` binary in a test.
pub const CLI_TIMEOUT: Duration = Duration::from_secs(300);
/// One `qemu-img` run on a test image.
pub const QEMU_IMG_TIMEOUT: Duration = Duration::from_secs(120);
/// A `qmpbak` run told to abort at a crash point (`QMPBAK_CRASH_AT`), until it has.
pub const CLI_CRASH_TIMEOUT: Duration = Duration::from_secs(60);
/// Connecting an NBD client to an export qmpbak or QEMU serves.
pub const NBD_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Something that must happen at once (a waiter woken when QEMU dies, a second run refused by a lock): the
/// bound is also what the test asserts.
pub const PROMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// A `qmpbak` run told to pause at a step (`QMPBAK_PAUSE_AT`), until it says it is there.
pub const PAUSE_REACHED_TIMEOUT: Duration = Duration::from_secs(120);
/// One `ip` command that makes or removes a network namespace, a veth pair or an address.
pub const NETNS_TIMEOUT: Duration = Duration::from_secs(20);

/// How long a started qmpbak may take to open a VM's lock file (and so begin to wait for it).
pub const LOCK_WAIT_START_TIMEOUT: Duration = Duration::from_secs(30);
