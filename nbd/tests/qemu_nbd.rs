//! The client against real QEMU NBD servers (qemu-nbd, qemu-storage-daemon): images get known patterns
//! written with qemu-io, are exported, and what the client reads and reports is compared with what was
//! written and with `qemu-img map`.

mod common;

use std::time::Instant;

use common::{CLOSE_TIMEOUT, Image, KIB, MIB, NbdServer, merged, pattern};
use nbd::{BlockingClient, Command, Error, Extent};

#[tokio::test]
async fn handshake_reports_size_and_capabilities() {
    let image = Image::create(16 * MIB);
    let server = NbdServer::qemu_nbd(&image, "disk", &[]);
    let client = server.connect("disk").await;
    assert_eq!(client.size(), 16 * MIB);
    assert!(!client.read_only());
    assert!(client.block_status_supported());
    assert!(client.preferred_block_size().is_some_and(u32::is_power_of_two));
    client.disconnect().await.unwrap();
}

#[tokio::test]
async fn reads_the_written_pattern_and_zeroes_elsewhere() {
    let image = Image::create(16 * MIB);
    image.write_pattern(0x5a, MIB, 64 * KIB);
    let server = NbdServer::qemu_nbd(&image, "disk", &[]);
    let client = server.connect("disk").await;

    let mut buf = vec![0u8; 64 * KIB as usize];
    client.read(MIB, &mut buf).await.unwrap();
    assert!(buf.iter().all(|&b| b == 0x5a));

    // Straddling the written area: zeroes, pattern, zeroes; odd offsets and lengths.
    let mut buf = vec![0xffu8; 100_000];
    let start = MIB - 1000;
    client.read(start, &mut buf).await.unwrap();
    for (i, &b) in buf.iter().enumerate() {
        let at = start + i as u64;
        let want = if (MIB..MIB + 64 * KIB).contains(&at) {
            0x5a
        } else {
            0
        };
        assert_eq!(b, want, "byte at {at}");
    }

    let mut buf = vec![0xffu8; 4096];
    client.read(10 * MIB + 7, &mut buf).await.unwrap();
    assert!(buf.iter().all(|&b| b == 0));
}

#[tokio::test]
async fn a_read_larger_than_the_max_payload_is_split() {
    let image = Image::create(64 * MIB);
    image.qemu_io(&[
        format!("write -P 0x11 {MIB} 64k"),
        format!("write -P 0x22 {} 64k", 40 * MIB),
    ]);
    let server = NbdServer::qemu_nbd(&image, "disk", &[]);
    let client = server.connect("disk").await;
    let mut buf = vec![0xffu8; 48 * MIB as usize];
    client.read(0, &mut buf).await.unwrap();
    for (i, &b) in buf.iter().enumerate() {
        let at = i as u64;
        let want = match at {
            _ if (MIB..MIB + 64 * KIB).contains(&at) => 0x11,
            _ if (40 * MIB..40 * MIB + 64 * KIB).contains(&at) => 0x22,
            _ => 0,
        };
        assert_eq!(b, want, "byte at {at}");
    }
}

#[tokio::test]
async fn block_status_matches_qemu_img_map() {
    let image = Image::create(16 * MIB);
    image.qemu_io(&[
        format!("write -P 0x5a {MIB} 64k"),
        format!("write -P 0xa5 {} 192k", 3 * MIB + 64 * KIB),
        format!("write -z {} 128k", 8 * MIB),
        format!("write -P 0x01 {} 64k", 16 * MIB - 64 * KIB),
    ]);
    let expected = image.map();
    let server = NbdServer::qemu_nbd(&image, "disk", &[]);
    let client = server.connect("disk").await;

    let extents = client.block_status(0, client.size()).await.unwrap();
    assert_eq!(merged(extents.iter().copied()), expected);
    assert!(extents.contains(&Extent {
        offset: MIB,
        len: 64 * KIB,
        hole: false,
        zero: false
    }));

    // A sub-range is clipped to exactly what was asked.
    let sub = client.block_status(MIB - 100, 64 * KIB + 200).await.unwrap();
    assert_eq!(
        sub,
        vec![
            Extent {
                offset: MIB - 100,
                len: 100,
                hole: true,
                zero: true
            },
            Extent {
                offset: MIB,
                len: 64 * KIB,
                hole: false,
                zero: false
            },
            Extent {
                offset: MIB + 64 * KIB,
                len: 100,
                hole: true,
                zero: true
            },
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_concurrent_reads_from_many_tasks_get_their_own_data() {
    let image = Image::create(32 * MIB);
    let commands: Vec<String> = (0..32u64)
        .map(|i| format!("write -P {:#x} {} 64k", i + 1, i * MIB + 4 * KIB))
        .collect();
    image.qemu_io(&commands);
    let server = NbdServer::qemu_nbd(&image, "disk", &[]);
    let client = server.connect("disk").await;

    let tasks: Vec<_> = (0..32u64)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 72 * KIB as usize];
                client.read(i * MIB, &mut buf).await.map(|()| buf)
            })
        })
        .collect();
    for (i, task) in tasks.into_iter().enumerate() {
        let buf = task.await.unwrap().unwrap();
        let want = i as u8 + 1;
        assert!(
            buf[..4 * KIB as usize].iter().all(|&b| b == 0),
            "read {i}: leading zeroes"
        );
        assert!(
            buf[4 * KIB as usize..68 * KIB as usize]
                .iter()
                .all(|&b| b == want),
            "read {i}: pattern"
        );
        assert!(
            buf[68 * KIB as usize..].iter().all(|&b| b == 0),
            "read {i}: trailing zeroes"
        );
    }
}

