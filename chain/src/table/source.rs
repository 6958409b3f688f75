//! Two [`BlockSource`]s: [`FileSource`], a raw image file or block device whose holes are found with
//! `SEEK_DATA`/`SEEK_HOLE`, and [`MemSource`], bytes in memory with ranges marked as holes, for tests.

use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use nix::errno::Errno;
use nix::unistd::{Whence, lseek};

use super::{BlockSource, Extent, ExtentKind};
use crate::error::{Error, Result};

/// A raw disk image (or block device) on the host.
#[derive(Debug)]
pub struct FileSource {
    file: File,
    path: PathBuf,
    len: u64,
}

impl FileSource {
    pub fn open(path: impl AsRef<Path>) -> Result<FileSource> {
        let path = path.as_ref();
        let mut file = File::open(path).map_err(Error::io("open", path))?;
        // Seeking to the end works for block devices too, whose metadata length is 0.
        let len = file
            .seek(SeekFrom::End(0))
            .map_err(Error::io("find the size of", path))?;
        Ok(FileSource {
            file,
            path: path.to_owned(),
            len,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `lseek` with `whence`: `None` when there is no data (or hole) from `offset` on (ENXIO).
    fn seek(&self, offset: u64, whence: Whence) -> io::Result<Option<u64>> {
        let offset = i64::try_from(offset).map_err(io::Error::other)?;
        match lseek(self.file.as_raw_fd(), offset, whence) {
            Ok(at) => Ok(Some(u64::try_from(at).map_err(io::Error::other)?)),
            Err(Errno::ENXIO) => Ok(None),
            Err(e) => Err(io::Error::from(e)),
        }
    }
}

impl BlockSource for FileSource {
    fn len(&self) -> u64 {
        self.len
    }

    fn extents(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        let end = offset.saturating_add(len).min(self.len);
        let mut out = Vec::new();
        let mut at = offset;
        while at < end {
            let data = match self.seek(at, Whence::SeekData) {
                Ok(Some(data)) => data.min(end),
                Ok(None) => end,
                // No SEEK_DATA on this file system (or device): everything is data.
                Err(e) if unsupported(&e) => {
                    out.push(Extent {
                        offset: at,
                        len: end - at,
                        kind: ExtentKind::Data,
                    });
                    break;
                }
                Err(e) => return Err(e),
            };
            if data > at {
                out.push(Extent {
                    offset: at,
                    len: data - at,
                    kind: ExtentKind::Zero,
                });
            }
            if data >= end {
                break;
            }
            let hole = self.seek(data, Whence::SeekHole)?.unwrap_or(end).min(end);
            if hole <= data {
                // Cannot happen on a sane file system; do not loop forever if it does.
                out.push(Extent {
                    offset: data,
                    len: end - data,
                    kind: ExtentKind::Data,
                });
                break;
            }
            out.push(Extent {
                offset: data,
                len: hole - data,
                kind: ExtentKind::Data,
            });
            at = hole;
        }
        Ok(out)
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn name(&self) -> String {
        self.path.display().to_string()
    }
}

/// Whether `lseek` failed because the file (system) has no `SEEK_DATA`.
fn unsupported(e: &io::Error) -> bool {
    [Errno::EINVAL, Errno::EOPNOTSUPP]
        .iter()
        .any(|&errno| e.raw_os_error() == Some(errno as i32))
}

/// A disk in memory: bytes plus the ranges that are holes (they read as zeros and are never read).
#[derive(Debug, Default)]
pub struct MemSource {
    data: Vec<u8>,
    /// Sorted, disjoint, not touching.
    holes: Vec<(u64, u64)>,
    bytes_read: AtomicU64,
}

impl MemSource {
    /// All data, no holes.
    pub fn new(data: Vec<u8>) -> MemSource {
        MemSource {
            data,
            holes: Vec::new(),
            bytes_read: AtomicU64::new(0),
        }
    }

    /// `data` with `holes` (offset, length): those bytes are set to zero and reported as zero extents.
    pub fn with_holes(mut data: Vec<u8>, holes: &[(u64, u64)]) -> MemSource {
        let size = data.len() as u64;
        let mut ranges: Vec<(u64, u64)> = holes
            .iter()
            .map(|&(offset, len)| (offset.min(size), offset.saturating_add(len).min(size)))
            .filter(|(start, end)| start < end)
            .collect();
        ranges.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::new();
        for (start, end) in ranges {
            match merged.last_mut() {
                Some(last) if start <= last.1 => last.1 = last.1.max(end),
                _ => merged.push((start, end)),
            }
        }
        for &(start, end) in &merged {
            data[start as usize..end as usize].fill(0);
        }
        MemSource {
            data,
            holes: merged,
            bytes_read: AtomicU64::new(0),
        }
    }

    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// Bytes read through [`BlockSource::read_at`] so far.
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read.load(Ordering::Relaxed)
    }
}

impl BlockSource for MemSource {
    fn len(&self) -> u64 {
        self.data.len() as u64
    }

    fn extents(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        let end = offset.saturating_add(len).min(self.len());
        let mut out = Vec::new();
        let mut at = offset;
        for &(start, stop) in &self.holes {
            if stop <= at {
                continue;
            }
            if start >= end {
                break;
            }
            if start > at {
                out.push(Extent {
                    offset: at,
                    len: start - at,
                    kind: ExtentKind::Data,
                });
            }
            let zero_start = start.max(at);
            let zero_end = stop.min(end);
            out.push(Extent {
                offset: zero_start,
                len: zero_end - zero_start,
                kind: ExtentKind::Zero,
            });
            at = zero_end;
        }
        if at < end {
            out.push(Extent {
                offset: at,
                len: end - at,
                kind: ExtentKind::Data,
            });
        }
        Ok(out)
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let start = usize::try_from(offset).map_err(io::Error::other)?;
        let src = start
            .checked_add(buf.len())
            .and_then(|end| self.data.get(start..end))
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "read past the end of the memory disk",
                )
            })?;
        buf.copy_from_slice(src);
        self.bytes_read.fetch_add(buf.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    fn name(&self) -> String {
        format!("a memory disk of {} bytes", self.data.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_source_extents() {
        let src = MemSource::with_holes(vec![1; 100], &[(10, 10), (15, 10), (90, 50)]);
        assert_eq!(src.len(), 100);
        assert!(src.data()[10..25].iter().all(|&b| b == 0));
        let kinds: Vec<_> = src
            .extents(0, 100)
            .unwrap()
            .iter()
            .map(|e| (e.offset, e.len, e.kind))
            .collect();
        assert_eq!(
            kinds,
            vec![
                (0, 10, ExtentKind::Data),
                (10, 15, ExtentKind::Zero),
                (25, 65, ExtentKind::Data),
                (90, 10, ExtentKind::Zero)
            ]
        );
        let inner: Vec<_> = src
            .extents(12, 5)
            .unwrap()
            .iter()
            .map(|e| (e.offset, e.len, e.kind))
            .collect();
        assert_eq!(inner, vec![(12, 5, ExtentKind::Zero)]);
        let mut buf = [0u8; 4];
        assert!(src.read_at(98, &mut buf).is_err());
    }

    #[test]
    fn file_source_finds_holes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sparse.raw");
        let file = File::create(&path).unwrap();
        let mib = 1u64 << 20;
        file.set_len(8 * mib).unwrap();
        file.write_all_at(&[7u8; 4096], 3 * mib).unwrap();
        drop(file);
        let src = FileSource::open(&path).unwrap();
        assert_eq!(src.len(), 8 * mib);
        let extents = src.extents(0, 8 * mib).unwrap();
        // Whatever the file system's granularity, the written range is data and the extents cover everything.
        let covered: u64 = extents.iter().map(|e| e.len).sum();
        assert_eq!(covered, 8 * mib);
        let data = extents
            .iter()
            .find(|e| e.kind == ExtentKind::Data)
            .expect("a data extent");
        assert!(
            data.offset <= 3 * mib && data.offset + data.len >= 3 * mib + 4096,
            "{extents:?}"
        );
        let mut buf = [0u8; 4];
        src.read_at(3 * mib, &mut buf).unwrap();
        assert_eq!(buf, [7; 4]);
    }
}
