//! `blockdev-backup` (job type `backup`): a point-in-time copy of `device` to `target`.
//!
//! A `copy-before-write` filter ([`strata_graph::drivers::copy_before_write`]) is inserted
//! above `device`: from then on, guest writes first copy the old data of the clusters they
//! touch to the target. The job copies, in the background, everything else the sync mode
//! selects (full: the whole disk; top: what the top image allocates; bitmap/incremental: the
//! dirty areas of the frozen bitmap), with up to `max-workers` chunks in flight, skipping
//! clusters already copied. `sync: none` copies nothing itself and runs until cancelled
//! (fleecing / push backup). Every cancel is forced (BLOCK_JOB_CANCELLED).
//!
//! The command is a one-action transaction: [`backup_prepare`] makes every check in QEMU's
//! order with its texts and changes the graph (bitmap successor, filter, job pins) with the
//! job created but not started; [`BackupAction::commit`] starts it, [`BackupAction::abort`]
//! rolls everything back. A `transaction` with `completion-mode: grouped` passes one
//! [`TxnId`] to every backup action it prepares.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use serde_json::{Map, Value, json};
use strata_core::bitmap::{BitmapSet, CheckFlags};
use strata_core::error::strerror;
use strata_core::{BlockNode, NodeRef};
use strata_graph::drivers::block_copy::{BlockCopyState, CopyOp};
use strata_graph::drivers::copy_before_write::{CbwNode, CbwOptions, CbwShared};
use strata_graph::graph::valid_node_name;
use strata_graph::perm::EdgeKind;
use strata_graph::{EdgeId, EdgePerms, GraphNode, Link, NodeKind, NodeRec, Use, User};
use strata_job::{
    BoxFuture, ErrorAction, IoOperation, JobContext, JobDriver, JobFailure, JobOptions, JobStatus,
    JobType, OnError, TxnId,
};
use tokio::sync::Notify;
use tokio::task::JoinSet;

use crate::env::{BlockJobEnv, CmdError, SharedGraph, generic};

/// QAPI `MirrorSyncMode` as backup uses it (`incremental` becomes `Bitmap` + on-success).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    /// The whole disk.
    Full,
    /// What the top image allocates.
    Top,
    /// Nothing in the background (copy-before-write only).
    None,
    /// The dirty areas of the bitmap.
    Bitmap,
}

/// QAPI `BitmapSyncMode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BitmapMode {
    /// Synchronise the bitmap only if the job succeeds.
    OnSuccess,
    /// Use the bitmap read-only.
    Never,
    /// Synchronise it even on failure.
    Always,
}

impl BitmapMode {
    fn parse(s: &str) -> Option<BitmapMode> {
        Some(match s {
            "on-success" => BitmapMode::OnSuccess,
            "never" => BitmapMode::Never,
            "always" => BitmapMode::Always,
            _ => return None,
        })
    }

    fn as_str(self) -> &'static str {
        match self {
            BitmapMode::OnSuccess => "on-success",
            BitmapMode::Never => "never",
            BitmapMode::Always => "always",
        }
    }
}

fn parse_on_error(args: &Map<String, Value>, key: &str) -> Result<OnError, CmdError> {
    match args.get(key) {
        None => Ok(OnError::Report),
        Some(v) => serde_json::from_value(v.clone()).map_err(|_| {
            generic(format!(
                "Parameter '{key}' does not accept value '{}'",
                plain(v)
            ))
        }),
    }
}

fn plain(v: &Value) -> String {
    v.as_str().map_or_else(|| v.to_string(), str::to_string)
}

fn opt_str<'a>(args: &'a Map<String, Value>, key: &str) -> Option<&'a str> {
    args.get(key).and_then(Value::as_str)
}

fn opt_bool(args: &Map<String, Value>, key: &str, default: bool) -> bool {
    args.get(key).and_then(Value::as_bool).unwrap_or(default)
}

/// `BackupPerf` (`x-perf`).
#[derive(Debug, Clone, Copy)]
struct Perf {
    max_workers: i64,
    max_chunk: i64,
    min_cluster_size: u64,
}

/// The frozen bitmap a backup consumes.
#[derive(Debug)]
struct SyncBitmap {
    set: Arc<BitmapSet>,
    name: String,
    mode: BitmapMode,
}

