//! Job commands: the job-starting block commands (delegated to `strata-blockjobs`), the
//! generic `job-*` verbs and the `block-job-*` flavours, and the two job queries.

use std::sync::Arc;

use serde_json::Value;

use super::{Args, Reply, arg_str, from_verb, ok, opt_bool};
use crate::daemon::Daemon;

pub async fn block_stream(d: Arc<Daemon>, a: Args) -> Reply {
    strata_blockjobs::stream::block_stream(&d.env, &a)
        .await
        .map_err(from_verb)?;
    Ok(ok())
}

pub async fn block_commit(d: Arc<Daemon>, a: Args) -> Reply {
    strata_blockjobs::commit::block_commit(&d.env, &a)
        .await
        .map_err(from_verb)?;
    Ok(ok())
}

pub async fn blockdev_mirror(d: Arc<Daemon>, a: Args) -> Reply {
    strata_blockjobs::mirror::blockdev_mirror(&d.env, &a)
        .await
        .map_err(from_verb)?;
    Ok(ok())
}

pub async fn blockdev_backup(d: Arc<Daemon>, a: Args) -> Reply {
    strata_blockjobs::backup::blockdev_backup(&d.env, &a, None)
        .await
        .map_err(from_verb)?;
    Ok(ok())
}

macro_rules! verbs {
    ($($name:ident => $method:ident($key:literal),)*) => {
        $(
            pub async fn $name(d: Arc<Daemon>, a: Args) -> Reply {
                d.env.jobs.$method(arg_str(&a, $key)).map_err(from_verb)?;
                Ok(ok())
            }
        )*
    };
}

verbs! {
    job_pause => job_pause("id"),
    job_resume => job_resume("id"),
    job_cancel => job_cancel("id"),
    job_complete => job_complete("id"),
    job_finalize => job_finalize("id"),
    job_dismiss => job_dismiss("id"),
    block_job_pause => block_job_pause("device"),
    block_job_resume => block_job_resume("device"),
    block_job_complete => block_job_complete("device"),
    block_job_finalize => block_job_finalize("id"),
    block_job_dismiss => block_job_dismiss("id"),
}

pub async fn block_job_set_speed(d: Arc<Daemon>, a: Args) -> Reply {
    let speed = a.get("speed").and_then(Value::as_i64).unwrap_or(0);
    d.env
        .jobs
        .block_job_set_speed(arg_str(&a, "device"), speed)
        .map_err(from_verb)?;
    Ok(ok())
}

pub async fn block_job_cancel(d: Arc<Daemon>, a: Args) -> Reply {
    let force = opt_bool(&a, "force").unwrap_or(false);
    d.env
        .jobs
        .block_job_cancel(arg_str(&a, "device"), force)
        .map_err(from_verb)?;
    Ok(ok())
}

pub async fn block_job_change(d: Arc<Daemon>, a: Args) -> Reply {
    d.env
        .jobs
        .block_job_change(arg_str(&a, "id"), &Value::Object(a.clone()))
        .map_err(from_verb)?;
    Ok(ok())
}

pub async fn query_jobs(d: Arc<Daemon>, _a: Args) -> Reply {
    Ok(Value::Array(d.env.jobs.query_jobs()))
}

pub async fn query_block_jobs(d: Arc<Daemon>, _a: Args) -> Reply {
    Ok(Value::Array(d.env.jobs.query_block_jobs()))
}
