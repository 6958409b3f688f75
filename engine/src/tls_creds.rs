//! Which `tls-creds-x509` object of the VM's QEMU an NBD server that qmpbak starts there uses (a pull backup's,
//! a live restore's emptiness check), one rule for both: the object named with `--tls-creds ID` (it must be
//! an `endpoint=server` object), else the VM's only object with `endpoint=server`. None, or several without
//! `--tls-creds`, is a usage error naming the way out. Client objects (the VM's view of a backup host's
//! server, for a live restore across hosts) never count.

use anyhow::{Context, Result, bail};
use qmp::commands::{QomGet, QomList};

use crate::exit::Exit;

/// The `endpoint` of the `tls-creds-x509` object `id`.
pub(crate) async fn endpoint_of(qmp: &qmp::Qmp, id: &str) -> Result<Option<String>> {
    let value = qmp
        .execute(&QomGet {
            path: format!("/objects/{id}"),
            property: "endpoint".to_owned(),
        })
        .await
        .with_context(|| format!("reading the endpoint of the VM's object {id}"))?;
    Ok(value.as_str().map(str::to_owned))
}

/// The ids of the VM's `tls-creds-x509` objects with endpoint `endpoint` (`client` or `server`).
pub(crate) async fn creds_with_endpoint(qmp: &qmp::Qmp, endpoint: &str) -> Result<Vec<String>> {
    let objects = qmp
        .execute(&QomList {
            path: "/objects".to_owned(),
        })
        .await
        .context("listing the VM's QEMU objects (qom-list /objects)")?;
    let mut found = Vec::new();
    for o in objects
        .into_iter()
        .filter(|o| o.child_type() == Some("tls-creds-x509"))
    {
        if endpoint_of(qmp, &o.name).await?.as_deref() == Some(endpoint) {
            found.push(o.name);
        }
    }
    Ok(found)
}

/// The server `tls-creds-x509` object for an NBD server in the VM's QEMU: `named` (`--tls-creds`), checked to
/// be a server object, or the VM's only one. `purpose` says what the server is for, in the errors.
pub async fn server_creds(qmp: &qmp::Qmp, named: Option<&str>, purpose: &str) -> Result<String> {
    if let Some(id) = named {
        let endpoint = endpoint_of(qmp, id).await.map_err(|e| {
            anyhow::Error::new(Exit::usage(format!(
                "--tls-creds {id}: the VM's QEMU has no such tls-creds-x509 object ({e:#})"
            )))
        })?;
        if endpoint.as_deref() != Some("server") {
            bail!(Exit::usage(format!(
                "--tls-creds {id}: the VM's object has endpoint {endpoint:?}; {purpose} needs one with \
                 endpoint=server"
            )));
        }
        return Ok(id.to_owned());
    }
    let servers = creds_with_endpoint(qmp, "server").await?;
    match servers.as_slice() {
        [one] => Ok(one.clone()),
        [] => bail!(Exit::usage(format!(
            "the VM's QEMU has no tls-creds-x509 object with endpoint=server for {purpose}: start it with \
             -object tls-creds-x509,id=ID,dir=DIR,endpoint=server,verify-peer=on (or use --insecure-plaintext \
             with a tcp:// monitor)"
        ))),
        many => bail!(Exit::usage(format!(
            "the VM's QEMU has several tls-creds-x509 objects with endpoint=server ({}): name the one for \
             {purpose} with --tls-creds ID",
            many.join(", ")
        ))),
    }
}