/// The running backup.
struct BackupJob {
    graph: SharedGraph,
    cbw_name: String,
    cbw: Arc<CbwShared>,
    bcs: Arc<BlockCopyState>,
    /// The device (for sync=top's allocation test: its own layer only).
    top: NodeRef,
    sync: SyncMode,
    bitmap: Option<SyncBitmap>,
    on_source_error: OnError,
    on_target_error: OnError,
    max_workers: usize,
    pins: Mutex<Vec<EdgeId>>,
    bitmap_done: AtomicBool,
    cleaned: AtomicBool,
    cleaned_notify: Notify,
}

impl std::fmt::Debug for BackupJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackupJob")
            .field("cbw", &self.cbw_name)
            .field("sync", &self.sync)
            .finish_non_exhaustive()
    }
}

impl BackupJob {
    /// QEMU's `backup_cleanup_sync_bitmap` (once).
    fn cleanup_sync_bitmap(&self, success: bool) {
        let Some(b) = &self.bitmap else { return };
        if self.bitmap_done.swap(true, Ordering::SeqCst) {
            return;
        }
        let sync = (success || b.mode == BitmapMode::Always) && b.mode != BitmapMode::Never;
        let _ = if sync {
            b.set.abdicate(&b.name)
        } else {
            b.set.reclaim(&b.name)
        };
        if !success && b.mode == BitmapMode::Always {
            // The bits the job did not manage to copy stay dirty.
            let left = self.bcs.dirty_bitmap();
            let _ = b.set.merge(&b.name, &[&left]);
        }
    }

    /// Take the filter and the job's pins out of the graph (once).
    async fn cleanup_graph(&self) {
        if self.cleaned.load(Ordering::SeqCst) {
            return;
        }
        {
            let mut g = self.graph.lock().await;
            for id in self.pins.lock().drain(..) {
                g.remove_edge(id);
            }
            let _ = g.remove_filter(&self.cbw_name).await;
        }
        self.cleaned.store(true, Ordering::SeqCst);
        self.cleaned_notify.notify_waiters();
    }

    async fn wait_cleaned(&self) {
        loop {
            let n = self.cleaned_notify.notified();
            if self.cleaned.load(Ordering::SeqCst) {
                return;
            }
            n.await;
        }
    }

    fn report(&self, ctx: &JobContext, reported: &mut u64) {
        let now = self.bcs.copied();
        if now > *reported {
            ctx.progress_update(now - *reported);
            *reported = now;
        }
    }

    /// sync=top: clusters the top image does not allocate need no copying.
    async fn skip_unallocated(&self, ctx: &JobContext) -> Result<(), JobFailure> {
        let size = self.bcs.size();
        let mut pos = 0;
        while pos < size {
            if ctx.is_force_cancelled() {
                return Err(JobFailure::canceled());
            }
            let ext = self
                .top
                .block_status(pos, size - pos)
                .await
                .map_err(|e| JobFailure::new(strerror(e.kind().errno())))?;
            let n = ext.len.clamp(1, size - pos);
            let st = ext.status;
            if !(st.allocated || st.data || st.zero) {
                self.bcs.reset(pos, n);
            }
            pos += n;
            ctx.progress_set_total(self.bcs.dirty_count() + self.bcs.copied());
            ctx.pause_point().await;
        }
        Ok(())
    }

