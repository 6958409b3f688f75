//! The partitions of a node's exported raw image and the file systems in them, found by reading the image file
//! alone (`blkid -p`, `partx`: no root, no loop device needed), and how each file system is mounted read-only
//! without replaying a journal.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};

use super::state::run;

/// One partition (or the whole disk, number 0) and what was done with it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Partition {
    /// Partition number; 0 for a whole disk without a partition table.
    pub number: u32,
    /// Offset and size in bytes.
    pub start: u64,
    pub size: u64,
    /// The partition type in the table (`0x83`, a GPT type UUID ...); none for a whole disk.
    pub part_type: Option<String>,
    /// The file system blkid finds (`ext4`, `xfs`, `vfat`, `swap` ...), if any.
    pub fstype: Option<String>,
    pub label: Option<String>,
    /// Where it is mounted.
    pub mounted_at: Option<PathBuf>,
    /// The FUSE driver that mounted it (`fusefat`) where the kernel lacks the file system; none for the
    /// kernel's own.
    pub fuse_driver: Option<String>,
    /// Why it is not mounted, when it could have been.
    pub error: Option<String>,
}

/// The partition table type and the partitions of the raw image (or the whole disk as partition 0), each with
/// the file system blkid finds in it. Reads the image only; works without root.
pub async fn probe(image: &Path) -> Result<(Option<String>, Vec<Partition>)> {
    let whole = blkid(image, None).await?;
    let size = std::fs::metadata(image)
        .with_context(|| format!("inspecting {}", image.display()))?
        .len();
    let Some(table) = whole.get("PTTYPE").cloned() else {
        return Ok((
            None,
            vec![Partition {
                number: 0,
                start: 0,
                size,
                part_type: None,
                fstype: whole.get("TYPE").cloned(),
                label: whole.get("LABEL").cloned(),
                mounted_at: None,
                fuse_driver: None,
                error: None,
            }],
        ));
    };
    let listing = run(
        "partx",
        &[
            "--bytes".as_ref(),
            "--raw".as_ref(),
            "--noheadings".as_ref(),
            "--output".as_ref(),
            "NR,START,SECTORS,TYPE".as_ref(),
            image.as_os_str(),
        ],
    )
    .await?;
    let mut partitions = Vec::new();
    for line in listing.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [nr, start, sectors, part_type, ..] = fields[..] else {
            continue;
        };
        let (Ok(number), Ok(start), Ok(sectors)) =
            (nr.parse::<u32>(), start.parse::<u64>(), sectors.parse::<u64>())
        else {
            continue;
        };
        let (start, size) = (start * 512, sectors * 512);
        let found = blkid(image, Some((start, size))).await?;
        partitions.push(Partition {
            number,
            start,
            size,
            part_type: Some(part_type.to_owned()),
            fstype: found.get("TYPE").cloned(),
            label: found.get("LABEL").cloned(),
            mounted_at: None,
            fuse_driver: None,
            error: None,
        });
    }
    Ok((Some(table), partitions))
}

/// `blkid -p` of the image or of a byte range of it: its `KEY=value` pairs (none when nothing is found).
async fn blkid(image: &Path, range: Option<(u64, u64)>) -> Result<HashMap<String, String>> {
    let mut cmd = crate::children::command(Path::new("blkid"));
    cmd.args(["-p", "-o", "export"]);
    if let Some((offset, size)) = range {
        cmd.arg("-O")
            .arg(offset.to_string())
            .arg("-S")
            .arg(size.to_string());
    }
    let out = crate::children::output(cmd.arg(image))
        .await
        .context("running blkid")?;
    // Exit 2: nothing found.
    if !out.status.success() && out.status.code() != Some(2) {
        bail!(
            "blkid of {} failed: {}",
            image.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect())
}

/// The options every guest file system is mounted with, by the kernel or through FUSE: read-only, and
/// nothing in it counts on the host. The guest's root (or whoever wrote the backup) chose its set-user-id
/// programs and device nodes, so a set-user-id bit gives no one the owner's rights here (`nosuid`), a device
/// node opens no host device (`nodev`) and no program runs from it (`noexec`).
pub const LOCKED_DOWN: &str = "ro,nosuid,nodev,noexec";

/// The mount type and options for a file system: [`LOCKED_DOWN`], and never replaying a journal (which would
/// write).
pub fn mount_options(fstype: &str) -> Option<(&'static str, &'static str)> {
    Some(match fstype {
        "ext2" | "ext3" | "ext4" => ("ext4", "ro,nosuid,nodev,noexec,noload"),
        "xfs" => ("xfs", "ro,nosuid,nodev,noexec,norecovery"),
        "vfat" => ("vfat", LOCKED_DOWN),
        "exfat" => ("exfat", LOCKED_DOWN),
        "btrfs" => ("btrfs", "ro,nosuid,nodev,noexec,rescue=nologreplay"),
        "ntfs" => ("ntfs3", LOCKED_DOWN),
        "iso9660" => ("iso9660", LOCKED_DOWN),
        _ => return None,
    })
}

/// The FUSE driver that mounts file systems of mount type `kind` read-only where the kernel lacks them: a
/// program that detaches once mounted and is stopped by unmounting.
pub fn fuse_driver(kind: &str) -> Option<&'static str> {
    match kind {
        "vfat" => Some("fusefat"),
        _ => None,
    }
}

/// The programs [`fuse_driver`] names (a teardown looks for them).
pub const FUSE_DRIVERS: &[&str] = &["fusefat"];

/// Whether the running kernel can mount file systems of type `kind` now (`/proc/filesystems`; a module that
/// is not loaded yet does not count, so ask after a mount attempt has loaded it).
pub fn kernel_has(kind: &str) -> bool {
    std::fs::read_to_string("/proc/filesystems")
        .is_ok_and(|text| text.lines().any(|l| l.split_whitespace().last() == Some(kind)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_systems_mount_read_only_without_journal_replay() {
        assert_eq!(
            mount_options("ext4"),
            Some(("ext4", "ro,nosuid,nodev,noexec,noload"))
        );
        assert_eq!(
            mount_options("ext3"),
            Some(("ext4", "ro,nosuid,nodev,noexec,noload"))
        );
        assert_eq!(
            mount_options("xfs"),
            Some(("xfs", "ro,nosuid,nodev,noexec,norecovery"))
        );
        assert_eq!(mount_options("vfat"), Some(("vfat", LOCKED_DOWN)));
        for (fstype, (_, options)) in ["ext2", "ext4", "xfs", "vfat", "btrfs", "ntfs", "exfat", "iso9660"]
            .iter()
            .filter_map(|t| Some((t, mount_options(t)?)))
        {
            for wanted in LOCKED_DOWN.split(',') {
                assert!(options.split(',').any(|o| o == wanted), "{fstype}: {options}");
            }
        }
        assert_eq!(mount_options("swap"), None);
        for driver in FUSE_DRIVERS {
            assert!(["vfat"].iter().any(|k| fuse_driver(k) == Some(*driver)));
        }
        assert_eq!(mount_options("LVM2_member"), None);
    }
}
