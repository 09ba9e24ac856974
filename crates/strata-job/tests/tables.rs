//! The state tables cell by cell against tables written out independently here (as in
//! §2.2/§2.3 of the QEMU reference), and a property test of random verb sequences on a
//! real `JobManager` against a small reference model of the state machine.

mod common;

use common::{Plan, TestJob, manager};
use proptest::prelude::*;
use std::time::Duration;
use strata_job::{
    JobManager, JobOptions, JobStatus, JobVerb, MemorySink, TRANSITIONS, VERBS, VerbError,
    can_transition, verb_allowed,
};

fn status(name: &str) -> JobStatus {
    name.parse().unwrap()
}

/// §2.2, row by row: from → allowed targets.
const STT: [(&str, &[&str]); 11] = [
    ("undefined", &["created"]),
    ("created", &["running", "aborting", "null"]),
    ("running", &["paused", "ready", "waiting", "aborting"]),
    ("paused", &["running"]),
    ("ready", &["standby", "waiting", "aborting"]),
    ("standby", &["ready"]),
    ("waiting", &["pending", "aborting"]),
    ("pending", &["aborting", "concluded"]),
    ("aborting", &["aborting", "concluded"]),
    ("concluded", &["null"]),
    ("null", &[]),
];

/// §2.3 as printed: verb → the statuses (C R P Y S W D X E N) accepting it.
const VERB_TABLE: [(&str, &str); 8] = [
    ("cancel", "y y y y y y y - - -"),
    ("pause", "y y y y y - - - - -"),
    ("resume", "y y y y y - - - - -"),
    ("set-speed", "y y y y y - - - - -"),
    ("complete", "- - - y y - - - - -"),
    ("finalize", "- - - - - - y - - -"),
    ("dismiss", "- - - - - - - - y -"),
    ("change", "y y y y y - - - - -"),
];

#[test]
fn transition_table_cell_by_cell() {
    for (from, allowed) in STT {
        for to in JobStatus::ALL {
            let want = allowed.contains(&to.as_str());
            let f = status(from);
            assert_eq!(TRANSITIONS[f.index()][to.index()], want, "{from} -> {to}");
            assert_eq!(can_transition(f, to), want, "{from} -> {to}");
        }
    }
}

#[test]
fn verb_table_cell_by_cell() {
    let columns = [
        "created",
        "running",
        "paused",
        "ready",
        "standby",
        "waiting",
        "pending",
        "aborting",
        "concluded",
        "null",
    ];
    for (verb_name, cells) in VERB_TABLE {
        let verb = JobVerb::ALL
            .into_iter()
            .find(|v| v.as_str() == verb_name)
            .unwrap();
        // Nothing is accepted in undefined.
        assert!(!verb_allowed(verb, JobStatus::Undefined));
        assert!(!VERBS[verb.index()][JobStatus::Undefined.index()]);
        for (col, cell) in columns.iter().zip(cells.split(' ')) {
            let want = cell == "y";
            let s = status(col);
            assert_eq!(VERBS[verb.index()][s.index()], want, "{verb_name} in {col}");
            assert_eq!(verb_allowed(verb, s), want, "{verb_name} in {col}");
        }
    }
}

#[test]
fn qapi_spellings() {
    let names: Vec<_> = JobStatus::ALL.iter().map(|s| s.as_str()).collect();
    assert_eq!(
        names,
        [
            "undefined",
            "created",
            "running",
            "paused",
            "ready",
            "standby",
            "waiting",
            "pending",
            "aborting",
            "concluded",
            "null"
        ]
    );
    for s in JobStatus::ALL {
        assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
    }
    for v in JobVerb::ALL {
        assert_eq!(serde_json::to_value(v).unwrap(), v.as_str());
    }
    for t in strata_job::JobType::ALL {
        assert_eq!(serde_json::to_value(t).unwrap(), t.as_str());
        assert_eq!(
            t.is_block_job(),
            ["backup", "commit", "mirror", "stream"].contains(&t.as_str())
        );
    }
    assert_eq!(JobVerb::SetSpeed.as_str(), "set-speed");
    assert_eq!(
        strata_job::JobType::SnapshotDelete.as_str(),
        "snapshot-delete"
    );
}

