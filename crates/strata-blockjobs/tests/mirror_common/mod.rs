//! Helpers shared by the mirror and active-commit tests: qcow2 images made by `qemu-img`,
//! a graph with an export-like writer, a recording event sink, and a seeded writer that
//! keeps a model of what the disk must hold.

#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use serde_json::{Value, json};
use strata_blockjobs::BlockJobEnv;
use strata_core::{BlockNode, IoBuf, NodeRef, WriteFlags};
use strata_graph::blockdev::{Objects, blockdev_add};
use strata_graph::{EdgePerms, Graph, Link, Use, User};
use strata_job::{JobManager, JobStatus, MemorySink};
use strata_testkit::Xorshift;
// Not every test that includes this module uses all of these.
#[allow(unused_imports)]
pub use strata_testkit::{MIB, qcow2_image, qemu_img, qemu_io};

pub fn check(path: &Path) {
    qemu_img(&["check", "-q", path.to_str().unwrap()]);
}

pub async fn add_qcow2(g: &mut Graph, name: &str, path: &Path) {
    let o =
        json!({"driver": "qcow2", "node-name": name, "file": {"driver": "file", "filename": path}});
    blockdev_add(g, &Objects::default(), o.as_object().unwrap())
        .await
        .unwrap();
}

/// An export-like writer on `node`: a backend edge with a link that pivots follow.
pub fn export(g: &mut Graph, node: &str) -> Arc<Link> {
    let n = g.node(node).unwrap().node.clone();
    let link = Link::new(n);
    g.add_edge(
        User::Backend,
        node,
        "root",
        EdgePerms::Fixed(Use::ExportWrite.perms()),
        Some(link.clone()),
    )
    .unwrap();
    link
}

pub struct Harness {
    pub env: BlockJobEnv,
    pub sink: Arc<MemorySink>,
}

pub fn harness(g: Graph) -> Harness {
    let sink = Arc::new(MemorySink::new());
    let jobs = Arc::new(JobManager::new(sink.clone()));
    Harness {
        env: BlockJobEnv {
            graph: Arc::new(tokio::sync::Mutex::new(g)),
            jobs,
        },
        sink,
    }
}

impl Harness {
    /// Drop the exports' backend edges; the graph stays locked for the caller.
    pub async fn drop_backends(&self) -> tokio::sync::MutexGuard<'_, Graph> {
        let mut g = self.env.graph.lock().await;
        let ids: Vec<_> = g
            .edges()
            .iter()
            .filter(|e| e.user == User::Backend)
            .map(|e| e.id)
            .collect();
        for id in ids {
            g.remove_edge(id);
        }
        g
    }

    /// Events with `len`/`offset` dropped (they depend on timing), as `(name, data)`;
    /// JOB_STATUS_CHANGE reduced to its status.
    pub fn events(&self) -> Vec<String> {
        self.sink
            .events()
            .into_iter()
            .map(|(name, data)| norm_event(name, &data))
            .collect()
    }

    pub async fn wait_status(&self, id: &str, s: JobStatus) {
        tokio::time::timeout(Duration::from_secs(60), self.env.jobs.wait_status(id, s))
            .await
            .unwrap_or_else(|_| panic!("job {id} never reached {s:?}: {:?}", self.events()));
    }

    pub async fn wait_gone(&self, id: &str) {
        tokio::time::timeout(Duration::from_secs(60), async {
            while self.env.jobs.job_status(id).is_some() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("job {id} never finished: {:?}", self.events()));
    }
}

/// A seeded random writer through `link`, recording in `model` what each completed write
/// put where (writes are sequential, so the model is exact).
pub struct Writer {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<u64>,
}

impl Writer {
    /// `pause`: sleep between writes (None = only yield).
    pub fn start(
        link: Arc<Link>,
        models: Vec<Arc<Mutex<Vec<u8>>>>,
        seed: u64,
        pause: Option<Duration>,
    ) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        let task = tokio::spawn(async move {
            let mut rng = Xorshift::new(seed);
            let size = link.size();
            let mut n = 0;
            while !s2.load(Ordering::Acquire) {
                let len = (1 + rng.next() % 32) * 2048;
                let off = (rng.next() % ((size - len) / 512)) * 512;
                let byte = (rng.next() % 251) as u8 + 1;
                let mut buf = IoBuf::zeroed(len as usize);
                buf.fill(byte);
                let node: &dyn BlockNode = &*link;
                node.write(off, buf, WriteFlags::default())
                    .await
                    .expect("guest write");
                for m in &models {
                    m.lock()[off as usize..(off + len) as usize].fill(byte);
                }
                n += 1;
                match pause {
                    Some(d) => tokio::time::sleep(d).await,
                    None => tokio::task::yield_now().await,
                }
            }
            n
        });
        Writer { stop, task }
    }

    pub async fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Release);
        self.task.await.unwrap()
    }
}

pub async fn read_all(node: &NodeRef) -> Vec<u8> {
    let size = node.size();
    let mut out = Vec::with_capacity(size as usize);
    let mut off = 0;
    while off < size {
        let n = (size - off).min(4 * MIB);
        let b = node.read(off, IoBuf::zeroed(n as usize)).await.unwrap();
        out.extend_from_slice(&b);
        off += n;
    }
    out
}

pub fn first_diff(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

pub fn node(g: &Graph, name: &str) -> NodeRef {
    g.node(name).unwrap().node.clone()
}

/// Whether `link` reaches the driver of the node `name`.
pub fn reaches(g: &Graph, link: &Link, name: &str) -> bool {
    strata_graph::status::same_node(&link.target(), &node(g, name))
}

/// One expected event, normalised like [`Harness::events`].
pub fn ev(name: &str, data: Value) -> String {
    let sorted: std::collections::BTreeMap<String, Value> =
        data.as_object().unwrap().clone().into_iter().collect();
    format!("{name} {}", serde_json::to_string(&sorted).unwrap())
}

pub fn norm_event(name: &str, data: &Value) -> String {
    if name == "JOB_STATUS_CHANGE" {
        return data["status"].as_str().unwrap().to_string();
    }
    let mut d = data.as_object().unwrap().clone();
    d.remove("len");
    d.remove("offset");
    ev(name, Value::Object(d))
}

pub fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}
