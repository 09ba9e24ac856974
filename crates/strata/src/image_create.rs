//! qemu-img's `bdrv_img_create`: check the options against the format's table, take the
//! size from the backing file when none is given, print the "Formatting" line and create the
//! image. Shared by `create`, `convert` and `dd`.

use strata_core::Prealloc;
use strata_qcow2::{CompressionType, CreateOptions};

use crate::open::OpenOpts;
use crate::options::{Opts, create_opts, format_opts};

/// What to create.
#[derive(Debug, Clone, Default)]
pub struct CreateRequest {
    /// Image file name.
    pub filename: String,
    /// Format name.
    pub fmt: String,
    /// Joined `-o` options.
    pub options: Option<String>,
    /// Size from the command line.
    pub size: Option<u64>,
    /// `-b`.
    pub backing: Option<String>,
    /// `-F`.
    pub backing_fmt: Option<String>,
    /// `-u`: do not open the backing file.
    pub unsafe_backing: bool,
    /// `-q`.
    pub quiet: bool,
}

/// Validate `req` as `bdrv_img_create` does and return the parsed options. Errors are the
/// message qemu-img prints after "FILENAME: ".
pub fn parse_request(req: &CreateRequest) -> Result<Opts, String> {
    if format_opts(&req.fmt).is_none() {
        return Err(format!("Unknown file format '{}'", req.fmt));
    }
    let mut opts = Opts::new(create_opts(&req.fmt));
    if let Some(list) = &req.options {
        opts.parse(list)?;
    }
    if let Some(size) = req.size {
        if opts.has("size") {
            return Err("The image size must be specified only once".to_string());
        }
        opts.set_number("size", size);
    }
    if let Some(b) = &req.backing {
        if !opts.knows("backing_file") {
            return Err(format!(
                "Backing file not supported for file format '{}'",
                req.fmt
            ));
        }
        opts.set("backing_file", b)?;
    }
    if let Some(bf) = &req.backing_fmt {
        if !opts.knows("backing_fmt") {
            return Err(format!(
                "Backing file format not supported for file format '{}'",
                req.fmt
            ));
        }
        opts.set("backing_fmt", bf)?;
    }
    if let Some(b) = opts.get_str("backing_file") {
        if b == req.filename {
            return Err(
                "Error: Trying to create an image with the same filename as the backing file"
                    .to_string(),
            );
        }
        if b.is_empty() {
            return Err("Expected backing file name, got empty string".to_string());
        }
    }
    Ok(opts)
}

/// Create the image described by `req` (qemu-img create's whole job). Errors are the
/// message qemu-img prints after "FILENAME: " (with any hint lines).
pub async fn img_create(req: &CreateRequest) -> Result<(), String> {
    let mut opts = parse_request(req)?;
    let backing = opts.get_str("backing_file");
    let backing_fmt = opts.get_str("backing_fmt");
    if let Some(b) = &backing {
        if !req.unsafe_backing {
            let full = backing_path(&req.filename, b);
            let open = OpenOpts {
                fmt: backing_fmt.clone(),
                ..Default::default()
            };
            let img = match crate::open::open_raw_error(&full, &open).await {
                Ok(img) => img,
                Err(e) => return Err(format!("{e}\nCould not open backing image.")),
            };
            let node = img.node();
            if backing_fmt.is_none() {
                let detected = node.driver();
                let _ = img.close().await;
                return Err(format!(
                    "Backing file specified without backing format\nDetected format of {detected}."
                ));
            }
            if !opts.has("size") {
                opts.set_number("size", node.size());
            }
            let _ = img.close().await;
        } else if backing_fmt.is_none() {
            return Err("Backing file specified without backing format".to_string());
        }
    }
    let Some(size) = opts.get_num("size") else {
        return Err("Image creation needs a size parameter".to_string());
    };
    if !req.quiet {
        use std::io::Write;
        println!(
            "Formatting '{}', fmt={} {}",
            req.filename,
            req.fmt,
            opts.print()
        );
        let _ = std::io::stdout().flush();
    }
    create_image(&req.filename, &req.fmt, size, &opts).await?;
    if backing.is_some() && !req.unsafe_backing && req.fmt == "qcow2" {
        record_backing(&req.filename).await?;
    }
    Ok(())
}

/// Record the identity of the new overlay's backing file in it (Strata's backing-file
/// validation, `strata_qcow2::identity`), so a later change of the backing is caught.
async fn record_backing(filename: &str) -> Result<(), String> {
    let open = OpenOpts {
        fmt: Some("qcow2".into()),
        read_only: false,
        no_backing: true,
        ..Default::default()
    };
    let img = crate::open::open_raw_error(filename, &open)
        .await
        .map_err(|e| e.to_string())?;
    let res = match img.qcow2() {
        Some(q) => q.record_backing().await.map_err(|e| e.to_string()),
        None => Ok(()),
    };
    let closed = img.close().await;
    res?;
    closed.map_err(|e| e.to_string())
}

/// The backing file name as the new image will resolve it: relative to the image's
/// directory (QEMU's `bdrv_get_full_backing_filename_from_filename`).
pub fn backing_path(image: &str, backing: &str) -> String {
    strata_graph::open::path_combine(image, backing)
}

