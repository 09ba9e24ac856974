//! `transaction`: actions are prepared in order; the first failure rolls back everything
//! prepared so far (in reverse) and is the reply. Bitmap actions keep what they need to undo
//! themselves; a `blockdev-backup` is prepared in place (checks, filter, job created) and
//! started only once every action has been prepared; with `completion-mode: grouped` the
//! backups share one job transaction.

use std::sync::Arc;

use serde_json::Value;
use strata_core::bitmap::DirtyBitmap;

use super::{Args, Reply, arg_str, from_verb, generic, ok};
use crate::daemon::Daemon;

/// How to undo one prepared action.
enum Undo {
    BitmapAdd {
        node: String,
        name: String,
    },
    BitmapRestore {
        node: String,
        name: String,
        old: DirtyBitmap,
    },
    BitmapEnabled {
        node: String,
        name: String,
        was: bool,
    },
    Snapshot,
    Backup(strata_blockjobs::backup::BackupAction),
}

const GROUPABLE: &[&str] = &["blockdev-backup", "drive-backup"];

pub async fn transaction(d: Arc<Daemon>, a: Args) -> Reply {
    let actions = a
        .get("actions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let grouped = a
        .get("properties")
        .and_then(|p| p.get("completion-mode"))
        .and_then(Value::as_str)
        == Some("grouped");
    if grouped {
        for act in &actions {
            let t = act.get("type").and_then(Value::as_str).unwrap_or_default();
            if !GROUPABLE.contains(&t) {
                return Err(generic(format!(
                    "Action '{t}' does not support transaction property completion-mode = grouped"
                )));
            }
        }
    }
    let txn = grouped.then(|| d.env.jobs.new_txn());
    let mut undo: Vec<Undo> = Vec::new();
    let mut removals: Vec<(String, String)> = Vec::new();
    for act in &actions {
        let t = act.get("type").and_then(Value::as_str).unwrap_or_default();
        let data = act
            .get("data")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        if let Err(e) = prepare(&d, t, &data, txn, &mut undo, &mut removals).await {
            rollback(&d, undo).await;
            return Err(e);
        }
    }
    // Commit: start the prepared backups, in order.
    for u in undo {
        if let Undo::Backup(action) = u {
            action.commit().await.map_err(from_verb)?;
        }
    }
    // Removals happen only once everything else succeeded.
    for (node, name) in removals {
        super::bitmap::remove(d.clone(), args(&[("node", &node), ("name", &name)])).await?;
    }
    Ok(ok())
}

fn args(kv: &[(&str, &str)]) -> Args {
    kv.iter()
        .map(|(k, v)| (k.to_string(), Value::String(v.to_string())))
        .collect()
}

async fn prepare(
    d: &Arc<Daemon>,
    kind: &str,
    data: &Args,
    txn: Option<strata_job::TxnId>,
    undo: &mut Vec<Undo>,
    removals: &mut Vec<(String, String)>,
) -> Result<(), strata_qmp::QmpError> {
    let node = arg_str(data, "node").to_string();
    let name = arg_str(data, "name").to_string();
    let set = || async {
        let g = d.env.graph.lock().await;
        g.node(&node)
            .map(|n| n.node.bitmaps())
            .ok_or_else(|| generic(format!("Node '{node}' not found")))
    };
    match kind {
        "abort" => Err(generic("Transaction aborted using Abort action")),
        "block-dirty-bitmap-add" => {
            super::bitmap::add(d.clone(), data.clone()).await?;
            undo.push(Undo::BitmapAdd { node, name });
            Ok(())
        }
        "block-dirty-bitmap-remove" => {
            let s = set().await?;
            s.check(
                &name,
                strata_core::bitmap::CheckFlags::BUSY | strata_core::bitmap::CheckFlags::READ_ONLY,
            )
            .map_err(|e| generic(e.message().to_string()))?;
            removals.push((node, name));
            Ok(())
        }
        "block-dirty-bitmap-clear" => {
            let old = set()
                .await?
                .clear(&name)
                .map_err(|e| generic(e.message().to_string()))?;
            undo.push(Undo::BitmapRestore { node, name, old });
            Ok(())
        }
        "block-dirty-bitmap-enable" | "block-dirty-bitmap-disable" => {
            let s = set().await?;
            let was = if kind.ends_with("enable") {
                s.enable(&name)
            } else {
                s.disable(&name)
            }
            .map_err(|e| generic(e.message().to_string()))?;
            undo.push(Undo::BitmapEnabled { node, name, was });
            Ok(())
        }
        "block-dirty-bitmap-merge" => {
            let target = arg_str(data, "target").to_string();
            let old = {
                let g = d.env.graph.lock().await;
                g.node(&node)
                    .map(|n| n.node.bitmaps())
                    .and_then(|s| s.snapshot(&target))
            };
            super::bitmap::merge(d.clone(), data.clone()).await?;
            if let Some(old) = old {
                undo.push(Undo::BitmapRestore {
                    node,
                    name: target,
                    old,
                });
            }
            Ok(())
        }
        "blockdev-backup" => {
            let action = strata_blockjobs::backup::backup_prepare(&d.env, data, txn)
                .await
                .map_err(from_verb)?;
            undo.push(Undo::Backup(action));
            Ok(())
        }
        "blockdev-snapshot" => {
            super::block::blockdev_snapshot(d.clone(), data.clone()).await?;
            undo.push(Undo::Snapshot);
            Ok(())
        }
        "blockdev-snapshot-sync" => {
            super::block::blockdev_snapshot_sync(d.clone(), data.clone()).await?;
            undo.push(Undo::Snapshot);
            Ok(())
        }
        other => Err(generic(format!("Action '{other}' is not supported"))),
    }
}

async fn rollback(d: &Arc<Daemon>, undo: Vec<Undo>) {
    for u in undo.into_iter().rev() {
        if let Undo::Backup(action) = u {
            // Takes the graph lock itself.
            action.abort().await;
            continue;
        }
        let g = d.env.graph.lock().await;
        let set = |node: &str| g.node(node).map(|n| n.node.bitmaps());
        match u {
            Undo::BitmapAdd { node, name } => {
                if let Some(s) = set(&node) {
                    let _ = s.remove(&name);
                }
            }
            Undo::BitmapRestore { node, name, old } => {
                if let Some(s) = set(&node) {
                    let _ = s.restore(&name, old);
                }
            }
            Undo::BitmapEnabled { node, name, was } => {
                if let Some(s) = set(&node) {
                    let _ = if was {
                        s.enable(&name)
                    } else {
                        s.disable(&name)
                    };
                }
            }
            // An external snapshot that succeeded stays in place: QEMU pivots back here.
            Undo::Snapshot | Undo::Backup(_) => {}
        }
    }
}
