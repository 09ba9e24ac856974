//! [`Graph`]: the named nodes and the edges between them and their users, with permission
//! checking and the structural changes jobs make (insert and remove filters, replace a node
//! under all its parents, relink backing chains).
//!
//! The graph is plain data changed by ordinary methods; the daemon's control task owns it.
//! Methods that touch the data path (re-pointing links) are `async` because they wait for
//! in-flight requests to drain, never for disk I/O of their own.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::Value;
use strata_core::{BlockNode, NodeRef};

use crate::link::Link;
use crate::node::GraphNode;
use crate::perm::{self, Claim, EdgeKind, Perm, PermSpec, User};

/// What kind of driver a node runs, for permission derivation and chain walking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeKind {
    /// A protocol node (file, null-co, nbd): no children.
    Protocol,
    /// A format node (qcow2, raw): `file` is storage, `backing` is copy-on-write.
    Format,
    /// A filter (throttle, copy-on-read, blkdebug, copy-before-write, job filters): its
    /// `file` child is what it shows.
    Filter,
}

/// A registered node.
#[derive(Debug)]
pub struct NodeRec {
    /// Node name (auto-generated `#blockNNN` for implicit nodes).
    pub name: String,
    /// Whether the name was generated.
    pub auto_named: bool,
    /// The node as parents see it.
    pub node: Arc<GraphNode>,
    /// Driver kind.
    pub kind: NodeKind,
    /// The options it was opened with (children as node names), for queries and reopen.
    pub options: Value,
    /// Opened read-only.
    pub read_only: bool,
    /// Added by `blockdev-add` (only those can be `blockdev-del`eted).
    pub monitor_owned: bool,
}

/// Identifies an edge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EdgeId(u64);

/// How an edge's permissions are decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EdgePerms {
    /// Fixed by its user (exports, jobs).
    Fixed(PermSpec),
    /// Derived from the parent node's users.
    Derived(EdgeKind),
}

/// An edge from a user (a parent node, an export, a job) to a node.
#[derive(Debug, Clone)]
pub struct EdgeRec {
    /// Identity.
    pub id: EdgeId,
    /// The user.
    pub user: User,
    /// The child node's name.
    pub child: String,
    /// Child role (`file`, `backing`, `root`, `intermediate node`, ...).
    pub role: String,
    /// Permission rule.
    pub perms: EdgePerms,
    /// The data-path link (node children and exports have one; a job's pins do not).
    pub link: Option<Arc<Link>>,
    /// A job depends on this edge staying where it is (QEMU's frozen backing links).
    pub frozen: bool,
}

/// The graph of named nodes.
#[derive(Debug, Default)]
pub struct Graph {
    nodes: BTreeMap<String, NodeRec>,
    /// Insertion order of node names (queries list newest first, as QEMU does).
    order: Vec<String>,
    edges: Vec<EdgeRec>,
    next_edge: u64,
    auto_names: u64,
}

/// QEMU's rule for user-given node names: a letter, then letters, digits, `-`, `.`, `_`;
/// at most 31 characters.
pub fn valid_node_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || "-._".contains(c))
        && name.len() <= 31
}

impl Graph {
    /// An empty graph.
    pub fn new() -> Graph {
        Graph::default()
    }

    /// A fresh name for an implicit node, shaped like QEMU's (`#block` + counter + two
    /// digits of noise, so clients cannot rely on the numbering).
    pub fn auto_name(&mut self) -> String {
        let n = self.auto_names;
        self.auto_names += 1;
        let noise = (n.wrapping_mul(2654435761) >> 7) % 100;
        let name = format!("#block{n}{noise:02}");
        if self.nodes.contains_key(&name) {
            self.auto_name()
        } else {
            name
        }
    }

    /// Register a node.
    pub fn insert_node(&mut self, rec: NodeRec) -> Result<(), String> {
        if self.nodes.contains_key(&rec.name) {
            return Err(format!("Duplicate nodes with node-name='{}'", rec.name));
        }
        self.order.push(rec.name.clone());
        self.nodes.insert(rec.name.clone(), rec);
        Ok(())
    }

    /// The node called `name`.
    pub fn node(&self, name: &str) -> Option<&NodeRec> {
        self.nodes.get(name)
    }

