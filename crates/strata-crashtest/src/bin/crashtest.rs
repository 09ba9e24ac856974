//! `crashtest [--long] [--seed N]`: the kill -9 sweep and the power-loss replay, with the
//! figures of each. Short mode: 20 kill points per operation and 20 variants per flush
//! epoch; `--long`: 200 kill points, and at least 10,000 replayed crash states (each of the
//! guest-writes, the stream-job and the commit-job replay).

use std::time::Instant;

use strata_crashtest::{Tally, killsweep, powerloss, powerloss_jobs};

fn main() {
    let mut long = false;
    let mut seed = 1u64;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--long" => long = true,
            "--seed" => match args.next().and_then(|s| s.parse().ok()) {
                Some(s) => seed = s,
                None => {
                    eprintln!("crashtest: --seed needs a number");
                    std::process::exit(2);
                }
            },
            _ => {
                eprintln!("usage: crashtest [--long] [--seed N]");
                std::process::exit(2);
            }
        }
    }
    let (points, writes, variants) = if long { (200, 400, 80) } else { (20, 60, 20) };
    let (job_variants, job_states) = if long { (100, 10_000) } else { (20, 1) };
    let mut all = Tally::default();
    let t = Instant::now();
    let r = powerloss::guest_writes(seed, writes, variants);
    report("power-loss guest-writes", &r, t);
    all.absorb(r);
    let t = Instant::now();
    let r = powerloss_jobs::stream_jobs_at_least(seed, job_variants, job_states);
    report("power-loss stream-job", &r, t);
    all.absorb(r);
    let t = Instant::now();
    let r = powerloss_jobs::commit_jobs_at_least(seed, job_variants, job_states);
    report("power-loss commit-job", &r, t);
    all.absorb(r);
    for op in killsweep::OPERATIONS {
        let t = Instant::now();
        let r = killsweep::sweep(op, seed, points);
        report(&format!("kill -9 {op}"), &r, t);
        all.absorb(r);
    }
    for f in &all.failures {
        println!("FAIL {f}");
    }
    std::process::exit(i32::from(!all.failures.is_empty()));
}

fn report(name: &str, r: &Tally, t: Instant) {
    println!(
        "{name}: {} states, {} leaks-only, {} failures, {:.1}s",
        r.states,
        r.leaks_only,
        r.failures.len(),
        t.elapsed().as_secs_f64()
    );
}
