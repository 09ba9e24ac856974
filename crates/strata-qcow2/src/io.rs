//! The request paths: read, write (allocation and copy-on-write), write-zeroes, discard,
//! flush, block status and compressed writes.
//!
//! Each request looks its mapping up (and allocates) under the metadata lock, then does the
//! data I/O outside it on views of the caller's buffer, then takes the lock again to link
//! new clusters into L2. Guest clusters being allocated are reserved so that a second
//! request touching them waits instead of allocating them again.

use futures::future::try_join_all;
use strata_core::range::check_request;
use strata_core::{
    BlockNode, BlockStatus, Error, ErrorKind, Extent, IoBuf, Result, WriteFlags, ZeroFlags,
};

use crate::compress;
use crate::entry::{self, ClusterType, SubclusterType};
use crate::meta::{Meta, RunKind, Slot};
use crate::node::Qcow2;

/// One guest cluster touched by a write that needs an L2 update.
#[derive(Debug, Clone)]
struct ClusterOp {
    gci: u64,
    old: Slot,
    /// Host cluster the data goes to (0 until allocated, except data files).
    host: u64,
    /// The host cluster must be allocated.
    new_alloc: bool,
    /// Host cluster lies past the old end of the file (reads as zeroes).
    fresh: bool,
    /// Cluster-relative ranges to fill with the old content.
    fills: Vec<(u64, u64)>,
    new_slot: Slot,
}

/// A piece of the write: `len` bytes of the caller's buffer going to `host`.
#[derive(Debug)]
struct Segment {
    len: u64,
    host: u64,
}

fn is_copied(entry: u64) -> bool {
    entry & entry::COPIED != 0
}

impl Qcow2 {
    // ------------------------------------------------------------------ read

    pub(crate) async fn do_read(&self, offset: u64, mut buf: IoBuf) -> Result<IoBuf> {
        let len = buf.len() as u64;
        check_request(offset, len, self.size())?;
        if len == 0 {
            return Ok(buf);
        }
        let mut runs = Vec::new();
        let guard;
        {
            let mut m = self.meta.lock().await;
            let mut pos = offset;
            while pos < offset + len {
                let run = match m.map_run(pos, offset + len - pos, false).await {
                    Ok(r) => r,
                    Err(e) => return Err(self.signal(&mut m, e).await),
                };
                runs.push((pos, run));
                pos += run.len;
            }
            guard = self.io_begin();
        }
        let mut futs = Vec::with_capacity(runs.len());
        for (pos, run) in runs {
            let piece = buf.split_to(run.len as usize);
            futs.push(self.read_piece(pos, run.kind, piece));
        }
        let pieces = try_join_all(futs).await?;
        drop(guard);
        Ok(IoBuf::join(pieces))
    }

    async fn read_piece(&self, guest: u64, kind: RunKind, mut buf: IoBuf) -> Result<IoBuf> {
        match kind {
            RunKind::Unallocated { .. } => self.read_backing(guest, buf).await,
            RunKind::Zero { .. } => {
                buf.fill(0);
                Ok(buf)
            }
            RunKind::Data { host } => {
                self.file.debug_event(strata_core::DebugEvent::ReadAio);
                self.data_node().read(host, buf).await
            }
            RunKind::Compressed { entry } => {
                let cluster = self.read_compressed(entry).await?;
                let o = (guest % self.cs) as usize;
                let n = buf.len();
                buf.copy_from_slice(&cluster[o..o + n]);
                Ok(buf)
            }
        }
    }

    /// Read from the backing node; zeroes past its end or without one.
    pub(crate) async fn read_backing(&self, guest: u64, mut buf: IoBuf) -> Result<IoBuf> {
        let Some(b) = self.backing_node() else {
            buf.fill(0);
            return Ok(buf);
        };
        let bsize = b.size();
        if guest >= bsize {
            buf.fill(0);
            return Ok(buf);
        }
        self.file
            .debug_event(strata_core::DebugEvent::ReadBackingAio);
        let n = (bsize - guest).min(buf.len() as u64) as usize;
        if n == buf.len() {
            return self.read_below(&b, guest, buf).await;
        }
        let mut tail = buf.split_off(n);
        tail.fill(0);
        let mut head = self.read_below(&b, guest, buf).await?;
        head.unsplit(tail);
        Ok(head)
    }

