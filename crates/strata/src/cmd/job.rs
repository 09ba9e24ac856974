//! `strata job`: a client for a running daemon (stratad or qemu-storage-daemon) — list jobs
//! with progress, watch them to the end, pause/resume/cancel/complete/finalize/dismiss, set
//! the speed, and print events as they come (what `virsh blockjob` gives libvirt users).

use std::io::{BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use clap::{Args as ClapArgs, Subcommand};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde_json::{Value, json};

use crate::cli::{CmdResult, Fail};

/// Arguments of `strata job`.
#[derive(Debug, ClapArgs)]
pub struct Args {
    /// The daemon's QMP socket (`--chardev socket,path=...`).
    #[arg(short = 's', long = "socket")]
    socket: String,
    #[command(subcommand)]
    action: Action,
}

#[derive(Debug, Subcommand)]
enum Action {
    /// List jobs with their state and progress.
    List,
    /// Show progress bars until every job has finished.
    Watch,
    /// Print events as they arrive (one JSON object per line) until interrupted.
    Events,
    /// Pause a job.
    Pause { id: String },
    /// Resume a paused job.
    Resume { id: String },
    /// Cancel a job (`--force` abandons a READY mirror without its final sync).
    Cancel {
        id: String,
        #[arg(long)]
        force: bool,
    },
    /// Complete a READY job (pivot).
    Complete { id: String },
    /// Finalize a PENDING job.
    Finalize { id: String },
    /// Dismiss a CONCLUDED job.
    Dismiss { id: String },
    /// Set a block job's speed limit in bytes per second (0 = unlimited).
    SetSpeed { id: String, speed: i64 },
}

/// A minimal QMP client: one request at a time; events are kept for whoever wants them.
struct Qmp {
    out: UnixStream,
    input: serde_json::StreamDeserializer<
        'static,
        serde_json::de::IoRead<BufReader<UnixStream>>,
        Value,
    >,
    events: Vec<Value>,
}

impl Qmp {
    fn connect(path: &str) -> Result<Qmp, Fail> {
        let s = UnixStream::connect(path)
            .map_err(|e| Fail::msg(format!("Could not connect to '{path}': {e}")))?;
        let input = serde_json::Deserializer::from_reader(BufReader::new(
            s.try_clone().map_err(|e| Fail::msg(e.to_string()))?,
        ))
        .into_iter();
        let mut q = Qmp {
            out: s,
            input,
            events: Vec::new(),
        };
        q.next()?; // greeting
        q.call("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    fn next(&mut self) -> Result<Value, Fail> {
        match self.input.next() {
            Some(Ok(v)) => Ok(v),
            Some(Err(e)) => Err(Fail::msg(format!("QMP: {e}"))),
            None => Err(Fail::msg("QMP: the daemon closed the connection")),
        }
    }

    fn call(&mut self, cmd: &str, args: Value) -> Result<Value, Fail> {
        let msg = json!({"execute": cmd, "arguments": args});
        writeln!(self.out, "{msg}").map_err(|e| Fail::msg(e.to_string()))?;
        loop {
            let v = self.next()?;
            if v.get("event").is_some() {
                self.events.push(v);
                continue;
            }
            if let Some(e) = v.get("error") {
                let desc = e.get("desc").and_then(Value::as_str).unwrap_or("error");
                return Err(Fail::msg(desc.to_string()));
            }
            return Ok(v.get("return").cloned().unwrap_or(Value::Null));
        }
    }
}

fn num(v: &Value, k: &str) -> u64 {
    v.get(k).and_then(Value::as_u64).unwrap_or(0)
}

fn text(v: &Value, k: &str) -> String {
    v.get(k)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

/// `n` bytes in binary units (`12.0 MiB`).
fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Strata's extension members of a job (docs/EXTENSIONS.md), when the daemon sends them:
/// phase, rate, ETA, and for a mirror the dirty rate against the copy rate and the verdict.
/// Empty for qemu-storage-daemon.
fn live(job: &Value) -> String {
    let mut out = Vec::new();
    if let Some(p) = job.get("phase").and_then(Value::as_str) {
        out.push(p.to_string());
    }
    if let Some(r) = job.get("rate").and_then(Value::as_u64) {
        out.push(format!("{}/s", bytes(r)));
    }
    match job.get("eta-ms").and_then(Value::as_u64) {
        Some(ms) => out.push(format!("eta {:.1}s", ms as f64 / 1000.0)),
        None if job.get("rate").is_some() => out.push("eta ?".to_string()),
        None => {}
    }
    if let (Some(d), Some(c)) = (
        job.get("dirty-rate").and_then(Value::as_u64),
        job.get("copy-rate").and_then(Value::as_u64),
    ) {
        out.push(format!("dirty {}/s vs copy {}/s", bytes(d), bytes(c)));
    }
    if let Some(v) = job.get("convergence").and_then(Value::as_str) {
        out.push(v.to_string());
    }
    out.join("  ")
}

/// One line per job: id, type, status, progress, then the live figures if any.
fn render(job: &Value) -> String {
    let (cur, total) = (num(job, "current-progress"), num(job, "total-progress"));
    let pct = if total == 0 {
        0.0
    } else {
        cur as f64 * 100.0 / total as f64
    };
    let mut line = format!(
        "{:<16} {:<8} {:<10} {:>6.2}% ({cur}/{total})",
        text(job, "id"),
        text(job, "type"),
        text(job, "status"),
        pct
    );
    let extra = live(job);
    if !extra.is_empty() {
        line.push_str("  ");
        line.push_str(&extra);
    }
    if let Some(e) = job.get("error").and_then(Value::as_str) {
        line.push_str(&format!("  error: {e}"));
    }
    line
}

fn watch(q: &mut Qmp) -> Result<(), Fail> {
    let multi = MultiProgress::new();
    let style = ProgressStyle::with_template(
        "{prefix:16} [{bar:30}] {percent:>3}% {bytes}/{total_bytes} {msg}",
    )
    .map_err(|e| Fail::msg(e.to_string()))?
    .progress_chars("=> ");
    let mut bars: Vec<(String, ProgressBar)> = Vec::new();
    let started = Instant::now();
    loop {
        let jobs = q.call("query-jobs", json!({}))?;
        let jobs = jobs.as_array().cloned().unwrap_or_default();
        for j in &jobs {
            let id = text(j, "id");
            let bar = match bars.iter().find(|(i, _)| *i == id) {
                Some((_, b)) => b.clone(),
                None => {
                    let b = multi.add(
                        ProgressBar::new(0)
                            .with_style(style.clone())
                            .with_prefix(id.clone()),
                    );
                    bars.push((id.clone(), b.clone()));
                    b
                }
            };
            bar.set_length(num(j, "total-progress"));
            bar.set_position(num(j, "current-progress"));
            // The daemon's own rate and ETA when it sends them (stratad), else indicatif's.
            let extra = live(j);
            bar.set_message(if extra.is_empty() {
                format!("{}  {}/s", text(j, "status"), bytes(bar.per_sec() as u64))
            } else {
                format!("{}  {extra}", text(j, "status"))
            });
        }
        for (id, b) in &bars {
            if !jobs.iter().any(|j| text(j, "id") == *id) && !b.is_finished() {
                b.finish_with_message("done");
            }
        }
        let active = jobs
            .iter()
            .any(|j| !matches!(text(j, "status").as_str(), "concluded" | "null"));
        if !active && (started.elapsed() > Duration::from_millis(300) || !jobs.is_empty()) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Run `strata job`.
pub fn run(a: Args) -> CmdResult {
    let mut q = Qmp::connect(&a.socket)?;
    let verb = |q: &mut Qmp, cmd: &str, args: Value| q.call(cmd, args).map(|_| 0);
    match a.action {
        Action::List => {
            let jobs = q.call("query-jobs", json!({}))?;
            for j in jobs.as_array().into_iter().flatten() {
                println!("{}", render(j));
            }
            Ok(0)
        }
        Action::Watch => watch(&mut q).map(|_| 0),
        Action::Events => loop {
            for e in q.events.drain(..) {
                println!("{e}");
            }
            let v = q.next()?;
            println!("{v}");
        },
        Action::Pause { id } => verb(&mut q, "job-pause", json!({"id": id})),
        Action::Resume { id } => verb(&mut q, "job-resume", json!({"id": id})),
        Action::Cancel { id, force } => verb(
            &mut q,
            "block-job-cancel",
            json!({"device": id, "force": force}),
        ),
        Action::Complete { id } => verb(&mut q, "job-complete", json!({"id": id})),
        Action::Finalize { id } => verb(&mut q, "job-finalize", json!({"id": id})),
        Action::Dismiss { id } => verb(&mut q, "job-dismiss", json!({"id": id})),
        Action::SetSpeed { id, speed } => verb(
            &mut q,
            "block-job-set-speed",
            json!({"device": id, "speed": speed}),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_show_the_extension_members_when_present() {
        let qsd = json!({"id": "m", "type": "mirror", "status": "running",
                         "current-progress": 1, "total-progress": 4});
        assert_eq!(
            render(&qsd),
            "m                mirror   running     25.00% (1/4)"
        );
        let strata = json!({"id": "m", "type": "mirror", "status": "running",
            "current-progress": 1, "total-progress": 4, "rate": 3 << 20, "remaining": 3,
            "eta-ms": 1500, "phase": "bulk", "dirty-rate": 512, "copy-rate": 3 << 20,
            "convergence": "converging"});
        assert_eq!(
            live(&strata),
            "bulk  3.0 MiB/s  eta 1.5s  dirty 512 B/s vs copy 3.0 MiB/s  converging"
        );
        assert!(render(&strata).ends_with(&live(&strata)));
        let stalled = json!({"rate": 0, "phase": "running"});
        assert_eq!(live(&stalled), "running  0 B/s  eta ?");
    }
}
