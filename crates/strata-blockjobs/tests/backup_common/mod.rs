//! Helpers shared by the backup and fleecing tests: qcow2 images made by qemu-img and
//! filled by qemu-io, a graph with a job manager recording events, an export-like writer.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{Value, json};
use strata_blockjobs::{BlockJobEnv, SharedGraph};
use strata_core::{
    BlockNode, BoxFuture, Error, Extent, IoBuf, NodeRef, Prealloc, WriteFlags, ZeroFlags,
};
use strata_graph::blockdev::{Objects, blockdev_add, blockdev_del};
use strata_graph::{EdgePerms, Graph, Link, Use, User};
use strata_graph::{GraphNode, NodeKind, NodeRec};
use strata_job::{JobManager, JobStatus, MemorySink};
use strata_testkit::Xorshift;
// Not every test that includes this module uses all of these.
#[allow(unused_imports)]
pub use strata_testkit::{MIB, qcow2_image, qcow2_overlay, run_stdout};

pub struct Env {
    pub env: BlockJobEnv,
    pub events: Arc<MemorySink>,
    pub objects: Objects,
}

impl Env {
    pub fn new() -> Env {
        let events = Arc::new(MemorySink::new());
        let jobs = Arc::new(JobManager::new(events.clone()));
        let graph: SharedGraph = Arc::new(tokio::sync::Mutex::new(Graph::new()));
        Env {
            env: BlockJobEnv { graph, jobs },
            events,
            objects: Objects::default(),
        }
    }

    pub async fn add(&self, opts: Value) -> String {
        let mut g = self.env.graph.lock().await;
        blockdev_add(&mut g, &self.objects, opts.as_object().unwrap())
            .await
            .unwrap()
    }

    pub async fn add_qcow2(&self, name: &str, path: &Path) {
        self.add(json!({"driver": "qcow2", "node-name": name,
            "file": {"driver": "file", "filename": path.to_str().unwrap()}}))
            .await;
    }

    pub async fn del(&self, name: &str) {
        let mut g = self.env.graph.lock().await;
        blockdev_del(&mut g, name).await.unwrap();
    }

    pub async fn node(&self, name: &str) -> Arc<strata_graph::GraphNode> {
        self.env.graph.lock().await.node(name).unwrap().node.clone()
    }

    /// A writable export-like user of `name` (an anonymous block device).
    pub async fn export(&self, name: &str) -> Arc<Link> {
        let mut g = self.env.graph.lock().await;
        let n: NodeRef = g.node(name).unwrap().node.clone();
        let link = Link::new(n);
        g.add_edge(
            User::Backend,
            name,
            "root",
            EdgePerms::Fixed(Use::ExportWrite.perms()),
            Some(link.clone()),
        )
        .unwrap();
        link
    }

    pub async fn wait_gone(&self, id: &str) {
        tokio::time::timeout(
            std::time::Duration::from_secs(60),
            self.env.jobs.wait_status(id, JobStatus::Null),
        )
        .await
        .expect("job did not finish");
    }

    /// Events as (name, data) with `offset` replaced when `norm_offset`.
    pub fn events(&self, norm_offset: bool) -> Vec<(String, Value)> {
        self.events
            .events()
            .into_iter()
            .map(|(n, mut d)| {
                if norm_offset && let Some(o) = d.get_mut("offset") {
                    *o = json!("N");
                }
                (n.to_string(), d)
            })
            .collect()
    }
}

pub async fn read_all(n: &dyn BlockNode) -> Vec<u8> {
    n.read(0, IoBuf::zeroed(n.size() as usize))
        .await
        .unwrap()
        .to_vec()
}

pub fn write_raw(dir: &Path, name: &str, data: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, data).unwrap();
    p
}

/// `qemu-img compare` (exit 0 = identical) and `qemu-img check` of the qcow2.
pub fn assert_same(raw: &Path, qcow: &Path) {
    run_stdout(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "qcow2",
            raw.to_str().unwrap(),
            qcow.to_str().unwrap(),
        ],
    );
    run_stdout("qemu-img", &["check", "-q", qcow.to_str().unwrap()]);
}

/// A seeded writer: random writes of random patterns; returns the byte ranges written.
pub struct Writer {
    rng: Xorshift,
}

impl Writer {
    pub fn new(seed: u64) -> Writer {
        Writer {
            rng: Xorshift::new(seed),
        }
    }

    pub fn next(&mut self) -> u64 {
        self.rng.next()
    }

    /// One random write through `to`, applied to `model` too.
    pub async fn write(&mut self, to: &dyn BlockNode, model: &mut [u8]) -> (u64, u64) {
        let size = model.len() as u64;
        let len = (self.next() % 64 + 1) * 4096;
        let off = (self.next() % (size / 4096)) * 4096;
        let len = len.min(size - off);
        let byte = (self.next() % 250) as u8 + 1;
        let buf = IoBuf::from_slice(&vec![byte; len as usize]);
        to.write(off, buf, WriteFlags::default()).await.unwrap();
        model[off as usize..(off + len) as usize].fill(byte);
        (off, len)
    }
}

/// A node whose writes fail with EIO (a failing target).
#[derive(Debug)]
pub struct FailingWrites(pub strata_core::NodeRef);

impl BlockNode for FailingWrites {
    fn driver(&self) -> &'static str {
        "failing"
    }
    fn filename(&self) -> String {
        self.0.filename()
    }
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read(&self, offset: u64, buf: IoBuf) -> BoxFuture<'_, IoBuf> {
        self.0.read(offset, buf)
    }
    fn write(&self, _: u64, _: IoBuf, _: WriteFlags) -> BoxFuture<'_, IoBuf> {
        Box::pin(async { Err(Error::from_errno(libc::EIO, "injected")) })
    }
    fn write_zeroes(&self, _: u64, _: u64, _: ZeroFlags) -> BoxFuture<'_, ()> {
        Box::pin(async { Err(Error::from_errno(libc::EIO, "injected")) })
    }
    fn discard(&self, _: u64, _: u64) -> BoxFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
    fn flush(&self) -> BoxFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
    fn block_status(&self, offset: u64, len: u64) -> BoxFuture<'_, Extent> {
        self.0.block_status(offset, len)
    }
    fn truncate(&self, _: u64, _: Prealloc) -> BoxFuture<'_, ()> {
        Box::pin(async { Err(Error::unsupported("no")) })
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

pub async fn add_failing(e: &Env, name: &str, size: u64) {
    let inner: strata_core::NodeRef =
        Arc::new(strata_core::mem::MemNode::with_data(vec![0; size as usize]));
    let mut g = e.env.graph.lock().await;
    g.insert_node(NodeRec {
        name: name.into(),
        auto_named: false,
        node: GraphNode::new(name, Arc::new(FailingWrites(inner))),
        kind: NodeKind::Protocol,
        options: Value::Null,
        read_only: false,
        monitor_owned: true,
    })
    .unwrap();
}