    /// Decompress the cluster described by compressed L2 entry `entry`.
    async fn read_compressed(&self, entry: u64) -> Result<Vec<u8>> {
        let d = self.fmt.compressed(entry);
        self.file
            .debug_event(strata_core::DebugEvent::ReadCompressed);
        let raw = self
            .file
            .read(d.host_offset, IoBuf::zeroed(d.byte_len() as usize))
            .await?;
        let mut out = vec![0u8; self.cs as usize];
        let kind = self.compression;
        compress::decompress_cluster(kind, &raw, &mut out)?;
        Ok(out)
    }

    /// The old content of `[gci * cs + a, + len)` as described by the slot `s` (for
    /// copy-on-write fills).
    async fn read_old(&self, gci: u64, s: Slot, a: u64, len: u64) -> Result<IoBuf> {
        let cs = self.cs;
        let guest = gci * cs;
        if self.fmt.cluster_type(s.entry) == ClusterType::Compressed {
            let c = self.read_compressed(s.entry).await?;
            return Ok(IoBuf::from_slice(&c[a as usize..(a + len) as usize]));
        }
        self.file.debug_event(strata_core::DebugEvent::CowRead);
        let sc_size = self.fmt.subcluster_size();
        let mut out = IoBuf::zeroed(len as usize);
        let mut pieces = Vec::new();
        let mut pos = a;
        while pos < a + len {
            let sc = (pos / sc_size) as u32;
            let n = u64::from(self.fmt.run_length(s.entry, s.bitmap, sc));
            let end = ((u64::from(sc) + n) * sc_size).min(a + len);
            let piece = out.split_to((end - pos) as usize);
            let t = self.fmt.subcluster_type(s.entry, s.bitmap, sc);
            pieces.push(match t {
                SubclusterType::UnallocatedPlain | SubclusterType::UnallocatedAlloc => {
                    self.read_backing(guest + pos, piece).await?
                }
                SubclusterType::ZeroPlain | SubclusterType::ZeroAlloc => piece,
                SubclusterType::Normal => {
                    self.data_node()
                        .read(self.fmt.host_cluster(s.entry) + pos, piece)
                        .await?
                }
                SubclusterType::Compressed | SubclusterType::Invalid => {
                    return Err(Error::corrupt(format!(
                        "Invalid cluster entry found (guest cluster {gci:#x})"
                    )));
                }
            });
            pos = end;
        }
        Ok(IoBuf::join(pieces))
    }

    // ------------------------------------------------------------------ write

    /// Set the dirty bit before the first modification when lazy refcounts are on.
    async fn before_modify(&self, m: &mut Meta) -> Result<()> {
        if !m.lazy && m.h.lazy_refcounts() {
            m.set_dirty(true).await?;
            m.lazy = true;
        }
        Ok(())
    }

    pub(crate) async fn do_write(&self, offset: u64, buf: IoBuf) -> Result<IoBuf> {
        self.check_writable()?;
        let len = buf.len() as u64;
        check_request(offset, len, self.size())?;
        if len == 0 {
            return Ok(buf);
        }
        // Runs to the end even if this future is dropped (see `settled`).
        self.settled(move |me| async move { me.write_request(offset, buf).await })
            .await
    }