#[derive(Debug, Clone)]
enum Op {
    Pause,
    BlockPause,
    Resume,
    Cancel { force: bool },
    JobCancel,
    Complete,
    Finalize,
    Dismiss,
    SetSpeed(i64),
    Change,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        Just(Op::Pause),
        Just(Op::BlockPause),
        Just(Op::Resume),
        any::<bool>().prop_map(|force| Op::Cancel { force }),
        Just(Op::JobCancel),
        Just(Op::Complete),
        Just(Op::Finalize),
        Just(Op::Dismiss),
        (-2i64..3).prop_map(Op::SetSpeed),
        Just(Op::Change),
    ]
}

/// The reference model of a mirror-like job (READY at once; soft cancel in READY =
/// complete without pivot) with auto-finalize and auto-dismiss off.
struct Model {
    status: JobStatus,
    user_paused: bool,
    cancelled: bool,
    completing: bool,
    gone: bool,
}

const ID: &str = "j";

fn generic(s: &str) -> Result<(), VerbError> {
    Err(VerbError::generic(s))
}

impl Model {
    fn verb(&self, v: JobVerb) -> Result<(), VerbError> {
        if verb_allowed(v, self.status) {
            Ok(())
        } else {
            generic(&format!(
                "Job '{ID}' in state '{}' cannot accept command verb '{}'",
                self.status.as_str(),
                v.as_str()
            ))
        }
    }

    fn not_found(block: bool) -> Result<(), VerbError> {
        if block {
            Err(VerbError::block_job_not_found(ID))
        } else {
            generic("Job not found")
        }
    }

    fn apply(&mut self, op: &Op) -> Result<(), VerbError> {
        let block = matches!(
            op,
            Op::BlockPause | Op::Cancel { .. } | Op::SetSpeed(_) | Op::Change
        );
        if self.gone {
            return Self::not_found(block);
        }
        match op {
            Op::Pause | Op::BlockPause => {
                self.verb(JobVerb::Pause)?;
                if self.user_paused {
                    return generic("Job is already paused");
                }
                self.user_paused = true;
                if self.status == JobStatus::Ready {
                    self.status = JobStatus::Standby;
                }
            }
            Op::Resume => {
                if !self.user_paused {
                    return generic("Can't resume a job that was not paused");
                }
                self.verb(JobVerb::Resume)?;
                self.user_paused = false;
                self.unpark();
            }
            Op::Cancel { force } => {
                if self.user_paused && !force {
                    return generic(&format!(
                        "The block job for device '{ID}' is currently paused"
                    ));
                }
                self.verb(JobVerb::Cancel)?;
                self.cancel(*force);
            }
            Op::JobCancel => {
                self.verb(JobVerb::Cancel)?;
                self.cancel(true);
            }
            Op::Complete => {
                self.verb(JobVerb::Complete)?;
                if self.cancelled {
                    return generic(&format!("The active block job '{ID}' cannot be completed"));
                }
                self.completing = true;
                if self.status == JobStatus::Ready {
                    self.status = JobStatus::Pending;
                }
            }
            Op::Finalize => {
                self.verb(JobVerb::Finalize)?;
                self.status = JobStatus::Concluded;
            }
            Op::Dismiss => {
                self.verb(JobVerb::Dismiss)?;
                self.gone = true;
            }
            Op::SetSpeed(s) => {
                self.verb(JobVerb::SetSpeed)?;
                if *s < 0 {
                    return generic("Parameter 'speed' expects a non-negative value");
                }
            }
            Op::Change => {
                self.verb(JobVerb::Change)?;
                return generic("Job type does not support change");
            }
        }
        Ok(())
    }

    /// The pause ended: a READY job resumes, or finishes if completion was requested.
    fn unpark(&mut self) {
        if self.status == JobStatus::Standby {
            self.status = if self.completing {
                JobStatus::Pending
            } else {
                JobStatus::Ready
            };
        }
    }

