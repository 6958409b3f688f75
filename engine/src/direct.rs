//! Reading a closed backup chain straight from its files, for hashing. `qemu-img map` on the chain (opened
//! read-only, layers given explicitly as for [`crate::graph`]) says, for every range of the disk, whether it
//! reads as zeros or which layer holds it and at which offset in that layer's file. Reads of data then go to
//! the files with `pread`, in parallel, without passing through a QEMU process and a socket: that is about
//! twice the rate of reading the same chain over NBD from a qemu-storage-daemon on this machine class.
//!
//! Only uncompressed clusters have a host offset. When the map shows anything else (compressed clusters from
//! `backup --compress`, or an image QEMU maps in a way not understood here), [`DirectSource::open`] answers
//! `None` and the caller reads through QEMU instead. The files must not change while they are read: qmpbak
//! reads only nodes that are complete, under the VM's lock.
//!
//! [`DirectSource::is_cached`] says whether a range is in the page cache without reading it (`cachestat`), for a
//! reader to whom the data is an optimisation that is not worth a wait for the disk.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use serde_json::{Value, json};

use chain::{BlockSource, Extent, ExtentKind, Manifest, NodeId, VmStore};

use crate::qemu_bins::QemuBins;

/// The `qemu-img` image specification (`json:{...}`) of a chain of qcow2 files, bottom (self-contained) first:
/// every layer read-only, each backing file named explicitly rather than taken from the qcow2 headers.
pub fn chain_spec(files: &[PathBuf]) -> Value {
    let mut spec = Value::Null;
    for path in files {
        spec = json!({
            "driver": "qcow2",
            "read-only": true,
            "file": { "driver": "file", "filename": path, "read-only": true },
            "backing": spec,
        });
        crate::crypt::unlock::encrypt_node(&mut spec);
    }
    spec
}

/// The files of `node`'s recovery chain for `disk`, bottom first, from the newest self-contained layer up.
pub fn chain_files(vm: &VmStore, manifest: &Manifest, node: &NodeId, disk: &str) -> Result<Vec<PathBuf>> {
    crate::graph::chain_layers(vm, manifest, node, disk)
        .map(|layers| layers.into_iter().map(|(_, p)| p).collect())
}