    /// The body of [`Qcow2::do_write`]: look up and allocate under the lock, write the data
    /// (and copy-on-write fills) outside it, then link new clusters into L2.
    async fn write_request(&self, offset: u64, mut buf: IoBuf) -> Result<IoBuf> {
        self.check_writable()?;
        let len = buf.len() as u64;
        let cs = self.cs;
        let first = offset / cs;
        let last = (offset + len - 1) / cs;
        let mut m = self.lock_clusters(first, last + 1).await;
        self.before_modify(&mut m).await?;
        let plan = match self.plan_write(&mut m, offset, len).await {
            Ok(p) => p,
            Err(e) => return Err(self.signal(&mut m, e).await),
        };
        let (segments, mut ops) = plan;
        let reservation = (!ops.is_empty()).then(|| self.reserve(first, last + 1));
        let guard = self.io_begin();
        drop(m);

        // Data I/O outside the lock: copy-on-write fills, then the caller's data.
        let data = self.data_node().clone();
        let mut fill_futs = Vec::new();
        for op in &ops {
            for &(a, b) in &op.fills {
                let op = op.clone();
                let data = data.clone();
                fill_futs.push(async move {
                    let old = self.read_old(op.gci, op.old, a, b - a).await?;
                    self.file.debug_event(strata_core::DebugEvent::CowWrite);
                    if op.new_alloc && old.is_zero() {
                        // Zeroes for the untouched parts of a new cluster: as QEMU's
                        // `handle_alloc_space`, let the file zero them without writing data,
                        // so the cluster gets its space and the file ends at a cluster end.
                        let flags = ZeroFlags {
                            may_unmap: false,
                            no_fallback: true,
                        };
                        match data.write_zeroes(op.host + a, b - a, flags).await {
                            Ok(()) => return Ok(()),
                            // Past the old end of the file a hole reads as zeroes already.
                            Err(e) if e.kind() == ErrorKind::Unsupported && op.fresh => {
                                return Ok(());
                            }
                            Err(e) if e.kind() == ErrorKind::Unsupported => {}
                            Err(e) => return Err(e),
                        }
                    }
                    data.write(op.host + a, old, WriteFlags::default()).await?;
                    Ok::<(), Error>(())
                });
            }
        }
        let mut write_futs = Vec::new();
        for seg in &segments {
            let piece = buf.split_to(seg.len as usize);
            let data = data.clone();
            let host = seg.host;
            self.file.debug_event(strata_core::DebugEvent::WriteAio);
            write_futs.push(async move { data.write(host, piece, WriteFlags::default()).await });
        }
        let (fills, writes) = futures::join!(try_join_all(fill_futs), try_join_all(write_futs));
        let pieces = match (writes, fills) {
            (Ok(pieces), Ok(_)) => pieces,
            (Err(e), _) | (_, Err(e)) => {
                // Nothing references the new clusters yet: give them back (QEMU's
                // `qcow2_alloc_cluster_abort`), so a failed write leaks nothing.
                let mut m = self.meta.lock().await;
                Self::abort_allocations(&mut m, &ops).await;
                return Err(e);
            }
        };
        let buf = IoBuf::join(pieces);

        if !ops.is_empty() {
            let mut m = self.meta.lock().await;
            if let Err(e) = self.link_clusters(&mut m, &mut ops).await {
                return Err(self.signal(&mut m, e).await);
            }
        }
        drop(reservation);
        drop(guard);
        Ok(buf)
    }