    fn cancel(&mut self, force: bool) {
        let effective = force || !self.status.is_ready();
        if self.status == JobStatus::Pending {
            // Work is over: a soft cancel is ignored, a forced one aborts.
            if effective {
                self.cancelled = true;
                self.status = JobStatus::Concluded;
            }
            return;
        }
        self.user_paused = false;
        self.cancelled = true;
        if effective {
            self.status = JobStatus::Concluded;
        } else {
            self.completing = true;
            self.unpark();
            if self.status == JobStatus::Ready {
                self.status = JobStatus::Pending;
            }
        }
    }

    fn expected_status(&self) -> JobStatus {
        if self.gone {
            JobStatus::Null
        } else {
            self.status
        }
    }
}

fn apply_real(m: &JobManager, op: &Op) -> Result<(), VerbError> {
    match op {
        Op::Pause => m.job_pause(ID),
        Op::BlockPause => m.block_job_pause(ID),
        Op::Resume => m.job_resume(ID),
        Op::Cancel { force } => m.block_job_cancel(ID, *force),
        Op::JobCancel => m.job_cancel(ID),
        Op::Complete => m.job_complete(ID),
        Op::Finalize => m.job_finalize(ID),
        Op::Dismiss => m.job_dismiss(ID),
        Op::SetSpeed(s) => m.block_job_set_speed(ID, *s),
        Op::Change => m.block_job_change(ID, &serde_json::json!({"type": "mirror"})),
    }
}

async fn settle(m: &JobManager, want: JobStatus) -> Result<(), String> {
    if tokio::time::timeout(Duration::from_secs(2), m.wait_status(ID, want))
        .await
        .is_err()
    {
        return Err(format!("wanted {want}, have {:?}", m.job_status(ID)));
    }
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
    let now = m.job_status(ID).unwrap_or(JobStatus::Null);
    if now != want {
        return Err(format!("wanted {want}, moved on to {now}"));
    }
    Ok(())
}

/// Every JOB_STATUS_CHANGE must be a legal transition from the previous status.
fn check_transitions(sink: &MemorySink) -> Result<(), String> {
    let mut cur = JobStatus::Undefined;
    for (name, data) in sink.events() {
        if name != "JOB_STATUS_CHANGE" {
            continue;
        }
        let next = status(data["status"].as_str().unwrap());
        if cur == next || !can_transition(cur, next) {
            return Err(format!("illegal event {cur} -> {next}"));
        }
        cur = next;
    }
    Ok(())
}

fn run_case(ops: Vec<Op>) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let (m, sink) = manager();
        let mut plan = Plan::mirror();
        plan.chunks = 0;
        let mut opts = JobOptions::new(ID);
        opts.auto_finalize = false;
        opts.auto_dismiss = false;
        m.create(opts, TestJob::new(plan)).unwrap();
        m.start(ID).unwrap();
        let mut model = Model {
            status: JobStatus::Ready,
            user_paused: false,
            cancelled: false,
            completing: false,
            gone: false,
        };
        settle(&m, JobStatus::Ready).await?;
        for (i, op) in ops.iter().enumerate() {
            let want = model.apply(op);
            let got = apply_real(&m, op);
            if want != got {
                return Err(format!("step {i} {op:?}: model {want:?}, real {got:?}"));
            }
            settle(&m, model.expected_status())
                .await
                .map_err(|e| format!("step {i} {op:?}: {e}"))?;
            check_transitions(&sink)?;
        }
        m.cancel_all_and_wait().await;
        check_transitions(&sink)?;
        // Exactly one completion event, and it is CANCELLED iff a forced cancel won.
        let ends: Vec<_> = sink
            .events()
            .into_iter()
            .filter(|(n, _)| *n == "BLOCK_JOB_COMPLETED" || *n == "BLOCK_JOB_CANCELLED")
            .collect();
        if ends.len() != 1 {
            return Err(format!("completion events: {ends:?}"));
        }
        Ok(())
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn random_verb_sequences_follow_the_model(ops in proptest::collection::vec(op(), 1..14)) {
        if let Err(e) = run_case(ops) {
            prop_assert!(false, "{}", e);
        }
    }
}
