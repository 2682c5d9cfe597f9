//! Admission: a bound on exports in progress, shared by the gRPC and HTTP receivers.
//!
//! Under overload the costly part of an export is before storage: reading, decompressing,
//! decoding and converting its body. Without a bound every export is taken and all of them
//! get slow together (answers tens of seconds late on a saturated machine). With it, an
//! export beyond the bound is answered at once, retryably (`UNAVAILABLE`, or 503 with
//! `Retry-After`), before its body is read, and those admitted finish promptly.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The places for exports in progress; cheap to clone (clones share them).
#[derive(Debug, Clone)]
pub struct Admission {
    places: Arc<Semaphore>,
    max: usize,
    shed: Arc<AtomicU64>,
}

impl Admission {
    pub fn new(max: usize) -> Admission {
        let max = max.max(1);
        Admission {
            places: Arc::new(Semaphore::new(max)),
            max,
            shed: Arc::default(),
        }
    }

    /// A place, or `None` (counted) when every place is taken.
    pub fn try_admit(&self) -> Option<OwnedSemaphorePermit> {
        let permit = Arc::clone(&self.places).try_acquire_owned().ok();
        if permit.is_none() {
            self.shed.fetch_add(1, Ordering::Relaxed);
        }
        permit
    }

    /// Exports refused because every place was taken.
    pub fn shed(&self) -> u64 {
        self.shed.load(Ordering::Relaxed)
    }

    /// The refusal's text.
    pub fn message(&self) -> String {
        format!(
            "{} exports are in progress (--max-inflight-exports): retry later",
            self.max
        )
    }
}

/// The gRPC side: a tower layer answering `UNAVAILABLE` when no place is free.
#[derive(Debug, Clone)]
pub struct AdmissionLayer(pub Admission);

impl<S> tower::Layer<S> for AdmissionLayer {
    type Service = Admit<S>;

    fn layer(&self, inner: S) -> Admit<S> {
        Admit {
            inner,
            admission: self.0.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Admit<S> {
    inner: S,
    admission: Admission,
}

impl<S, Req, B> tower::Service<http::Request<Req>> for Admit<S>
where
    S: tower::Service<http::Request<Req>, Response = http::Response<B>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Default + Send + 'static,
{
    type Response = http::Response<B>;
    type Error = S::Error;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Req>) -> Self::Future {
        match self.admission.try_admit() {
            Some(place) => {
                let fut = self.inner.call(req);
                Box::pin(async move {
                    let answer = fut.await;
                    drop(place);
                    answer
                })
            }
            None => {
                let refusal = tonic::Status::unavailable(self.admission.message()).into_http();
                Box::pin(std::future::ready(Ok(refusal)))
            }
        }
    }
}
