//! [`ClientCredentials`]: a directory in the layout of QEMU's `tls-creds-x509,endpoint=client`, read into a
//! rustls client configuration. The server's certificate must chain to the directory's CA (and name the host
//! connected to, which the caller checks by the server name it gives rustls); the client certificate, if the
//! directory has one, is presented, as QEMU's `verify-peer=on` demands. The crypto is rustls with the `ring`
//! provider, chosen here rather than through a process-wide default.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};

use crate::error::{Error, Result};

/// The CA certificates that sign the server's certificate (QEMU's name).
pub const CA_CERT: &str = "ca-cert.pem";
/// The client's certificate, presented to the server (QEMU's name).
pub const CLIENT_CERT: &str = "client-cert.pem";
/// The client certificate's private key (QEMU's name).
pub const CLIENT_KEY: &str = "client-key.pem";

/// x509 credentials of a TLS client. Cheap to clone; one value serves any number of connections.
#[derive(Clone)]
pub struct ClientCredentials {
    config: Arc<ClientConfig>,
    dir: PathBuf,
    client_cert: bool,
}

impl fmt::Debug for ClientCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientCredentials")
            .field("dir", &self.dir)
            .field("client_cert", &self.client_cert)
            .finish_non_exhaustive()
    }
}

impl ClientCredentials {
    /// Reads `dir` as QEMU's `tls-creds-x509,endpoint=client` would: `ca-cert.pem` (required), and
    /// `client-cert.pem` with `client-key.pem` (both or neither; without them no client certificate is
    /// presented, which a server with `verify-peer=on` refuses).
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<ClientCredentials> {
        let dir = dir.as_ref();
        let ca = dir.join(CA_CERT);
        let roots = load_roots(&ca)?;
        let (cert, key) = (dir.join(CLIENT_CERT), dir.join(CLIENT_KEY));
        let builder = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| creds_error(dir, e.to_string()))?
            .with_root_certificates(roots);
        let (config, client_cert) = match (cert.exists(), key.exists()) {
            (false, false) => (builder.with_no_client_auth(), false),
            (true, true) => {
                let chain = load_certs(&cert)?;
                let key = PrivateKeyDer::from_pem_file(&key)
                    .map_err(|e| creds_error(&key, format!("no usable private key: {e}")))?;
                let config = builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| creds_error(&cert, format!("does not go with {CLIENT_KEY}: {e}")))?;
                (config, true)
            }
            (true, false) => {
                return Err(creds_error(
                    &key,
                    "missing, but the client certificate is there".into(),
                ));
            }
            (false, true) => return Err(creds_error(&cert, "missing, but the client key is there".into())),
        };
        Ok(ClientCredentials {
            config: Arc::new(config),
            dir: dir.to_owned(),
            client_cert,
        })
    }

    /// The rustls configuration, shared by every connection made with these credentials.
    pub fn config(&self) -> &Arc<ClientConfig> {
        &self.config
    }

    /// The directory the credentials were read from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether a client certificate is presented.
    pub fn has_client_certificate(&self) -> bool {
        self.client_cert
    }

    /// The words to add to a server's refusal or hang-up right after the handshake: with TLS 1.3 the server
    /// judges our certificate only after the client's side of the handshake is done, so its refusal is
    /// the first thing read.
    pub fn refusal_hint(&self) -> String {
        if self.client_cert {
            "the server may not trust our client certificate".into()
        } else {
            format!(
                "no client certificate was presented ({} has no {CLIENT_CERT}), and a server with \
                 verify-peer=on requires one",
                self.dir.display()
            )
        }
    }
}

fn creds_error(path: &Path, reason: String) -> Error {
    Error::Credentials {
        path: path.to_owned(),
        reason,
    }
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(|e| creds_error(path, format!("cannot read certificates: {e}")))?;
    if certs.is_empty() {
        return Err(creds_error(path, "holds no certificate".into()));
    }
    Ok(certs)
}

fn load_roots(path: &Path) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots
            .add(cert)
            .map_err(|e| creds_error(path, format!("not a usable CA certificate: {e}")))?;
    }
    Ok(roots)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca_pem() -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.self_signed(&key).unwrap().pem()
    }

    #[test]
    fn a_ca_alone_is_enough_and_a_lone_half_of_a_pair_is_not() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(CA_CERT), ca_pem()).unwrap();
        let creds = ClientCredentials::from_dir(dir.path()).unwrap();
        assert!(!creds.has_client_certificate());
        assert!(creds.refusal_hint().contains("no client certificate"));
        std::fs::write(dir.path().join(CLIENT_KEY), "junk").unwrap();
        let err = ClientCredentials::from_dir(dir.path()).unwrap_err();
        assert!(err.path().ends_with(CLIENT_CERT), "{err}");
        let err = ClientCredentials::from_dir(dir.path().join("nowhere")).unwrap_err();
        assert!(err.path().ends_with(CA_CERT), "{err}");
        assert!(err.to_string().starts_with("bad TLS credentials"), "{err}");
    }
}