/// `qemu-img map --output=json` of the image `spec`; `force_share` (`-U`) reads it even where another process
/// holds it open for writing.
pub(crate) async fn qemu_img_map(bins: &QemuBins, spec: &Value, force_share: bool) -> Result<Vec<MapEntry>> {
    let mut cmd = bins.img_command();
    cmd.args(["map", "--output=json"]);
    cmd.args(crate::crypt::unlock::qemu_img_args());
    if force_share {
        cmd.arg("-U");
    }
    let out = bins.img_output(cmd.arg(format!("json:{spec}"))).await?;
    if !out.status.success() {
        bail!(
            "qemu-img map failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    serde_json::from_slice(&out.stdout).context("parsing qemu-img map output")
}

/// One entry of `qemu-img map --output=json`.
#[derive(Debug, Deserialize)]
pub(crate) struct MapEntry {
    pub start: u64,
    pub length: u64,
    #[serde(default)]
    depth: usize,
    pub present: bool,
    zero: bool,
    data: bool,
    #[serde(default)]
    compressed: bool,
    offset: Option<u64>,
}

/// What a range of the disk is, per the map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Where {
    Zero,
    /// In file `file` (an index into [`DirectSource::files`]) at this host offset.
    Data {
        file: usize,
        host: u64,
    },
}

#[derive(Debug, Clone, Copy)]
struct Mapped {
    start: u64,
    len: u64,
    at: Where,
}

/// A closed qcow2 chain as a [`BlockSource`], read with `pread` from its files.
#[derive(Debug)]
pub struct DirectSource {
    /// Bottom first, as given to [`DirectSource::open`].
    files: Vec<(PathBuf, File)>,
    /// Sorted, touching, covering `[0, size)`.
    map: Vec<Mapped>,
    size: u64,
    /// `(start, length)` of what the top layer itself allocates (data or zero clusters).
    top_layer: Vec<(u64, u64)>,
}

impl DirectSource {
    /// Maps the chain `files` (bottom first). `None` when some data has no host offset (compressed clusters):
    /// read it through QEMU then.
    pub async fn open(bins: &QemuBins, files: &[PathBuf]) -> Result<Option<DirectSource>> {
        let Some(top) = files.last() else {
            bail!("an empty chain has nothing to read");
        };
        // The files of an encrypted repository hold ciphertext: only QEMU can read them.
        if crate::crypt::unlock::active().is_some() {
            return Ok(None);
        }
        let entries = qemu_img_map(bins, &chain_spec(files), false)
            .await
            .with_context(|| format!("mapping the chain ending in {}", top.display()))?;
        let Some(map) = mapping(&entries, files.len())? else {
            return Ok(None);
        };
        let size = map.last().map_or(0, |m| m.start + m.len);
        let top_layer = entries
            .iter()
            .filter(|e| e.present && e.depth == 0)
            .map(|e| (e.start, e.length))
            .collect();
        let files = files
            .iter()
            .map(|p| {
                let f = File::open(p).with_context(|| format!("opening {}", p.display()))?;
                Ok((p.clone(), f))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Some(DirectSource {
            files,
            map,
            size,
            top_layer,
        }))
    }

    /// The byte ranges the top layer itself allocates (data or zero clusters), not its backing files: what
    /// [`crate::tables::layer_extents`] gives for the top file, read from the same map.
    pub fn top_layer_ranges(&self) -> &[(u64, u64)] {
        &self.top_layer
    }

    /// [`DirectSource::open`] on `node`'s recovery chain of disk `disk` ([`chain_files`]).
    pub async fn open_node(
        bins: &QemuBins,
        vm: &VmStore,
        manifest: &Manifest,
        node: &NodeId,
        disk: &str,
    ) -> Result<Option<DirectSource>> {
        DirectSource::open(bins, &chain_files(vm, manifest, node, disk)?).await
    }

    /// The file of the chain's top layer.
    pub fn top(&self) -> Option<&Path> {
        self.files.last().map(|(p, _)| p.as_path())
    }
}

/// Turns map entries into ranges; `None` when some data cannot be read directly.
fn mapping(entries: &[MapEntry], layers: usize) -> Result<Option<Vec<Mapped>>> {
    let mut map: Vec<Mapped> = Vec::with_capacity(entries.len());
    let mut cursor = 0;
    for e in entries {
        if e.start != cursor {
            bail!(
                "qemu-img map output has a gap or overlap at byte {cursor} (next entry starts at {})",
                e.start
            );
        }
        cursor = e.start + e.length;
        let at = if !e.present || e.zero {
            Where::Zero
        } else if e.data && !e.compressed && e.depth < layers {
            match e.offset {
                Some(host) => Where::Data {
                    file: layers - 1 - e.depth,
                    host,
                },
                None => return Ok(None),
            }
        } else {
            return Ok(None);
        };
        match (map.last_mut(), at) {
            (Some(last), Where::Zero) if last.at == Where::Zero => last.len += e.length,
            _ => map.push(Mapped {
                start: e.start,
                len: e.length,
                at,
            }),
        }
    }
    Ok(Some(map))
}

impl DirectSource {
    /// The index of the mapped range holding `offset`.
    fn find(&self, offset: u64) -> usize {
        self.map.partition_point(|m| m.start + m.len <= offset)
    }

    /// The mapped pieces of the disk's bytes `[offset, end)` (`end` at most the size), in order: `(at, stop,
    /// where)`, a data piece's host offset being that of `at`.
    fn pieces(&self, offset: u64, end: u64) -> impl Iterator<Item = (u64, u64, Where)> + '_ {
        self.map[self.find(offset)..]
            .iter()
            .take_while(move |m| m.start < end)
            .map(move |m| {
                let at = m.start.max(offset);
                let stop = (m.start + m.len).min(end);
                let place = match m.at {
                    Where::Zero => Where::Zero,
                    Where::Data { file, host } => Where::Data {
                        file,
                        host: host + (at - m.start),
                    },
                };
                (at, stop, place)
            })
    }

    /// Whether all the data of `[offset, offset + len)` is in the page cache now, so that reading it costs no
    /// wait for the disk (ranges that read as zeros need none): `None` when the kernel cannot tell (`cachestat`
    /// is Linux 6.5+). Asking starts no read and no readahead.
    pub fn is_cached(&self, offset: u64, len: u64) -> io::Result<Option<bool>> {
        let end = offset.saturating_add(len).min(self.size);
        for (at, stop, place) in self.pieces(offset, end) {
            if let Where::Data { file, host } = place {
                let (path, f) = &self.files[file];
                match cached(f, host, stop - at).map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!("asking the page cache about {}: {e}", path.display()),
                    )
                })? {
                    Some(true) => {}
                    other => return Ok(other),
                }
            }
        }
        Ok(Some(true))
    }
}

/// `struct cachestat_range` of `cachestat(2)`.
#[repr(C)]
struct CachestatRange {
    off: u64,
    len: u64,
}

