//! Fault hooks for tests. Named points where a test can make qmpbak die as if SIGKILLed (`QMPBAK_CRASH_AT=NAME` aborts the process
//! there), to prove that every step leaves a manifest and a VM that the next run can clean up. Without the
//! variable a crash point does nothing.

/// Aborts the process when `QMPBAK_CRASH_AT` names this point.
pub fn crashpoint(name: &str) {
    if std::env::var_os("QMPBAK_CRASH_AT").is_some_and(|v| v == name) {
        eprintln!("qmpbak: crash point {name} reached, aborting (QMPBAK_CRASH_AT)");
        std::process::abort();
    }
}

/// With `QMPBAK_INJECT_TARGET_EIO` set, a backup target's file is opened through blkdebug failing every data
/// write with EIO, so tests can prove what a failing backup destination leaves behind. Without it, `file` is
/// returned unchanged.
pub fn target_file_options(file: serde_json::Value) -> serde_json::Value {
    if std::env::var_os("QMPBAK_INJECT_TARGET_EIO").is_none() {
        return file;
    }
    serde_json::json!({
        "driver": "blkdebug",
        "image": file,
        "inject-error": [{ "event": "write_aio", "errno": 5, "once": false }],
    })
}

/// With `QMPBAK_INJECT_NO_ODIRECT` set, a pull's local daemon refuses to open a node file with O_DIRECT (an
/// option it does not know is added to that attempt), as a filesystem without O_DIRECT makes it refuse, so
/// tests can prove the file is then written through the page cache. Without it, `options` are unchanged.
pub fn direct_target_options(mut options: serde_json::Value) -> serde_json::Value {
    if std::env::var_os("QMPBAK_INJECT_NO_ODIRECT").is_some() {
        options["x-qmpbak-no-odirect"] = serde_json::json!(true);
    }
    options
}

/// How long a [`pause_point`] holds a run at most: it never hangs a run whose test forgot it.
pub const PAUSE_BOUND: std::time::Duration = std::time::Duration::from_secs(120);

/// When `QMPBAK_PAUSE_AT` names this point, says so on stderr (`qmpbak: paused at NAME`) and holds the run
/// there until SIGUSR1, for at most [`PAUSE_BOUND`], so that a test can act at a known step — send a signal
/// while a child is running, break a child, look at what exists. Without the variable it returns at once.
pub async fn pause_point(name: &str) {
    if std::env::var_os("QMPBAK_PAUSE_AT").is_some_and(|v| v == name) {
        let resume = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1());
        eprintln!("qmpbak: paused at {name} (QMPBAK_PAUSE_AT)");
        match resume {
            Ok(mut resume) => {
                let _ = tokio::time::timeout(PAUSE_BOUND, resume.recv()).await;
            }
            Err(_) => tokio::time::sleep(PAUSE_BOUND).await,
        }
    }
}

/// When `QMPBAK_INJECT_ENOSPC_AT` names this point, fails there as a write to a full disk would (ENOSPC), so
/// tests can prove what a full repository leaves behind. Without the variable it does nothing.
pub fn fail_point(name: &str) -> std::io::Result<()> {
    if std::env::var_os("QMPBAK_INJECT_ENOSPC_AT").is_some_and(|v| v == name) {
        return Err(std::io::Error::from_raw_os_error(nix::libc::ENOSPC));
    }
    Ok(())
}

/// With `QMPBAK_INJECT_SCRATCH_EIO` set, a pull's scratch image (the copy-before-write target) is opened
/// through blkdebug failing every write with EIO, so tests can prove that a failing view fails the backup and
/// never a guest write. Without it, `file` is returned unchanged.
pub fn scratch_file_options(file: serde_json::Value) -> serde_json::Value {
    if std::env::var_os("QMPBAK_INJECT_SCRATCH_EIO").is_none() {
        return file;
    }
    serde_json::json!({
        "driver": "blkdebug",
        "image": file,
        "inject-error": [{ "event": "write_aio", "errno": 5, "once": false }],
    })
}

/// With `QMPBAK_VIEW=fleece`, a pull keeps its view with the `blockdev-backup sync=none` fleece even where
/// QEMU has copy-before-write and `snapshot-access`, so tests cover both views on every QEMU.
pub fn force_fleece() -> bool {
    std::env::var_os("QMPBAK_VIEW").is_some_and(|v| v == "fleece")
}
