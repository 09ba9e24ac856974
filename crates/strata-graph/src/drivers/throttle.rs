//! The `throttle` filter and `throttle-group` objects (QEMU's `block/throttle.c`,
//! `block/throttle-groups.c` and the leaky buckets of `util/throttle.c`).
//!
//! A [`ThrottleGroup`] holds one set of [`ThrottleLimits`] and one set of leaky buckets,
//! shared by every [`ThrottleNode`] in the group. A request that may not go yet waits in its
//! node's FIFO queue for its direction (read or write); when the buckets allow another
//! request, the group serves the members with waiting requests in turn (round robin), one
//! request each, so one busy node cannot starve the others.
//!
//! The bucket arithmetic is QEMU's: each bucket leaks at `avg` units per second; a request
//! may start while the level is at most the bucket size (`max * burst_length`, or
//! `avg / 10` when no burst is configured) and then adds its bytes (or its operations,
//! counted in `iops-size` units) to the level. With `-max-length` above 1 a second level
//! (`burst_level`) leaking at `max` per second keeps bursts at the `max` rate.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::forward_to_child;
use parking_lot::Mutex;
use serde_json::Value;
use strata_core::{BlockNode, BoxFuture, IoBuf, NodeRef, WriteFlags, ZeroFlags};
use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;

/// QEMU's `THROTTLE_VALUE_MAX`: the largest rate or burst a bucket accepts.
pub const THROTTLE_VALUE_MAX: u64 = 1_000_000_000_000_000;

const NANOS_PER_SEC: f64 = 1e9;

/// QEMU's `ThrottleLimits` (QAPI spelling in the comments). A value of 0 means "no limit";
/// every `*_max_length` defaults to 1 (second).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThrottleLimits {
    /// `iops-total`: operations per second, reads and writes together.
    pub iops_total: u64,
    /// `iops-total-max`: burst rate for `iops-total`.
    pub iops_total_max: u64,
    /// `iops-total-max-length`: seconds the `iops-total-max` burst may last.
    pub iops_total_max_length: u64,
    /// `iops-read`.
    pub iops_read: u64,
    /// `iops-read-max`.
    pub iops_read_max: u64,
    /// `iops-read-max-length`.
    pub iops_read_max_length: u64,
    /// `iops-write`.
    pub iops_write: u64,
    /// `iops-write-max`.
    pub iops_write_max: u64,
    /// `iops-write-max-length`.
    pub iops_write_max_length: u64,
    /// `bps-total`: bytes per second, reads and writes together.
    pub bps_total: u64,
    /// `bps-total-max`.
    pub bps_total_max: u64,
    /// `bps-total-max-length`.
    pub bps_total_max_length: u64,
    /// `bps-read`.
    pub bps_read: u64,
    /// `bps-read-max`.
    pub bps_read_max: u64,
    /// `bps-read-max-length`.
    pub bps_read_max_length: u64,
    /// `bps-write`.
    pub bps_write: u64,
    /// `bps-write-max`.
    pub bps_write_max: u64,
    /// `bps-write-max-length`.
    pub bps_write_max_length: u64,
    /// `iops-size`: a request larger than this counts as `size / iops-size` operations.
    pub iops_size: u64,
}

impl Default for ThrottleLimits {
    /// No limits (QEMU's `throttle_config_init`).
    fn default() -> Self {
        ThrottleLimits {
            iops_total: 0,
            iops_total_max: 0,
            iops_total_max_length: 1,
            iops_read: 0,
            iops_read_max: 0,
            iops_read_max_length: 1,
            iops_write: 0,
            iops_write_max: 0,
            iops_write_max_length: 1,
            bps_total: 0,
            bps_total_max: 0,
            bps_total_max_length: 1,
            bps_read: 0,
            bps_read_max: 0,
            bps_read_max_length: 1,
            bps_write: 0,
            bps_write_max: 0,
            bps_write_max_length: 1,
            iops_size: 0,
        }
    }
}

/// The buckets, in QEMU's `BucketType` order.
const BPS_TOTAL: usize = 0;
const BPS_READ: usize = 1;
const BPS_WRITE: usize = 2;
const OPS_TOTAL: usize = 3;
const OPS_READ: usize = 4;
const OPS_WRITE: usize = 5;

/// One bucket's configuration: `(avg, max, burst_length)`.
type BucketCfg = (u64, u64, u64);