    /// Decide where each cluster of the write goes; allocates new host clusters.
    async fn plan_write(
        &self,
        m: &mut Meta,
        offset: u64,
        len: u64,
    ) -> Result<(Vec<Segment>, Vec<ClusterOp>)> {
        let cs = self.cs;
        let ext = self.fmt.extended_l2;
        let sc_size = self.fmt.subcluster_size();
        let nsc = self.fmt.subclusters();
        let external = self.fmt.external_data_file;
        let end = offset + len;
        let first = offset / cs;
        let last = (end - 1) / cs;
        let mut ops: Vec<ClusterOp> = Vec::new();
        // (host cluster, or `Err(i)`: the host cluster `ops[i]` gets allocated; ws, we)
        let mut placed: Vec<(std::result::Result<u64, usize>, u64, u64)> = Vec::new();
        for gci in first..=last {
            let ws = if gci == first { offset % cs } else { 0 };
            let we = if gci == last { (end - 1) % cs + 1 } else { cs };
            let old = m.get_slot(gci).await?;
            let ct = self.fmt.cluster_type(old.entry);
            let host_cluster = self.fmt.host_cluster(old.entry);
            if matches!(ct, ClusterType::Normal | ClusterType::ZeroAlloc)
                && host_cluster & (cs - 1) != 0
            {
                return Err(Error::corrupt(format!(
                    "Cluster allocation offset {host_cluster:#x} unaligned (guest cluster {gci:#x})"
                )));
            }
            let reusable = matches!(ct, ClusterType::Normal | ClusterType::ZeroAlloc)
                && (is_copied(old.entry) || external);
            if reusable && !external && host_cluster >= m.file_end {
                // A hostile entry could otherwise make us grow the file to 2^56 bytes.
                return Err(Error::corrupt(format!(
                    "Data cluster offset {host_cluster:#x} is past the end of the image (guest cluster {gci:#x})"
                )));
            }
            let sc_first = (ws / sc_size) as u32;
            let sc_last = ((we - 1) / sc_size) as u32;
            let touched_all_normal = (sc_first..=sc_last).all(|sc| {
                self.fmt.subcluster_type(old.entry, old.bitmap, sc) == SubclusterType::Normal
            });
            if ct == ClusterType::Normal && reusable && (!ext || touched_all_normal) {
                placed.push((Ok(host_cluster), ws, we));
                continue;
            }
            let new_alloc = !reusable && !external;
            let host = if external {
                gci * cs
            } else if reusable {
                host_cluster
            } else {
                0
            };
            // Which parts of the cluster must carry old content over.
            let mut fills: Vec<(u64, u64)> = Vec::new();
            for sc in 0..nsc {
                let r0 = u64::from(sc) * sc_size;
                let r1 = r0 + sc_size;
                let touched = sc >= sc_first && sc <= sc_last;
                let t = self.fmt.subcluster_type(old.entry, old.bitmap, sc);
                let need = if !ext {
                    true
                } else if new_alloc || (external && !reusable) {
                    touched || matches!(t, SubclusterType::Normal | SubclusterType::Compressed)
                } else {
                    touched && t != SubclusterType::Normal
                };
                if !need {
                    continue;
                }
                for (a, b) in [(r0, r1.min(ws)), (r0.max(we), r1)] {
                    if a < b {
                        match fills.last_mut() {
                            Some(l) if l.1 == a => l.1 = b,
                            _ => fills.push((a, b)),
                        }
                    }
                }
            }
            let new_slot = if ext {
                let base = if ct == ClusterType::Compressed {
                    entry::ALL_ALLOC
                } else {
                    old.bitmap
                };
                let touched = entry::sub_alloc_range(sc_first, sc_last - sc_first + 1);
                Slot {
                    entry: entry::COPIED,
                    bitmap: (base | touched) & !(touched << 32),
                }
            } else {
                Slot {
                    entry: entry::COPIED,
                    bitmap: 0,
                }
            };
            ops.push(ClusterOp {
                gci,
                old,
                host,
                new_alloc,
                fresh: false,
                fills,
                new_slot,
            });
            let at = if new_alloc {
                Err(ops.len() - 1)
            } else {
                Ok(host)
            };
            placed.push((at, ws, we));
        }
        // L2 tables before data clusters (QEMU's order, so layouts match).
        if !ops.is_empty() {
            let epoch = self.bump_epoch();
            let mut last_l1 = None;
            for op in &ops {
                let (l1i, _) = m.split_cluster(op.gci);
                if last_l1 != Some(l1i) {
                    m.writable_l2(l1i, epoch).await?;
                    last_l1 = Some(l1i);
                }
            }
        }
        // Allocate runs of consecutive clusters that need new host clusters in one go, so
        // their data lands contiguously.
        let mut i = 0;
        while i < ops.len() {
            if !ops[i].new_alloc {
                i += 1;
                continue;
            }
            let mut j = i + 1;
            while j < ops.len() && ops[j].new_alloc && ops[j].gci == ops[j - 1].gci + 1 {
                j += 1;
            }
            let old_end = m.file_end;
            let base = match m.alloc_clusters((j - i) as u64).await {
                Ok(base) => base,
                Err(e) => {
                    Self::abort_allocations(m, &ops[..i]).await;
                    return Err(e);
                }
            };
            for (k, op) in ops[i..j].iter_mut().enumerate() {
                op.host = base + k as u64 * cs;
                op.fresh = op.host >= old_end;
            }
            i = j;
        }
        for op in &mut ops {
            op.new_slot.entry |= op.host;
        }
        // Segments of the caller's buffer, merged where host offsets are contiguous.
        let mut segments: Vec<Segment> = Vec::new();
        for (host, ws, we) in placed {
            let host = match host {
                Ok(h) => h,
                Err(i) => ops[i].host,
            };
            let h = host + ws;
            match segments.last_mut() {
                Some(s) if s.host + s.len == h => s.len += we - ws,
                _ => segments.push(Segment {
                    len: we - ws,
                    host: h,
                }),
            }
        }
        if !external {
            // Every host range the request writes (its data and the copy-on-write fills of
            // whole clusters), merged: one overlap check per run, not per cluster.
            let mut ranges: Vec<(u64, u64)> = segments
                .iter()
                .map(|s| (s.host, s.host + s.len))
                .chain(ops.iter().map(|o| (o.host, o.host + cs)))
                .collect();
            ranges.sort_unstable();
            let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
            for (a, b) in ranges {
                match merged.last_mut() {
                    Some(l) if a <= l.1 => l.1 = l.1.max(b),
                    _ => merged.push((a, b)),
                }
            }
            for (a, b) in merged {
                m.check_overlap(a, b - a, false)?;
            }
        }
        Ok((segments, ops))
    }