    async fn work(self: Arc<Self>, ctx: JobContext) -> Result<(), JobFailure> {
        let mut reported = 0;
        ctx.pause_point().await;
        ctx.progress_set_total(self.bcs.dirty_count() + self.bcs.copied());
        self.report(&ctx, &mut reported);
        if self.sync == SyncMode::None {
            while !ctx.is_force_cancelled() {
                ctx.sleep_or_wake(Duration::from_millis(100)).await;
                self.report(&ctx, &mut reported);
            }
            return Err(JobFailure::canceled());
        }
        if self.sync == SyncMode::Top {
            self.skip_unallocated(&ctx).await?;
        }
        let chunk = self.bcs.chunk_size();
        let mut failure: Option<String> = None;
        let mut tasks: JoinSet<(
            u64,
            Result<(), strata_graph::drivers::block_copy::CopyError>,
        )> = JoinSet::new();
        'passes: loop {
            let mut pos = 0;
            let mut filling = true;
            loop {
                while filling && tasks.len() < self.max_workers {
                    if ctx.is_force_cancelled() {
                        filling = false;
                        break;
                    }
                    match self.bcs.next_dirty_area(pos, chunk) {
                        Some((o, l)) => {
                            pos = o + l;
                            // Under a speed limit a copy starts only when the limit has
                            // room; unlimited, it is accounted (a yield) as it completes.
                            let admitted = ctx.speed() > 0;
                            if admitted {
                                ctx.rate_admit(l).await;
                            }
                            let bcs = self.bcs.clone();
                            tasks.spawn(async move {
                                let acct = if admitted { 0 } else { l };
                                (acct, bcs.copy_range(o, l).await)
                            });
                            if admitted {
                                // Reap and report before waiting for room for the next.
                                break;
                            }
                        }
                        None => filling = false,
                    }
                }
                let Some(done) = tasks.join_next().await else {
                    break;
                };
                self.report(&ctx, &mut reported);
                let (acct, r) = done.map_err(|_| JobFailure::new("Job panicked"))?;
                match r {
                    Ok(()) => ctx.rate_limit(acct).await,
                    // After a failure the workers still running only drain: the policy (and
                    // the client, with one BLOCK_JOB_ERROR) hears of the first error, as qsd.
                    Err(_) if failure.is_some() => {}
                    Err(e) => {
                        let (policy, op) = match e.op {
                            CopyOp::Read => (self.on_source_error, IoOperation::Read),
                            CopyOp::Write => (self.on_target_error, IoOperation::Write),
                        };
                        let errno = e.error.kind().errno();
                        match ctx.handle_error(policy, op, errno) {
                            ErrorAction::Report => {
                                failure.get_or_insert_with(|| strerror(errno));
                                filling = false;
                            }
                            ErrorAction::Ignore | ErrorAction::Stop => ctx.pause_point().await,
                        }
                    }
                }
                if ctx.is_force_cancelled() {
                    filling = false;
                }
            }
            if failure.is_some() || ctx.is_force_cancelled() || self.bcs.dirty_count() == 0 {
                break 'passes;
            }
            // Failed ranges are dirty again: another pass retries them.
            ctx.rate_limit(0).await;
        }
        self.report(&ctx, &mut reported);
        if ctx.is_force_cancelled() {
            return Err(JobFailure::canceled());
        }
        if let Some(f) = failure {
            return Err(JobFailure::new(f));
        }
        self.cbw
            .target()
            .flush()
            .await
            .map_err(|e| JobFailure::new(strerror(e.kind().errno())))?;
        Ok(())
    }
}

impl JobDriver for BackupJob {
    fn job_type(&self) -> JobType {
        JobType::Backup
    }

    fn run(self: Arc<Self>, ctx: JobContext) -> BoxFuture<'static, Result<(), JobFailure>> {
        Box::pin(self.work(ctx))
    }

    fn commit(&self, _ctx: &JobContext) {
        self.cleanup_sync_bitmap(true);
    }

    fn abort(&self, _ctx: &JobContext) {
        self.cleanup_sync_bitmap(false);
    }

    fn clean<'a>(&'a self, _ctx: &'a JobContext) -> BoxFuture<'a, ()> {
        Box::pin(self.cleanup_graph())
    }
}

/// A prepared backup action: the job exists (CREATED) and the graph is changed; commit
/// starts it, abort rolls it back.
#[derive(Debug)]
pub struct BackupAction {
    env: BlockJobEnv,
    job_id: String,
    job: Arc<BackupJob>,
}

impl BackupAction {
    /// The job id.
    pub fn job_id(&self) -> &str {
        &self.job_id
    }

    /// The copy-before-write filter's node name.
    pub fn filter_node_name(&self) -> &str {
        &self.job.cbw_name
    }

    /// Start the job (the transaction committed). As in QEMU, the job starts inside the
    /// transaction's drained section: it parks at its first pause point (`paused`) and
    /// runs on when the section ends (`running`).
    pub async fn commit(self) -> Result<(), CmdError> {
        let jobs = &self.env.jobs;
        let id = self.job_id.as_str();
        jobs.pause_internal(id)?;
        if let Err(e) = jobs.start(id) {
            let _ = jobs.resume_internal(id);
            return Err(e);
        }
        tokio::select! {
            _ = jobs.wait_status(id, JobStatus::Paused) => {}
            _ = jobs.wait_status(id, JobStatus::Aborting) => {}
            _ = jobs.wait_status(id, JobStatus::Concluded) => {}
            _ = jobs.wait_status(id, JobStatus::Null) => {}
        }
        let _ = jobs.resume_internal(id);
        Ok(())
    }

