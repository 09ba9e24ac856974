//! The server against our own client and a raw protocol client: data commands in every
//! header style, block status contexts, export management, limits and hostile input.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use strata_core::mem::MemNode;
use strata_core::{BlockNode, IoBuf, NodeRef, WriteFlags, ZeroFlags};
use strata_nbd::client::HeaderMode;
use strata_nbd::proto::*;
use strata_nbd::{ClientOptions, ListenAddr, NbdAddr, NbdClient, NbdServer, ServerOptions};
use tokio::io::AsyncWriteExt;

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

async fn exercise(client: &NbdClient, mem: &MemNode) {
    let data = pattern(256 * 1024, 7);
    client
        .write(4096, IoBuf::from_slice(&data), WriteFlags { fua: true })
        .await
        .unwrap();
    let got = client.read(4096, IoBuf::zeroed(data.len())).await.unwrap();
    assert_eq!(&got[..], &data[..]);
    assert_eq!(&mem.snapshot()[4096..4096 + data.len()], &data[..]);
    client
        .write_zeroes(8192, 4096, ZeroFlags::default())
        .await
        .unwrap();
    let got = client.read(8192, IoBuf::zeroed(4096)).await.unwrap();
    assert!(got.is_zero());
    client.discard(0, 4096).await.unwrap();
    client.flush().await.unwrap();
    // Out of range is refused before it reaches the wire.
    assert!(client.read(client.size(), IoBuf::zeroed(1)).await.is_err());
    // Many requests in flight on one connection.
    let futs = (0..64u64).map(|i| async move {
        let buf = IoBuf::from_slice(&vec![i as u8; 4096]);
        client
            .write(i * 4096, buf, WriteFlags::default())
            .await
            .unwrap();
        let b = client.read(i * 4096, IoBuf::zeroed(4096)).await.unwrap();
        assert!(b.iter().all(|&x| x == i as u8));
    });
    futures::future::join_all(futs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_client_all_header_styles() {
    let dir = tempfile::tempdir().unwrap();
    let (server, sock) = unix_server(dir.path()).await;
    let mem = Arc::new(MemNode::with_data(vec![0; 4 << 20]));
    server
        .add_export(export("exp", mem.clone() as NodeRef, true))
        .unwrap();
    for (ext, structured, want) in [
        (true, true, HeaderMode::Extended),
        (false, true, HeaderMode::Structured),
        (false, false, HeaderMode::Simple),
    ] {
        let opts = ClientOptions {
            read_only: false,
            extended_headers: ext,
            structured_replies: structured,
            ..Default::default()
        };
        let c = NbdClient::connect_with(&NbdAddr::Unix(sock.clone()), "exp", &opts)
            .await
            .unwrap();
        assert_eq!(c.header_mode(), want);
        assert_eq!(c.size(), 4 << 20);
        assert_eq!(c.block_sizes(), (1, 4096, 32 << 20));
        assert_eq!(c.has_base_allocation(), want != HeaderMode::Simple);
        assert_eq!(c.driver(), "nbd");
        exercise(&c, &mem).await;
        // A read larger than the server's maximum is split by the client.
        let big = c.read(0, IoBuf::zeroed(4 << 20)).await.unwrap();
        assert_eq!(&big[..], &mem.snapshot()[..]);
        c.close().await.unwrap();
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sparse_reads_and_block_status_through_backing() {
    let dir = tempfile::tempdir().unwrap();
    let (server, sock) = unix_server(dir.path()).await;
    // base: data in clusters 0 and 2. top: data in cluster 1, zero cluster 3.
    let base = LayerNode::new(8 * CLUSTER, None);
    base.fill(0, 0x11);
    base.fill(2, 0x22);
    let top = LayerNode::new(8 * CLUSTER, Some(base.clone() as NodeRef));
    top.fill(1, 0x33);
    top.set_zero(3);
    let mut cfg = export("exp", top.clone() as NodeRef, false);
    cfg.allocation_depth = true;
    server.add_export(cfg).unwrap();

    for ext in [true, false] {
        let opts = ClientOptions {
            read_only: true,
            extended_headers: ext,
            structured_replies: true,
            ..Default::default()
        };
        let c = NbdClient::connect_with(&NbdAddr::Unix(sock.clone()), "exp", &opts)
            .await
            .unwrap();
        assert!(c.read_only());
        let got = c
            .read(0, IoBuf::zeroed((8 * CLUSTER) as usize))
            .await
            .unwrap();
        assert_eq!(&got[..], &top.guest_bytes().await[..]);
        // The guest view: clusters 0-2 data (from base, top, base), 3 zero, 4.. unallocated.
        let e = c.block_status(0, 8 * CLUSTER).await.unwrap();
        assert_eq!(e.len, 3 * CLUSTER);
        assert!(e.status.data && !e.status.zero);
        let e = c.block_status(3 * CLUSTER, 5 * CLUSTER).await.unwrap();
        assert_eq!(e.len, 5 * CLUSTER);
        assert!(!e.status.data && e.status.zero);
        // Writes to a read-only export are refused locally.
        assert!(
            c.write(0, IoBuf::zeroed(512), WriteFlags::default())
                .await
                .is_err()
        );
    }

    // allocation depth and base:allocation over the raw protocol.
    let mut raw = Raw::connect(&sock).await;
    assert_eq!(raw.option(OPT_STRUCTURED_REPLY, &[]).await[0].0, REP_ACK);
    raw.structured = true;
    let q = MetaContextRequest {
        export: "exp".into(),
        queries: vec!["qemu:".into()],
    };
    let listed = raw
        .option(OPT_LIST_META_CONTEXT, &encode_meta_context_request(&q))
        .await;
    let names: Vec<String> = listed
        .iter()
        .filter(|(r, _)| *r == REP_META_CONTEXT)
        .map(|(_, d)| decode_rep_meta_context(d).unwrap().1)
        .collect();
    assert_eq!(names, vec!["qemu:allocation-depth".to_string()]);
    let q = MetaContextRequest {
        export: "exp".into(),
        queries: vec!["base:allocation".into(), "qemu:allocation-depth".into()],
    };
    let set = raw
        .option(OPT_SET_META_CONTEXT, &encode_meta_context_request(&q))
        .await;
    let ids: Vec<(u32, String)> = set
        .iter()
        .filter(|(r, _)| *r == REP_META_CONTEXT)
        .map(|(_, d)| decode_rep_meta_context(d).unwrap())
        .collect();
    assert_eq!(ids.len(), 2);
    let (size, flags) = raw.go("exp").await;
    assert_eq!(size, 8 * CLUSTER);
    assert!(flags & TFLAG_READ_ONLY != 0 && flags & TFLAG_SEND_DF != 0);
    raw.send(CMD_BLOCK_STATUS, 0, 1, 0, 8 * CLUSTER).await;
    let mut got = Vec::new();
    loop {
        let (h, p) = raw.reply().await.unwrap();
        let ReplyHeader::Chunk(c) = h else {
            panic!("simple reply")
        };
        let (id, ds) = decode_block_status(c.kind, &p).unwrap();
        got.push((
            id,
            ds.iter()
                .map(|d| (d.len / CLUSTER, d.flags))
                .collect::<Vec<_>>(),
        ));
        if c.flags & REPLY_FLAG_DONE != 0 {
            break;
        }
    }
    let by_name = |n: &str| {
        let id = ids.iter().find(|(_, name)| name == n).unwrap().0;
        got.iter().find(|(i, _)| *i == id).unwrap().1.clone()
    };
    assert_eq!(
        by_name("base:allocation"),
        vec![(3, 0), (5, u64::from(STATE_HOLE | STATE_ZERO))]
    );
    assert_eq!(
        by_name("qemu:allocation-depth"),
        vec![(1, 2), (1, 1), (1, 2), (1, 1), (4, 0)]
    );
    // REQ_ONE: one extent per context.
    raw.send(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 2, 0, 8 * CLUSTER)
        .await;
    loop {
        let (h, p) = raw.reply().await.unwrap();
        let ReplyHeader::Chunk(c) = h else { panic!() };
        let (_, ds) = decode_block_status(c.kind, &p).unwrap();
        assert_eq!(ds.len(), 1);
        if c.flags & REPLY_FLAG_DONE != 0 {
            break;
        }
    }
    // A sparse structured read: hole chunks for zero runs.
    raw.send(CMD_READ, 0, 3, 2 * CLUSTER, 4 * CLUSTER).await;
    let mut kinds = Vec::new();
    loop {
        let (h, _) = raw.reply().await.unwrap();
        let ReplyHeader::Chunk(c) = h else { panic!() };
        kinds.push(c.kind);
        if c.flags & REPLY_FLAG_DONE != 0 {
            break;
        }
    }
    assert_eq!(kinds, vec![REPLY_TYPE_OFFSET_DATA, REPLY_TYPE_OFFSET_HOLE]);
    // A read of at most one 64 KiB cluster: one data chunk, even over a hole.
    raw.send(CMD_READ, 0, 30, 4 * CLUSTER, CLUSTER).await;
    let (h, p) = raw.reply().await.unwrap();
    let ReplyHeader::Chunk(c) = h else { panic!() };
    assert_eq!(c.kind, REPLY_TYPE_OFFSET_DATA);
    assert!(c.flags & REPLY_FLAG_DONE != 0);
    assert!(p[8..].iter().all(|&b| b == 0));
    // DF: one data chunk.
    raw.send(CMD_READ, CMD_FLAG_DF, 4, 2 * CLUSTER, 4 * CLUSTER)
        .await;
    let (h, p) = raw.reply().await.unwrap();
    let ReplyHeader::Chunk(c) = h else { panic!() };
    assert_eq!(c.kind, REPLY_TYPE_OFFSET_DATA);
    assert_eq!(c.flags, REPLY_FLAG_DONE);
    assert_eq!(p.len() as u64, 8 + 4 * CLUSTER);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_map_to_nbd_errnos() {
    let dir = tempfile::tempdir().unwrap();
    let (server, sock) = unix_server(dir.path()).await;
    let mem: NodeRef = Arc::new(MemNode::with_data(vec![0; 1 << 20]));
    server.add_export(export("rw", mem.clone(), true)).unwrap();
    server.add_export(export("ro", mem.clone(), false)).unwrap();
    // Backed by a node that refuses to grow past 4 KiB: ENOSPC passes through.
    let full_small: NodeRef = Arc::new(MemNode::with_data(vec![0; 8192]).with_limit(4096));
    server.add_export(export("full", full_small, true)).unwrap();

    let simple_err = |h: ReplyHeader| match h {
        ReplyHeader::Simple { error, .. } => error,
        _ => panic!("expected a simple reply"),
    };
    let mut raw = Raw::connect(&sock).await;
    raw.go("rw").await;
    raw.send(CMD_READ, 0, 1, 1 << 20, 1).await;
    assert_eq!(simple_err(raw.reply().await.unwrap().0), errno::EINVAL);
    raw.send(CMD_WRITE_ZEROES, 0, 2, (1 << 20) - 10, 20).await;
    assert_eq!(simple_err(raw.reply().await.unwrap().0), errno::ENOSPC);
    raw.send(CMD_READ, CMD_FLAG_DF, 3, 0, 1).await; // DF needs structured replies
    assert_eq!(simple_err(raw.reply().await.unwrap().0), errno::EINVAL);
    raw.send(CMD_BLOCK_STATUS, 0, 4, 0, 1).await;
    assert_eq!(simple_err(raw.reply().await.unwrap().0), errno::EINVAL);
    raw.send(99, 0, 5, 0, 1).await;
    assert_eq!(simple_err(raw.reply().await.unwrap().0), errno::EINVAL);
    raw.send(CMD_READ, 0, 6, 0, (32 << 20) + 1).await;
    assert_eq!(simple_err(raw.reply().await.unwrap().0), errno::EINVAL);
    raw.send(CMD_FLUSH, 0, 7, 0, 0).await;
    assert_eq!(simple_err(raw.reply().await.unwrap().0), 0);
    raw.send(CMD_CACHE, 0, 8, 0, 1 << 20).await;
    assert_eq!(simple_err(raw.reply().await.unwrap().0), 0);
    raw.send(CMD_DISC, 0, 9, 0, 0).await;
    assert!(raw.closed().await);

    let mut raw = Raw::connect(&sock).await;
    let (_, flags) = raw.go("ro").await;
    assert!(flags & TFLAG_READ_ONLY != 0 && flags & TFLAG_SEND_TRIM == 0);
    raw.send(CMD_TRIM, 0, 1, 0, 4096).await;
    assert_eq!(simple_err(raw.reply().await.unwrap().0), errno::EPERM);

    // Structured: errors come as error chunks with a message.
    let mut raw = Raw::connect(&sock).await;
    raw.option(OPT_STRUCTURED_REPLY, &[]).await;
    raw.go("full").await;
    raw.send(CMD_WRITE, 0, 1, 4096, 4096).await;
    raw.s.write_all(&[1u8; 4096]).await.unwrap();
    let (h, p) = raw.reply().await.unwrap();
    let ReplyHeader::Chunk(c) = h else { panic!() };
    assert_eq!(c.kind, REPLY_TYPE_ERROR);
    let (e, msg, _) = decode_error_chunk(c.kind, &p).unwrap();
    assert_eq!(e, errno::ENOSPC, "{msg}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fast_zero_and_no_hole() {
    let dir = tempfile::tempdir().unwrap();
    let (server, sock) = unix_server(dir.path()).await;
    let node = LayerNode::new(4 * CLUSTER, None);
    node.fill(0, 1);
    node.fill(1, 1);
    node.fill(2, 1);
    server
        .add_export(export("exp", node.clone() as NodeRef, true))
        .unwrap();
    let c = NbdClient::connect(&NbdAddr::Unix(sock.clone()), "exp")
        .await
        .unwrap();
    let e = c
        .write_zeroes(
            100,
            100,
            ZeroFlags {
                may_unmap: true,
                no_fallback: true,
            },
        )
        .await
        .unwrap_err();
    assert_eq!(e.kind().errno(), libc::ENOTSUP, "{e}");
    c.write_zeroes(0, CLUSTER, ZeroFlags::default())
        .await
        .unwrap();
    assert_eq!(node.state(0), State::Zero); // NO_HOLE: no unmap
    c.write_zeroes(
        CLUSTER,
        CLUSTER,
        ZeroFlags {
            may_unmap: true,
            no_fallback: true,
        },
    )
    .await
    .unwrap();
    assert_eq!(node.state(1), State::Unallocated);
    c.discard(2 * CLUSTER, CLUSTER).await.unwrap();
    assert_eq!(node.state(2), State::Unallocated);
    drop(c);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_options() {
    let dir = tempfile::tempdir().unwrap();
    let (server, sock) = unix_server(dir.path()).await;
    let mem: NodeRef = Arc::new(MemNode::with_data(vec![0; 65536]));
    let mut cfg = export("a", mem.clone(), true);
    cfg.description = Some("first export".into());
    let bm = Arc::new(TestBitmap {
        granularity: 4096,
        bits: parking_lot::Mutex::new(vec![false, true, true, false]),
    });
    cfg.bitmaps = vec![("b0".into(), bm)];
    server.add_export(cfg).unwrap();
    server.add_export(export("b", mem.clone(), false)).unwrap();
    let err = server.add_export(export("b", mem, false)).unwrap_err();
    assert_eq!(err.to_string(), "NBD server already has export named 'b'");
    assert_eq!(server.exports(), vec!["a".to_string(), "b".to_string()]);

    let mut raw = Raw::connect(&sock).await;
    let list = raw.option(OPT_LIST, &[]).await;
    let servers: Vec<(String, String)> = list
        .iter()
        .filter(|(r, _)| *r == REP_SERVER)
        .map(|(_, d)| decode_rep_server(d).unwrap())
        .collect();
    assert_eq!(
        servers,
        vec![
            ("a".to_string(), "first export".to_string()),
            ("b".to_string(), String::new())
        ]
    );
    assert_eq!(raw.option(OPT_STARTTLS, &[]).await[0].0, REP_ERR_POLICY);
    assert_eq!(raw.option(0x1234, &[1, 2, 3]).await[0].0, REP_ERR_UNSUP);
    assert_eq!(raw.option(OPT_LIST, &[1]).await[0].0, REP_ERR_INVALID);
    // Meta contexts need structured replies first.
    let q = encode_meta_context_request(&MetaContextRequest {
        export: "a".into(),
        queries: vec![],
    });
    assert_eq!(
        raw.option(OPT_LIST_META_CONTEXT, &q).await[0].0,
        REP_ERR_INVALID
    );
    let info = InfoRequest {
        name: "nope".into(),
        items: vec![],
    };
    assert_eq!(
        raw.option(OPT_INFO, &encode_info_request(&info)).await[0].0,
        REP_ERR_UNKNOWN
    );
    assert_eq!(raw.option(OPT_EXTENDED_HEADERS, &[]).await[0].0, REP_ACK);
    raw.extended = true;
    assert_eq!(
        raw.option(OPT_STRUCTURED_REPLY, &[]).await[0].0,
        REP_ERR_EXT_HEADER_REQD
    );
    let all = raw.option(OPT_LIST_META_CONTEXT, &q).await;
    let names: Vec<String> = all
        .iter()
        .filter(|(r, _)| *r == REP_META_CONTEXT)
        .map(|(_, d)| decode_rep_meta_context(d).unwrap().1)
        .collect();
    assert_eq!(names, vec!["base:allocation", "qemu:dirty-bitmap:b0"]);
    let q = encode_meta_context_request(&MetaContextRequest {
        export: "a".into(),
        queries: vec!["qemu:dirty-bitmap:b0".into()],
    });
    raw.option(OPT_SET_META_CONTEXT, &q).await;
    let info = InfoRequest {
        name: "a".into(),
        items: vec![INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE],
    };
    let replies = raw.option(OPT_INFO, &encode_info_request(&info)).await;
    let infos: Vec<Info> = replies
        .iter()
        .filter(|(r, _)| *r == REP_INFO)
        .map(|(_, d)| decode_info(d).unwrap())
        .collect();
    assert!(infos.contains(&Info::Name("a".into())));
    assert!(infos.contains(&Info::Description("first export".into())));
    assert!(infos.contains(&Info::BlockSize {
        min: 1,
        preferred: 4096,
        max: 32 << 20
    }));
    let (size, flags) = raw.go("a").await;
    assert_eq!(size, 65536);
    for f in [
        TFLAG_HAS_FLAGS,
        TFLAG_SEND_FLUSH,
        TFLAG_SEND_FUA,
        TFLAG_SEND_TRIM,
        TFLAG_SEND_WRITE_ZEROES,
        TFLAG_SEND_DF,
        TFLAG_CAN_MULTI_CONN,
        TFLAG_SEND_CACHE,
        TFLAG_SEND_FAST_ZERO,
    ] {
        assert!(flags & f != 0, "flag {f:#x} missing from {flags:#x}");
    }
    assert_eq!(server.export_clients("a"), 1);
    raw.send(CMD_BLOCK_STATUS, 0, 1, 0, 65536).await;
    let (h, p) = raw.reply().await.unwrap();
    let ReplyHeader::Chunk(c) = h else { panic!() };
    assert_eq!(c.kind, REPLY_TYPE_BLOCK_STATUS_EXT);
    assert_eq!(c.offset, 0);
    let (_, ds) = decode_block_status(c.kind, &p).unwrap();
    let runs: Vec<(u64, u64)> = ds.iter().map(|d| (d.len, d.flags)).collect();
    assert_eq!(runs, vec![(4096, 0), (8192, 1), (65536 - 12288, 0)]);
    // Extended write with a 64-bit length field.
    raw.send(CMD_WRITE, 0, 2, 0, 512).await;
    raw.s.write_all(&[9u8; 512]).await.unwrap();
    let (h, _) = raw.reply().await.unwrap();
    let ReplyHeader::Chunk(c) = h else { panic!() };
    assert_eq!((c.kind, c.flags), (REPLY_TYPE_NONE, REPLY_FLAG_DONE));

    // Export removal: safe refuses while a client is connected, hard disconnects it.
    let e = server.remove_export("a", false).unwrap_err();
    assert_eq!(e.to_string(), "export 'a' still in use");
    server.remove_export("a", true).unwrap();
    assert!(raw.closed().await);
    for _ in 0..50 {
        if server.export_clients("a") == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(server.exports(), vec!["b".to_string()]);
    server.remove_export("b", false).unwrap();
    assert!(server.remove_export("b", false).is_err());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_clients_do_not_hurt_others() {
    let dir = tempfile::tempdir().unwrap();
    let opts = ServerOptions {
        max_connections: 0,
        handshake_max_seconds: 1,
    };
    let (server, sock) = unix_server_with(dir.path(), opts).await;
    let mem = Arc::new(MemNode::with_data(vec![0; 1 << 20]));
    server
        .add_export(export("exp", mem.clone() as NodeRef, true))
        .unwrap();
    let good = NbdClient::connect(&NbdAddr::Unix(sock.clone()), "exp")
        .await
        .unwrap();

    // Garbage instead of client flags / options.
    let mut raw = Raw::connect(&sock).await;
    raw.s
        .write_all(b"this is not an NBD option at all....")
        .await
        .unwrap();
    assert!(raw.closed().await);
    // Unknown client flags.
    let mut s = tokio::net::UnixStream::connect(&sock).await.unwrap();
    let mut g = [0u8; GREETING_LEN];
    tokio::io::AsyncReadExt::read_exact(&mut s, &mut g)
        .await
        .unwrap();
    s.write_all(&0xffff_ffffu32.to_be_bytes()).await.unwrap();
    let mut raw2 = Raw {
        s,
        extended: false,
        structured: false,
    };
    assert!(raw2.closed().await);
    // Huge option length: drained and refused, connection still usable... up to a point.
    let mut raw = Raw::connect(&sock).await;
    let mut hdr = encode_option(OPT_INFO, &[]);
    hdr[12..16].copy_from_slice(&u32::MAX.to_be_bytes());
    raw.s.write_all(&hdr).await.unwrap();
    drop(raw);
    // Bad request magic in transmission.
    let mut raw = Raw::connect(&sock).await;
    raw.go("exp").await;
    raw.s.write_all(&[0xde; 28]).await.unwrap();
    assert!(raw.closed().await);
    // Oversized write payload.
    let mut raw = Raw::connect(&sock).await;
    raw.go("exp").await;
    raw.send(CMD_WRITE, 0, 1, 0, u32::MAX.into()).await;
    assert!(raw.closed().await);
    // Extended request magic without negotiating it.
    let mut raw = Raw::connect(&sock).await;
    raw.go("exp").await;
    raw.extended = true;
    raw.send(CMD_READ, 0, 1, 0, 1).await;
    assert!(raw.closed().await);
    // Silent client: the handshake times out.
    let mut raw = Raw::connect(&sock).await;
    let t = std::time::Instant::now();
    assert!(raw.closed().await);
    assert!(t.elapsed() < Duration::from_secs(4));
    // Truncated request then hang-up.
    let mut raw = Raw::connect(&sock).await;
    raw.go("exp").await;
    raw.s.write_all(&REQUEST_MAGIC.to_be_bytes()).await.unwrap();
    drop(raw);

    // The well-behaved client never noticed.
    good.write(0, IoBuf::from_slice(&[5; 4096]), WriteFlags::default())
        .await
        .unwrap();
    let b = good.read(0, IoBuf::zeroed(4096)).await.unwrap();
    assert!(b.iter().all(|&x| x == 5));
    let again = NbdClient::connect(&NbdAddr::Unix(sock.clone()), "exp")
        .await
        .unwrap();
    assert_eq!(again.size(), 1 << 20);
    drop(good);
    drop(again);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_clients_two_servers_and_limits() {
    let dir = tempfile::tempdir().unwrap();
    let (s1, sock1) = unix_server(dir.path()).await;
    let s2 = NbdServer::start(
        ListenAddr::Tcp {
            host: "127.0.0.1".into(),
            port: 0,
        },
        ServerOptions {
            max_connections: 1,
            handshake_max_seconds: 10,
        },
    )
    .await
    .unwrap();
    let ListenAddr::Tcp { port, .. } = s2.local_addr().clone() else {
        panic!()
    };
    assert_ne!(port, 0);
    let mem = Arc::new(MemNode::with_data(vec![0; 4 << 20]));
    s1.add_export(export("exp", mem.clone() as NodeRef, true))
        .unwrap();
    s2.add_export(export("exp", mem.clone() as NodeRef, true))
        .unwrap();

    let clients = futures::future::join_all((0..16).map(|_| {
        let sock = sock1.clone();
        async move {
            NbdClient::connect(&NbdAddr::Unix(sock), "exp")
                .await
                .unwrap()
        }
    }))
    .await;
    assert_eq!(s1.export_clients("exp"), 16);
    futures::future::join_all(clients.iter().enumerate().map(|(i, c)| async move {
        let off = i as u64 * 65536;
        let data = pattern(65536, i as u8);
        c.write(off, IoBuf::from_slice(&data), WriteFlags::default())
            .await
            .unwrap();
        let b = c.read(off, IoBuf::zeroed(65536)).await.unwrap();
        assert_eq!(&b[..], &data[..]);
    }))
    .await;
    let snap = mem.snapshot();
    for i in 0..16usize {
        assert_eq!(
            &snap[i * 65536..(i + 1) * 65536],
            &pattern(65536, i as u8)[..]
        );
    }

    // TCP server with max-connections 1: no multi-conn, a second client is turned away.
    let tcp = NbdAddr::Tcp {
        host: "127.0.0.1".into(),
        port,
    };
    let c1 = NbdClient::connect(&tcp, "exp").await.unwrap();
    assert_eq!(c1.transmission_flags() & TFLAG_CAN_MULTI_CONN, 0);
    assert!(NbdClient::connect(&tcp, "exp").await.is_err());
    let b = c1.read(0, IoBuf::zeroed(65536)).await.unwrap();
    assert_eq!(&b[..], &pattern(65536, 0)[..]);
    let uri = format!("nbd://127.0.0.1:{port}/exp");
    drop(c1);
    for _ in 0..100 {
        if s2.connections() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let c2 = NbdClient::connect_uri(&uri).await.unwrap();
    assert_eq!(c2.filename(), uri);

    let e = NbdClient::connect(&NbdAddr::Unix(sock1.clone()), "nope")
        .await
        .unwrap_err();
    assert_eq!(e.kind(), strata_core::ErrorKind::NotFound, "{e}");
    assert!(e.to_string().contains("export 'nope' not present"), "{e}");
    // stop() disconnects everybody and closes the listener.
    s1.stop().await;
    assert!(clients[0].read(0, IoBuf::zeroed(512)).await.is_err());
    assert!(!sock1.exists());
    assert!(
        NbdClient::connect(&NbdAddr::Unix(sock1.clone()), "exp")
            .await
            .is_err()
    );
    // The other server still serves.
    c2.read(0, IoBuf::zeroed(512)).await.unwrap();
    s2.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_status_payload_selects_contexts() {
    let dir = tempfile::tempdir().unwrap();
    let (server, sock) = unix_server(dir.path()).await;
    let mem: NodeRef = Arc::new(MemNode::with_data(vec![0; 65536]));
    let mut cfg = export("a", mem, false);
    cfg.bitmaps = vec![(
        "b0".into(),
        Arc::new(TestBitmap {
            granularity: 32768,
            bits: parking_lot::Mutex::new(vec![true, false]),
        }),
    )];
    server.add_export(cfg).unwrap();
    let mut raw = Raw::connect(&sock).await;
    assert_eq!(raw.option(OPT_EXTENDED_HEADERS, &[]).await[0].0, REP_ACK);
    raw.extended = true;
    let q = encode_meta_context_request(&MetaContextRequest {
        export: "a".into(),
        queries: vec!["base:allocation".into(), "qemu:dirty-bitmap:b0".into()],
    });
    let set = raw.option(OPT_SET_META_CONTEXT, &q).await;
    let ids: Vec<(u32, String)> = set
        .iter()
        .filter(|(r, _)| *r == REP_META_CONTEXT)
        .map(|(_, d)| decode_rep_meta_context(d).unwrap())
        .collect();
    assert_eq!(ids.len(), 2);
    let bm = ids
        .iter()
        .find(|(_, n)| n == "qemu:dirty-bitmap:b0")
        .unwrap()
        .0;
    let (_, flags) = raw.go("a").await;
    assert!(flags & TFLAG_BLOCK_STAT_PAYLOAD != 0);

    let payload = encode_block_status_payload(65536, &[bm]);
    raw.send(
        CMD_BLOCK_STATUS,
        CMD_FLAG_PAYLOAD_LEN,
        1,
        0,
        payload.len() as u64,
    )
    .await;
    raw.s.write_all(&payload).await.unwrap();
    let (h, p) = raw.reply().await.unwrap();
    let ReplyHeader::Chunk(c) = h else { panic!() };
    assert_eq!(c.flags, REPLY_FLAG_DONE);
    let (id, ds) = decode_block_status(c.kind, &p).unwrap();
    assert_eq!(id, bm);
    let runs: Vec<(u64, u64)> = ds.iter().map(|d| (d.len, d.flags)).collect();
    assert_eq!(runs, vec![(32768, 1), (32768, 0)]);

    let payload = encode_block_status_payload(65536, &[77]);
    raw.send(
        CMD_BLOCK_STATUS,
        CMD_FLAG_PAYLOAD_LEN,
        2,
        0,
        payload.len() as u64,
    )
    .await;
    raw.s.write_all(&payload).await.unwrap();
    let (h, p) = raw.reply().await.unwrap();
    let ReplyHeader::Chunk(c) = h else { panic!() };
    assert_eq!(c.kind, REPLY_TYPE_ERROR);
    assert_eq!(decode_error_chunk(c.kind, &p).unwrap().0, errno::EINVAL);
    // Without a payload: every selected context.
    raw.send(CMD_BLOCK_STATUS, 0, 3, 0, 65536).await;
    let mut n = 0;
    loop {
        let (h, _) = raw.reply().await.unwrap();
        let ReplyHeader::Chunk(c) = h else { panic!() };
        n += 1;
        if c.flags & REPLY_FLAG_DONE != 0 {
            break;
        }
    }
    assert_eq!(n, 2);
    server.stop().await;
}

/// A "TLS" layer that only counts upgrades: enough to test the FORCEDTLS option rules.
struct CountingTls(std::sync::atomic::AtomicUsize);

impl strata_nbd::TlsHook for CountingTls {
    fn wrap(
        &self,
        stream: strata_nbd::BoxStream,
    ) -> futures::future::BoxFuture<'static, std::io::Result<strata_nbd::BoxStream>> {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Box::pin(async move { Ok(stream) })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_hook_forced_mode() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("tls.sock");
    let hook = Arc::new(CountingTls(Default::default()));
    let server = NbdServer::start_with_tls(
        ListenAddr::Unix(sock.clone()),
        ServerOptions::default(),
        Some(hook.clone()),
    )
    .await
    .unwrap();
    let mem: NodeRef = Arc::new(MemNode::with_data(vec![0; 4096]));
    server.add_export(export("a", mem, false)).unwrap();
    let mut raw = Raw::connect(&sock).await;
    assert_eq!(raw.option(OPT_LIST, &[]).await[0].0, REP_ERR_TLS_REQD);
    assert_eq!(raw.option(OPT_STARTTLS, &[]).await[0].0, REP_ACK);
    // The server wraps the stream after sending the ack, on its own thread.
    let wrapped = || hook.0.load(std::sync::atomic::Ordering::SeqCst);
    for _ in 0..100 {
        if wrapped() == 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(wrapped(), 1);
    assert_eq!(raw.option(OPT_STARTTLS, &[]).await[0].0, REP_ERR_INVALID);
    let (size, _) = raw.go("a").await;
    assert_eq!(size, 4096);
    // EXPORT_NAME before TLS cannot be refused politely: the server hangs up.
    let mut raw = Raw::connect(&sock).await;
    raw.s
        .write_all(&encode_option(OPT_EXPORT_NAME, b"a"))
        .await
        .unwrap();
    assert!(raw.closed().await);
    server.stop().await;
}

/// A node that forwards to a child the test can swap (as the daemon's export link does).
#[derive(Debug)]
struct Swap(parking_lot::RwLock<NodeRef>);

impl Swap {
    fn cur(&self) -> NodeRef {
        self.0.read().clone()
    }
}

impl BlockNode for Swap {
    fn driver(&self) -> &'static str {
        "swap"
    }
    fn filename(&self) -> String {
        self.cur().filename()
    }
    fn size(&self) -> u64 {
        self.cur().size()
    }
    fn read_only(&self) -> bool {
        self.cur().read_only()
    }
    fn read(&self, offset: u64, buf: IoBuf) -> strata_core::BoxFuture<'_, IoBuf> {
        Box::pin(async move { self.cur().read(offset, buf).await })
    }
    fn write(&self, offset: u64, buf: IoBuf, f: WriteFlags) -> strata_core::BoxFuture<'_, IoBuf> {
        Box::pin(async move { self.cur().write(offset, buf, f).await })
    }
    fn write_zeroes(&self, o: u64, l: u64, f: ZeroFlags) -> strata_core::BoxFuture<'_, ()> {
        Box::pin(async move { self.cur().write_zeroes(o, l, f).await })
    }
    fn discard(&self, o: u64, l: u64) -> strata_core::BoxFuture<'_, ()> {
        Box::pin(async move { self.cur().discard(o, l).await })
    }
    fn flush(&self) -> strata_core::BoxFuture<'_, ()> {
        Box::pin(async move { self.cur().flush().await })
    }
    fn block_status(&self, o: u64, l: u64) -> strata_core::BoxFuture<'_, strata_core::Extent> {
        Box::pin(async move { self.cur().block_status(o, l).await })
    }
    fn truncate(&self, s: u64, p: strata_core::Prealloc) -> strata_core::BoxFuture<'_, ()> {
        Box::pin(async move { self.cur().truncate(s, p).await })
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_swap_while_exported() {
    let dir = tempfile::tempdir().unwrap();
    let (server, sock) = unix_server(dir.path()).await;
    let a: NodeRef = Arc::new(MemNode::with_data(vec![1; 8192]));
    let swap = Arc::new(Swap(parking_lot::RwLock::new(a)));
    server
        .add_export(export("exp", swap.clone() as NodeRef, true))
        .unwrap();
    let mut raw = Raw::connect(&sock).await;
    let (size, _) = raw.go("exp").await;
    assert_eq!(size, 8192);
    raw.send(CMD_READ, 0, 1, 0, 16).await;
    let (h, _) = raw.reply().await.unwrap();
    assert!(matches!(h, ReplyHeader::Simple { error: 0, .. }));
    let mut b = [0u8; 16];
    tokio::io::AsyncReadExt::read_exact(&mut raw.s, &mut b)
        .await
        .unwrap();
    assert_eq!(b, [1; 16]);
    // Swap in a smaller node with other content: the same connection sees it at once.
    *swap.0.write() = Arc::new(MemNode::with_data(vec![2; 4096]));
    raw.send(CMD_READ, 0, 2, 0, 16).await;
    let (h, _) = raw.reply().await.unwrap();
    assert!(matches!(h, ReplyHeader::Simple { error: 0, .. }));
    tokio::io::AsyncReadExt::read_exact(&mut raw.s, &mut b)
        .await
        .unwrap();
    assert_eq!(b, [2; 16]);
    raw.send(CMD_READ, 0, 3, 4096, 16).await;
    let (h, _) = raw.reply().await.unwrap();
    assert!(matches!(
        h,
        ReplyHeader::Simple {
            error: errno::EINVAL,
            ..
        }
    ));
    server.stop().await;
}
