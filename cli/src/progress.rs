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
}

/// Shows nothing.
pub struct Silent;

impl Progress for Silent {}
