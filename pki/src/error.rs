//! The crate's error type: credentials that cannot be read or do not fit together.

use std::path::PathBuf;

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong reading x509 credentials.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file of the credentials is missing, unreadable, or does not hold what it must; or the files do not
    /// fit together (a key that is not the certificate's).
    #[error("bad TLS credentials {}: {reason}", path.display())]
    Credentials { path: PathBuf, reason: String },
}

impl Error {
    /// The file at fault.
    pub fn path(&self) -> &std::path::Path {
        match self {
            Error::Credentials { path, .. } => path,
        }
    }

    /// What is wrong with it.
    pub fn reason(&self) -> &str {
        match self {
            Error::Credentials { reason, .. } => reason,
        }
    }
}
