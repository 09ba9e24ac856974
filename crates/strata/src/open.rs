//! Opening images for a subcommand: qemu-img's `img_open` on strata-graph's chain opener,
//! with qemu-img's error wording ("Could not open 'x': ...") and its warnings on stderr.

use std::sync::Arc;

use strata_core::{Error, NodeRef};
use strata_graph::{BackingMode, ImageOptions};
use strata_io::Aio;
use strata_qcow2::Qcow2;

use crate::cli::{CacheMode, Fail};

/// `-U` for the running command (qemu-img's `--force-share` applies to every image a
/// command opens).
static FORCE_SHARE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Set `-U` for the images this command opens.
pub fn set_force_share(on: bool) {
    FORCE_SHARE.store(on, std::sync::atomic::Ordering::Relaxed);
    // Under -U a changed backing file (strata_qcow2::identity) is a warning, not an error.
    if on {
        strata_qcow2::identity::set_check_policy(strata_qcow2::identity::CheckPolicy::Warn);
    }
}

fn force_share() -> bool {
    FORCE_SHARE.load(std::sync::atomic::Ordering::Relaxed)
}

/// Take the image locks a qcow2 node takes on its file (`node`, a bare `file` node): read
/// consistently (and write and resize when writable), letting others only read — or share
/// everything under `-U`. What `check` needs, which opens the file node itself.
pub fn lock_as_qcow2_file(node: &NodeRef, read_only: bool) -> Result<(), Error> {
    let Some(f) = node.as_any().downcast_ref::<strata_io::FileNode>() else {
        return Ok(());
    };
    let (cr, w, wu, rs) = (0x01u8, 0x02u8, 0x04u8, 0x08u8);
    let perm = if read_only { cr } else { cr | w | rs };
    let shared = if force_share() {
        strata_io::PERM_ALL
    } else {
        cr | wu
    };
    f.lock_perm(perm, shared)
}

/// How to open an image (qemu-img's flags for `img_open`).
#[derive(Debug, Clone)]
pub struct OpenOpts {
    /// `-f`: the format (`file` for the bare protocol node); `None` probes.
    pub fmt: Option<String>,
    /// Open read-only.
    pub read_only: bool,
    /// Cache mode.
    pub cache: CacheMode,
    /// `aio=` engine.
    pub aio: Option<String>,
    /// Do not open the backing chain (`BDRV_O_NO_BACKING`).
    pub no_backing: bool,
    /// Open the backing files writable too (commit writes into one).
    pub backing_writable: bool,
}

impl Default for OpenOpts {
    fn default() -> Self {
        OpenOpts {
            fmt: None,
            read_only: true,
            cache: CacheMode::Writeback,
            aio: None,
            no_backing: false,
            backing_writable: false,
        }
    }
}

/// An open image: its top node (the chain hangs below it).
#[derive(Debug)]
pub struct Image {
    node: NodeRef,
}

impl Image {
    /// The top node.
    pub fn node(&self) -> NodeRef {
        self.node.clone()
    }

    /// The qcow2 driver of the top node, if it is one.
    pub fn qcow2(&self) -> Option<&Qcow2> {
        self.node.as_any().downcast_ref::<Qcow2>()
    }

    /// Close the image and its chain (flush, clear dirty bits).
    pub async fn close(self) -> Result<(), Fail> {
        close_chain(&self.node)
            .await
            .map_err(|e| Fail::msg(format!("Error while closing the image: {e}")))
    }
}

/// Close `node`, then what it was built on (backing chain and protocol nodes).
pub async fn close_chain(node: &NodeRef) -> strata_core::Result<()> {
    let mut cur = Some(node.clone());
    while let Some(n) = cur {
        let res = match n.as_any().downcast_ref::<Qcow2>() {
            Some(q) => q.close_image().await,
            None => n.close().await,
        };
        res?;
        if let Some(f) = n.file() {
            f.close().await?;
        }
        cur = n.backing();
    }
    Ok(())
}

/// A runtime for one command.
pub fn runtime() -> Result<tokio::runtime::Runtime, Fail> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Fail::msg(format!("Could not start the I/O runtime: {e}")))
}

