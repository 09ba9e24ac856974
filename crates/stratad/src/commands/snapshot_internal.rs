//! qcow2 internal snapshots over QMP: `blockdev-snapshot-internal-sync` and
//! `blockdev-snapshot-delete-internal-sync` (QEMU's `internal_snapshot_action` and
//! `qmp_blockdev_snapshot_delete_internal_sync`, with their checks in their order).

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value, json};
use strata_core::NodeRef;
use strata_graph::{Graph, User};
use strata_qcow2::Qcow2;
use strata_qcow2::snapshot::SnapshotInfo;

use super::{Args, Reply, arg_str, generic, ok, opt_str};
use crate::daemon::Daemon;

/// QEMU's `qmp_get_root_bs`: the node `device` names, which must have no parent node.
pub fn root_node(g: &Graph, device: &str) -> Result<String, String> {
    if g.node(device).is_none() {
        return Err(format!(
            "Cannot find device='{device}' nor node-name='{device}'"
        ));
    }
    if g.parents_of(device)
        .any(|e| matches!(e.user, User::Node(_)))
    {
        return Err("Need a root block node".into());
    }
    Ok(device.to_string())
}

/// The qcow2 driver behind node `name`, if it is one.
fn qcow2_of(g: &Graph, name: &str) -> Option<NodeRef> {
    let rec = g.node(name)?;
    let driver = strata_graph::driver_of(&(rec.node.clone() as NodeRef));
    driver.as_any().downcast_ref::<Qcow2>()?;
    Some(driver)
}

/// QEMU's `bdrv_snapshot_find_by_id_and_name`: both given → both must match.
fn find<'a>(
    snaps: &'a [SnapshotInfo],
    id: Option<&str>,
    name: Option<&str>,
) -> Option<&'a SnapshotInfo> {
    snaps
        .iter()
        .find(|s| id.is_none_or(|i| s.id == i) && name.is_none_or(|n| s.name == n))
}

pub async fn blockdev_snapshot_internal_sync(d: Arc<Daemon>, a: Args) -> Reply {
    let device = arg_str(&a, "device");
    let name = arg_str(&a, "name");
    let g = d.env.graph.lock().await;
    let node = root_node(&g, device).map_err(generic)?;
    let rec = g.node(&node).expect("looked up");
    if rec.read_only {
        return Err(generic(format!("Device '{device}' is read only")));
    }
    let Some(driver) = qcow2_of(&g, &node) else {
        return Err(generic(format!(
            "Block format '{}' used by device '{device}' does not support internal snapshots",
            rec.node.inner().driver()
        )));
    };
    let q = driver.as_any().downcast_ref::<Qcow2>().expect("qcow2");
    if name.is_empty() {
        return Err(generic("Name is empty"));
    }
    if find(&q.format_info().snapshots, None, Some(name)).is_some() {
        return Err(generic(format!(
            "Snapshot with name '{name}' already exists on device '{device}'"
        )));
    }
    // qemu-storage-daemon's virtual clock runs with the real one.
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let clock = now.as_secs() * 1_000_000_000 + u64::from(now.subsec_micros()) * 1000;
    q.snapshot_create_with_clock(name, clock)
        .await
        .map_err(|e| {
            generic(format!(
                "Failed to create snapshot '{name}' on device '{device}': {e}"
            ))
        })?;
    Ok(ok())
}

pub async fn blockdev_snapshot_delete_internal_sync(d: Arc<Daemon>, a: Args) -> Reply {
    let device = arg_str(&a, "device");
    let (id, name) = (opt_str(&a, "id"), opt_str(&a, "name"));
    let g = d.env.graph.lock().await;
    let node = root_node(&g, device).map_err(generic)?;
    if id.is_none() && name.is_none() {
        return Err(generic("Name or id must be provided"));
    }
    let Some(driver) = qcow2_of(&g, &node) else {
        return Err(generic(
            "Failed to get a snapshot list: Operation not supported",
        ));
    };
    let q = driver.as_any().downcast_ref::<Qcow2>().expect("qcow2");
    let snaps = q.format_info().snapshots;
    let Some(sn) = find(&snaps, id, name).cloned() else {
        return Err(generic(format!(
            "Snapshot with id '{}' and name '{}' does not exist on device '{device}'",
            id.unwrap_or("null"),
            name.unwrap_or("null")
        )));
    };
    q.snapshot_delete(&sn.name).await.map_err(|e| {
        generic(format!(
            "Failed to delete snapshot with id '{}' and name '{}' on device '{device}': {e}",
            id.unwrap_or("null"),
            name.unwrap_or("null")
        ))
    })?;
    let mut info = Map::new();
    info.insert("id".into(), json!(sn.id));
    info.insert("name".into(), json!(sn.name));
    info.insert("vm-state-size".into(), json!(sn.vm_state_size));
    info.insert("date-sec".into(), json!(sn.date_sec));
    info.insert("date-nsec".into(), json!(sn.date_nsec));
    info.insert(
        "vm-clock-sec".into(),
        json!(sn.vm_clock_nsec / 1_000_000_000),
    );
    info.insert(
        "vm-clock-nsec".into(),
        json!(sn.vm_clock_nsec % 1_000_000_000),
    );
    if let Some(ic) = sn.icount {
        info.insert("icount".into(), json!(ic));
    }
    Ok(Value::Object(strata_job::qdict::qemu_order(info)))
}
