//! `drive-backup` and `drive-mirror`: create the target image as QEMU does (format default
//! = the source's, `mode` existing / absolute-paths, backing per sync mode), open it as a
//! node of its own, then run the same code as `blockdev-backup` / `blockdev-mirror`. The
//! target node belongs to the job: it goes away once nothing uses it after the job.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use strata_core::{BlockNode, NodeRef, Prealloc};
use strata_graph::{Graph, blockdev};

use super::{Args, Reply, arg_str, from_verb, generic, ok, opt_str};
use crate::daemon::Daemon;

/// Formats QEMU knows, for "Unknown file format" (Strata creates qcow2 and raw).
const QEMU_FORMATS: &[&str] = &[
    "blkdebug",
    "blklogwrites",
    "blkverify",
    "bochs",
    "cloop",
    "compress",
    "copy-before-write",
    "copy-on-read",
    "dmg",
    "file",
    "host_cdrom",
    "host_device",
    "luks",
    "nbd",
    "null-aio",
    "null-co",
    "nvme",
    "parallels",
    "preallocate",
    "qcow",
    "qcow2",
    "qed",
    "quorum",
    "raw",
    "replication",
    "snapshot-access",
    "throttle",
    "vdi",
    "vhdx",
    "vmdk",
    "vpc",
    "vvfat",
];

fn lookup(g: &Graph, device: &str) -> Result<String, String> {
    if g.node(device).is_some() {
        Ok(device.to_string())
    } else {
        Err(format!(
            "Cannot find device='{device}' nor node-name='{device}'"
        ))
    }
}

/// The node below `name`'s filters that holds its COW backing (`bdrv_cow_bs(bdrv_skip_filters)`).
fn cow_backing(g: &Graph, name: &str) -> Option<String> {
    let top = g.skip_filters(name);
    g.child(&top, "backing").map(|e| e.child.clone())
}

/// QEMU's `bdrv_img_create` for the formats Strata writes, with its "Formatting" line.
async fn img_create(
    path: &str,
    format: &str,
    backing: Option<(String, String)>,
    size: u64,
) -> Result<(), String> {
    if !QEMU_FORMATS.contains(&format) {
        return Err(format!("Unknown file format '{format}'"));
    }
    if format != "qcow2" && format != "raw" {
        return Err(format!(
            "Format '{format}' cannot be created by stratad (qcow2 and raw can)"
        ));
    }
    let b = backing
        .as_ref()
        .map(|(f, fmt)| format!(" backing_file={f} backing_fmt={fmt}"))
        .unwrap_or_default();
    if format == "qcow2" {
        println!(
            "Formatting '{path}', fmt=qcow2 cluster_size=65536 extended_l2=off compression_type=zlib size={size}{b} lazy_refcounts=off refcount_bits=16"
        );
    } else {
        println!("Formatting '{path}', fmt=raw size={size}");
    }
    let p = Path::new(path);
    let cant = |e: strata_core::Error| {
        let m = e.to_string();
        if m.starts_with("Could not create") {
            m
        } else {
            format!("Could not create '{path}': {m}")
        }
    };
    if format == "raw" {
        return strata_io::FileNode::create(p, size, Prealloc::Off)
            .await
            .map_err(cant);
    }
    strata_io::FileNode::create(p, 0, Prealloc::Off)
        .await
        .map_err(cant)?;
    let f: NodeRef = strata_io::FileNode::open(
        p,
        &strata_io::FileOptions {
            read_only: false,
            direct: false,
            aio: Default::default(),
        },
    )
    .map_err(|e| e.to_string())?;
    let (backing_file, backing_format) = backing.unzip();
    let co = strata_qcow2::CreateOptions {
        size,
        backing_file,
        backing_format,
        ..Default::default()
    };
    strata_qcow2::create(&f, &co, None)
        .await
        .map_err(|e| e.to_string())?;
    f.close().await.map_err(|e| e.to_string())
}

/// The format of an existing image (qcow2 by its magic, else raw), as QEMU's probe.
fn probe(path: &str) -> Result<&'static str, String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)
        .map_err(|e| format!("Could not open '{path}': {}", super::errno_text(&e)))?;
    let mut magic = [0u8; 4];
    Ok(match f.read_exact(&mut magic) {
        Ok(()) if &magic == b"QFI\xfb" => "qcow2",
        _ => "raw",
    })
}

/// Create (unless `existing`) and open the target image. `backing`: the node the new image
/// names as its backing file; `link_backing`: link the opened node to it.
async fn open_target(
    d: &Daemon,
    a: &Args,
    device: &str,
    backing: Option<&str>,
    link_backing: bool,
    extra: serde_json::Map<String, Value>,
) -> Result<String, String> {
    let path = arg_str(a, "target").to_string();
    let existing = opt_str(a, "mode") == Some("existing");
    let (size, src_fmt, backing_info) = {
        let g = d.env.graph.lock().await;
        let rec = g.node(device).expect("looked up");
        let b = backing
            .and_then(|b| g.node(b))
            .map(|r| (r.node.filename(), r.node.inner().driver().to_string()));
        (rec.node.size(), rec.node.inner().driver().to_string(), b)
    };
    let format = match opt_str(a, "format") {
        Some(f) => f.to_string(),
        None if existing => probe(&path)?.to_string(),
        None => src_fmt,
    };
    if !existing {
        img_create(&path, &format, backing_info, size).await?;
    } else if !QEMU_FORMATS.contains(&format.as_str()) {
        return Err(format!("Unknown file format '{format}'"));
    }
    let objects = d.graph_objects();
    let mut g = d.env.graph.lock().await;
    let mut opts = serde_json::Map::new();
    opts.insert("driver".into(), json!(format));
    if let Some(n) = opt_str(a, "node-name") {
        opts.insert("node-name".into(), json!(n));
    }
    opts.insert("file".into(), json!({"driver": "file", "filename": path}));
    if format == "qcow2" && (!existing || link_backing) {
        opts.insert("backing".into(), Value::Null);
    }
    opts.extend(extra);
    // The job's node, not the monitor's (QEMU: not deletable with blockdev-del).
    let node = blockdev::open_node(&mut g, &objects, &opts).await?;
    if link_backing
        && let Some(b) = backing
        && format == "qcow2"
        && let Err(e) = g.set_backing(&node, Some(b)).await
    {
        let _ = g.remove_node(&node).await;
        return Err(e);
    }
    Ok(node)
}

