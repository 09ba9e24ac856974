//! Compressed clusters: QEMU's zlib (raw deflate, 4 KiB window) and zstd framing.
//!
//! A compressed cluster is stored as a run of bytes whose length qcow2 only records in
//! 512-byte sectors, so a decompressor is handed the compressed bytes plus up to a sector of
//! whatever follows them. Both decoders therefore stop as soon as the cluster is full and
//! ignore trailing bytes, exactly as `qcow2_decompress` / `qcow2_zstd_decompress` do.

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use strata_core::{Error, ErrorKind, Result};
use zstd::stream::raw::{Decoder, Encoder, InBuffer, Operation, OutBuffer};

pub use crate::header::CompressionType;

/// The deflate window QEMU uses (`-12` in `deflateInit2`: raw stream, 2^12-byte window).
const ZLIB_WINDOW_BITS: u8 = 12;

/// zstd level: QEMU leaves libzstd's default (3).
const ZSTD_LEVEL: i32 = 3;

/// Largest zstd window we accept from an image (16 MiB). The biggest cluster is 2 MiB, so a
/// real encoder never needs more; a hostile frame header cannot make us allocate 128 MiB.
const ZSTD_WINDOW_LOG_MAX: u32 = 24;

/// Compress one cluster. Returns `None` when the output would not fit in `max_out` bytes:
/// QEMU passes `cluster_size - 1`, and then writes the cluster uncompressed.
pub fn compress_cluster(
    kind: CompressionType,
    data: &[u8],
    max_out: usize,
) -> Result<Option<Vec<u8>>> {
    match kind {
        CompressionType::Zlib => deflate(data, max_out),
        CompressionType::Zstd => zstd_compress(data, max_out),
    }
}

/// Decompress a cluster from `compressed` (which may carry trailing bytes) into all of `out`.
/// Fails with a `Corrupt` error when the stream is damaged or yields too little or too much.
pub fn decompress_cluster(kind: CompressionType, compressed: &[u8], out: &mut [u8]) -> Result<()> {
    match kind {
        CompressionType::Zlib => inflate(compressed, out),
        CompressionType::Zstd => zstd_decompress(compressed, out),
    }
}

fn deflate(data: &[u8], max_out: usize) -> Result<Option<Vec<u8>>> {
    let mut c = Compress::new_with_window_bits(Compression::default(), false, ZLIB_WINDOW_BITS);
    let mut out = Vec::with_capacity(max_out);
    match c.compress_vec(data, &mut out, FlushCompress::Finish) {
        // Finished only when every input byte went in and the final block fit.
        Ok(Status::StreamEnd) => Ok(Some(out)),
        Ok(Status::Ok | Status::BufError) => Ok(None),
        Err(e) => Err(Error::new(
            ErrorKind::Io(libc::EIO),
            format!("deflate failed: {e}"),
        )),
    }
}

fn inflate(compressed: &[u8], out: &mut [u8]) -> Result<()> {
    let mut d = Decompress::new_with_window_bits(false, ZLIB_WINDOW_BITS);
    let r = d.decompress(compressed, out, FlushDecompress::Finish);
    let produced = usize::try_from(d.total_out()).unwrap_or(usize::MAX);
    match r {
        // Like QEMU, accept a stream that stops early on input (Z_BUF_ERROR) as long as the
        // cluster was filled; the input is only known to sector precision.
        Ok(_) if produced == out.len() => Ok(()),
        Ok(_) => Err(Error::corrupt(format!(
            "compressed cluster decodes to {produced} bytes, expected {}",
            out.len()
        ))),
        Err(e) => Err(Error::corrupt(format!(
            "bad deflate data in compressed cluster: {e}"
        ))),
    }
}

fn zstd_compress(data: &[u8], max_out: usize) -> Result<Option<Vec<u8>>> {
    let io_err = |e: std::io::Error| {
        Error::new(
            ErrorKind::Io(libc::EIO),
            format!("zstd compression failed: {e}"),
        )
    };
    let mut enc = Encoder::new(ZSTD_LEVEL).map_err(io_err)?;
    let mut out = vec![0u8; max_out];
    let mut input = InBuffer::around(data);
    let mut output = OutBuffer::around(&mut out[..]);
    // Feed everything, then end the frame; anything left over means it did not fit.
    while input.pos() < data.len() {
        let before = (input.pos(), output.pos());
        enc.run(&mut input, &mut output).map_err(io_err)?;
        if (input.pos(), output.pos()) == before {
            return Ok(None);
        }
    }
    let remaining = enc.finish(&mut output, true).map_err(io_err)?;
    if remaining > 0 {
        return Ok(None);
    }
    let n = output.pos();
    out.truncate(n);
    Ok(Some(out))
}

