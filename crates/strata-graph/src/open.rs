//! Opening images and their backing chains, the way qemu-img does, minus the unsafe parts:
//! only the image the user named is probed; backing files are opened read-only with the
//! format recorded in the image, never probed; relative names resolve against the directory
//! of the image that names them; chains have a depth cap and loop detection.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use futures::future::BoxFuture;
use serde_json::{Map, Value};
use strata_core::{Error, IoBuf, NodeRef, Prealloc, Result};
use strata_io::{Aio, FileNode, FileOptions};
use strata_qcow2::Qcow2;

use crate::drivers::cache::CacheFilter;
use crate::drivers::null::{NullNode, NullOptions};
use crate::drivers::raw::{RawNode, RawOptions};

/// Deepest backing chain we open (images below the top); deeper chains are refused.
pub const MAX_CHAIN_DEPTH: usize = 512;

/// Start of the error for a chain deeper than [`MAX_CHAIN_DEPTH`].
const DEPTH_ERROR_PREFIX: &str = "Backing chain is deeper than";

/// The qcow2 magic.
const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";

/// qemu-img's cache modes (`-t` / `-T`): whether the page cache is bypassed and how
/// flushes behave.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CacheMode {
    /// `none`: O_DIRECT, writeback.
    None,
    /// `writeback` (qemu-img's default).
    #[default]
    Writeback,
    /// `writethrough`: every write is flushed.
    Writethrough,
    /// `directsync`: O_DIRECT and every write flushed.
    Directsync,
    /// `unsafe`: flushes are ignored.
    Unsafe,
}

impl CacheMode {
    /// Parse QEMU's spelling (`none`/`off`, `writeback`, `writethrough`, `directsync`,
    /// `unsafe`).
    pub fn parse(s: &str) -> Result<CacheMode> {
        Ok(match s {
            "none" | "off" => CacheMode::None,
            "writeback" => CacheMode::Writeback,
            "writethrough" => CacheMode::Writethrough,
            "directsync" => CacheMode::Directsync,
            "unsafe" => CacheMode::Unsafe,
            _ => return Err(Error::invalid(format!("Invalid cache option: {s}"))),
        })
    }

    /// Whether the host page cache is bypassed (O_DIRECT).
    pub fn direct(self) -> bool {
        matches!(self, CacheMode::None | CacheMode::Directsync)
    }

    /// Whether each write must be durable before it completes.
    pub fn writethrough(self) -> bool {
        matches!(self, CacheMode::Writethrough | CacheMode::Directsync)
    }

    /// Whether flushes may be skipped.
    pub fn no_flush(self) -> bool {
        self == CacheMode::Unsafe
    }
}

/// Whether to open the backing chain.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum BackingMode {
    /// Open the backing files the images name.
    #[default]
    Follow,
    /// Open the named image alone (`backing: null`, what `info` and `rebase -u` use).
    None,
}

/// How to open an image.
#[derive(Debug, Clone, Default)]
pub struct ImageOptions {
    /// `qcow2`, `raw`, `null-co`; `None` = probe (the named image only).
    pub format: Option<String>,
    /// Open the image read-only (backing files are always read-only).
    pub read_only: bool,
    /// Cache mode.
    pub cache: CacheMode,
    /// I/O engine for the files.
    pub aio: Aio,
    /// Whether to open the backing chain.
    pub backing: BackingMode,
    /// `-U`: share every permission, so that images other processes use open (read-only).
    pub force_share: bool,
    /// Open backing files read-write as well (commit writes into a backing file); they
    /// are read-only otherwise.
    pub backing_writable: bool,
}

/// An opened image: its top node, its format, and warnings for the user.
#[derive(Debug, Clone)]
pub struct OpenedImage {
    /// The format node.
    pub node: NodeRef,
    /// The format the image was opened with.
    pub format: String,
    /// Text to print on stderr (the probing warning), one entry per message.
    pub warnings: Vec<String>,
}

