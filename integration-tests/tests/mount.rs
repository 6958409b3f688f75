//! `qmpbak mount`: a node's partitioned disk (an MBR with ext4, vfat and xfs written as guest writes, backed up
//! from a real QEMU) is listed, mounted read-only partition by partition (ext4 with `noload`, xfs with
//! `norecovery`, vfat through fusefat where the kernel has no vfat) and read back byte for byte, and exported
//! as an image file, also for a user without root; `umount` leaves nothing behind, also after a killed mount (as `cleanup` does), nothing in
//! the repository changes, a damaged node is refused unless `--force`, and without root qmpbak says what to do.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::Path;
use std::process::Command;

use integration_tests::mounts::{self, Unmount, assert_nothing_left, can_mount, checksums};
use integration_tests::repo::TestRepo;
use integration_tests::timeouts::{CLI_TIMEOUT, PROCESS_EXIT_TIMEOUT};
use integration_tests::{MIB, TestVm, cli, image};
use qmpbak_engine::cleanup::CleanupReport;
use qmpbak_engine::mount::{MountReport, UmountReport};

const VM: &str = "vm1";
/// Large for xfs, but sparse: only what the file systems hold is ever written.
const DISK_SIZE: u64 = 328 * MIB;
/// Partition 1 (ext4): 1 MiB to 17 MiB; partition 2 (vfat): 17 MiB to 25 MiB; partition 3 (xfs, whose mkfs
/// wants 300 MiB at least): 25 MiB to 325 MiB.
const P1: (u64, u64) = (MIB, 16 * MIB);
const P2: (u64, u64) = (17 * MIB, 8 * MIB);
const P3: (u64, u64) = (25 * MIB, 300 * MIB);
/// The file put into the xfs partition.
const XFS_FILE: &str = "known.bin";

/// Files put into the ext4 partition: name and content.
fn files() -> Vec<(String, Vec<u8>)> {
    (0..5u32)
        .map(|i| {
            let content: Vec<u8> = (0..(100_000 + i * 37_000))
                .map(|j| (j.wrapping_mul(31).wrapping_add(i * 7) % 251) as u8)
                .collect();
            (format!("file{i}.bin"), content)
        })
        .collect()
}

/// The content of [`XFS_FILE`].
fn xfs_file() -> Vec<u8> {
    (0..300_001u32)
        .map(|j| (j.wrapping_mul(13).wrapping_add(j >> 9) % 253) as u8)
        .collect()
}

/// An MBR sector with primary partitions: (type, start, size) in bytes.
fn mbr(parts: &[(u8, u64, u64)]) -> Vec<u8> {
    let mut sector = vec![0u8; 512];
    for (i, (kind, start, size)) in parts.iter().enumerate() {
        let e = 446 + 16 * i;
        sector[e + 4] = *kind;
        sector[e + 8..e + 12].copy_from_slice(&u32::try_from(start / 512).unwrap().to_le_bytes());
        sector[e + 12..e + 16].copy_from_slice(&u32::try_from(size / 512).unwrap().to_le_bytes());
    }
    sector[510] = 0x55;
    sector[511] = 0xaa;
    sector
}

fn run_ok(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Writes a partition table, an ext4 partition holding [`files`], a vfat partition (when mkfs.vfat is
/// installed) and an xfs partition holding [`XFS_FILE`] into disk0 of `vm`, as guest writes.
async fn partitioned_disk(vm: &TestVm, work: &Path) -> bool {
    let content = work.join("content");
    std::fs::create_dir(&content).unwrap();
    for (name, bytes) in files() {
        std::fs::write(content.join(name), bytes).unwrap();
    }
    let ext4 = work.join("p1.ext4");
    run_ok(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "qmpbak-p1", "-d"])
            .arg(&content)
            .arg(&ext4)
            .arg(format!("{}k", P1.1 / 1024)),
    );
    let vfat = work.join("p2.vfat");
    let has_vfat = Command::new("mkfs.vfat")
        .args(["-C", "-n", "QMPBAKP2"])
        .arg(&vfat)
        .arg((P2.1 / 1024).to_string())
        .output()
        .is_ok_and(|o| o.status.success());
    if has_vfat {
        fill_vfat(&vfat, work);
    } else {
        eprintln!("mkfs.vfat is not installed: partition 2 stays without a file system");
    }
    let table = work.join("mbr");
    std::fs::write(
        &table,
        mbr(&[(0x83, P1.0, P1.1), (0x0c, P2.0, P2.1), (0x83, P3.0, P3.1)]),
    )
    .unwrap();
    vm.qemu_io("disk0", &format!("write -s {} 0 512", table.display()))
        .await;
    vm.qemu_io("disk0", &format!("write -s {} {} {}", ext4.display(), P1.0, P1.1))
        .await;
    if has_vfat {
        vm.qemu_io("disk0", &format!("write -s {} {} {}", vfat.display(), P2.0, P2.1))
            .await;
    }
    write_xfs(vm, work).await;
    has_vfat
}

