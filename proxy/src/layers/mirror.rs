//! Traffic mirroring: a share of a route's requests is copied to a shadow version of the
//! destination, fire-and-forget. The caller gets the primary's answer and never waits for
//! the shadow's; a copy is made only of a body whose length is known and within the
//! bound (an empty body always). Both CLIENT spans say `meshscope.mirror` (`primary`,
//! `shadow`) and the hash of their response bodies (`meshscope.body_hash`), so the
//! analysis can compare them; the copy carries `x-meshscope-mirror: 1`, which the shadow's
//! own proxy marks on its SERVER span.

use std::sync::Arc;

use http::{HeaderValue, Request};
use http_body_util::BodyExt;
use tower::{Layer, Service};

use super::split::Split;
use super::{Body, BoxFuture, HttpService, full};

/// The header a mirrored copy carries.
pub const MIRROR_HEADER: &str = "x-meshscope-mirror";

/// Request extension set by the router: where and how much to mirror.
#[derive(Debug)]
pub struct MirrorPolicy {
    pub split: Arc<Split>,
    pub percent: f64,
    pub max_body_bytes: u64,
}

/// Request extension read by the trace layer: which side of a mirrored pair this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MirrorMark {
    Primary,
    Shadow,
}

impl MirrorMark {
    pub fn as_str(self) -> &'static str {
        match self {
            MirrorMark::Primary => "primary",
            MirrorMark::Shadow => "shadow",
        }
    }
}

/// Wraps the outbound stack; `shadow` sends the copies (its own trace, split and forward).
#[derive(Clone)]
pub struct MirrorLayer<T> {
    shadow: T,
}

impl<T> MirrorLayer<T> {
    pub fn new(shadow: T) -> MirrorLayer<T> {
        MirrorLayer { shadow }
    }
}

impl<S, T: Clone> Layer<S> for MirrorLayer<T> {
    type Service = MirrorService<S, T>;
    fn layer(&self, inner: S) -> Self::Service {
        MirrorService {
            inner,
            shadow: self.shadow.clone(),
        }
    }
}

#[derive(Clone)]
pub struct MirrorService<S, T> {
    inner: S,
    shadow: T,
}

/// The whole body when it is at most `max` bytes long; `None` when it is longer or breaks.
async fn read_at_most(mut body: Body, max: u64) -> Option<bytes::Bytes> {
    let mut out = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.ok()?.into_data() {
            if out.len() as u64 + data.len() as u64 > max {
                return None;
            }
            out.extend_from_slice(&data);
        }
    }
    Some(out.freeze())
}

/// The body's length when it can be copied within `max`: known, and at most `max`.
fn copyable(req: &Request<Body>, max: u64) -> Option<u64> {
    use http_body::Body as _;
    let hint = req.body().size_hint();
    match hint.exact() {
        Some(n) if n <= max => Some(n),
        _ => req
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
            .filter(|n| *n <= max),
    }
}

impl<S: HttpService, T: HttpService + Sync> Service<Request<Body>> for MirrorService<S, T> {
    crate::layers::http_service_head!();

    fn call(&mut self, req: Request<Body>) -> BoxFuture {
        let Some(policy) = req.extensions().get::<Arc<MirrorPolicy>>().cloned() else {
            return self.inner.call(req);
        };
        let roll = policy.percent > 0.0 && rand::random_range(0.0..100.0) < policy.percent;
        let Some(len) = copyable(&req, policy.max_body_bytes).filter(|_| roll) else {
            return self.inner.call(req);
        };
        let mut inner = self.inner.clone();
        let mut shadow = self.shadow.clone();
        Box::pin(async move {
            let (mut parts, body) = req.into_parts();
            // One trace for the pair: an untraced request gets a parent context here, so
            // that the primary's span and the shadow's are siblings under it.
            if !parts.headers.contains_key("traceparent") {
                let parent = super::trace::TraceContext::from_headers(&parts.headers);
                if let Ok(v) = HeaderValue::from_str(&parent.traceparent()) {
                    parts.headers.insert("traceparent", v);
                }
            }
            let bytes = if len == 0 {
                bytes::Bytes::new()
            } else {
                match read_at_most(body, len).await {
                    Some(b) => b,
                    // The caller's body broke or was longer than it said: no copy, and the
                    // primary fails as it would have.
                    None => {
                        return inner.call(Request::from_parts(parts, super::empty())).await;
                    }
                }
            };
            let mut copy = Request::builder()
                .method(parts.method.clone())
                .uri(parts.uri.clone())
                .version(parts.version)
                .body(full(bytes.clone()))
                .unwrap_or_else(|_| Request::new(super::empty()));
            *copy.headers_mut() = parts.headers.clone();
            copy.headers_mut()
                .insert(MIRROR_HEADER, HeaderValue::from_static("1"));
            let x = copy.extensions_mut();
            if let Some(p) = parts.extensions.get::<super::trace::Peer>() {
                x.insert(p.clone());
            }
            if let Some(h) = parts.extensions.get::<super::forward::H2c>() {
                x.insert(*h);
            }
            x.insert(Arc::clone(&policy.split));
            x.insert(MirrorMark::Shadow);
            // Fire and forget: read the shadow's answer to its end (so its span is
            // complete) on a task of its own.
            tokio::spawn(async move {
                let Ok(r) = shadow.call(copy).await;
                let _ = r.into_body().collect().await;
            });
            parts.extensions.insert(MirrorMark::Primary);
            inner.call(Request::from_parts(parts, full(bytes))).await
        })
    }
}
