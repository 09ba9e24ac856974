//! Permissions, QEMU's successor to op blockers: every parent→child edge *requires* some
//! permissions on the child and *shares* some with the child's other parents; two parents
//! conflict when one requires what the other does not share.
//!
//! What each kind of user takes is data, not code ([`USES`]), as QEMU's 2014 block-layer to-do
//! list asked ("make the op blocker mechanism use a matrix as data"); which uses may meet on
//! one node follows from that table by [`Perm::conflicts`], and the tests check every cell.

use std::fmt;

/// A set of permissions (QEMU's `BLK_PERM_*` bits).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Perm(u8);

impl Perm {
    /// Nothing.
    pub const NONE: Perm = Perm(0);
    /// The user sees a complete, self-consistent image.
    pub const CONSISTENT_READ: Perm = Perm(0x01);
    /// May change what the node shows.
    pub const WRITE: Perm = Perm(0x02);
    /// May write data that leaves what the node shows unchanged (copy-on-read, stream).
    pub const WRITE_UNCHANGED: Perm = Perm(0x04);
    /// May change the node's size.
    pub const RESIZE: Perm = Perm(0x08);
    /// Everything.
    pub const ALL: Perm = Perm(0x0f);

    /// The bits in QEMU's order with their message names and QAPI names.
    const NAMES: [(Perm, &'static str, &'static str); 4] = [
        (Perm::CONSISTENT_READ, "consistent read", "consistent-read"),
        (Perm::WRITE, "write", "write"),
        (Perm::WRITE_UNCHANGED, "write unchanged", "write-unchanged"),
        (Perm::RESIZE, "resize", "resize"),
    ];

    /// QEMU's `BLK_PERM_*` bit layout (what image locks are keyed by).
    pub const fn bits(self) -> u8 {
        self.0
    }

    /// Whether every bit of `other` is in `self`.
    pub const fn contains(self, other: Perm) -> bool {
        self.0 & other.0 == other.0
    }

    /// Whether no bit is set.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Union.
    pub const fn union(self, other: Perm) -> Perm {
        Perm(self.0 | other.0)
    }

    /// Intersection.
    pub const fn intersect(self, other: Perm) -> Perm {
        Perm(self.0 & other.0)
    }

    /// `self` without the bits of `other`.
    pub const fn without(self, other: Perm) -> Perm {
        Perm(self.0 & !other.0)
    }

    /// The permissions `a` requires that `b` does not share, and the reverse; a use pair may
    /// coexist on one node only when both are empty.
    pub const fn conflicts(a: Use, b: Use) -> (Perm, Perm) {
        let (ap, ash) = (a.spec().perm, a.spec().shared);
        let (bp, bsh) = (b.spec().perm, b.spec().shared);
        (ap.without(bsh), bp.without(ash))
    }

    /// Names as QEMU joins them in messages: `consistent read, write`.
    pub fn message_names(self) -> String {
        Perm::NAMES
            .iter()
            .filter(|(p, _, _)| self.contains(*p))
            .map(|(_, n, _)| *n)
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// QAPI names (`BlockPermission`), as `x-debug-query-block-graph` lists them.
    pub fn qapi_names(self) -> Vec<&'static str> {
        Perm::NAMES
            .iter()
            .filter(|(p, _, _)| self.contains(*p))
            .map(|(_, _, n)| *n)
            .collect()
    }

    /// Parse one QAPI name.
    pub fn parse_qapi(s: &str) -> Option<Perm> {
        Perm::NAMES
            .iter()
            .find(|(_, _, n)| *n == s)
            .map(|(p, _, _)| *p)
    }
}

impl std::ops::BitOr for Perm {
    type Output = Perm;
    fn bitor(self, rhs: Perm) -> Perm {
        self.union(rhs)
    }
}

impl fmt::Debug for Perm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Perm({})", self.qapi_names().join("|"))
    }
}

/// What one edge requires and shares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PermSpec {
    /// Required on the child.
    pub perm: Perm,
    /// Tolerated from the child's other parents.
    pub shared: Perm,
}