/// Files put into the vfat partition: path and content. A short name in lower case (stored as an upper-case
/// 8.3 name with a lower-case flag), a long name with spaces, and a file in a directory.
fn vfat_files() -> Vec<(&'static str, Vec<u8>)> {
    let bytes = |len: u32, seed: u32| -> Vec<u8> {
        (0..len)
            .map(|j| (j.wrapping_mul(17).wrapping_add(seed) % 241) as u8)
            .collect()
    };
    vec![
        ("short.bin", bytes(70_001, 1)),
        ("A long name, with spaces.dat", bytes(200_000, 2)),
        ("sub/nested.bin", bytes(4_097, 3)),
    ]
}

/// Puts [`vfat_files`] into the vfat file system image `vfat` with mtools (no root, no mount).
fn fill_vfat(vfat: &Path, work: &Path) {
    let image = format!("{}", vfat.display());
    let mtool = |program: &str, args: &[&str]| {
        let out = Command::new(program)
            .args(["-i", &image])
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("{program}: {e} (install mtools: scripts/setup does)"));
        assert!(
            out.status.success(),
            "{program} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    mtool("mmd", &["::/sub"]);
    for (i, (name, bytes)) in vfat_files().iter().enumerate() {
        let local = work.join(format!("vfat{i}"));
        std::fs::write(&local, bytes).unwrap();
        mtool("mcopy", &[local.to_str().unwrap(), &format!("::/{name}")]);
    }
}

/// Makes an xfs file system holding [`XFS_FILE`] in a sparse file (`mkfs.xfs -p` with a protofile: no root,
/// no mount) and writes only its allocated extents into partition 3 of disk0, so that the disk and its backup
/// stay small.
async fn write_xfs(vm: &TestVm, work: &Path) {
    let known = work.join(XFS_FILE);
    std::fs::write(&known, xfs_file()).unwrap();
    let proto = work.join("xfs.proto");
    std::fs::write(
        &proto,
        format!(
            "/dev/null\n0 0\nd--755 0 0\n{XFS_FILE} ---644 0 0 {}\n$\n$\n",
            known.display()
        ),
    )
    .unwrap();
    let xfs = work.join("p3.xfs");
    std::fs::File::create(&xfs).unwrap().set_len(P3.1).unwrap();
    let made = Command::new("mkfs.xfs")
        .args(["-q", "-L", "qmpbak-p3", "-p"])
        .arg(&proto)
        .arg(&xfs)
        .output();
    match made {
        Ok(out) => assert!(
            out.status.success(),
            "mkfs.xfs: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => panic!("mkfs.xfs: {e} (install xfsprogs: scripts/setup does)"),
    }
    let map: Vec<serde_json::Value> = serde_json::from_str(&image::qemu_img(&[
        "map",
        "--output=json",
        "-f",
        "raw",
        xfs.to_str().unwrap(),
    ]))
    .unwrap();
    let image = std::fs::read(&xfs).unwrap();
    let mut written = 0;
    for (i, extent) in map.iter().filter(|e| e["data"] == true).enumerate() {
        let (start, len) = (
            extent["start"].as_u64().unwrap(),
            extent["length"].as_u64().unwrap(),
        );
        let range = usize::try_from(start).unwrap()..usize::try_from(start + len).unwrap();
        let piece = work.join(format!("p3.extent{i}"));
        std::fs::write(&piece, &image[range]).unwrap();
        vm.qemu_io(
            "disk0",
            &format!("write -s {} {} {len}", piece.display(), P3.0 + start),
        )
        .await;
        written += len;
    }
    assert!(
        written > 0 && written < 16 * MIB,
        "{written} bytes of xfs: {map:?}"
    );
}

fn mount_args(repo: &TestRepo, node: &str, extra: &[&str]) -> Vec<String> {
    repo.vm_args(VM, &[&["mount", node], extra].concat())
}

#[tokio::test]
async fn partitions_are_listed_mounted_read_only_and_read_back_and_umount_leaves_nothing() {
    let vm = TestVm::start(&[("disk0", DISK_SIZE), ("disk1", 8 * MIB)]).await;
    let work = tempfile::tempdir().unwrap();
    let has_vfat = partitioned_disk(&vm, work.path()).await;
    let repo = TestRepo::init();
    let node = repo.backup_node(&vm, VM, &[]);
    let before = checksums(&repo.path());

    // Two disks: which one must be said.
    let ambiguous = cli::run_owned(&mount_args(&repo, &node, &["--list"]));
    assert_eq!(ambiguous.code(), Some(2), "{ambiguous:?}");
    assert!(ambiguous.stderr.contains("--disk"), "{}", ambiguous.stderr);

    let printed = cli::run_owned(&mount_args(
        &repo,
        &node,
        &["--list", "--disk", "disk0", "--json"],
    ))
    .success();
    // The printed shape: the mount report's documented keys (and a partition's), so a renamed field is caught.
    let raw = printed.json();
    cli::assert_keys(
        &raw,
        &[
            "vm",
            "node",
            "disk",
            "mode",
            "dir",
            "image",
            "loop_device",
            "virtual_size",
            "partition_table",
            "partitions",
            "verified",
            "mismatched_blocks",
        ],
    );
    cli::assert_keys(
        &raw["partitions"][0],
        &[
            "number",
            "start",
            "size",
            "part_type",
            "fstype",
            "label",
            "mounted_at",
            "fuse_driver",
            "error",
        ],
    );
    let list: MountReport = printed.report();
    assert_eq!(list.partition_table.as_deref(), Some("dos"), "{list:?}");
    let parts = &list.partitions;
    assert_eq!(parts.len(), 3, "{list:?}");
    assert_eq!((parts[0].number, parts[0].start), (1, P1.0));
    assert_eq!(parts[0].size, P1.1);
    assert_eq!(parts[0].fstype.as_deref(), Some("ext4"));
    assert_eq!(parts[0].label.as_deref(), Some("qmpbak-p1"));
    if has_vfat {
        assert_eq!(parts[1].fstype.as_deref(), Some("vfat"), "{list:?}");
    }
    assert_eq!((parts[2].number, parts[2].start), (3, P3.0));
    assert_eq!(parts[2].size, P3.1);
    assert_eq!(parts[2].fstype.as_deref(), Some("xfs"), "{list:?}");
    assert_eq!(parts[2].label.as_deref(), Some("qmpbak-p3"), "{list:?}");
    let text = cli::run_owned(&mount_args(&repo, &node, &["--list", "--disk", "disk0"]))
        .success()
        .stdout;
    assert!(
        text.contains("partition table: dos")
            && text.contains("p1")
            && text.contains("ext4")
            && text.contains("p3")
            && text.contains("xfs"),
        "{text}"
    );

    if !can_mount() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let _unmount = Unmount(dir.path().to_owned());
    let dir_arg = dir.path().to_str().unwrap();
    let report: MountReport =
        cli::run_owned(&mount_args(&repo, &node, &[dir_arg, "--disk", "disk0", "--json"]))
            .success()
            .report();
    assert!(report.verified, "{report:?}");
    let p1 = dir.path().join("p1");
    assert_eq!(
        report.partitions[0].mounted_at.as_deref(),
        Some(p1.as_path()),
        "{report:?}"
    );
    for (name, bytes) in files() {
        assert!(std::fs::read(p1.join(&name)).unwrap() == bytes, "{name} differs");
    }
    mounts::assert_locked_down(&p1);
    // ext4 shows `noload` as `norecovery`.
    let fs_options = mounts::super_options(&p1).unwrap();
    assert!(fs_options.split(',').any(|o| o == "norecovery"), "{fs_options}");
    assert!(
        std::fs::write(p1.join("new"), b"x").is_err(),
        "the mount is writable"
    );
    // vfat: by the kernel where it has vfat, else through fusefat; read-only either way, every file the same.
    let p2 = dir.path().join("p2");
    if has_vfat {
        let part = &report.partitions[1];
        assert_eq!(part.mounted_at.as_deref(), Some(p2.as_path()), "{report:?}");
        if kernel_knows("vfat") {
            assert!(part.fuse_driver.is_none(), "{report:?}");
        } else {
            eprintln!("this kernel has no vfat: partition 2 is mounted through fusefat");
            assert_eq!(part.fuse_driver.as_deref(), Some("fusefat"), "{report:?}");
            assert!(mounts::fs_type(&p2).unwrap().starts_with("fuse"));
        }
        mounts::assert_locked_down(&p2);
        for (name, bytes) in vfat_files() {
            assert!(
                std::fs::read(p2.join(name)).unwrap() == bytes,
                "{name} differs on vfat"
            );
        }
        assert!(
            std::fs::write(p2.join("new.txt"), b"x").is_err(),
            "the vfat mount is writable"
        );
        assert!(
            std::fs::write(p2.join("short.bin"), b"x").is_err(),
            "a vfat file is writable"
        );
    }
    // xfs: read-only, its log not replayed. Asked after the mount, which loads the kernel's module if it has one.
    let p3 = dir.path().join("p3");
    if kernel_knows("xfs") {
        assert_eq!(
            report.partitions[2].mounted_at.as_deref(),
            Some(p3.as_path()),
            "{report:?}"
        );
        mounts::assert_locked_down(&p3);
        let fs_options = mounts::super_options(&p3).unwrap();
        assert!(
            fs_options.split(',').any(|o| o == "ro") && fs_options.split(',').any(|o| o == "norecovery"),
            "{fs_options}"
        );
        assert!(
            std::fs::read(p3.join(XFS_FILE)).unwrap() == xfs_file(),
            "{XFS_FILE} differs"
        );
        assert!(
            std::fs::write(p3.join("new"), b"x").is_err(),
            "the xfs mount is writable"
        );
    } else {
        eprintln!("this kernel has no xfs: partition 3 is only listed");
        assert!(
            report.partitions[2].error.as_deref().unwrap().contains("xfs"),
            "{report:?}"
        );
        assert!(!p3.exists(), "a directory for a partition that is not mounted");
    }

    // The same directory twice is refused, naming what is there.
    let again = cli::run_owned(&mount_args(&repo, &node, &[dir_arg, "--disk", "disk0"]));
    assert_eq!(again.code(), Some(2), "{again:?}");
    assert!(again.stderr.contains("qmpbak umount"), "{}", again.stderr);

    let out = cli::run(&["umount", dir_arg]).success().stdout;
    assert!(out.contains(&format!("unmounted node {node}")), "{out}");
    assert_nothing_left(dir.path(), &report);
    let twice = cli::run(&["umount", dir_arg]);
    assert_eq!(twice.code(), Some(2), "{twice:?}");

    // The image alone, compared with a restore of the node.
    let image_report = cli::run_owned(&mount_args(
        &repo,
        &node,
        &[dir_arg, "--disk", "disk0", "--image-only", "--json"],
    ))
    .success()
    .report::<MountReport>();
    let img = dir.path().join("disk0.img");
    assert_eq!(image_report.image.as_deref(), Some(img.as_path()));
    let restored = work.path().join("restored.qcow2");
    repo.run(
        VM,
        &[
            "restore",
            &node,
            "--disk",
            "disk0",
            "--to",
            restored.to_str().unwrap(),
        ],
    )
    .success();
    image::compare(&restored, &img).unwrap();
    // Root may open it for writing; every write fails.
    let written = std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .and_then(|mut f| std::io::Write::write_all(&mut f, b"x"));
    assert!(written.is_err(), "the image is writable");
    cli::run(&["umount", dir_arg]).success();
    assert_nothing_left(dir.path(), &image_report);

    assert_eq!(checksums(&repo.path()), before, "the repository changed");
}

#[tokio::test]
async fn a_killed_mount_is_undone_by_umount_and_by_cleanup() {
    if !can_mount() {
        return;
    }
    let vm = TestVm::start(&[("disk0", DISK_SIZE)]).await;
    let work = tempfile::tempdir().unwrap();
    partitioned_disk(&vm, work.path()).await;
    let repo = TestRepo::init();
    let node = repo.backup_node(&vm, VM, &[]);
    let dir = tempfile::tempdir().unwrap();
    let _unmount = Unmount(dir.path().to_owned());
    let dir_arg = dir.path().to_str().unwrap();

    // Killed with the loop device set up: umount finds and undoes it.
    let killed = cli::run_crashing_at(&mount_args(&repo, &node, &[dir_arg]), "mount-loop", CLI_TIMEOUT);
    killed.assert_crashed_at("mount-loop");
    let out = cli::run(&["umount", dir_arg, "--json"]).success();
    // The printed shape: the umount report's documented keys, so a renamed field is caught.
    cli::assert_keys(
        &out.json(),
        &["dir", "vm", "node", "disk", "image", "loop_device", "interrupted"],
    );
    let out: UmountReport = out.report();
    assert!(out.interrupted, "{out:?}");
    assert!(out.loop_device.is_some(), "{out:?}");
    assert_nothing_left(dir.path(), &out);

    // Killed with the export up: `qmpbak cleanup` of the VM undoes it; a new mount of the directory works.
    let killed = cli::run_crashing_at(
        &mount_args(&repo, &node, &[dir_arg]),
        "mount-exported",
        CLI_TIMEOUT,
    );
    killed.assert_crashed_at("mount-exported");
    let cleaned: CleanupReport = repo.run(VM, &["cleanup", "--json"]).success().report();
    assert_eq!(cleaned.mounts[0].dir, Path::new(dir_arg), "{cleaned:?}");
    assert_nothing_left(dir.path(), &cleaned.mounts[0]);

    // Killed again, then mounted again: the interrupted mount is undone first.
    let killed = cli::run_crashing_at(&mount_args(&repo, &node, &[dir_arg]), "mount-loop", CLI_TIMEOUT);
    killed.assert_crashed_at("mount-loop");
    let report: MountReport = cli::run_owned(&mount_args(&repo, &node, &[dir_arg, "--json"]))
        .success()
        .report();
    assert!(dir.path().join("p1/file0.bin").exists(), "{report:?}");
    cli::run(&["umount", dir_arg]).success();
    assert_nothing_left(dir.path(), &report);

    if kernel_knows("vfat") {
        eprintln!("this kernel has vfat: fusefat's teardown is not tried");
    } else {
        // Killed with fusefat serving partition 2 before it was recorded: found by its source and undone.
        let killed = cli::run_crashing_at(
            &mount_args(&repo, &node, &[dir_arg]),
            "mount-fuse-driver",
            CLI_TIMEOUT,
        );
        killed.assert_crashed_at("mount-fuse-driver");
        assert_eq!(fuse_drivers_under(dir.path()).len(), 1);
        let out: UmountReport = cli::run(&["umount", dir_arg, "--json"]).success().report();
        assert!(out.interrupted, "{out:?}");
        assert_nothing_left(dir.path(), &out);
        assert!(fuse_drivers_under(dir.path()).is_empty());

        // fusefat killed under a complete mount: its dead mount is unmounted all the same.
        let report: MountReport = cli::run_owned(&mount_args(&repo, &node, &[dir_arg, "--json"]))
            .success()
            .report();
        let drivers = fuse_drivers_under(dir.path());
        assert_eq!(drivers.len(), 1, "{report:?}");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(drivers[0]),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        cli::run(&["umount", dir_arg]).success();
        assert_nothing_left(dir.path(), &report);
        assert!(fuse_drivers_under(dir.path()).is_empty());
    }

    // A file of the user's where the image would go is refused and left alone.
    let mine = dir.path().join("disk0.img");
    std::fs::write(&mine, b"mine").unwrap();
    let refused = cli::run_owned(&mount_args(&repo, &node, &[dir_arg, "--image-only"]));
    assert!(!refused.status.success(), "{refused:?}");
    assert_eq!(std::fs::read(&mine).unwrap(), b"mine");
}

#[tokio::test]
async fn a_damaged_node_is_refused_unless_forced() {
    if !can_mount() {
        return;
    }
    let vm = TestVm::start(&[("disk0", DISK_SIZE)]).await;
    let work = tempfile::tempdir().unwrap();
    partitioned_disk(&vm, work.path()).await;
    let repo = TestRepo::init();
    let node = repo.backup_node(&vm, VM, &[]);
    flip_a_data_byte(&repo.node_file(VM, &node, "disk0"));
    let dir = tempfile::tempdir().unwrap();
    let _unmount = Unmount(dir.path().to_owned());
    let dir_arg = dir.path().to_str().unwrap();

    let refused = cli::run_owned(&mount_args(&repo, &node, &[dir_arg]));
    assert_eq!(refused.code(), Some(6), "{refused:?}");
    assert!(
        refused.stderr.contains("--force") && refused.stderr.contains("damaged"),
        "{}",
        refused.stderr
    );
    assert!(mounts::mounts_under(dir.path()).is_empty());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);

    let forced = cli::run_owned(&mount_args(&repo, &node, &[dir_arg, "--force", "--json"]));
    let report: MountReport = forced.success().report();
    assert!(!report.verified, "{report:?}");
    assert!(!report.mismatched_blocks.is_empty());
    cli::run(&["umount", dir_arg]).success();
    assert_nothing_left(dir.path(), &report);
}

/// The pids of the processes whose command line names `path`.
fn processes_naming(path: &Path) -> Vec<i32> {
    let needle = path.to_str().unwrap();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|entry| {
            let pid: i32 = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            String::from_utf8_lossy(&cmdline).contains(needle).then_some(pid)
        })
        .collect()
}

