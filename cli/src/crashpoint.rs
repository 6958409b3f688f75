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