/// The fixed ways something that is not a node's parent node uses it: exports, jobs and
/// their internal block backends, one-off commands. (Edges between nodes derive their
/// permissions from the parent node's own users; see [`derived`].)
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Use {
    /// A read-only export (or any reader that needs a consistent view).
    ExportRead,
    /// A writable export.
    ExportWrite,
    /// `block_resize`'s temporary backend.
    Resize,
    /// A job's "main node" edge (the filter it inserted, or the device): it only pins it.
    JobMain,
    /// The stream job's internal backend on its copy-on-read filter.
    StreamBackend,
    /// Stream: the node being streamed into (`active node`).
    StreamActive,
    /// Stream: each node between the active one and the base (`intermediate node`).
    StreamIntermediate,
    /// Commit (intermediate and active): each node from top down to above the base.
    CommitIntermediate,
    /// Commit: the base, written through the job's backend.
    CommitBase,
    /// Commit: the base when it must grow to the top's size.
    CommitBaseGrow,
    /// Active commit: the base (target of the mirror machinery).
    ActiveCommitBase,
    /// Active commit: the base when it must grow.
    ActiveCommitBaseGrow,
    /// Mirror: the mirror_top filter's backend (consistent reads of the source).
    MirrorSource,
    /// Mirror: the original node below the filter (`source`).
    MirrorSourceNode,
    /// Mirror: the target's backend.
    MirrorTarget,
    /// A job's pin on its target node (`target`), sharing everything.
    JobTarget,
    /// copy-before-write's edge to its target (backup / fleecing image).
    CbwTarget,
}

/// One row of [`USES`].
#[derive(Debug, Clone, Copy)]
pub struct UseSpec {
    /// The use.
    pub usage: Use,
    /// The child role name QEMU prints in conflict messages.
    pub role: &'static str,
    /// Required permissions.
    pub perm: Perm,
    /// Shared permissions.
    pub shared: Perm,
}

const CR: Perm = Perm::CONSISTENT_READ;
const W: Perm = Perm::WRITE;
const WU: Perm = Perm::WRITE_UNCHANGED;
const RS: Perm = Perm::RESIZE;
const NONE: Perm = Perm::NONE;
const ALL: Perm = Perm::ALL;

/// What every fixed use takes (QEMU `block.c`, `blockjob.c`, `block/{stream,commit,mirror,
/// backup,copy-before-write}.c`, `block/export/export.c`; see the reference's §7.3).
pub const USES: [UseSpec; 17] = [
    UseSpec {
        usage: Use::ExportRead,
        role: "root",
        perm: CR,
        shared: ALL,
    },
    UseSpec {
        usage: Use::ExportWrite,
        role: "root",
        perm: CR.union(W),
        shared: ALL,
    },
    UseSpec {
        usage: Use::Resize,
        role: "root",
        perm: RS,
        shared: ALL,
    },
    UseSpec {
        usage: Use::JobMain,
        role: "main node",
        perm: NONE,
        shared: ALL,
    },
    UseSpec {
        usage: Use::StreamBackend,
        role: "root",
        perm: CR,
        shared: CR.union(WU).union(W),
    },
    UseSpec {
        usage: Use::StreamActive,
        role: "active node",
        perm: NONE,
        shared: CR.union(WU).union(W),
    },
    UseSpec {
        usage: Use::StreamIntermediate,
        role: "intermediate node",
        perm: NONE,
        shared: CR.union(WU),
    },
    UseSpec {
        usage: Use::CommitIntermediate,
        role: "intermediate node",
        perm: NONE,
        shared: WU.union(W),
    },
    UseSpec {
        usage: Use::CommitBase,
        role: "root",
        perm: CR.union(W),
        shared: CR.union(WU),
    },
    UseSpec {
        usage: Use::CommitBaseGrow,
        role: "root",
        perm: CR.union(W).union(RS),
        shared: CR.union(WU),
    },
    UseSpec {
        usage: Use::ActiveCommitBase,
        role: "root",
        perm: W,
        shared: WU.union(CR).union(W),
    },
    UseSpec {
        usage: Use::ActiveCommitBaseGrow,
        role: "root",
        perm: W.union(RS),
        shared: WU.union(CR).union(W),
    },
    UseSpec {
        usage: Use::MirrorSource,
        role: "root",
        perm: CR,
        shared: CR.union(WU).union(W),
    },
    UseSpec {
        usage: Use::MirrorSourceNode,
        role: "source",
        perm: NONE,
        shared: CR.union(WU).union(W),
    },
    UseSpec {
        usage: Use::MirrorTarget,
        role: "root",
        perm: W,
        shared: WU,
    },
    UseSpec {
        usage: Use::JobTarget,
        role: "target",
        perm: NONE,
        shared: ALL,
    },
    UseSpec {
        usage: Use::CbwTarget,
        role: "target",
        perm: W,
        shared: ALL.without(RS),
    },
];

