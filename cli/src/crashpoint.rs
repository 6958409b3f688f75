//! Named points where a test can make qmpbak die as if SIGKILLed (`QMPBAK_CRASH_AT=NAME` aborts the process
//! there), to prove that every step leaves a manifest and a VM that the next run can clean up. Without the
//! variable a crash point does nothing.

/// Aborts the process when `QMPBAK_CRASH_AT` names this point.
pub fn crashpoint(name: &str) {
    if std::env::var_os("QMPBAK_CRASH_AT").is_some_and(|v| v == name) {
        eprintln!("qmpbak: crash point {name} reached, aborting (QMPBAK_CRASH_AT)");
        std::process::abort();
    }
}
