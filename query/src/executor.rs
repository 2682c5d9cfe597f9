//! A dedicated runtime for query execution, as InfluxDB IOx's `DedicatedExecutor`.
//!
//! DataFusion plans and the analysis (pairing, percentiles, summaries) run CPU-bound for
//! long stretches; on the runtime that also accepts OTLP exports they would delay
//! acknowledgements. They are spawned here instead, and the network side only awaits a
//! [`Job`]. A job is cancelled when its awaiting side drops it (an HTTP client that went
//! away drops its handler's future): the task stops at its next await point, which
//! DataFusion's streams reach every batch.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::runtime::{Handle, Runtime};
use tokio::task::{JoinError, JoinHandle};

/// A task on the query runtime; dropping it cancels the task.
#[derive(Debug)]
#[must_use = "a job is cancelled when dropped"]
pub struct Job<T> {
    handle: JoinHandle<T>,
}

impl<T> Future for Job<T> {
    type Output = Result<T, JoinError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.handle).poll(cx)
    }
}

impl<T> Drop for Job<T> {
    fn drop(&mut self) {
        // A no-op when the task has finished.
        self.handle.abort();
    }
}

/// Owns the query runtime; cheap to clone.
#[derive(Clone, Debug)]
pub struct Executor {
    handle: Handle,
    runtime: Arc<Mutex<Option<Runtime>>>,
}

impl Executor {
    /// Starts a runtime with `threads` worker threads named `datafusion-*`.
    pub fn new(threads: usize) -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads.max(1))
            .thread_name("datafusion")
            .enable_all()
            .build()?;
        Ok(Executor {
            handle: runtime.handle().clone(),
            runtime: Arc::new(Mutex::new(Some(runtime))),
        })
    }

    /// Runs `fut` on the query runtime, until it finishes or the [`Job`] is dropped.
    pub fn spawn<F>(&self, fut: F) -> Job<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        Job {
            handle: self.handle.spawn(fut),
        }
    }

    /// Runs CPU-bound `f` on the query runtime (a summary, a rendering), off the I/O
    /// threads.
    pub fn compute<F, T>(&self, f: F) -> Job<T>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        self.spawn(async move { f() })
    }

    /// Runs `fut` on the query runtime for as long as it takes, whoever waits for it
    /// (the Postgres listener, background work that owns its own shutdown).
    pub fn spawn_detached<F>(&self, fut: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handle.spawn(fut)
    }

    /// Stops the runtime without waiting for running queries.
    pub fn shutdown(&self) {
        if let Some(rt) = self
            .runtime
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            rt.shutdown_background();
        }
    }
}

impl Drop for Executor {
    fn drop(&mut self) {
        // Only the last clone stops the runtime (dropping a runtime inside another would panic).
        if Arc::strong_count(&self.runtime) == 1 {
            self.shutdown();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    /// Sets its flag when dropped: a task's future is dropped when the task ends.
    struct Flag(Arc<AtomicBool>);
    impl Drop for Flag {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn a_dropped_job_stops_its_task() {
        let exec = Executor::new(1).unwrap();
        let dropped = Arc::new(AtomicBool::new(false));
        let flag = Flag(Arc::clone(&dropped));
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        let job = exec.spawn(async move {
            let _flag = flag;
            let _ = started_tx.send(());
            // Would run for an hour: yields, as a DataFusion stream does between batches.
            loop {
                tokio::task::yield_now().await;
            }
        });
        started_rx.await.unwrap();
        drop(job);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !dropped.load(Ordering::SeqCst) {
            assert!(
                std::time::Instant::now() < deadline,
                "the task kept running"
            );
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn a_job_returns_its_value() {
        let exec = Executor::new(1).unwrap();
        assert_eq!(exec.compute(|| 6 * 7).await.unwrap(), 42);
    }
}
