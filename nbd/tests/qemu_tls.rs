//! NBD over TLS and metadata contexts beyond `base:allocation`, against a real qemu-storage-daemon: x509
//! credentials made in the test with rcgen (a CA, server and client certificates, a second CA, an expired
//! server certificate) in QEMU's `tls-creds-x509` layout, an NBD server on 127.0.0.1 with
//! `tls-creds` and `verify-peer=on`, and an image with known patterns and a persistent dirty bitmap. Reads
//! are compared with the image's bytes (`qemu-img convert`), block status with `qemu-img map`, the
//! bitmap with the ranges written after it was added; every TLS failure is a typed error before any data.

mod common;

use std::fs;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{CONNECT_TIMEOUT, Image, KIB, MIB, NbdServer, qemu_bin, run};
use nbd::{Client, ConnectOptions, ContextExtent, Error, ErrorKind, TlsCredentials, TlsFailure};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
    SanType,
};
use tempfile::TempDir;

const EXPORT: &str = "disk";
const BITMAP: &str = "bm0";

/// A CA that signs server and client certificates.
struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).expect("self-sign the CA");
        Ca { cert, key }
    }

    /// A certificate and key for 127.0.0.1 and localhost, for a server or a client, valid now unless
    /// `expired` (then its validity ended in 2021).
    fn issue(&self, purpose: ExtendedKeyUsagePurpose, expired: bool) -> (String, String) {
        let key = KeyPair::generate().expect("leaf key");
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).expect("leaf params");
        params
            .subject_alt_names
            .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        params.distinguished_name.push(DnType::CommonName, "localhost");
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![purpose];
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .expect("sign the leaf");
        (cert.pem(), key.serialize_pem())
    }
}

/// Credential directories in QEMU's layout, in a temp dir.
struct Pki {
    dir: TempDir,
}

impl Pki {
    fn new() -> Pki {
        let pki = Pki {
            dir: tempfile::tempdir().expect("pki temp dir"),
        };
        let ca = Ca::new("qmpbak test CA");
        let other_ca = Ca::new("some other CA");
        let (server_cert, server_key) = ca.issue(ExtendedKeyUsagePurpose::ServerAuth, false);
        let (old_cert, old_key) = ca.issue(ExtendedKeyUsagePurpose::ServerAuth, true);
        let (client_cert, client_key) = ca.issue(ExtendedKeyUsagePurpose::ClientAuth, false);
        let (stranger_cert, stranger_key) = other_ca.issue(ExtendedKeyUsagePurpose::ClientAuth, false);
        let ca_pem = ca.cert.pem();
        pki.write(
            "server",
            &[
                ("ca-cert.pem", &ca_pem),
                ("server-cert.pem", &server_cert),
                ("server-key.pem", &server_key),
            ],
        );
        pki.write(
            "expired-server",
            &[
                ("ca-cert.pem", &ca_pem),
                ("server-cert.pem", &old_cert),
                ("server-key.pem", &old_key),
            ],
        );
        pki.write(
            "client",
            &[
                ("ca-cert.pem", &ca_pem),
                ("client-cert.pem", &client_cert),
                ("client-key.pem", &client_key),
            ],
        );
        pki.write("client-without-cert", &[("ca-cert.pem", &ca_pem)]);
        // Trusts the right CA, but its own certificate comes from another.
        pki.write(
            "client-foreign-cert",
            &[
                ("ca-cert.pem", &ca_pem),
                ("client-cert.pem", &stranger_cert),
                ("client-key.pem", &stranger_key),
            ],
        );
        // Trusts another CA; its own certificate is fine, so only the server check can fail.
        pki.write(
            "client-wrong-ca",
            &[
                ("ca-cert.pem", &other_ca.cert.pem()),
                ("client-cert.pem", &client_cert),
                ("client-key.pem", &client_key),
            ],
        );
        pki
    }

    fn write(&self, sub: &str, files: &[(&str, &str)]) {
        let dir = self.path(sub);
        fs::create_dir(&dir).expect("create a credentials dir");
        for (name, pem) in files {
            fs::write(dir.join(name), pem).expect("write a PEM file");
        }
    }

    fn path(&self, sub: &str) -> PathBuf {
        self.dir.path().join(sub)
    }

    fn client(&self, sub: &str) -> TlsCredentials {
        TlsCredentials::from_dir(self.path(sub)).expect("load client credentials")
    }
}

/// `--object` for server credentials in `dir`, with the client's certificate required.
fn tls_object(dir: &Path) -> String {
    format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=server,verify-peer=on",
        dir.display()
    )
}