/// What a member of a `ThrottleLimits` sets.
#[derive(Clone, Copy)]
enum Field {
    Avg(usize),
    Max(usize),
    Length(usize),
    IopsSize,
}

/// Every member with its QAPI name.
const FIELDS: &[(&str, Field)] = &[
    ("iops-total", Field::Avg(OPS_TOTAL)),
    ("iops-total-max", Field::Max(OPS_TOTAL)),
    ("iops-total-max-length", Field::Length(OPS_TOTAL)),
    ("iops-read", Field::Avg(OPS_READ)),
    ("iops-read-max", Field::Max(OPS_READ)),
    ("iops-read-max-length", Field::Length(OPS_READ)),
    ("iops-write", Field::Avg(OPS_WRITE)),
    ("iops-write-max", Field::Max(OPS_WRITE)),
    ("iops-write-max-length", Field::Length(OPS_WRITE)),
    ("bps-total", Field::Avg(BPS_TOTAL)),
    ("bps-total-max", Field::Max(BPS_TOTAL)),
    ("bps-total-max-length", Field::Length(BPS_TOTAL)),
    ("bps-read", Field::Avg(BPS_READ)),
    ("bps-read-max", Field::Max(BPS_READ)),
    ("bps-read-max-length", Field::Length(BPS_READ)),
    ("bps-write", Field::Avg(BPS_WRITE)),
    ("bps-write-max", Field::Max(BPS_WRITE)),
    ("bps-write-max-length", Field::Length(BPS_WRITE)),
    ("iops-size", Field::IopsSize),
];

impl ThrottleLimits {
    /// Parse a QAPI `ThrottleLimits` object (members absent = no limit) and validate it.
    pub fn from_json(v: &Value) -> Result<ThrottleLimits, String> {
        ThrottleLimits::default().merged_with_json(v)
    }

    /// These limits with the members present in `v` replaced, validated: what `qom-set` of
    /// a group's `limits` property does (QEMU's `throttle_group_set_limits`).
    pub fn merged_with_json(&self, v: &Value) -> Result<ThrottleLimits, String> {
        let obj = v
            .as_object()
            .ok_or("Invalid parameter type for 'limits', expected: object")?;
        let mut out = *self;
        // Members are applied in QEMU's order (the max-length range checks come first).
        for (name, field) in FIELDS {
            let Some(val) = obj.get(*name) else {
                continue;
            };
            let n = val
                .as_i64()
                .or_else(|| val.as_u64().map(|u| u as i64))
                .ok_or_else(|| format!("Invalid parameter type for '{name}', expected: integer"))?;
            if matches!(field, Field::Length(_)) && n > i64::from(u32::MAX) {
                return Err(format!(
                    "{name} value must be in the range [0, {}]",
                    u32::MAX
                ));
            }
            // QAPI ints land in unsigned fields, as in QEMU: negative values wrap and are
            // then refused by the range check.
            out.set(*field, n as u64);
        }
        if let Some(k) = obj.keys().find(|k| !FIELDS.iter().any(|(n, _)| n == k)) {
            return Err(format!("Parameter '{k}' is unexpected"));
        }
        out.validate()?;
        Ok(out)
    }

    /// The limits as a QAPI object with every member (QEMU's `throttle_config_to_limits`).
    pub fn to_json(&self) -> Value {
        let mut m = serde_json::Map::new();
        for (name, field) in FIELDS {
            m.insert((*name).to_string(), Value::from(self.get(*field)));
        }
        Value::Object(m)
    }

    fn slot(&mut self, f: Field) -> &mut u64 {
        let l = self;
        match f {
            Field::Avg(BPS_TOTAL) => &mut l.bps_total,
            Field::Avg(BPS_READ) => &mut l.bps_read,
            Field::Avg(BPS_WRITE) => &mut l.bps_write,
            Field::Avg(OPS_TOTAL) => &mut l.iops_total,
            Field::Avg(OPS_READ) => &mut l.iops_read,
            Field::Avg(_) => &mut l.iops_write,
            Field::Max(BPS_TOTAL) => &mut l.bps_total_max,
            Field::Max(BPS_READ) => &mut l.bps_read_max,
            Field::Max(BPS_WRITE) => &mut l.bps_write_max,
            Field::Max(OPS_TOTAL) => &mut l.iops_total_max,
            Field::Max(OPS_READ) => &mut l.iops_read_max,
            Field::Max(_) => &mut l.iops_write_max,
            Field::Length(BPS_TOTAL) => &mut l.bps_total_max_length,
            Field::Length(BPS_READ) => &mut l.bps_read_max_length,
            Field::Length(BPS_WRITE) => &mut l.bps_write_max_length,
            Field::Length(OPS_TOTAL) => &mut l.iops_total_max_length,
            Field::Length(OPS_READ) => &mut l.iops_read_max_length,
            Field::Length(_) => &mut l.iops_write_max_length,
            Field::IopsSize => &mut l.iops_size,
        }
    }

