//! SIGINT and SIGTERM as a value: long operations check or await it at safe points, cancel what they started,
//! clean up, and exit with the "interrupted" code instead of dying with QEMU jobs and files half made.

use std::future::Future;

use anyhow::{Context, Result};
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::Mutex;

/// Listens for SIGINT and SIGTERM from the moment it is created.
pub struct Interrupt {
    int: Mutex<Signal>,
    term: Mutex<Signal>,
    seen: std::sync::atomic::AtomicBool,
}

impl Interrupt {
    pub fn new() -> Result<Interrupt> {
        Ok(Interrupt {
            int: Mutex::new(signal(SignalKind::interrupt()).context("installing the SIGINT handler")?),
            term: Mutex::new(signal(SignalKind::terminate()).context("installing the SIGTERM handler")?),
            seen: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Resolves when SIGINT or SIGTERM arrives (or has arrived).
    pub async fn wait(&self) {
        if self.seen.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let mut int = self.int.lock().await;
        let mut term = self.term.lock().await;
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        self.seen.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether a signal has arrived, without waiting.
    pub async fn arrived(&self) -> bool {
        if self.seen.load(std::sync::atomic::Ordering::SeqCst) {
            return true;
        }
        tokio::select! {
            biased;
            () = self.wait() => true,
            () = std::future::ready(()) => false,
        }
    }

    /// Runs `work` unless SIGINT or SIGTERM comes first. Then `work` is dropped where it stands: the children
    /// it started are killed and reaped ([`crate::children::Owned`]), the guards of its partial outputs remove
    /// them, its locks are released last; the result is the "interrupted" error (exit 130), which says `what`
    /// was stopped.
    pub async fn run<T>(&self, work: impl Future<Output = Result<T>>, what: &str) -> Result<T> {
        tokio::select! {
            result = work => result,
            () = self.wait() => Err(crate::exit::Exit::new(
                crate::exit::ExitCode::Interrupted,
                format!("interrupted: {what}"),
            )
            .into()),
        }
    }
}