/// QEMU's `path_combine`: `name` relative to the directory of `base` (unless absolute or a
/// `json:` name).
pub fn path_combine(base: &str, name: &str) -> String {
    if name.starts_with('/') || name.starts_with("json:") {
        return name.to_string();
    }
    match base.rfind('/') {
        Some(i) => format!("{}{}", &base[..=i], name),
        None => name.to_string(),
    }
}

/// The warning qemu-img prints when it probed a raw image.
pub fn probed_raw_warning(filename: &str) -> String {
    format!(
        "WARNING: Image format was not specified for '{filename}' and probing guessed raw.\n         \
         Automatically detecting the format is dangerous for raw images, write operations on \
         block 0 will be restricted.\n         Specify the 'raw' format explicitly to remove the \
         restrictions."
    )
}

/// Guess the format of `file`: qcow2 by magic and version, else raw (QEMU's `qcow2_probe`).
async fn probe(file: &NodeRef) -> Result<&'static str> {
    let n = file.size().min(512) as usize;
    if n < 8 {
        return Ok("raw");
    }
    let head = file.read(0, IoBuf::zeroed(n)).await?;
    let version = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
    Ok(if &head[..4] == QCOW2_MAGIC && version >= 2 {
        "qcow2"
    } else {
        "raw"
    })
}

/// State shared by the opening of one chain.
struct ChainOpener<'a> {
    opts: &'a ImageOptions,
    /// (device, inode) of every file opened so far, for loop detection.
    seen: Vec<(u64, u64)>,
    warnings: Vec<String>,
}

/// Open the protocol node for `path`, with the cache mode's flush policy on top when it
/// has one (writable files only).
fn open_file(path: &str, read_only: bool, opts: &ImageOptions) -> Result<NodeRef> {
    let fo = FileOptions {
        read_only,
        direct: opts.cache.direct(),
        aio: opts.aio,
    };
    let file: NodeRef = FileNode::open(Path::new(path), &fo)?;
    let (wt, no_flush) = (opts.cache.writethrough(), opts.cache.no_flush());
    if read_only || !(wt || no_flush) {
        return Ok(file);
    }
    Ok(Arc::new(CacheFilter::new(file, wt, no_flush)))
}

/// The `file` node under `node` (itself, or below a cache-mode filter).
fn file_node_of(node: &NodeRef) -> Option<NodeRef> {
    if node.as_any().is::<FileNode>() {
        return Some(node.clone());
    }
    node.file().filter(|f| f.as_any().is::<FileNode>())
}

/// Take the image locks qemu-img's open takes on an image's file: a qcow2 (or a data file)
/// reads consistently, writes and resizes when writable, and lets others only read; a raw
/// image passes on what the tool takes (read, and write when writable) and shares all.
/// `-U` shares everything.
fn lock_image_file(
    file: &NodeRef,
    storage: bool,
    read_only: bool,
    opts: &ImageOptions,
) -> Result<()> {
    let Some(f) = file_node_of(file) else {
        return Ok(());
    };
    let Some(f) = f.as_any().downcast_ref::<FileNode>() else {
        return Ok(());
    };
    let (cr, w, wu, rs) = (0x01u8, 0x02u8, 0x04u8, 0x08u8);
    let (perm, shared) = match (storage, read_only) {
        (true, true) => (cr, cr | wu),
        (true, false) => (cr | w | rs, cr | wu),
        (false, true) => (cr, strata_io::PERM_ALL),
        (false, false) => (cr | w, strata_io::PERM_ALL),
    };
    let shared = if opts.force_share {
        strata_io::PERM_ALL
    } else {
        shared
    };
    f.lock_perm(perm, shared)
}