    /// Roll back (the transaction failed): the never-started job is cancelled, which
    /// reclaims the bitmap and removes the filter. Call without holding the graph lock.
    pub async fn abort(self) {
        if self.env.jobs.job_cancel(&self.job_id).is_err() {
            // The job is gone already; undo what is left directly.
            self.job.cleanup_sync_bitmap(false);
            self.job.cleanup_graph().await;
        }
        self.job.wait_cleaned().await;
        let (jobs, id) = (&self.env.jobs, self.job_id.as_str());
        tokio::select! {
            _ = jobs.wait_status(id, JobStatus::Concluded) => {}
            _ = jobs.wait_status(id, JobStatus::Null) => {}
        }
    }
}

/// `blockdev-backup` as a one-action transaction (or one action of a grouped
/// transaction when `txn` is given: then the caller should rather use [`backup_prepare`]
/// and commit/abort with the other actions). Call without holding the graph lock.
pub async fn blockdev_backup(
    env: &BlockJobEnv,
    args: &Map<String, Value>,
    txn: Option<TxnId>,
) -> Result<(), CmdError> {
    backup_prepare(env, args, txn).await?.commit().await
}

/// The checks of `blockdev-backup` in QEMU's order, then the graph changes: freeze the
/// bitmap, insert the copy-before-write filter, create the job (not started) and pin its
/// nodes. On error everything done so far is undone.
pub async fn backup_prepare(
    env: &BlockJobEnv,
    args: &Map<String, Value>,
    txn: Option<TxnId>,
) -> Result<BackupAction, CmdError> {
    let mut g = env.graph.lock().await;
    let device = opt_str(args, "device").ok_or_else(|| generic("Parameter 'device' is missing"))?;
    let target = opt_str(args, "target").ok_or_else(|| generic("Parameter 'target' is missing"))?;
    let sync_s = opt_str(args, "sync").ok_or_else(|| generic("Parameter 'sync' is missing"))?;
    let lookup = |n: &str| {
        g.node(n)
            .map(|r| r.node.clone())
            .ok_or_else(|| generic(format!("Cannot find device='{n}' nor node-name='{n}'")))
    };
    let dev_node = lookup(device)?;
    let tgt_node = lookup(target)?;
    // A backup only reads its device: with Strata's `x-parallel` another job may hold it as
    // its main node, whose view that job keeps (not as a base it writes into).
    if opt_bool(args, "x-parallel", false) {
        crate::chain::check_held_only_as(&g, device, &["main node"])?;
    } else {
        crate::chain::check_not_busy(&g, device)?;
    }
    crate::chain::check_not_busy(&g, target)?;

    let sync = match sync_s {
        "full" => SyncMode::Full,
        "top" => SyncMode::Top,
        "none" => SyncMode::None,
        "bitmap" | "incremental" => SyncMode::Bitmap,
        other => {
            return Err(generic(format!(
                "Parameter 'sync' does not accept value '{other}'"
            )));
        }
    };
    let bitmap_name = opt_str(args, "bitmap");
    let mut bitmap_mode = match args.get("bitmap-mode") {
        None => None,
        Some(v) => Some(BitmapMode::parse(&plain(v)).ok_or_else(|| {
            generic(format!(
                "Parameter 'bitmap-mode' does not accept value '{}'",
                plain(v)
            ))
        })?),
    };
    let on_source_error = parse_on_error(args, "on-source-error")?;
    let on_target_error = parse_on_error(args, "on-target-error")?;
    let speed = args.get("speed").and_then(Value::as_i64).unwrap_or(0);
    let compress = opt_bool(args, "compress", false);
    let discard_source = opt_bool(args, "discard-source", false);
    let auto_finalize = opt_bool(args, "auto-finalize", true);
    let auto_dismiss = opt_bool(args, "auto-dismiss", true);
    let job_id = opt_str(args, "job-id").unwrap_or("").to_string();
    let filter_name = opt_str(args, "filter-node-name").map(str::to_string);
    let xp = args.get("x-perf").and_then(Value::as_object);
    let perf = Perf {
        max_workers: xp
            .and_then(|p| p.get("max-workers"))
            .and_then(Value::as_i64)
            .unwrap_or(64),
        max_chunk: xp
            .and_then(|p| p.get("max-chunk"))
            .and_then(Value::as_i64)
            .unwrap_or(0),
        min_cluster_size: xp
            .and_then(|p| p.get("min-cluster-size"))
            .and_then(Value::as_u64)
            .unwrap_or(0),
    };

    if sync == SyncMode::Bitmap && bitmap_name.is_none() {
        return Err(generic(format!(
            "must provide a valid bitmap name for '{sync_s}' sync mode"
        )));
    }
    if sync_s == "incremental" {
        if bitmap_mode.is_some_and(|m| m != BitmapMode::OnSuccess) {
            return Err(generic(
                "Bitmap sync mode must be 'on-success' when using sync mode 'incremental'",
            ));
        }
        bitmap_mode = Some(BitmapMode::OnSuccess);
    }
    let sync_name = match sync {
        SyncMode::Full => "full",
        SyncMode::Top => "top",
        SyncMode::None => "none",
        SyncMode::Bitmap => "bitmap",
    };
    let dev_bitmaps = dev_node.bitmaps();
    if let Some(name) = bitmap_name {
        if !dev_bitmaps.contains(name) {
            return Err(generic(format!("Bitmap '{name}' could not be found")));
        }
        let Some(mode) = bitmap_mode else {
            return Err(generic(
                "Bitmap sync mode must be given when providing a bitmap",
            ));
        };
        dev_bitmaps
            .check(name, CheckFlags::ALLOW_RO)
            .map_err(|e| generic(first_line(e.message())))?;
        if sync == SyncMode::None {
            return Err(generic(
                "sync mode 'none' does not produce meaningful bitmap outputs",
            ));
        }
        if mode == BitmapMode::Never && sync != SyncMode::Bitmap {
            return Err(generic(format!(
                "Bitmap sync mode '{}' has no meaningful effect when combined with sync mode '{sync_name}'",
                mode.as_str()
            )));
        }
    }
    if bitmap_name.is_none() && bitmap_mode.is_some() {
        return Err(generic("Cannot specify bitmap sync mode without a bitmap"));
    }
    // backup_job_create
    if device == target {
        return Err(generic("Source and target cannot be the same"));
    }
    if compress
        && strata_graph::Qcow2Compressed::new(&strata_graph::driver_of(
            &(tgt_node.clone() as NodeRef),
        ))
        .is_none()
    {
        // QEMU names the target's BlockBackend, which a node in the daemon does not have.
        return Err(generic("Compression is not supported for this drive "));
    }
    if perf.max_workers < 1 || perf.max_workers > i64::from(i32::MAX) {
        return Err(generic(format!(
            "max-workers must be between 1 and {}",
            i32::MAX
        )));
    }
    if perf.max_chunk < 0 {
        return Err(generic(
            "max-chunk must be zero (which means no limit) or positive",
        ));
    }
    let mut frozen: Option<SyncBitmap> = None;
    if let (Some(name), Some(mode)) = (bitmap_name, bitmap_mode) {
        if mode != BitmapMode::Never {
            dev_bitmaps
                .check(name, CheckFlags::DEFAULT)
                .map_err(|e| generic(first_line(e.message())))?;
        }
        dev_bitmaps
            .create_successor(name)
            .map_err(|e| generic(e.message()))?;
        frozen = Some(SyncBitmap {
            set: dev_bitmaps.clone(),
            name: name.to_string(),
            mode,
        });
    }
    let reclaim = |frozen: &Option<SyncBitmap>| {
        if let Some(b) = frozen {
            let _ = b.set.reclaim(&b.name);
        }
    };
    if dev_node.size() != tgt_node.size() {
        reclaim(&frozen);
        return Err(generic("Source and target image have different sizes"));
    }

    // bdrv_cbw_append: the filter node, its edges, then the insertion above the device.
    let cbw_name = match &filter_name {
        Some(n) if !valid_node_name(n) => {
            reclaim(&frozen);
            return Err(generic(format!("Invalid node-name: '{n}'")));
        }
        Some(n) => n.clone(),
        None => g.auto_name(),
    };
    let file_link = Link::new(dev_node.clone());
    let target_link = Link::new(tgt_node.clone());
    let cbw_opts = CbwOptions {
        min_cluster_size: perf.min_cluster_size,
        discard_source,
        compress,
        max_chunk: perf.max_chunk.max(0) as u64,
        ..Default::default()
    };
    let cbw_node = match CbwNode::new(file_link.clone(), target_link.clone(), cbw_opts) {
        Ok(n) => n,
        Err(e) => {
            reclaim(&frozen);
            return Err(generic(format!("Could not create node: {}", e.message())));
        }
    };
    let shared = cbw_node.shared();
    let bcs = shared.block_copy().clone();
    let read_only = g.node(device).is_some_and(|r| r.read_only);
    if let Err(e) = g.insert_node(NodeRec {
        name: cbw_name.clone(),
        auto_named: filter_name.is_none(),
        node: GraphNode::new(&cbw_name, Arc::new(cbw_node)),
        kind: NodeKind::Filter,
        options: json!({"driver": "copy-before-write", "node-name": cbw_name, "file": device, "target": target}),
        read_only,
        monitor_owned: false,
    }) {
        reclaim(&frozen);
        return Err(generic(e));
    }
    let attach = async |g: &mut strata_graph::Graph| -> Result<(), String> {
        g.add_edge(
            User::Node(cbw_name.clone()),
            device,
            "file",
            EdgePerms::Derived(EdgeKind::Filtered),
            Some(file_link.clone()),
        )?;
        g.add_edge(
            User::Node(cbw_name.clone()),
            target,
            "target",
            EdgePerms::Fixed(Use::CbwTarget.perms()),
            Some(target_link.clone()),
        )?;
        g.insert_filter(&cbw_name, device).await
    };
    if let Err(e) = attach(&mut g).await {
        let _ = g.remove_node(&cbw_name).await;
        reclaim(&frozen);
        return Err(generic(e));
    }
    let undo_filter = async |g: &mut strata_graph::Graph, frozen: &Option<SyncBitmap>| {
        let _ = g.remove_filter(&cbw_name).await;
        reclaim(frozen);
    };

    let cluster = bcs.cluster_size();
    if perf.max_chunk != 0 && (perf.max_chunk as u64) < cluster {
        undo_filter(&mut g, &frozen).await;
        return Err(generic(format!(
            "Required max-chunk ({}) is less than backup cluster size ({cluster})",
            perf.max_chunk
        )));
    }
    // backup_init_bcs_bitmap: what the job copies (the filter copies the same).
    match (&frozen, sync) {
        (Some(b), SyncMode::Bitmap) => {
            let snap = b.set.snapshot(&b.name);
            bcs.set_dirty_from(snap.as_ref());
        }
        _ => bcs.set_dirty_from(None),
    }
    let job = Arc::new(BackupJob {
        graph: env.graph.clone(),
        cbw_name: cbw_name.clone(),
        cbw: shared,
        bcs,
        top: dev_node.clone(),
        sync,
        bitmap: frozen,
        on_source_error,
        on_target_error,
        max_workers: perf.max_workers as usize,
        pins: Mutex::new(Vec::new()),
        bitmap_done: AtomicBool::new(false),
        cleaned: AtomicBool::new(false),
        cleaned_notify: Notify::new(),
    });
    let opts = JobOptions {
        id: job_id.clone(),
        auto_finalize,
        auto_dismiss,
        speed: speed.max(0) as u64,
        txn,
    };
    if let Err(e) = env.jobs.create(opts, job.clone()) {
        let _ = g.remove_filter(&cbw_name).await;
        job.cleanup_sync_bitmap(false);
        return Err(e);
    }
    if speed < 0 {
        // block_job_create sets the speed after creating the job: created → null.
        let _ = env.jobs.early_fail(&job_id);
        let _ = g.remove_filter(&cbw_name).await;
        job.cleanup_sync_bitmap(false);
        return Err(generic("Parameter 'speed' expects a non-negative value"));
    }
    // The job's pins: its main node (the filter) and the target.
    let user = User::Job {
        kind: "backup",
        id: job_id.clone(),
    };
    let pins = [
        g.add_edge(
            user.clone(),
            &cbw_name,
            "main node",
            EdgePerms::Fixed(Use::JobMain.perms()),
            None,
        ),
        g.add_edge(
            user,
            target,
            "target",
            EdgePerms::Fixed(Use::JobTarget.perms()),
            None,
        ),
    ];
    for p in pins {
        match p {
            Ok(id) => job.pins.lock().push(id),
            Err(e) => {
                drop(g);
                let action = BackupAction {
                    env: env.clone(),
                    job_id,
                    job,
                };
                action.abort().await;
                return Err(generic(e));
            }
        }
    }
    drop(g);
    Ok(BackupAction {
        env: env.clone(),
        job_id,
        job,
    })
}

/// QMP shows the first line of a multi-line error (hints go elsewhere).
fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or_default().to_string()
}