    fn set(&mut self, f: Field, v: u64) {
        *self.slot(f) = v;
    }

    fn get(&self, f: Field) -> u64 {
        let mut copy = *self;
        *copy.slot(f)
    }

    /// The six buckets' `(avg, max, burst_length)`.
    fn buckets(&self) -> [BucketCfg; 6] {
        std::array::from_fn(|i| {
            (
                self.get(Field::Avg(i)),
                self.get(Field::Max(i)),
                self.get(Field::Length(i)),
            )
        })
    }

    /// Whether any limit is set (QEMU's `throttle_enabled`).
    pub fn enabled(&self) -> bool {
        self.buckets().iter().any(|b| b.0 > 0)
    }

    /// QEMU's `throttle_is_valid`, with its messages.
    pub fn validate(&self) -> Result<(), String> {
        let b = self.buckets();
        let conflict = |t: usize, r: usize, w: usize, pick: fn(&BucketCfg) -> u64| {
            pick(&b[t]) != 0 && (pick(&b[r]) != 0 || pick(&b[w]) != 0)
        };
        if conflict(BPS_TOTAL, BPS_READ, BPS_WRITE, |c| c.0)
            || conflict(OPS_TOTAL, OPS_READ, OPS_WRITE, |c| c.0)
            || conflict(BPS_TOTAL, BPS_READ, BPS_WRITE, |c| c.1)
            || conflict(OPS_TOTAL, OPS_READ, OPS_WRITE, |c| c.1)
        {
            return Err(
                "bps/iops/max total values and read/write values cannot be used at the same time"
                    .into(),
            );
        }
        if self.iops_size != 0 && b[OPS_TOTAL].0 == 0 && b[OPS_READ].0 == 0 && b[OPS_WRITE].0 == 0 {
            return Err("iops size requires an iops value to be set".into());
        }
        for &(avg, max, len) in &b {
            if avg > THROTTLE_VALUE_MAX || max > THROTTLE_VALUE_MAX {
                return Err(format!(
                    "bps/iops/max values must be within [0, {THROTTLE_VALUE_MAX}]"
                ));
            }
            if len == 0 {
                return Err("the burst length cannot be 0".into());
            }
            if len > 1 && max == 0 {
                return Err("burst length set without burst rate".into());
            }
            if max != 0 && len > THROTTLE_VALUE_MAX / max {
                return Err("burst length too high for this burst rate".into());
            }
            if max != 0 && avg == 0 {
                return Err("bps_max/iops_max require corresponding bps/iops values".into());
            }
            if max != 0 && max < avg {
                return Err("bps_max/iops_max cannot be lower than bps/iops".into());
            }
        }
        Ok(())
    }
}

/// A leaky bucket (QEMU's `LeakyBucket`).
#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    avg: f64,
    max: f64,
    level: f64,
    burst_level: f64,
    burst_length: f64,
}

impl Bucket {
    fn leak(&mut self, delta_ns: f64) {
        self.level = (self.level - self.avg * delta_ns / NANOS_PER_SEC).max(0.0);
        if self.burst_length > 1.0 {
            self.burst_level = (self.burst_level - self.max * delta_ns / NANOS_PER_SEC).max(0.0);
        }
    }

