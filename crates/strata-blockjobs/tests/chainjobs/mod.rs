//! Shared scaffolding of the stream and commit tests: chains made with `qemu-img`/`qemu-io`,
//! opened with `blockdev_add`, a guest-like writer with a model of what the guest sees, and
//! the checks done with QEMU's own tools afterwards.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;
use serde_json::{Map, Value, json};
use strata_blockjobs::BlockJobEnv;
use strata_core::{BlockNode, IoBuf, NodeRef, WriteFlags};
use strata_graph::blockdev::{Objects, blockdev_add};
use strata_graph::{EdgeId, EdgePerms, Graph, Link, Use, User};
use strata_job::{JobManager, JobStatus, MemorySink};
use strata_testkit::Xorshift;
// Not every test that includes this module uses all of these.
#[allow(unused_imports)]
pub use strata_testkit::{MIB, run};

pub const KIB: u64 = 1 << 10;

/// One layer of a test chain: its node name, virtual size and the `write -P` patterns
/// (pattern, offset, length) written into it.
pub struct Layer {
    pub name: &'static str,
    pub size: u64,
    pub writes: Vec<(u8, u64, u64)>,
}

pub fn layer(name: &'static str, size: u64, writes: &[(u8, u64, u64)]) -> Layer {
    Layer {
        name,
        size,
        writes: writes.to_vec(),
    }
}

/// Everything one test works with.
pub struct World {
    pub dir: tempfile::TempDir,
    /// Bottom first.
    pub layers: Vec<Layer>,
    pub env: BlockJobEnv,
    pub sink: Arc<MemorySink>,
    /// What the guest sees through the top node.
    pub model: Arc<Mutex<Vec<u8>>>,
}

