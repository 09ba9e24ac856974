//! Image locks follow the graph's permissions: whenever the edges into a `file` node change,
//! its locks are brought to the cumulative permissions of its parents (the union of what they
//! take, the intersection of what they share), in QEMU's two steps — check every node first
//! (taking the extra locks the change needs), then commit, or abort all of them if any node
//! meets a conflicting user of its file in this or another process.

use std::collections::BTreeMap;

use strata_core::NodeRef;
use strata_io::FileNode;

use crate::graph::{EdgeId, Graph};
use crate::perm::{self, Claim, PermSpec};

fn file_of(node: &NodeRef) -> Option<&FileNode> {
    node.as_any().downcast_ref::<FileNode>()
}

/// Bring every `file` node's locks to the permissions in `perms` (every edge's effective
/// permissions); on a conflict nothing changes and the error is QEMU's, hint line included.
pub(crate) fn sync(graph: &Graph, perms: &BTreeMap<EdgeId, PermSpec>) -> Result<(), String> {
    let mut prepared: Vec<(NodeRef, PermSpec)> = Vec::new();
    for name in graph.node_names() {
        let Some(rec) = graph.node(name) else {
            continue;
        };
        let inner = rec.node.inner();
        let Some(file) = file_of(&inner) else {
            continue;
        };
        let claims: Vec<Claim> = graph
            .parents_of(name)
            .filter_map(|e| {
                Some(Claim {
                    user: e.user.clone(),
                    role: e.role.clone(),
                    perms: *perms.get(&e.id)?,
                })
            })
            .collect();
        let want = perm::cumulative(&claims);
        if let Err(e) = file.check_perm(want.perm.bits(), want.shared.bits()) {
            for (n, _) in &prepared {
                if let Some(f) = file_of(n) {
                    f.abort_perm();
                }
            }
            return Err(e.to_string());
        }
        prepared.push((inner, want));
    }
    for (n, want) in &prepared {
        if let Some(f) = file_of(n) {
            f.set_perm(want.perm.bits(), want.shared.bits());
        }
    }
    Ok(())
}
