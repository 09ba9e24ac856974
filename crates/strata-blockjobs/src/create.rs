//! `blockdev-create` and `x-blockdev-amend` as jobs (types `create` and `amend`): not block
//! jobs, so they only report JOB_STATUS_CHANGE, finalize on their own and wait in CONCLUDED
//! for `job-dismiss` (QEMU's defaults for these two).

use std::path::Path;
use std::sync::Arc;

use serde_json::{Map, Value};
use strata_core::{NodeRef, Prealloc};
use strata_job::{BoxFuture, JobContext, JobDriver, JobFailure, JobOptions, JobType};
use strata_qcow2::{CompressionType, CreateOptions, Qcow2};

use crate::env::{BlockJobEnv, CmdError, generic};

/// What a create job makes.
#[derive(Debug)]
enum Target {
    /// A host file.
    File {
        filename: String,
        size: u64,
        prealloc: Prealloc,
    },
    /// A qcow2 image in an existing node (and its data file node).
    Qcow2 {
        file: NodeRef,
        data_file: Option<NodeRef>,
        opts: Box<CreateOptions>,
    },
}

/// The `create` job.
#[derive(Debug)]
struct CreateJob {
    target: Target,
}

impl JobDriver for CreateJob {
    fn job_type(&self) -> JobType {
        JobType::Create
    }

    fn run(self: Arc<Self>, ctx: JobContext) -> BoxFuture<'static, Result<(), JobFailure>> {
        Box::pin(async move {
            ctx.progress_set_total(1);
            let r = match &self.target {
                Target::File {
                    filename,
                    size,
                    prealloc,
                } => strata_io::FileNode::create(Path::new(filename), *size, *prealloc).await,
                Target::Qcow2 {
                    file,
                    data_file,
                    opts,
                } => strata_qcow2::create(file, opts, data_file.as_ref()).await,
            };
            r.map_err(|e| JobFailure::new(e.to_string()))?;
            ctx.progress_update(1);
            Ok(())
        })
    }
}

fn u64_of(o: &Map<String, Value>, key: &str) -> Option<u64> {
    o.get(key).and_then(Value::as_u64)
}

fn str_of<'a>(o: &'a Map<String, Value>, key: &str) -> Option<&'a str> {
    o.get(key).and_then(Value::as_str)
}

/// Look up a `BlockdevRef` that must name an existing node (create does not open inline
/// options).
async fn node_ref(env: &BlockJobEnv, r: Option<&Value>) -> Result<Option<NodeRef>, CmdError> {
    let Some(r) = r else { return Ok(None) };
    let Some(name) = r.as_str() else {
        return Err(generic(
            "blockdev-create needs node names for 'file' and 'data-file'",
        ));
    };
    let g = env.graph.lock().await;
    match g.node(name) {
        Some(n) => Ok(Some(n.node.clone() as NodeRef)),
        None => Err(generic(format!(
            "Cannot find device='{name}' nor node-name='{name}'"
        ))),
    }
}

fn prealloc(o: &Map<String, Value>) -> Prealloc {
    str_of(o, "preallocation")
        .and_then(Prealloc::parse)
        .unwrap_or(Prealloc::Off)
}

fn job_options(args: &Map<String, Value>) -> JobOptions {
    JobOptions {
        id: str_of(args, "job-id").unwrap_or_default().to_string(),
        auto_finalize: true,
        auto_dismiss: false,
        speed: 0,
        txn: None,
    }
}

/// `blockdev-create {job-id, options}`.
pub async fn blockdev_create(env: &BlockJobEnv, args: &Map<String, Value>) -> Result<(), CmdError> {
    let opts = args
        .get("options")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    let driver = str_of(&opts, "driver").unwrap_or_default();
    let target = match driver {
        "file" => Target::File {
            filename: str_of(&opts, "filename").unwrap_or_default().to_string(),
            size: u64_of(&opts, "size").unwrap_or(0),
            prealloc: prealloc(&opts),
        },
        "qcow2" => {
            let file = node_ref(env, opts.get("file"))
                .await?
                .expect("schema: file is mandatory");
            let data_file = node_ref(env, opts.get("data-file")).await?;
            let co = CreateOptions {
                size: u64_of(&opts, "size").unwrap_or(0),
                cluster_size: u64_of(&opts, "cluster-size").unwrap_or(65536),
                compat_v3: str_of(&opts, "version") != Some("v2"),
                refcount_bits: u64_of(&opts, "refcount-bits").unwrap_or(16) as u32,
                extended_l2: opts
                    .get("extended-l2")
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
                lazy_refcounts: opts
                    .get("lazy-refcounts")
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
                compression_type: match str_of(&opts, "compression-type") {
                    Some("zstd") => CompressionType::Zstd,
                    _ => CompressionType::Zlib,
                },
                preallocation: prealloc(&opts),
                backing_file: str_of(&opts, "backing-file").map(str::to_string),
                backing_format: str_of(&opts, "backing-fmt").map(str::to_string),
                data_file: data_file.as_ref().map(|d| d.filename()),
                data_file_raw: opts
                    .get("data-file-raw")
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
            };
            Target::Qcow2 {
                file,
                data_file,
                opts: Box::new(co),
            }
        }
        other => {
            return Err(generic(format!(
                "Driver '{other}' does not support image creation"
            )));
        }
    };
    let o = job_options(args);
    let id = o.id.clone();
    env.jobs.create(o, Arc::new(CreateJob { target }))?;
    env.jobs.start(&id)?;
    Ok(())
}

/// The `amend` job.
#[derive(Debug)]
struct AmendJob {
    node: NodeRef,
    opts: strata_qcow2::AmendOptions,
}

impl JobDriver for AmendJob {
    fn job_type(&self) -> JobType {
        JobType::Amend
    }

    fn run(self: Arc<Self>, ctx: JobContext) -> BoxFuture<'static, Result<(), JobFailure>> {
        Box::pin(async move {
            ctx.progress_set_total(1);
            let driver = strata_graph::driver_of(&self.node);
            let Some(q) = driver.as_any().downcast_ref::<Qcow2>() else {
                return Err(JobFailure::new("Driver does not support amend"));
            };
            q.amend(&self.opts)
                .await
                .map_err(|e| JobFailure::new(e.to_string()))?;
            ctx.progress_update(1);
            Ok(())
        })
    }
}

/// `x-blockdev-amend {job-id, node-name, options, force?}`.
pub async fn blockdev_amend(env: &BlockJobEnv, args: &Map<String, Value>) -> Result<(), CmdError> {
    let name = str_of(args, "node-name").unwrap_or_default();
    let node = {
        let g = env.graph.lock().await;
        match g.node(name) {
            Some(n) => n.node.clone() as NodeRef,
            None => {
                return Err(generic(format!(
                    "Cannot find device='{name}' nor node-name='{name}'"
                )));
            }
        }
    };
    let opts = args
        .get("options")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    if str_of(&opts, "driver") != Some(node.driver()) {
        return Err(generic(
            "Cannot change the driver of a node with x-blockdev-amend",
        ));
    }
    if node.driver() != "qcow2" {
        return Err(generic(format!(
            "Driver {} does not support amend",
            node.driver()
        )));
    }
    let ao = strata_qcow2::AmendOptions {
        data_file: str_of(&opts, "data-file").map(str::to_string),
        ..Default::default()
    };
    let o = job_options(args);
    let id = o.id.clone();
    env.jobs.create(o, Arc::new(AmendJob { node, opts: ao }))?;
    env.jobs.start(&id)?;
    Ok(())
}