impl World {
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.qcow2"))
    }

    /// Open a 4 MiB qcow2 image outside the chain as node `lone`.
    pub async fn add_lone_image(&self) {
        let lone = self.dir.path().join("lone.qcow2");
        run(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", &lone.to_string_lossy(), "4M"],
        );
        let mut g = self.env.graph.lock().await;
        let o = json!({"driver": "qcow2", "node-name": "lone", "file": {"driver": "file", "filename": lone}});
        blockdev_add(&mut g, &Default::default(), o.as_object().unwrap())
            .await
            .unwrap();
    }

    pub fn path_str(&self, name: &str) -> String {
        self.path(name).to_string_lossy().into_owned()
    }

    /// Create the chain (bottom first) and open it; layers below the top are opened
    /// read-only when `ro_below`.
    pub async fn new(layers: Vec<Layer>, ro_below: bool) -> World {
        let dir = tempfile::tempdir().expect("tempdir");
        let top_size = layers.last().expect("a layer").size;
        let mut model = vec![0u8; top_size as usize];
        let mut prev: Option<PathBuf> = None;
        for l in &layers {
            let p = dir.path().join(format!("{}.qcow2", l.name));
            let ps = p.to_string_lossy().into_owned();
            let size = l.size.to_string();
            match &prev {
                None => run("qemu-img", &["create", "-q", "-f", "qcow2", &ps, &size]),
                Some(b) => run(
                    "qemu-img",
                    &[
                        "create",
                        "-q",
                        "-f",
                        "qcow2",
                        "-b",
                        &b.to_string_lossy(),
                        "-F",
                        "qcow2",
                        &ps,
                        &size,
                    ],
                ),
            };
            for &(pat, off, len) in &l.writes {
                let c = format!("write -P {pat} {off} {len}");
                run("qemu-io", &["-f", "qcow2", "-c", &c, &ps]);
                let end = (off + len).min(top_size);
                if off < end {
                    model[off as usize..end as usize].fill(pat);
                }
            }
            prev = Some(p);
        }
        // A layer shorter than the one above reads zeroes past its end.
        let mut graph = Graph::new();
        let objects = Objects::default();
        let n = layers.len();
        for (i, l) in layers.iter().enumerate() {
            let mut o = json!({
                "driver": "qcow2",
                "node-name": l.name,
                "read-only": ro_below && i + 1 < n,
                "file": {"driver": "file", "filename": dir.path().join(format!("{}.qcow2", l.name))},
            });
            if i > 0 {
                o["backing"] = json!(layers[i - 1].name);
            }
            blockdev_add(&mut graph, &objects, o.as_object().expect("object"))
                .await
                .expect("blockdev-add");
        }
        let sink = Arc::new(MemorySink::new());
        let jobs = Arc::new(JobManager::new(sink.clone()));
        let env = BlockJobEnv {
            graph: Arc::new(tokio::sync::Mutex::new(graph)),
            jobs,
        };
        World {
            dir,
            layers,
            env,
            sink,
            model: Arc::new(Mutex::new(model)),
        }
    }

    /// Run a job command with JSON arguments.
    pub fn args(v: Value) -> Map<String, Value> {
        v.as_object().expect("object").clone()
    }

    /// Attach a writable export-like user to `node`.
    pub async fn export(&self, node: &str) -> (EdgeId, Arc<Link>) {
        let mut g = self.env.graph.lock().await;
        let n: NodeRef = g.node(node).expect("node").node.clone();
        let link = Link::new(n);
        let id = g
            .add_edge(
                User::Backend,
                node,
                "root",
                EdgePerms::Fixed(Use::ExportWrite.perms()),
                Some(link.clone()),
            )
            .expect("export edge");
        (id, link)
    }

    /// Start a writer issuing seeded random writes through `link` until stopped.
    pub fn writer(&self, link: Arc<Link>, seed: u64) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let model = self.model.clone();
        let s2 = stop.clone();
        let task = tokio::spawn(async move {
            let mut rng = Xorshift::new(seed);
            let mut next = move || rng.next();
            let size = link.size();
            let mut count = 0u64;
            while !s2.load(Ordering::Acquire) {
                let len = (1 + next() % 16) * 4096;
                let off = (next() % ((size - len) / 4096)) * 4096;
                let pat = (next() % 200) as u8 + 20;
                let mut buf = IoBuf::zeroed(len as usize);
                buf.fill(pat);
                link.write(off, buf, WriteFlags::default())
                    .await
                    .expect("guest write");
                model.lock()[off as usize..(off + len) as usize].fill(pat);
                count += 1;
                tokio::time::sleep(std::time::Duration::from_millis(3)).await;
            }
            count
        });
        Writer { stop, task }
    }

    /// Wait for job `id` to be gone.
    pub async fn wait_gone(&self, id: &str) {
        tokio::time::timeout(
            std::time::Duration::from_secs(60),
            self.env.jobs.wait_status(id, JobStatus::Null),
        )
        .await
        .expect("job finished in time");
    }

    /// Events recorded so far, normalised: `JOB_STATUS_CHANGE <status>` or `<EVENT> <data>`,
    /// with `offset` masked as `"*"` when `drop_offset`.
    pub fn events(&self, drop_offset: bool) -> Vec<String> {
        self.sink
            .events()
            .into_iter()
            .map(|(name, mut data)| {
                if name == "JOB_STATUS_CHANGE" {
                    format!("{name} {}", data["status"].as_str().unwrap_or_default())
                } else {
                    if drop_offset && let Some(o) = data.as_object_mut() {
                        o.insert("offset".into(), json!("*"));
                    }
                    format!("{name} {data}")
                }
            })
            .collect()
    }

    /// Close every node (top first), so the images are flushed and unlocked.
    pub async fn close(&self, extra_edges: &[EdgeId]) {
        let mut g = self.env.graph.lock().await;
        for e in extra_edges {
            g.remove_edge(*e);
        }
        for l in self.layers.iter().rev() {
            if g.node(l.name).is_some() {
                g.remove_node(l.name)
                    .await
                    .unwrap_or_else(|e| panic!("closing {}: {e}", l.name));
            }
        }
        // Other nodes a test added (roots first).
        for _ in 0..8 {
            let roots: Vec<String> = g
                .node_names()
                .iter()
                .filter(|n| g.parents_of(n).next().is_none())
                .cloned()
                .collect();
            for n in roots {
                let _ = g.remove_node(&n).await;
            }
        }
        assert!(g.node_names().is_empty(), "left open: {:?}", g.node_names());
    }

    /// Check the guest view of `top` against the model, and `qemu-img check` every image.
    pub fn verify(&self, top: &str) {
        let raw = self.dir.path().join("model.raw");
        std::fs::write(&raw, &*self.model.lock()).expect("write model");
        run(
            "qemu-img",
            &[
                "compare",
                "-f",
                "qcow2",
                "-F",
                "raw",
                &self.path_str(top),
                &raw.to_string_lossy(),
            ],
        );
        for l in &self.layers {
            run("qemu-img", &["check", "-q", &self.path_str(l.name)]);
        }
    }

    /// Compare what is on disk for `top` now, while the images are still open and nothing
    /// was closed or flushed by the test (`qemu-img compare -U`), with the model: what a
    /// kill at this point would leave. Only meaningful once no unflushed guest write is
    /// left.
    pub fn verify_on_disk_while_open(&self, top: &str) {
        let raw = self.dir.path().join("model.raw");
        std::fs::write(&raw, &*self.model.lock()).expect("write model");
        run(
            "qemu-img",
            &[
                "compare",
                "-U",
                "-f",
                "qcow2",
                "-F",
                "raw",
                &self.path_str(top),
                &raw.to_string_lossy(),
            ],
        );
    }

    /// `qemu-img info --backing-chain` of `top`: the image file names, top first.
    pub fn chain(&self, top: &str) -> Vec<String> {
        let out = run(
            "qemu-img",
            &[
                "info",
                "--backing-chain",
                "--output=json",
                &self.path_str(top),
            ],
        );
        let v: Value = serde_json::from_slice(&out.stdout).expect("json");
        v.as_array()
            .expect("array")
            .iter()
            .map(|i| {
                let f = i["filename"].as_str().expect("filename");
                Path::new(f)
                    .file_stem()
                    .expect("stem")
                    .to_string_lossy()
                    .into_owned()
            })
            .collect()
    }

    /// The backing file name recorded in `image`'s header.
    pub fn backing_of(&self, image: &str) -> Option<String> {
        let out = run(
            "qemu-img",
            &["info", "--output=json", &self.path_str(image)],
        );
        let v: Value = serde_json::from_slice(&out.stdout).expect("json");
        v["backing-filename"].as_str().map(str::to_string)
    }
}

