//! Undoing a pull's copy-before-write view in the VM's QEMU: each device goes back to the node it was attached
//! to, and a VM the run paused for the view's instant runs again. Used by the run's own teardown and by
//! recovery after a kill; both act on what QEMU reports, with the record only naming what to look at.

use anyhow::{Context, Result, bail};
use qmp::commands::{Cont, QomSet, QueryBlock, QueryStatus, XDebugQueryBlockGraph};

use chain::{Operation, ViewRecord};

/// The QOM path of a device from `query-block`'s `qdev`: a device with an id reports the bare id, and lives
/// under `/machine/peripheral`; one without reports its path.
pub fn device_path(qdev: &str) -> String {
    if qdev.starts_with('/') {
        qdev.to_owned()
    } else {
        format!("/machine/peripheral/{qdev}")
    }
}

/// Attaches every device the record switched to a copy-before-write filter back to the node below that
/// filter. A device is switched back only when QEMU says it is attached to the record's filter, the filter
/// is a `copy-before-write` node the record created (one of its block nodes), and the filter's `file` child
/// is the node the record names: a record is data from a file, and a device attached to another node than
/// its own would show the guest another disk. Returns the devices switched back; an error names the first
/// device that could not be.
pub async fn switch_back(qmp: &qmp::Qmp, op: &Operation, view: &ViewRecord) -> Result<Vec<String>> {
    let mut done = Vec::new();
    if view.switched.is_empty() {
        return Ok(done);
    }
    let blocks = qmp
        .execute(&QueryBlock)
        .await
        .context("listing the VM's disks (query-block)")?;
    let graph = qmp
        .execute(&XDebugQueryBlockGraph)
        .await
        .context("reading the VM's block graph")?;
    for s in &view.switched {
        let attached = blocks.iter().find(|b| {
            b.qdev.as_deref().map(device_path).as_deref() == Some(s.device.as_str())
                && b.inserted
                    .as_ref()
                    .and_then(|i| i.node_name.as_deref())
                    .is_some_and(|n| n == s.filter)
        });
        let Some(block) = attached else {
            // Never switched, or switched back already.
            continue;
        };
        let drv = block.inserted.as_ref().map_or("", |i| i.drv.as_str());
        if drv != "copy-before-write" || !op.block_nodes.contains(&s.filter) {
            bail!(
                "device {} is attached to node {} ({drv}), which is not a copy-before-write filter of record \
                 {}: left as it is",
                s.device,
                s.filter,
                op.id
            );
        }
        let below = graph.child(&s.filter, "file");
        if below != Some(s.original.as_str()) {
            bail!(
                "device {} is attached to the copy-before-write filter {}, whose file is {:?}, not {} as record \
                 {} says: left as it is",
                s.device,
                s.filter,
                below,
                s.original,
                op.id
            );
        }
        qmp.execute(&QomSet::drive(s.device.as_str(), s.original.as_str()))
            .await
            .with_context(|| {
                format!(
                    "attaching device {} back to node {} (qom-set drive)",
                    s.device, s.original
                )
            })?;
        done.push(s.device.clone());
    }
    Ok(done)
}

/// Resumes the VM if the record says the run paused it and it is still paused; `true` if it was resumed.
/// (A VM the user paused was never paused by the run, so its record does not say so.)
pub async fn resume(qmp: &qmp::Qmp, view: &ViewRecord) -> Result<bool> {
    if !view.paused_vm {
        return Ok(false);
    }
    let status = qmp
        .execute(&QueryStatus)
        .await
        .context("asking whether the VM is paused")?;
    if status.running || status.status != qmp::RunState::Paused {
        return Ok(false);
    }
    qmp.execute(&Cont)
        .await
        .context("resuming the VM an interrupted backup paused")?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_id_lives_under_peripheral() {
        assert_eq!(device_path("disk0"), "/machine/peripheral/disk0");
        assert_eq!(
            device_path("/machine/peripheral/disk0/virtio-backend"),
            "/machine/peripheral/disk0/virtio-backend"
        );
    }
}
