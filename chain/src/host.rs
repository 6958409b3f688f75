//! Facts about the machine qmpbak runs on: its host name, and whether a process of it still exists. Used by
//! lock holder records, operation records and the CLI; depends on nothing else in the crate.

/// This machine's host name ("unknown" if it has none).
pub fn hostname() -> String {
    nix::unistd::gethostname().map_or_else(|_| "unknown".to_owned(), |h| h.to_string_lossy().into_owned())
}

/// Whether process `pid` is known to be gone from this machine (false when it exists, or when `pid` is not
/// one a process can have).
pub fn process_gone(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    if pid <= 0 {
        return false;
    }
    matches!(
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
        Err(nix::errno::Errno::ESRCH)
    )
}
