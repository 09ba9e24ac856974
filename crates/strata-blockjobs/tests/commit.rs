//! `block-commit` (intermediate) end to end: chains made by qemu-img/qemu-io, a guest writing
//! to the active layer while the job runs, results checked with QEMU's tools and events
//! compared with what qemu-storage-daemon 10.0.2 emits for the same scenario.

mod chainjobs;

use std::time::Duration;

use chainjobs::*;
use serde_json::json;
use strata_blockjobs::commit::block_commit;
use strata_job::JobStatus;

fn three() -> Vec<Layer> {
    vec![
        layer("base", 4 * MIB, &[(1, 0, MIB), (5, 3 * MIB, 256 * KIB)]),
        layer("mid", 4 * MIB, &[(2, MIB, MIB), (6, 512 * KIB, 128 * KIB)]),
        layer("top", 4 * MIB, &[(3, 2 * MIB, 512 * KIB)]),
    ]
}

async fn commit_with_writer(w: &World, args: serde_json::Value, seed: u64) {
    let (edge, link) = w.export("top").await;
    let writer = w.writer(link, seed);
    tokio::time::sleep(Duration::from_millis(30)).await;
    block_commit(&w.env, &World::args(args))
        .await
        .expect("block-commit");
    w.wait_gone("job0").await;
    assert!(writer.stop().await > 0);
    {
        let g = w.env.graph.lock().await;
        assert!(g.node("base").unwrap().read_only, "base back to read-only");
        assert!(g.edges().iter().all(|e| !e.frozen));
    }
    w.close(&[edge]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_mid_into_base_with_guest_writes() {
    let w = World::new(three(), true).await;
    commit_with_writer(
        &w,
        json!({"job-id": "job0", "device": "top", "top-node": "mid", "base-node": "base", "speed": 4 * MIB}),
        5,
    )
    .await;
    w.verify("top");
    assert_eq!(w.chain("top"), ["top", "base"]);
    assert_eq!(
        w.backing_of("top").as_deref(),
        Some(w.path_str("base").as_str())
    );
    assert_eq!(w.events(false), qsd_success("commit", 4 * MIB, 4 * MIB));
}

/// The overlay's header names the base only once what the commit wrote into the base is
/// on disk: a kill right after the job leaves the full guest view.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_commit_is_on_disk_before_the_overlay_names_the_base() {
    let w = World::new(three(), true).await;
    block_commit(
        &w.env,
        &World::args(
            json!({"job-id": "job0", "device": "top", "top-node": "mid", "base-node": "base"}),
        ),
    )
    .await
    .expect("block-commit");
    w.wait_gone("job0").await;
    w.verify_on_disk_while_open("top");
    w.close(&[]).await;
    assert_eq!(
        w.backing_of("top").as_deref(),
        Some(w.path_str("base").as_str())
    );
    w.verify("top");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_defaults_file_names_and_backing_file() {
    // top by file name (relative to the overlay's directory), base = bottom of the chain,
    // header string given by backing-file.
    let w = World::new(three(), true).await;
    commit_with_writer(
        &w,
        json!({"job-id": "job0", "device": "top", "top": "mid.qcow2", "backing-file": "base.qcow2"}),
        9,
    )
    .await;
    w.verify("top");
    assert_eq!(w.backing_of("top").as_deref(), Some("base.qcow2"));
    assert_eq!(w.chain("top"), ["top", "base"]);
    assert_eq!(w.events(false), qsd_success("commit", 4 * MIB, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_two_intermediates_into_a_smaller_base() {
    // base is 2 MiB: it grows to the top's 4 MiB.
    let layers = vec![
        layer("base", 2 * MIB, &[(1, 0, 2 * MIB)]),
        layer("mid1", 4 * MIB, &[(2, MIB, 2 * MIB)]),
        layer("mid2", 4 * MIB, &[(3, 3 * MIB, MIB)]),
        layer("top", 4 * MIB, &[(4, 0, 256 * KIB)]),
    ];
    let w = World::new(layers, true).await;
    commit_with_writer(
        &w,
        json!({"job-id": "job0", "device": "top", "top-node": "mid2", "base-node": "base", "speed": 8 * MIB}),
        3,
    )
    .await;
    w.verify("top");
    assert_eq!(w.chain("top"), ["top", "base"]);
    let out = run("qemu-img", &["info", "--output=json", &w.path_str("base")]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["virtual-size"], 4 * MIB);
    assert_eq!(w.events(false), qsd_success("commit", 4 * MIB, 8 * MIB));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_leaves_the_chain_unchanged() {
    let w = World::new(three(), true).await;
    let (edge, link) = w.export("top").await;
    let writer = w.writer(link, 31);
    let args = json!({"job-id": "job0", "device": "top", "top-node": "mid", "base-node": "base", "speed": 1024});
    block_commit(&w.env, &World::args(args)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(w.env.jobs.job_status("job0"), Some(JobStatus::Running));
    w.env.jobs.block_job_cancel("job0", false).unwrap();
    w.wait_gone("job0").await;
    writer.stop().await;
    {
        let g = w.env.graph.lock().await;
        assert_eq!(g.chain_below("top").as_deref(), Some("mid"));
        assert_eq!(g.chain_below("mid").as_deref(), Some("base"));
        assert!(g.node("base").unwrap().read_only);
        assert!(g.edges().iter().all(|e| !e.frozen));
    }
    w.close(&[edge]).await;
    w.verify("top");
    assert_eq!(w.chain("top"), ["top", "mid", "base"]);
    assert_eq!(w.events(true), qsd_cancelled("commit", 4 * MIB, 1024));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_finalize() {
    let w = World::new(three(), true).await;
    let args = json!({"job-id": "job0", "device": "top", "top-node": "mid", "auto-finalize": false, "auto-dismiss": false});
    block_commit(&w.env, &World::args(args)).await.unwrap();
    w.env.jobs.wait_status("job0", JobStatus::Pending).await;
    w.env.jobs.job_finalize("job0").unwrap();
    w.env.jobs.wait_status("job0", JobStatus::Concluded).await;
    w.env.jobs.job_dismiss("job0").unwrap();
    w.wait_gone("job0").await;
    w.close(&[]).await;
    w.verify("top");
    assert_eq!(w.chain("top"), ["top", "base"]);
    assert_eq!(w.events(false), qsd_manual("commit", 4 * MIB));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_arguments_answer_with_qemus_texts() {
    let w = World::new(three(), true).await;
    w.add_lone_image().await;
    let mid = w.path_str("mid");
    // Recorded from qemu-storage-daemon 10.0.2; the last column: created/null emitted.
    let cases: Vec<(serde_json::Value, &str, &str, bool)> = vec![
        (
            json!({"job-id": "j", "device": "nope"}),
            "DeviceNotFound",
            "Device 'nope' not found",
            false,
        ),
        (
            json!({"job-id": "j", "device": "mid"}),
            "GenericError",
            "Need a root block node",
            false,
        ),
        (
            json!({"device": "top", "top-node": "mid"}),
            "GenericError",
            "Invalid job ID ''",
            false,
        ),
        (
            json!({"job-id": "j", "device": "top", "top-node": "mid", "top": "x"}),
            "GenericError",
            "'top-node' and 'top' are mutually exclusive",
            false,
        ),
        (
            json!({"job-id": "j", "device": "top", "base-node": "base", "base": "x"}),
            "GenericError",
            "'base-node' and 'base' are mutually exclusive",
            false,
        ),
        (
            json!({"job-id": "j", "device": "top", "top-node": "nope"}),
            "GenericError",
            "Cannot find device='' nor node-name='nope'",
            false,
        ),
        (
            json!({"job-id": "j", "device": "top", "top-node": "lone"}),
            "GenericError",
            "'lone' is not in this backing file chain",
            false,
        ),
        (
            json!({"job-id": "j", "device": "top", "top": "/x.qcow2"}),
            "GenericError",
            "Top image file /x.qcow2 not found",
            false,
        ),
        (
            json!({"job-id": "j", "device": "top", "top": mid, "base": "/x.qcow2"}),
            "GenericError",
            "Can't find '/x.qcow2' in the backing chain",
            false,
        ),
        (
            json!({"job-id": "j", "device": "top", "top-node": "mid", "base-node": "nope"}),
            "GenericError",
            "Cannot find device='' nor node-name='nope'",
            false,
        ),
        (
            json!({"job-id": "j", "device": "top", "top-node": "mid", "base-node": "lone"}),
            "GenericError",
            "'lone' is not in this backing file chain",
            false,
        ),
        (
            json!({"job-id": "j", "device": "top", "top-node": "mid", "base-node": "mid"}),
            "GenericError",
            "cannot commit an image into itself",
            false,
        ),
        (
            json!({"job-id": "j", "device": "top", "top-node": "base", "base-node": "mid"}),
            "GenericError",
            "'mid' is not in this backing file chain",
            false,
        ),
        (
            json!({"job-id": "j", "device": "top", "top-node": "base"}),
            "GenericError",
            "cannot commit an image into itself",
            false,
        ),
        (
            json!({"job-id": "j", "device": "lone"}),
            "GenericError",
            "cannot commit an image into itself",
            false,
        ),
        (
            json!({"job-id": "j", "device": "top", "backing-file": "foo"}),
            "GenericError",
            "'backing-file' specified, but 'top' is the active layer",
            false,
        ),
        (
            json!({"job-id": "j", "device": "top", "top-node": "top", "backing-file": "foo"}),
            "GenericError",
            "'backing-file' specified, but 'top' is the active layer",
            false,
        ),
        (
            json!({"job-id": "j", "device": "top", "top-node": "mid", "filter-node-name": "top"}),
            "GenericError",
            "Duplicate nodes with node-name='top'",
            true,
        ),
        (
            json!({"job-id": "j", "device": "top", "top-node": "mid", "speed": -1}),
            "GenericError",
            "Parameter 'speed' expects a non-negative value",
            true,
        ),
    ];
    let before = w.env.graph.lock().await.edges().len();
    for (args, class, want, events) in cases {
        let err = block_commit(&w.env, &World::args(args.clone()))
            .await
            .unwrap_err();
        assert_eq!((err.class, err.desc.as_str()), (class, want), "{args}");
        assert_eq!(w.sink.take().len(), if events { 2 } else { 0 }, "{args}");
        let g = w.env.graph.lock().await;
        assert_eq!(g.edges().len(), before, "{args}: graph restored");
        assert!(g.node("base").unwrap().read_only, "{args}: base read-only");
    }
    w.close(&[]).await;
    w.verify("top");
    assert_eq!(w.chain("top"), ["top", "mid", "base"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_as_active_layer_hands_over_to_active_commit() {
    // qsd: block-commit with top = the active layer runs the mirror machinery: READY.
    let w = World::new(three(), true).await;
    block_commit(
        &w.env,
        &World::args(json!({"job-id": "job0", "device": "top"})),
    )
    .await
    .unwrap();
    tokio::time::timeout(
        Duration::from_secs(30),
        w.env.jobs.wait_status("job0", JobStatus::Ready),
    )
    .await
    .expect("active commit becomes ready");
    let ev = w.events(true);
    assert_eq!(
        ev[..3],
        [
            "JOB_STATUS_CHANGE created",
            "JOB_STATUS_CHANGE running",
            "JOB_STATUS_CHANGE ready"
        ]
    );
    assert!(ev[3].starts_with("BLOCK_JOB_READY "), "{ev:?}");
    w.env.jobs.block_job_cancel("job0", true).unwrap();
    w.wait_gone("job0").await;
    w.close(&[]).await;
    w.verify("top");
    assert_eq!(w.chain("top"), ["top", "mid", "base"]);
}
