//! Crash-safe persistent bitmaps (write-intent copies, `bitmap/intent.rs`): an image
//! dropped without close (everything it wrote is kept, as after a kill -9) reopens with its
//! bitmaps consistent and a superset of the writes; without Strata's autoclear bit (QEMU
//! wrote the image since) they are inconsistent, as QEMU reports them. The 100-cycle proof
//! over a real daemon is `tests/e2e/test_crash_bitmaps.py`.

mod common;

use common::*;
use strata_core::BlockNode;

const WRITE_INTENT: u64 = 1 << 63;

fn autoclear(bytes: &[u8]) -> u64 {
    u64::from_be_bytes(bytes[88..96].try_into().unwrap())
}

fn image(d: &Dir, bitmap: bool) -> std::sync::Arc<strata_core::mem::MemNode> {
    let img = d.s("c.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", &img, "64M"]);
    if bitmap {
        ok("qemu-img", &["bitmap", "--add", "-g", "64k", &img, "b0"]);
    }
    load(&d.path("c.qcow2"))
}

async fn assert_dirty(q: &strata_qcow2::Qcow2, name: &str, ranges: &[(u64, u64)]) {
    let st = q.bitmaps().into_iter().find(|b| b.name == name).unwrap();
    assert!(!st.in_use, "{st:?}");
    let d = q.bitmap_data(name).await.unwrap();
    for &(off, len) in ranges {
        for o in (off..off + len).step_by(65536) {
            assert!(d.get(o), "{name}: offset {o} of a write is clean");
        }
    }
}

#[tokio::test]
async fn bitmap_survives_a_crash_as_a_superset() {
    let d = Dir::new();
    let m = image(&d, true);
    let rw = open(&m, false, None, None).await;
    assert!(rw.bitmaps_crash_safe());
    assert_ne!(autoclear(&m.snapshot()) & WRITE_INTENT, 0);
    let writes = [(0, 4096), (5 << 20, 200 << 10), (63 << 20, 1 << 20)];
    for &(off, len) in &writes {
        write(&rw, off, &vec![9u8; len as usize]).await;
    }
    rw.discard(32 << 20, 128 << 10).await.unwrap();
    drop(rw); // the crash: no close, no flush
    save(&m, &d.path("c.qcow2"));
    let info = ok("qemu-img", &["info", "--output=json", &d.s("c.qcow2")]);
    assert!(info.contains("\"in-use\""), "{info}");
    let (code, out) = run("qemu-img", &["check", &d.s("c.qcow2")]);
    assert!(code == 0 || code == 3, "{out}");

    let rw = open(&m, false, None, None).await;
    assert!(rw.bitmap_notes()[0].contains("loaded its write-intent copy"));
    let mut all = writes.to_vec();
    all.push((32 << 20, 128 << 10));
    assert_dirty(&rw, "b0", &all).await;
    rw.close().await.unwrap();
    save(&m, &d.path("c.qcow2"));
    assert_eq!(autoclear(&m.snapshot()) & WRITE_INTENT, 0);
    let info = ok("qemu-img", &["info", "--output=json", &d.s("c.qcow2")]);
    assert!(!info.contains("\"in-use\""), "{info}");
    // Leaks from the crash (the clusters the first open replaced were freed only in memory)
    // are allowed, as after any crash.
    let (code, out) = run("qemu-img", &["check", &d.s("c.qcow2")]);
    assert!(code == 0 || code == 3, "{out}");
}

#[tokio::test]
async fn a_qemu_write_withdraws_the_promise() {
    let d = Dir::new();
    let m = image(&d, true);
    let rw = open(&m, false, None, None).await;
    write(&rw, 1 << 20, &[1u8; 4096]).await;
    drop(rw);
    save(&m, &d.path("c.qcow2"));
    // QEMU opens the image read-write: it does not know our bit and clears it.
    ok(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 2 2M 4k", &d.s("c.qcow2")],
    );
    let m = load(&d.path("c.qcow2"));
    assert_eq!(autoclear(&m.snapshot()) & WRITE_INTENT, 0);
    let rw = open(&m, false, None, None).await;
    let st = &rw.bitmaps()[0];
    assert!(st.in_use, "{st:?}");
    assert!(
        !rw.bitmaps_crash_safe(),
        "an inconsistent bitmap turns it off"
    );
    assert!(rw.bitmap_notes()[0].contains("no Strata write-intent record"));
}

#[tokio::test]
async fn cleared_bits_reach_the_disk_at_flush() {
    let d = Dir::new();
    let m = image(&d, true);
    let rw = open(&m, false, None, None).await;
    write(&rw, 0, &[1u8; 4096]).await;
    rw.flush().await.unwrap();
    rw.bitmap_clear("b0").unwrap();
    rw.flush().await.unwrap();
    write(&rw, 8 << 20, &[1u8; 4096]).await;
    drop(rw);
    let rw = open(&m, false, None, None).await;
    let data = rw.bitmap_data("b0").await.unwrap();
    assert!(
        !data.get(0),
        "cleared before the crash, written out at flush"
    );
    assert!(data.get(8 << 20));
}

#[tokio::test]
async fn bitmaps_added_while_open_get_a_copy_at_the_next_write() {
    let d = Dir::new();
    let m = image(&d, false);
    let rw = open(&m, false, None, None).await;
    assert!(!rw.bitmaps_crash_safe());
    rw.bitmap_add("n", None, true).unwrap();
    write(&rw, 3 << 20, &[5u8; 65536]).await;
    assert!(rw.bitmaps_crash_safe());
    write(&rw, 40 << 20, &[5u8; 4096]).await;
    drop(rw);
    let rw = open(&m, false, None, None).await;
    assert_dirty(&rw, "n", &[(3 << 20, 65536), (40 << 20, 4096)]).await;
}

#[tokio::test]
async fn a_resize_withdraws_the_promise() {
    let d = Dir::new();
    let m = image(&d, true);
    let rw = open(&m, false, None, None).await;
    rw.truncate(128 << 20, strata_core::Prealloc::Off)
        .await
        .unwrap();
    write(&rw, 100 << 20, &[1u8; 4096]).await;
    assert_eq!(autoclear(&m.snapshot()) & WRITE_INTENT, 0);
    drop(rw);
    let rw = open(&m, false, None, None).await;
    assert!(rw.bitmaps()[0].in_use, "inconsistent, as QEMU's");
}

#[tokio::test]
async fn enabling_a_bitmap_is_recorded_before_the_next_write() {
    let d = Dir::new();
    let img = d.s("c.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", &img, "64M"]);
    ok("qemu-img", &["bitmap", "--add", "--disable", &img, "off"]);
    let m = load(&d.path("c.qcow2"));
    let rw = open(&m, false, None, None).await;
    write(&rw, 0, &[1u8; 4096]).await;
    rw.bitmap_enable("off").unwrap();
    write(&rw, 1 << 20, &[1u8; 4096]).await;
    drop(rw);
    let rw = open(&m, false, None, None).await;
    let st = &rw.bitmaps()[0];
    assert!(st.enabled, "comes back recording: {st:?}");
    let data = rw.bitmap_data("off").await.unwrap();
    assert!(!data.get(0), "written while disabled");
    assert!(data.get(1 << 20));
}
