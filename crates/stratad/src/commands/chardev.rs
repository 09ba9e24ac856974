//! Character devices over QMP: `chardev-add/-change/-remove/-send-break`,
//! `query-chardev`, `query-chardev-backends`, `ringbuf-read/-write`.
//!
//! Backends: `ringbuf` / `memory` (in-memory rings), `null`, `file` (output file), `pty`,
//! `socket` (server sockets accept and hold connections; no frontend reads them, as in qsd
//! where only monitors use chardevs) and the command line's monitor chardevs.

use std::collections::BTreeMap;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::Arc;

use serde_json::{Map, Value, json};
use strata_qmp::keyval::ChardevOpts;

use super::{Args, Reply, arg_str, generic, ok, opt_str};
use crate::daemon::Daemon;

/// The backends stratad can create, in qsd's `query-chardev-backends` order.
const BACKENDS: &[&str] = &["null", "ringbuf", "socket", "memory", "file", "pty"];

/// A ring buffer (QEMU's `RingBufChardev`): writes overwrite the oldest bytes.
#[derive(Debug)]
struct Ring {
    buf: Vec<u8>,
    prod: u64,
    cons: u64,
}

impl Ring {
    fn write(&mut self, data: &[u8]) {
        let size = self.buf.len() as u64;
        for &b in data {
            let i = (self.prod & (size - 1)) as usize;
            self.buf[i] = b;
            self.prod += 1;
            if self.prod - self.cons > size {
                self.cons = self.prod - size;
            }
        }
    }

    fn read(&mut self, n: u64) -> Vec<u8> {
        let size = self.buf.len() as u64;
        let mut out = Vec::new();
        while out.len() as u64 != n && self.cons != self.prod {
            out.push(self.buf[(self.cons & (size - 1)) as usize]);
            self.cons += 1;
        }
        out
    }
}

/// What keeps a backend's resources alive.
#[derive(Debug)]
enum Backing {
    None,
    Ring(Ring),
    File(#[allow(dead_code)] std::fs::File),
    Pty(#[allow(dead_code)] OwnedFd),
    Task(tokio::task::AbortHandle),
}

/// One character device.
#[derive(Debug)]
pub struct Chardev {
    /// QOM type suffix (`socket`, `ringbuf`, ...).
    kind: String,
    /// `query-chardev`'s `filename`.
    filename: String,
    /// A QMP monitor runs on it (busy; no hotswap).
    monitor: bool,
    backing: Backing,
}

impl Drop for Chardev {
    fn drop(&mut self) {
        if let Backing::Task(t) = &self.backing {
            t.abort();
        }
    }
}

/// Every character device, and the history of the `/chardevs` container (its iteration
/// order is a GLib hash table's).
#[derive(Debug, Default)]
pub struct Registry {
    devs: BTreeMap<String, Chardev>,
    history: Vec<(String, bool)>,
}

impl Registry {
    /// Ids in QOM container iteration order.
    pub fn ids(&self) -> Vec<String> {
        let ops: Vec<(&str, bool)> = self.history.iter().map(|(k, i)| (k.as_str(), *i)).collect();
        strata_qmp::ghash_iteration_order(&ops)
    }

    /// The QOM type of chardev `id`.
    pub fn qom_type(&self, id: &str) -> Option<String> {
        self.devs.get(id).map(|c| format!("chardev-{}", c.kind))
    }

    /// Whether a client is connected (a socket monitor's chardev is, while it serves).
    pub fn connected(&self, id: &str) -> bool {
        self.devs.get(id).is_some_and(|c| c.monitor)
    }

    fn insert(&mut self, id: &str, c: Chardev) {
        self.devs.insert(id.to_string(), c);
        self.history.push((id.to_string(), true));
    }
}

/// Record a command-line `--chardev` (a socket or stdio that a monitor will use).
pub fn register_cli(d: &Daemon, c: &ChardevOpts) {
    let id = c.id.clone().unwrap_or_default();
    let o = |k: &str| c.opts.get(k);
    let (kind, filename) = match c.backend.as_deref() {
        Some("stdio") => ("stdio", "stdio".to_string()),
        _ => {
            let addr = if let Some(p) = o("path").and_then(Value::as_str) {
                format!("unix:{p}")
            } else {
                let host = o("host").and_then(Value::as_str).unwrap_or("0.0.0.0");
                let port = match o("port") {
                    Some(Value::String(p)) => p.clone(),
                    Some(v) => v.to_string(),
                    None => String::new(),
                };
                format!("tcp:{host}:{port}")
            };
            ("socket", format!("{addr},server=on"))
        }
    };
    d.chardevs.lock().insert(
        &id,
        Chardev {
            kind: kind.into(),
            filename,
            monitor: false,
            backing: Backing::None,
        },
    );
}

/// A monitor now runs on chardev `id`.
pub fn mark_monitor(d: &Daemon, id: &str) {
    if let Some(c) = d.chardevs.lock().devs.get_mut(id) {
        c.monitor = true;
    }
}

/// Open a pseudo-terminal; returns the master and the slave's path.
fn open_pty() -> Result<(OwnedFd, String), String> {
    // SAFETY: posix_openpt/grantpt/unlockpt/ptsname_r on a descriptor we own.
    unsafe {
        let fd = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY);
        if fd < 0 {
            return Err(std::io::Error::last_os_error().to_string());
        }
        let owned = OwnedFd::from_raw_fd(fd);
        if libc::grantpt(fd) != 0 || libc::unlockpt(fd) != 0 {
            return Err(std::io::Error::last_os_error().to_string());
        }
        let mut name = [0 as libc::c_char; 128];
        if libc::ptsname_r(fd, name.as_mut_ptr(), name.len()) != 0 {
            return Err(std::io::Error::last_os_error().to_string());
        }
        let path = std::ffi::CStr::from_ptr(name.as_ptr())
            .to_string_lossy()
            .into_owned();
        Ok((owned, path))
    }
}

/// Hold a connection open until the task is aborted (no frontend reads it).
fn hold<T: Send + 'static>(conn: T) {
    tokio::spawn(async move {
        let _conn = conn;
        std::future::pending::<()>().await
    });
}