    /// Point L2 at the clusters a write filled and free what they replaced.
    async fn link_clusters(&self, m: &mut Meta, ops: &mut [ClusterOp]) -> Result<()> {
        let epoch = self.bump_epoch();
        for (i, op) in ops.iter().enumerate() {
            let (l1i, l2i) = m.split_cluster(op.gci);
            let l2 = match m.writable_l2(l1i, epoch).await {
                Ok(l2) => l2,
                Err(e) => {
                    // The clusters not linked yet stay unreferenced: give them back.
                    Self::abort_allocations(m, &ops[i..]).await;
                    return Err(e);
                }
            };
            m.set_slot(l2, l2i, op.new_slot);
            if op.new_alloc {
                m.free_slot(op.old, epoch);
            }
        }
        Ok(())
    }

    /// Give back the host clusters `ops` allocated but never linked into L2.
    async fn abort_allocations(m: &mut Meta, ops: &[ClusterOp]) {
        for op in ops.iter().filter(|o| o.new_alloc && o.host != 0) {
            m.dealloc_unreferenced(op.host, 1).await;
        }
    }

    // ------------------------------------------------------------------ zeroes / discard

    pub(crate) async fn do_write_zeroes(
        &self,
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    ) -> Result<()> {
        self.check_writable()?;
        check_request(offset, len, self.size())?;
        if len == 0 {
            return Ok(());
        }
        let h = self.header();
        let v3 = h.version >= 3;
        let granule = if v3 {
            self.fmt.subcluster_size()
        } else {
            self.cs
        };
        if h.data_file_raw()
            && let Some(df) = &self.data_file
        {
            // The raw data file must read as zeroes too.
            df.write_zeroes(offset, len, flags).await?;
        }
        let end = offset + len;
        let size = self.size();
        let a = offset.next_multiple_of(granule);
        // A range reaching the end of the image may zero its partial last granule whole.
        let b = if end == size {
            end.next_multiple_of(granule)
        } else {
            end - end % granule
        };
        let mut fallback: Vec<(u64, u64)> = Vec::new();
        if a >= b {
            fallback.push((offset, end));
        } else {
            if offset < a {
                fallback.push((offset, a));
            }
            if b < end {
                fallback.push((b, end));
            }
            if !(v3 || flags.may_unmap && self.backing_node().is_none()) {
                fallback.push((a, b.min(end)));
            } else {
                let unmap = flags.may_unmap;
                let mut more = self
                    .settled(move |me| async move { me.zero_clusters(a, b, unmap, false).await })
                    .await?;
                fallback.append(&mut more);
            }
        }
        for (s, e) in fallback {
            if s >= e.min(size) {
                continue;
            }
            if flags.no_fallback {
                return Err(Error::unsupported("Cannot write zeroes without fallback"));
            }
            let mut pos = s;
            let e = e.min(size);
            while pos < e {
                let n = (e - pos).min(1 << 20);
                self.do_write(pos, IoBuf::zeroed(n as usize)).await?;
                pos += n;
            }
        }
        Ok(())
    }