#[tokio::test]
async fn writes_read_back_and_zeroes_and_trim_work() {
    let image = Image::create(16 * MIB);
    let server = NbdServer::qemu_nbd(&image, "disk", &["--discard=unmap"]);
    let client = server.connect("disk").await;

    let data = pattern(7, MIB as usize);
    client.write(2 * MIB, &data, false).await.unwrap();
    client
        .write(5 * MIB, &vec![0x5a; 64 * KIB as usize], true)
        .await
        .unwrap();
    client.flush().await.unwrap();
    let mut back = vec![0u8; MIB as usize];
    client.read(2 * MIB, &mut back).await.unwrap();
    assert!(back == data, "written data did not read back");

    client.write_zeroes(2 * MIB, 64 * KIB, false).await.unwrap();
    client
        .write_zeroes(2 * MIB + 128 * KIB, 64 * KIB, true)
        .await
        .unwrap();
    client.read(2 * MIB, &mut back).await.unwrap();
    assert!(back[..64 * KIB as usize].iter().all(|&b| b == 0));
    assert_eq!(
        back[64 * KIB as usize..128 * KIB as usize],
        data[64 * KIB as usize..128 * KIB as usize]
    );
    assert!(
        back[128 * KIB as usize..192 * KIB as usize]
            .iter()
            .all(|&b| b == 0)
    );
    assert_eq!(back[192 * KIB as usize..], data[192 * KIB as usize..]);
    let status = client.block_status(2 * MIB, 64 * KIB).await.unwrap();
    assert!(status.iter().all(|e| e.zero), "{status:?}");

    client.trim(3 * MIB - 64 * KIB, 64 * KIB).await.unwrap();
    client.flush().await.unwrap();
    // Trimmed content is undefined; the rest is untouched.
    client.read(2 * MIB, &mut back).await.unwrap();
    assert_eq!(
        back[192 * KIB as usize..MIB as usize - 64 * KIB as usize],
        data[192 * KIB as usize..MIB as usize - 64 * KIB as usize]
    );

    client.disconnect().await.unwrap();
    drop(server);
    // What was written is in the image file.
    image.qemu_io(&[
        format!("read -P 0x5a {} 64k", 5 * MIB),
        format!("read -P 0 {} 64k", 2 * MIB),
    ]);
}

#[tokio::test]
async fn a_wrong_export_name_is_named_in_the_error() {
    let image = Image::create(MIB);
    let server = NbdServer::qemu_nbd(&image, "disk", &[]);
    let err = server.try_connect("no-such-disk").await.unwrap_err();
    match &err {
        Error::ExportNotFound { name, available } => {
            assert_eq!(name, "no-such-disk");
            assert_eq!(available, &["disk"]);
        }
        other => panic!("expected ExportNotFound, got {other:?}"),
    }
    let message = err.to_string();
    assert!(
        message.contains("no-such-disk") && message.contains("disk"),
        "{message}"
    );
    // The server is still fine for the right name.
    server.connect("disk").await.disconnect().await.unwrap();
}

