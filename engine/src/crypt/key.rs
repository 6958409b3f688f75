//! Where the user's repository key comes from: a file (also a systemd credential), an inherited file
//! descriptor, or an environment variable. Never from a command-line value, which other users can read.

use std::path::PathBuf;

use anyhow::{Context, Result};

use crate::exit::Exit;

/// The environment variable read for the key when no other source is named.
pub const KEY_ENV: &str = crate::children::KEY_ENV;

/// One source of the repository key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// A file holding the key (`--key-file`; `$CREDENTIALS_DIRECTORY/NAME` for a systemd credential).
    File(PathBuf),
    /// An open file descriptor to read the key from (`--key-fd`, e.g. a pipe from a secrets manager).
    Fd(u32),
    /// An environment variable holding the key (`--key-env NAME`, or [`KEY_ENV`]).
    Env(String),
}

impl KeySource {
    /// The source named on the command line, else [`KEY_ENV`] when it is set, else none.
    pub fn choose(file: Option<PathBuf>, fd: Option<u32>, env: Option<String>) -> Option<KeySource> {
        // A variable named to hold the key is kept from children even when no key is read from it.
        if let Some(name) = &env {
            crate::children::keep_env_from_children(name);
        }
        file.map(KeySource::File)
            .or(fd.map(KeySource::Fd))
            .or(env.map(KeySource::Env))
            .or_else(|| std::env::var_os(KEY_ENV).map(|_| KeySource::Env(KEY_ENV.to_owned())))
    }

    /// How the user gave this source, for a message (never the key).
    pub fn describe(&self) -> String {
        match self {
            KeySource::File(path) => format!("--key-file {}", path.display()),
            KeySource::Fd(fd) => format!("--key-fd {fd}"),
            KeySource::Env(name) => format!("the environment variable {name}"),
        }
    }

    /// Reads the key. One trailing newline is dropped (a key written with `echo`); an empty key is refused.
    /// From here on this process dumps no core ([`forbid_dumps`]).
    pub fn read(&self) -> Result<Vec<u8>> {
        forbid_dumps()?;
        let mut key = match self {
            KeySource::File(path) => {
                std::fs::read(path).with_context(|| format!("reading the key file {}", path.display()))?
            }
            // /proc/self/fd/N opens what descriptor N refers to (a pipe or a file) without taking the descriptor.
            KeySource::Fd(fd) => std::fs::read(format!("/proc/self/fd/{fd}"))
                .with_context(|| format!("reading the key from file descriptor {fd}"))?,
            KeySource::Env(name) => {
                use std::os::unix::ffi::OsStringExt as _;
                crate::children::keep_env_from_children(name);
                std::env::var_os(name)
                    .with_context(|| {
                        format!("the environment variable {name} that should hold the key is not set")
                    })?
                    .into_vec()
            }
        };
        if key.last() == Some(&b'\n') {
            key.pop();
            if key.last() == Some(&b'\r') {
                key.pop();
            }
        }
        if key.is_empty() {
            return Err(Exit::usage(format!("the key from {self:?} is empty")).into());
        }
        Ok(key)
    }
}

/// Makes this process undumpable (`PR_SET_DUMPABLE` 0) before it holds a key: a crash then writes no core
/// file (which would hold the key and the passphrase derived from it), and other processes of the same user
/// can no longer read its memory or open its descriptors (the key's memory file) through `/proc/PID`. A child
/// is dumpable again once it execs (the kernel resets the flag), so QEMU's programs are not affected.
pub fn forbid_dumps() -> Result<()> {
    nix::sys::prctl::set_dumpable(false)
        .context("making this process undumpable before it reads a key (prctl)")
}

#[cfg(test)]
mod tests {
    use super::KeySource;

    #[test]
    fn a_process_that_read_a_key_dumps_no_core() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("k");
        std::fs::write(&path, b"secret").expect("write");
        assert!(nix::sys::prctl::get_dumpable().expect("prctl"), "dumpable before");
        KeySource::File(path).read().expect("read");
        assert!(
            !nix::sys::prctl::get_dumpable().expect("prctl"),
            "dumpable after reading a key"
        );
    }

    #[test]
    fn a_key_file_loses_one_trailing_newline_and_an_empty_key_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("k");
        std::fs::write(&path, b"secret\n\n").expect("write");
        assert_eq!(KeySource::File(path.clone()).read().expect("read"), b"secret\n");
        std::fs::write(&path, b"\r\n").expect("write");
        assert!(KeySource::File(path).read().is_err());
    }

    #[test]
    fn the_command_line_source_wins_over_the_environment() {
        let file = KeySource::choose(Some("/k".into()), None, None);
        assert_eq!(file, Some(KeySource::File("/k".into())));
        assert_eq!(KeySource::choose(None, Some(3), None), Some(KeySource::Fd(3)));
        assert_eq!(
            KeySource::choose(None, None, Some("MY_KEY".into())),
            Some(KeySource::Env("MY_KEY".into()))
        );
    }
}