    /// Nanoseconds to wait before the next request may start (QEMU's
    /// `throttle_compute_wait`).
    fn wait_ns(&self) -> f64 {
        if self.avg == 0.0 {
            return 0.0;
        }
        let (bucket_size, burst_bucket_size) = if self.max == 0.0 {
            // Short bursts of avg/10 are always allowed.
            (self.avg / 10.0, 0.0)
        } else {
            (self.max * self.burst_length, self.max / 10.0)
        };
        let extra = self.level - bucket_size;
        if extra > 0.0 {
            return extra * NANOS_PER_SEC / self.avg;
        }
        if self.burst_length > 1.0 {
            let extra = self.burst_level - burst_bucket_size;
            if extra > 0.0 {
                return extra * NANOS_PER_SEC / self.max;
            }
        }
        0.0
    }

    fn add(&mut self, units: f64) {
        self.level += units;
        if self.burst_length > 1.0 {
            self.burst_level += units;
        }
    }
}

/// Request direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    Read = 0,
    Write = 1,
}

/// The buckets of a group (QEMU's `ThrottleState`).
#[derive(Debug)]
struct ThrottleState {
    buckets: [Bucket; 6],
    op_size: u64,
    previous_leak: Instant,
}

impl ThrottleState {
    fn new(l: &ThrottleLimits) -> ThrottleState {
        let cfg = l.buckets();
        ThrottleState {
            buckets: std::array::from_fn(|i| Bucket {
                avg: cfg[i].0 as f64,
                max: cfg[i].1 as f64,
                burst_length: cfg[i].2 as f64,
                ..Default::default()
            }),
            op_size: l.iops_size,
            previous_leak: Instant::now(),
        }
    }

    fn leak(&mut self, now: Instant) {
        let delta = now.saturating_duration_since(self.previous_leak);
        self.previous_leak = now;
        if delta.is_zero() {
            return;
        }
        let ns = delta.as_nanos() as f64;
        for b in &mut self.buckets {
            b.leak(ns);
        }
    }

    fn checked(dir: Dir) -> [usize; 4] {
        match dir {
            Dir::Read => [BPS_TOTAL, OPS_TOTAL, BPS_READ, OPS_READ],
            Dir::Write => [BPS_TOTAL, OPS_TOTAL, BPS_WRITE, OPS_WRITE],
        }
    }

    /// Leak up to `now`, then how long a request in `dir` must wait.
    fn wait(&mut self, dir: Dir, now: Instant) -> Duration {
        self.leak(now);
        let ns = Self::checked(dir)
            .iter()
            .map(|&i| self.buckets[i].wait_ns())
            .fold(0.0, f64::max);
        Duration::from_nanos(ns.ceil() as u64)
    }

    /// Account a request of `size` bytes (QEMU's `throttle_account`).
    fn account(&mut self, dir: Dir, size: u64) {
        let units = if self.op_size != 0 && size > self.op_size {
            size as f64 / self.op_size as f64
        } else {
            1.0
        };
        let (bps, ops) = match dir {
            Dir::Read => (BPS_READ, OPS_READ),
            Dir::Write => (BPS_WRITE, OPS_WRITE),
        };
        for i in [BPS_TOTAL, bps] {
            self.buckets[i].add(size as f64);
        }
        for i in [OPS_TOTAL, ops] {
            self.buckets[i].add(units);
        }
    }
}

/// A request waiting for its turn.
#[derive(Debug)]
struct Waiter {
    size: u64,
    go: oneshot::Sender<()>,
}

/// The waiting requests of one direction.
#[derive(Debug, Default)]
struct Queues {
    /// Per member, its waiting requests in arrival order.
    members: HashMap<u64, VecDeque<Waiter>>,
    /// Members with waiting requests, in the order they get their next turn.
    turn: VecDeque<u64>,
    /// A dispatcher task is serving this direction.
    dispatching: bool,
}

#[derive(Debug)]
struct GroupInner {
    limits: ThrottleLimits,
    state: ThrottleState,
    queues: [Queues; 2],
}

/// A `throttle-group` object: limits shared by the `throttle` nodes that name it.
#[derive(Debug)]
pub struct ThrottleGroup {
    id: String,
    inner: Mutex<GroupInner>,
    /// Wakes a direction's dispatcher early (the limits changed).
    wake: [Notify; 2],
    next_member: AtomicU64,
}

impl ThrottleGroup {
    /// A group named `id` with `limits` (validate them first with
    /// [`ThrottleLimits::validate`] or [`ThrottleLimits::from_json`]).
    pub fn new(id: &str, limits: ThrottleLimits) -> Arc<ThrottleGroup> {
        Arc::new(ThrottleGroup {
            id: id.to_string(),
            inner: Mutex::new(GroupInner {
                limits,
                state: ThrottleState::new(&limits),
                queues: Default::default(),
            }),
            wake: [Notify::new(), Notify::new()],
            next_member: AtomicU64::new(0),
        })
    }