/// Open `filename` as qemu-img's `img_open` does: errors read "Could not open 'x': ...".
pub async fn open(filename: &str, opts: &OpenOpts) -> Result<Image, Fail> {
    open_raw_error(filename, opts)
        .await
        .map_err(|e| Fail::msg(format!("Could not open '{filename}': {e}")))
}

/// Whether `filename` is an NBD URI (`nbd://host[:port]/export`, `nbd+unix:///export?socket=`).
pub fn is_nbd_uri(filename: &str) -> bool {
    ["nbd://", "nbd+tcp://", "nbd+unix://"]
        .iter()
        .any(|p| filename.starts_with(p))
}

/// Open an NBD export: the client is the protocol node; the format on top is raw unless
/// `-f` says otherwise (the export is never probed). A qcow2 image on an export opens
/// without its backing chain only when asked to.
async fn open_nbd(filename: &str, opts: &OpenOpts) -> Result<Image, Error> {
    let uri = strata_nbd::NbdUri::parse(filename)?;
    let co = strata_nbd::ClientOptions {
        read_only: opts.read_only,
        ..Default::default()
    };
    let client: NodeRef = strata_nbd::NbdClient::connect_with(&uri.addr, &uri.export, &co).await?;
    let node: NodeRef = match opts.fmt.as_deref() {
        Some("file") | Some("nbd") => client,
        None | Some("raw") => Arc::new(strata_graph::RawNode::open(
            client,
            strata_graph::RawOptions::default(),
        )?),
        Some("qcow2") => {
            let h = strata_qcow2::read_header(&client).await?;
            if let (Some(b), false) = (&h.backing_file, opts.no_backing) {
                return Err(Error::unsupported(format!(
                    "Backing file '{b}' of an image on NBD cannot be opened"
                )));
            }
            let qo = strata_qcow2::OpenOptions {
                read_only: opts.read_only,
                ..Default::default()
            };
            Qcow2::open(client, &qo, None, None).await?
        }
        Some(other) => return Err(Error::invalid(format!("Unknown driver '{other}'"))),
    };
    Ok(Image { node })
}

/// Open `filename`, with the driver's own error (what `bdrv_open` reports).
pub async fn open_raw_error(filename: &str, opts: &OpenOpts) -> Result<Image, Error> {
    if is_nbd_uri(filename) {
        return open_nbd(filename, opts).await;
    }
    let aio = match opts.aio.as_deref() {
        None => Aio::default(),
        Some(s) => s.parse()?,
    };
    if opts.fmt.as_deref() == Some("file") {
        // The bare protocol node (what `check` works on).
        let fo = strata_io::FileOptions {
            read_only: opts.read_only,
            direct: opts.cache.direct(),
            aio,
        };
        let file = strata_io::FileNode::open(std::path::Path::new(filename), &fo)?;
        // The tool's own use of the bare node: read (and write), sharing everything.
        let perm = if opts.read_only { 0x01 } else { 0x03 };
        file.lock_perm(perm, strata_io::PERM_ALL)?;
        let node: NodeRef = file;
        return Ok(Image { node });
    }
    let io = ImageOptions {
        format: opts.fmt.clone(),
        read_only: opts.read_only,
        cache: opts.cache,
        aio,
        backing: if opts.no_backing {
            BackingMode::None
        } else {
            BackingMode::Follow
        },
        force_share: force_share(),
        backing_writable: opts.backing_writable,
    };
    let img = strata_graph::open_image(filename, &io).await?;
    for w in &img.warnings {
        eprintln!("{w}");
    }
    Ok(Image { node: img.node })
}

/// Guess an image's format from its first bytes (qcow2 magic with version 2 or 3, else raw),
/// as QEMU's probing does for the formats we know.
pub async fn probe_format(file: &NodeRef) -> Result<&'static str, Error> {
    if file.size() < 8 {
        return Ok("raw");
    }
    let buf = file.read(0, strata_core::IoBuf::zeroed(8)).await?;
    let version = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]);
    Ok(if &buf[..4] == b"QFI\xfb" && version >= 2 {
        "qcow2"
    } else {
        "raw"
    })
}