/// The pids of the fusefat processes serving a mount under `dir` (their last argument).
fn fuse_drivers_under(dir: &Path) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|entry| {
            let pid: i32 = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let args: Vec<String> = cmdline
                .split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            let under = args.last().is_some_and(|t| Path::new(t).starts_with(dir));
            (args.first()?.ends_with("fusefat") && under).then_some(pid)
        })
        .collect()
}

/// Whether the running kernel can mount file systems of type `fstype`.
fn kernel_knows(fstype: &str) -> bool {
    std::fs::read_to_string("/proc/filesystems")
        .unwrap()
        .lines()
        .any(|l| l.split_whitespace().last() == Some(fstype))
}

/// Flips one byte of guest data inside `file` (its first data cluster).
fn flip_a_data_byte(file: &Path) {
    let spec = format!(
        "json:{{\"driver\":\"qcow2\",\"file\":{{\"driver\":\"file\",\"filename\":\"{}\"}},\"backing\":null}}",
        file.display()
    );
    let map: Vec<serde_json::Value> =
        serde_json::from_str(&image::qemu_img(&["map", "--output=json", "-U", &spec])).unwrap();
    let extent = map.iter().find(|e| e["data"] == true).expect("a data extent");
    let host = extent["offset"].as_u64().unwrap() + 100;
    let mut bytes = std::fs::read(file).unwrap();
    bytes[host as usize] ^= 0xff;
    std::fs::write(file, bytes).unwrap();
}

