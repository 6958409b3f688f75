//! SIGINT, SIGTERM and SIGHUP as a value: long operations check or await it at safe points, cancel what they
//! started, clean up, and exit with the "interrupted" code instead of dying with QEMU jobs and files half made.
//! A closed terminal or a dropped ssh session (SIGHUP) stops a command as Ctrl-C does. A command waiting for a
//! VM's lock (`--wait`) stops waiting at once ([`chain::lock::interrupt_waits`]).

use std::future::Future;

use anyhow::{Context, Result};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

/// Listens for SIGINT, SIGTERM and SIGHUP from the moment it is created, on a task of its own, so that a
/// signal is seen even while the command's own task is busy (a blocking lock wait).
pub struct Interrupt {
    arrived: watch::Receiver<bool>,
    listener: tokio::task::JoinHandle<()>,
}

impl Drop for Interrupt {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

impl Interrupt {
    pub fn new() -> Result<Interrupt> {
        let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
        let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
        let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
        let (tell, arrived) = watch::channel(false);
        let listener = tokio::spawn(async move {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
                _ = hup.recv() => {}
            }
            chain::lock::interrupt_waits();
            let _ = tell.send(true);
            // The handlers stay installed (a second signal must not kill the cleanup) until this task ends
            // with the [`Interrupt`].
            std::future::pending::<()>().await;
        });
        Ok(Interrupt { arrived, listener })
    }

    /// Resolves when SIGINT, SIGTERM or SIGHUP arrives (or has arrived).
    pub async fn wait(&self) {
        let mut arrived = self.arrived.clone();
        if arrived.wait_for(|a| *a).await.is_err() {
            // The listener is gone only with this value: no signal will come through it.
            std::future::pending::<()>().await;
        }
    }

    /// Whether a signal has arrived, without waiting.
    pub async fn arrived(&self) -> bool {
        // The listener runs on another task: let it take a signal that is pending right now.
        tokio::task::yield_now().await;
        *self.arrived.borrow()
    }

    /// Runs `work` unless SIGINT, SIGTERM or SIGHUP comes first. Then `work` is dropped where it stands: the children
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
