//! Running tools: checked runs, presence checks, children killed on drop.

use std::path::Path;
use std::process::{Child, Command, Output};
use std::time::Duration;

/// Whether `bin` is installed; prints a skip message if not.
pub fn have(bin: &str) -> bool {
    let ok = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {bin}"))
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("SKIP: {bin} is not installed");
    }
    ok
}

/// Run `cmd args`; panics with its output unless it succeeds.
pub fn run(cmd: &str, args: &[&str]) -> Output {
    checked(cmd, args, Command::new(cmd).args(args))
}

/// [`run`] in the directory `dir`.
pub fn run_in(dir: &Path, cmd: &str, args: &[&str]) -> Output {
    checked(cmd, args, Command::new(cmd).current_dir(dir).args(args))
}

fn checked(cmd: &str, args: &[&str], c: &mut Command) -> Output {
    let out = c
        .output()
        .unwrap_or_else(|e| panic!("{cmd} does not run: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A child process that gets SIGTERM (so it closes its images cleanly) and is reaped when
/// dropped.
#[derive(Debug)]
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // SAFETY: signalling our own child process.
        unsafe {
            libc::kill(self.0.id() as libc::pid_t, libc::SIGTERM);
        }
        let _ = self.0.wait();
    }
}

/// Wait up to `tries` × 25 ms for `path` to appear; whether it did.
pub fn wait_for_path(path: &Path, tries: u32) -> bool {
    for _ in 0..tries {
        if path.exists() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    path.exists()
}

/// [`run`]; its stdout as text.
pub fn run_stdout(cmd: &str, args: &[&str]) -> String {
    String::from_utf8_lossy(&run(cmd, args).stdout).into_owned()
}
