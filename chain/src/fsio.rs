//! Generic file I/O for the repository: atomic writes (a temporary file in the same directory, fsync, rename,
//! fsync the directory, so a crash leaves the old file or the new one, never a mix), fsyncs, private modes
//! (files 0600, directories 0700) and what a file occupies on disk. It knows nothing of manifests or locks.

use std::fs::{self, DirBuilder, File};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt as _, PermissionsExt};
use std::path::Path;

use crate::error::{Error, Result};

/// Mode of every file the repository creates.
pub const FILE_MODE: u32 = 0o600;
/// Mode of every directory the repository creates.
pub const DIR_MODE: u32 = 0o700;

/// The name prefix of our temporary files for `file_name`: `.NAME.`; they end in `.tmp`.
fn temp_prefix(file_name: &str) -> String {
    format!(".{file_name}.")
}

/// Writes `path` atomically with what `fill` writes (through a buffer). With `replace` false, an existing
/// `path` is left alone and the error is `io::ErrorKind::AlreadyExists` (as an [`Error::Io`]).
pub fn write_atomic_with(
    path: &Path,
    replace: bool,
    fill: impl FnOnce(&mut dyn Write) -> io::Result<()>,
) -> Result<()> {
    let dir = parent_dir(path);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let prefix = temp_prefix(&name);
    let mut temp = tempfile::Builder::new()
        .prefix(&prefix)
        .suffix(".tmp")
        .permissions(fs::Permissions::from_mode(FILE_MODE))
        .tempfile_in(dir)
        .map_err(Error::io("create a temporary file in", dir))?;
    let temp_path = temp.path().to_owned();
    {
        let mut writer = BufWriter::new(temp.as_file_mut());
        fill(&mut writer).map_err(Error::io("write", &temp_path))?;
        writer.flush().map_err(Error::io("write", &temp_path))?;
    }
    temp.as_file()
        .sync_all()
        .map_err(Error::io("fsync", temp.path()))?;
    let persisted = if replace {
        temp.persist(path)
    } else {
        temp.persist_noclobber(path)
    };
    persisted.map_err(|e| Error::Io {
        action: "rename a temporary file to",
        path: path.to_owned(),
        source: e.error,
    })?;
    sync_dir(dir)
}

/// Writes `bytes` to `path` atomically, replacing it.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, true, |w| w.write_all(bytes))
}

/// The directory a path is in (`.` for a bare file name).
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// fsyncs a directory, so that a rename or create in it is durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(Error::io("fsync directory", dir))
}

/// fsyncs files another program wrote (QEMU, `qemu-img`), then each directory they are in, so that both
/// their data and their names are durable. Used before a record names the files as complete.
pub fn sync_files<P: AsRef<Path>>(files: &[P]) -> Result<()> {
    let mut dirs: Vec<&Path> = Vec::new();
    for file in files {
        let file = file.as_ref();
        File::open(file)
            .and_then(|f| f.sync_all())
            .map_err(Error::io("fsync", file))?;
        let dir = parent_dir(file);
        if !dirs.contains(&dir) {
            dirs.push(dir);
        }
    }
    dirs.into_iter().try_for_each(sync_dir)
}

/// Creates a directory with mode 0700 (the parent must exist); an existing directory is fine.
pub fn create_private_dir(dir: &Path) -> Result<()> {
    match DirBuilder::new().mode(DIR_MODE).create(dir) {
        Ok(()) => sync_dir(parent_dir(dir)),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        Err(e) => Err(Error::Io {
            action: "create directory",
            path: dir.to_owned(),
            source: e,
        }),
    }
}

/// Removes temporary files that a writer of `file_name` in `dir` left behind when it died. Call only while
/// holding the lock that writers of that file take.
pub fn remove_stale_temps(dir: &Path, file_name: &str) -> Result<()> {
    let prefix = temp_prefix(file_name);
    let entries = fs::read_dir(dir).map_err(Error::io("list", dir))?;
    for entry in entries {
        let entry = entry.map_err(Error::io("list", dir))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(&prefix) && name.ends_with(".tmp") {
            let path = entry.path();
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(Error::Io {
                        action: "remove stale temporary file",
                        path,
                        source: e,
                    });
                }
            }
        }
    }
    Ok(())
}

/// The most a manifest may hold: 256 MiB, some 300 000 nodes (a 10 000-node manifest is 8 MiB).
pub const MAX_MANIFEST_BYTES: u64 = 256 << 20;
/// The most a small record (settings, a lock's holder) may hold.
pub const MAX_SMALL_FILE_BYTES: u64 = 1 << 20;

