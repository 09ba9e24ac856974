//! NBD throughput: serve an in-memory node over a Unix socket and drive it with Strata's
//! client (many requests in flight over several connections), or just serve it for outside
//! tools.
//!
//! ```text
//! cargo run -p strata-nbd --example nbd_throughput -- [bench|serve] [SIZE_MIB] [CONNS] [DEPTH] [REQ_KIB]
//! ```
//!
//! `serve` prints the URI and runs until killed (try `qemu-img bench` or `nbdcopy` on it).

use std::sync::Arc;
use std::time::{Duration, Instant};

use strata_core::mem::MemNode;
use strata_core::{BlockNode, IoBuf, NodeRef, WriteFlags};
use strata_nbd::{ExportConfig, ListenAddr, NbdAddr, NbdClient, NbdServer, ServerOptions};

#[tokio::main]
async fn main() -> strata_core::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, d: u64| -> u64 { args.get(i).and_then(|s| s.parse().ok()).unwrap_or(d) };
    let mode = args
        .first()
        .map(String::as_str)
        .unwrap_or("bench")
        .to_string();
    let size = arg(1, 256) << 20;
    let conns = arg(2, 4) as usize;
    let depth = arg(3, 16) as usize;
    let req = (arg(4, 256) << 10) as usize;

    let dir = std::env::temp_dir().join(format!("strata-nbd-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(strata_core::Error::from)?;
    let sock = dir.join("nbd.sock");
    let server = NbdServer::start(ListenAddr::Unix(sock.clone()), ServerOptions::default()).await?;
    let node: NodeRef = Arc::new(MemNode::with_data(vec![0; size as usize]));
    server.add_export(ExportConfig {
        name: "bench".into(),
        description: Some("in-memory benchmark export".into()),
        node,
        writable: true,
        bitmaps: Vec::new(),
        allocation_depth: true,
        multi_conn: true,
    })?;
    println!("nbd+unix:///bench?socket={}", sock.display());
    if mode == "serve" {
        loop {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
    }

    for write in [true, false] {
        let start = Instant::now();
        let mut tasks: Vec<tokio::task::JoinHandle<strata_core::Result<u64>>> = Vec::new();
        for c in 0..conns {
            let client = NbdClient::connect(&NbdAddr::Unix(sock.clone()), "bench").await?;
            for d in 0..depth {
                let client = Arc::clone(&client);
                tasks.push(tokio::spawn(async move {
                    let lane = (c * depth + d) as u64;
                    let lanes = (conns * depth) as u64;
                    let mut off = lane * req as u64;
                    let mut bytes = 0u64;
                    let mut buf = IoBuf::zeroed(req);
                    while off + req as u64 <= size {
                        buf = if write {
                            client.write(off, buf, WriteFlags::default()).await?
                        } else {
                            client.read(off, buf).await?
                        };
                        bytes += req as u64;
                        off += lanes * req as u64;
                    }
                    Ok(bytes)
                }));
            }
        }
        let mut total = 0;
        for t in tasks {
            total += t.await.expect("task panicked")?;
        }
        let secs = start.elapsed().as_secs_f64();
        println!(
            "{}: {} MiB in {:.3} s = {:.1} MiB/s ({} connections x {} in flight, {} KiB requests)",
            if write { "write" } else { "read" },
            total >> 20,
            secs,
            (total as f64 / (1 << 20) as f64) / secs,
            conns,
            depth,
            req >> 10
        );
    }
    server.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