/// The options of a raw image: a file of the given size, rounded up to 512 bytes as QEMU's
/// file driver does, with `preallocation` off, falloc or full.
fn raw_options(size: u64, opts: &Opts) -> Result<CreateOptions, String> {
    let preallocation = match opts.get_str("preallocation") {
        None => Prealloc::Off,
        Some(p) => match Prealloc::parse(&p) {
            Some(Prealloc::Metadata) => {
                return Err("Unsupported preallocation mode: metadata".to_string());
            }
            Some(m) => m,
            None => return Err(format!("invalid parameter value: {p}")),
        },
    };
    Ok(CreateOptions {
        size: size.checked_next_multiple_of(512).unwrap_or(u64::MAX),
        preallocation,
        ..Default::default()
    })
}

/// The qcow2 creation options from `-o` (QEMU's `qcow2_co_create_opts` conversion, with
/// its error texts for values it cannot convert).
pub fn qcow2_options(size: u64, opts: &Opts) -> Result<CreateOptions, String> {
    let bad = |key: &str, v: &str| format!("Parameter '{key}' does not accept value '{v}'");
    if opts.get_bool("encryption") == Some(true) || opts.has("encrypt.format") {
        return Err("Encrypted images are not supported".to_string());
    }
    let compat_v3 = match opts.get_str("compat").as_deref() {
        None | Some("1.1") | Some("v3") => true,
        Some("0.10") | Some("v2") => false,
        Some(v) => return Err(bad("version", v)),
    };
    let compression_type = match opts.get_str("compression_type") {
        None => CompressionType::Zlib,
        Some(v) => CompressionType::parse(&v).ok_or_else(|| bad("compression-type", &v))?,
    };
    let preallocation = match opts.get_str("preallocation") {
        None => Prealloc::Off,
        Some(v) => Prealloc::parse(&v).ok_or_else(|| bad("preallocation", &v))?,
    };
    let refcount_bits = opts.get_num("refcount_bits").unwrap_or(16);
    let co = CreateOptions {
        size,
        cluster_size: opts.get_num("cluster_size").unwrap_or(65536),
        compat_v3,
        // An absurd width must still fail validation, not wrap around.
        refcount_bits: u32::try_from(refcount_bits).unwrap_or(u32::MAX),
        extended_l2: opts.get_bool("extended_l2").unwrap_or(false),
        lazy_refcounts: opts.get_bool("lazy_refcounts").unwrap_or(false),
        compression_type,
        preallocation,
        backing_file: opts.get_str("backing_file"),
        backing_format: opts.get_str("backing_fmt"),
        data_file: opts.get_str("data_file"),
        data_file_raw: opts.get_bool("data_file_raw").unwrap_or(false),
    };
    strata_qcow2::create::validate(&co).map_err(|e| e.to_string())?;
    Ok(co)
}

/// Create `filename` in format `fmt` from parsed options (QEMU's `bdrv_create`), without the
/// backing checks and the "Formatting" line of `img_create`.
pub async fn create_image(filename: &str, fmt: &str, size: u64, opts: &Opts) -> Result<(), String> {
    let co = match fmt {
        "raw" => raw_options(size, opts)?,
        "qcow2" => qcow2_options(size, opts)?,
        other => return Err(format!("Unknown file format '{other}'")),
    };
    // A size the host file system refuses reads as QEMU words it.
    let too_large = || format!("The image size is too large for file format '{fmt}'");
    if fmt == "raw" && co.size > i64::MAX as u64 {
        return Err(too_large());
    }
    strata_graph::create_image(filename, fmt, &co)
        .await
        .map_err(|e| match e.kind() {
            strata_core::ErrorKind::Io(libc::EFBIG) => too_large(),
            _ => e.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(fmt: &str, options: Option<&str>) -> CreateRequest {
        CreateRequest {
            filename: "y.qcow2".into(),
            fmt: fmt.into(),
            options: options.map(Into::into),
            size: Some(1 << 20),
            ..Default::default()
        }
    }

    #[test]
    fn request_errors_like_qemu() {
        assert_eq!(
            parse_request(&req("vmdkx", None)).unwrap_err(),
            "Unknown file format 'vmdkx'"
        );
        assert_eq!(
            parse_request(&req("qcow2", Some("size=3M"))).unwrap_err(),
            "The image size must be specified only once"
        );
        let mut r = req("raw", None);
        r.backing = Some("a.qcow2".into());
        assert_eq!(
            parse_request(&r).unwrap_err(),
            "Backing file not supported for file format 'raw'"
        );
        let mut r = req("qcow2", None);
        r.backing = Some("y.qcow2".into());
        assert!(parse_request(&r).unwrap_err().contains("same filename"));
        r.backing = Some(String::new());
        assert_eq!(
            parse_request(&r).unwrap_err(),
            "Expected backing file name, got empty string"
        );
    }

    #[test]
    fn backing_paths_resolve_against_the_image_directory() {
        assert_eq!(backing_path("sub/o.qcow2", "../a.qcow2"), "sub/../a.qcow2");
        assert_eq!(backing_path("o.qcow2", "a.qcow2"), "a.qcow2");
        assert_eq!(backing_path("sub/o.qcow2", "/abs/a"), "/abs/a");
    }
}
