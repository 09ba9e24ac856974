//! qemu-storage-daemon's command line: two passes (help/version/daemonize/pidfile first,
//! then every other option in order, each turned into the QMP operation it stands for), the
//! startup error format, the pid file and `--daemonize`.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::Arc;

use serde_json::Value;
use strata_qmp::keyval::{self, OptionArg};
use strata_qmp::{MonitorOptions, Schema, VersionInfo};

use crate::commands::DaemonDispatcher;
use crate::daemon::Daemon;
use crate::monitor::{self, Chardev};

/// What the command line asks for.
#[derive(Debug)]
pub struct Plan {
    /// Fork into the background once started.
    pub daemonize: bool,
    /// Where to write our pid.
    pub pidfile: Option<String>,
    /// Everything else, in order: (option, argument).
    pub steps: Vec<(String, String)>,
}

/// The result of parsing.
#[derive(Debug)]
pub enum Parsed {
    /// Print this and exit with this code (`-h`, `-V`).
    Exit(u8, String),
    /// Start.
    Run(Plan),
}

/// Strata's version, reported where QEMU reports its own.
/// The QEMU release whose qemu-storage-daemon interface stratad implements: what
/// `query-version` and the QMP greeting report, so clients that gate features on the QEMU
/// version treat stratad as that daemon. `package` names Strata and its own version.
const COMPATIBLE_QEMU: (u64, u64, u64) = (10, 0, 2);

pub fn version() -> VersionInfo {
    let (major, minor, micro) = COMPATIBLE_QEMU;
    VersionInfo {
        major,
        minor,
        micro,
        package: format!("Strata {}", env!("CARGO_PKG_VERSION")),
    }
}

const HELP: &str = "Usage: stratad [options]
Strata storage daemon: a drop-in replacement for qemu-storage-daemon

  -h, --help             display this help and exit
  -T, --trace [[enable=]<pattern>][,events=<file>][,file=<file>]
                         specify tracing options
  -V, --version          output version information and exit

  --blockdev [driver=]<driver>[,node-name=<N>][,discard=ignore|unmap]
             [,cache.direct=on|off][,cache.no-flush=on|off]
             [,read-only=on|off][,auto-read-only=on|off]
             [,force-share=on|off][,detect-zeroes=on|off|unmap]
             [,<driver options>]
                         configure a block backend

  --chardev <options>    configure a character device backend
                         (socket,id=<id>,path=<path>|host=<h>,port=<p>,server=on,wait=off)

  --daemonize            daemonize the process, and have the parent exit
                         once startup is complete

  --export [type=]nbd,id=<id>,node-name=<node-name>[,name=<export-name>]
           [,writable=on|off][,bitmap=<name>]
                         export the specified block node over NBD
                         (requires --nbd-server)

  --metrics <host>:<port>
                         serve Prometheus metrics on GET /metrics (Strata)

  --monitor [chardev=]name[,mode=control][,pretty[=on|off]]
                         configure a QMP monitor

  --nbd-server addr.type=inet,addr.host=<host>,addr.port=<port>
               [,tls-creds=<id>][,tls-authz=<id>][,max-connections=<n>]
  --nbd-server addr.type=unix,addr.path=<path>
               [,tls-creds=<id>][,tls-authz=<id>][,max-connections=<n>]
                         start an NBD server for exporting block nodes

  --object help          list object types that can be added
  --object <type>,help   list properties for the given object type
  --object <type>[,<property>=<value>...]
                         create a new object of type <type>, setting
                         properties in the order they are specified.

  --pidfile <path>       write process ID to a file after startup
";

/// qsd's long options (getopt_long: a unique prefix is accepted), and whether each takes
/// an argument.
const LONG: &[(&str, bool)] = &[
    ("blockdev", true),
    ("chardev", true),
    ("daemonize", false),
    ("export", true),
    ("help", false),
    ("metrics", true),
    ("monitor", true),
    ("nbd-server", true),
    ("object", true),
    ("pidfile", true),
    ("trace", true),
    ("version", false),
];

