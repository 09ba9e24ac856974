//! Check and repair without QEMU: damage a seed image (written by QEMU, kept in the fuzz
//! corpus) and see the verdict and the repair.

use std::path::Path;
use std::sync::Arc;

use strata_core::NodeRef;
use strata_core::mem::MemNode;
use strata_qcow2::check::{CheckReport, RepairMode, check};

fn seed(name: &str) -> Vec<u8> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/qcow2_check");
    std::fs::read(dir.join(name)).unwrap()
}

fn run(data: Vec<u8>, mode: Option<RepairMode>) -> (CheckReport, Vec<u8>) {
    let node = Arc::new(MemNode::with_data(data));
    let r: NodeRef = node.clone();
    let rep = futures::executor::block_on(check(&r, mode)).unwrap();
    (rep, node.snapshot())
}

fn be64(d: &[u8], o: usize) -> u64 {
    u64::from_be_bytes(d[o..o + 8].try_into().unwrap())
}

/// The 16-bit refcount of `cluster` in refcount block 0 of `d` (512-byte clusters).
fn refcount_at(d: &[u8], cluster: usize) -> usize {
    let rt = be64(d, 48) as usize;
    be64(d, rt) as usize + 2 * cluster
}

#[test]
fn leak_is_reported_and_freed() {
    let mut d = seed("c512");
    let n = d.len() / 512;
    d.resize(d.len() + 512, 0);
    let at = refcount_at(&d, n);
    d[at + 1] = 1;
    let (r, _) = run(d.clone(), None);
    assert_eq!(r.exit_code(), 3);
    assert_eq!(r.counts.leaks, 1);
    assert_eq!(
        r.messages,
        [format!("Leaked cluster {n} refcount=1 reference=0")]
    );
    assert!(
        r.render_human()
            .contains("\n1 leaked clusters were found on the image.\n")
    );

    let (r, fixed) = run(d, Some(RepairMode::Leaks));
    assert_eq!(r.exit_code(), 0);
    assert_eq!(r.repaired, Some((1, 0)));
    assert!(r.render_human().starts_with(
        "The following inconsistencies were found and repaired:\n\n    1 leaked clusters\n    0 corruptions\n\nDouble checking the fixed image now...\nNo errors were found on the image.\n"
    ));
    assert_eq!(run(fixed, None).0.exit_code(), 0);
}

#[test]
fn refcount_too_low_needs_rebuild() {
    let mut d = seed("c512");
    // The L1 table's cluster loses its refcount.
    let l1 = be64(&d, 40) as usize / 512;
    let at = refcount_at(&d, l1);
    d[at] = 0;
    d[at + 1] = 0;
    let (r, _) = run(d.clone(), None);
    assert_eq!(r.exit_code(), 2);
    assert!(
        r.messages
            .contains(&format!("ERROR cluster {l1} refcount=0 reference=1"))
    );

    // -r leaks cannot fix it: the refcount structure must be rebuilt.
    let (r, _) = run(d.clone(), Some(RepairMode::Leaks));
    assert_eq!(r.exit_code(), 1);
    assert_eq!(r.failure.as_deref(), Some("Input/output error"));

    let (r, fixed) = run(d, Some(RepairMode::All));
    assert!(
        r.messages
            .contains(&"Rebuilding refcount structure".to_string())
    );
    assert_eq!(r.exit_code(), 0, "{}", r.render_stderr());
    let (again, _) = run(fixed, None);
    assert_eq!(again.exit_code(), 0);
    assert!(again.messages.is_empty());
}

#[test]
fn garbage_is_an_open_error() {
    assert!(
        futures::executor::block_on(check(
            &(Arc::new(MemNode::with_data(b"not an image".to_vec())) as NodeRef),
            None
        ))
        .is_err()
    );
}
