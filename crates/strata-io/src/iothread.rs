//! I/O threads: permanent threads, each running a single-threaded tokio runtime with an
//! io_uring ring of its own (QEMU's iothreads).
//!
//! Work placed on one — an NBD connection — reads its socket, submits its file I/O, reaps
//! the completions and writes its replies on that one thread: no request is handed between
//! threads, which on a multi-threaded runtime with a completion thread cost two or three
//! wake-ups per request. Several connections spread over the threads round-robin.
//!
//! The threads live as long as the process, so a task spawned from work running on one
//! (a copy-before-write copy, a throttled request) is never cut short by a runtime going
//! away. `STRATA_IOTHREADS=0` turns them off (work then runs where it is spawned);
//! `STRATA_IOTHREADS=N` sets their number (default: the CPUs available, at most 8).

use std::future::Future;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::runtime::Handle;

/// Most threads started by default.
const MAX_DEFAULT: usize = 8;

/// The pool.
#[derive(Debug)]
pub struct IoThreads {
    handles: Vec<Handle>,
    next: AtomicUsize,
}

static GLOBAL: OnceLock<Option<IoThreads>> = OnceLock::new();

/// The process's I/O threads, started on first use; `None` when turned off or when no
/// thread could be started.
pub fn global() -> Option<&'static IoThreads> {
    GLOBAL
        .get_or_init(|| IoThreads::start(configured_count()))
        .as_ref()
}

fn configured_count() -> usize {
    match std::env::var("STRATA_IOTHREADS") {
        Ok(v) => v.trim().parse().unwrap_or(0),
        Err(_) => std::thread::available_parallelism()
            .map_or(1, usize::from)
            .min(MAX_DEFAULT),
    }
}

impl IoThreads {
    fn start(count: usize) -> Option<IoThreads> {
        let handles: Vec<Handle> = (0..count).filter_map(|i| start_thread(i).ok()).collect();
        (!handles.is_empty()).then(|| IoThreads {
            handles,
            next: AtomicUsize::new(0),
        })
    }

    /// The runtime of the next thread, round-robin.
    pub fn next_handle(&self) -> &Handle {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        &self.handles[i]
    }

    /// Number of threads.
    pub fn len(&self) -> usize {
        self.handles.len()
    }

    /// Always false: a pool is only made with at least one thread.
    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// Runs `fut` on the next thread.
    pub fn spawn<F>(&self, fut: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.next_handle().spawn(fut)
    }
}

fn start_thread(i: usize) -> std::io::Result<Handle> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let handle = rt.handle().clone();
    std::thread::Builder::new()
        .name(format!("strata-io{i}"))
        .spawn(move || {
            rt.block_on(async {
                // Without a ring of its own the thread still works, on the shared ring.
                let _ = crate::engine::uring::init_local();
                std::future::pending::<()>().await
            })
        })?;
    Ok(handle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_runs_on_the_io_threads_round_robin() {
        let pool = IoThreads::start(2).expect("threads start");
        let rt = tokio::runtime::Runtime::new().unwrap();
        let names: Vec<String> = rt.block_on(async {
            let mut names = Vec::new();
            for _ in 0..4 {
                let h = pool.spawn(async {
                    std::thread::current()
                        .name()
                        .unwrap_or_default()
                        .to_string()
                });
                names.push(h.await.unwrap());
            }
            names
        });
        assert_eq!(
            names,
            ["strata-io0", "strata-io1", "strata-io0", "strata-io1"]
        );
    }
}