    /// The node called `name`, mutably.
    pub fn node_mut(&mut self, name: &str) -> Option<&mut NodeRec> {
        self.nodes.get_mut(name)
    }

    /// Node names, oldest first.
    pub fn node_names(&self) -> &[String] {
        &self.order
    }

    /// Every edge, oldest first.
    pub fn edges(&self) -> &[EdgeRec] {
        &self.edges
    }

    /// The edge `id`.
    pub fn edge(&self, id: EdgeId) -> Option<&EdgeRec> {
        self.edges.iter().find(|e| e.id == id)
    }

    /// Edges that point at `child`.
    pub fn parents_of(&self, child: &str) -> impl Iterator<Item = &EdgeRec> {
        self.edges.iter().filter(move |e| e.child == child)
    }

    /// Edges from the node `parent` to its children, in the order they were made.
    pub fn children_of(&self, parent: &str) -> impl Iterator<Item = &EdgeRec> {
        self.edges
            .iter()
            .filter(move |e| matches!(&e.user, User::Node(n) if n == parent))
    }

    /// The child of `parent` in `role`, by name.
    pub fn child(&self, parent: &str, role: &str) -> Option<&EdgeRec> {
        self.children_of(parent).find(|e| e.role == role)
    }

    /// The node below `name` in its backing chain, looking through filters: a format's
    /// `backing` child, a filter's `file` child.
    pub fn chain_below(&self, name: &str) -> Option<String> {
        let rec = self.nodes.get(name)?;
        match rec.kind {
            NodeKind::Format => self.child(name, "backing"),
            NodeKind::Filter => self.filtered_child(name),
            NodeKind::Protocol => None,
        }
        .map(|e| e.child.clone())
    }

    /// A filter's child: `file`, or blkdebug's `image`.
    pub fn filtered_child(&self, name: &str) -> Option<&EdgeRec> {
        self.child(name, "file")
            .or_else(|| self.child(name, "image"))
    }

    /// Skip filters from `name` down to the first non-filter node.
    pub fn skip_filters(&self, name: &str) -> String {
        let mut cur = name.to_string();
        while let Some(rec) = self.nodes.get(&cur) {
            if rec.kind != NodeKind::Filter {
                break;
            }
            match self.filtered_child(&cur) {
                Some(e) => cur = e.child.clone(),
                None => break,
            }
        }
        cur
    }

    /// Add an edge after checking permissions; on a conflict nothing changes.
    pub fn add_edge(
        &mut self,
        user: User,
        child: &str,
        role: &str,
        perms: EdgePerms,
        link: Option<Arc<Link>>,
    ) -> Result<EdgeId, String> {
        if !self.nodes.contains_key(child) {
            return Err(format!(
                "Cannot find device='{child}' nor node-name='{child}'"
            ));
        }
        let id = EdgeId(self.next_edge);
        self.next_edge += 1;
        self.edges.push(EdgeRec {
            id,
            user,
            child: child.to_string(),
            role: role.to_string(),
            perms,
            link,
            frozen: false,
        });
        if let Err(e) = self.check_perms(Some(id)) {
            self.edges.pop();
            return Err(e);
        }
        Ok(id)
    }

    /// Remove an edge (never fails: dropping a user only relaxes permissions).
    pub fn remove_edge(&mut self, id: EdgeId) -> Option<EdgeRec> {
        let i = self.edges.iter().position(|e| e.id == id)?;
        let e = self.edges.remove(i);
        // Fewer users can only need fewer locks; letting go does not fail.
        let _ = self.refresh_locks();
        Some(e)
    }

    /// Bring the image locks of every `file` node to what its users now take (after a
    /// change that [`Graph::check_perms`] did not see, such as a node's read-only flag).
    pub fn refresh_locks(&self) -> Result<(), String> {
        crate::locks::sync(self, &self.effective_perms())
    }

    /// Mark an edge frozen or not.
    pub fn set_frozen(&mut self, id: EdgeId, frozen: bool) {
        if let Some(e) = self.edges.iter_mut().find(|e| e.id == id) {
            e.frozen = frozen;
        }
    }

