//! `qemu-img compare`: are two images' guest views equal? Driven by block status, so ranges
//! that read as zeroes on both sides are never read (QEMU's `img_compare`).

use strata_core::buf::is_zero;
use strata_core::{BlockStatus, Error, IoBuf, NodeRef, Result};

use crate::copy::ProgressFn;
use crate::status::{ChainExtent, block_status_above};

/// qemu-img's `IO_BUF_SIZE`: the largest read.
const CHUNK: u64 = 2 << 20;
/// Mismatches are reported at sector granularity, as qemu-img does.
const SECTOR: usize = 512;

/// Options of `compare`.
#[derive(Clone, Default)]
pub struct CompareOptions {
    /// `-s`: a size difference or any difference in block status is a mismatch.
    pub strict: bool,
    /// Called with `(bytes done, total)`.
    pub progress: Option<ProgressFn>,
}

impl std::fmt::Debug for CompareOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompareOptions")
            .field("strict", &self.strict)
            .finish_non_exhaustive()
    }
}

/// The verdict of a comparison that ran to the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompareOutcome {
    /// Same content (`size_mismatch`: the sizes differ but the longer tail reads zeroes).
    Identical {
        /// Sizes differ (a warning is printed first).
        size_mismatch: bool,
    },
    /// Content differs at `offset` (the first differing 512-byte sector).
    ContentMismatch {
        /// Guest offset of the first difference.
        offset: u64,
        /// Sizes differ too (the warning is printed first).
        size_mismatch: bool,
    },
    /// Strict mode: the sizes differ.
    SizeMismatch,
    /// Strict mode: the block status differs at `offset`.
    StatusMismatch {
        /// Guest offset of the difference.
        offset: u64,
    },
}

impl CompareOutcome {
    /// qemu-img's exit status: 0 identical, 1 different.
    pub fn exit_code(&self) -> i32 {
        match self {
            CompareOutcome::Identical { .. } => 0,
            _ => 1,
        }
    }

    /// The text qemu-img prints on stdout (unless `-q`), newlines included.
    pub fn text(&self) -> String {
        let warn = |m: bool| {
            if m {
                "Warning: Image size mismatch!\n"
            } else {
                ""
            }
        };
        match *self {
            CompareOutcome::Identical { size_mismatch } => {
                format!("{}Images are identical.\n", warn(size_mismatch))
            }
            CompareOutcome::ContentMismatch {
                offset,
                size_mismatch,
            } => format!(
                "{}Content mismatch at offset {offset}!\n",
                warn(size_mismatch)
            ),
            CompareOutcome::SizeMismatch => "Strict mode: Image size mismatch!\n".into(),
            CompareOutcome::StatusMismatch { offset } => {
                format!("Strict mode: Offset {offset} block status mismatch!\n")
            }
        }
    }
}

/// A comparison that could not finish: the error text and qemu-img's exit status for it
/// (3 = block status failed, 4 = read failed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompareFailure {
    /// Exit status.
    pub exit_code: i32,
    /// What went wrong, as qemu-img words it.
    pub error: Error,
}

/// One side of the comparison.
struct Side<'a> {
    node: &'a NodeRef,
    name: &'a str,
    size: u64,
    /// The read buffer, reused from chunk to chunk (a fresh zeroed 2 MiB buffer per read
    /// costs a memset and page faults).
    spare: std::sync::Mutex<Option<IoBuf>>,
}

impl Side<'_> {
    async fn status(&self, offset: u64) -> Result<ChainExtent, CompareFailure> {
        block_status_above(self.node, None, offset, self.size - offset)
            .await
            .map_err(|e| CompareFailure {
                exit_code: 3,
                error: e.context(format!("Sector allocation test failed for {}", self.name)),
            })
    }

    /// Read `len` bytes at `offset` into the front of the returned buffer (which may be
    /// longer); hand it back with [`Side::recycle`].
    async fn read(&self, offset: u64, len: u64) -> Result<IoBuf, CompareFailure> {
        let len = len as usize;
        let mut buf = self
            .spare
            .lock()
            .unwrap()
            .take()
            .filter(|b| b.len() >= len)
            .unwrap_or_else(|| IoBuf::zeroed(len.max(CHUNK as usize)));
        let tail = buf.split_off(len);
        let mut buf = self
            .node
            .read(offset, buf)
            .await
            .map_err(|e| CompareFailure {
                exit_code: 4,
                error: Error::new(
                    e.kind(),
                    format!(
                        "Error while reading offset {offset} of {}: {}",
                        self.name,
                        e.message()
                    ),
                ),
            })?;
        buf.unsplit(tail);
        Ok(buf)
    }

    fn recycle(&self, buf: IoBuf) {
        *self.spare.lock().unwrap() = Some(buf);
    }

    /// `check_empty_sectors`: the offset of the first non-zero sector, if any.
    async fn first_nonzero(&self, offset: u64, len: u64) -> Result<Option<u64>, CompareFailure> {
        let buf = self.read(offset, len).await?;
        let at = buf[..len as usize]
            .chunks(SECTOR)
            .position(|s| !is_zero(s))
            .map(|i| offset + (i * SECTOR) as u64);
        self.recycle(buf);
        Ok(at)
    }
}

/// The flags qemu-img compares in strict mode (the whole `BDRV_BLOCK_*` word).
fn strict_key(s: &BlockStatus, eof: bool) -> (bool, bool, bool, bool, bool, bool) {
    (
        s.allocated,
        s.data,
        s.zero,
        s.host_offset.is_some(),
        s.compressed,
        eof,
    )
}

