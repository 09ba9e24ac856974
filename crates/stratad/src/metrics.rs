//! `--metrics ADDR:PORT` (a Strata extension): Prometheus text format on `GET /metrics`,
//! plain HTTP/1.x over tokio, one response per connection. Per-node I/O counters (the
//! numbers `query-blockstats` reports) and per-job progress (query-jobs with Strata's
//! extension members).

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::daemon::Daemon;

/// Longest request head we read.
const MAX_HEAD: usize = 8192;
/// A client that sends nothing for this long is dropped.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Binds `addr` (`HOST:PORT`) and serves until the daemon shuts down.
pub async fn start(d: &Arc<Daemon>, addr: &str) -> Result<(), String> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| format!("Failed to listen on '{addr}' for metrics: {e}"))?;
    let d = d.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = d.shutdown.cancelled() => break,
                r = listener.accept() => {
                    if let Ok((sock, _)) = r {
                        tokio::spawn(serve(d.clone(), sock));
                    }
                }
            }
        }
    });
    Ok(())
}

async fn serve(d: Arc<Daemon>, mut sock: TcpStream) {
    let head = match tokio::time::timeout(READ_TIMEOUT, read_head(&mut sock)).await {
        Ok(Some(h)) => h,
        _ => return,
    };
    let (status, body) = match route(&head) {
        Route::Metrics => ("200 OK", render(&d).await),
        Route::NotFound => ("404 Not Found", "not found; try /metrics\n".to_string()),
        Route::BadMethod => ("405 Method Not Allowed", "only GET\n".to_string()),
        Route::Bad => ("400 Bad Request", "bad request\n".to_string()),
    };
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = sock.write_all(resp.as_bytes()).await;
    let _ = sock.shutdown().await;
}