impl Use {
    /// This use's row of [`USES`].
    pub const fn spec(self) -> UseSpec {
        let mut i = 0;
        while i < USES.len() {
            if USES[i].usage as u8 == self as u8 {
                return USES[i];
            }
            i += 1;
        }
        panic!("every Use has a row in USES")
    }

    /// As a [`PermSpec`].
    pub const fn perms(self) -> PermSpec {
        let s = self.spec();
        PermSpec {
            perm: s.perm,
            shared: s.shared,
        }
    }
}

/// How a node edge takes permissions on its child, derived from what the parent node's own
/// users need (QEMU's `bdrv_default_perms`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EdgeKind {
    /// A format's `file` (or `data-file`): the metadata must stay consistent, so it always
    /// reads consistently, writes and resizes when the format is writable, and never lets
    /// anyone else write or resize.
    Storage,
    /// A format's `backing`: consistent reads when the parent needs them; others may write
    /// and resize only when the parent copes with changing data.
    Cow,
    /// A filter's child: passes its parents' needs straight through.
    Filtered,
}

/// The permissions an edge of `kind` takes, given the cumulative `parents` permissions of
/// the node it starts from (union of what they require, intersection of what they share)
/// and whether that node is writable.
pub fn derived(kind: EdgeKind, parents: PermSpec, writable: bool) -> PermSpec {
    match kind {
        EdgeKind::Storage => {
            let mut perm = CR;
            if writable {
                perm = perm.union(W).union(RS);
            }
            PermSpec {
                perm,
                shared: parents.shared.without(W.union(RS)).union(CR.union(WU)),
            }
        }
        EdgeKind::Cow => {
            let perm = parents.perm.intersect(CR);
            let shared = if parents.shared.contains(W) {
                W.union(RS)
            } else {
                NONE
            };
            PermSpec {
                perm,
                shared: shared.union(CR).union(WU),
            }
        }
        EdgeKind::Filtered => parents,
    }
}

/// Who uses a node, as QEMU names it in conflict messages.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum User {
    /// A parent node.
    Node(String),
    /// An anonymous block backend (exports, jobs' internal backends).
    Backend,
    /// A job itself (`stream job 'job0'`).
    Job {
        /// The job type (`stream`, `commit`, `mirror`, `backup`).
        kind: &'static str,
        /// The job id.
        id: String,
    },
}

impl fmt::Display for User {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            User::Node(n) => write!(f, "node '{n}'"),
            User::Backend => f.write_str("an unnamed block device"),
            User::Job { kind, id } => write!(f, "{kind} job '{id}'"),
        }
    }
}

/// One parent's claim on a node, for the conflict check.
#[derive(Debug, Clone)]
pub struct Claim {
    /// Who.
    pub user: User,
    /// Child role name (`file`, `backing`, `root`, `intermediate node`, ...).
    pub role: String,
    /// What it requires and shares.
    pub perms: PermSpec,
}

/// QEMU's conflict message: `required` needs `perm`, which `unshared` does not share.
pub fn conflict_message(node: &str, perm: Perm, required: &Claim, unshared: &Claim) -> String {
    format!(
        "Permission conflict on node '{node}': permissions '{}' are both required by {} (uses \
         node '{node}' as '{}' child) and unshared by {} (uses node '{node}' as '{}' child).",
        perm.message_names(),
        required.user,
        required.role,
        unshared.user,
        unshared.role
    )
}