    /// Make granule-aligned `[a, b)` read as zeroes (or, for `discard`, apply QEMU's discard
    /// semantics). Returns ranges that need writing real zeroes instead.
    async fn zero_clusters(
        &self,
        a: u64,
        b: u64,
        unmap: bool,
        discard: bool,
    ) -> Result<Vec<(u64, u64)>> {
        let cs = self.cs;
        let ext = self.fmt.extended_l2;
        let sc_size = self.fmt.subcluster_size();
        let external = self.fmt.external_data_file;
        let mut fallback = Vec::new();
        let mut pos = a;
        while pos < b {
            // One L2 table at a time, so other requests get the lock in between.
            let mut m = {
                let first = pos / cs;
                let per_table = cs / self.fmt.entry_size();
                let chunk_end = ((first / per_table + 1) * per_table).min(b.div_ceil(cs));
                self.lock_clusters(first, chunk_end).await
            };
            self.before_modify(&mut m).await?;
            let l2n = m.h.l2_entries();
            let v3 = m.h.version >= 3;
            let raw = m.h.data_file_raw();
            let chunk_end = (((pos / cs) / l2n + 1) * l2n * cs).min(b);
            let epoch = self.bump_epoch();
            let result: Result<()> = async {
                while pos < chunk_end {
                    let gci = pos / cs;
                    let cstart = gci * cs;
                    let s = pos - cstart;
                    let e = (chunk_end - cstart).min(cs);
                    let old = m.get_slot(gci).await?;
                    let ct = self.fmt.cluster_type(old.entry);
                    let whole = s == 0 && e == cs;
                    let allocated = matches!(
                        ct,
                        ClusterType::Normal | ClusterType::ZeroAlloc | ClusterType::Compressed
                    );
                    let host = self.fmt.host_cluster(old.entry);
                    let new = if discard {
                        if !(self.backing_node().is_some() || allocated) {
                            None
                        } else if ext {
                            Some((
                                Slot {
                                    entry: 0,
                                    bitmap: entry::ALL_ZERO,
                                },
                                true,
                            ))
                        } else if v3 {
                            Some((
                                Slot {
                                    entry: entry::ZERO,
                                    bitmap: 0,
                                },
                                true,
                            ))
                        } else {
                            Some((Slot::default(), true))
                        }
                    } else if !v3 {
                        // v2 without backing: deallocating reads as zeroes.
                        Some((Slot::default(), true))
                    } else if ext {
                        if whole {
                            let keep = !unmap && ct == ClusterType::Normal;
                            if keep || raw {
                                Some((
                                    Slot {
                                        entry: old.entry,
                                        bitmap: entry::ALL_ZERO,
                                    },
                                    false,
                                ))
                            } else {
                                Some((
                                    Slot {
                                        entry: 0,
                                        bitmap: entry::ALL_ZERO,
                                    },
                                    true,
                                ))
                            }
                        } else if ct == ClusterType::Compressed {
                            fallback.push((pos, cstart + e));
                            None
                        } else {
                            let f = (s / sc_size) as u32;
                            let n = ((e - s) / sc_size) as u32;
                            let bits = entry::sub_alloc_range(f, n);
                            Some((
                                Slot {
                                    entry: old.entry,
                                    bitmap: (old.bitmap & !bits) | (bits << 32),
                                },
                                false,
                            ))
                        }
                    } else {
                        let keep = (!unmap || raw)
                            && matches!(ct, ClusterType::Normal | ClusterType::ZeroAlloc);
                        if raw {
                            Some((
                                Slot {
                                    entry: cstart | entry::COPIED | entry::ZERO,
                                    bitmap: 0,
                                },
                                false,
                            ))
                        } else if keep {
                            Some((
                                Slot {
                                    entry: host | (old.entry & entry::COPIED) | entry::ZERO,
                                    bitmap: 0,
                                },
                                false,
                            ))
                        } else {
                            Some((
                                Slot {
                                    entry: entry::ZERO,
                                    bitmap: 0,
                                },
                                true,
                            ))
                        }
                    };
                    if let Some((slot, free_old)) = new
                        && slot != old
                    {
                        let (l1i, l2i) = m.split_cluster(gci);
                        let l2 = m.writable_l2(l1i, epoch).await?;
                        m.set_slot(l2, l2i, slot);
                        if free_old {
                            if external {
                                if allocated && discard {
                                    let df = self.data_node().clone();
                                    let _ = df.discard(cstart, cs.min(self.size() - cstart)).await;
                                }
                            } else {
                                m.free_slot(old, epoch);
                            }
                        }
                    }
                    pos = cstart + e;
                }
                Ok(())
            }
            .await;
            if let Err(e) = result {
                return Err(self.signal(&mut m, e).await);
            }
        }
        Ok(fallback)
    }

