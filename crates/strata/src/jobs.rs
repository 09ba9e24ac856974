//! The image tool's long copies run as jobs on the same machinery as the daemon's
//! (`strata_blockjobs::offline`): `convert` as a mirror-type job, `commit` as a commit job.
//! The copy engine's own error is handed back unchanged, so messages stay qemu-img's.
//! (`rebase` still calls `rebase_data` directly: its stream of futures is not `Send`, which a
//! job body must be.)

use std::sync::Arc;

use parking_lot::Mutex;
use strata_blockjobs::offline::{JobHooks, run_job};
use strata_core::{Error, NodeRef, Result};
use strata_graph::{CopyOptions, CopyStats, copy_image};
use strata_job::JobType;

/// Run `work` as a job of type `kind`; its error comes back as it was.
async fn as_job<F>(kind: JobType, work: F) -> Result<CopyStats>
where
    F: FnOnce(JobHooks) -> futures::future::BoxFuture<'static, Result<CopyStats>> + Send + 'static,
{
    let out: Arc<Mutex<Option<Result<CopyStats>>>> = Arc::new(Mutex::new(None));
    let slot = out.clone();
    let job = run_job(
        kind,
        0,
        Box::new(move |hooks: JobHooks| {
            Box::pin(async move {
                let r = work(hooks).await;
                let status = r.as_ref().map(|_| ()).map_err(Clone::clone);
                *slot.lock() = Some(r);
                status
            })
        }),
    )
    .await;
    let result = out.lock().take();
    match (job, result) {
        (_, Some(r)) => r,
        (Err(e), None) => Err(Error::invalid(e)),
        (Ok(()), None) => Err(Error::invalid("the job ended without running")),
    }
}

/// `copy_image` as a job; `opts.progress` keeps working (the job also tracks progress).
pub async fn copy(
    kind: JobType,
    source: NodeRef,
    target: NodeRef,
    mut opts: CopyOptions,
) -> Result<CopyStats> {
    as_job(kind, move |h| {
        Box::pin(async move {
            opts.gate = Some(h.gate);
            opts.cancel = Some(h.cancel);
            let user = opts.progress.take();
            let job = h.progress;
            opts.progress = Some(Arc::new(move |done, total| {
                job(done, total);
                if let Some(p) = &user {
                    p(done, total);
                }
            }));
            copy_image(&source, &target, &opts).await
        })
    })
    .await
}