    /// The object id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The current limits.
    pub fn limits(&self) -> ThrottleLimits {
        self.inner.lock().limits
    }

    /// Replace the limits at runtime. The buckets start empty again (as QEMU's
    /// `throttle_config`), and requests already waiting are re-timed under the new limits.
    pub fn set_limits(&self, limits: ThrottleLimits) -> Result<(), String> {
        limits.validate()?;
        {
            let mut g = self.inner.lock();
            g.limits = limits;
            g.state = ThrottleState::new(&limits);
        }
        for w in &self.wake {
            w.notify_one();
        }
        Ok(())
    }

    /// Wait until a request of `size` bytes in `dir` from `member` may start, and account
    /// it. Requests queue behind earlier waiting requests of their direction.
    async fn intercept(self: &Arc<Self>, member: u64, dir: Dir, size: u64) {
        let rx = {
            let mut g = self.inner.lock();
            if !g.limits.enabled() && g.queues[dir as usize].turn.is_empty() {
                return;
            }
            let now = Instant::now();
            if g.queues[dir as usize].turn.is_empty() && g.state.wait(dir, now).is_zero() {
                g.state.account(dir, size);
                return;
            }
            let (tx, rx) = oneshot::channel();
            let q = &mut g.queues[dir as usize];
            let mine = q.members.entry(member).or_default();
            if mine.is_empty() {
                q.turn.push_back(member);
            }
            mine.push_back(Waiter { size, go: tx });
            if !q.dispatching {
                q.dispatching = true;
                tokio::spawn(Arc::clone(self).dispatch(dir));
            }
            rx
        };
        // The dispatcher only drops a sender after sending; a closed channel means the
        // runtime is shutting down, and the request may as well go.
        let _ = rx.await;
    }

    /// Serve the waiting requests of `dir` as the buckets allow (QEMU's timer callback and
    /// `schedule_next_request`), one request per member in turn.
    async fn dispatch(self: Arc<Self>, dir: Dir) {
        loop {
            let deadline = {
                let mut g = self.inner.lock();
                loop {
                    let g = &mut *g;
                    let q = &mut g.queues[dir as usize];
                    let Some(&member) = q.turn.front() else {
                        q.dispatching = false;
                        return;
                    };
                    let now = Instant::now();
                    let wait = g.state.wait(dir, now);
                    if !wait.is_zero() {
                        break now + wait;
                    }
                    q.turn.pop_front();
                    let mine = q
                        .members
                        .get_mut(&member)
                        .expect("member in turn has waiters");
                    let w = mine.pop_front().expect("member in turn has waiters");
                    if mine.is_empty() {
                        q.members.remove(&member);
                    } else {
                        q.turn.push_back(member);
                    }
                    // A caller that gave up (dropped its future) consumes nothing.
                    if w.go.send(()).is_ok() {
                        g.state.account(dir, w.size);
                    }
                }
            };
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => {}
                () = self.wake[dir as usize].notified() => {}
            }
        }
    }
}

/// A `throttle` filter node: requests to `file` pass through the group's limits.
#[derive(Debug)]
pub struct ThrottleNode {
    file: NodeRef,
    group: Arc<ThrottleGroup>,
    member: u64,
}

impl ThrottleNode {
    /// A filter over `file` in `group`.
    pub fn new(file: NodeRef, group: Arc<ThrottleGroup>) -> ThrottleNode {
        let member = group.next_member.fetch_add(1, Ordering::Relaxed);
        ThrottleNode {
            file,
            group,
            member,
        }
    }

    /// The group this node belongs to.
    pub fn group(&self) -> &Arc<ThrottleGroup> {
        &self.group
    }
}