/// Create a backend from `ChardevBackend` (`{type, data}`): the device and the
/// `ChardevReturn`.
async fn open_backend(id: &str, backend: &Value) -> Result<(Chardev, Value), String> {
    let kind = backend
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let data = backend.get("data").cloned().unwrap_or(json!({}));
    let mut ret = Map::new();
    let (filename, backing) = match kind {
        "null" => ("null".to_string(), Backing::None),
        "ringbuf" | "memory" => {
            let size = data.get("size").and_then(Value::as_i64).unwrap_or(65536);
            if size <= 0 || (size & (size - 1)) != 0 {
                return Err("size of ringbuf chardev must be power of two".into());
            }
            (
                kind.to_string(),
                Backing::Ring(Ring {
                    buf: vec![0; size as usize],
                    prod: 0,
                    cons: 0,
                }),
            )
        }
        "file" => {
            let out = data.get("out").and_then(Value::as_str).unwrap_or_default();
            let append = data.get("append").and_then(Value::as_bool).unwrap_or(false);
            let f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .append(append)
                .truncate(!append)
                .open(out)
                .map_err(|e| format!("Could not open '{out}': {}", super::errno_text(&e)))?;
            ("file".to_string(), Backing::File(f))
        }
        "pty" => {
            let (fd, path) = open_pty()?;
            ret.insert("pty".into(), json!(path));
            (format!("pty:{path}"), Backing::Pty(fd))
        }
        "socket" => {
            let addr = data.get("addr").cloned().unwrap_or(json!({}));
            let atype = addr.get("type").and_then(Value::as_str).unwrap_or_default();
            let ad = addr.get("data").cloned().unwrap_or(json!({}));
            let server = data.get("server").and_then(Value::as_bool).unwrap_or(true);
            match (atype, server) {
                ("unix", true) => {
                    let path = ad.get("path").and_then(Value::as_str).unwrap_or_default();
                    let _ = std::fs::remove_file(path);
                    let l = tokio::net::UnixListener::bind(path).map_err(|e| {
                        format!("Failed to bind socket to {path}: {}", super::errno_text(&e))
                    })?;
                    let t = tokio::spawn(async move {
                        while let Ok((c, _)) = l.accept().await {
                            hold(c);
                        }
                    })
                    .abort_handle();
                    (
                        format!("disconnected:unix:{path},server=on"),
                        Backing::Task(t),
                    )
                }
                ("inet", true) => {
                    let host = ad.get("host").and_then(Value::as_str).unwrap_or("0.0.0.0");
                    let port = ad.get("port").and_then(Value::as_str).unwrap_or("0");
                    let l = tokio::net::TcpListener::bind(format!("{host}:{port}"))
                        .await
                        .map_err(|e| format!("Failed to bind socket: {}", super::errno_text(&e)))?;
                    let t = tokio::spawn(async move {
                        while let Ok((c, _)) = l.accept().await {
                            hold(c);
                        }
                    })
                    .abort_handle();
                    (
                        format!("disconnected:tcp:{host}:{port},server=on"),
                        Backing::Task(t),
                    )
                }
                ("unix", false) => {
                    let path = ad.get("path").and_then(Value::as_str).unwrap_or_default();
                    let s = tokio::net::UnixStream::connect(path).await.map_err(|e| {
                        format!("Failed to connect to '{path}': {}", super::errno_text(&e))
                    })?;
                    let t = tokio::spawn(async move {
                        let _hold = s;
                        std::future::pending::<()>().await
                    })
                    .abort_handle();
                    (format!("unix:{path}"), Backing::Task(t))
                }
                ("inet", false) => {
                    let host = ad.get("host").and_then(Value::as_str).unwrap_or_default();
                    let port = ad.get("port").and_then(Value::as_str).unwrap_or_default();
                    let s = tokio::net::TcpStream::connect(format!("{host}:{port}"))
                        .await
                        .map_err(|e| {
                            format!(
                                "Failed to connect to '{host}:{port}': {}",
                                super::errno_text(&e)
                            )
                        })?;
                    let t = tokio::spawn(async move {
                        let _hold = s;
                        std::future::pending::<()>().await
                    })
                    .abort_handle();
                    (format!("tcp:{host}:{port}"), Backing::Task(t))
                }
                (other, _) => {
                    return Err(format!(
                        "socket address type '{other}' is not supported by stratad"
                    ));
                }
            }
        }
        other => {
            return Err(format!(
                "chardev backend '{other}' is not supported by stratad"
            ));
        }
    };
    let _ = id;
    Ok((
        Chardev {
            kind: kind.to_string(),
            filename,
            monitor: false,
            backing,
        },
        Value::Object(ret),
    ))
}