#[tokio::test]
async fn reading_past_the_end_is_out_of_range_and_harmless() {
    let image = Image::create(MIB);
    let server = NbdServer::qemu_nbd(&image, "disk", &[]);
    let client = server.connect("disk").await;
    let err = client.read(MIB - 100, &mut [0u8; 101]).await.unwrap_err();
    assert!(
        matches!(err, Error::OutOfRange { offset, len: 101, size } if offset == MIB - 100 && size == MIB)
    );
    assert!(matches!(
        client.read(u64::MAX, &mut [0u8; 2]).await.unwrap_err(),
        Error::OutOfRange { .. }
    ));
    assert!(matches!(
        client.block_status(MIB, 1).await.unwrap_err(),
        Error::OutOfRange { .. }
    ));
    // Nothing was sent, so the connection is as good as before.
    let mut buf = [1u8; 100];
    client.read(MIB - 100, &mut buf).await.unwrap();
    assert_eq!(buf, [0u8; 100]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_server_fails_pending_and_later_requests_with_closed() {
    let image = Image::create(64 * MIB);
    image.write_pattern(0x33, 0, 16 * MIB);
    let mut server = NbdServer::qemu_nbd(&image, "disk", &[]);
    let client = server.connect("disk").await;

    let readers: Vec<_> = (0..4u64)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4 * MIB as usize];
                loop {
                    if let Err(e) = client.read(i * 4 * MIB, &mut buf).await {
                        return e;
                    }
                }
            })
        })
        .collect();
    // Requests are flowing once one more read gets through.
    client.read(0, &mut [0u8; 4096]).await.unwrap();
    server.kill();

    for reader in readers {
        let err = tokio::time::timeout(CLOSE_TIMEOUT, reader)
            .await
            .expect("pending read hung")
            .unwrap();
        assert_gone(&err);
    }
    let started = Instant::now();
    let err = client.read(0, &mut [0u8; 512]).await.unwrap_err();
    assert_gone(&err);
    assert!(started.elapsed() < CLOSE_TIMEOUT);
    assert_gone(&client.flush().await.unwrap_err());
}

/// A killed server ends the connection in one of two ways, both "gone": an end of file, or (when the kernel
/// closed the server's socket with requests still unread in it, as Linux does) a reset.
fn assert_gone(err: &Error) {
    match err {
        Error::Closed => {}
        Error::Broken { detail } if detail.contains("reset") => {}
        other => panic!("expected the connection to be gone, got {other:?}"),
    }
    assert_eq!(err.kind(), nbd::ErrorKind::Closed);
}

#[tokio::test]
async fn a_read_only_export_refuses_writes_clearly() {
    let image = Image::create(MIB);
    image.write_pattern(0x42, 0, 4096);
    let server = NbdServer::qemu_nbd(&image, "disk", &["--read-only"]);
    let client = server.connect("disk").await;
    assert!(client.read_only());
    let err = client.write(0, &[0u8; 4096], false).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::ReadOnly {
                command: Command::Write
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("read-only"), "{err}");
    assert!(matches!(
        client.write_zeroes(0, 4096, true).await.unwrap_err(),
        Error::ReadOnly { .. }
    ));
    assert!(matches!(
        client.trim(0, 4096).await.unwrap_err(),
        Error::ReadOnly { .. }
    ));
    let mut buf = [0u8; 4096];
    client.read(0, &mut buf).await.unwrap();
    assert!(buf.iter().all(|&b| b == 0x42));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_blocking_client_serves_plain_threads() {
    let image = Image::create(8 * MIB);
    let commands: Vec<String> = (0..4u64)
        .map(|i| format!("write -P {:#x} {} 1M", 0x10 + i, 2 * i * MIB))
        .collect();
    image.qemu_io(&commands);
    let server = NbdServer::qemu_nbd(&image, "disk", &[]);
    let client = server.connect("disk").await;
    let blocking = BlockingClient::new(client, tokio::runtime::Handle::current());

    tokio::task::spawn_blocking(move || {
        std::thread::scope(|s| {
            for i in 0..4u64 {
                let blocking = blocking.clone();
                s.spawn(move || {
                    let extents = blocking.extents(2 * i * MIB, 2 * MIB).unwrap();
                    assert_eq!(
                        extents[0],
                        Extent {
                            offset: 2 * i * MIB,
                            len: MIB,
                            hole: false,
                            zero: false
                        }
                    );
                    let mut buf = vec![0u8; MIB as usize];
                    blocking.read_at(2 * i * MIB, &mut buf).unwrap();
                    assert!(buf.iter().all(|&b| b == 0x10 + i as u8));
                });
            }
        });
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn qemu_storage_daemon_over_tcp() {
    let image = Image::create(16 * MIB);
    image.write_pattern(0x77, 5 * MIB, 128 * KIB);
    let expected = image.map();
    let server = NbdServer::storage_daemon_tcp(&image, "disk0");
    let client = server.connect("disk0").await;
    assert_eq!(client.size(), 16 * MIB);
    assert!(!client.read_only());
    assert_eq!(
        merged(client.block_status(0, client.size()).await.unwrap()),
        expected
    );
    let mut buf = vec![0u8; 128 * KIB as usize];
    client.read(5 * MIB, &mut buf).await.unwrap();
    assert!(buf.iter().all(|&b| b == 0x77));
    let data = pattern(3, 64 * KIB as usize);
    client.write(6 * MIB, &data, true).await.unwrap();
    let mut back = vec![0u8; data.len()];
    client.read(6 * MIB, &mut back).await.unwrap();
    assert!(back == data);
    client.disconnect().await.unwrap();
}
