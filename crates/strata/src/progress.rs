//! `-p` progress, as QEMU's `qemu-progress.c`: a percentage that advances in steps of at least
//! `min_skip`. On a terminal it is an indicatif bar; otherwise qemu-img's own
//! `"    (NN.NN/100%)\r"` records on stdout, closed by a newline.

use std::io::{IsTerminal, Write};
use std::sync::Mutex;

use indicatif::{ProgressBar, ProgressStyle};

/// A progress reporter; disabled ones do nothing.
#[derive(Debug)]
pub struct Progress {
    inner: Option<Mutex<State>>,
}

#[derive(Debug)]
struct State {
    current: f32,
    last_print: f32,
    min_skip: f32,
    bar: Option<ProgressBar>,
}

impl Progress {
    /// QEMU's `qemu_progress_init(enabled, min_skip)`.
    pub fn new(enabled: bool, min_skip: f32) -> Progress {
        Self::with_terminal(enabled, min_skip, std::io::stdout().is_terminal())
    }

    /// Like [`Progress::new`], choosing the bar or the plain records explicitly.
    pub fn with_terminal(enabled: bool, min_skip: f32, terminal: bool) -> Progress {
        if !enabled {
            return Progress { inner: None };
        }
        let bar = terminal.then(|| {
            let bar = ProgressBar::new(10_000);
            if let Ok(style) =
                ProgressStyle::with_template("{wide_bar} {percent:>3}% {elapsed_precise} ETA {eta}")
            {
                bar.set_style(style);
            }
            bar
        });
        Progress {
            inner: Some(Mutex::new(State {
                current: 0.0,
                last_print: 0.0,
                min_skip,
                bar,
            })),
        }
    }

    /// QEMU's `qemu_progress_print(delta, max)`: with `max == 0`, `delta` is the new absolute
    /// percentage; otherwise the percentage grows by `delta / 100 * max`.
    pub fn print(&self, delta: f32, max: i32) {
        let Some(inner) = &self.inner else { return };
        let mut s = inner.lock().unwrap_or_else(|e| e.into_inner());
        let mut current = if max == 0 {
            delta
        } else {
            s.current + delta / 100.0 * max as f32
        };
        current = current.clamp(0.0, 100.0);
        s.current = current;
        if current > s.last_print + s.min_skip
            || current < s.last_print - s.min_skip
            || current == 0.0
            || current == 100.0
        {
            s.last_print = current;
            match &s.bar {
                Some(bar) => bar.set_position((current * 100.0) as u64),
                None => {
                    let mut out = std::io::stdout().lock();
                    let _ = write!(out, "{}", record(current));
                    let _ = out.flush();
                }
            }
        }
    }

    /// Set the absolute percentage from a done/total pair.
    pub fn set_fraction(&self, done: u64, total: u64) {
        let pct = if total == 0 {
            100.0
        } else {
            (done as f64 * 100.0 / total as f64) as f32
        };
        self.print(pct, 0);
    }

    /// QEMU's `qemu_progress_end`.
    pub fn end(&self) {
        let Some(inner) = &self.inner else { return };
        let s = inner.lock().unwrap_or_else(|e| e.into_inner());
        match &s.bar {
            Some(bar) => bar.finish(),
            None => println!(),
        }
    }
}

/// One plain progress record, exactly as qemu-img prints it.
pub fn record(pct: f32) -> String {
    format!("    ({pct:3.2}/100%)\r")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_like_qemu() {
        assert_eq!(record(0.0), "    (0.00/100%)\r");
        assert_eq!(record(6.25), "    (6.25/100%)\r");
        assert_eq!(record(100.0), "    (100.00/100%)\r");
    }
}