/// Compare the guest views of `a` and `b` (named `name_a`, `name_b` in messages).
pub async fn compare_images(
    a: &NodeRef,
    name_a: &str,
    b: &NodeRef,
    name_b: &str,
    opts: &CompareOptions,
) -> Result<CompareOutcome, CompareFailure> {
    let s1 = Side {
        node: a,
        name: name_a,
        size: a.size(),
        spare: Default::default(),
    };
    let s2 = Side {
        node: b,
        name: name_b,
        size: b.size(),
        spare: Default::default(),
    };
    let total = s1.size.min(s2.size);
    let progress_base = s1.size.max(s2.size);
    let report = |done: u64| {
        if let Some(p) = &opts.progress {
            p(done, progress_base);
        }
    };
    if opts.strict && s1.size != s2.size {
        return Ok(CompareOutcome::SizeMismatch);
    }
    let mut offset = 0;
    while offset < total {
        let (e1, e2) = futures::try_join!(s1.status(offset), s2.status(offset))?;
        let mut chunk = e1.len.min(e2.len);
        if opts.strict {
            let k1 = strict_key(&e1.status, offset + e1.len == s1.size);
            let k2 = strict_key(&e2.status, offset + e2.len == s2.size);
            if k1 != k2 {
                return Ok(CompareOutcome::StatusMismatch { offset });
            }
        }
        let (a1, a2) = (e1.status.allocated, e2.status.allocated);
        if e1.status.zero && e2.status.zero {
            // Both read zeroes: nothing to read.
        } else if a1 == a2 {
            if a1 {
                chunk = chunk.min(CHUNK);
                let (b1, b2) = futures::try_join!(s1.read(offset, chunk), s2.read(offset, chunk))?;
                let n = chunk as usize;
                let differ = b1[..n]
                    .chunks(SECTOR)
                    .zip(b2[..n].chunks(SECTOR))
                    .position(|(x, y)| x != y);
                s1.recycle(b1);
                s2.recycle(b2);
                if let Some(i) = differ {
                    return Ok(CompareOutcome::ContentMismatch {
                        offset: offset + (i * SECTOR) as u64,
                        size_mismatch: false,
                    });
                }
            }
        } else {
            chunk = chunk.min(CHUNK);
            let side = if a1 { &s1 } else { &s2 };
            if let Some(at) = side.first_nonzero(offset, chunk).await? {
                return Ok(CompareOutcome::ContentMismatch {
                    offset: at,
                    size_mismatch: false,
                });
            }
        }
        offset += chunk;
        report(offset);
    }
    if s1.size == s2.size {
        return Ok(CompareOutcome::Identical {
            size_mismatch: false,
        });
    }
    // The longer image's tail must read zeroes.
    let over = if s1.size > s2.size { &s1 } else { &s2 };
    while offset < progress_base {
        let e = over.status(offset).await?;
        let mut chunk = e.len;
        if e.status.allocated && !e.status.zero {
            chunk = chunk.min(CHUNK);
            if let Some(at) = over.first_nonzero(offset, chunk).await? {
                return Ok(CompareOutcome::ContentMismatch {
                    offset: at,
                    size_mismatch: true,
                });
            }
        }
        offset += chunk;
        report(offset);
    }
    Ok(CompareOutcome::Identical {
        size_mismatch: true,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use strata_core::mem::MemNode;

    use super::*;
    use crate::testing::{Layer, chain};

    fn mem(data: Vec<u8>) -> NodeRef {
        Arc::new(MemNode::with_data(data))
    }

    #[tokio::test]
    async fn identical_different_and_size_mismatch() {
        let o = CompareOptions::default();
        let a = mem(vec![0; 8192]);
        let b = mem(vec![0; 16384]);
        let r = compare_images(&a, "a", &b, "b", &o).await.unwrap();
        assert_eq!(
            r.text(),
            "Warning: Image size mismatch!\nImages are identical.\n"
        );
        assert_eq!(r.exit_code(), 0);
        let strict = CompareOptions {
            strict: true,
            ..Default::default()
        };
        let r = compare_images(&a, "a", &b, "b", &strict).await.unwrap();
        assert_eq!(r.text(), "Strict mode: Image size mismatch!\n");
        let mut d = vec![0; 16384];
        d[12000] = 1;
        let b = mem(d.clone());
        let r = compare_images(&b, "b", &a, "a", &o).await.unwrap();
        assert_eq!(
            r.text(),
            "Warning: Image size mismatch!\nContent mismatch at offset 11776!\n"
        );
        d[700] = 1;
        let b = mem(d);
        let r = compare_images(&a, "a", &b, "b", &o).await.unwrap();
        assert_eq!(r.text(), "Content mismatch at offset 512!\n");
        assert_eq!(r.exit_code(), 1);
    }

    #[tokio::test]
    async fn chain_against_flat_copy() {
        let c = chain(&[
            Layer::new(1 << 20).data(4096, 4096).zero(65536, 65536),
            Layer::new(1 << 20).data(0, 1 << 20),
        ]);
        let flat = c[0].read(0, IoBuf::zeroed(1 << 20)).await.unwrap();
        let m = mem(flat.to_vec());
        let o = CompareOptions::default();
        let r = compare_images(&c[0], "top", &m, "flat", &o).await.unwrap();
        assert_eq!(
            r,
            CompareOutcome::Identical {
                size_mismatch: false
            }
        );
        let strict = CompareOptions {
            strict: true,
            ..Default::default()
        };
        let r = compare_images(&c[0], "top", &m, "flat", &strict)
            .await
            .unwrap();
        assert_eq!(r.text(), "Strict mode: Offset 0 block status mismatch!\n");
    }
}