fn zstd_decompress(compressed: &[u8], out: &mut [u8]) -> Result<()> {
    let bad = |what: String| Error::corrupt(format!("bad zstd data in compressed cluster: {what}"));
    let mut dec = Decoder::new().map_err(|e| bad(e.to_string()))?;
    dec.set_parameter(zstd::stream::raw::DParameter::WindowLogMax(
        ZSTD_WINDOW_LOG_MAX,
    ))
    .map_err(|e| bad(e.to_string()))?;
    let want = out.len();
    let mut input = InBuffer::around(compressed);
    let mut output = OutBuffer::around(out);
    // The data may be several frames; decode until the cluster is full. A step that makes no
    // progress means truncated input (QEMU's same guard against looping forever).
    let mut hint = 0;
    while output.pos() < want {
        let before = (input.pos(), output.pos());
        hint = dec
            .run(&mut input, &mut output)
            .map_err(|e| bad(e.to_string()))?;
        if (input.pos(), output.pos()) == before {
            return Err(bad(format!(
                "stream ends after {} of {want} bytes",
                output.pos()
            )));
        }
    }
    // A frame not fully flushed here holds more than a cluster of data.
    if hint > 0 {
        return Err(bad("frame larger than a cluster".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(len: usize) -> Vec<u8> {
        (0..len).map(|i| ((i / 7) % 251) as u8).collect()
    }

    #[test]
    fn round_trips_both_kinds_with_padding() {
        for kind in [CompressionType::Zlib, CompressionType::Zstd] {
            for cs in [512usize, 4096, 65536, 2 << 20] {
                let data = sample(cs);
                let mut c = compress_cluster(kind, &data, cs - 1).unwrap().unwrap();
                assert!(c.len() < cs);
                // Stored sizes are rounded up to sectors: garbage may follow.
                c.extend_from_slice(&[0xa5; 511]);
                let mut out = vec![0u8; cs];
                decompress_cluster(kind, &c, &mut out).unwrap();
                assert_eq!(out, data, "{kind:?} {cs}");
            }
        }
    }

    #[test]
    fn incompressible_data_gives_none() {
        let mut x = 0x1234_5678_u32;
        let data: Vec<u8> = (0..65536)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect();
        for kind in [CompressionType::Zlib, CompressionType::Zstd] {
            assert_eq!(compress_cluster(kind, &data, 65535).unwrap(), None);
        }
    }

    #[test]
    fn damaged_input_is_an_error_not_a_panic() {
        for kind in [CompressionType::Zlib, CompressionType::Zstd] {
            let data = sample(65536);
            let c = compress_cluster(kind, &data, 65535).unwrap().unwrap();
            let mut out = vec![0u8; 65536];
            // Truncated, empty, garbage, and decoding into a larger cluster than was written.
            assert!(decompress_cluster(kind, &c[..c.len() / 2], &mut out).is_err());
            assert!(decompress_cluster(kind, &[], &mut out).is_err());
            assert!(decompress_cluster(kind, &[0xff; 300], &mut out).is_err());
            let mut big = vec![0u8; 131072];
            assert!(decompress_cluster(kind, &c, &mut big).is_err());
            // Decoding into a smaller cluster: zlib fills it (QEMU accepts that too), zstd
            // refuses a frame that holds more than a cluster.
            let mut small = vec![0u8; 4096];
            let r = decompress_cluster(kind, &c, &mut small);
            match kind {
                CompressionType::Zlib => assert!(r.is_ok()),
                CompressionType::Zstd => assert!(r.is_err()),
            }
        }
    }

    #[test]
    fn zstd_accepts_several_frames() {
        let data = sample(8192);
        let mut c = zstd::bulk::compress(&data[..4096], 3).unwrap();
        c.extend(zstd::bulk::compress(&data[4096..], 3).unwrap());
        let mut out = vec![0u8; 8192];
        decompress_cluster(CompressionType::Zstd, &c, &mut out).unwrap();
        assert_eq!(out, data);
    }
}