pub async fn chardev_add(d: Arc<Daemon>, a: Args) -> Reply {
    let id = arg_str(&a, "id");
    if d.chardevs.lock().devs.contains_key(id) {
        return Err(generic(format!("Chardev with id '{id}' already exists")));
    }
    let backend = a.get("backend").cloned().unwrap_or(json!({}));
    let (c, ret) = open_backend(id, &backend)
        .await
        .map_err(|e| generic(format!("Failed to add chardev '{id}': {e}")))?;
    let mut reg = d.chardevs.lock();
    if reg.devs.contains_key(id) {
        return Err(generic(format!("Chardev with id '{id}' already exists")));
    }
    reg.insert(id, c);
    Ok(ret)
}

pub async fn chardev_change(d: Arc<Daemon>, a: Args) -> Reply {
    let id = arg_str(&a, "id");
    {
        let reg = d.chardevs.lock();
        let Some(c) = reg.devs.get(id) else {
            return Err(generic(format!("Chardev '{id}' does not exist")));
        };
        if c.monitor {
            return Err(generic("Chardev user does not support chardev hotswap"));
        }
    }
    let backend = a.get("backend").cloned().unwrap_or(json!({}));
    let (c, ret) = open_backend(id, &backend).await.map_err(generic)?;
    let mut reg = d.chardevs.lock();
    match reg.devs.get_mut(id) {
        Some(slot) => *slot = c,
        None => return Err(generic(format!("Chardev '{id}' does not exist"))),
    }
    Ok(ret)
}

pub async fn chardev_remove(d: Arc<Daemon>, a: Args) -> Reply {
    let id = arg_str(&a, "id");
    let mut reg = d.chardevs.lock();
    let Some(c) = reg.devs.get(id) else {
        return Err(generic(format!("Chardev '{id}' not found")));
    };
    if c.monitor {
        return Err(generic(format!("Chardev '{id}' is busy")));
    }
    reg.devs.remove(id);
    reg.history.push((id.to_string(), false));
    Ok(ok())
}

