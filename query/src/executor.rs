//! A dedicated runtime for query execution.
//!
//! DataFusion plans run CPU-bound for long stretches; on the runtime that also accepts
//! OTLP exports they would delay acknowledgements. Queries are spawned here instead, and
//! the network side only awaits their results.

use std::future::Future;
use std::sync::{Arc, Mutex};

use tokio::runtime::{Handle, Runtime};
use tokio::task::JoinHandle;

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

    /// Runs `fut` on the query runtime.
    pub fn spawn<F>(&self, fut: F) -> JoinHandle<F::Output>
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