impl ChainOpener<'_> {
    /// Remember `path`'s identity; an image met twice makes a loop.
    fn visit(&mut self, path: &str) -> Result<()> {
        let md = std::fs::metadata(path).map_err(|e| {
            Error::from_errno(
                e.raw_os_error().unwrap_or(libc::EIO),
                format!("Could not open '{path}'"),
            )
        })?;
        let id = (md.dev(), md.ino());
        if self.seen.contains(&id) {
            return Err(Error::invalid(format!(
                "Backing file '{path}' creates an infinite loop."
            )));
        }
        self.seen.push(id);
        Ok(())
    }

    /// Open the format `fmt` on `file` and, for qcow2, its data file and backing chain.
    /// `name` is the image's filename, against which relative names resolve.
    ///
    /// The chain is walked iteratively, top down (reading headers), then opened bottom up,
    /// so a deep chain costs no stack.
    async fn open_chain(
        &mut self,
        file: NodeRef,
        fmt: &str,
        name: &str,
        read_only: bool,
        probed: bool,
    ) -> Result<NodeRef> {
        let mut levels: Vec<Level> = Vec::new();
        let mut cur = Level {
            file: Some(file),
            fmt: fmt.to_string(),
            name: name.to_string(),
            read_only,
            probed,
            data_file: None,
            ready: None,
        };
        loop {
            let depth = levels.len();
            if let (None, Some(file)) = (&cur.ready, &cur.file) {
                lock_image_file(file, cur.fmt != "raw", cur.read_only, self.opts)
                    .map_err(|e| nest(e, depth))?;
            }
            if cur.ready.is_some() || cur.fmt == "raw" {
                levels.push(cur);
                break;
            }
            if cur.fmt != "qcow2" {
                return Err(nest(
                    Error::invalid(format!("Unknown driver '{}'", cur.fmt)),
                    depth,
                ));
            }
            let file = cur.file.clone().expect("a level without a node has a file");
            let h = strata_qcow2::read_header(&file)
                .await
                .map_err(|e| nest(e, depth))?;
            if let Some(df) = &h.data_file {
                let path = path_combine(&cur.name, df);
                let df = open_file(&path, cur.read_only, self.opts).map_err(|e| nest(e, depth))?;
                lock_image_file(&df, true, cur.read_only, self.opts).map_err(|e| nest(e, depth))?;
                cur.data_file = Some(df);
            }
            let next = match (&h.backing_file, self.opts.backing) {
                (Some(b), BackingMode::Follow) => Some(
                    self.backing_level(&cur.name, b, h.backing_format.as_deref(), depth)
                        .await
                        .map_err(|e| nest(e, depth + 1))?,
                ),
                _ => None,
            };
            levels.push(cur);
            match next {
                Some(l) => cur = l,
                None => break,
            }
        }
        let mut below: Option<NodeRef> = None;
        for (depth, l) in levels.into_iter().enumerate().rev() {
            let node = match (l.ready, l.file) {
                (Some(n), _) => n,
                (None, Some(file)) if l.fmt == "raw" => {
                    let ro = RawOptions {
                        probed: l.probed,
                        ..Default::default()
                    };
                    Arc::new(RawNode::open(file, ro).map_err(|e| nest(e, depth))?) as NodeRef
                }
                (None, Some(file)) => {
                    let qo = strata_qcow2::OpenOptions {
                        read_only: l.read_only,
                        ..Default::default()
                    };
                    Qcow2::open(file, &qo, below.take(), l.data_file)
                        .await
                        .map_err(|e| nest(e, depth))? as NodeRef
                }
                (None, None) => unreachable!("every level has a file or a node"),
            };
            below = Some(node);
        }
        Ok(below.expect("the chain has a top"))
    }

    /// The level for the backing file `backing` named by `image` (at `depth`).
    async fn backing_level(
        &mut self,
        image: &str,
        backing: &str,
        format: Option<&str>,
        depth: usize,
    ) -> Result<Level> {
        if depth + 1 > MAX_CHAIN_DEPTH {
            return Err(Error::invalid(format!(
                "{DEPTH_ERROR_PREFIX} {MAX_CHAIN_DEPTH} images (at '{backing}', named by '{image}')"
            )));
        }
        let ro = !self.opts.backing_writable;
        if let Some(json) = backing.strip_prefix("json:") {
            // Options spelled out in the image (QEMU writes these for non-file backings).
            let v: Value = serde_json::from_str(json)
                .map_err(|e| Error::invalid(format!("Could not parse JSON: {e}")))?;
            let Value::Object(o) = v else {
                return Err(Error::invalid("JSON options must be an object"));
            };
            let o = undot(&o);
            let node = open_json_node(self, &o, ro).await?;
            return Ok(Level {
                file: None,
                fmt: node.driver().to_string(),
                name: node.filename(),
                read_only: ro,
                probed: false,
                data_file: None,
                ready: Some(node),
            });
        }
        let path = path_combine(image, backing);
        // Probing a backing file lets a guest-written raw image pose as qcow2 and make us
        // open host files it names (CVE-2024-4467), so an unrecorded format is refused.
        let Some(fmt) = format else {
            return Err(Error::invalid(format!(
                "Backing file specified without backing format: '{path}' (record it with \
                 'rebase -u -b {backing} -F <fmt> {image}')"
            )));
        };
        self.visit(&path)?;
        let file = open_file(&path, ro, self.opts)?;
        Ok(Level {
            file: Some(file),
            fmt: fmt.to_string(),
            name: path,
            read_only: ro,
            probed: false,
            data_file: None,
            ready: None,
        })
    }
}

