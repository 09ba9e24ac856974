//! Hostile images (`fuzz/corpus/qcow2_open`, made by `fuzz/make-seeds.sh`: QEMU's CVE classes
//! such as huge L1/refcount sizes, overlapping metadata, `json:` backing names and data-file
//! references): `strata info` and a full read (`strata compare F F`) of each must finish in
//! under 1 s with under 64 MiB peak RSS, and open no file the image was not entitled to name.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const TIME_LIMIT: Duration = Duration::from_secs(1);
const RSS_LIMIT_KIB: i64 = 64 << 10;

fn seeds() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/qcow2_open");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| std::fs::metadata(p).unwrap().len() <= 1 << 20)
        .collect();
    v.sort();
    assert!(v.len() >= 20, "{}", dir.display());
    v
}

/// Runs `strata ARGS` in `dir`; returns wall time and peak RSS (KiB) of that child alone.
// Reaped by `wait4` (for its rusage), not `Child::wait`.
#[allow(clippy::zombie_processes)]
fn measure(dir: &Path, args: &[&str]) -> (Duration, i64) {
    let t = Instant::now();
    let child = Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: `rusage` is plain old data; all-zero is a valid value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointers; the pid is our own child, not yet reaped.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
    assert_eq!(r, pid, "wait4");
    (t.elapsed(), ru.ru_maxrss)
}

/// The files `strata ARGS` (run in `dir`) opens, from `strace -f -e trace=open,openat`.
fn opened_files(dir: &Path, args: &[&str]) -> Vec<String> {
    let log = dir.join("strace.log");
    let st = Command::new("strace")
        .args(["-f", "-qq", "-e", "trace=open,openat,openat2,creat", "-o"])
        .arg(&log)
        .arg(env!("CARGO_BIN_EXE_strata"))
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("strace (installed by .ci/run) is needed to watch which files are opened");
    assert!(st.code().is_some(), "strace killed: {st:?}");
    let text = std::fs::read_to_string(&log).unwrap();
    std::fs::remove_file(&log).unwrap();
    assert!(!text.is_empty(), "strace recorded nothing (ptrace denied?)");
    text.lines()
        .filter(|l| !l.contains("ENOENT"))
        .filter_map(|l| l.split('"').nth(1).map(str::to_string))
        .collect()
}

/// Files the dynamic loader and the runtime open in every process.
fn is_system_file(p: &str) -> bool {
    [
        "/etc/ld.so",
        "/etc/localtime",
        "/usr/share/zoneinfo/",
        "/lib",
        "/usr/lib",
        "/proc/self/",
        "/sys/",
    ]
    .iter()
    .any(|s| p.starts_with(s))
}

/// The local files an image's backing/data-file name designates, as qemu-img reads it: the
/// name itself, or every `filename` of a `json:{...}` spec (QEMU honours these too). URIs
/// (`nbd://...`) designate no local file.
fn named_files(n: &str) -> Vec<String> {
    fn filenames(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, x) in m {
                    match x {
                        serde_json::Value::String(s) if k == "filename" => out.push(s.clone()),
                        _ => filenames(x, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|x| filenames(x, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    if let Some(json) = n.strip_prefix("json:") {
        if let Ok(v) = serde_json::from_str(json) {
            filenames(&v, &mut out);
        }
    } else if !n.contains("://") {
        out.push(n.to_string());
    }
    out
}

#[test]
fn hostile_images_bounded_time_memory_and_files() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    for seed in seeds() {
        std::fs::copy(&seed, dir.join(seed.file_name().unwrap())).unwrap();
    }
    let mut failures = Vec::new();
    for seed in seeds() {
        let name = seed.file_name().unwrap().to_str().unwrap().to_string();
        let header = std::fs::read(&seed)
            .ok()
            .and_then(|d| strata_qcow2::Header::parse(&d).ok());
        let backing = header.as_ref().and_then(|h| h.backing_file.clone());
        let data_file = header.as_ref().and_then(|h| h.data_file.clone());
        for (what, args) in [
            ("info", vec!["info", name.as_str()]),
            ("compare", vec!["compare", name.as_str(), name.as_str()]),
        ] {
            let (t, rss) = measure(dir, &args);
            eprintln!("{name} {what}: {t:?} {rss} KiB");
            if t >= TIME_LIMIT || rss >= RSS_LIMIT_KIB {
                failures.push(format!("{name} {what}: {t:?}, {rss} KiB"));
            }
            for f in opened_files(dir, &args) {
                let in_dir = !f.starts_with('/') || Path::new(&f).starts_with(dir);
                // A full read follows the backing/data-file names as qemu-img does;
                // `info` opens the data file too (qemu-img 10 does not: see RELIABILITY.md).
                let named = [&backing, &data_file]
                    .into_iter()
                    .flatten()
                    .any(|n| named_files(n).contains(&f));
                if !(in_dir && !f.contains("..") || is_system_file(&f) || named) {
                    failures.push(format!("{name} {what}: opened {f}"));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