/// Strata's own long options: accepted only when spelt out, so every abbreviation keeps
/// meaning what it means to qemu-storage-daemon (`--m` is still `--monitor`).
const STRATA_ONLY: &[&str] = &["metrics"];

/// A pass-1 error: a getopt message (`unrecognized option '--x'`), printed after `argv[0]`
/// as given (getopt's format, not QEMU's).
#[derive(Debug, PartialEq, Eq)]
pub struct CliError(pub String);

/// Pass 1: split the command line into options (getopt_long with optstring `-hT:V`), handle
/// `-h`/`-V`, reject what getopt rejects. Positional arguments are errors of pass 2, in
/// order with the options.
pub fn parse(args: &[String]) -> Result<Parsed, CliError> {
    let mut plan = Plan {
        daemonize: false,
        pidfile: None,
        steps: Vec::new(),
    };
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        i += 1;
        let (long, inline): (String, Option<String>) = if let Some(rest) = a.strip_prefix("--")
            && !rest.is_empty()
        {
            let (name, inline) = match rest.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (rest, None),
            };
            let exact = LONG.iter().find(|(n, _)| *n == name);
            let cands: Vec<&(&str, bool)> = LONG
                .iter()
                .filter(|(n, _)| n.starts_with(name) && !STRATA_ONLY.contains(n))
                .collect();
            let Some(&(full, has_arg)) = exact.or(if cands.len() == 1 {
                Some(cands[0])
            } else {
                None
            }) else {
                if cands.len() > 1 {
                    let list: Vec<String> =
                        cands.iter().map(|(n, _)| format!(" '--{n}'")).collect();
                    return Err(CliError(format!(
                        "option '--{name}' is ambiguous; possibilities:{}",
                        list.concat()
                    )));
                }
                return Err(CliError(format!("unrecognized option '--{name}'")));
            };
            if !has_arg && inline.is_some() {
                return Err(CliError(format!(
                    "option '--{full}' doesn't allow an argument"
                )));
            }
            (format!("--{full}"), inline)
        } else if let Some(rest) = a.strip_prefix('-')
            && !rest.is_empty()
            && a != "--"
        {
            // A cluster of short options; `-T` takes the rest or the next argument.
            // Every short option but -T ends parsing of the cluster at once (getopt).
            let found = match rest.char_indices().next() {
                Some((_, 'h')) => return Ok(Parsed::Exit(0, HELP.to_string())),
                Some((_, 'V')) => return Ok(Parsed::Exit(0, version_text())),
                Some((pos, 'T')) => {
                    let tail = &rest[pos + 1..];
                    Some((
                        "-T".to_string(),
                        (!tail.is_empty()).then(|| tail.to_string()),
                    ))
                }
                Some((_, other)) => {
                    return Err(CliError(format!("invalid option -- '{other}'")));
                }
                None => None,
            };
            match found {
                Some(f) => f,
                None => continue,
            }
        } else {
            plan.steps.push((String::new(), a.clone()));
            continue;
        };
        match long.as_str() {
            "--help" => return Ok(Parsed::Exit(0, HELP.to_string())),
            "--version" => return Ok(Parsed::Exit(0, version_text())),
            "--daemonize" => plan.daemonize = true,
            o => {
                let val = match inline {
                    Some(v) => v,
                    None => {
                        let Some(v) = args.get(i) else {
                            return Err(CliError(if o == "-T" {
                                "option requires an argument -- 'T'".into()
                            } else {
                                format!("option '{o}' requires an argument")
                            }));
                        };
                        i += 1;
                        v.clone()
                    }
                };
                if o == "--pidfile" {
                    plan.pidfile = Some(val);
                } else if o != "--trace" && o != "-T" {
                    plan.steps.push((o.to_string(), val));
                }
            }
        }
    }
    Ok(Parsed::Run(plan))
}

fn version_text() -> String {
    let v = env!("CARGO_PKG_VERSION");
    let (major, minor, micro) = COMPATIBLE_QEMU;
    format!(
        "stratad version {v} (Strata; qemu-storage-daemon {major}.{minor}.{micro} compatible)\n"
    )
}

