//! The CI mode of the crash harness: 20 kill points per operation, and the power-loss replay
//! of a short guest-write run.

use strata_crashtest::{killsweep, powerloss, powerloss_jobs};

#[test]
fn kill9_sweep_short() {
    if !strata_testkit::have("qemu-img") {
        eprintln!("qemu-img not installed; skipping");
        return;
    }
    assert!(
        killsweep::strata_bin().exists(),
        "build target/debug/strata first (cargo build -p strata)"
    );
    for op in killsweep::OPERATIONS {
        let r = killsweep::sweep(op, 7, 20);
        assert_eq!(r.states, 20);
        // Known, reported in docs/RELIABILITY.md §1: a kill before convert wrote the
        // output's header leaves a headerless file qemu-img probes as raw (check exit 63).
        let known = |f: &String| *op == "convert" && f.contains("exit Some(63)");
        let real: Vec<_> = r.failures.iter().filter(|f| !known(f)).collect();
        if real.len() != r.failures.len() {
            eprintln!("{op}: known check failures: {:#?}", r.failures);
        }
        assert!(real.is_empty(), "{op}: {real:#?}");
    }
}

#[test]
fn power_loss_replay_short() {
    let r = powerloss::guest_writes(7, 60, 20);
    assert!(r.states >= 200, "only {} crash states", r.states);
    assert!(r.failures.is_empty(), "{:#?}", r.failures);
}

#[test]
fn power_loss_stream_job_short() {
    let r = powerloss_jobs::stream_job(7, 6);
    eprintln!("{r:?}");
    assert!(r.states >= 60, "only {} crash states", r.states);
    assert!(r.failures.is_empty(), "{:#?}", r.failures);
}

#[test]
fn power_loss_commit_job_short() {
    let r = powerloss_jobs::commit_job(7, 6);
    eprintln!("{r:?}");
    assert!(r.states >= 60, "only {} crash states", r.states);
    assert!(r.failures.is_empty(), "{:#?}", r.failures);
}
