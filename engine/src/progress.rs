//! Progress reporting from long operations to whoever shows it: the CLI draws bars on a terminal, prints
//! nothing animated otherwise, and a library user can plug in its own sink.

/// Receives progress from a running operation. Calls come from async tasks; keep them cheap.
pub trait Progress: Send + Sync {
    /// A new phase began ("copying", "checking tables" …).
    fn phase(&self, _message: &str) {}
    /// Work on one disk advanced: `done` of `total` bytes.
    fn advance(&self, _disk: &str, _done: u64, _total: u64) {}
    /// A disk's work in the current phase finished.
    fn finish_disk(&self, _disk: &str) {}
    /// Something the user must hear of that does not stop the operation (a copy that failed beside a result
    /// that stands, a file left in place, damage kept because of `--force`). Never dropped: without a sink of
    /// its own it goes to the `tracing` log at `warn`.
    fn warning(&self, message: &str) {
        tracing::warn!(target: "qmpbak::warning", "{message}");
    }
}

/// Shows no progress; warnings still go to the `tracing` log.
pub struct Silent;

impl Progress for Silent {}