#[test]
fn without_root_mount_says_so_and_offers_image_only() {
    if !nix::unistd::geteuid().is_root() {
        let out = cli::run(&["mount", "0001", "/tmp", "--repo", "/nonexistent", "--vm", "vm1"]);
        assert_eq!(out.code(), Some(2), "{out:?}");
        assert!(
            out.stderr.contains("root") && out.stderr.contains("--image-only"),
            "{}",
            out.stderr
        );
        return;
    }
    // As root: run it as nobody.
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(cli::qmpbak_bin())
        .args(["mount", "0001", "/tmp", "--repo", "/nonexistent", "--vm", "vm1"])
        .env_remove("XDG_RUNTIME_DIR")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if matches!(out.status.code(), Some(126 | 127)) {
        eprintln!(
            "nobody cannot run {}: not checked ({stderr})",
            cli::qmpbak_bin().display()
        );
        return;
    }
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("needs root") && stderr.contains("--image-only"),
        "{stderr}"
    );
}

/// The unprivileged user the image-only test runs qmpbak as.
const NOBODY: u32 = 65534;

/// A command that runs `program` as [`NOBODY`] (no supplementary groups) with `home` as its home, no session
/// runtime directory (so qmpbak keeps its mount records in `home/.cache`), and the rest of this environment
/// (`PATH`, `QMPBAK_QEMU_PREFIX`).
fn as_nobody(home: &Path, program: &Path) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.arg(format!("--reuid={NOBODY}"))
        .arg(format!("--regid={NOBODY}"))
        .args(["--clear-groups", "--"])
        .arg(program)
        .env("HOME", home)
        .env_remove("XDG_RUNTIME_DIR")
        .env_remove("XDG_CACHE_HOME")
        .stdin(std::process::Stdio::null());
    cmd
}