impl BlockNode for ThrottleNode {
    fn driver(&self) -> &'static str {
        "throttle"
    }

    forward_to_child!(file =>
        filename, size, read_only, request_alignment, flush, block_status, truncate, file,
        debug_event, allocated_size, close, as_any,
    );

    fn read(&self, offset: u64, buf: IoBuf) -> BoxFuture<'_, IoBuf> {
        Box::pin(async move {
            let len = buf.len() as u64;
            self.group.intercept(self.member, Dir::Read, len).await;
            self.file.read(offset, buf).await
        })
    }

    fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> BoxFuture<'_, IoBuf> {
        Box::pin(async move {
            let len = buf.len() as u64;
            self.group.intercept(self.member, Dir::Write, len).await;
            self.file.write(offset, buf, flags).await
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.group.intercept(self.member, Dir::Write, len).await;
            self.file.write_zeroes(offset, len, flags).await
        })
    }

    fn discard(&self, offset: u64, len: u64) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.group.intercept(self.member, Dir::Write, len).await;
            self.file.discard(offset, len).await
        })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn parse_and_validate_like_qemu() {
        let l = ThrottleLimits::from_json(&json!({"bps-total": 1000, "iops-read": 5})).unwrap();
        assert_eq!(
            (l.bps_total, l.iops_read, l.bps_total_max_length),
            (1000, 5, 1)
        );
        let err = |v: Value| ThrottleLimits::from_json(&v).unwrap_err();
        assert_eq!(
            err(json!({"bps-total": 1, "bps-read": 1})),
            "bps/iops/max total values and read/write values cannot be used at the same time"
        );
        assert_eq!(
            err(json!({"iops-total-max": 10, "iops-write-max": 10, "iops-total": 1})),
            "bps/iops/max total values and read/write values cannot be used at the same time"
        );
        assert_eq!(
            err(json!({"bps-read-max": 10})),
            "bps_max/iops_max require corresponding bps/iops values"
        );
        assert_eq!(
            err(json!({"bps-read": 10, "bps-read-max": 5})),
            "bps_max/iops_max cannot be lower than bps/iops"
        );
        assert_eq!(
            err(json!({"bps-total": -1})),
            "bps/iops/max values must be within [0, 1000000000000000]"
        );
        assert_eq!(
            err(json!({"iops-total": 1_000_000_000_000_001u64})),
            "bps/iops/max values must be within [0, 1000000000000000]"
        );
        assert_eq!(
            err(json!({"bps-total": 10, "bps-total-max-length": 0})),
            "the burst length cannot be 0"
        );
        assert_eq!(
            err(json!({"bps-total": 10, "bps-total-max-length": 5})),
            "burst length set without burst rate"
        );
        assert_eq!(
            err(json!({"bps-total-max-length": 5_000_000_000u64})),
            "bps-total-max-length value must be in the range [0, 4294967295]"
        );
        assert_eq!(
            err(
                json!({"bps-total": 10, "bps-total-max": 1_000_000_000_000_000u64,
                       "bps-total-max-length": 2})
            ),
            "burst length too high for this burst rate"
        );
        assert_eq!(
            err(json!({"iops-size": 4096, "bps-total": 5})),
            "iops size requires an iops value to be set"
        );
        assert_eq!(err(json!({"bps": 5})), "Parameter 'bps' is unexpected");
        assert_eq!(
            err(json!({"bps-total": "5"})),
            "Invalid parameter type for 'bps-total', expected: integer"
        );
        // qom-set merges onto the current limits.
        let m = l.merged_with_json(&json!({"iops-read": 7})).unwrap();
        assert_eq!((m.bps_total, m.iops_read), (1000, 7));
        assert_eq!(ThrottleLimits::from_json(&m.to_json()).unwrap(), m);
    }

    #[test]
    fn bucket_wait_follows_qemu() {
        // avg 100/s, no burst: requests may start while level <= 10.
        let mut b = Bucket {
            avg: 100.0,
            burst_length: 1.0,
            ..Default::default()
        };
        b.add(10.0);
        assert_eq!(b.wait_ns(), 0.0);
        b.add(5.0);
        assert_eq!(b.wait_ns(), 5.0 * 1e9 / 100.0);
        b.leak(50e6);
        assert_eq!(b.wait_ns(), 0.0);
        // A 2-second burst at 200/s: main bucket 400, burst bucket 20.
        let mut b = Bucket {
            avg: 100.0,
            max: 200.0,
            burst_length: 2.0,
            ..Default::default()
        };
        b.add(20.0);
        assert_eq!(b.wait_ns(), 0.0);
        b.add(10.0);
        assert_eq!(b.wait_ns(), 10.0 * 1e9 / 200.0);
    }
}
