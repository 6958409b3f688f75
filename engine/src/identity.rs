//! Which disk is which: each disk of a chain has a durable identity in the manifest's disk list: a random key,
//! carried in the names of its dirty bitmaps ([`crate::bitmaps`]), and the image QEMU had open for it (the
//! protocol node's filename) when the node its bitmaps count from was made. A backup builds on a bitmap only
//! when the bitmap names the disk's key, and on a disk's checking table only when the disk is still that image;
//! a disk that moved (VM restarted with its disks in another order, one removed, replaced or renamed) is
//! never taken for another.

use chain::{DiskIdentity, Manifest};

use crate::inspect::DiskInfo;

/// Gives every disk in `disks` a record with a key in the manifest's disk list (a new disk, or one recorded by
/// an older qmpbak without a key); the images already recorded are left as they are.
pub fn assign_keys(manifest: &mut Manifest, disks: &[DiskInfo]) {
    for d in disks {
        match manifest.disks.iter_mut().find(|k| k.id == d.id) {
            Some(known) => {
                if known.key.is_none() {
                    known.key = Some(chain::new_disk_key());
                }
            }
            None => manifest.disks.push(DiskIdentity {
                id: d.id.clone(),
                node_name: Some(d.node_name.clone()),
                virtual_size: d.virtual_size,
                serial: None,
                filename: None,
                key: Some(chain::new_disk_key()),
            }),
        }
    }
}

/// Records what `disks` are now (image, size, node), keeping their keys: called in the manifest write that
/// makes a node current, by every operation that does (backup, revert, live restore).
pub fn note_images(manifest: &mut Manifest, disks: &[DiskInfo]) {
    assign_keys(manifest, disks);
    for d in disks {
        if let Some(known) = manifest.disks.iter_mut().find(|k| k.id == d.id) {
            known.filename = Some(d.image.clone());
            known.virtual_size = d.virtual_size;
            known.node_name = Some(d.node_name.clone());
        }
    }
}

/// Records that qmpbak itself put a new image on top of disks (a snapshot's overlays): each disk in `after`
/// that was the recorded image in `before` is now the new one. A disk that was not stays unproven.
pub fn follow(manifest: &mut Manifest, before: &[DiskInfo], after: &[DiskInfo]) {
    for a in after {
        let Some(b) = before.iter().find(|b| b.id == a.id) else {
            continue;
        };
        if let Some(known) = manifest.disks.iter_mut().find(|k| k.id == a.id) {
            if known.filename.as_deref() == Some(b.image.as_str()) {
                known.filename = Some(a.image.clone());
                known.node_name = Some(a.node_name.clone());
            }
        }
    }
}

/// The key of disk `id`, once [`assign_keys`] has run for it.
pub fn key_of<'a>(manifest: &'a Manifest, id: &str) -> Option<&'a str> {
    manifest.disk(id).and_then(|d| d.key.as_deref())
}

/// Why disk `disk` cannot be proven to be the image recorded for its id, if it cannot: then neither its
/// bitmaps nor the checking tables recorded under its id are this disk's.
pub fn image_change(recorded: Option<&DiskIdentity>, disk: &DiskInfo) -> Option<String> {
    match recorded.and_then(|r| r.filename.as_deref()) {
        Some(was) if was == disk.image => None,
        Some(was) => Some(format!(
            "disk {} is image {}, not {} as when its last backup was made",
            disk.id, disk.image, was
        )),
        None => Some(format!(
            "disk {} has no recorded image to prove it is the disk of its last backup",
            disk.id
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inspect::NameSource;

    fn info(id: &str, image: &str) -> DiskInfo {
        DiskInfo {
            id: id.into(),
            id_source: NameSource::DeviceId,
            qdev: None,
            node_name: format!("node-{id}"),
            root_node: format!("node-{id}"),
            file: image.into(),
            image: image.into(),
            format: "qcow2".into(),
            virtual_size: 1 << 20,
            allocated_size: None,
            backing_file: None,
            has_backing: false,
            read_only: false,
            removable: false,
            bitmaps_persist: true,
            bitmaps_volatile_why: None,
            encrypted: false,
            bitmaps: vec![],
        }
    }

    #[test]
    fn keys_are_given_once_and_kept() {
        let mut m = Manifest::new("vm", chrono::Utc::now());
        assign_keys(&mut m, &[info("a", "/a"), info("b", "/b")]);
        let a = key_of(&m, "a").unwrap().to_owned();
        assert_ne!(Some(a.as_str()), key_of(&m, "b"));
        assert_eq!(m.disk("a").unwrap().filename, None);
        note_images(&mut m, &[info("a", "/elsewhere")]);
        assert_eq!(key_of(&m, "a"), Some(a.as_str()));
        assert_eq!(m.disk("a").unwrap().filename.as_deref(), Some("/elsewhere"));
        // A record of an older qmpbak gets a key and keeps its image.
        m.disks[1].key = None;
        m.disks[1].filename = Some("/b".into());
        assign_keys(&mut m, &[info("b", "/b")]);
        assert!(key_of(&m, "b").is_some());
        assert_eq!(m.disk("b").unwrap().filename.as_deref(), Some("/b"));
        assert!(m.validate().is_ok());
    }

    #[test]
    fn another_image_or_none_recorded_is_a_change() {
        let mut m = Manifest::new("vm", chrono::Utc::now());
        note_images(&mut m, &[info("a", "/vm/a.qcow2")]);
        assert_eq!(image_change(m.disk("a"), &info("a", "/vm/a.qcow2")), None);
        let why = image_change(m.disk("a"), &info("a", "/vm/b.qcow2")).unwrap();
        assert!(
            why.contains("/vm/b.qcow2") && why.contains("/vm/a.qcow2"),
            "{why}"
        );
        assert!(image_change(None, &info("a", "/vm/a.qcow2")).is_some());
    }

    #[test]
    fn a_snapshot_carries_only_a_proven_image_forward() {
        let mut m = Manifest::new("vm", chrono::Utc::now());
        note_images(&mut m, &[info("a", "/a"), info("b", "/b")]);
        // b was swapped for another image before the snapshot: it stays unproven.
        let before = [info("a", "/a"), info("b", "/c")];
        let after = [info("a", "/a.snap"), info("b", "/c.snap")];
        follow(&mut m, &before, &after);
        assert_eq!(image_change(m.disk("a"), &after[0]), None);
        assert!(image_change(m.disk("b"), &after[1]).is_some());
    }
}