/// A running guest writer.
pub struct Writer {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<u64>,
}

impl Writer {
    /// Stop it; returns how many writes it made.
    pub async fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Release);
        self.task.await.expect("writer")
    }
}

/// The event sequence qemu-storage-daemon 10.0.2 emitted for a successful stream/commit
/// of a 4 MiB image (recorded with a QMP socket script; timestamps dropped).
pub fn qsd_success(kind: &str, len: u64, speed: u64) -> Vec<String> {
    vec![
        "JOB_STATUS_CHANGE created".into(),
        "JOB_STATUS_CHANGE running".into(),
        "JOB_STATUS_CHANGE waiting".into(),
        "JOB_STATUS_CHANGE pending".into(),
        format!(
            r#"BLOCK_JOB_COMPLETED {{"device":"job0","len":{len},"offset":{len},"speed":{speed},"type":"{kind}"}}"#
        ),
        "JOB_STATUS_CHANGE concluded".into(),
        "JOB_STATUS_CHANGE null".into(),
    ]
}

/// qsd's events for a cancelled stream/commit (offset masked: it depends on timing).
pub fn qsd_cancelled(kind: &str, len: u64, speed: u64) -> Vec<String> {
    vec![
        "JOB_STATUS_CHANGE created".into(),
        "JOB_STATUS_CHANGE running".into(),
        "JOB_STATUS_CHANGE aborting".into(),
        format!(
            r#"BLOCK_JOB_CANCELLED {{"device":"job0","len":{len},"offset":"*","speed":{speed},"type":"{kind}"}}"#
        ),
        "JOB_STATUS_CHANGE concluded".into(),
        "JOB_STATUS_CHANGE null".into(),
    ]
}

/// qsd's events with `auto-finalize: false, auto-dismiss: false`, after `job-finalize` and
/// `job-dismiss`.
pub fn qsd_manual(kind: &str, len: u64) -> Vec<String> {
    vec![
        "JOB_STATUS_CHANGE created".into(),
        "JOB_STATUS_CHANGE running".into(),
        "JOB_STATUS_CHANGE waiting".into(),
        "JOB_STATUS_CHANGE pending".into(),
        format!(r#"BLOCK_JOB_PENDING {{"type":"{kind}","id":"job0"}}"#),
        format!(
            r#"BLOCK_JOB_COMPLETED {{"device":"job0","len":{len},"offset":{len},"speed":0,"type":"{kind}"}}"#
        ),
        "JOB_STATUS_CHANGE concluded".into(),
        "JOB_STATUS_CHANGE null".into(),
    ]
}

/// created → null: setup failed after the job existed.
pub fn qsd_early_fail() -> Vec<String> {
    vec![
        "JOB_STATUS_CHANGE created".into(),
        "JOB_STATUS_CHANGE null".into(),
    ]
}