/// One image of a chain being opened: its file (or, for a `json:` backing name, the node
/// opened whole) and how to open its format.
struct Level {
    file: Option<NodeRef>,
    fmt: String,
    name: String,
    read_only: bool,
    probed: bool,
    data_file: Option<NodeRef>,
    ready: Option<NodeRef>,
}

/// Prefix an error met `depth` images below the top with QEMU's "Could not open backing
/// file: " once per level (the depth-cap error, which would carry hundreds, gets one).
fn nest(e: Error, depth: usize) -> Error {
    let times = if e.message().starts_with(DEPTH_ERROR_PREFIX) {
        depth.min(1)
    } else {
        depth
    };
    (0..times).fold(e, |e, _| e.context("Could not open backing file"))
}

/// Open the image `filename` (a path, `null-co://`, or a `json:{...}` name) with its
/// backing chain.
pub async fn open_image(filename: &str, opts: &ImageOptions) -> Result<OpenedImage> {
    if let Some(json) = filename.strip_prefix("json:") {
        let v: Value = serde_json::from_str(json)
            .map_err(|e| Error::invalid(format!("Could not parse JSON: {e}")))?;
        return open_image_json(&v, opts).await;
    }
    if filename == "null-co://" || filename == "null-aio://" {
        return Ok(OpenedImage {
            node: Arc::new(NullNode::new(NullOptions::default())),
            format: "null-co".into(),
            warnings: Vec::new(),
        });
    }
    let mut opener = ChainOpener {
        opts,
        seen: Vec::new(),
        warnings: Vec::new(),
    };
    opener.visit(filename)?;
    let file = open_file(filename, opts.read_only, opts)?;
    let (fmt, probed) = match opts.format.as_deref() {
        Some(f) => (f.to_string(), false),
        None => {
            let f = probe(&file).await?;
            // QEMU warns only when the probed raw image is writable.
            if f == "raw" && !opts.read_only {
                opener.warnings.push(probed_raw_warning(filename));
            }
            (f.to_string(), f == "raw")
        }
    };
    if fmt == "null-co" {
        return Err(Error::invalid(
            "null-co has no file; open it with a json: filename",
        ));
    }
    let node = opener
        .open_chain(file, &fmt, filename, opts.read_only, probed)
        .await?;
    Ok(OpenedImage {
        node,
        format: fmt,
        warnings: opener.warnings,
    })
}

/// Turn QEMU's dotted keys (`file.filename`) into nested objects.
fn undot(v: &Map<String, Value>) -> Map<String, Value> {
    let mut out = Map::new();
    for (k, val) in v {
        let val = match val {
            Value::Object(o) => Value::Object(undot(o)),
            other => other.clone(),
        };
        match k.split_once('.') {
            Some((head, rest)) => {
                let entry = out
                    .entry(head.to_string())
                    .or_insert_with(|| Value::Object(Map::new()));
                if let Value::Object(o) = entry {
                    let mut inner = Map::new();
                    inner.insert(rest.to_string(), val);
                    for (ik, iv) in undot(&inner) {
                        o.insert(ik, iv);
                    }
                }
            }
            None => {
                out.insert(k.clone(), val);
            }
        }
    }
    out
}

