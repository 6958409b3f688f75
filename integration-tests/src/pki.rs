//! Throwaway x509 credentials for TLS tests, made with rcgen in QEMU's `tls-creds-x509` layout: `server/` (CA,
//! server certificate and key for 127.0.0.1 and localhost), `client/` (CA, client certificate and key) and
//! `client-wrong-ca/` (a client that trusts another CA), in a temporary directory.

use std::fs;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
    SanType,
};
use tempfile::TempDir;

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

    /// A certificate and key for 127.0.0.1 and localhost.
    fn issue(&self, purpose: ExtendedKeyUsagePurpose) -> (String, String) {
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
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .expect("sign the leaf");
        (cert.pem(), key.serialize_pem())
    }
}

/// Credential directories in QEMU's layout, in a temporary directory.
pub struct Pki {
    dir: TempDir,
}

impl Pki {
    pub fn new() -> Pki {
        let pki = Pki {
            dir: tempfile::tempdir().expect("pki temp dir"),
        };
        let ca = Ca::new("qmpbak test CA");
        let other_ca = Ca::new("some other CA");
        let (server_cert, server_key) = ca.issue(ExtendedKeyUsagePurpose::ServerAuth);
        let (client_cert, client_key) = ca.issue(ExtendedKeyUsagePurpose::ClientAuth);
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
            "client",
            &[
                ("ca-cert.pem", &ca_pem),
                ("client-cert.pem", &client_cert),
                ("client-key.pem", &client_key),
            ],
        );
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

    /// The directory `sub` (`server`, `client`, `client-wrong-ca`).
    pub fn path(&self, sub: &str) -> PathBuf {
        self.dir.path().join(sub)
    }

    /// QEMU's `-object` for the server credentials, id `id`, the client's certificate required.
    pub fn server_object(&self, id: &str) -> String {
        server_object(id, &self.path("server"))
    }
}

impl Default for Pki {
    fn default() -> Pki {
        Pki::new()
    }
}

fn server_object(id: &str, dir: &Path) -> String {
    format!(
        "tls-creds-x509,id={id},dir={},endpoint=server,verify-peer=on",
        dir.display()
    )
}

/// A TCP port on 127.0.0.1 that was free a moment ago (for a server QEMU starts).
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local address").port()
}
