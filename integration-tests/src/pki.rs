//! Throwaway x509 credentials for TLS tests, made with rcgen in a temp directory, in the layouts of QEMU's
//! `tls-creds-x509` objects: `server/` (ca-cert.pem, server-cert.pem, server-key.pem) for QEMU,
//! `client/` (ca-cert.pem, client-cert.pem, client-key.pem) for qmpbak, and the wrong ones: `client-wrong-ca/`
//! (trusts another CA), `client-other-ca/` (a sound client of another CA entirely: a QEMU NBD client that
//! trusts another CA), `client-foreign-cert/` (its certificate from another CA), `client-without-cert/`,
//! `misnamed-server/` (a server certificate for 192.0.2.1 and localhost only, not the test's addresses),
//! and `expired-server/` (a server certificate whose validity ended in 2021, which QEMU refuses to load,
//! for a stand-in server).

use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
    SanType,
};
use tempfile::TempDir;

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

    /// A leaf certificate and key naming `addrs` (and localhost), valid now unless `expired`.
    fn issue(&self, addrs: &[IpAddr], purpose: ExtendedKeyUsagePurpose, expired: bool) -> (String, String) {
        let key = KeyPair::generate().expect("leaf key");
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).expect("leaf params");
        params
            .subject_alt_names
            .extend(addrs.iter().map(|a| SanType::IpAddress(*a)));
        params.distinguished_name.push(DnType::CommonName, "qmpbak test");
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

/// Credential directories for a server at `addrs`.
pub struct TestPki {
    dir: TempDir,
}

impl TestPki {
    /// A CA, a server certificate for `addrs` (and localhost), a client certificate, and the wrong ones.
    pub fn new(addrs: &[IpAddr]) -> TestPki {
        let pki = TestPki {
            dir: tempfile::tempdir().expect("pki temp dir"),
        };
        let ca = Ca::new("qmpbak test CA");
        let other = Ca::new("some other CA");
        let (server_cert, server_key) = ca.issue(addrs, ExtendedKeyUsagePurpose::ServerAuth, false);
        let (old_cert, old_key) = ca.issue(addrs, ExtendedKeyUsagePurpose::ServerAuth, true);
        let elsewhere = [IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1))];
        let (misnamed_cert, misnamed_key) = ca.issue(&elsewhere, ExtendedKeyUsagePurpose::ServerAuth, false);
        let (client_cert, client_key) = ca.issue(&[], ExtendedKeyUsagePurpose::ClientAuth, false);
        let (stranger_cert, stranger_key) = other.issue(&[], ExtendedKeyUsagePurpose::ClientAuth, false);
        let ca_pem = ca.cert.pem();
        let server = [
            ("ca-cert.pem", ca_pem.as_str()),
            ("server-cert.pem", &server_cert),
            ("server-key.pem", &server_key),
        ];
        pki.write("server", &server);
        pki.write(
            "expired-server",
            &[
                ("ca-cert.pem", &ca_pem),
                ("server-cert.pem", &old_cert),
                ("server-key.pem", &old_key),
            ],
        );
        pki.write(
            "misnamed-server",
            &[
                ("ca-cert.pem", &ca_pem),
                ("server-cert.pem", &misnamed_cert),
                ("server-key.pem", &misnamed_key),
            ],
        );
        let client = |ca: &str| {
            [
                ("ca-cert.pem", ca.to_owned()),
                ("client-cert.pem", client_cert.clone()),
                ("client-key.pem", client_key.clone()),
            ]
        };
        pki.write_owned("client", &client(&ca_pem));
        pki.write_owned("client-wrong-ca", &client(&other.cert.pem()));
        pki.write(
            "client-foreign-cert",
            &[
                ("ca-cert.pem", &ca_pem),
                ("client-cert.pem", &stranger_cert),
                ("client-key.pem", &stranger_key),
            ],
        );
        pki.write(
            "client-other-ca",
            &[
                ("ca-cert.pem", &other.cert.pem()),
                ("client-cert.pem", &stranger_cert),
                ("client-key.pem", &stranger_key),
            ],
        );
        pki.write("client-without-cert", &[("ca-cert.pem", &ca_pem)]);
        pki
    }

    fn write(&self, sub: &str, files: &[(&str, &str)]) {
        let dir = self.path(sub);
        fs::create_dir(&dir).expect("create a credentials dir");
        for (name, pem) in files {
            fs::write(dir.join(name), pem).expect("write a PEM file");
        }
    }

    fn write_owned(&self, sub: &str, files: &[(&str, String)]) {
        let files: Vec<(&str, &str)> = files.iter().map(|(n, p)| (*n, p.as_str())).collect();
        self.write(sub, &files);
    }

    /// The directory `sub` (absolute).
    pub fn path(&self, sub: &str) -> PathBuf {
        self.dir.path().join(sub)
    }

    /// The root of all the directories.
    pub fn root(&self) -> &Path {
        self.dir.path()
    }
}

impl TestPki {
    /// Credentials for a server on 127.0.0.1 (and localhost) only: loopback tests.
    pub fn loopback() -> TestPki {
        TestPki::new(&[IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)])
    }

    /// QEMU's `-object` for the server credentials, id `id`, the client's certificate required.
    pub fn server_object(&self, id: &str) -> String {
        format!(
            "tls-creds-x509,id={id},dir={},endpoint=server,verify-peer=on",
            self.path("server").display()
        )
    }

    /// QEMU's `-object` for client credentials, id `id`, reading the credentials directory `dir` (a name for
    /// [`TestPki::path`]): the VM's side of a connection to a backup host's server.
    pub fn client_object(&self, id: &str, dir: &str) -> String {
        format!(
            "tls-creds-x509,id={id},dir={},endpoint=client",
            self.path(dir).display()
        )
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago (for a server QEMU starts; another process may take
/// it in between, which a test then reports as QEMU failing to listen).
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local address").port()
}