    /// Change an edge's fixed permissions (a job tightening or relaxing what it holds).
    pub fn update_edge_perms(&mut self, id: EdgeId, perms: EdgePerms) -> Result<(), String> {
        let Some(i) = self.edges.iter().position(|e| e.id == id) else {
            return Err("edge not found".into());
        };
        let old = std::mem::replace(&mut self.edges[i].perms, perms);
        if let Err(e) = self.check_perms(Some(id)) {
            self.edges[i].perms = old;
            return Err(e);
        }
        Ok(())
    }

    /// The permissions every edge takes now, derived edges included.
    pub fn effective_perms(&self) -> BTreeMap<EdgeId, PermSpec> {
        let mut memo = BTreeMap::new();
        for e in &self.edges {
            self.edge_perms(e, &mut memo, 0);
        }
        memo
    }

    fn edge_perms(
        &self,
        e: &EdgeRec,
        memo: &mut BTreeMap<EdgeId, PermSpec>,
        depth: usize,
    ) -> PermSpec {
        if let Some(p) = memo.get(&e.id) {
            return *p;
        }
        let p = match e.perms {
            EdgePerms::Fixed(p) => p,
            EdgePerms::Derived(kind) => {
                let User::Node(parent) = &e.user else {
                    return PermSpec {
                        perm: Perm::NONE,
                        shared: Perm::ALL,
                    };
                };
                // A depth cap keeps a (forbidden) cycle from recursing forever.
                let parents = if depth > 4096 {
                    PermSpec {
                        perm: Perm::NONE,
                        shared: Perm::ALL,
                    }
                } else {
                    let claims: Vec<Claim> = self
                        .parents_of(parent)
                        .map(|pe| Claim {
                            user: pe.user.clone(),
                            role: pe.role.clone(),
                            perms: self.edge_perms(pe, memo, depth + 1),
                        })
                        .collect();
                    perm::cumulative(&claims)
                };
                let writable = self.nodes.get(parent).is_some_and(|n| !n.read_only);
                perm::derived(kind, parents, writable)
            }
        };
        // A child opened with force-share=on shares everything (QEMU's bdrv_child_perm).
        let force_share = matches!(e.perms, EdgePerms::Derived(_))
            && self.nodes.get(&e.child).is_some_and(|c| {
                c.options.get("force-share").and_then(Value::as_bool) == Some(true)
            });
        let p = if force_share {
            PermSpec {
                shared: Perm::ALL,
                ..p
            }
        } else {
            p
        };
        memo.insert(e.id, p);
        p
    }

    /// Check every node's claims; `new` names the edge to blame first.
    pub fn check_perms(&self, new: Option<EdgeId>) -> Result<(), String> {
        let perms = self.effective_perms();
        for (name, rec) in &self.nodes {
            let edges: Vec<&EdgeRec> = self.parents_of(name).collect();
            let claims: Vec<Claim> = edges
                .iter()
                .map(|e| Claim {
                    user: e.user.clone(),
                    role: e.role.clone(),
                    perms: perms[&e.id],
                })
                .collect();
            let new_idx = new.and_then(|id| edges.iter().position(|e| e.id == id));
            perm::check_claims(name, &claims, new_idx)?;
            if rec.read_only {
                let writer = claims.iter().any(|c| c.perms.perm.contains(Perm::WRITE));
                if writer {
                    return Err(format!(
                        "Read-only block node '{name}' cannot support read-write users"
                    ));
                }
            }
        }
        crate::locks::sync(self, &perms)
    }

    /// Point every edge into `from` — except those `keep` selects — at `to`, after checking
    /// that permissions still hold. The data-path links switch once their in-flight requests
    /// are done.
    pub async fn replace_node(
        &mut self,
        from: &str,
        to: &str,
        keep: impl Fn(&EdgeRec) -> bool,
    ) -> Result<(), String> {
        let Some(to_node) = self.nodes.get(to).map(|n| n.node.clone()) else {
            return Err(format!("Cannot find device='{to}' nor node-name='{to}'"));
        };
        let moved: Vec<usize> = (0..self.edges.len())
            .filter(|&i| self.edges[i].child == from && !keep(&self.edges[i]))
            .collect();
        if let Some(&i) = moved.iter().find(|&&i| self.edges[i].frozen) {
            let e = &self.edges[i];
            return Err(format!(
                "Cannot change '{}' link from '{}' to '{from}'",
                e.role,
                user_name(&e.user)
            ));
        }
        for &i in &moved {
            self.edges[i].child = to.to_string();
        }
        if let Err(e) = self.check_perms(None) {
            for &i in &moved {
                self.edges[i].child = from.to_string();
            }
            return Err(e);
        }
        let node: NodeRef = to_node;
        for &i in &moved {
            if let Some(l) = self.edges[i].link.clone() {
                l.retarget(node.clone()).await;
            }
        }
        Ok(())
    }

