//! A bare `convert`: copy an image (with its chain) into a new raw or qcow2 image, for
//! measuring the copy engine against `qemu-img convert`.
//!
//! `cargo run --release -p strata-graph --example copy -- SRC OUT raw|qcow2 [-c] [-W] [-m N]`
//! (`STRATA_AIO=io_uring` selects the io_uring engine, `STRATA_CACHE=unsafe` etc. the
//! target's cache mode, default writeback)

use std::time::Instant;

use strata_graph::copy::{CopyOptions, Qcow2Compressed, TargetInit, copy_image};
use strata_graph::{ImageOptions, create_image, open_image};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [src, out, fmt, rest @ ..] = args.as_slice() else {
        return Err("usage: copy SRC OUT raw|qcow2 [-c] [-W] [-m N]".into());
    };
    let aio = match std::env::var("STRATA_AIO").as_deref() {
        Ok("io_uring") => strata_io::Aio::IoUring,
        _ => strata_io::Aio::Threads,
    };
    let ro = ImageOptions {
        read_only: true,
        aio,
        ..Default::default()
    };
    let source = open_image(src, &ro).await?.node;
    let size = source.size();
    let qopts = strata_qcow2::CreateOptions {
        size,
        ..Default::default()
    };
    create_image(out, fmt, &qopts).await?;
    let cache = match std::env::var("STRATA_CACHE") {
        Ok(c) => strata_graph::CacheMode::parse(&c)?,
        Err(_) => strata_graph::CacheMode::Writeback,
    };
    let rw = ImageOptions {
        format: Some(fmt.clone()),
        aio,
        cache,
        ..Default::default()
    };
    let target = open_image(out, &rw).await?.node;
    let mut opts = CopyOptions {
        target_init: TargetInit::Zero,
        ..Default::default()
    };
    let mut it = rest.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "-c" => {
                opts.compress = Some(std::sync::Arc::new(
                    Qcow2Compressed::new(&target).ok_or("-c needs a qcow2 target")?,
                ))
            }
            "-W" => opts.out_of_order = true,
            "-m" => opts.parallel = it.next().ok_or("-m needs a value")?.parse()?,
            other => return Err(format!("unknown option {other}").into()),
        }
    }
    let t = Instant::now();
    let stats = copy_image(&source, &target, &opts).await?;
    target.close().await?;
    let secs = t.elapsed().as_secs_f64();
    println!(
        "{:.3} s, {:.0} MiB/s of guest data; {stats:?}",
        secs,
        size as f64 / secs / (1 << 20) as f64
    );
    Ok(())
}
