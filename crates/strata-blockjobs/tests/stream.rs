//! `block-stream` end to end: chains made by qemu-img/qemu-io, a guest writing to the top
//! while the job runs, results checked with QEMU's tools and events compared with what
//! qemu-storage-daemon 10.0.2 emits for the same scenario.

mod chainjobs;

use std::time::{Duration, Instant};

use chainjobs::*;
use serde_json::json;
use strata_blockjobs::stream::block_stream;
use strata_job::JobStatus;

/// base: 1 MiB of 1s at 0; mid: 1 MiB of 2s at 1 MiB (and over base's second half);
/// top: 512 KiB of 3s at 2 MiB. 4 MiB each.
fn three() -> Vec<Layer> {
    vec![
        layer("base", 4 * MIB, &[(1, 0, MIB), (5, 3 * MIB, 256 * KIB)]),
        layer("mid", 4 * MIB, &[(2, MIB, MIB), (6, 512 * KIB, 128 * KIB)]),
        layer("top", 4 * MIB, &[(3, 2 * MIB, 512 * KIB)]),
    ]
}

/// Stream `args` with a concurrent writer on the top; returns the world after closing it.
async fn stream_with_writer(args: serde_json::Value, seed: u64) -> World {
    let w = World::new(three(), true).await;
    let (edge, link) = w.export("top").await;
    let writer = w.writer(link, seed);
    tokio::time::sleep(Duration::from_millis(30)).await;
    block_stream(&w.env, &World::args(args))
        .await
        .expect("block-stream");
    w.wait_gone("job0").await;
    let writes = writer.stop().await;
    assert!(writes > 0);
    w.close(&[edge]).await;
    w
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_to_base_node_with_guest_writes() {
    let w = stream_with_writer(
        json!({"job-id": "job0", "device": "top", "base-node": "base", "speed": 4 * MIB}),
        7,
    )
    .await;
    w.verify("top");
    assert_eq!(w.chain("top"), ["top", "base"]);
    assert_eq!(
        w.backing_of("top").as_deref(),
        Some(w.path_str("base").as_str())
    );
    assert_eq!(w.events(false), qsd_success("stream", 4 * MIB, 4 * MIB));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_whole_chain_with_guest_writes() {
    let w = stream_with_writer(
        json!({"job-id": "job0", "device": "top", "speed": 4 * MIB}),
        11,
    )
    .await;
    w.verify("top");
    assert_eq!(w.chain("top"), ["top"]);
    assert_eq!(w.backing_of("top"), None);
    assert_eq!(w.events(false), qsd_success("stream", 4 * MIB, 4 * MIB));
}

/// The header that drops the backing file is written only after the L2 entries of the
/// streamed data are on disk: a kill right after the job leaves the full guest view.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_stream_is_on_disk_before_the_backing_file_goes() {
    let w = World::new(three(), true).await;
    block_stream(
        &w.env,
        &World::args(json!({"job-id": "job0", "device": "top"})),
    )
    .await
    .expect("block-stream");
    w.wait_gone("job0").await;
    w.verify_on_disk_while_open("top");
    w.close(&[]).await;
    assert_eq!(w.backing_of("top"), None);
    w.verify("top");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_with_bottom_and_base_file_name_and_backing_file() {
    // `bottom: mid` copies only mid's data; base stays below.
    let w = stream_with_writer(
        json!({"job-id": "job0", "device": "top", "bottom": "mid", "speed": 8 * MIB}),
        13,
    )
    .await;
    w.verify("top");
    assert_eq!(w.chain("top"), ["top", "base"]);
    assert_eq!(w.events(false), qsd_success("stream", 4 * MIB, 8 * MIB));

    // `base` by file name, and the header gets the given backing-file string.
    let w = World::new(three(), true).await;
    let args = json!({"job-id": "job0", "device": "top", "base": w.path_str("base"), "backing-file": "base.qcow2"});
    block_stream(&w.env, &World::args(args)).await.unwrap();
    w.wait_gone("job0").await;
    w.close(&[]).await;
    w.verify("top");
    assert_eq!(w.backing_of("top").as_deref(), Some("base.qcow2"));
    assert_eq!(w.chain("top"), ["top", "base"]);
    assert_eq!(w.events(false), qsd_success("stream", 4 * MIB, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_an_intermediate_node() {
    // base <- mid1 <- mid2 <- top; stream into mid2 from mid1 (base-node base).
    let layers = vec![
        layer("base", 4 * MIB, &[(1, 0, 2 * MIB)]),
        layer("mid1", 4 * MIB, &[(2, MIB, MIB)]),
        layer("mid2", 4 * MIB, &[(3, 3 * MIB, 512 * KIB)]),
        layer("top", 4 * MIB, &[(4, 0, 256 * KIB)]),
    ];
    let w = World::new(layers, true).await;
    let (edge, link) = w.export("top").await;
    let writer = w.writer(link, 17);
    let args = json!({"job-id": "job0", "device": "mid2", "base-node": "base", "speed": 8 * MIB});
    block_stream(&w.env, &World::args(args)).await.unwrap();
    w.wait_gone("job0").await;
    writer.stop().await;
    {
        let g = w.env.graph.lock().await;
        assert!(g.node("mid2").unwrap().read_only, "read-only restored");
        assert_eq!(g.chain_below("mid2").as_deref(), Some("base"));
    }
    w.close(&[edge]).await;
    w.verify("top");
    assert_eq!(w.chain("top"), ["top", "mid2", "base"]);
    assert_eq!(w.events(false), qsd_success("stream", 4 * MIB, 8 * MIB));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_to_stream_reports_zero_progress() {
    // qsd: stream top with base-node mid (mid is top's backing) → len 0, offset 0.
    let w = World::new(three(), true).await;
    block_stream(
        &w.env,
        &World::args(json!({"job-id": "job0", "device": "top", "base-node": "mid"})),
    )
    .await
    .unwrap();
    w.wait_gone("job0").await;
    w.close(&[]).await;
    w.verify("top");
    assert_eq!(w.chain("top"), ["top", "mid", "base"]);
    assert_eq!(w.events(false), qsd_success("stream", 0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn speed_limits_the_copy() {
    // Everything lives in base: 4 MiB to copy at 2 MiB/s takes about 2 s (QEMU: 16 MiB/s on
    // 64 MiB takes ≈ 3.9 s, the same ratio).
    let layers = vec![
        layer("base", 4 * MIB, &[(9, 0, 4 * MIB)]),
        layer("top", 4 * MIB, &[]),
    ];
    let w = World::new(layers, true).await;
    let t = Instant::now();
    block_stream(
        &w.env,
        &World::args(json!({"job-id": "job0", "device": "top", "speed": 2 * MIB})),
    )
    .await
    .unwrap();
    w.wait_gone("job0").await;
    let took = t.elapsed();
    assert!(
        took > Duration::from_millis(1300) && took < Duration::from_secs(5),
        "{took:?}"
    );
    w.close(&[]).await;
    w.verify("top");
    assert_eq!(w.chain("top"), ["top"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_leaves_the_chain_unchanged() {
    let w = World::new(three(), true).await;
    let (edge, link) = w.export("top").await;
    let writer = w.writer(link, 23);
    block_stream(
        &w.env,
        &World::args(json!({"job-id": "job0", "device": "top", "speed": MIB})),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(w.env.jobs.job_status("job0"), Some(JobStatus::Running));
    w.env.jobs.block_job_cancel("job0", false).unwrap();
    w.wait_gone("job0").await;
    writer.stop().await;
    {
        let g = w.env.graph.lock().await;
        assert_eq!(g.chain_below("top").as_deref(), Some("mid"));
        assert!(
            g.node_names()
                .iter()
                .all(|n| g.node(n).unwrap().kind != strata_graph::NodeKind::Filter),
            "filter removed: {:?}",
            g.node_names()
        );
        assert!(g.edges().iter().all(|e| !e.frozen));
    }
    w.close(&[edge]).await;
    w.verify("top");
    assert_eq!(w.chain("top"), ["top", "mid", "base"]);
    assert_eq!(w.events(true), qsd_cancelled("stream", 4 * MIB, MIB));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_resume_and_manual_finalize() {
    let w = World::new(three(), true).await;
    let args =
        json!({"job-id": "job0", "device": "top", "auto-finalize": false, "auto-dismiss": false});
    block_stream(&w.env, &World::args(args)).await.unwrap();
    w.env.jobs.wait_status("job0", JobStatus::Pending).await;
    w.env.jobs.job_finalize("job0").unwrap();
    w.env.jobs.wait_status("job0", JobStatus::Concluded).await;
    w.env.jobs.job_dismiss("job0").unwrap();
    w.wait_gone("job0").await;
    w.close(&[]).await;
    w.verify("top");
    assert_eq!(w.events(false), qsd_manual("stream", 4 * MIB));

    // Pause while rate limited, then lift the limit and resume (qsd: paused, running).
    let w = World::new(three(), true).await;
    block_stream(
        &w.env,
        &World::args(json!({"job-id": "job0", "device": "top", "speed": 1024})),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    w.env.jobs.block_job_pause("job0").unwrap();
    w.env.jobs.wait_status("job0", JobStatus::Paused).await;
    w.env.jobs.block_job_set_speed("job0", 0).unwrap();
    w.env.jobs.block_job_resume("job0").unwrap();
    w.wait_gone("job0").await;
    w.close(&[]).await;
    w.verify("top");
    let mut want = qsd_success("stream", 4 * MIB, 0);
    want.insert(2, "JOB_STATUS_CHANGE paused".into());
    want.insert(3, "JOB_STATUS_CHANGE running".into());
    assert_eq!(w.events(false), want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_arguments_answer_with_qemus_texts() {
    let w = World::new(three(), true).await;
    w.add_lone_image().await;
    // Recorded from qemu-storage-daemon 10.0.2 (all GenericError); the last column: whether
    // qsd emitted created/null.
    let cases: Vec<(serde_json::Value, &str, bool)> = vec![
        (
            json!({"job-id": "j", "device": "nope"}),
            "Cannot find device='nope' nor node-name='nope'",
            false,
        ),
        (json!({"device": "top"}), "Invalid job ID ''", false),
        (
            json!({"job-id": "1x", "device": "top"}),
            "Invalid job ID '1x'",
            false,
        ),
        (
            json!({"job-id": "j", "device": "top", "base": "x", "base-node": "base"}),
            "'base' and 'base-node' cannot be specified at the same time",
            false,
        ),
        (
            json!({"job-id": "j", "device": "top", "base": "x", "bottom": "mid"}),
            "'base' and 'bottom' cannot be specified at the same time",
            false,
        ),
        (
            json!({"job-id": "j", "device": "top", "bottom": "mid", "base-node": "base"}),
            "'bottom' and 'base-node' cannot be specified at the same time",
            false,
        ),
        (
            json!({"job-id": "j", "device": "top", "base": "/nonexist.qcow2"}),
            "Can't find '/nonexist.qcow2' in the backing chain",
            false,
        ),
        (
            json!({"job-id": "j", "device": "top", "base-node": "nope"}),
            "Cannot find device='' nor node-name='nope'",
            false,
        ),
        (
            json!({"job-id": "j", "device": "top", "base-node": "lone"}),
            "Node 'lone' is not a backing image of 'top'",
            false,
        ),
        (
            json!({"job-id": "j", "device": "top", "base-node": "top"}),
            "Node 'top' is not a backing image of 'top'",
            false,
        ),
        (
            json!({"job-id": "j", "device": "mid", "base-node": "top"}),
            "Node 'top' is not a backing image of 'mid'",
            false,
        ),
        (
            json!({"job-id": "j", "device": "top", "bottom": "nope"}),
            "Cannot find device='' nor node-name='nope'",
            false,
        ),
        (
            json!({"job-id": "j", "device": "top", "bottom": "lone"}),
            "Node 'lone' is not in a chain starting from 'top'",
            false,
        ),
        (
            json!({"job-id": "j", "device": "mid", "bottom": "top"}),
            "Node 'top' is not in a chain starting from 'mid'",
            false,
        ),
        (
            json!({"job-id": "j", "device": "top", "backing-file": "foo"}),
            "backing file specified, but streaming the entire chain",
            false,
        ),
        (
            json!({"job-id": "j", "device": "top", "base-node": "base", "filter-node-name": "top"}),
            "Could not create node: Duplicate nodes with node-name='top'",
            false,
        ),
        (
            json!({"job-id": "j", "device": "top", "speed": -1}),
            "Parameter 'speed' expects a non-negative value",
            true,
        ),
    ];
    let before = w.env.graph.lock().await.edges().len();
    for (args, want, events) in cases {
        let err = block_stream(&w.env, &World::args(args.clone()))
            .await
            .unwrap_err();
        assert_eq!(
            (err.class, err.desc.as_str()),
            ("GenericError", want),
            "{args}"
        );
        let got = w.sink.take().len();
        assert_eq!(got, if events { 2 } else { 0 }, "{args}");
        let g = w.env.graph.lock().await;
        assert_eq!(g.edges().len(), before, "{args}: graph restored");
        assert!(!g.node("top").unwrap().read_only && g.node("mid").unwrap().read_only);
    }
    w.close(&[]).await;
    w.verify("top");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writable_export_on_the_base_blocks_stream() {
    // iotest qsd-jobs: writable NBD export on fmt_base, then block-stream of fmt.
    let layers = vec![
        layer("fmt_base", 4 * MIB, &[(1, 0, MIB)]),
        layer("fmt", 4 * MIB, &[]),
    ];
    let w = World::new(layers, false).await;
    let (edge, _link) = w.export("fmt_base").await;
    let err = block_stream(
        &w.env,
        &World::args(json!({"job-id": "job0", "device": "fmt"})),
    )
    .await
    .unwrap_err();
    assert_eq!(
        err.desc,
        "Permission conflict on node 'fmt_base': permissions 'write' are both required by an unnamed block \
         device (uses node 'fmt_base' as 'root' child) and unshared by stream job 'job0' (uses node \
         'fmt_base' as 'intermediate node' child)."
    );
    assert_eq!(w.events(false), qsd_early_fail());
    {
        let g = w.env.graph.lock().await;
        assert_eq!(g.node_names().len(), 4, "filter gone: {:?}", g.node_names());
    }
    w.close(&[edge]).await;
    assert_eq!(w.chain("fmt"), ["fmt", "fmt_base"]);
}