fn tls_server(image: &Image, server_dir: &Path, export_opts: &str) -> NbdServer {
    NbdServer::storage_daemon_ro(
        image,
        EXPORT,
        &[tls_object(server_dir)],
        ",tls-creds=tls0",
        export_opts,
    )
}

fn addr(server: &NbdServer) -> String {
    server.tcp_addr().expect("a TCP server").to_string()
}

async fn connect(server: &NbdServer, options: &ConnectOptions) -> nbd::Result<Client> {
    Client::connect_tcp(&addr(server), EXPORT, options, CONNECT_TIMEOUT).await
}

/// An image with data before a dirty bitmap was added and data written after (the dirty ranges).
fn image_with_bitmap() -> (Image, Vec<(u64, u64)>) {
    let image = Image::create(16 * MIB);
    image.qemu_io(&[
        format!("write -P 0x11 {MIB} 256k"),
        format!("write -P 0x22 {} 64k", 8 * MIB),
    ]);
    run(Command::new(qemu_bin("qemu-img"))
        .args(["bitmap", "--add", "-f", "qcow2"])
        .arg(image.path())
        .arg(BITMAP));
    // A persistent bitmap is loaded with the image and records qemu-io's writes (64 KiB granularity).
    let dirty = vec![
        (4 * MIB, 128 * KIB),
        (8 * MIB, 64 * KIB),
        (12 * MIB + 64 * KIB, 64 * KIB),
    ];
    image.qemu_io(&[
        format!("write -P 0x33 {} 128k", 4 * MIB),
        format!("write -P 0x44 {} 64k", 8 * MIB),
        format!("write -z {} 64k", 12 * MIB + 64 * KIB),
    ]);
    (image, dirty)
}

/// The image's guest-visible bytes.
fn raw_bytes(image: &Image) -> Vec<u8> {
    let raw = image.dir().join("disk.raw");
    run(Command::new(qemu_bin("qemu-img"))
        .args(["convert", "-U", "-f", "qcow2", "-O", "raw"])
        .arg(image.path())
        .arg(&raw));
    let bytes = fs::read(&raw).expect("read the raw copy");
    fs::remove_file(&raw).expect("remove the raw copy");
    bytes
}

#[tokio::test]
async fn reads_and_both_contexts_over_tls_match_the_image() {
    let pki = Pki::new();
    let (image, dirty) = image_with_bitmap();
    let want = raw_bytes(&image);
    let map = image.map();
    let server = tls_server(&image, &pki.path("server"), &format!(",bitmaps.0={BITMAP}"));
    let options = ConnectOptions::new()
        .tls(pki.client("client"))
        .dirty_bitmap(BITMAP);
    let client = connect(&server, &options)
        .await
        .unwrap_or_else(|e| panic!("TLS connect: {e}\n{}", server.log()));
    assert_eq!(client.size(), 16 * MIB);
    assert!(client.has_meta_context("base:allocation"));
    assert!(client.has_meta_context("qemu:dirty-bitmap:bm0"));

    let mut got = vec![0xa5u8; want.len()];
    client.read(0, &mut got).await.unwrap();
    assert!(got == want, "bytes read over TLS differ from the image");

    assert_eq!(client.block_status(0, client.size()).await.unwrap(), map);

    let extents = client.dirty_extents(BITMAP, 0, client.size()).await.unwrap();
    let got_dirty: Vec<(u64, u64)> = extents
        .iter()
        .filter(|e| e.dirty())
        .map(|e| (e.offset, e.len))
        .collect();
    assert_eq!(got_dirty, dirty);
    // The extents cover the export exactly, clean and dirty alternating.
    assert_eq!(extents.first().map(|e| e.offset), Some(0));
    assert_eq!(extents.last().map(ContextExtent::end), Some(client.size()));
    assert!(
        extents
            .windows(2)
            .all(|w| w[0].end() == w[1].offset && w[0].dirty() != w[1].dirty())
    );

    // A sub-range, cut to the request.
    let part = client
        .dirty_extents(BITMAP, 4 * MIB + 64 * KIB, MIB)
        .await
        .unwrap();
    assert_eq!(
        part,
        vec![
            ContextExtent {
                offset: 4 * MIB + 64 * KIB,
                len: 64 * KIB,
                flags: nbd::STATE_DIRTY
            },
            ContextExtent {
                offset: 4 * MIB + 128 * KIB,
                len: MIB - 64 * KIB,
                flags: 0
            },
        ]
    );

    // A context that was not negotiated is refused without a request.
    let err = client.dirty_extents("nope", 0, MIB).await.unwrap_err();
    assert!(
        matches!(&err, Error::NoMetaContext { name } if name == "qemu:dirty-bitmap:nope"),
        "{err:?}"
    );
    assert_eq!(err.kind(), ErrorKind::Refused);
    client.disconnect().await.unwrap();
}

