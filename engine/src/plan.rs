//! Choosing a backup's level: full, incremental or differential, and for the last two whether QEMU's dirty
//! bitmaps can be trusted or the disk must be compared against the base node's checking table (a checksum-diff
//! incremental). Pure logic over facts gathered from the manifest and QEMU, so every rule is unit-tested.

use std::fmt::Write as _;

use crate::bitmaps::BitmapState;

/// The level the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requested {
    Full,
    Incremental,
    Differential,
    Auto,
}

/// What the new node is relative to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// Everything; no parent.
    Full,
    /// Changes since the current node.
    Incremental,
    /// Changes since the last full.
    Differential,
}

/// How the changed data is found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// `blockdev-backup` of everything the guest sees (`sync=top` of an image without backing, else `sync=full`).
    Full,
    /// `blockdev-backup sync=bitmap` with qmpbak's persistent bitmap.
    Bitmap,
    /// Read the disk at one instant, hash it, and store the blocks whose hash differs from the base's table.
    ChecksumDiff,
}

/// Facts about one selected disk.
#[derive(Debug, Clone)]
pub struct DiskFacts {
    pub id: String,
    pub size_now: u64,
    /// Its size in the base node, `None` if the base node has no such disk.
    pub size_in_base: Option<u64>,
    /// The incremental bitmap relative to the current node.
    pub inc_bitmap: BitmapState,
    /// The differential bitmap relative to the last full.
    pub diff_bitmap: BitmapState,
    /// qmpbak bitmaps of this chain on the disk that are relative to some other node or disk.
    pub stray_bitmaps: Vec<String>,
    /// Why the disk's bitmaps live only in QEMU's memory ("is raw: ..."), when they do.
    pub volatile_why: Option<String>,
    /// Why the disk cannot be proven to be the image its id had in the base node
    /// ([`crate::identity::image_change`]): then its bitmaps and the tables under its id are another disk's.
    pub image_changed: Option<String>,
}

/// Facts about the VM's chain.
#[derive(Debug, Clone, Default)]
pub struct ChainFacts {
    /// The node the live VM's bitmaps are relative to.
    pub current: Option<String>,
    pub current_has_tables: bool,
    /// The nearest full at or above the current node.
    pub last_full: Option<String>,
    pub last_full_has_tables: bool,
    /// Incrementals and differentials between the last full and the current node.
    pub since_full: u32,
    /// Repository policy: in `auto`, take a new full after this many (0 = never).
    pub full_every: u32,
}

/// The decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub level: Level,
    pub method: Method,
    pub parent: Option<String>,
    /// Why, in words, for the output and the manifest.
    pub reason: String,
}