/// The request head up to the blank line, or `None` if the client closed or sent too much.
async fn read_head(sock: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && !buf.windows(2).any(|w| w == b"\n\n") {
        let n = sock.read(&mut chunk).await.ok()?;
        if n == 0 || buf.len() + n > MAX_HEAD {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Some(String::from_utf8_lossy(&buf).into_owned())
}

#[derive(Debug, PartialEq, Eq)]
enum Route {
    Metrics,
    NotFound,
    BadMethod,
    Bad,
}

fn route(head: &str) -> Route {
    let line = head.lines().next().unwrap_or("");
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Route::Bad;
    };
    if !version.starts_with("HTTP/1.") {
        return Route::Bad;
    }
    if method != "GET" {
        return Route::BadMethod;
    }
    match target.split('?').next() {
        Some("/metrics") => Route::Metrics,
        _ => Route::NotFound,
    }
}

/// A label value in Prometheus' escaping.
fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Collects samples grouped by metric, so each metric gets one HELP/TYPE header.
#[derive(Default)]
struct Exposition {
    out: String,
}

impl Exposition {
    fn metric(&mut self, name: &str, kind: &str, help: &str, samples: &[(String, u64)]) {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
        for (labels, v) in samples {
            let _ = writeln!(self.out, "{name}{{{labels}}} {v}");
        }
    }
}

/// (QEMU `BlockDeviceStats` prefix, Prometheus `op` label).
const OPS: [(&str, &str); 4] = [
    ("rd", "read"),
    ("wr", "write"),
    ("flush", "flush"),
    ("unmap", "discard"),
];

async fn render(d: &Arc<Daemon>) -> String {
    let nodes: Vec<(String, Value)> = {
        let g = d.env.graph.lock().await;
        g.node_names()
            .iter()
            .filter_map(|n| g.node(n).map(|r| (n.clone(), r.node.stats().to_qmp())))
            .collect()
    };
    let jobs = d.env.jobs.query_jobs();
    render_text(&nodes, &jobs)
}

fn render_text(nodes: &[(String, Value)], jobs: &[Value]) -> String {
    let mut x = Exposition::default();
    let u = |v: &Value, k: &str| v.get(k).and_then(Value::as_u64);
    let per_op = |field: &str| -> Vec<(String, u64)> {
        let mut s = Vec::new();
        for (name, st) in nodes {
            for (qemu, op) in OPS {
                let key = field.replace("{}", qemu);
                if let Some(v) = u(st, &key) {
                    s.push((format!("node=\"{}\",op=\"{op}\"", esc(name)), v));
                }
            }
        }
        s
    };
    x.metric(
        "strata_node_requests_total",
        "counter",
        "Completed requests per block node and operation.",
        &per_op("{}_operations"),
    );
    x.metric(
        "strata_node_failed_requests_total",
        "counter",
        "Failed requests per block node and operation.",
        &per_op("failed_{}_operations"),
    );
    x.metric(
        "strata_node_bytes_total",
        "counter",
        "Bytes moved by completed requests per block node and operation.",
        &per_op("{}_bytes"),
    );
    x.metric(
        "strata_node_request_time_ns_total",
        "counter",
        "Summed latency of completed requests in nanoseconds.",
        &per_op("{}_total_time_ns"),
    );
    let jl = |j: &Value| {
        format!(
            "id=\"{}\",type=\"{}\"",
            esc(j["id"].as_str().unwrap_or("")),
            esc(j["type"].as_str().unwrap_or(""))
        )
    };
    let per_job = |key: &str| -> Vec<(String, u64)> {
        jobs.iter()
            .filter_map(|j| u(j, key).map(|v| (jl(j), v)))
            .collect()
    };
    let job_metrics: [(&str, &str, &str, &str); 7] = [
        (
            "strata_job_progress_current",
            "current-progress",
            "gauge",
            "Work done (bytes for block jobs).",
        ),
        (
            "strata_job_progress_total",
            "total-progress",
            "gauge",
            "Work known so far (bytes for block jobs).",
        ),
        (
            "strata_job_remaining_bytes",
            "remaining",
            "gauge",
            "total - current.",
        ),
        (
            "strata_job_rate_bytes_per_second",
            "rate",
            "gauge",
            "Progress over the last seconds.",
        ),
        (
            "strata_job_eta_milliseconds",
            "eta-ms",
            "gauge",
            "Estimated time to finish at the current rate.",
        ),
        (
            "strata_mirror_dirty_rate_bytes_per_second",
            "dirty-rate",
            "gauge",
            "Bytes/s newly made dirty by guest writes.",
        ),
        (
            "strata_mirror_copy_rate_bytes_per_second",
            "copy-rate",
            "gauge",
            "Bytes/s written to the mirror target.",
        ),
    ];
    for (name, key, kind, help) in job_metrics {
        x.metric(name, kind, help, &per_job(key));
    }
    let info: Vec<(String, u64)> = jobs
        .iter()
        .map(|j| {
            let s = |k: &str| esc(j.get(k).and_then(Value::as_str).unwrap_or(""));
            (
                format!(
                    "{},status=\"{}\",phase=\"{}\",convergence=\"{}\"",
                    jl(j),
                    s("status"),
                    s("phase"),
                    s("convergence")
                ),
                1,
            )
        })
        .collect();
    x.metric(
        "strata_job_info",
        "gauge",
        "One per job: its status, phase and (mirror) convergence verdict.",
        &info,
    );
    x.out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn routes() {
        assert_eq!(
            route("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Route::Metrics
        );
        assert_eq!(route("GET /metrics?x=1 HTTP/1.0\r\n\r\n"), Route::Metrics);
        assert_eq!(route("GET / HTTP/1.1\r\n\r\n"), Route::NotFound);
        assert_eq!(route("POST /metrics HTTP/1.1\r\n\r\n"), Route::BadMethod);
        assert_eq!(route("hello\r\n\r\n"), Route::Bad);
        assert_eq!(route("GET /metrics SPDY\r\n\r\n"), Route::Bad);
    }

    #[test]
    fn text_format() {
        let nodes = vec![(
            "d\"1".to_string(),
            json!({"rd_operations": 3, "wr_operations": 2, "flush_operations": 0,
                   "unmap_operations": 0, "rd_bytes": 12288, "wr_bytes": 8192}),
        )];
        let jobs = vec![json!({"id": "m", "type": "mirror", "status": "running",
            "current-progress": 10, "total-progress": 30, "remaining": 20, "rate": 5,
            "phase": "bulk", "dirty-rate": 0, "copy-rate": 5, "convergence": "converging"})];
        let t = render_text(&nodes, &jobs);
        assert!(
            t.contains("strata_node_requests_total{node=\"d\\\"1\",op=\"read\"} 3\n"),
            "{t}"
        );
        assert!(
            t.contains("strata_node_bytes_total{node=\"d\\\"1\",op=\"write\"} 8192\n"),
            "{t}"
        );
        assert!(
            t.contains("strata_job_remaining_bytes{id=\"m\",type=\"mirror\"} 20\n"),
            "{t}"
        );
        assert!(t.contains("strata_job_info{id=\"m\",type=\"mirror\",status=\"running\",phase=\"bulk\",convergence=\"converging\"} 1\n"), "{t}");
        assert!(
            !t.contains("strata_job_eta_milliseconds{"),
            "no eta member, no sample: {t}"
        );
        assert_eq!(
            t.matches("# TYPE strata_node_bytes_total counter").count(),
            1
        );
    }
}