#[tokio::test]
async fn a_bitmap_the_export_lacks_is_not_selected() {
    let pki = Pki::new();
    let (image, _) = image_with_bitmap();
    let server = tls_server(&image, &pki.path("server"), "");
    let options = ConnectOptions::new()
        .tls(pki.client("client"))
        .dirty_bitmap(BITMAP);
    let client = connect(&server, &options).await.unwrap();
    assert!(client.block_status_supported());
    assert!(!client.has_meta_context("qemu:dirty-bitmap:bm0"));
    let err = client.dirty_extents(BITMAP, 0, MIB).await.unwrap_err();
    assert!(matches!(err, Error::NoMetaContext { .. }), "{err:?}");
}

fn expect_tls_failure(result: nbd::Result<Client>, failure: &[TlsFailure]) -> Error {
    let err = result.expect_err("the connection must fail");
    assert_eq!(err.kind(), ErrorKind::Tls, "{err:?}");
    match &err {
        Error::Tls { failure: got, .. } => assert!(failure.contains(got), "{err:?}"),
        other => panic!("expected a TLS failure {failure:?}, got {other:?}"),
    }
    err
}

#[tokio::test]
async fn a_server_certificate_from_another_ca_is_refused() {
    let pki = Pki::new();
    let image = Image::create(MIB);
    let server = tls_server(&image, &pki.path("server"), "");
    let options = ConnectOptions::new().tls(pki.client("client-wrong-ca"));
    let err = expect_tls_failure(connect(&server, &options).await, &[TlsFailure::UnknownIssuer]);
    assert!(err.to_string().contains("not signed by the trusted CA"), "{err}");
}

/// QEMU will not load an expired certificate, but one that expires while QEMU runs is still served. This
/// stand-in answers the NBD greeting and `NBD_OPT_STARTTLS` like QEMU, then offers the certificate in
/// `dir` over rustls; it ends after one client.
async fn starttls_stand_in(dir: &Path) -> (String, tokio::task::JoinHandle<()>) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let chain = vec![CertificateDer::from_pem_file(dir.join("server-cert.pem")).expect("server cert")];
    let key = PrivateKeyDer::from_pem_file(dir.join("server-key.pem")).expect("server key");
    let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocol versions")
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr").to_string();
    let serve = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.expect("accept");
        // NBDMAGIC, IHAVEOPT, fixed newstyle + no zeroes.
        let mut greeting = 0x4e42_444d_4147_4943u64.to_be_bytes().to_vec();
        greeting.extend_from_slice(&0x4948_4156_454f_5054u64.to_be_bytes());
        greeting.extend_from_slice(&3u16.to_be_bytes());
        s.write_all(&greeting).await.expect("greet");
        let _client_flags = s.read_u32().await.expect("client flags");
        let mut option = [0u8; 16];
        s.read_exact(&mut option).await.expect("option");
        assert_eq!(
            u32::from_be_bytes(option[8..12].try_into().expect("4 bytes")),
            5,
            "NBD_OPT_STARTTLS first"
        );
        let mut ack = 0x0003_e889_0455_65a9u64.to_be_bytes().to_vec();
        ack.extend_from_slice(&5u32.to_be_bytes());
        ack.extend_from_slice(&1u32.to_be_bytes());
        ack.extend_from_slice(&0u32.to_be_bytes());
        s.write_all(&ack).await.expect("ack");
        // The client gives up during the handshake.
        assert!(acceptor.accept(s).await.is_err());
    });
    (addr, serve)
}

#[tokio::test]
async fn an_expired_server_certificate_is_refused() {
    let pki = Pki::new();
    // QEMU refuses to load it at all, as a check that the certificate is really expired.
    let image = Image::create(MIB);
    let refused = NbdServer::try_storage_daemon_ro(
        &image,
        EXPORT,
        &[tls_object(&pki.path("expired-server"))],
        ",tls-creds=tls0",
        "",
    );
    assert!(refused.is_err_and(|log| log.contains("expired")));

    let (addr, serve) = starttls_stand_in(&pki.path("expired-server")).await;
    let options = ConnectOptions::new().tls(pki.client("client"));
    let result = Client::connect_tcp(&addr, EXPORT, &options, CONNECT_TIMEOUT).await;
    expect_tls_failure(result, &[TlsFailure::Expired]);
    tokio::time::timeout(CONNECT_TIMEOUT, serve)
        .await
        .expect("the stand-in ends")
        .expect("the stand-in saw the client give up");
}