/// Fork: the parent waits for the child's startup verdict and returns its exit code; the
/// child returns `None` and reports with [`report_ready`].
pub fn daemonize() -> Result<Option<u8>, String> {
    let mut fds = [0i32; 2];
    // SAFETY: pipe(2) fills two descriptors we then own.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        return Err("cannot create a pipe".into());
    }
    // SAFETY: no other thread exists yet (the runtime is built after this).
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err("cannot fork".into());
    }
    // SAFETY: the descriptors came from pipe(2) above and are closed exactly once.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    if pid > 0 {
        drop(w);
        let mut f = std::fs::File::from(r);
        let mut b = [1u8; 1];
        return Ok(Some(match f.read(&mut b) {
            Ok(1) => b[0],
            _ => 1,
        }));
    }
    drop(r);
    // SAFETY: setsid(2) in the child, which is not a process group leader.
    unsafe { libc::setsid() };
    READY_FD.with(|c| *c.borrow_mut() = Some(w));
    Ok(None)
}

thread_local! {
    static READY_FD: std::cell::RefCell<Option<OwnedFd>> = const { std::cell::RefCell::new(None) };
}

/// Tell a waiting parent how startup went; detach stdio on success.
fn report_ready(fd: Option<OwnedFd>, code: u8) {
    if let Some(fd) = fd {
        let mut f = std::fs::File::from(fd);
        let _ = f.write_all(&[code]);
        if code == 0 {
            // SAFETY: open(2)/dup2(2) on /dev/null; standard descriptors are ours to replace.
            unsafe {
                let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
                if null >= 0 {
                    libc::dup2(null, 0);
                    libc::dup2(null, 1);
                    libc::dup2(null, 2);
                    libc::close(null);
                }
            }
        }
    }
}

/// Pass 2 and the daemon's life: run every option in order, write the pid file, serve until
/// `quit` or a signal, shut down in order. Returns the exit code.
pub async fn run(plan: Plan, daemonized: bool) -> u8 {
    let ready = if daemonized {
        READY_FD.with(|c| c.borrow_mut().take())
    } else {
        None
    };
    let d = Daemon::new();
    let mut chardevs: HashMap<String, Chardev> = HashMap::new();
    for (opt, arg) in &plan.steps {
        if let Err(e) = step(&d, &mut chardevs, opt, arg).await {
            if opt.is_empty() {
                eprintln!("stratad: {arg}: {e}");
            } else {
                eprintln!("stratad: {opt} {arg}: {e}");
            }
            report_ready(ready, 1);
            d.shut_down().await;
            return 1;
        }
    }
    d.started.cancel();
    if let Some(p) = &plan.pidfile
        && let Err(e) = std::fs::write(p, format!("{}\n", std::process::id()))
    {
        eprintln!("stratad: cannot create PID file: {e}");
        report_ready(ready, 1);
        d.shut_down().await;
        return 1;
    }
    report_ready(ready, 0);
    wait_for_shutdown(&d).await;
    d.shut_down().await;
    if let Some(p) = &plan.pidfile {
        let _ = std::fs::remove_file(p);
    }
    0
}

async fn wait_for_shutdown(d: &Arc<Daemon>) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        d.shutdown.cancelled().await;
        return;
    };
    tokio::select! {
        _ = d.shutdown.cancelled() => {}
        _ = term.recv() => {}
        _ = int.recv() => {}
        _ = hup.recv() => {}
    }
}

/// A keyval or JSON option argument converted to the arguments of `command`.
fn option_args(
    command: &str,
    arg: &str,
    implied: Option<&str>,
) -> Result<serde_json::Map<String, Value>, String> {
    let schema = Schema::qsd();
    let v = match keyval::parse_option_arg(arg, implied)? {
        OptionArg::Json(m) => schema
            .validate_command_args(command, &m)
            .map_err(|e| e.desc)?,
        OptionArg::Keyval(tree) => schema
            .convert_keyval_command_args(command, &tree)
            .map_err(|e| e.desc)?,
    };
    match v {
        Value::Object(m) => Ok(m),
        _ => Ok(serde_json::Map::new()),
    }
}