/// Opens `path` for reading only if it is a regular file (after symlinks), else `InvalidInput`: the open
/// itself never waits (`O_NONBLOCK`: a FIFO with no writer) nor takes a terminal (`O_NOCTTY`).
pub fn open_regular(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK | nix::libc::O_NOCTTY)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"));
    }
    Ok(file)
}

/// Reads a whole regular file of at most `limit` bytes. The file is data a repository holds, so it is checked
/// before it sizes anything: a FIFO would stall the read and a device (`/dev/zero` behind a symlink) never
/// end it, so anything but a regular file is `InvalidInput`; a larger file is `InvalidData`, unread.
pub fn read_bounded(path: &Path, limit: u64) -> io::Result<Vec<u8>> {
    use std::io::Read as _;
    let file = open_regular(path)?;
    let meta = file.metadata()?;
    if meta.len() > limit {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} bytes, more than the {limit} such a file may hold", meta.len()),
        ));
    }
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    // It may grow while read: never past the limit.
    file.take(limit.saturating_add(1)).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("more than the {limit} bytes such a file may hold"),
        ));
    }
    Ok(bytes)
}

/// Reads a whole manifest-sized file ([`read_bounded`], [`MAX_MANIFEST_BYTES`]); a missing one is `Ok(None)`.
pub fn read_optional(path: &Path) -> Result<Option<Vec<u8>>> {
    match read_bounded(path, MAX_MANIFEST_BYTES) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::Io {
            action: "read",
            path: path.to_owned(),
            source: e,
        }),
    }
}

/// Bytes a file occupies on the host (its allocated blocks, not its apparent size).
pub fn allocated_bytes(path: &Path) -> io::Result<u64> {
    Ok(allocated(&fs::metadata(path)?))
}

/// Bytes the file described by `meta` occupies on the host: its 512-byte blocks.
pub fn allocated(meta: &fs::Metadata) -> u64 {
    meta.blocks() * 512
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A manifest, settings file or holder record that a tampered repository made a FIFO, a link to a device or a
    /// huge file is refused at once: a FIFO stalled every command, `/dev/zero` read until memory ran out.
    #[test]
    fn only_a_regular_file_within_its_limit_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("manifest.json");
        nix::unistd::mkfifo(
            &fifo,
            nix::sys::stat::Mode::S_IRUSR | nix::sys::stat::Mode::S_IWUSR,
        )
        .unwrap();
        assert_eq!(
            read_bounded(&fifo, 10).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        let zero = dir.path().join("zero.json");
        std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
        assert_eq!(
            read_bounded(&zero, 10).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        assert!(read_optional(&zero).is_err());
        let big = dir.path().join("big.json");
        fs::write(&big, vec![b' '; 11]).unwrap();
        assert_eq!(
            read_bounded(&big, 10).unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
        assert_eq!(read_bounded(&big, 11).unwrap().len(), 11);
        assert_eq!(read_optional(&dir.path().join("missing")).unwrap(), None);
    }

    #[test]
    fn atomic_write_replaces_and_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.json");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, FILE_MODE);
        // No temporary file is left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn sync_files_names_a_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let here = dir.path().join("here");
        fs::write(&here, b"data").unwrap();
        sync_files(&[&here, &here]).unwrap();
        let gone = dir.path().join("gone");
        let err = sync_files(&[&here, &gone]).unwrap_err();
        assert!(
            matches!(&err, Error::Io { source, .. } if source.kind() == io::ErrorKind::NotFound),
            "{err}"
        );
        assert!(err.to_string().contains("gone"), "{err}");
    }

    #[test]
    fn no_clobber_keeps_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        write_atomic_with(&path, false, |w| w.write_all(b"first")).unwrap();
        let err = write_atomic_with(&path, false, |w| w.write_all(b"second")).unwrap_err();
        assert!(
            matches!(&err, Error::Io { source, .. } if source.kind() == io::ErrorKind::AlreadyExists),
            "{err}"
        );
        assert_eq!(fs::read(&path).unwrap(), b"first");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn stale_temps_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(".manifest.json.abc123.tmp"), b"x").unwrap();
        fs::write(dir.path().join("keep.tmp"), b"x").unwrap();
        remove_stale_temps(dir.path(), "manifest.json").unwrap();
        let left: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from("keep.tmp")]);
    }

    #[test]
    fn private_dirs() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("sub");
        create_private_dir(&sub).unwrap();
        create_private_dir(&sub).unwrap();
        assert_eq!(fs::metadata(&sub).unwrap().permissions().mode() & 0o777, DIR_MODE);
    }
}