    pub(crate) async fn do_discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        check_request(offset, len, self.size())?;
        let cs = self.cs;
        let end = offset + len;
        let a = offset.next_multiple_of(cs);
        let b = if end == self.size() {
            end.next_multiple_of(cs)
        } else {
            end - end % cs
        };
        if a < b {
            self.settled(move |me| async move { me.zero_clusters(a, b, true, true).await })
                .await?;
        }
        Ok(())
    }

    // ------------------------------------------------------------------ flush

    pub(crate) async fn do_flush(&self) -> Result<()> {
        // Runs to the end even if this future is dropped: the discards of freed clusters
        // must be done before the metadata lock lets anything reuse them.
        self.settled(move |me| async move { me.flush_request().await })
            .await
    }

    async fn flush_request(&self) -> Result<()> {
        if let Some(df) = &self.data_file {
            // Data before the L2 entries that point at it.
            df.flush().await?;
        }
        let mut m = self.meta.lock().await;
        let min = self.min_active_epoch();
        self.file.debug_event(strata_core::DebugEvent::FlushToOs);
        let freed = m.flush(min).await?;
        if !freed.is_empty() {
            m.free_byte_offset = 0;
        }
        // Best effort: give the space back to the host, still under the lock so nothing
        // can reuse a cluster before its discard is done.
        for (off, len) in freed {
            let _ = self.file.discard(off, len).await;
        }
        drop(m);
        Ok(())
    }

    // ------------------------------------------------------------------ block status

    pub(crate) async fn do_block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        check_request(offset, len, self.size())?;
        if len == 0 {
            return Err(Error::invalid("block status of an empty range"));
        }
        let (run, recurse) = {
            let mut m = self.meta.lock().await;
            let recurse = self.metadata_preallocated(&mut m).await;
            match m.map_run(offset, len, true).await {
                Ok(r) => (r, recurse),
                Err(e) => return Err(self.signal(&mut m, e).await),
            }
        };
        let host_node = Some(self.data_node().clone());
        let (status, node) = match run.kind {
            RunKind::Unallocated { host } => (
                BlockStatus {
                    host_offset: host,
                    ..Default::default()
                },
                host.and(host_node),
            ),
            RunKind::Zero { host } => (
                BlockStatus {
                    allocated: true,
                    zero: true,
                    host_offset: host,
                    ..Default::default()
                },
                host.and(host_node),
            ),
            RunKind::Data { host } => (
                BlockStatus {
                    allocated: true,
                    data: true,
                    host_offset: Some(host),
                    // Holes in the host file may hide in preallocated data clusters.
                    recurse,
                    ..Default::default()
                },
                host_node,
            ),
            RunKind::Compressed { .. } => (
                BlockStatus {
                    allocated: true,
                    data: true,
                    compressed: true,
                    ..Default::default()
                },
                None,
            ),
        };
        Ok(Extent {
            len: run.len,
            status,
            host_node: node,
        })
    }

    // ------------------------------------------------------------------ compressed

    /// Write one whole cluster compressed (the last, partial cluster of the image may be
    /// shorter). Falls back to a normal write when the data does not compress.
    pub async fn write_compressed(&self, offset: u64, buf: IoBuf) -> Result<()> {
        self.check_writable()?;
        self.before_data_change().await?;
        self.before_write(offset, buf.len() as u64).await?;
        let cs = self.cs;
        let len = buf.len() as u64;
        check_request(offset, len, self.size())?;
        if self.fmt.external_data_file {
            return Err(Error::unsupported(
                "Compression is not supported with external data files",
            ));
        }
        if !offset.is_multiple_of(cs) || (len != cs && offset + len != self.size()) || len == 0 {
            return Err(Error::invalid(
                "Compressed writes must cover exactly one whole cluster",
            ));
        }
        let mut data = vec![0u8; cs as usize];
        data[..len as usize].copy_from_slice(&buf);
        let kind = self.compression;
        let Some(c) = compress::compress_cluster(kind, &data, cs as usize - 1)? else {
            self.do_write(offset, buf).await?;
            return Ok(());
        };
        let gci = offset / cs;
        let mut m = self.lock_clusters(gci, gci + 1).await;
        self.before_modify(&mut m).await?;
        let clen = c.len() as u64;
        let res: Result<()> = async {
            self.file
                .debug_event(strata_core::DebugEvent::ClusterAllocBytes);
            let fbo = m.free_byte_offset;
            let host = if fbo != 0 && fbo % cs != 0 && fbo % cs + clen <= cs {
                m.incref(fbo / cs).await?;
                fbo
            } else {
                m.alloc_clusters(clen.div_ceil(cs)).await?
            };
            let next = host + clen;
            m.free_byte_offset = if next.is_multiple_of(cs) { 0 } else { next };
            m.check_overlap(host, clen, false)?;
            let entry = self.fmt.encode_compressed(host, clen).ok_or_else(|| {
                Error::new(ErrorKind::NoSpace, "Compressed cluster offset too large")
            })?;
            self.file
                .debug_event(strata_core::DebugEvent::WriteCompressed);
            m.write_at(host, &c).await?;
            let old = m.get_slot(gci).await?;
            let epoch = self.bump_epoch();
            let (l1i, l2i) = m.split_cluster(gci);
            let l2 = m.writable_l2(l1i, epoch).await?;
            self.file
                .debug_event(strata_core::DebugEvent::L2UpdateCompressed);
            m.set_slot(l2, l2i, Slot { entry, bitmap: 0 });
            m.free_slot(old, epoch);
            Ok(())
        }
        .await;
        if let Err(e) = res {
            return Err(self.signal(&mut m, e).await);
        }
        Ok(())
    }
}
