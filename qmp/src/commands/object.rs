//! Commands that add, read and remove QOM objects; only the objects qmpbak needs are typed: `secret` and
//! `tls-creds-x509`.

use serde::{Deserialize, Serialize};

use super::{Empty, command};

/// `object-add` of a `secret` object holding `data` in QEMU's memory, for encrypted images (`key-secret`).
/// The secret travels over the QMP socket only, never on a command line; `Debug` leaves it out.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectAddSecret {
    #[serde(rename = "qom-type")]
    pub qom_type: String,
    pub id: String,
    pub data: String,
    /// `raw`: `data` is the secret as it is.
    pub format: String,
}
command!(ObjectAddSecret, "object-add", Empty);

impl ObjectAddSecret {
    pub fn new(id: impl Into<String>, data: impl Into<String>) -> ObjectAddSecret {
        ObjectAddSecret {
            qom_type: "secret".to_owned(),
            id: id.into(),
            data: data.into(),
            format: "raw".to_owned(),
        }
    }
}

impl std::fmt::Debug for ObjectAddSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectAddSecret")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// `object-add` of a `tls-creds-x509` object reading `ca-cert.pem` and, for a client, `client-cert.pem` and
/// `client-key.pem` (a server: `server-cert.pem`, `server-key.pem`) from `dir`, a directory on QEMU's host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectAddTlsCredsX509 {
    #[serde(rename = "qom-type")]
    pub qom_type: String,
    pub id: String,
    pub dir: String,
    /// `client` or `server`.
    pub endpoint: String,
    #[serde(rename = "verify-peer")]
    pub verify_peer: bool,
}
command!(ObjectAddTlsCredsX509, "object-add", Empty);

impl ObjectAddTlsCredsX509 {
    /// Client credentials that verify the server's certificate against the CA in `dir`.
    pub fn client(id: impl Into<String>, dir: impl Into<String>) -> ObjectAddTlsCredsX509 {
        ObjectAddTlsCredsX509 {
            qom_type: "tls-creds-x509".to_owned(),
            id: id.into(),
            dir: dir.into(),
            endpoint: "client".to_owned(),
            verify_peer: true,
        }
    }
}

/// `qom-get`: one property of the QOM object at `path` (e.g. `/objects/tls0`, property `endpoint`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QomGet {
    pub path: String,
    pub property: String,
}
command!(QomGet, "qom-get", serde_json::Value);

/// `object-del`: removes an object added with `object-add`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectDel {
    pub id: String,
}
command!(ObjectDel, "object-del", Empty);

/// `qom-list`: the properties (children and links included) of the QOM object at `path`, e.g. `/objects`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QomList {
    pub path: String,
}
command!(QomList, "qom-list", Vec<ObjectPropertyInfo>);

/// One property of a QOM object: a child object's type reads `child<TYPE>`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectPropertyInfo {
    pub name: String,
    #[serde(rename = "type")]
    pub type_: String,
}

/// `qom-set`: sets property `property` of the QOM object at `path` to `value`. Typed for what qmpbak sets: a
/// device's `drive` (the block node it is attached to), which QEMU lets change on a realized device.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QomSet {
    pub path: String,
    pub property: String,
    pub value: String,
}
command!(QomSet, "qom-set", Empty);

impl QomSet {
    /// Attaches the device at QOM path `device` to block node `node` (`qom-set DEVICE drive NODE`).
    pub fn drive(device: impl Into<String>, node: impl Into<String>) -> QomSet {
        QomSet {
            path: device.into(),
            property: "drive".to_owned(),
            value: node.into(),
        }
    }
}

impl ObjectPropertyInfo {
    /// The type of the child object this property holds (`child<TYPE>`), if it is one.
    pub fn child_type(&self) -> Option<&str> {
        self.type_.strip_prefix("child<")?.strip_suffix('>')
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_is_sent_flat_and_never_printed() {
        let cmd = ObjectAddSecret::new("k0", "hunter2");
        let json = serde_json::to_value(&cmd).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"qom-type": "secret", "id": "k0", "data": "hunter2", "format": "raw"})
        );
        assert!(!format!("{cmd:?}").contains("hunter2"));
    }
}