    /// Make `overlay`'s backing `base` (or none): the driver's link and the graph's edge
    /// change together; the header is the caller's business.
    pub async fn set_backing(&mut self, overlay: &str, base: Option<&str>) -> Result<(), String> {
        let Some(ov) = self.nodes.get(overlay).map(|n| n.node.clone()) else {
            return Err(format!(
                "Cannot find device='{overlay}' nor node-name='{overlay}'"
            ));
        };
        let old = self.child(overlay, "backing").cloned();
        if let Some(e) = &old
            && e.frozen
        {
            return Err(format!(
                "Cannot change frozen 'backing' link from '{overlay}' to '{}'",
                e.child
            ));
        }
        match (old, base) {
            (Some(e), Some(b)) => {
                let Some(bn) = self.nodes.get(b).map(|n| n.node.clone()) else {
                    return Err(format!("Cannot find device='{b}' nor node-name='{b}'"));
                };
                let i = self
                    .edges
                    .iter()
                    .position(|x| x.id == e.id)
                    .expect("edge exists");
                self.edges[i].child = b.to_string();
                if let Err(err) = self.check_perms(Some(e.id)) {
                    self.edges[i].child = e.child.clone();
                    return Err(err);
                }
                if let Some(l) = &e.link {
                    l.retarget(bn).await;
                }
            }
            (Some(e), None) => {
                ov.set_backing_link(None).map_err(|e| e.to_string())?;
                self.remove_edge(e.id);
            }
            (None, Some(b)) => {
                let Some(bn) = self.nodes.get(b).map(|n| n.node.clone()) else {
                    return Err(format!("Cannot find device='{b}' nor node-name='{b}'"));
                };
                let link = Link::new(bn);
                let id = self.add_edge(
                    User::Node(overlay.to_string()),
                    b,
                    "backing",
                    EdgePerms::Derived(EdgeKind::Cow),
                    Some(link.clone()),
                )?;
                if let Err(e) = ov.set_backing_link(Some(link)) {
                    self.remove_edge(id);
                    return Err(e.to_string());
                }
            }
            (None, None) => {}
        }
        Ok(())
    }

    /// Insert the already registered filter node `filter` (whose `file` edge points at
    /// `below`) above `below`: every other user of `below` now goes through the filter.
    pub async fn insert_filter(&mut self, filter: &str, below: &str) -> Result<(), String> {
        let own = self.filtered_child(filter).map(|e| e.id);
        self.replace_node(below, filter, |e| Some(e.id) == own || is_job_pin(e))
            .await
    }

    /// Take the filter `filter` out: its users go back to the node below it, then the
    /// filter and its edge are removed and the filter's driver closed.
    pub async fn remove_filter(&mut self, filter: &str) -> Result<(), String> {
        let Some(below) = self.filtered_child(filter).map(|e| e.child.clone()) else {
            return Err(format!("Node '{filter}' is not a filter"));
        };
        self.replace_node(filter, &below, is_job_pin).await?;
        self.remove_node(filter).await
    }

    /// Remove a node nobody uses any more: its child edges go, implicit children that are
    /// left without users go too (depth first), and each driver is closed.
    pub async fn remove_node(&mut self, name: &str) -> Result<(), String> {
        if let Some(e) = self.parents_of(name).next() {
            return Err(format!("Node {name} is in use by {}", e.user));
        }
        let Some(rec) = self.nodes.remove(name) else {
            return Err(format!("Failed to find node with node-name='{name}'"));
        };
        self.order.retain(|n| n != name);
        let children: Vec<EdgeRec> = self.children_of(name).cloned().collect();
        for e in &children {
            self.remove_edge(e.id);
        }
        let close = rec.node.inner().close().await;
        for e in children {
            let orphan = self.parents_of(&e.child).next().is_none();
            let implicit = self.nodes.get(&e.child).is_some_and(|c| !c.monitor_owned);
            if orphan && implicit {
                Box::pin(self.remove_node(&e.child)).await?;
            }
        }
        close.map_err(|e| e.to_string())
    }
}