/// Drop the target node when the job is gone and nothing else uses it.
fn reap_after(d: &Arc<Daemon>, job_id: String, node: String) {
    let d = d.clone();
    tokio::spawn(async move {
        loop {
            if d.env.jobs.job_status(&job_id).is_none() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        remove_if_unused(&d, &node).await;
    });
}

async fn remove_if_unused(d: &Daemon, node: &str) {
    let mut g = d.env.graph.lock().await;
    let unused =
        g.node(node).is_some_and(|r| !r.monitor_owned) && g.parents_of(node).next().is_none();
    if unused {
        let _ = g.remove_node(node).await;
    }
}

pub async fn drive_backup(d: Arc<Daemon>, a: Args) -> Reply {
    let device = arg_str(&a, "device").to_string();
    let mut sync = arg_str(&a, "sync").to_string();
    let backing = {
        let g = d.env.graph.lock().await;
        lookup(&g, &device).map_err(generic)?;
        let mut b = None;
        if sync == "top" {
            b = cow_backing(&g, &device);
            if b.is_none() {
                sync = "full".into();
            }
        }
        if sync == "none" {
            b = Some(device.clone());
        }
        b
    };
    let existing = opt_str(&a, "mode") == Some("existing");
    let mut extra = serde_json::Map::new();
    extra.insert("discard".into(), json!("unmap"));
    extra.insert("detect-zeroes".into(), json!("unmap"));
    let t = open_target(
        &d,
        &a,
        &device,
        backing.as_deref(),
        backing.is_some() && !existing,
        extra,
    )
    .await
    .map_err(generic)?;
    let mut args = a.clone();
    for k in ["format", "mode"] {
        args.remove(k);
    }
    args.insert("sync".into(), json!(sync));
    args.insert("target".into(), json!(t));
    let job_id = opt_str(&a, "job-id").unwrap_or(&device).to_string();
    let r = strata_blockjobs::backup::blockdev_backup(&d.env, &args, None).await;
    if let Err(e) = r {
        remove_if_unused(&d, &t).await;
        return Err(from_verb(e));
    }
    reap_after(&d, job_id, t);
    Ok(ok())
}

pub async fn drive_mirror(d: Arc<Daemon>, a: Args) -> Reply {
    let device = arg_str(&a, "device").to_string();
    let mut sync = arg_str(&a, "sync").to_string();
    let existing = opt_str(&a, "mode") == Some("existing");
    let backing = {
        let g = d.env.graph.lock().await;
        super::snapshot_internal::root_node(&g, &device).map_err(generic)?;
        let mut b = cow_backing(&g, &device);
        if b.is_none() && sync == "top" {
            sync = "full".into();
        }
        if sync == "none" {
            b = Some(device.clone());
        }
        b
    };
    if opt_str(&a, "replaces").is_some() && opt_str(&a, "node-name").is_none() {
        return Err(generic(
            "a node-name must be provided when replacing a named node of the graph",
        ));
    }
    if let Some(n) = opt_str(&a, "node-name")
        && d.env.graph.lock().await.node(n).is_some()
    {
        return Err(generic(format!("Duplicate nodes with node-name='{n}'")));
    }
    // sync=full (or nothing below) → a new image without backing; else one naming the
    // source's backing (or the source, for none). After completion the target's backing
    // is the source's base (absolute-paths) or what its header names (existing): linking
    // now gives the same chain, and blockdev-mirror leaves it in place.
    let new_backing = if sync == "full" {
        None
    } else {
        backing.clone()
    };
    let t = open_target(
        &d,
        &a,
        &device,
        new_backing.as_deref(),
        !existing && new_backing.is_some(),
        serde_json::Map::new(),
    )
    .await
    .map_err(generic)?;
    let mut args = a.clone();
    for k in ["format", "mode", "node-name", "unmap"] {
        args.remove(k);
    }
    args.insert("sync".into(), json!(sync));
    args.insert("target".into(), json!(t));
    let job_id = opt_str(&a, "job-id").unwrap_or(&device).to_string();
    if let Err(e) = strata_blockjobs::mirror::blockdev_mirror(&d.env, &args).await {
        remove_if_unused(&d, &t).await;
        return Err(from_verb(e));
    }
    reap_after(&d, job_id, t);
    Ok(ok())
}

#[cfg(test)]
mod tests {
    #[test]
    fn unknown_formats_are_named() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let e = rt
            .block_on(super::img_create("/nonexistent/x", "bogus", None, 1 << 20))
            .unwrap_err();
        assert_eq!(e, "Unknown file format 'bogus'");
    }
}