/// A requested level that cannot be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error(
        "there is no full backup of this VM yet to base an {0} on; run with --level full or --level auto"
    )]
    NoBase(&'static str),
    #[error("cannot make an {level}: {why}; run with --level full or --level auto")]
    DisksChanged { level: &'static str, why: String },
}

/// Decides the level and method of the next backup.
pub fn plan(requested: Requested, chain: &ChainFacts, disks: &[DiskFacts]) -> Result<Plan, PlanError> {
    let full = |reason: String| Plan {
        level: Level::Full,
        method: Method::Full,
        parent: None,
        reason,
    };
    let level_name = match requested {
        Requested::Full => return Ok(full("full backup requested".into())),
        Requested::Incremental | Requested::Auto => "incremental",
        Requested::Differential => "differential",
    };
    let (Some(current), Some(last_full)) = (&chain.current, &chain.last_full) else {
        return match (requested, &chain.current) {
            (Requested::Auto, None) => Ok(full("first backup of this VM".into())),
            (Requested::Auto, Some(current)) => Ok(full(format!(
                "the current node {current} has no full backup above it (a time point the VM was reverted to, \
                 say)"
            ))),
            _ => Err(PlanError::NoBase(level_name)),
        };
    };

    if let Some(why) = disks_changed(disks) {
        return match requested {
            Requested::Auto => Ok(full(why)),
            _ => Err(PlanError::DisksChanged {
                level: level_name,
                why,
            }),
        };
    }

    if requested == Requested::Auto && chain.full_every > 0 && chain.since_full >= chain.full_every {
        return Ok(full(format!(
            "{} backups since full {last_full}; the repository takes a new full every {}",
            chain.since_full, chain.full_every
        )));
    }

    let differential = requested == Requested::Differential;
    let (level, base, base_has_tables) = if differential {
        (Level::Differential, last_full, chain.last_full_has_tables)
    } else {
        (Level::Incremental, current, chain.current_has_tables)
    };
    let mut trouble = String::new();
    for disk in disks {
        let state = if differential {
            disk.diff_bitmap
        } else {
            disk.inc_bitmap
        };
        if let Some(problem) = state.problem() {
            if !trouble.is_empty() {
                trouble.push_str("; ");
            }
            match (&disk.volatile_why, state) {
                (Some(why), BitmapState::Missing) => {
                    let _ = write!(
                        trouble,
                        "the bitmap of disk {id} relative to node {base} is missing: disk {id} {why}",
                        id = disk.id
                    );
                }
                _ => {
                    let _ = write!(
                        trouble,
                        "the bitmap of disk {} relative to node {base} {problem}",
                        disk.id
                    );
                }
            }
            if !disk.stray_bitmaps.is_empty() {
                let _ = write!(
                    trouble,
                    " (found {}, relative to another node or disk)",
                    disk.stray_bitmaps.join(", ")
                );
            }
        }
    }
    let parent = Some(base.clone());
    if trouble.is_empty() {
        return Ok(Plan {
            level,
            method: Method::Bitmap,
            parent,
            reason: format!("bitmaps relative to node {base}"),
        });
    }
    if base_has_tables {
        return Ok(Plan {
            level,
            method: Method::ChecksumDiff,
            parent,
            reason: format!("{trouble}: comparing the disks with the checking tables of node {base}"),
        });
    }
    Ok(full(format!(
        "{trouble}, and node {base} has no checking tables to compare with"
    )))
}

fn disks_changed(disks: &[DiskFacts]) -> Option<String> {
    let mut why = Vec::new();
    for disk in disks {
        // Another image says most (a wrong --socket or --vm, say), whatever its size.
        match (disk.size_in_base, &disk.image_changed) {
            (None, _) => why.push(format!("disk {} is not in the previous backup", disk.id)),
            (Some(_), Some(change)) => why.push(format!(
                "{change}, so its bitmaps and checking tables may be another disk's"
            )),
            (Some(old), None) if old != disk.size_now => {
                let verb = if disk.size_now > old { "grew" } else { "shrank" };
                why.push(format!(
                    "disk {} {verb} from {old} to {} bytes",
                    disk.id, disk.size_now
                ));
            }
            (Some(_), None) => {}
        }
    }
    if !disks.is_empty() && disks.iter().all(|d| d.image_changed.is_some()) {
        why.push(
            "every disk is another image than at the last backup: if this is not the same VM, check --socket \
             (or --qmp) and --vm"
                .to_owned(),
        );
    }
    (!why.is_empty()).then(|| why.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(id: &str) -> DiskFacts {
        DiskFacts {
            id: id.into(),
            size_now: 1 << 30,
            size_in_base: Some(1 << 30),
            inc_bitmap: BitmapState::Usable,
            diff_bitmap: BitmapState::Usable,
            stray_bitmaps: vec![],
            volatile_why: None,
            image_changed: None,
        }
    }

    fn chain() -> ChainFacts {
        ChainFacts {
            current: Some("0003".into()),
            current_has_tables: true,
            last_full: Some("0001".into()),
            last_full_has_tables: true,
            since_full: 2,
            full_every: 7,
        }
    }

    #[test]
    fn first_backup_is_full() {
        let p = plan(Requested::Auto, &ChainFacts::default(), &[disk("a")]).unwrap();
        assert_eq!((p.level, p.method, p.parent), (Level::Full, Method::Full, None));
        assert!(p.reason.contains("first backup"));
        assert_eq!(
            plan(Requested::Incremental, &ChainFacts::default(), &[disk("a")]),
            Err(PlanError::NoBase("incremental"))
        );
    }

    #[test]
    fn intact_bitmaps_give_an_incremental_on_the_current_node() {
        let p = plan(Requested::Auto, &chain(), &[disk("a"), disk("b")]).unwrap();
        assert_eq!(
            (p.level, p.method, p.parent.as_deref()),
            (Level::Incremental, Method::Bitmap, Some("0003"))
        );
    }

    #[test]
    fn differential_is_relative_to_the_last_full() {
        let p = plan(Requested::Differential, &chain(), &[disk("a")]).unwrap();
        assert_eq!(
            (p.level, p.method, p.parent.as_deref()),
            (Level::Differential, Method::Bitmap, Some("0001"))
        );
    }

    #[test]
    fn bitmap_trouble_means_checksum_diff_and_says_why() {
        for state in [
            BitmapState::Missing,
            BitmapState::Inconsistent,
            BitmapState::Busy,
            BitmapState::Disabled,
        ] {
            let mut b = disk("b");
            b.inc_bitmap = state;
            b.stray_bitmaps = vec!["qmpbak-c-inc-0002".into()];
            let p = plan(Requested::Auto, &chain(), &[disk("a"), b]).unwrap();
            assert_eq!((p.level, p.method), (Level::Incremental, Method::ChecksumDiff));
            assert!(
                p.reason.contains("disk b") && p.reason.contains(state.problem().unwrap()),
                "{}",
                p.reason
            );
            assert!(p.reason.contains("qmpbak-c-inc-0002"), "{}", p.reason);
        }
    }

    #[test]
    fn a_raw_disk_whose_bitmap_is_gone_says_its_bitmaps_live_in_memory() {
        let mut b = disk("b");
        b.inc_bitmap = BitmapState::Missing;
        b.volatile_why = Some("is raw: its bitmaps live only while QEMU runs".into());
        let p = plan(Requested::Auto, &chain(), &[disk("a"), b]).unwrap();
        assert_eq!(p.method, Method::ChecksumDiff);
        assert!(
            p.reason
                .contains("is missing: disk b is raw: its bitmaps live only while QEMU runs"),
            "{}",
            p.reason
        );
    }

    #[test]
    fn bitmap_trouble_without_tables_falls_back_to_full() {
        let mut c = chain();
        c.current_has_tables = false;
        let mut a = disk("a");
        a.inc_bitmap = BitmapState::Missing;
        let p = plan(Requested::Auto, &c, &[a]).unwrap();
        assert_eq!(p.level, Level::Full);
        assert!(p.reason.contains("no checking tables"), "{}", p.reason);
    }

    #[test]
    fn grown_disk_forces_full_in_auto_and_refuses_an_explicit_incremental() {
        let mut a = disk("a");
        a.size_now = 2 << 30;
        let p = plan(Requested::Auto, &chain(), &[a.clone()]).unwrap();
        assert_eq!(p.level, Level::Full);
        assert!(
            p.reason
                .contains("disk a grew from 1073741824 to 2147483648 bytes"),
            "{}",
            p.reason
        );
        assert!(matches!(
            plan(Requested::Incremental, &chain(), &[a]),
            Err(PlanError::DisksChanged { .. })
        ));
        let mut new = disk("n");
        new.size_in_base = None;
        assert!(
            plan(Requested::Auto, &chain(), &[new])
                .unwrap()
                .reason
                .contains("disk n is not in")
        );
    }

    #[test]
    fn a_disk_that_is_another_image_is_never_built_on() {
        // Even with a usable bitmap under its key and tables to compare with.
        let mut moved = disk("virtio0");
        moved.image_changed = Some("disk virtio0 is image /b, not /a".into());
        let p = plan(Requested::Auto, &chain(), &[moved.clone(), disk("virtio1")]).unwrap();
        assert_eq!((p.level, p.method, p.parent), (Level::Full, Method::Full, None));
        assert!(
            p.reason.contains("disk virtio0 is image /b, not /a"),
            "{}",
            p.reason
        );
        for requested in [Requested::Incremental, Requested::Differential] {
            assert!(matches!(
                plan(requested, &chain(), &[moved.clone()]),
                Err(PlanError::DisksChanged { .. })
            ));
        }
    }

    #[test]
    fn another_image_is_named_before_its_size_and_all_of_them_suggest_the_wrong_vm() {
        let mut other = disk("virtio0");
        other.image_changed = Some("disk virtio0 is image /b, not /a".into());
        other.size_now = 2 << 30;
        let p = plan(Requested::Auto, &chain(), &[other.clone(), disk("virtio1")]).unwrap();
        assert!(p.reason.contains("is image /b, not /a"), "{}", p.reason);
        assert!(!p.reason.contains("grew"), "{}", p.reason);
        assert!(!p.reason.contains("--socket"), "{}", p.reason);
        let p = plan(Requested::Auto, &chain(), &[other]).unwrap();
        assert!(p.reason.contains("check --socket"), "{}", p.reason);
    }

    #[test]
    fn a_current_node_without_a_full_above_it_is_said_so() {
        let reverted = ChainFacts {
            current: Some("0004".into()),
            ..ChainFacts::default()
        };
        let p = plan(Requested::Auto, &reverted, &[disk("a")]).unwrap();
        assert_eq!(p.method, Method::Full);
        assert!(
            p.reason.contains("0004 has no full backup above it"),
            "{}",
            p.reason
        );
    }

    #[test]
    fn an_unproven_bitmap_on_the_same_image_means_checksum_diff() {
        let mut a = disk("a");
        a.inc_bitmap = BitmapState::Unproven;
        a.stray_bitmaps = vec!["qmpbak-c-inc-0003".into()];
        let p = plan(Requested::Auto, &chain(), &[a]).unwrap();
        assert_eq!((p.level, p.method), (Level::Incremental, Method::ChecksumDiff));
        assert!(
            p.reason.contains("cannot prove") && p.reason.contains("qmpbak-c-inc-0003"),
            "{}",
            p.reason
        );
    }

    #[test]
    fn policy_takes_a_new_full_after_n() {
        let mut c = chain();
        c.since_full = 7;
        assert_eq!(
            plan(Requested::Auto, &c, &[disk("a")]).unwrap().level,
            Level::Full
        );
        // An explicit incremental is honoured whatever the policy says.
        assert_eq!(
            plan(Requested::Incremental, &c, &[disk("a")]).unwrap().level,
            Level::Incremental
        );
        c.full_every = 0;
        assert_eq!(
            plan(Requested::Auto, &c, &[disk("a")]).unwrap().level,
            Level::Incremental
        );
    }
}
