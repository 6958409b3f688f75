//! `qmpbak mount`: a node's partitioned disk (an MBR with ext4, vfat and xfs written as guest writes, backed up
//! from a real QEMU) is listed, mounted read-only partition by partition (ext4 with `noload`, xfs with
//! `norecovery`) and read back byte for byte, and exported
//! as an image file; `umount` leaves nothing behind, also after a killed mount (as `cleanup` does), nothing in
//! the repository changes, a damaged node is refused unless `--force`, and without root qmpbak says what to do.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

use integration_tests::mounts::{self, Unmount, assert_nothing_left, can_mount, checksums};
use integration_tests::repo::TestRepo;
use integration_tests::timeouts::CLI_TIMEOUT;
use integration_tests::{MIB, TestVm, cli, image};

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
    if !has_vfat {
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

    let list = cli::run_owned(&mount_args(
        &repo,
        &node,
        &["--list", "--disk", "disk0", "--json"],
    ))
    .success()
    .json();
    assert_eq!(list["partition_table"], "dos", "{list}");
    let parts = list["partitions"].as_array().unwrap();
    assert_eq!(parts.len(), 3, "{list}");
    assert_eq!(
        (parts[0]["number"].as_u64(), parts[0]["start"].as_u64()),
        (Some(1), Some(P1.0))
    );
    assert_eq!(parts[0]["size"], P1.1);
    assert_eq!(parts[0]["fstype"], "ext4");
    assert_eq!(parts[0]["label"], "qmpbak-p1");
    if has_vfat {
        assert_eq!(parts[1]["fstype"], "vfat", "{list}");
    }
    assert_eq!(
        (parts[2]["number"].as_u64(), parts[2]["start"].as_u64()),
        (Some(3), Some(P3.0))
    );
    assert_eq!(parts[2]["size"], P3.1);
    assert_eq!(parts[2]["fstype"], "xfs", "{list}");
    assert_eq!(parts[2]["label"], "qmpbak-p3", "{list}");
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
    let report = cli::run_owned(&mount_args(&repo, &node, &[dir_arg, "--disk", "disk0", "--json"]))
        .success()
        .json();
    assert_eq!(report["verified"], true, "{report}");
    let p1 = dir.path().join("p1");
    assert_eq!(
        report["partitions"][0]["mounted_at"],
        p1.to_str().unwrap(),
        "{report}"
    );
    for (name, bytes) in files() {
        assert!(std::fs::read(p1.join(&name)).unwrap() == bytes, "{name} differs");
    }
    let options = mounts::mount_options(&p1).unwrap();
    assert!(options.split(',').any(|o| o == "ro"), "{options}");
    // ext4 shows `noload` as `norecovery`.
    let fs_options = mounts::super_options(&p1).unwrap();
    assert!(fs_options.split(',').any(|o| o == "norecovery"), "{fs_options}");
    assert!(
        std::fs::write(p1.join("new"), b"x").is_err(),
        "the mount is writable"
    );
    let p2 = dir.path().join("p2");
    if has_vfat && kernel_knows("vfat") {
        assert_eq!(
            report["partitions"][1]["mounted_at"],
            p2.to_str().unwrap(),
            "{report}"
        );
        assert!(mounts::mount_options(&p2).unwrap().split(',').any(|o| o == "ro"));
    } else if has_vfat {
        // A file system the kernel cannot mount is reported, and the others are mounted all the same.
        eprintln!("this kernel has no vfat: partition 2 is only listed");
        assert!(
            report["partitions"][1]["error"]
                .as_str()
                .unwrap()
                .contains("vfat"),
            "{report}"
        );
        assert!(!p2.exists(), "a directory for a partition that is not mounted");
    }
    // xfs: read-only, its log not replayed. Asked after the mount, which loads the kernel's module if it has one.
    let p3 = dir.path().join("p3");
    if kernel_knows("xfs") {
        assert_eq!(
            report["partitions"][2]["mounted_at"],
            p3.to_str().unwrap(),
            "{report}"
        );
        let options = mounts::mount_options(&p3).unwrap();
        assert!(options.split(',').any(|o| o == "ro"), "{options}");
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
            report["partitions"][2]["error"].as_str().unwrap().contains("xfs"),
            "{report}"
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
    .json();
    let img = dir.path().join("disk0.img");
    assert_eq!(image_report["image"], img.to_str().unwrap());
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
    let out = cli::run(&["umount", dir_arg, "--json"]).success().json();
    assert_eq!(out["interrupted"], true, "{out}");
    assert!(out["loop_device"].is_string(), "{out}");
    assert_nothing_left(dir.path(), &out);

    // Killed with the export up: `qmpbak cleanup` of the VM undoes it; a new mount of the directory works.
    let killed = cli::run_crashing_at(
        &mount_args(&repo, &node, &[dir_arg]),
        "mount-exported",
        CLI_TIMEOUT,
    );
    killed.assert_crashed_at("mount-exported");
    let cleaned = repo.run(VM, &["cleanup", "--json"]).success().json();
    assert_eq!(cleaned["mounts"][0]["dir"], dir_arg, "{cleaned}");
    assert_nothing_left(dir.path(), &cleaned["mounts"][0]);

    // Killed again, then mounted again: the interrupted mount is undone first.
    let killed = cli::run_crashing_at(&mount_args(&repo, &node, &[dir_arg]), "mount-loop", CLI_TIMEOUT);
    killed.assert_crashed_at("mount-loop");
    let report = cli::run_owned(&mount_args(&repo, &node, &[dir_arg, "--json"]))
        .success()
        .json();
    assert!(dir.path().join("p1/file0.bin").exists(), "{report}");
    cli::run(&["umount", dir_arg]).success();
    assert_nothing_left(dir.path(), &report);

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
    let report = forced.success().json();
    assert_eq!(report["verified"], false, "{report}");
    assert!(!report["mismatched_blocks"].as_array().unwrap().is_empty());
    cli::run(&["umount", dir_arg]).success();
    assert_nothing_left(dir.path(), &report);
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