fn get_u64(o: &Map<String, Value>, key: &str) -> Result<Option<u64>> {
    match o.get(key) {
        None => Ok(None),
        Some(Value::Number(n)) => n
            .as_u64()
            .map(Some)
            .ok_or_else(|| Error::invalid(format!("Parameter '{key}' expects uint64"))),
        Some(Value::String(s)) => s
            .parse()
            .map(Some)
            .map_err(|_| Error::invalid(format!("Parameter '{key}' expects uint64"))),
        Some(_) => Err(Error::invalid(format!("Parameter '{key}' expects uint64"))),
    }
}

fn get_bool(o: &Map<String, Value>, key: &str) -> Result<Option<bool>> {
    match o.get(key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(Value::String(s)) if s == "on" || s == "true" => Ok(Some(true)),
        Some(Value::String(s)) if s == "off" || s == "false" => Ok(Some(false)),
        Some(_) => Err(Error::invalid(format!(
            "Parameter '{key}' expects 'on' or 'off'"
        ))),
    }
}

/// Open an image described by QEMU's JSON options (`json:{...}` filenames): drivers
/// `qcow2`, `raw`, `file`, `null-co`, with `file` as an object or a filename string,
/// `backing: null` (any other `backing` value is ignored: the header's backing file is
/// used), raw's `offset`/`size`, null's `size`/`read-zeroes`, and `read-only`. Dotted keys
/// (`file.filename`) are accepted.
pub async fn open_image_json(v: &Value, opts: &ImageOptions) -> Result<OpenedImage> {
    let Value::Object(o) = v else {
        return Err(Error::invalid("JSON options must be an object"));
    };
    let o = undot(o);
    let mut opener = ChainOpener {
        opts,
        seen: Vec::new(),
        warnings: Vec::new(),
    };
    let node = open_json_node(&mut opener, &o, opts.read_only).await?;
    Ok(OpenedImage {
        format: node.driver().to_string(),
        node,
        warnings: opener.warnings,
    })
}

fn open_json_node<'a>(
    opener: &'a mut ChainOpener<'_>,
    o: &'a Map<String, Value>,
    read_only: bool,
) -> BoxFuture<'a, Result<NodeRef>> {
    Box::pin(async move {
        let read_only = read_only || get_bool(o, "read-only")?.unwrap_or(false);
        let driver = match o.get("driver") {
            Some(Value::String(d)) => d.as_str(),
            _ => return Err(Error::invalid("Parameter 'driver' is missing")),
        };
        match driver {
            "file" => {
                let Some(Value::String(f)) = o.get("filename") else {
                    return Err(Error::invalid("Parameter 'filename' is missing"));
                };
                opener.visit(f)?;
                let file = open_file(f, read_only, opener.opts)?;
                lock_image_file(&file, false, read_only, opener.opts)?;
                Ok(file)
            }
            "null-co" => Ok(Arc::new(NullNode::new(NullOptions {
                size: get_u64(o, "size")?.unwrap_or(1 << 30),
                read_zeroes: get_bool(o, "read-zeroes")?.unwrap_or(false),
            })) as NodeRef),
            "raw" | "qcow2" => {
                let (file, name) = match o.get("file") {
                    Some(Value::String(f)) => {
                        opener.visit(f)?;
                        (open_file(f, read_only, opener.opts)?, f.clone())
                    }
                    Some(Value::Object(fo)) => {
                        let n = open_json_node(opener, fo, read_only).await?;
                        let name = n.filename();
                        (n, name)
                    }
                    _ => return Err(Error::invalid("Parameter 'file' is missing")),
                };
                if driver == "raw" {
                    lock_image_file(&file, false, read_only, opener.opts)?;
                    return Ok(Arc::new(RawNode::open(
                        file,
                        RawOptions {
                            offset: get_u64(o, "offset")?.unwrap_or(0),
                            size: get_u64(o, "size")?,
                            probed: false,
                        },
                    )?) as NodeRef);
                }
                let saved = opener.opts;
                if matches!(o.get("backing"), Some(Value::Null)) {
                    let no_backing = ImageOptions {
                        backing: BackingMode::None,
                        ..saved.clone()
                    };
                    let mut sub = ChainOpener {
                        opts: &no_backing,
                        seen: std::mem::take(&mut opener.seen),
                        warnings: Vec::new(),
                    };
                    let n = sub.open_chain(file, "qcow2", &name, read_only, false).await;
                    opener.seen = sub.seen;
                    return n;
                }
                opener
                    .open_chain(file, "qcow2", &name, read_only, false)
                    .await
            }
            other => Err(Error::invalid(format!("Unknown driver '{other}'"))),
        }
    })
}