/// Run one option.
async fn step(
    d: &Arc<Daemon>,
    chardevs: &mut HashMap<String, Chardev>,
    opt: &str,
    arg: &str,
) -> Result<(), String> {
    match opt {
        "" => return Err("Unexpected argument".into()),
        "--blockdev" => {
            let a = option_args("blockdev-add", arg, Some("driver"))?;
            let objects = d.graph_objects();
            let mut g = d.env.graph.lock().await;
            strata_graph::blockdev::blockdev_add(&mut g, &objects, &a).await?;
        }
        "--metrics" => crate::metrics::start(d, arg).await?,
        "--object" => {
            let a = option_args("object-add", arg, Some("qom-type"))?;
            crate::commands::objects::add(d, &a).map_err(|e| e.desc)?;
        }
        "--nbd-server" => {
            let mut a = option_args_nbd(arg)?;
            if let Some(addr) = a.remove("addr") {
                a.insert("addr".into(), addr);
            }
            crate::exports::start_server(d, &a).await?;
        }
        "--export" => {
            let mut a = option_args("block-export-add", arg, Some("type"))?;
            // qsd's --export spells a single bitmap `bitmap=`.
            if let Some(b) = a.remove("bitmap") {
                a.insert("bitmaps".into(), Value::Array(vec![b]));
            }
            crate::exports::add_export(d, &a).await?;
        }
        "--chardev" => {
            let c = keyval::parse_chardev(arg)?;
            let id = c.id.clone().ok_or("chardev: no id specified")?;
            if chardevs.contains_key(&id) {
                return Err(format!(
                    "attempt to add duplicate property '{id}' to object (type 'container')"
                ));
            }
            if d.chardevs.lock().qom_type(&id).is_some() {
                return Err(format!(
                    "attempt to add duplicate property '{id}' to object (type 'container')"
                ));
            }
            chardevs.insert(id, monitor::open_chardev(&c).await?);
            crate::commands::chardev::register_cli(d, &c);
        }
        "--monitor" => {
            let tree = keyval::parse(arg, Some("chardev"))?;
            let get = |k: &str| tree.get(k).and_then(Value::as_str).map(str::to_string);
            if get("mode").is_some_and(|m| m != "control") {
                return Err("Only QMP is supported".into());
            }
            let name = get("chardev").ok_or("Parameter 'chardev' is missing")?;
            let pretty = matches!(get("pretty").as_deref(), Some("on" | "yes" | "true"));
            let Some(c) = chardevs.remove(&name) else {
                return Err(format!("chardev \"{name}\" not found"));
            };
            crate::commands::chardev::mark_monitor(d, &name);
            let opts = MonitorOptions {
                pretty,
                oob: c.oob_capable(),
                version: version(),
            };
            // Like qsd, monitors answer only once every option has been processed, so a
            // client never sees a half-built graph.
            let d2 = d.clone();
            tokio::spawn(async move {
                d2.started.cancelled().await;
                monitor::spawn_monitor(
                    c,
                    Arc::new(DaemonDispatcher(d2.clone())),
                    d2.events.clone(),
                    opts,
                );
            });
        }
        other => return Err(format!("unrecognized option '{other}'")),
    }
    Ok(())
}

/// `--nbd-server` takes the flat `SocketAddress` (`addr.type=unix,addr.path=...`).
fn option_args_nbd(arg: &str) -> Result<serde_json::Map<String, Value>, String> {
    let v = match keyval::parse_option_arg(arg, None)? {
        OptionArg::Json(m) => Value::Object(m),
        OptionArg::Keyval(tree) => tree,
    };
    let Value::Object(mut m) = v else {
        return Err("Invalid --nbd-server argument".into());
    };
    for k in ["max-connections", "handshake-max-seconds"] {
        if let Some(Value::String(s)) = m.get(k) {
            let n: u64 = s
                .parse()
                .map_err(|_| format!("Parameter '{k}' expects uint32"))?;
            m.insert(k.into(), Value::from(n));
        }
    }
    if !m.contains_key("addr") {
        return Err("Parameter 'addr' is missing".into());
    }
    Ok(m)
}
