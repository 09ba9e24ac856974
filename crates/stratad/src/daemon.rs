//! The daemon's state: the graph, the jobs, objects, NBD servers and exports, and the event
//! bus every monitor listens to. Commands (in [`crate::commands`]) are the only code that
//! changes it; the graph is behind one async lock that plays QEMU's big lock for the control
//! plane, and data paths never take it.

use std::collections::BTreeMap;
use std::sync::Arc;

use parking_lot::Mutex;
use serde_json::Value;
use strata_blockjobs::BlockJobEnv;
use strata_graph::Graph;
use strata_graph::blockdev::Objects;
use strata_job::{EventSink, JobManager};
use strata_qmp::EventBus;
use tokio_util::sync::CancellationToken;

use crate::exports::NbdState;

/// Job events go out on the QMP event bus.
struct BusSink(Arc<EventBus>);

impl EventSink for BusSink {
    fn emit(&self, event: &'static str, data: Value) {
        self.0.emit(event, data);
    }
}

/// A user-created object (`--object` / `object-add`).
#[derive(Debug, Clone)]
pub enum Object {
    /// `throttle-group` (lives in [`Objects`] for the graph; this records its type).
    ThrottleGroup,
    /// `iothread`: accepted; Strata's runtime schedules all I/O itself.
    Iothread,
    /// `secret`: accepted (nothing in Strata consumes secrets yet).
    Secret,
    /// `tls-creds-x509` / `tls-creds-psk` (loaded into the graph's objects for NBD).
    TlsCreds,
    /// Any other type the schema accepts (e.g. `authz-simple`).
    Other,
}

/// The whole daemon.
pub struct Daemon {
    /// Graph and job manager, as the job commands take them.
    pub env: BlockJobEnv,
    /// Events for every monitor.
    pub events: Arc<EventBus>,
    /// Objects by id (types), and those the graph uses (throttle groups).
    pub objects: Mutex<(BTreeMap<String, Object>, Objects)>,
    /// NBD servers and exports.
    pub nbd: tokio::sync::Mutex<NbdState>,
    /// Cancelled by `quit` or a signal.
    pub shutdown: CancellationToken,
    /// Cancelled once every command-line option has been processed; monitors wait for it.
    pub started: CancellationToken,
    /// `authz-simple` / `authz-list` objects by id, for `tls-authz`.
    pub authz: crate::authz::AuthzObjects,
    /// Character devices.
    pub chardevs: Mutex<crate::commands::chardev::Registry>,
    /// QOM bookkeeping of user-created objects (properties, `/objects` order).
    pub qom: Mutex<crate::commands::qom::QomState>,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon").finish_non_exhaustive()
    }
}

impl Daemon {
    /// An empty daemon.
    pub fn new() -> Arc<Daemon> {
        let events = Arc::new(EventBus::new());
        let jobs = Arc::new(JobManager::new(Arc::new(BusSink(events.clone()))));
        // Strata's job fields (docs/EXTENSIONS.md): additive members clients may ignore.
        jobs.set_extensions(true);
        let mut objects = Objects::default();
        // Protocol drivers the graph crate does not know itself.
        objects
            .protocol_drivers
            .insert("nbd".into(), Arc::new(strata_nbd::NbdDriverFactory));
        Arc::new(Daemon {
            env: BlockJobEnv {
                graph: Arc::new(tokio::sync::Mutex::new(Graph::new())),
                jobs,
            },
            events,
            objects: Mutex::new((BTreeMap::new(), objects)),
            nbd: tokio::sync::Mutex::new(NbdState::default()),
            shutdown: CancellationToken::new(),
            started: CancellationToken::new(),
            authz: Default::default(),
            chardevs: Mutex::new(Default::default()),
            qom: Mutex::new(Default::default()),
        })
    }

    /// The graph's objects (a snapshot: throttle groups are shared handles).
    pub fn graph_objects(&self) -> Objects {
        self.objects.lock().1.clone()
    }

    /// Orderly shutdown as qemu-storage-daemon does it: exports go first (with their
    /// BLOCK_EXPORT_DELETED events), then every job is cancelled, then every node is closed
    /// (images left clean, persistent bitmaps stored).
    pub async fn shut_down(&self) {
        crate::exports::close_all(self).await;
        self.env.jobs.cancel_all_and_wait().await;
        let mut g = self.env.graph.lock().await;
        // Remove from the top: a node is removable once nothing uses it.
        loop {
            let names: Vec<String> = g.node_names().to_vec();
            let mut progressed = false;
            for n in names.iter().rev() {
                if g.node(n).is_some() && g.parents_of(n).next().is_none() {
                    let _ = g.remove_node(n).await;
                    progressed = true;
                }
            }
            if !progressed || g.node_names().is_empty() {
                break;
            }
        }
        // Whatever is left still has users that no command removed (e.g. a leftover job
        // pin): drop the edges and close the nodes anyway.
        let edges: Vec<_> = g.edges().iter().map(|e| e.id).collect();
        for id in edges {
            g.remove_edge(id);
        }
        for n in g.node_names().to_vec().iter().rev() {
            let _ = g.remove_node(n).await;
        }
    }
}