pub async fn chardev_send_break(d: Arc<Daemon>, a: Args) -> Reply {
    let id = arg_str(&a, "id");
    if !d.chardevs.lock().devs.contains_key(id) {
        return Err(generic(format!("Chardev '{id}' not found")));
    }
    // No frontend reacts to a break on these backends.
    Ok(ok())
}

pub async fn query_chardev(d: Arc<Daemon>, _a: Args) -> Reply {
    let reg = d.chardevs.lock();
    let mut ids = reg.ids();
    // QEMU prepends while walking the container.
    ids.reverse();
    let list: Vec<Value> = ids
        .iter()
        .filter_map(|id| {
            let c = reg.devs.get(id)?;
            Some(json!({"frontend-open": c.monitor, "filename": c.filename, "label": id}))
        })
        .collect();
    Ok(Value::Array(list))
}

pub async fn query_chardev_backends(_d: Arc<Daemon>, _a: Args) -> Reply {
    Ok(Value::Array(
        BACKENDS.iter().map(|n| json!({"name": n})).collect(),
    ))
}

/// QEMU's `qbase64_decode`: strict alphabet, then GLib's lenient decoder.
fn base64_decode(s: &str) -> Result<Vec<u8>, String> {
    const VALID: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=\n";
    if !s.chars().all(|c| VALID.contains(c)) {
        return Err("Base64 data contains invalid characters".into());
    }
    let mut out = Vec::new();
    let mut acc = 0u32;
    let mut bits = 0;
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => continue,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Ok(out)
}

fn base64_encode(data: &[u8]) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for ch in data.chunks(3) {
        let b = [ch[0], *ch.get(1).unwrap_or(&0), *ch.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= ch.len() {
                out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The ring of device `id`, or QEMU's errors.
fn with_ring<T>(d: &Daemon, id: &str, f: impl FnOnce(&mut Ring) -> T) -> Result<T, String> {
    let mut reg = d.chardevs.lock();
    let Some(c) = reg.devs.get_mut(id) else {
        return Err(format!("Device '{id}' not found"));
    };
    match &mut c.backing {
        Backing::Ring(r) => Ok(f(r)),
        _ => Err(format!("{id} is not a ringbuf device")),
    }
}

pub async fn ringbuf_write(d: Arc<Daemon>, a: Args) -> Reply {
    let id = arg_str(&a, "device");
    let data = arg_str(&a, "data");
    with_ring(&d, id, |_| ()).map_err(generic)?;
    let bytes = if opt_str(&a, "format") == Some("base64") {
        base64_decode(data).map_err(generic)?
    } else {
        data.as_bytes().to_vec()
    };
    with_ring(&d, id, |r| r.write(&bytes)).map_err(generic)?;
    Ok(ok())
}

pub async fn ringbuf_read(d: Arc<Daemon>, a: Args) -> Reply {
    let id = arg_str(&a, "device");
    let size = a.get("size").and_then(Value::as_i64).unwrap_or(0);
    with_ring(&d, id, |_| ()).map_err(generic)?;
    if size <= 0 {
        return Err(generic("size must be greater than zero"));
    }
    let bytes = with_ring(&d, id, |r| r.read(size as u64)).map_err(generic)?;
    Ok(json!(if opt_str(&a, "format") == Some("base64") {
        base64_encode(&bytes)
    } else {
        // QEMU hands the raw bytes to its JSON writer, which replaces invalid UTF-8.
        String::from_utf8_lossy(&bytes).into_owned()
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_keeps_the_newest_bytes() {
        let mut r = Ring {
            buf: vec![0; 16],
            prod: 0,
            cons: 0,
        };
        r.write(b"hello world 1234567890");
        assert_eq!(r.read(100), b"world 1234567890");
        r.write(b"hello");
        assert_eq!(r.read(3), b"hel");
    }

    #[test]
    fn base64_round_trip() {
        assert_eq!(base64_decode("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(base64_encode(b"hel"), "aGVs");
        assert_eq!(base64_encode(b"hello"), "aGVsbG8=");
        assert!(base64_decode("!!!").is_err());
    }
}