#[tokio::test]
async fn a_server_certificate_for_another_name_is_refused() {
    let pki = Pki::new();
    let image = Image::create(MIB);
    let server = tls_server(&image, &pki.path("server"), "");
    let options = ConnectOptions::new()
        .tls(pki.client("client"))
        .server_name("hv9.example");
    expect_tls_failure(connect(&server, &options).await, &[TlsFailure::WrongName]);
    // By host name: the certificate names localhost too.
    let port = server.tcp_addr().expect("TCP").port();
    let options = ConnectOptions::new().tls(pki.client("client"));
    Client::connect_tcp(&format!("localhost:{port}"), EXPORT, &options, CONNECT_TIMEOUT)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused_by_verify_peer() {
    let pki = Pki::new();
    let image = Image::create(MIB);
    let server = tls_server(&image, &pki.path("server"), "");
    let options = ConnectOptions::new().tls(pki.client("client-without-cert"));
    let e = expect_tls_failure(
        connect(&server, &options).await,
        &[TlsFailure::RejectedByServer, TlsFailure::ClosedByServer],
    );
    // QEMU hangs up without an alert; the error says what is most likely missing.
    assert!(e.to_string().contains("no client certificate"), "{e}");
}

#[tokio::test]
async fn a_client_certificate_from_another_ca_is_refused_by_verify_peer() {
    let pki = Pki::new();
    let image = Image::create(MIB);
    let server = tls_server(&image, &pki.path("server"), "");
    let options = ConnectOptions::new().tls(pki.client("client-foreign-cert"));
    let e = expect_tls_failure(
        connect(&server, &options).await,
        &[TlsFailure::RejectedByServer, TlsFailure::ClosedByServer],
    );
    assert!(
        e.to_string().contains("may not trust our client certificate"),
        "{e}"
    );
}

#[tokio::test]
async fn a_server_without_tls_is_refused_unless_plaintext_is_allowed() {
    let pki = Pki::new();
    let image = Image::create(MIB);
    image.write_pattern(0x5a, 0, 64 * KIB);
    let server = NbdServer::storage_daemon_ro(&image, EXPORT, &[], "", "");

    let err = connect(&server, &ConnectOptions::new().tls(pki.client("client")))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::TlsNotOffered { .. }), "{err:?}");
    assert_eq!(err.kind(), ErrorKind::Tls);

    let err = connect(&server, &ConnectOptions::new()).await.unwrap_err();
    assert!(matches!(err, Error::PlaintextRefused { .. }), "{err:?}");
    assert_eq!(err.kind(), ErrorKind::Tls);

    let client = connect(&server, &ConnectOptions::new().insecure_plaintext())
        .await
        .unwrap();
    let mut buf = vec![0; 64 * KIB as usize];
    client.read(0, &mut buf).await.unwrap();
    assert!(buf.iter().all(|&b| b == 0x5a));
}

#[tokio::test]
async fn a_tls_server_refuses_a_plaintext_client() {
    let pki = Pki::new();
    let image = Image::create(MIB);
    let server = tls_server(&image, &pki.path("server"), "");
    let err = connect(&server, &ConnectOptions::new().insecure_plaintext())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::TlsRequired), "{err:?}");
    assert_eq!(err.kind(), ErrorKind::Tls);
}

#[test]
fn credentials_must_be_complete() {
    let pki = Pki::new();
    let dir = pki.path("client");
    fs::remove_file(dir.join(nbd::CLIENT_KEY)).unwrap();
    let err = TlsCredentials::from_dir(&dir).unwrap_err();
    assert!(
        matches!(&err, Error::TlsCredentials { path, .. } if path.ends_with("client-key.pem")),
        "{err:?}"
    );
    assert_eq!(err.kind(), ErrorKind::Tls);
    let err = TlsCredentials::from_dir(pki.path("nowhere")).unwrap_err();
    assert!(
        matches!(&err, Error::TlsCredentials { path, .. } if path.ends_with("ca-cert.pem")),
        "{err:?}"
    );
    assert!(!pki.client("client-without-cert").has_client_certificate());
}