/// Edges a job holds on a node it works on (they stay on the original node when a filter is
/// inserted above it).
fn is_job_pin(e: &EdgeRec) -> bool {
    matches!(e.user, User::Job { .. })
}

fn user_name(u: &User) -> String {
    match u {
        User::Node(n) => n.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::perm::Use;
    use strata_core::mem::MemNode;

    fn mem() -> NodeRef {
        Arc::new(MemNode::with_data(vec![0; 1 << 20]))
    }

    fn add(g: &mut Graph, name: &str, kind: NodeKind, ro: bool) -> Arc<GraphNode> {
        let node = GraphNode::new(name, mem());
        g.insert_node(NodeRec {
            name: name.into(),
            auto_named: false,
            node: node.clone(),
            kind,
            options: Value::Null,
            read_only: ro,
            monitor_owned: true,
        })
        .unwrap();
        node
    }

    fn link_child(g: &mut Graph, parent: &str, child: &str, role: &str, kind: EdgeKind) -> EdgeId {
        let target = g.node(child).unwrap().node.clone();
        g.add_edge(
            User::Node(parent.into()),
            child,
            role,
            EdgePerms::Derived(kind),
            Some(Link::new(target)),
        )
        .unwrap()
    }

    /// file0 <- base (ro qcow2) <- top (qcow2) <- file1
    fn chain() -> Graph {
        let mut g = Graph::new();
        add(&mut g, "f-base", NodeKind::Protocol, true);
        add(&mut g, "base", NodeKind::Format, true);
        add(&mut g, "f-top", NodeKind::Protocol, false);
        add(&mut g, "top", NodeKind::Format, false);
        link_child(&mut g, "base", "f-base", "file", EdgeKind::Storage);
        link_child(&mut g, "top", "f-top", "file", EdgeKind::Storage);
        link_child(&mut g, "top", "base", "backing", EdgeKind::Cow);
        g
    }

    #[test]
    fn duplicate_names_and_auto_names() {
        let mut g = chain();
        let err = g
            .insert_node(NodeRec {
                name: "top".into(),
                auto_named: false,
                node: GraphNode::new("top", mem()),
                kind: NodeKind::Format,
                options: Value::Null,
                read_only: false,
                monitor_owned: true,
            })
            .unwrap_err();
        assert_eq!(err, "Duplicate nodes with node-name='top'");
        let a = g.auto_name();
        let b = g.auto_name();
        assert!(a.starts_with("#block") && a != b);
        assert!(valid_node_name("a-b.c_d1") && !valid_node_name("1a") && !valid_node_name(&a));
    }

    #[test]
    fn edge_perms_match_qemu_for_a_two_image_chain() {
        // The x-debug-query-block-graph of qemu-storage-daemon 10.0.2 for this chain.
        let g = chain();
        let p = g.effective_perms();
        let get = |child: &str, role: &str| {
            let e = g
                .edges()
                .iter()
                .find(|e| e.child == child && e.role == role)
                .unwrap();
            (p[&e.id].perm.qapi_names(), p[&e.id].shared.qapi_names())
        };
        assert_eq!(
            get("f-top", "file"),
            (
                vec!["consistent-read", "write", "resize"],
                vec!["consistent-read", "write-unchanged"]
            )
        );
        assert_eq!(
            get("f-base", "file"),
            (
                vec!["consistent-read"],
                vec!["consistent-read", "write-unchanged"]
            )
        );
        assert_eq!(
            get("base", "backing"),
            (
                vec![],
                vec!["consistent-read", "write", "write-unchanged", "resize"]
            )
        );
    }

    #[test]
    fn stream_conflicts_with_a_writable_export_on_the_base() {
        let mut g = chain();
        g.node_mut("base").unwrap().read_only = false;
        g.node_mut("f-base").unwrap().read_only = false;
        let n = g.node("base").unwrap().node.clone();
        g.add_edge(
            User::Backend,
            "base",
            "root",
            EdgePerms::Fixed(Use::ExportWrite.perms()),
            Some(Link::new(n)),
        )
        .unwrap();
        let err = g
            .add_edge(
                User::Job {
                    kind: "stream",
                    id: "job0".into(),
                },
                "base",
                "intermediate node",
                EdgePerms::Fixed(Use::StreamIntermediate.perms()),
                None,
            )
            .unwrap_err();
        assert!(err.starts_with("Permission conflict on node 'base': permissions 'write' are both required by an unnamed block device"), "{err}");
        assert_eq!(g.edges().len(), 4, "a failed add leaves nothing behind");
    }

    #[test]
    fn writers_on_read_only_nodes_are_refused() {
        let mut g = chain();
        let n = g.node("base").unwrap().node.clone();
        let err = g
            .add_edge(
                User::Backend,
                "base",
                "root",
                EdgePerms::Fixed(Use::ExportWrite.perms()),
                Some(Link::new(n)),
            )
            .unwrap_err();
        assert_eq!(
            err,
            "Read-only block node 'base' cannot support read-write users"
        );
    }

    #[test]
    fn a_second_writer_on_a_mirror_target_is_refused() {
        let mut g = chain();
        g.add_edge(
            User::Backend,
            "top",
            "root",
            EdgePerms::Fixed(Use::MirrorTarget.perms()),
            None,
        )
        .unwrap();
        let err = g
            .add_edge(
                User::Backend,
                "top",
                "root",
                EdgePerms::Fixed(Use::ExportWrite.perms()),
                None,
            )
            .unwrap_err();
        assert!(
            err.contains("permissions 'consistent read, write' are both required"),
            "{err}"
        );
    }

    #[test]
    fn two_readers_of_one_node_coexist() {
        let mut g = chain();
        for _ in 0..2 {
            g.add_edge(
                User::Backend,
                "top",
                "root",
                EdgePerms::Fixed(Use::MirrorSource.perms()),
                None,
            )
            .unwrap();
        }
    }

    #[tokio::test]
    async fn insert_and_remove_a_filter_and_relink_backing() {
        let mut g = chain();
        let top = g.node("top").unwrap().node.clone();
        let export = Link::new(top.clone());
        g.add_edge(
            User::Backend,
            "top",
            "root",
            EdgePerms::Fixed(Use::ExportWrite.perms()),
            Some(export.clone()),
        )
        .unwrap();
        add(&mut g, "flt", NodeKind::Filter, false);
        link_child(&mut g, "flt", "top", "file", EdgeKind::Filtered);
        g.insert_filter("flt", "top").await.unwrap();
        assert_eq!(
            export
                .target()
                .as_any()
                .downcast_ref::<GraphNode>()
                .unwrap()
                .name(),
            "flt"
        );
        assert!(
            g.parents_of("top")
                .all(|e| e.user == User::Node("flt".into()))
        );
        g.remove_filter("flt").await.unwrap();
        assert!(g.node("flt").is_none());
        assert_eq!(
            export
                .target()
                .as_any()
                .downcast_ref::<GraphNode>()
                .unwrap()
                .name(),
            "top"
        );

        // Relinking goes through the driver: one without backing support refuses, and the
        // graph stays as it was.
        let err = g.set_backing("top", None).await.unwrap_err();
        assert_eq!(err, "Driver 'file' does not support backing files");
        assert_eq!(g.chain_below("top").as_deref(), Some("base"));
        g.set_backing("top", Some("f-base")).await.unwrap();
        assert_eq!(g.chain_below("top").as_deref(), Some("f-base"));
    }

    #[tokio::test]
    async fn in_use_nodes_cannot_be_removed_and_implicit_children_go_with_their_parent() {
        let mut g = chain();
        assert_eq!(
            g.remove_node("base").await.unwrap_err(),
            "Node base is in use by node 'top'"
        );
        g.node_mut("f-top").unwrap().monitor_owned = false;
        g.remove_node("top").await.unwrap();
        assert!(g.node("f-top").is_none());
        assert!(g.node("base").is_some());
    }
}