/// Runs `cmd` within [`CLI_TIMEOUT`].
fn output(cmd: &mut Command) -> cli::Output {
    cmd.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    cli::wait(cmd.spawn().unwrap(), CLI_TIMEOUT)
}

/// Runs `qmpbak umount DIR` as [`NOBODY`] when dropped (see [`Unmount`]).
struct UnmountAsNobody {
    home: std::path::PathBuf,
    dir: std::path::PathBuf,
}

impl Drop for UnmountAsNobody {
    fn drop(&mut self) {
        let _ = as_nobody(&self.home, &cli::qmpbak_bin())
            .arg("umount")
            .arg(&self.dir)
            .output();
    }
}

fn chown_nobody(path: &Path) {
    run_ok(
        Command::new("chown")
            .args(["-R", &format!("{NOBODY}:{NOBODY}")])
            .arg(path),
    );
}

#[tokio::test]
async fn image_only_works_for_a_user_without_root() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("not root: cannot make an unprivileged user's repository to test with; not checked");
        return;
    }
    let fuse = Path::new("/dev/fuse");
    if !fuse.exists() {
        eprintln!("skipped: /dev/fuse is absent, so no FUSE export can be made (load the fuse module)");
        return;
    }
    let fuse_mode = std::fs::metadata(fuse).unwrap().permissions().mode();
    assert!(
        fuse_mode & 0o006 == 0o006,
        "/dev/fuse is {:o}: users other than root cannot use FUSE (udev makes it 0666; scripts/setup does \
         where there is no udev)",
        fuse_mode & 0o777
    );
    assert!(
        Path::new("/usr/bin/fusermount3").exists() || Path::new("/bin/fusermount3").exists(),
        "fusermount3 is missing: install fuse3 (scripts/setup does)"
    );

    let vm = TestVm::start(&[("disk0", 16 * MIB)]).await;
    vm.write_pattern("disk0", 0x5a, 0, 3 * MIB).await;
    vm.write_pattern("disk0", 0xc3, 9 * MIB + 4096, 1500 * 1024).await;
    // Everything the user touches lives in one directory it can reach: a home, the repository, a reference
    // of the disk, the mount point.
    let work = tempfile::tempdir().unwrap();
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let home = work.path().join("home");
    let mnt = work.path().join("mnt");
    let repo_path = work.path().join("repo");
    for d in [&home, &mnt] {
        std::fs::create_dir(d).unwrap();
    }
    cli::run(&["init", repo_path.to_str().unwrap()]).success();
    let repo = TestRepo::at(repo_path);
    let node = repo.backup_node(&vm, VM, &[]);
    let reference = work.path().join("ref.qcow2");
    vm.capture_reference("disk0", &reference).await;
    for p in [&home, &mnt, &repo.path(), &reference] {
        chown_nobody(p);
    }
    let before = checksums(&repo.path());
    let qmpbak = cli::qmpbak_bin();
    let nobody = |args: &[String]| output(as_nobody(&home, &qmpbak).args(args));
    let mnt_arg = mnt.to_str().unwrap();

    // Mounting file systems needs root: said so, with the way that does not.
    let refused = nobody(&mount_args(&repo, &node, &[mnt_arg]));
    assert_eq!(refused.code(), Some(2), "{refused:?}");
    assert!(
        refused.stderr.contains("needs root") && refused.stderr.contains("--image-only"),
        "{}",
        refused.stderr
    );
    // Listing needs none.
    let list: MountReport = nobody(&mount_args(&repo, &node, &["--list", "--json"]))
        .success()
        .report();
    assert_eq!(list.virtual_size, 16 * MIB, "{list:?}");

    let _unmount = UnmountAsNobody {
        home: home.clone(),
        dir: mnt.clone(),
    };
    let report: MountReport = nobody(&mount_args(&repo, &node, &[mnt_arg, "--image-only", "--json"]))
        .success()
        .report();
    assert!(report.verified, "{report:?}");
    let img = mnt.join("disk0.img");
    assert_eq!(report.image.as_deref(), Some(img.as_path()), "{report:?}");
    // The user's own private place holds the record.
    let records = home.join(".cache/qmpbak/mounts");
    for d in [home.join(".cache/qmpbak"), records.clone()] {
        let meta = std::fs::metadata(&d).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o700, "{}", d.display());
        assert_eq!(meta.uid(), NOBODY, "{}", d.display());
    }
    assert_eq!(std::fs::read_dir(&records).unwrap().count(), 1);

    // The image is the node's disk, byte for byte (read as the user: the FUSE export is theirs alone).
    let img_tool = integration_tests::qemu::QemuBinaries::from_env().img;
    let same = output(
        as_nobody(&home, &img_tool)
            .args(["compare", "-U", "-f", "raw", "-F", "qcow2"])
            .arg(&img)
            .arg(&reference),
    );
    assert!(same.status.success(), "{same:?}");
    // Read-only: the user cannot write it, not even its first byte.
    let written = output(
        as_nobody(&home, Path::new("/usr/bin/dd"))
            .args(["if=/dev/zero", "bs=512", "count=1", "conv=notrunc,fsync"])
            .arg(format!("of={}", img.display())),
    );
    assert!(!written.status.success(), "the image is writable: {written:?}");
    let same = output(
        as_nobody(&home, &img_tool)
            .args(["compare", "-U", "-f", "raw", "-F", "qcow2"])
            .arg(&img)
            .arg(&reference),
    );
    assert!(same.status.success(), "{same:?}");

    let out = nobody(&["umount".to_owned(), mnt_arg.to_owned()])
        .success()
        .stdout;
    assert!(out.contains(&format!("unmounted node {node}")), "{out}");
    assert_nothing_left(&mnt, &report);
    assert_eq!(std::fs::read_dir(&records).unwrap().count(), 0);

    // Killed with the export up: `qmpbak cleanup` run by the user finds the record in its place and undoes it.
    let killed = output(
        as_nobody(&home, &qmpbak)
            .args(mount_args(&repo, &node, &[mnt_arg, "--image-only"]))
            .env("QMPBAK_CRASH_AT", "mount-exported"),
    );
    killed.assert_crashed_at("mount-exported");
    let cleaned: CleanupReport = nobody(&repo.vm_args(VM, &["cleanup", "--json"]))
        .success()
        .report();
    assert_eq!(cleaned.mounts[0].dir, Path::new(mnt_arg), "{cleaned:?}");
    assert_nothing_left(&mnt, &cleaned.mounts[0]);
    assert_eq!(std::fs::read_dir(&records).unwrap().count(), 0);

    // The storage daemon SIGKILLed: its FUSE mount is left dangling, and the user's umount (which cannot
    // umount(2)) takes it off with fusermount3.
    let report: MountReport = nobody(&mount_args(&repo, &node, &[mnt_arg, "--image-only", "--json"]))
        .success()
        .report();
    let daemons = processes_naming(&img);
    assert_eq!(daemons.len(), 1, "{report:?}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemons[0]),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    nobody(&["umount".to_owned(), mnt_arg.to_owned()]).success();
    assert_nothing_left(&mnt, &report);
    assert_eq!(std::fs::read_dir(&records).unwrap().count(), 0);

    // A complete mount whose export went away (its daemon stopped, as a restart would) is stale: a new mount
    // of the directory undoes its record and its leftover image file first.
    nobody(&mount_args(&repo, &node, &[mnt_arg, "--image-only"])).success();
    let daemons = processes_naming(&img);
    assert_eq!(daemons.len(), 1);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemons[0]),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let deadline = std::time::Instant::now() + PROCESS_EXIT_TIMEOUT;
    while !processes_naming(&img).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "qemu-storage-daemon did not exit on SIGTERM within {PROCESS_EXIT_TIMEOUT:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(mounts::mounts_under(&mnt).is_empty());
    let report: MountReport = nobody(&mount_args(&repo, &node, &[mnt_arg, "--image-only", "--json"]))
        .success()
        .report();
    let same = output(
        as_nobody(&home, &img_tool)
            .args(["compare", "-U", "-f", "raw", "-F", "qcow2"])
            .arg(&img)
            .arg(&reference),
    );
    assert!(same.status.success(), "{same:?}");
    nobody(&["umount".to_owned(), mnt_arg.to_owned()]).success();
    assert_nothing_left(&mnt, &report);
    assert_eq!(std::fs::read_dir(&records).unwrap().count(), 0);

    assert_eq!(checksums(&repo.path()), before, "the repository changed");
}