/// `struct cachestat` of `cachestat(2)`, with the kernel's field names.
#[repr(C)]
#[derive(Default)]
#[allow(clippy::struct_field_names)]
struct Cachestat {
    nr_cache: u64,
    nr_dirty: u64,
    nr_writeback: u64,
    nr_evicted: u64,
    nr_recently_evicted: u64,
}

/// The number of `cachestat(2)` (Linux 6.5), the same on every architecture (libc does not name it yet).
const SYS_CACHESTAT: libc::c_long = 451;

/// The page size of the page cache's accounting.
#[allow(unsafe_code)]
fn page_size() -> u64 {
    // SAFETY: sysconf only reads a system constant.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).ok().filter(|&s| s > 0).unwrap_or(4096)
}

/// Whether every page of `file` that holds bytes `[offset, offset + len)` is in the page cache (`cachestat(2)`,
/// which reads nothing); `None` when the kernel does not have the call.
#[allow(unsafe_code)]
fn cached(file: &File, offset: u64, len: u64) -> io::Result<Option<bool>> {
    use std::os::fd::AsRawFd as _;
    let page = page_size();
    let first = offset / page * page;
    let end = offset.saturating_add(len).div_ceil(page) * page;
    let range = CachestatRange {
        off: first,
        len: end - first,
    };
    let mut stat = Cachestat::default();
    // SAFETY: cachestat(2) reads `range` and writes `stat`, both live, properly aligned #[repr(C)] structs
    // laid out as the kernel's; the descriptor is open for the call's duration (borrowed from `file`).
    let rc = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            file.as_raw_fd(),
            &raw const range,
            &raw mut stat,
            0u32,
        )
    };
    if rc == 0 {
        return Ok(Some(stat.nr_cache >= (end - first) / page));
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::ENOSYS | libc::EOPNOTSUPP) => Ok(None),
        _ => Err(e),
    }
}

impl BlockSource for DirectSource {
    fn len(&self) -> u64 {
        self.size
    }

    fn extents(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        let end = offset.saturating_add(len).min(self.size);
        Ok(self.map[self.find(offset)..]
            .iter()
            .take_while(|m| m.start < end)
            .map(|m| Extent {
                offset: m.start,
                len: m.len,
                kind: match m.at {
                    Where::Zero => ExtentKind::Zero,
                    Where::Data { .. } => ExtentKind::Data,
                },
            })
            .collect())
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let end = offset + buf.len() as u64;
        if end > self.size {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("read of {} bytes at {offset} beyond the disk's end", buf.len()),
            ));
        }
        for (at, stop, place) in self.pieces(offset, end) {
            let piece = &mut buf[(at - offset) as usize..(stop - offset) as usize];
            match place {
                Where::Zero => piece.fill(0),
                Where::Data { file, host } => {
                    let (path, f) = &self.files[file];
                    f.read_exact_at(piece, host)
                        .map_err(|e| io::Error::new(e.kind(), format!("reading {}: {e}", path.display())))?;
                }
            }
        }
        Ok(())
    }

    fn name(&self) -> String {
        self.top()
            .map_or_else(|| "an empty chain".to_owned(), |p| p.display().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(start: u64, length: u64, depth: usize, zero: bool, offset: Option<u64>) -> MapEntry {
        MapEntry {
            start,
            length,
            depth,
            present: true,
            zero,
            data: !zero,
            compressed: false,
            offset,
        }
    }

    #[test]
    fn maps_layers_bottom_first_and_merges_zeros() {
        let entries = [
            entry(0, 10, 1, false, Some(100)),
            entry(10, 5, 0, true, None),
            MapEntry {
                present: false,
                ..entry(15, 5, 2, true, None)
            },
            entry(20, 4, 0, false, Some(7)),
        ];
        let map = mapping(&entries, 2).unwrap().unwrap();
        assert_eq!(map.len(), 3);
        assert_eq!(map[0].at, Where::Data { file: 0, host: 100 });
        assert_eq!((map[1].start, map[1].len, map[1].at), (10, 10, Where::Zero));
        assert_eq!(map[2].at, Where::Data { file: 1, host: 7 });
    }

    #[test]
    fn compressed_or_unplaced_data_falls_back() {
        let compressed = MapEntry {
            compressed: true,
            ..entry(0, 10, 0, false, None)
        };
        assert!(mapping(&[compressed], 1).unwrap().is_none());
        assert!(mapping(&[entry(0, 10, 0, false, None)], 1).unwrap().is_none());
        assert!(mapping(&[entry(0, 10, 3, false, Some(0))], 1).unwrap().is_none());
    }

    #[test]
    fn gaps_are_errors() {
        let entries = [entry(0, 10, 0, true, None), entry(12, 4, 0, true, None)];
        assert!(mapping(&entries, 1).is_err());
    }
}