/// Create an image file: `raw` (a plain file) or `qcow2` (formatted on a new file), as
/// `qemu-img create` and `convert` do.
pub async fn create_image(
    path: &str,
    format: &str,
    qcow2: &strata_qcow2::CreateOptions,
) -> Result<()> {
    match format {
        "raw" => strata_io::create(Path::new(path), qcow2.size, qcow2.preallocation).await,
        "qcow2" => {
            strata_io::create(Path::new(path), 0, Prealloc::Off).await?;
            let file: NodeRef = FileNode::open(Path::new(path), &FileOptions::default())?;
            let data_file = match &qcow2.data_file {
                Some(df) => {
                    let p = path_combine(path, df);
                    strata_io::create(Path::new(&p), 0, Prealloc::Off).await?;
                    Some(FileNode::open(Path::new(&p), &FileOptions::default())? as NodeRef)
                }
                None => None,
            };
            strata_qcow2::create(&file, qcow2, data_file.as_ref()).await?;
            file.flush().await
        }
        other => Err(Error::invalid(format!("Unknown file format '{other}'"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_combine_follows_qemu() {
        assert_eq!(path_combine("top.qcow2", "base.raw"), "base.raw");
        assert_eq!(
            path_combine("sub/top.qcow2", "../base.raw"),
            "sub/../base.raw"
        );
        assert_eq!(path_combine("/a/b/top", "c"), "/a/b/c");
        assert_eq!(path_combine("/a/b/top", "/x/c"), "/x/c");
    }

    #[test]
    fn cache_modes() {
        assert!(CacheMode::parse("none").unwrap().direct());
        assert!(CacheMode::parse("directsync").unwrap().writethrough());
        assert!(CacheMode::parse("unsafe").unwrap().no_flush());
        assert_eq!(
            CacheMode::parse("bogus").unwrap_err().message(),
            "Invalid cache option: bogus"
        );
    }

    #[tokio::test]
    async fn null_protocol_and_json() {
        let o = ImageOptions::default();
        let n = open_image("null-co://", &o).await.unwrap();
        assert_eq!((n.format.as_str(), n.node.size()), ("null-co", 1 << 30));
        let j = r#"json:{"driver":"null-co","size":"4096","read-zeroes":"on"}"#;
        let n = open_image(j, &o).await.unwrap().node;
        assert_eq!((n.driver(), n.size()), ("null-co", 4096));
        let e = open_image(r#"json:{"driver":"vmdk"}"#, &o)
            .await
            .unwrap_err();
        assert_eq!(e.message(), "Unknown driver 'vmdk'");
        let e = open_image("/nonexistent/x.img", &o).await.unwrap_err();
        assert_eq!(
            e.message(),
            "Could not open '/nonexistent/x.img': No such file or directory"
        );
    }

    #[test]
    fn dotted_keys_nest() {
        let v: Value =
            serde_json::from_str(r#"{"driver":"raw","file.driver":"file","file.filename":"x"}"#)
                .unwrap();
        let Value::Object(o) = v else { unreachable!() };
        let u = undot(&o);
        assert_eq!(u["file"]["filename"], "x");
        assert_eq!(u["file"]["driver"], "file");
    }
}