/// Check that the claims on `node` can coexist; `new` (if any) is checked first, against
/// the others in order, as QEMU does when an edge is added.
pub fn check_claims(node: &str, claims: &[Claim], new: Option<usize>) -> Result<(), String> {
    let mut order: Vec<usize> = new.into_iter().collect();
    order.extend((0..claims.len()).filter(|i| Some(*i) != new));
    for &a in &order {
        for (b, other) in claims.iter().enumerate() {
            if a == b {
                continue;
            }
            let this = &claims[a];
            let p = this.perms.perm.without(other.perms.shared);
            if !p.is_empty() {
                return Err(conflict_message(node, p, this, other));
            }
            let p = other.perms.perm.without(this.perms.shared);
            if !p.is_empty() {
                return Err(conflict_message(node, p, other, this));
            }
        }
    }
    Ok(())
}

/// Cumulative permissions of a node's parents: union of required, intersection of shared.
pub fn cumulative(claims: &[Claim]) -> PermSpec {
    claims.iter().fold(
        PermSpec {
            perm: NONE,
            shared: ALL,
        },
        |acc, c| PermSpec {
            perm: acc.perm.union(c.perms.perm),
            shared: acc.shared.intersect(c.perms.shared),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL_USES: [Use; 17] = [
        Use::ExportRead,
        Use::ExportWrite,
        Use::Resize,
        Use::JobMain,
        Use::StreamBackend,
        Use::StreamActive,
        Use::StreamIntermediate,
        Use::CommitIntermediate,
        Use::CommitBase,
        Use::CommitBaseGrow,
        Use::ActiveCommitBase,
        Use::ActiveCommitBaseGrow,
        Use::MirrorSource,
        Use::MirrorSourceNode,
        Use::MirrorTarget,
        Use::JobTarget,
        Use::CbwTarget,
    ];

    /// Which pairs of uses may meet on one node (`X` = conflict), reviewed cell by cell against
    /// QEMU's rules; a change to [`USES`] that moves any cell fails here. Row/column order as [`ALL_USES`].
    const EXPECTED: [&str; 17] = [
        // ER EW RS JM SB SA SI CI CB CG AB AG MS MN MT JT CT
        "  .  .  .  .  .  .  .  X  .  .  .  .  .  .  X  .  .", // ExportRead
        "  .  .  .  .  .  .  X  X  X  X  .  .  .  .  X  .  .", // ExportWrite
        "  .  .  .  .  X  X  X  X  X  X  X  X  X  X  X  .  X", // Resize
        "  .  .  .  .  .  .  .  .  .  .  .  .  .  .  .  .  .", // JobMain
        "  .  .  X  .  .  .  .  X  .  X  .  X  .  .  X  .  .", // StreamBackend
        "  .  .  X  .  .  .  .  .  .  X  .  X  .  .  .  .  .", // StreamActive
        "  .  X  X  .  .  .  .  .  X  X  X  X  .  .  X  .  X", // StreamIntermediate
        "  X  X  X  .  X  .  .  .  X  X  .  X  X  .  .  .  .", // CommitIntermediate
        "  .  X  X  .  .  .  X  X  X  X  X  X  .  .  X  .  X", // CommitBase
        "  .  X  X  .  X  X  X  X  X  X  X  X  X  X  X  .  X", // CommitBaseGrow
        "  .  .  X  .  .  .  X  .  X  X  .  X  .  .  X  .  .", // ActiveCommitBase
        "  .  .  X  .  X  X  X  X  X  X  X  X  X  X  X  .  X", // ActiveCommitBaseGrow
        "  .  .  X  .  .  .  .  X  .  X  .  X  .  .  X  .  .", // MirrorSource
        "  .  .  X  .  .  .  .  .  .  X  .  X  .  .  .  .  .", // MirrorSourceNode
        "  X  X  X  .  X  .  X  .  X  X  X  X  X  .  X  .  X", // MirrorTarget
        "  .  .  .  .  .  .  .  .  .  .  .  .  .  .  .  .  .", // JobTarget
        "  .  .  X  .  .  .  X  .  X  X  .  X  .  .  X  .  .", // CbwTarget
    ];

    #[test]
    fn table_has_one_row_per_use_in_order() {
        for (i, u) in ALL_USES.iter().enumerate() {
            assert_eq!(USES[i].usage, *u);
            assert_eq!(u.spec().usage, *u);
        }
    }

    #[test]
    fn every_cell_of_the_conflict_matrix() {
        for (i, a) in ALL_USES.iter().enumerate() {
            let row: Vec<&str> = EXPECTED[i].split_whitespace().collect();
            for (j, b) in ALL_USES.iter().enumerate() {
                let (x, y) = Perm::conflicts(*a, *b);
                let conflict = !x.is_empty() || !y.is_empty();
                assert_eq!(conflict, row[j] == "X", "{a:?} vs {b:?}: {x:?} / {y:?}");
                // The relation is symmetric.
                let (x2, y2) = Perm::conflicts(*b, *a);
                assert_eq!((x, y), (y2, x2));
            }
        }
    }

    fn claim(user: User, role: &str, u: Use) -> Claim {
        Claim {
            user,
            role: role.into(),
            perms: u.perms(),
        }
    }

    #[test]
    fn qsd_jobs_message_matches_qemu() {
        // iotest qsd-jobs: a writable export on the base, then a stream of the overlay.
        let claims = [
            claim(User::Backend, "root", Use::ExportWrite),
            claim(
                User::Job {
                    kind: "stream",
                    id: "job0".into(),
                },
                "intermediate node",
                Use::StreamIntermediate,
            ),
        ];
        let err = check_claims("fmt_base", &claims, Some(1)).unwrap_err();
        assert_eq!(
            err,
            "Permission conflict on node 'fmt_base': permissions 'write' are both required by \
             an unnamed block device (uses node 'fmt_base' as 'root' child) and unshared by \
             stream job 'job0' (uses node 'fmt_base' as 'intermediate node' child)."
        );
    }

    #[test]
    fn real_cases() {
        // Two backups of one node: the cbw filters' source edges are filtered reads; their
        // targets are distinct. Two readers of one source may coexist.
        assert_eq!(
            Perm::conflicts(Use::MirrorSource, Use::MirrorSource),
            (NONE, NONE)
        );
        // A second writer on a mirror target may not.
        assert_ne!(Perm::conflicts(Use::MirrorTarget, Use::ExportWrite).1, NONE);
        // A stream and a commit over the same intermediate node may not.
        let (a, b) = Perm::conflicts(Use::StreamIntermediate, Use::CommitBase);
        assert!(!a.is_empty() || !b.is_empty());
    }

    #[test]
    fn derived_edges_follow_qemu_defaults() {
        let none = PermSpec {
            perm: NONE,
            shared: ALL,
        };
        // A writable format on its file: reads, writes and resizes; shares only reads.
        assert_eq!(
            derived(EdgeKind::Storage, none, true),
            PermSpec {
                perm: CR | W | RS,
                shared: CR | WU
            }
        );
        // Its backing: nothing needed, everything shared while nobody needs consistency.
        assert_eq!(
            derived(EdgeKind::Cow, none, true),
            PermSpec {
                perm: NONE,
                shared: ALL
            }
        );
        // A parent that does not tolerate writes makes the backing unwritable by others.
        let strict = PermSpec {
            perm: CR,
            shared: CR | WU,
        };
        assert_eq!(
            derived(EdgeKind::Cow, strict, true),
            PermSpec {
                perm: CR,
                shared: CR | WU
            }
        );
        assert_eq!(derived(EdgeKind::Filtered, strict, true), strict);
    }

    #[test]
    fn names() {
        assert_eq!((CR | W).message_names(), "consistent read, write");
        assert_eq!((W | RS).qapi_names(), vec!["write", "resize"]);
        assert_eq!(Perm::parse_qapi("write-unchanged"), Some(WU));
    }
}
